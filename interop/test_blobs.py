"""Blobs (`ZODB.blob.Blob`) against zeors with `--blob-dir`: uploads and downloads over
the wire, a shared blob directory, aborts and disconnects, conflicts, undo, pack, a blob of
more than 1 GiB with the server's memory measured, and a Data.fs + blobstorage written by
Python ZODB served as is (and what zeors writes read back by Python ZODB).
"""
import hashlib
import os
import pathlib
import random
import shutil
import struct
import threading
import time

import pytest
import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.POSException import ConflictError, POSKeyError

from conftest import client, db
from rawzeo import Raw
from test_basic import wait_until

BLOB_INTERFACE = ("ZODB.interfaces", "IBlobStorage")


@pytest.fixture(params=["pickle", "msgpack"])
def blob_server(request, make_server, tmp_path):
    extra = ["--msgpack"] if request.param == "msgpack" else []
    return make_server("--blob-dir", str(tmp_path / "blobs"), *extra)


@pytest.fixture
def pickle_blob_server(make_server, tmp_path):
    return make_server("--blob-dir", str(tmp_path / "blobs"))


_n = [0]


def blob_db(server, tmp_path, **kw):
    """A DB over ClientStorage with its own blob cache directory."""
    if "blob_dir" not in kw:
        _n[0] += 1
        kw["blob_dir"] = str(tmp_path / f"client-blobs-{_n[0]}")
    return db(server, **kw)


def write_blob(conn, key, data):
    b = conn.root().get(key)
    if b is None:
        b = conn.root()[key] = Blob()
    with b.open("w") as f:
        f.write(data)
    return b


def read_blob(conn, key):
    with conn.root()[key].open("r") as f:
        return f.read()


def reads(d, key, data):
    """Whether a new transaction of `d` reads `data` from blob `key` (waiting for the
    invalidation of a commit made elsewhere)."""

    def check():
        with d.transaction() as conn:
            try:
                return read_blob(conn, key) == data
            except KeyError:  # not there yet
                return False

    return wait_until(check)


def server_files(root):
    """Committed blob files under a blob directory, relative paths."""
    root = pathlib.Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.blob"))


def temp_files(server_blob_dir):
    return sorted(p.name for p in (pathlib.Path(server_blob_dir) / "tmp").iterdir())


def test_write_and_read_back_from_another_client(blob_server, tmp_path):
    d1 = blob_db(blob_server, tmp_path)
    assert BLOB_INTERFACE in d1.storage._info["interfaces"]
    with d1.transaction() as conn:
        write_blob(conn, "a", b"first blob " * 1000)
        write_blob(conn, "empty", b"")
        write_blob(conn, "chunks", os.urandom(3 * 1024 * 1024 + 17))
        expected = read_blob(conn, "chunks")
    d2 = blob_db(blob_server, tmp_path)
    with d2.transaction() as conn:
        assert read_blob(conn, "a") == b"first blob " * 1000
        assert read_blob(conn, "empty") == b""
        assert read_blob(conn, "chunks") == expected
        oid, serial = conn.root()["a"]._p_oid, conn.root()["a"]._p_serial
    # On the server: Python's bushy layout, one read-only file per revision.
    blobs = tmp_path / "blobs"
    assert (blobs / ".layout").read_text() == "bushy"
    path = blobs / pathlib.Path(*[f"0x{b:02x}" for b in oid]) / (ZODB.utils.tid_repr(serial) + ".blob")
    assert path.read_bytes() == b"first blob " * 1000
    assert os.stat(path).st_mode & 0o222 == 0
    assert len(server_files(blobs)) == 3
    assert temp_files(blobs) == []
    # A new revision; the old one stays readable through history.
    with d1.transaction() as conn:
        write_blob(conn, "a", b"second")
    assert reads(d2, "a", b"second")
    old = d2.open(before=ZODB.utils.p64(ZODB.utils.u64(serial) + 1))
    assert read_blob(old, "a") == b"first blob " * 1000
    old.close()
    d1.close()
    d2.close()


