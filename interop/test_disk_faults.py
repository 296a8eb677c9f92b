"""Disk faults: a full disk, a file size limit, write and fsync errors.

The promise under test: a commit that cannot be written fails with a clear error to its
client, nothing of it is visible or left in the file, the server stays up and keeps
serving everyone, and once the fault is gone the next commits succeed. Faults are
injected three ways, each a real mechanism:

- a real full filesystem: a small tmpfs (or, if tmpfs cannot be mounted, a loop-mounted
  ext4 image), filled up with a filler file: ENOSPC from the kernel. Mounting needs root;
  without it these tests are skipped with that reason (the LD_PRELOAD tests below still
  inject ENOSPC);
- `RLIMIT_FSIZE` set on the running server with prlimit: EFBIG from the kernel, for any
  user (and the server must not die of SIGXFSZ, which the stock runzeo ignores);
- an LD_PRELOAD shim (`faultinject.c`, built here with the C compiler) that makes
  `pwrite64`, `fdatasync` or `ftruncate64` on Data.fs fail on demand: I/O errors at vote
  and at `tpc_finish`, short writes, a failed truncation. It is required: without a C
  compiler these tests fail rather than skip. The shim logs every call it lets through or
  fails, and each test asserts those counts and the server's log line for the failure, so
  a fault that never fired fails the test.
"""
import errno
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import threading

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB.FileStorage import FileStorage

from conftest import Server, zeors_binary
from test_compat import fstest

HERE = pathlib.Path(__file__).resolve().parent


