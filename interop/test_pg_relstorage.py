"""zeors and RelStorage on one PostgreSQL database: RelStorage clients (RelStorage 4 and
psycopg2 from PyPI) and ZEO clients through zeors, RelStorage's tools (zodbconvert,
zodbpack), both layouts. A real, throwaway PostgreSQL cluster (pgcluster.py).
"""
import os
import subprocess
import sys
import threading
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB.blob import Blob
from ZODB.POSException import ConflictError

from conftest import PgServer

LAYOUTS = [pytest.param(True, id="history-preserving"), pytest.param(False, id="history-free")]


def relstorage_db(dsn, keep_history=True, create_schema=True, blob_dir=None, **kw):
    """A ZODB.DB on a RelStorage client of the database (no zeors involved)."""
    from relstorage.adapters.postgresql import PostgreSQLAdapter
    from relstorage.options import Options
    from relstorage.storage import RelStorage

    opts = Options(keep_history=keep_history, create_schema=create_schema,
                   blob_dir=blob_dir, shared_blob_dir=False, **kw)
    return ZODB.DB(RelStorage(PostgreSQLAdapter(dsn=dsn, options=opts), options=opts))


def zeo_db(server, **kw):
    kw.setdefault("wait_timeout", 30)
    return ZODB.DB(ClientStorage(server.addr, **kw))


@pytest.fixture
def pg_server(pg, tmp_path):
    servers = []

    def make(keep_history=True, dbname=None, *extra):
        dbname = dbname or pg.new_database()
        s = PgServer(tmp_path, pg.dsn(dbname), *extra, keep_history=keep_history).start()
        s.dbname = dbname
        servers.append(s)
        return s

    yield make
    for s in servers:
        if s.proc is not None:
            rc = s.stop()
            assert rc == 0, s.log_text()[-3000:]


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("keep_history", LAYOUTS)
def test_commits_and_invalidations_both_ways(pg, pg_server, keep_history):
    server = pg_server(keep_history)
    zdb = zeo_db(server)
    zconn = zdb.open()
    zroot = zconn.root()
    zroot["from_zeo"] = 1
    zroot["shared"] = PersistentMapping(n=0)
    transaction.commit()

    rdb = relstorage_db(pg.dsn(server.dbname), keep_history, create_schema=False)
    tm = transaction.TransactionManager()
    rconn = rdb.open(tm)
    rroot = rconn.root()
    assert rroot["from_zeo"] == 1
    assert rroot["shared"]["n"] == 0

    # RelStorage → ZEO: the ZEO client gets an invalidation through zeors (polling).
    rroot["shared"]["n"] = 1
    rroot["from_relstorage"] = "hello"
    started = time.time()
    tm.commit()

    def zeo_sees():
        transaction.begin()  # applies the invalidations received so far
        return zroot.get("from_relstorage") == "hello" and zroot["shared"]["n"] == 1

    wait_until(zeo_sees, what="the ZEO client to see a RelStorage commit")
    latency = time.time() - started
    assert latency < 2.0, latency

    # ZEO → RelStorage: RelStorage polls at its transaction boundaries.
    zroot["shared"]["n"] = 2
    transaction.commit()
    tm.begin()
    assert rroot["shared"]["n"] == 2
    rconn.close()
    rdb.close()
    zdb.close()


