"""Prints what Python ZODB sees of a Data.fs through iteration, undoLog and reference
scanning, one fact per line; the Rust tests print the same with zeors and compare.

Usage: history_dump.py PATH
Lines: T tid status user desc ext (hex) / R oid tid data_fnv data_txn / F oid tid refs /
U id tid user desc size.
"""
import sys

import ZODB.FileStorage
from ZODB.serialize import referencesf


def fnv(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
    return '%d:%016x' % (len(data), h)


def h(b):
    return b.hex() if b else '-'


it = ZODB.FileStorage.FileIterator(sys.argv[1])
for txn in it:
    print('T', txn.tid.hex(), txn.status, h(txn.user), h(txn.description),
          h(txn.extension_bytes))
    for rec in txn:
        print('R', rec.oid.hex(), rec.tid.hex(),
              fnv(rec.data) if rec.data is not None else 'None',
              rec.data_txn.hex() if rec.data_txn else '-')
        if rec.data is not None:
            try:
                refs = referencesf(rec.data)
            except Exception as e:
                refs = ['ERROR']
            print('F', rec.oid.hex(), rec.tid.hex(),
                  ','.join(r.hex() if isinstance(r, bytes) else r for r in refs) or '-')
it.close()
fs = ZODB.FileStorage.FileStorage(sys.argv[1], read_only=True)
for d in fs.undoLog(0, 100000):
    print('U', d['id'].decode(), h(d['user_name']), h(d['description']), d['size'])
fs.close()
