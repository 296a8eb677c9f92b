"""ZODB's and ZEO's storage conformance tests through ClientStorage against zeors serving
a RelStorage database on a real PostgreSQL (a throwaway cluster, see pgcluster.py), in
both of RelStorage's layouts.

The same mixins as test_conformance.py runs against zeors on a Data.fs; a history-free
database has no history, so it gets the mixins RelStorage itself runs for history-free
storages (no undo, no revisions, no history beyond the current state).
"""
import os
import tempfile
import unittest

from ZODB.tests import BasicStorage
from ZODB.tests import ConflictResolution
from ZODB.tests import HistoryStorage
from ZODB.tests import IteratorStorage
from ZODB.tests import MTStorage
from ZODB.tests import PackableStorage
from ZODB.tests import ReadOnlyStorage
from ZODB.tests import RevisionStorage
from ZODB.tests import StorageTestBase
from ZODB.tests import Synchronization
from ZODB.tests import TransactionalUndoStorage
from ZEO.ClientStorage import ClientStorage
from ZEO.tests import Cache
from ZEO.tests import CommitLockTests
from ZEO.tests import IterationTests
from ZEO.tests import ThreadTests
from ZEO.tests.testZEO import DummyDB, MiscZEOTests
from ZODB.Connection import TransactionMetaData
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle, zodb_unpickle
from ZODB.utils import z64 as ZERO

from conftest import PgServer, pg_cluster


class PgTestBase(StorageTestBase.StorageTestBase):
    keep_history = True
    server_args = ()

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        cluster = pg_cluster()
        self._tmp = tempfile.mkdtemp(prefix="zeors-pgconf-")
        dsn = cluster.dsn(cluster.new_database())
        self._server = PgServer(self._tmp, dsn, *self.server_args,
                                keep_history=self.keep_history).start()
        self._storage = self._new_client()

    def _new_client(self, **kw):
        kw.setdefault("wait", 1)
        kw.setdefault("wait_timeout", 60)
        kw.setdefault("cache_size", 20000000)
        kw.setdefault("min_disconnect_poll", 0.5)
        client = ClientStorage(self._server.addr, "1", **kw)
        client.registerDB(DummyDB())
        return client

    def _new_storage_client(self):
        return self._new_client()

    def open(self, read_only=0):
        self._storage.close()
        self._storage = self._new_client(read_only=read_only)

    def tearDown(self):
        self._storage.close()
        rc = self._server.stop()
        StorageTestBase.StorageTestBase.tearDown(self)
        assert rc == 0, self._server.log_text()[-3000:]


class PgHistoryPreserving(
    PgTestBase,
    BasicStorage.BasicStorage,
    Synchronization.SynchronizedStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
    CommitLockTests.CommitLockVoteTests,
    ThreadTests.ThreadTests,
    MiscZEOTests,
    ConflictResolution.ConflictResolvingStorage,
    RevisionStorage.RevisionStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    IterationTests.IterationTests,
    TransactionalUndoStorage.TransactionalUndoStorage,
    Cache.TransUndoStorageWithCache,
    PackableStorage.PackableStorage,
    PackableStorage.PackableUndoStorage,
):
    keep_history = True

    def testPackUndoLog(self):
        # As in test_conformance.py: the fake clock cannot reach another process.
        PackableStorage.PackableUndoStorage.testPackUndoLog.__wrapped__(self)

    def testTransactionalUndoIterator(self):
        # ZODB's version expects undo records to be back pointers (data_txn). RelStorage
        # copies the undone state forward instead, so its records have none (RelStorage's
        # own suite replaces this test for the same reason). Checked here: each undo
        # transaction lists exactly the objects of the transaction it undid, with the
        # state from before it, and no back pointer.
        s = self._storage
        oids = [s.new_oid() for _ in range(3)]
        first = self._multi_obj_transaction([(o, ZERO, zodb_pickle(MinPO(1))) for o in oids])
        second = self._multi_obj_transaction([(o, first, zodb_pickle(MinPO(2))) for o in oids])
        t = TransactionMetaData()
        s.tpc_begin(t)
        s.undo(s.undoInfo()[0]["id"], t)
        s.tpc_vote(t)
        undo_tid = s.tpc_finish(t)
        # Records are read while the server-side iterator is open.
        txns = [list(txn) for txn in s.iterator(undo_tid, undo_tid)]
        self.assertEqual(len(txns), 1)
        records = txns[0]
        self.assertEqual(sorted(r.oid for r in records), sorted(oids))
        for r in records:
            self.assertIsNone(r.data_txn)
            self.assertEqual(zodb_unpickle(r.data), MinPO(1))
        self.assertNotEqual(second, undo_tid)


class PgHistoryFree(
    PgTestBase,
    BasicStorage.BasicStorage,
    Synchronization.SynchronizedStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
    CommitLockTests.CommitLockVoteTests,
    ThreadTests.ThreadTests,
    MiscZEOTests,
    ConflictResolution.ConflictResolvingStorage,
):
    keep_history = False


# Tests a RelStorage database cannot pass by design, with the reason.
NOT_POSSIBLE = {
    PgHistoryPreserving: {
        # RelStorage's undo resolves no conflicts (its suite skips these too).
        "testUndoMultipleConflictResolution": "conflict-resolving undo (RelStorage has none)",
        "testUndoMultipleConflictResolutionReversed": "conflict-resolving undo (RelStorage has none)",
    },
}


def _expose(cls):
    """The mixins name their tests check*; expose them to pytest as test_*."""
    for name in dir(cls):
        if name.startswith("check") and callable(getattr(cls, name)):
            setattr(cls, "test_" + name[5:], getattr(cls, name))
    for name, why in NOT_POSSIBLE.get(cls, {}).items():
        setattr(cls, name, unittest.skip(why)(getattr(cls, name)))


_expose(PgHistoryPreserving)
_expose(PgHistoryFree)