@pytest.mark.parametrize("keep_history", LAYOUTS)
def test_concurrent_length_increments_from_both_kinds_of_clients(pg, pg_server, keep_history):
    server = pg_server(keep_history)
    zdb = zeo_db(server)
    with zdb.transaction() as conn:
        conn.root()["counter"] = Length()
    dsn = pg.dsn(server.dbname)
    per_client = 40
    errors = []
    retries = {"conflicts": 0}
    lock = threading.Lock()

    def work(db):
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            for _ in range(per_client):
                while True:
                    tm.begin()
                    conn.root()["counter"].change(1)
                    try:
                        tm.commit()
                        break
                    except ConflictError:
                        tm.abort()
                        with lock:
                            retries["conflicts"] += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))
        finally:
            conn.close()

    rdbs = [relstorage_db(dsn, keep_history, create_schema=False) for _ in range(2)]
    zdbs = [zdb, zeo_db(server)]
    threads = [threading.Thread(target=work, args=(db,)) for db in rdbs + zdbs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    expected = per_client * len(threads)
    for db in rdbs + zdbs:
        with db.transaction() as conn:
            assert conn.root()["counter"]() == expected
    for db in rdbs + zdbs:
        db.close()


@pytest.mark.parametrize("keep_history", LAYOUTS)
def test_database_made_by_relstorage_is_served_and_schema_made_by_zeors_is_used(
        pg, pg_server, keep_history):
    # RelStorage creates and fills a database; zeors serves it.
    made_by_rs = pg.new_database()
    rdb = relstorage_db(pg.dsn(made_by_rs), keep_history)
    with rdb.transaction() as conn:
        conn.root()["tree"] = tree = OOBTree()
        for i in range(300):
            tree[f"k{i}"] = PersistentMapping(i=i)
    rdb.close()
    server = pg_server(keep_history, made_by_rs)
    zdb = zeo_db(server)
    with zdb.transaction() as conn:
        tree = conn.root()["tree"]
        assert [tree[f"k{i}"]["i"] for i in range(300)] == list(range(300))
        tree["k0"]["i"] = "changed by zeo"
    zdb.close()

    # zeors creates the schema; RelStorage uses it without creating anything.
    server2 = pg_server(keep_history)
    zdb = zeo_db(server2)
    with zdb.transaction() as conn:
        conn.root()["x"] = PersistentMapping(v=1)
    zdb.close()
    rdb = relstorage_db(pg.dsn(server2.dbname), keep_history, create_schema=False)
    with rdb.transaction() as conn:
        assert conn.root()["x"]["v"] == 1
        conn.root()["x"]["v"] = 2
    rdb.close()
    # ... and with create-schema on (RelStorage then installs its own functions).
    rdb = relstorage_db(pg.dsn(server2.dbname), keep_history, create_schema=True)
    with rdb.transaction() as conn:
        assert conn.root()["x"]["v"] == 2
        conn.root()["x"]["v"] = 3
    rdb.close()
    # zeors learns of RelStorage's commits by polling: within its poll interval.
    zdb = zeo_db(server2)
    conn = zdb.open()

    def sees_3():
        transaction.begin()
        try:
            return conn.root()["x"]["v"] == 3
        except ConflictError:
            # History-free: the state this snapshot needs was replaced (RelStorage's
            # answer too); an application retries, so does this loop.
            return False

    wait_until(sees_3, what="zeors to see RelStorage's commit")
    conn.close()
    zdb.close()


def _make_datafs(path):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    with db.transaction() as conn:
        root = conn.root()
        root["tree"] = OOBTree()
        root["counter"] = Length()
    for n in range(30):
        with db.transaction(f"txn {n}") as conn:
            root = conn.root()
            for i in range(20):
                root["tree"][f"{n}-{i}"] = PersistentMapping(n=n, i=i, pad="x" * (n * i))
            root["counter"].change(1)
            if n % 5 == 0:
                del root["tree"][f"{n}-0"]
    db.close()


def _run(*args):
    r = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=600)
    assert r.returncode == 0, r.stdout.decode(errors="replace")[-3000:]


def _relstorage_conf(name, dsn, keep_history, extra=""):
    return f"""
<relstorage {name}>
  keep-history {'true' if keep_history else 'false'}
  {extra}
  <postgresql>
    dsn {dsn}
  </postgresql>
</relstorage>
"""


@pytest.mark.parametrize("keep_history", LAYOUTS)
def test_zodbconvert_then_served_by_zeors_matches_the_datafs(pg, pg_server, tmp_path, keep_history):
    datafs = tmp_path / "Data.fs"
    _make_datafs(datafs)
    dbname = pg.new_database()
    conf = tmp_path / "convert.conf"
    conf.write_text(f"""
%import relstorage
<filestorage source>
  path {datafs}
  read-only true
</filestorage>
{_relstorage_conf('destination', pg.dsn(dbname), keep_history)}
""")
    _run(os.path.join(os.path.dirname(sys.executable), "zodbconvert"), conf)

    server = pg_server(keep_history, dbname)
    client = ClientStorage(server.addr, wait_timeout=30)
    fs = ZODB.FileStorage.FileStorage(str(datafs), read_only=True)
    try:
        compared = 0
        next_oid = None
        while True:
            oid, tid, data, next_oid = fs.record_iternext(next_oid)
            got_data, got_tid = client.load(oid)
            assert got_data == data, oid
            assert got_tid == tid, oid
            compared += 1
            if next_oid is None:
                break
        assert compared > 600
        if keep_history:
            # Every transaction, with its metadata and records.
            ours = [(t.tid, t.user, t.description, sorted((r.oid, r.data) for r in t))
                    for t in client.iterator()]
            theirs = [(t.tid, t.user, t.description, sorted((r.oid, r.data) for r in t))
                      for t in fs.iterator()]
            assert ours == theirs
    finally:
        fs.close()
        client.close()


def _table(conn, sql):
    cur = conn.cursor()
    cur.execute(sql)
    return sorted(cur.fetchall())


