"""Fixtures for the interop suite: start the built `zeors` binary, connect real clients.

Every test here drives zeors with ZODB and ZEO from PyPI; nothing is mocked.
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import weakref

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def zeors_binary():
    path = os.environ.get("ZEORS_BIN") or str(ROOT / "target" / "debug" / "zeors")
    if not os.path.exists(path):
        raise RuntimeError(f"zeors binary not found at {path}: run `cargo build` or scripts/test.sh")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"zeors exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"zeors did not listen on {port} within {timeout}s")


class Server:
    """A running zeors process."""

    def __init__(self, path, *extra, port=None, log=None):
        self.path = pathlib.Path(path)
        self.extra = list(extra)
        self.port = port or free_port()
        self.log = log or self.path.parent / f"zeors-{self.port}.log"
        self.proc = None

    @property
    def addr(self):
        return ("127.0.0.1", self.port)

    def command(self):
        return [zeors_binary(), "serve", "-a", f"127.0.0.1:{self.port}", "-f", str(self.path), *self.extra]

    def start(self):
        args = self.command()
        self.logfile = open(self.log, "ab")
        self.proc = subprocess.Popen(args, stdout=self.logfile, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)
        return self

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("zeors did not stop on %s within %ss" % (sig, timeout))
        rc = self.proc.returncode
        self.proc = None
        self.logfile.close()
        return rc

    def kill(self):
        return self.stop(signal.SIGKILL)

    def restart(self):
        self.stop()
        return self.start()

    def log_text(self):
        return self.log.read_text(errors="replace")


class PgServer(Server):
    """A zeors process serving a RelStorage database on PostgreSQL."""

    def __init__(self, workdir, dsn, *extra, keep_history=True, port=None):
        workdir = pathlib.Path(workdir)
        super().__init__(workdir / "unused.fs", *extra, port=port)
        self.dsn = dsn
        self.keep_history = keep_history

    def command(self):
        return [zeors_binary(), "serve", "-a", f"127.0.0.1:{self.port}", "--postgresql", self.dsn,
                "--keep-history", "true" if self.keep_history else "false", *self.extra]


class StockServer:
    """The stock Python ZEO server (runzeo from PyPI), for proxy tests."""

    def __init__(self, path, port=None, invalidation_queue_size=100, extra_zeo=""):
        self.path = pathlib.Path(path)
        self.port = port or free_port()
        self.conf = self.path.parent / f"zeo-{self.port}.conf"
        self.log = self.path.parent / f"runzeo-{self.port}.log"
        self.conf.write_text(
            f"""<zeo>
  address 127.0.0.1:{self.port}
  invalidation-queue-size {invalidation_queue_size}
  {extra_zeo}
</zeo>
<filestorage 1>
  path {self.path}
</filestorage>
"""
        )
        self.proc = None

    @property
    def addr(self):
        return ("127.0.0.1", self.port)

    def start(self):
        runzeo = pathlib.Path(sys.executable).parent / "runzeo"
        self.logfile = open(self.log, "ab")
        self.proc = subprocess.Popen([str(runzeo), "-C", str(self.conf)], stdout=self.logfile, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        return 0


_clients = weakref.WeakSet()


def _track_clients():
    """Every ClientStorage made in this process is remembered (weakly), so that one a test
    left open can be closed before the next test starts."""
    from ZEO.ClientStorage import ClientStorage

    init = ClientStorage.__init__
    if getattr(init, "_zeors_tracked", False):
        return

    def tracked(self, *args, **kw):
        _clients.add(self)
        init(self, *args, **kw)

    tracked._zeors_tracked = True
    ClientStorage.__init__ = tracked


@pytest.fixture(autouse=True)
def no_leftover_clients():
    """Closes the ClientStorages earlier tests left open. Such a client keeps retrying its
    server, which is gone, and logs each attempt on `ZEO.asyncio.client`: ZEO's own
    `checkExceptionLogsAtError` asserts that logger stays silent and failed when a
    leftover's retry landed inside it. Only clients of finished tests are closed."""
    _track_clients()
    for cs in list(_clients):
        _clients.discard(cs)
        try:
            cs.close()  # a no-op for a client closed already
        except Exception:
            pass
    yield


@pytest.fixture(autouse=True)
def fresh_transaction():
    """Each test starts with a fresh thread-local transaction: a test that fails mid-commit
    leaves the `transaction` package's current transaction doomed ("An operation previously
    failed"), and the next test using `transaction.commit()` must not fail for that."""
    import transaction

    def abort():
        try:
            transaction.abort()
        except Exception:
            pass

    abort()
    yield
    abort()


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(*extra, path=None, start=True):
        s = Server(path or tmp_path / "Data.fs", *extra)
        servers.append(s)
        return s.start() if start else s

    def stock(path=None, **kw):
        s = StockServer(path or tmp_path / "upstream.fs", **kw)
        servers.append(s)
        return s.start()

    def proxy(upstream_addr, name="proxy", *extra, start=True):
        """A zeors proxy in front of `upstream_addr`, caching in tmp_path/<name>-cache."""
        s = Server(
            tmp_path / f"{name}.unused.fs",
            "--upstream",
            f"{upstream_addr[0]}:{upstream_addr[1]}",
            "--cache-dir",
            str(tmp_path / f"{name}-cache"),
            *extra,
        )
        servers.append(s)
        return s.start() if start else s

    make.stock = stock
    make.proxy = proxy
    yield make
    for s in reversed(servers):
        if s.proc is not None:
            rc = s.stop()
            if isinstance(s, Server):
                assert rc == 0, f"zeors exited with {rc}; log:\n{s.log_text()[-4000:]}"


_PG = None


def pg_cluster():
    """The session's throwaway PostgreSQL cluster (started on first use, removed at exit)."""
    global _PG
    if _PG is None:
        from pgcluster import PgCluster

        cluster = PgCluster().init()
        cluster.start()
        _PG = cluster
    return _PG


def pytest_sessionfinish(session, exitstatus):
    global _PG
    if _PG is not None:
        _PG.destroy()
        _PG = None


@pytest.fixture
def pg():
    return pg_cluster()


@pytest.fixture(params=["pickle", "msgpack"])
def server(request, make_server):
    """A zeors server on an empty Data.fs, in each marshalling."""
    extra = ["--msgpack"] if request.param == "msgpack" else []
    return make_server(*extra)


@pytest.fixture
def pickle_server(make_server):
    return make_server()


def wait_seen(db_or_storage, tid, timeout=10.0):
    """Waits until a ZEO client has received the invalidation of `tid` (or a later one).

    ZEO tells other clients of a commit asynchronously: when the committer's commit
    returns, another client's I/O thread may not have read the invalidation yet, and a
    transaction it begins meanwhile rightly sees the state before. Tests that check what
    another client sees wait for it here instead of racing it.
    """
    storage = getattr(db_or_storage, "storage", db_or_storage)
    deadline = time.monotonic() + timeout
    while storage.lastTransaction() < tid:
        assert time.monotonic() < deadline, f"client never saw tid {tid.hex()}"
        time.sleep(0.002)


def client(server, **kw):
    from ZEO.ClientStorage import ClientStorage

    kw.setdefault("wait_timeout", 30)
    return ClientStorage(server.addr, **kw)


def db(server, **kw):
    import ZODB

    return ZODB.DB(client(server, **kw))
