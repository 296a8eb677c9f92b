"""Builds a Data.fs for the history, iteration, undo and pack cross-checks.

Usage: build_history_db.py PATH
Prints "PACKTIME <float>": a time between two transactions in the middle of the history,
after which there are changes, undos (back pointers into the part before it) and garbage.
"""
import sys
import time

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef
from ZODB.TimeStamp import TimeStamp

path = sys.argv[1]
storage = ZODB.FileStorage.FileStorage(path)
db = ZODB.DB(storage, databases={}, database_name='main')
other = ZODB.DB(None, databases=db.databases, database_name='other')
conn = db.open()
root = conn.root()

root['tree'] = OOBTree()
for i in range(2000):
    root['tree']['k%05d' % i] = PersistentMapping({'i': i}) if i % 10 == 0 else i
transaction.commit()

# Garbage: objects unlinked before the pack time, and a weakly referenced one.
root['junk'] = PersistentMapping({'x': PersistentMapping({'deep': 1})})
transaction.commit()
target = PersistentMapping({'weak': 'target'})
root['weakholder'] = PersistentMapping({'ref': WeakRef(target)})
root['strong'] = target
transaction.commit()
del root['junk']
del root['strong']
transaction.commit()

# A cross-database reference (invisible to GC, as in Python).
root['xdb'] = conn.get_connection('other').root()
transaction.commit()

# Revisions, an undo and an undone creation before the pack time.
for r in range(5):
    root['tree']['k00010']['i'] = r
    transaction.commit()
root['victim'] = PersistentMapping({'doomed': 1})
transaction.commit()
db.undo(db.undoLog(0, 1)[0]['id'])
transaction.commit()
# A creation undone before the pack time and brought back after it (an undo of the
# undo): the object has no state at the pack time, yet must survive.
root['phoenix'] = PersistentMapping({'rises': PersistentMapping({'again': 1})})
transaction.commit()
db.undo(db.undoLog(0, 1)[0]['id'])
transaction.commit()
phoenix_undo = db.undoLog(0, 1)[0]['id']

last = storage.lastTransaction()
time.sleep(0.05)
while TimeStamp(storage.lastTransaction()).timeTime() + 0.02 > time.time():
    time.sleep(0.01)
packtime = time.time()
time.sleep(0.05)

# After the pack time: changes, undos pointing before it, a new object, garbage.
db.undo(phoenix_undo)
transaction.commit()
root['tree']['k00020']['i'] = 'after'
transaction.commit()
db.undo(db.undoLog(0, 1)[0]['id'])
transaction.commit()
root['late'] = PersistentMapping({'late': True})
root['tree']['k00030'] = PersistentMapping({'replaced': 1})
transaction.commit()
t = transaction.get()
t.setUser('bob')
t.note('a late note')
t.setExtendedInfo('k', 'v')
root['m'] = PersistentMapping()
transaction.commit()
del root['m']
transaction.commit()
db.close()
print('PACKTIME %r' % packtime)