def test_blobs_are_refused_without_a_blob_dir(make_server, tmp_path):
    s = make_server()
    d = blob_db(s, tmp_path)
    assert BLOB_INTERFACE not in d.storage._info["interfaces"]
    conn = d.open()
    write_blob(conn, "b", b"x")
    with pytest.raises(Exception):
        transaction.commit()
    transaction.abort()
    conn.close()
    d.close()
    # A raw upload is a protocol error: the connection is closed.
    r = Raw(s.addr)
    r.register()
    r.send("tpc_begin", 1, b"", b"", {}, None, " ", oneway=True)
    r.send("storeBlobStart", oneway=True)
    assert r.is_closed()


class FailingVote:
    """A resource manager that makes the transaction fail after the blob was sent."""

    def abort(self, txn):
        pass

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        raise RuntimeError("no")

    def tpc_abort(self, txn):
        pass

    def sortKey(self):
        return "~~~ last"


def test_aborted_transactions_and_disconnects_leave_no_file(pickle_blob_server, tmp_path):
    blobs = tmp_path / "blobs"
    d = blob_db(pickle_blob_server, tmp_path)
    with d.transaction() as conn:
        write_blob(conn, "a", b"committed")
    before = server_files(blobs)
    conn = d.open()
    write_blob(conn, "a", b"aborted " * 100000)
    transaction.get().join(FailingVote())
    with pytest.raises(RuntimeError):
        transaction.commit()
    transaction.abort()
    conn.close()
    assert wait_until(lambda: temp_files(blobs) == [])
    assert server_files(blobs) == before

    # A client that goes away in the middle of an upload.
    r = Raw(pickle_blob_server.addr)
    r.register()
    r.send("tpc_begin", 1, b"", b"", {}, None, " ", oneway=True)
    r.send("storeBlobStart", oneway=True)
    r.send("storeBlobChunk", b"x" * 59000, oneway=True)
    assert r.call("ping")[3] is None
    assert len(temp_files(blobs)) == 1
    r.close()
    assert wait_until(lambda: temp_files(blobs) == [])
    # ... or after the upload, before voting.
    r = Raw(pickle_blob_server.addr)
    r.register()
    oid = r.call("new_oids", 1)[3][0]
    r.send("tpc_begin", 1, b"", b"", {}, None, " ", oneway=True)
    r.send("storeBlobStart", oneway=True)
    r.send("storeBlobChunk", b"y" * 1000, oneway=True)
    r.send("storeBlobEnd", oid, b"\0" * 8, b"\x80\x03cZODB.blob\nBlob\nq\x00.\x80\x03N.", 1, oneway=True)
    assert r.call("ping")[3] is None
    assert len(temp_files(blobs)) == 1
    r.close()
    assert wait_until(lambda: temp_files(blobs) == [])
    assert server_files(blobs) == before
    with d.transaction() as conn:
        assert read_blob(conn, "a") == b"committed"
    d.close()


def test_chunks_out_of_place_close_the_connection(pickle_blob_server):
    r = Raw(pickle_blob_server.addr)
    r.register()
    r.send("storeBlobChunk", b"x", oneway=True)
    assert r.is_closed()
    r = Raw(pickle_blob_server.addr)
    r.register()
    r.send("tpc_begin", 1, b"", b"", {}, None, " ", oneway=True)
    r.send("storeBlobShared", b"\0" * 8, b"\0" * 8, b"d", "../../etc/passwd.tmp", 1, oneway=True)
    assert r.is_closed()


def test_a_missing_blob_is_a_poskeyerror(pickle_blob_server, tmp_path):
    d = blob_db(pickle_blob_server, tmp_path)
    with d.transaction() as conn:
        conn.root()["m"] = PersistentMapping()
    with d.transaction() as conn:
        oid, serial = conn.root()["m"]._p_oid, conn.root()["m"]._p_serial
    with pytest.raises(POSKeyError):
        d.storage.loadBlob(oid, serial)
    d.close()


def test_conflicting_blob_writes(pickle_blob_server, tmp_path):
    d1, d2 = blob_db(pickle_blob_server, tmp_path), blob_db(pickle_blob_server, tmp_path)
    with d1.transaction() as conn:
        write_blob(conn, "a", b"base")
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = d1.open(tm1), d2.open(tm2)
    with c1.root()["a"].open("w") as f:
        f.write(b"one")
    with c2.root()["a"].open("w") as f:
        f.write(b"two")
    tm1.commit()
    with pytest.raises(ConflictError):
        tm2.commit()
    tm2.abort()
    assert wait_until(lambda: temp_files(tmp_path / "blobs") == [])
    tm2.begin()
    assert read_blob(c2, "a") == b"one"
    c1.close()
    c2.close()
    d1.close()
    d2.close()


