"""Builds a Data.fs with Python ZODB exercising what a FileStorage reader must handle.

Usage: build_db.py PATH [SNAPSHOT_PATH]
Writes the storage at PATH (and closes it, so PATH.index is saved). If SNAPSHOT_PATH is
given, a copy of the data file as it was before the last transaction is written there.
"""
import shutil
import sys

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData

path = sys.argv[1]
snapshot = sys.argv[2] if len(sys.argv) > 2 else None

storage = ZODB.FileStorage.FileStorage(path)
db = ZODB.DB(storage)
conn = db.open()
root = conn.root()

# A BTree with thousands of keys (many buckets, BINGET-heavy pickles).
root['tree'] = OOBTree()
for i in range(3000):
    root['tree']['k%05d' % i] = 'v%d' % i
transaction.commit()

# Several revisions of a few objects.
for r in range(3):
    root['m%d' % r] = PersistentMapping({'r': r})
    root['tree']['k00001'] = r * 10
    transaction.commit()
root['m0']['more'] = 'x' * 1000
transaction.commit()

# User, description and extension.
t = transaction.get()
t.setUser('alice')
t.note('edited with metadata')
t.setExtendedInfo('foo', 'bar')
t.setExtendedInfo('n', 42)
root['m1']['meta'] = True
transaction.commit()

# Undo of a creation: "uncreated" (plen 0, back 0) record + root back pointer.
root['victim'] = PersistentMapping({'doomed': 1})
transaction.commit()
db.undo(db.undoLog(0, 1)[0]['id'])
transaction.commit()

# Undo of a modification: back pointer to the earlier revision.
root['m2']['y'] = 2
transaction.commit()
db.undo(db.undoLog(0, 1)[0]['id'])
transaction.commit()

# deleteObject (IExternalGC) through the storage API.
p = PersistentMapping({'gc': 'me'})
root['todelete'] = p
transaction.commit()
oid, serial = p._p_oid, p._p_serial
del root['todelete']
transaction.commit()
t = TransactionMetaData()
storage.tpc_begin(t)
storage.deleteObject(oid, serial, t)
storage.tpc_vote(t)
storage.tpc_finish(t)

# Two stores of one oid in a transaction (Python writes both records).
t = TransactionMetaData(description='double store')
storage.tpc_begin(t)
data, serial = storage.load(root['m0']._p_oid)
storage.store(root['m0']._p_oid, serial, data, '', t)
storage.store(root['m0']._p_oid, serial, data, '', t)
storage.tpc_vote(t)
storage.tpc_finish(t)
conn.sync()

if snapshot:
    storage._file.flush()
    shutil.copyfile(path, snapshot)

# A last ordinary transaction.
root['last'] = PersistentMapping({'end': True})
root['tree']['k02999'] = 'changed'
transaction.commit()
db.close()
