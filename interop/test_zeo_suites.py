"""ZEO's own test modules, run through the stock `ClientStorage` against zeors: directly,
as a proxy of a zeors upstream, and as a proxy of the stock server.

`InvalidationTests` hammers a shared `OOBTree` from many clients: the concurrent-update
checks commit only if every conflict is resolved (ZEO's client re-votes at most nine
times, then calls `tpc_finish` without the lock), so they prove that a transaction keeps
the commit lock through its conflict rounds, end to end through a proxy too.
"""
import os
import tempfile

import pytest
from ZEO.tests import InvalidationTests

from conftest import Server, StockServer
from test_conformance import ZeorsTestBase, _expose_checks


class DirectBase(ZeorsTestBase):
    def openClientStorage(self, **kw):
        kw.pop("client_label", None)
        return self._new_client(**kw)


class ProxyOfZeorsBase(DirectBase):
    """The client talks to a zeors proxy whose upstream is a zeors server."""

    def setUp(self):
        self._tmp = tempfile.mkdtemp(prefix="zeors-suite-")
        self._upstream = Server(os.path.join(self._tmp, "upstream.fs")).start()
        self._server_args = ("--upstream", "%s:%s" % self._upstream.addr,
                             "--cache-dir", os.path.join(self._tmp, "cache"))
        super().setUp()

    def _start_server(self):
        return Server(os.path.join(self._tmp, "proxy.unused.fs"), *self._server_args).start()

    def tearDown(self):
        super().tearDown()
        assert self._upstream.stop() == 0, self._upstream.log_text()[-3000:]


class ProxyOfStockBase(ProxyOfZeorsBase):
    """The client talks to a zeors proxy whose upstream is the stock Python server."""

    def setUp(self):
        self._tmp = tempfile.mkdtemp(prefix="zeors-suite-")
        self._upstream = StockServer(os.path.join(self._tmp, "upstream.fs")).start()
        self._server_args = ("--upstream", "%s:%s" % self._upstream.addr,
                             "--cache-dir", os.path.join(self._tmp, "cache"))
        DirectBase.setUp(self)

    def tearDown(self):
        DirectBase.tearDown(self)
        self._upstream.stop()


class DirectInvalidations(DirectBase, InvalidationTests.InvalidationTests):
    pass


class ProxyOfZeorsInvalidations(ProxyOfZeorsBase, InvalidationTests.InvalidationTests):
    pass


class ProxyOfStockInvalidations(ProxyOfStockBase, InvalidationTests.InvalidationTests):
    pass


for _cls in (DirectInvalidations, ProxyOfZeorsInvalidations, ProxyOfStockInvalidations):
    _expose_checks(_cls)
del _cls