@pytest.fixture
def shared_blob_server(make_server, tmp_path):
    return make_server("--blob-dir", str(tmp_path / "blobs"), "--shared-blob-dir")


def test_shared_blob_dir(shared_blob_server, tmp_path):
    """Clients configured with `shared_blob_dir` write into the server's directory and
    read from it; clients without it see the same blobs over the wire."""
    pickle_blob_server = shared_blob_server
    shared = str(tmp_path / "blobs")
    d1 = blob_db(pickle_blob_server, tmp_path, blob_dir=shared, shared_blob_dir=True)
    with d1.transaction() as conn:
        write_blob(conn, "s", b"shared " * 5000)
        write_blob(conn, "t", b"")
    with d1.transaction() as conn:
        write_blob(conn, "s", b"shared v2")
    d2 = blob_db(pickle_blob_server, tmp_path)
    with d2.transaction() as conn:
        assert read_blob(conn, "s") == b"shared v2"
        assert read_blob(conn, "t") == b""
    with d2.transaction() as conn:
        write_blob(conn, "u", b"over the wire")
    assert reads(d1, "u", b"over the wire")
    # The client's temporary names are gone; three blobs, four revisions.
    leftovers = [p for p in pathlib.Path(shared).rglob("*") if p.name.endswith((".tmp-", ".tmp"))]
    assert leftovers == []
    assert len(server_files(shared)) == 4
    d1.close()
    d2.close()


def test_undo_restores_the_earlier_blob(blob_server, tmp_path):
    d = blob_db(blob_server, tmp_path)
    with d.transaction() as conn:
        write_blob(conn, "a", b"version 1")
    with d.transaction("second") as conn:
        write_blob(conn, "a", b"version 2")
    undo_id = [u for u in d.undoLog(0, 10) if u["description"] == "second"][0]["id"]
    d.undo(undo_id)
    transaction.commit()
    other = blob_db(blob_server, tmp_path)
    assert reads(other, "a", b"version 1")
    assert reads(d, "a", b"version 1")
    # Undo the undo.
    d.undo(d.undoLog(0, 1)[0]["id"])
    transaction.commit()
    assert reads(other, "a", b"version 2")
    # One file per revision, the undos included.
    assert len(server_files(tmp_path / "blobs")) == 4
    d.close()
    other.close()


def test_pack_removes_old_revisions_and_garbage(blob_server, tmp_path):
    blobs = tmp_path / "blobs"
    d = blob_db(blob_server, tmp_path)
    with d.transaction() as conn:
        write_blob(conn, "a", b"a1")
        write_blob(conn, "g", b"garbage")
    for i in range(2, 5):
        with d.transaction() as conn:
            write_blob(conn, "a", b"a%d" % i)
    with d.transaction() as conn:
        del conn.root()["g"]
    assert len(server_files(blobs)) == 5
    time.sleep(0.05)
    d.pack()
    files = server_files(blobs)
    assert len(files) == 1, files
    # pack-keep-old: the state before the pack is next to Data.fs.old.
    assert len(server_files(tmp_path / "blobs.old")) == 5
    d2 = blob_db(blob_server, tmp_path)
    with d2.transaction() as conn:
        assert read_blob(conn, "a") == b"a4"
        assert "g" not in conn.root()
    with d.transaction() as conn:
        write_blob(conn, "b", b"after the pack")
    assert reads(d2, "b", b"after the pack")
    d.close()
    d2.close()


CHUNK = 1 << 20


def seeded_blocks(n, seed=1234):
    """`n` distinct MiB blocks from a seeded stream (cheap: one random block, numbered)."""
    block = random.Random(seed).randbytes(CHUNK)
    for i in range(n):
        yield struct.pack(">Q", i) + block[8:]


class RssSampler(threading.Thread):
    """Samples a process's resident memory (kB) every 20 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def field(self, name):
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(name + ":"):
                        return int(line.split()[1])
        except FileNotFoundError:  # the process has ended
            pass
        return 0

    def rss(self):
        return self.field("VmRSS")

    def high_water_mark(self):
        """The process's peak resident memory since it started (kB)."""
        return self.field("VmHWM")

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)


