"""Prints the current state of every object reachable from the root, as Python ZODB loads
it: "S oid tid data_fnv", in oid order. Then runs fstest's checks.

Usage: states.py PATH
"""
import sys

import ZODB.FileStorage
from ZODB.scripts.fstest import check
from ZODB.serialize import referencesf
from ZODB.utils import z64


def fnv(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
    return '%d:%016x' % (len(data), h)


path = sys.argv[1]
fs = ZODB.FileStorage.FileStorage(path, read_only=True)
print('USED_INDEX', bool(fs._used_index))
seen = {}
todo = [z64]
while todo:
    oid = todo.pop()
    if oid in seen:
        continue
    data, tid = fs.load(oid)
    seen[oid] = (tid, fnv(data))
    todo.extend(r for r in referencesf(data) if r not in seen)
for oid in sorted(seen):
    tid, f = seen[oid]
    print('S', oid.hex(), tid.hex(), f)
print('LEN', len(fs))
fs.close()
check(path)
print('FSTEST OK')
