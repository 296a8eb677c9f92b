"""Appends transactions with Python ZODB to an existing Data.fs (e.g. one zeors wrote).

Usage: append.py PATH
"""
import sys

import transaction
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

db = ZODB.DB(ZODB.FileStorage.FileStorage(sys.argv[1]))
conn = db.open()
root = conn.root()
for i in range(500):
    root['tree']['p%05d' % i] = i
transaction.commit()
root['m1']['z'] = 'from python'
root['added'] = PersistentMapping({'by': 'python'})
transaction.commit()
root['m1']['z'] = 'changed again'
transaction.commit()
db.undo(db.undoLog(0, 1)[0]['id'])
transaction.commit()
db.close()