def need_free_space(path, copies, size_mib):
    """Skips, saying why, on a machine whose disk cannot hold `copies` copies of the blob
    (the client's blob cache, the upload, the committed file...): a full disk would fail
    the test with a broken connection that says nothing about zeors."""
    free = shutil.disk_usage(path).free
    need = (copies * size_mib + 512) << 20
    if free < need:
        pytest.skip(f"needs {need >> 20} MiB free under {path}, the disk has {free >> 20} MiB")


def test_a_blob_of_more_than_one_gib_streams_in_bounded_memory(pickle_blob_server, tmp_path):
    size_mib = int(os.environ.get("ZEORS_BIG_BLOB_MIB", "1100"))
    need_free_space(tmp_path, 4, size_mib)
    d1 = blob_db(pickle_blob_server, tmp_path)
    conn = d1.open()
    b = conn.root()["big"] = Blob()
    h = hashlib.sha256()
    with b.open("w") as f:
        for block in seeded_blocks(size_mib):
            h.update(block)
            f.write(block)
    pid = pickle_blob_server.proc.pid
    sampler = RssSampler(pid)
    base = sampler.rss()
    sampler.start()
    t0 = time.time()
    transaction.commit()
    upload = time.time() - t0
    conn.close()
    d1.close()

    d2 = blob_db(pickle_blob_server, tmp_path)
    conn = d2.open()
    t0 = time.time()
    with conn.root()["big"].open("r") as f:
        download = time.time() - t0
        h2 = hashlib.sha256()
        n = 0
        while True:
            data = f.read(CHUNK)
            if not data:
                break
            n += len(data)
            h2.update(data)
    sampler.stop.set()
    sampler.join()
    hwm = sampler.high_water_mark()
    conn.close()
    d2.close()
    assert n == size_mib * CHUNK
    assert h2.hexdigest() == h.hexdigest()
    mib = size_mib
    print(
        f"\n{mib} MiB blob: upload {upload:.1f}s ({mib / upload:.0f} MiB/s), "
        f"download {download:.1f}s ({mib / download:.0f} MiB/s); "
        f"server RSS {base / 1024:.0f} MiB before, peak {sampler.peak / 1024:.0f} MiB sampled, "
        f"{hwm / 1024:.0f} MiB high-water mark"
    )
    # Bounded: far below the blob's size (a few chunk windows plus the runtime).
    assert hwm - base < 100 * 1024, (base, sampler.peak, hwm)


def make_python_site(path, blob_dir, layout="automatic"):
    """A Data.fs + blob directory written by Python ZODB itself: several blobs, some with
    several revisions, an empty one, a blob-less object."""
    if layout == "automatic":
        storage = ZODB.FileStorage.FileStorage(str(path), blob_dir=str(blob_dir))
    else:
        storage = ZODB.blob.BlobStorage(str(blob_dir), ZODB.FileStorage.FileStorage(str(path)), layout=layout)
    d = ZODB.DB(storage)
    expected = {}
    rnd = random.Random(7)
    with d.transaction() as conn:
        root = conn.root()
        root["files"] = PersistentMapping()
        for i in range(20):
            data = rnd.randbytes(rnd.choice([0, 10, 5000, 200_000]))
            b = Blob()
            with b.open("w") as f:
                f.write(data)
            root["files"][i] = b
            expected[i] = data
    for rev in range(3):
        with d.transaction() as conn:
            for i in range(0, 20, 3):
                data = b"revision %d of %d " % (rev, i) * (i + 1)
                with conn.root()["files"][i].open("w") as f:
                    f.write(data)
                expected[i] = data
    d.close()
    return expected