@pytest.mark.parametrize("keep_history", LAYOUTS)
def test_pack_leaves_what_zodbpack_leaves(pg, pg_server, tmp_path, keep_history):
    # One history, two copies of the database.
    server = pg_server(keep_history)
    zdb = zeo_db(server)
    with zdb.transaction() as conn:
        root = conn.root()
        root["kept"] = PersistentMapping(v=0)
        root["dropped"] = PersistentMapping(child=PersistentMapping(v=1))
        root["tree"] = OOBTree()
    for n in range(10):
        with zdb.transaction() as conn:
            root = conn.root()
            root["kept"]["v"] = n
            root["tree"][n] = PersistentMapping(n=n)
            if n == 4:
                del root["dropped"]
            if n == 6:
                del root["tree"][2]
    zdb.close()
    server.stop()
    copy = pg.new_database("copy")
    admin = pg.connect()
    admin.cursor().execute(f"DROP DATABASE {copy}")
    admin.cursor().execute(f"CREATE DATABASE {copy} TEMPLATE {server.dbname}")
    admin.close()
    time.sleep(0.05)

    # zeors packs one (through a ZEO client), zodbpack the other.
    server.start()
    client = ClientStorage(server.addr, wait_timeout=30)
    client.pack(time.time() + 1, None)
    client.close()
    server.stop()
    conf = tmp_path / "pack.conf"
    conf.write_text("%import relstorage\n" + _relstorage_conf("main", pg.dsn(copy), keep_history,
                                                               "pack-gc true"))
    _run(os.path.join(os.path.dirname(sys.executable), "zodbpack"), "-d", "0", conf)

    a, b = pg.connect(server.dbname), pg.connect(copy)
    try:
        queries = ["SELECT zoid, tid, md5(state) FROM object_state"]
        if keep_history:
            queries += ["SELECT zoid, tid FROM current_object",
                        "SELECT tid, packed, is_empty FROM transaction"]
        for q in queries:
            ours, theirs = _table(a, q), _table(b, q)
            assert ours == theirs, q
        assert len(_table(a, "SELECT zoid FROM object_state")) > 5
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("keep_history", LAYOUTS)
def test_blobs_in_the_database_both_ways(pg, pg_server, tmp_path, keep_history):
    server = pg_server(keep_history, None, "--blob-dir", str(tmp_path / "zeors-blobs"))
    zdb = zeo_db(server, blob_dir=str(tmp_path / "zeo-blobs"))
    big = os.urandom(3 * 1024 * 1024 + 17)
    with zdb.transaction() as conn:
        conn.root()["blob"] = b = Blob()
        with b.open("w") as f:
            f.write(big)
    rdb = relstorage_db(pg.dsn(server.dbname), keep_history, create_schema=False,
                        blob_dir=str(tmp_path / "rs-blobs"))
    with rdb.transaction() as conn:
        with conn.root()["blob"].open() as f:
            assert f.read() == big
        conn.root()["blob2"] = b2 = Blob()
        with b2.open("w") as f:
            f.write(b"from relstorage" * 1000)
    rdb.close()
    # A fresh ZEO client (empty blob cache) reads RelStorage's blob through zeors.
    zdb.close()
    zdb = zeo_db(server, blob_dir=str(tmp_path / "zeo-blobs-2"))
    conn = zdb.open()
    wait_until(lambda: transaction.begin() and False or "blob2" in conn.root(),
               what="zeors to see RelStorage's commit")
    conn.close()
    with zdb.transaction() as conn:
        with conn.root()["blob2"].open() as f:
            assert f.read() == b"from relstorage" * 1000
        with conn.root()["blob"].open() as f:
            assert f.read() == big
    zdb.close()


