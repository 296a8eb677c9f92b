"""ZODB's and ZEO's storage conformance tests through ClientStorage against zeors serving
a RelStorage database on a real PostgreSQL (a throwaway cluster, see pgcluster.py), in
both of RelStorage's layouts.

The same mixins as test_conformance.py runs against zeors on a Data.fs; a history-free
database has no history, so it gets the mixins RelStorage itself runs for history-free
storages (no undo, no revisions, no history beyond the current state).
"""
import os
import tempfile

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
):
    keep_history = True


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


def _expose(cls):
    """The mixins name their tests check*; expose them to pytest as test_*."""
    for name in dir(cls):
        if name.startswith("check") and callable(getattr(cls, name)):
            setattr(cls, "test_" + name[5:], getattr(cls, name))


_expose(PgHistoryPreserving)
_expose(PgHistoryFree)