@pytest.mark.parametrize("layout", ["bushy", "lawn"])
def test_a_site_written_by_python_is_served_as_is(make_server, tmp_path, layout):
    fs, blobs = tmp_path / "site.fs", tmp_path / "blobstorage"
    expected = make_python_site(fs, blobs, layout="automatic" if layout == "bushy" else "lawn")
    assert (blobs / ".layout").read_text() == layout
    before = {p: p.read_bytes() for p in blobs.rglob("*.blob")}
    server = make_server("--blob-dir", str(blobs), path=fs)
    d = blob_db(server, tmp_path)
    with d.transaction() as conn:
        files = conn.root()["files"]
        got = {i: read_blob_obj(files[i]) for i in files}
    assert got == expected
    # History too: every revision's bytes, as Python's own FileStorage reads them.
    with d.transaction() as conn:
        write_blob(conn, "written by zeors", b"zeors bytes " * 10000)
        conn.root()["files"][1] = Blob(b"replaced by zeors")
    d.close()
    server.stop()
    # Nothing Python wrote was touched.
    assert all(p.read_bytes() == data for p, data in before.items())

    # What zeors wrote opens in Python: FileStorage with blob_dir, and BlobStorage.
    storage = ZODB.FileStorage.FileStorage(str(fs), blob_dir=str(blobs), read_only=True)
    pd = ZODB.DB(storage)
    with pd.transaction() as conn:
        assert read_blob(conn, "written by zeors") == b"zeors bytes " * 10000
        assert read_blob_obj(conn.root()["files"][1]) == b"replaced by zeors"
        assert read_blob_obj(conn.root()["files"][2]) == expected[2]
    pd.close()
    storage = ZODB.blob.BlobStorage(str(blobs), ZODB.FileStorage.FileStorage(str(fs), read_only=True), layout=layout)
    pd = ZODB.DB(storage)
    with pd.transaction() as conn:
        assert read_blob(conn, "written by zeors") == b"zeors bytes " * 10000
    pd.close()


def read_blob_obj(b):
    with b.open("r") as f:
        return f.read()


def test_runzeo_and_zeors_take_turns_on_the_same_zeo_conf(tmp_path):
    """One zeo.conf with `blob-dir`, served alternately by the stock runzeo and by zeors:
    each reads every blob the other wrote and adds its own."""
    from conftest import free_port
    from test_config import runzeo, zeors

    port = free_port()
    conf = tmp_path / "zeo.conf"
    conf.write_text(
        f"""
<zeo>
  address 127.0.0.1:{port}
</zeo>
<filestorage 1>
  path {tmp_path}/Data.fs
  blob-dir {tmp_path}/blobstorage
</filestorage>
"""
    )
    written = {}
    for turn, start in enumerate([runzeo, zeors, runzeo, zeors]):
        server = start(conf, port, tmp_path)
        from ZEO.ClientStorage import ClientStorage

        d = ZODB.DB(ClientStorage(("127.0.0.1", port), wait_timeout=10, blob_dir=str(tmp_path / f"cache-{turn}")))
        with d.transaction() as conn:
            for key, data in written.items():
                assert read_blob(conn, key) == data, (start.__name__, key)
            key = f"{start.__name__}-{turn}"
            written[key] = (key.encode() + b" ") * (1000 * (turn + 1))
            write_blob(conn, key, written[key])
            if written and turn:
                # A new revision of the first blob too.
                first = sorted(written)[0]
                written[first] = written[first] + b"+"
                write_blob(conn, first, written[first])
        d.close()
        assert server.stop() == 0


def test_a_server_killed_during_an_upload_keeps_committed_blobs_only(make_server, tmp_path):
    blobs = tmp_path / "blobs"
    server = make_server("--blob-dir", str(blobs))
    d = blob_db(server, tmp_path)
    with d.transaction() as conn:
        write_blob(conn, "kept", b"committed before the crash")
    d.close()

    d = blob_db(server, tmp_path, wait_timeout=5)
    tm = transaction.TransactionManager()  # committed from another thread
    conn = d.open(tm)
    b = conn.root()["lost"] = Blob()
    with b.open("w") as f:
        for block in seeded_blocks(300):
            f.write(block)
    errors = []

    def commit():
        try:
            tm.commit()
        except Exception as e:  # the server dies under it
            errors.append(e)
            tm.abort()

    t = threading.Thread(target=commit)
    t.start()
    assert wait_until(lambda: any(n.startswith("zeors-upload") for n in temp_files(blobs)), timeout=30)
    server.kill()
    t.join(60)
    assert errors
    d.close()

    server.start()
    assert temp_files(blobs) == []
    d = blob_db(server, tmp_path)
    with d.transaction() as conn:
        assert read_blob(conn, "kept") == b"committed before the crash"
        assert "lost" not in conn.root()
    assert len(server_files(blobs)) == 1
    d.close()
