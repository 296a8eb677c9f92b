"""Prints, for every oid in a Data.fs, what ZODB's FileStorage returns for loadBefore,
loadSerial and history, plus lastTransaction/len/size and lastInvalidations, one fact per
line. The Rust test computes the same lines and compares.

Usage: dump.py PATH
"""
import sys

import ZODB.FileStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

MAXTID = p64(0x7fffffffffffffff)


def fnv(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
    return '%d:%016x' % (len(data), h)


def h(b):
    return b.hex() if b else '-'


fs = ZODB.FileStorage.FileStorage(sys.argv[1], read_only=True)
tids = []
oids = []
seen = set()
for txn in fs.iterator():
    tids.append(txn.tid)
    for rec in txn:
        if rec.oid not in seen:
            seen.add(rec.oid)
            oids.append(rec.oid)
out = []
out.append('LAST %s' % fs.lastTransaction().hex())
out.append('LEN %d' % len(fs))
out.append('SIZE %d' % fs.getSize())
for tid, toids in fs.lastInvalidations(len(tids)):
    out.append('RT %s %s' % (tid.hex(), ','.join(o.hex() for o in toids)))
befores = [MAXTID]
for t in tids:
    befores += [t, p64(u64(t) + 1)]
for oid in oids:
    for before in befores:
        try:
            r = fs.loadBefore(oid, before)
        except POSKeyError:
            r = 'POSKEY'
        else:
            if r is None:
                r = 'NONE'
            else:
                data, start, end = r
                r = '%s %s %s' % (fnv(data), start.hex(), end.hex() if end else '-')
        out.append('LB %s %s %s' % (oid.hex(), before.hex(), r))
    # History, with the raw extension bytes read from the transaction header.
    pos = fs._lookup_pos(oid)
    for d in fs.history(oid, size=10**6):
        dh = fs._read_data_header(pos)
        th = fs._read_txn_header(dh.tloc)
        assert dh.tid == d['tid']
        out.append('H %s %s %s %s %s %d' % (oid.hex(), d['tid'].hex(), h(d['user_name']),
                                           h(d['description']), h(th.ext), d['size']))
        try:
            s = fnv(fs.loadSerial(oid, d['tid']))
        except POSKeyError:
            s = 'POSKEY'
        out.append('LS %s %s %s' % (oid.hex(), d['tid'].hex(), s))
        pos = dh.prev
fs.close()
print('\n'.join(out))