def test_zeo_conf_with_a_relstorage_section(pg, tmp_path):
    from conftest import free_port, wait_for_port, zeors_binary

    dbname = pg.new_database()
    port = free_port()
    conf = tmp_path / "zeo.conf"
    conf.write_text(f"""
%import relstorage
<zeo>
  address 127.0.0.1:{port}
</zeo>
<relstorage main>
  keep-history false
  blob-dir {tmp_path / 'blobs'}
  commit-lock-timeout 5
  cache-local-mb 16
  <postgresql>
    driver auto
    dsn {pg.dsn(dbname)}
  </postgresql>
</relstorage>
""")
    log = open(tmp_path / "zeors.log", "wb")
    proc = subprocess.Popen([zeors_binary(), "serve", "-C", str(conf)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc)
        d = ZODB.DB(ClientStorage(("127.0.0.1", port), storage="main", wait_timeout=30))
        with d.transaction() as conn:
            conn.root()["x"] = 1
        d.close()
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        log.close()
    # The history-free layout was created, and RelStorage sees the commit.
    rdb = relstorage_db(pg.dsn(dbname), keep_history=False, create_schema=False)
    with rdb.transaction() as conn:
        assert conn.root()["x"] == 1
    rdb.close()


@pytest.mark.parametrize("dsn,message", [
    ("host=/nonexistent/socket/dir dbname=x", "cannot reach PostgreSQL"),
    ("host=/tmp port=notaport", "bad PostgreSQL DSN"),
])
def test_a_bad_dsn_or_an_unreachable_database_is_one_clear_error(dsn, message):
    from conftest import free_port, zeors_binary

    r = subprocess.run([zeors_binary(), "serve", "-a", f"127.0.0.1:{free_port()}", "--postgresql", dsn],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RUST_BACKTRACE": "0", "RUST_LOG": "warn"})
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_a_zeors_proxy_in_front_of_a_postgresql_server(pg, pg_server, make_server):
    server = pg_server(True)
    proxy = make_server.proxy(server.addr)
    pdb = zeo_db(proxy)
    with pdb.transaction() as conn:
        conn.root()["via_proxy"] = PersistentMapping(n=1)
    # A RelStorage commit reaches the proxy's client as an invalidation.
    rdb = relstorage_db(pg.dsn(server.dbname), True, create_schema=False)
    with rdb.transaction() as conn:
        conn.root()["via_proxy"]["n"] = 2
    rdb.close()
    conn = pdb.open()

    def proxy_sees_2():
        transaction.begin()
        return conn.root()["via_proxy"]["n"] == 2

    wait_until(proxy_sees_2, what="the proxy's client to see a RelStorage commit")
    conn.close()
    pdb.close()


def test_reconnecting_clients_are_answered_from_the_database(pg, pg_server, tmp_path):
    # A queue of one transaction: a client that missed more is answered by the storage.
    server = pg_server(True, None, "--invalidation-queue-size", "1")
    with zeo_db(server).transaction() as conn:
        conn.root()["a"] = PersistentMapping(v=0)
        conn.root()["b"] = PersistentMapping(v=0)
    cached = zeo_db(server, client="keep", var=str(tmp_path), cache_size=1 << 20)
    with cached.transaction() as conn:
        assert conn.root()["a"]["v"] == 0 and conn.root()["b"]["v"] == 0
    last = cached.storage.lastTransaction()
    cached.close()
    # Three transactions while that client is away, one by RelStorage.
    other = zeo_db(server)
    for key in "ab":
        with other.transaction() as conn:
            conn.root()[key]["v"] = 1
    other.close()
    rdb = relstorage_db(pg.dsn(server.dbname), True, create_schema=False)
    with rdb.transaction() as conn:
        conn.root()["a"]["v"] = 2
    rdb.close()
    time.sleep(0.5)  # past the poll interval
    from rawzeo import Raw

    raw = Raw(server.addr)
    raw.register()
    tid, oids = raw.call("getInvalidations", last)[3]
    raw.close()
    assert tid > last and len(oids) == 2
    cached = zeo_db(server, client="keep", var=str(tmp_path), cache_size=1 << 20)
    with cached.transaction() as conn:
        assert conn.root()["a"]["v"] == 2 and conn.root()["b"]["v"] == 1
    cached.close()


def test_a_database_of_the_other_layout_is_refused(pg, pg_server):
    from conftest import free_port, zeors_binary

    server = pg_server(True)
    server.stop()
    r = subprocess.run([zeors_binary(), "serve", "-a", f"127.0.0.1:{free_port()}",
                        "--postgresql", pg.dsn(server.dbname), "--keep-history", "false"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RUST_BACKTRACE": "0", "RUST_LOG": "warn"})
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "history-preserving" in lines[0], r.stderr


@pytest.mark.parametrize("keep_history", LAYOUTS)
def test_copy_transactions_from_a_datafs_through_zeors(pg, pg_server, tmp_path, keep_history):
    # Restores with given tids through ZEO (RelStorage's row lock on commit_row_lock too).
    datafs = tmp_path / "Data.fs"
    _make_datafs(datafs)
    server = pg_server(keep_history)
    client = ClientStorage(server.addr, wait_timeout=30)
    fs = ZODB.FileStorage.FileStorage(str(datafs), read_only=True)
    try:
        client.copyTransactionsFrom(fs)
        assert client.lastTransaction() == fs.lastTransaction()
        next_oid = None
        while True:
            oid, tid, data, next_oid = fs.record_iternext(next_oid)
            assert client.load(oid) == (data, tid)
            if next_oid is None:
                break
    finally:
        fs.close()
        client.close()
    # RelStorage reads what was copied.
    rdb = relstorage_db(pg.dsn(server.dbname), keep_history, create_schema=False)
    with rdb.transaction() as conn:
        assert conn.root()["counter"]() == 30
    rdb.close()
