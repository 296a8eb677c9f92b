"""Checks a Data.fs written by zeors against the manifest of what it wrote.

Usage: check_rust_file.py PATH MANIFEST
Manifest lines: "REV oid tid datahex" (a revision that must load with loadSerial) and
"CUR oid tid" / "CUR oid POSKEY" (the current revision). Prints problems and exits 1, or
prints "OK".
"""
import sys

import ZODB
import ZODB.FileStorage
from ZODB.POSException import POSKeyError

path, manifest = sys.argv[1], sys.argv[2]
problems = []
fs = ZODB.FileStorage.FileStorage(path, read_only=True)
if not fs._used_index:
    problems.append('the .index written by zeors was not used')
for line in open(manifest):
    kind, oid, tid, *rest = line.split()
    oid, tid_b = bytes.fromhex(oid), None if tid == 'POSKEY' else bytes.fromhex(tid)
    if kind == 'REV':
        data = bytes.fromhex(rest[0])
        got = fs.loadSerial(oid, tid_b)
        if got != data:
            problems.append('loadSerial(%s, %s) differs' % (oid.hex(), tid))
    elif kind == 'CUR':
        try:
            _, serial = fs.load(oid)
        except POSKeyError:
            serial = None
        if serial != tid_b:
            problems.append('load(%s) serial %r, expected %s' % (oid.hex(), serial, tid))
fs.close()

# The real pickles must make a working database.
db = ZODB.DB(ZODB.FileStorage.FileStorage(path, read_only=True))
root = db.open().root()
if len(root['tree']) < 3000 or root['m0']['more'] != 'x' * 1000:
    problems.append('database contents differ')
db.close()
if problems:
    print('\n'.join(problems))
    sys.exit(1)
print('OK')
