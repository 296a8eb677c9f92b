"""Packs a Data.fs with Python ZODB. Usage: pack.py PATH TIME"""
import sys

import ZODB.FileStorage
from ZODB.serialize import referencesf

fs = ZODB.FileStorage.FileStorage(sys.argv[1])
fs.pack(float(sys.argv[2]), referencesf)
fs.close()
