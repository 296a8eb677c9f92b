"""ZODB's and ZEO's own storage conformance tests, run through ClientStorage against zeors.

These are the test mixins the ZEO project runs against its own server
(`ZEO.tests.testZEO.GenericTests` and friends); only the server is swapped for zeors.
History, iteration, undo and pack mixins belong to later work and are not included yet.
"""
import os
import tempfile
import unittest

from ZODB.tests import BasicStorage
from ZODB.tests import ConflictResolution
from ZODB.tests import MTStorage
from ZODB.tests import ReadOnlyStorage
from ZODB.tests import RevisionStorage
from ZODB.tests import StorageTestBase
from ZODB.tests import Synchronization
from ZEO.ClientStorage import ClientStorage
from ZEO.tests import CommitLockTests
from ZEO.tests import ThreadTests
from ZEO.tests.testZEO import DummyDB, MiscZEOTests

from conftest import Server


class ZeorsTestBase(StorageTestBase.StorageTestBase):
    server_args = ()

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self._tmp = tempfile.mkdtemp(prefix="zeors-conf-")
        self._server = Server(os.path.join(self._tmp, "Data.fs"), *self.server_args).start()
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


class ZeorsConformance(
    ZeorsTestBase,
    BasicStorage.BasicStorage,
    Synchronization.SynchronizedStorage,
    MTStorage.MTStorage,
    ReadOnlyStorage.ReadOnlyStorage,
    CommitLockTests.CommitLockVoteTests,
    ThreadTests.ThreadTests,
    MiscZEOTests,
    ConflictResolution.ConflictResolvingStorage,
    RevisionStorage.RevisionStorage,
):
    pass


class ZeorsMsgpackConformance(ZeorsConformance):
    server_args = ("--msgpack",)


# Needs undo, which is the next issue's work (FileStorage undo); not run until then.
NOT_YET = {"testLoadBeforeUndo": "undo is not implemented yet"}


def _expose(cls):
    """The mixins name their tests check*; expose them to pytest as test_*."""
    for name in dir(cls):
        if name.startswith("check") and callable(getattr(cls, name)):
            setattr(cls, "test_" + name[5:], getattr(cls, name))
    for name, why in NOT_YET.items():
        setattr(cls, name, unittest.skip(why)(getattr(cls, name)))


_expose(ZeorsConformance)