def zeors_check(path):
    r = subprocess.run([zeors_binary(), "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"zeors check failed:\n{r.stdout}\n{r.stderr}"


def open_db(server):
    return ZODB.DB(ClientStorage(server.addr, wait_timeout=30))


def commit(d, key, value):
    with d.transaction() as conn:
        conn.root()[key] = value


def plain(v):
    return dict(v) if isinstance(v, PersistentMapping) else v


def read(server, keys, timeout=60):
    """The values of `keys` in the root, as a new client sees them (mappings as dicts).
    ZEO's loads wait forever, so this runs in a thread: a load that never completes
    fails the test instead of hanging the suite."""
    result = []

    def run():
        d = open_db(server)
        try:
            with d.transaction() as conn:
                result.append({k: plain(conn.root()[k]) for k in keys})
        except BaseException as e:
            result.append(e)
        finally:
            d.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert result, f"reading {keys} did not complete within {timeout}s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def expect_failed_commit(d, key, value, reason):
    """A commit that must fail with a StorageSystemError naming `reason` (ZEO's client
    hands it over as a ServerException carrying the class name and the message)."""
    with pytest.raises(Exception) as info:
        commit(d, key, value)
    assert "StorageSystemError" in repr(info.value) and reason in str(info.value), repr(info.value)
    transaction.abort()


def check_python_reads(path, expected):
    fstest(path)
    fs = FileStorage(str(path), read_only=True)
    d = ZODB.DB(fs)
    with d.transaction() as conn:
        for k, v in expected.items():
            assert plain(conn.root()[k]) == v
        assert set(conn.root().keys()) == set(expected)
    d.close()


# -- A real full filesystem -----------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A mounted filesystem of a few MiB at tmp_path/disk."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    tried = []
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        tried.append(f"tmpfs: {r.stderr.strip()}")
        img = tmp_path / "disk.img"
        with open(img, "wb") as f:
            f.truncate(8 << 20)
        r = subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True, text=True)
        if r.returncode == 0:
            r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            tried.append(f"loop ext4: {r.stderr.strip()}")
            pytest.skip("cannot mount a small filesystem to fill up (needs root): " + "; ".join(tried))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def fill(directory):
    """Fills the filesystem holding `directory`; returns the filler's path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    return filler


def test_disk_full_fails_the_commit_and_later_commits_succeed(make_server, small_disk):
    server = make_server(path=small_disk / "Data.fs")
    d = open_db(server)
    commit(d, "a", PersistentMapping({"v": b"a" * 10_000}))
    filler = fill(small_disk)
    size = os.path.getsize(server.path)
    # Commits that do not fit fail, each with the kernel's reason; none wedges the lock.
    for _ in range(3):
        expect_failed_commit(d, "big", PersistentMapping({"v": b"x" * 200_000}), "No space left on device")
    assert server.proc.poll() is None, "the server died"
    assert os.path.getsize(server.path) == size, "the failed commit left bytes in Data.fs"
    # Everyone else is still served, from the same connection and from new ones.
    with d.transaction() as conn:
        assert conn.root()["a"]["v"] == b"a" * 10_000
    assert read(server, ["a"])["a"]["v"] == b"a" * 10_000
    zeors_check(server.path)
    # Space returns: the next commit succeeds.
    filler.unlink()
    commit(d, "big", PersistentMapping({"v": b"y" * 200_000}))
    d.close()
    assert read(server, ["big"])["big"]["v"] == b"y" * 200_000
    server.stop()
    check_python_reads(server.path, {"a": {"v": b"a" * 10_000}, "big": {"v": b"y" * 200_000}})


def test_pack_on_a_full_disk_fails_cleanly(make_server, small_disk):
    server = make_server(path=small_disk / "Data.fs")
    d = open_db(server)
    for i in range(5):
        commit(d, "a", PersistentMapping({"v": bytes([i]) * 100_000}))
    size = os.path.getsize(server.path)
    filler = fill(small_disk)
    with pytest.raises(Exception) as info:
        d.pack()
    assert "No space left on device" in str(info.value), info.value
    assert server.proc.poll() is None
    assert os.path.getsize(server.path) == size
    # The partial output of the pack is gone, so the disk is not left fuller than before.
    assert not (small_disk / "Data.fs.pack").exists()
    assert read(server, ["a"])["a"]["v"] == bytes([4]) * 100_000
    filler.unlink()
    d.pack()
    commit(d, "after", 1)
    d.close()
    server.stop()
    check_python_reads(server.path, {"a": {"v": bytes([4]) * 100_000}, "after": 1})


def test_proxy_with_a_full_cache_disk_keeps_serving(make_server, small_disk, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    d = open_db(upstream)
    for i in range(20):
        commit(d, f"k{i}", PersistentMapping({"v": bytes([i]) * 100_000}))
    d.close()
    proxy = Server(tmp_path / "proxy.unused.fs", "--upstream", "%s:%d" % upstream.addr,
                   "--cache-dir", str(small_disk / "cache")).start()
    try:
        proxy_with_a_full_cache(upstream, proxy, small_disk)
    finally:
        assert proxy.stop() == 0, proxy.log_text()[-3000:]


def proxy_with_a_full_cache(upstream, proxy, small_disk):
    filler = fill(small_disk)
    # Every object is still served (fetched upstream, whatever the cache can keep), and
    # commits through the proxy work: they are written upstream, not in the cache.
    got = read(proxy, [f"k{i}" for i in range(20)])
    assert all(got[f"k{i}"]["v"] == bytes([i]) * 100_000 for i in range(20))
    # The full disk was hit: the cache could not keep what it fetched, and said why.
    assert "No space left on device" in proxy.log_text(), proxy.log_text()[-3000:]
    dp = open_db(proxy)
    commit(dp, "via-proxy", 1)
    dp.close()
    assert proxy.proc.poll() is None
    filler.unlink()
    assert read(upstream, ["via-proxy"])["via-proxy"] == 1
    assert read(proxy, ["k3"])["k3"]["v"] == bytes([3]) * 100_000


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_a_blob_upload_that_does_not_fit_fails_its_commit_not_the_connection(via, make_server, small_disk, tmp_path):
    """A blob bigger than the disk its server writes uploads to (a zeors server's blob
    directory; a proxy's blob cache): the commit fails with the kernel's reason, the partial
    upload is removed at once, and the same connection commits again, blobs included."""
    from test_blobs import blob_db, read_blob, temp_files, write_blob

    blobs = small_disk / "blobs"
    if via == "direct":
        server = make_server("--blob-dir", str(blobs), path=tmp_path / "Data.fs")
    else:
        upstream = make_server("--blob-dir", str(tmp_path / "upstream-blobs"), path=tmp_path / "upstream.fs")
        server = make_server.proxy(upstream.addr, "proxy", "--blob-dir", str(blobs))
    d = blob_db(server, tmp_path)
    big = os.urandom(3 << 20) * 3  # 9 MiB on a 4 MiB disk
    for _ in range(2):
        with pytest.raises(Exception) as info:
            with d.transaction() as conn:
                write_blob(conn, "big", big)
        assert "StorageSystemError" in repr(info.value), repr(info.value)
        assert "No space left on device" in str(info.value), repr(info.value)
        assert server.proc.poll() is None, "the server died"
        # The partial upload is gone: the space is back for everyone.
        assert [n for n in temp_files(blobs) if n.startswith("upload")] == []
    assert "writing a blob upload failed" in server.log_text()
    # The same connection goes on: a plain commit, then a blob that fits.
    with d.transaction() as conn:
        conn.root()["after"] = 1
    with d.transaction() as conn:
        write_blob(conn, "small", b"fits " * 20_000)
    d.close()
    other = blob_db(server, tmp_path)
    with other.transaction() as conn:
        assert conn.root()["after"] == 1
        assert read_blob(conn, "small") == b"fits " * 20_000
        assert "big" not in conn.root()
    other.close()


# -- RLIMIT_FSIZE -------------------------------------------------------------------------


def test_file_size_limit_fails_the_commit_not_the_server(make_server):
    server = make_server()
    d = open_db(server)
    commit(d, "a", 1)
    size = os.path.getsize(server.path)
    # Limit the running server's files to a little more than Data.fs has now.
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (size + 50_000, resource.RLIM_INFINITY))
    expect_failed_commit(d, "big", PersistentMapping({"v": b"x" * 200_000}), "File too large")
    assert server.proc.poll() is None, f"the server died: {server.proc.returncode}"
    assert os.path.getsize(server.path) == size
    commit(d, "small", 2)  # what fits still commits
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    commit(d, "big", PersistentMapping({"v": b"y" * 200_000}))
    d.close()
    assert read(server, ["a", "small", "big"])["big"]["v"] == b"y" * 200_000
    server.stop()
    check_python_reads(server.path, {"a": 1, "small": 2, "big": {"v": b"y" * 200_000}})


# -- Injected I/O errors ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert cc, "a C compiler is needed to build the fault injection shim"
    out = tmp_path_factory.mktemp("shim") / "faultinject.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "faultinject.c"), "-ldl"], check=True)
    return out


class Faults:
    """The shim's control directory: a control file per operation sets a fault, and the
    shim appends what it did to OP.log ("skip", "short", "fail"), so that each test shows
    that its fault fired, and how often."""

    def __init__(self, directory):
        self.dir = directory
        self.dir.mkdir()

    def set(self, op, err, skip=0, short=False):
        self.forget(op)
        (self.dir / op).write_text(f"{err} skip={skip}{' short' if short else ''}\n")

    def clear(self, op=None):
        """Ends the faults (the logs stay)."""
        for p in self.dir.iterdir():
            if p.suffix != ".log" and (op is None or p.name == op):
                p.unlink()

    def events(self, op):
        """What the shim did to `op` calls since the fault was set: one word per call."""
        log = self.dir / f"{op}.log"
        return log.read_text().split() if log.exists() else []

    def forget(self, op):
        (self.dir / f"{op}.log").unlink(missing_ok=True)


@pytest.fixture
def faulty_server(make_server, shim, tmp_path):
    """A server whose Data.fs writes fail on demand, and the control over it."""
    faults = Faults(tmp_path / "faults")
    env = {"LD_PRELOAD": str(shim), "ZEORS_FAULT_DIR": str(faults.dir), "ZEORS_FAULT_FILE": "/Data.fs"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        server = make_server()
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    return server, faults


def test_write_errors_at_vote(faulty_server):
    server, faults = faulty_server
    d = open_db(server)
    commit(d, "a", 1)
    size = os.path.getsize(server.path)
    # A plain I/O error, then a disk that fills up in the middle of the transaction
    # (a short write first, then ENOSPC), then a failed fsync at vote.
    cases = [("pwrite", errno.EIO, False, "Input/output error"),
             ("pwrite", errno.ENOSPC, True, "No space left on device"),
             ("fdatasync", errno.EIO, False, "Input/output error")]
    for op, err, short, reason in cases:
        logged = server.log_text().count("writing the transaction failed; truncating")
        faults.set(op, err, short=short)
        expect_failed_commit(d, "big", PersistentMapping({"v": b"x" * 100_000}), reason)
        faults.clear()
        # The fault fired where it was meant to: the one write (or sync) of the vote
        # failed — after shortened writes, for the filling disk — and the server said so.
        events = faults.events(op)
        if short:
            assert events[-1] == "fail" and set(events[:-1]) == {"short"} and len(events) >= 2, events
        else:
            assert events == ["fail"], events
        assert server.log_text().count("writing the transaction failed; truncating") == logged + 1
        assert server.proc.poll() is None
        assert os.path.getsize(server.path) == size, f"{op}: bytes left behind"
        zeors_check(server.path)
        assert read(server, ["a"]) == {"a": 1}
    commit(d, "b", 2)
    d.close()
    server.stop()
    check_python_reads(server.path, {"a": 1, "b": 2})


def test_fsync_error_at_tpc_finish_commits_nothing(faulty_server):
    server, faults = faulty_server
    d = open_db(server)
    commit(d, "a", 1)
    watcher = open_db(server)
    wconn = watcher.open()
    assert wconn.root()["a"] == 1
    size = os.path.getsize(server.path)
    # The fsync at vote goes through; the one after the status byte at tpc_finish fails
    # (and so does the one after the truncation that drops the transaction).
    faults.set("fdatasync", errno.EIO, skip=1)
    with pytest.raises(Exception) as info:
        commit(d, "a", 2)
    assert "Input/output error" in str(info.value), info.value
    transaction.abort()
    faults.clear()
    assert faults.events("fdatasync") == ["skip", "fail", "fail"], faults.events("fdatasync")
    log = server.log_text()
    assert "commit failed; dropping the transaction" in log
    assert "fsync after truncation failed too" in log
    assert "writing the transaction failed" not in log, "the fault hit the vote, not tpc_finish"
    assert server.proc.poll() is None
    assert os.path.getsize(server.path) == size
    # Not visible, neither to a new client nor to one that was connected all along.
    assert read(server, ["a"]) == {"a": 1}
    wconn.sync()
    assert wconn.root()["a"] == 1
    watcher.close()
    commit(d, "a", 3)
    d.close()
    server.restart()
    assert read(server, ["a"]) == {"a": 3}
    server.stop()
    check_python_reads(server.path, {"a": 3})


def test_failed_truncation_after_a_failed_write(faulty_server):
    """The worst case: the failed write leaves a partial transaction behind and even the
    truncation fails. The server must write the next transaction over it, and a restart
    must cut whatever is left of it."""
    server, faults = faulty_server
    d = open_db(server)
    commit(d, "a", 1)
    faults.set("pwrite", errno.ENOSPC, short=True)
    faults.set("ftruncate", errno.EIO)
    # Many records of 10 kB rather than one of 300 kB: the vote writes records of 64 KiB
    # and more by reference, in a write of their own, and the shortened write must cut
    # into a large first write for a large partial transaction to be left behind.
    many = PersistentMapping({i: PersistentMapping({"v": b"x" * 10_000}) for i in range(30)})
    expect_failed_commit(d, "big", many, "No space left on device")
    faults.clear()
    # A partial transaction was written (shortened writes) and its truncation failed.
    assert "short" in faults.events("pwrite") and faults.events("pwrite")[-1] == "fail", faults.events("pwrite")
    assert faults.events("ftruncate") == ["fail"], faults.events("ftruncate")
    assert "could not truncate after a failed commit" in server.log_text()
    assert os.path.getsize(server.path) > 100_000, "the partial transaction should still be in the file"
    commit(d, "b", 2)
    assert read(server, ["a", "b"]) == {"a": 1, "b": 2}
    d.close()
    server.kill()
    before = len(server.log_text())
    server.start()
    assert read(server, ["a", "b"]) == {"a": 1, "b": 2}
    # What was left of the partial transaction after "b" was cut at the restart.
    restart = server.log_text()[before:]
    assert "torn tail at offset" in restart and "cut off" in restart, restart
    server.stop()
    check_python_reads(server.path, {"a": 1, "b": 2})
