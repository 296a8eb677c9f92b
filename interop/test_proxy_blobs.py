"""Blobs through a zeors proxy, in front of a stock runzeo (with `blob-dir`) and of a zeors
upstream: downloads fetched on demand into the proxy's blob cache (bounded, kept across
restarts), uploads forwarded upstream, undo and pack upstream seen through the proxy, a
blob of more than 1 GiB with the proxy's memory measured, and a proxy sharing upstream's
blob directory.
"""
import hashlib
import os
import pathlib
import time

import pytest
import transaction
import ZODB.utils

from conftest import StockServer, free_port
from test_blobs import (
    CHUNK,
    FailingVote,
    RssSampler,
    blob_db,
    need_free_space,
    read_blob,
    reads,
    seeded_blocks,
    server_files,
    temp_files,
    write_blob,
)
from test_basic import wait_until
from test_metrics import metric, scrape
from ZODB.blob import Blob


class BlobStockServer(StockServer):
    """runzeo with a blob directory."""

    def __init__(self, path, blob_dir, **kw):
        super().__init__(path, **kw)
        self.conf.write_text(
            self.conf.read_text().replace(
                f"  path {self.path}\n", f"  path {self.path}\n  blob-dir {blob_dir}\n"
            )
        )


@pytest.fixture
def stock_blobs(tmp_path):
    started = []

    def start():
        s = BlobStockServer(tmp_path / "upstream.fs", tmp_path / "upstream-blobs")
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()


@pytest.fixture(params=["stock-upstream", "zeors-upstream"])
def upstream(request, make_server, stock_blobs, tmp_path):
    if request.param == "stock-upstream":
        return stock_blobs()
    return make_server("--blob-dir", str(tmp_path / "upstream-blobs"), path=tmp_path / "upstream.fs")


def blob_proxy(make_server, upstream, tmp_path, *extra, name="proxy"):
    return make_server.proxy(
        upstream.addr, name, "--blob-dir", str(tmp_path / f"{name}-blobs"), *extra
    )


def cached_files(tmp_path, name="proxy"):
    return server_files(tmp_path / f"{name}-blobs")


def test_blobs_through_the_proxy(upstream, make_server, tmp_path):
    mport = free_port()
    proxy = blob_proxy(make_server, upstream, tmp_path, "--metrics-address", f"127.0.0.1:{mport}")
    via1, via2, direct = blob_db(proxy, tmp_path), blob_db(proxy, tmp_path), blob_db(upstream, tmp_path)
    assert ("ZODB.interfaces", "IBlobStorage") in via1.storage._info["interfaces"]

    # Written through the proxy: upstream has it, and so do the proxy's other clients.
    with via1.transaction() as conn:
        write_blob(conn, "up", b"uploaded through the proxy " * 5000)
        write_blob(conn, "empty", b"")
    assert reads(direct, "up", b"uploaded through the proxy " * 5000)
    assert reads(via2, "up", b"uploaded through the proxy " * 5000)
    assert reads(via2, "empty", b"")
    # The upload was kept in the proxy's cache: reading it back did not go upstream.
    m = scrape(mport)
    assert metric(m, "zeors_blob_cache_misses_total") == 0
    assert metric(m, "zeors_blob_cache_hits_total") >= 2

    # Written upstream: fetched on demand, once.
    with direct.transaction() as conn:
        write_blob(conn, "down", os.urandom(3 * CHUNK + 5))
        expected = read_blob(conn, "down")
    assert reads(via1, "down", expected)
    assert reads(via2, "down", expected)
    m = scrape(mport)
    assert metric(m, "zeors_blob_cache_misses_total") == 1
    assert len(cached_files(tmp_path)) == 3
    assert temp_files(tmp_path / "proxy-blobs") == []

    # A new revision upstream reaches the proxy's clients (invalidation, then a fetch).
    with direct.transaction() as conn:
        write_blob(conn, "down", b"second revision")
    assert reads(via1, "down", b"second revision")
    for d in (via1, via2, direct):
        d.close()

    # The cache survives a restart of the proxy.
    proxy.restart()
    via = blob_db(proxy, tmp_path)
    with via.transaction() as conn:
        assert read_blob(conn, "down") == b"second revision"
        assert read_blob(conn, "up") == b"uploaded through the proxy " * 5000
    m = scrape(mport)
    assert metric(m, "zeors_blob_cache_misses_total") == 0
    assert metric(m, "zeors_blob_cache_hits_total") == 2
    via.close()


def test_aborted_uploads_through_the_proxy_leave_nothing(upstream, make_server, tmp_path):
    proxy = blob_proxy(make_server, upstream, tmp_path)
    via = blob_db(proxy, tmp_path)
    with via.transaction() as conn:
        write_blob(conn, "a", b"committed")
    conn = via.open()
    write_blob(conn, "a", b"aborted " * 10000)
    transaction.get().join(FailingVote())
    with pytest.raises(RuntimeError):
        transaction.commit()
    transaction.abort()
    conn.close()
    assert wait_until(lambda: temp_files(tmp_path / "proxy-blobs") == [])
    assert wait_until(lambda: temp_files(tmp_path / "upstream-blobs") == [])
    assert len(server_files(tmp_path / "upstream-blobs")) == 1
    # The connection upstream is still good for the next commit with a blob.
    with via.transaction() as conn:
        write_blob(conn, "a", b"next")
    other = blob_db(upstream, tmp_path)
    assert reads(other, "a", b"next")
    via.close()
    other.close()


def test_undo_and_pack_upstream_seen_through_the_proxy(upstream, make_server, tmp_path):
    proxy = blob_proxy(make_server, upstream, tmp_path)
    direct, via = blob_db(upstream, tmp_path), blob_db(proxy, tmp_path)
    with via.transaction() as conn:
        write_blob(conn, "a", b"v1")
        write_blob(conn, "g", b"garbage")
    with via.transaction("second") as conn:
        write_blob(conn, "a", b"v2")
    assert reads(via, "a", b"v2")
    # Undo upstream (the proxy does not offer undo, as it says in get_info).
    undo_id = [u for u in direct.undoLog(0, 10) if u["description"] == "second"][0]["id"]
    direct.undo(undo_id)
    transaction.commit()
    assert reads(via, "a", b"v1")
    assert reads(direct, "a", b"v1")
    # Pack upstream: the current blobs stay readable through the proxy.
    with direct.transaction() as conn:
        del conn.root()["g"]
    time.sleep(0.05)
    direct.pack()
    assert len(server_files(tmp_path / "upstream-blobs")) == 1
    fresh = blob_db(proxy, tmp_path)
    assert reads(fresh, "a", b"v1")
    with via.transaction() as conn:
        write_blob(conn, "a", b"v3 after the pack")
    assert reads(direct, "a", b"v3 after the pack")
    for d in (direct, via, fresh):
        d.close()


def test_the_blob_cache_is_bounded(make_server, tmp_path):
    upstream = make_server("--blob-dir", str(tmp_path / "upstream-blobs"), path=tmp_path / "upstream.fs")
    proxy = blob_proxy(make_server, upstream, tmp_path, "--blob-cache-size", "1MB")
    direct = blob_db(upstream, tmp_path)
    data = {}
    with direct.transaction() as conn:
        for i in range(8):
            data[f"b{i}"] = os.urandom(300_000)
            write_blob(conn, f"b{i}", data[f"b{i}"])
    via = blob_db(proxy, tmp_path)
    for _ in range(2):
        with via.transaction() as conn:
            for key, value in data.items():
                assert read_blob(conn, key) == value
        # Each client reads through its own cache; a new client asks the proxy again.
        via.close()
        via = blob_db(proxy, tmp_path)
    total = sum(p.stat().st_size for p in (tmp_path / "proxy-blobs").rglob("*.blob"))
    assert 0 < total <= 1_000_000
    via.close()
    direct.close()


def test_shared_blob_dir_with_upstream(make_server, tmp_path):
    """The proxy sees upstream's blob directory (`--shared-blob-dir`): it reads blobs
    there and uploads by linking them in."""
    shared = tmp_path / "upstream-blobs"
    upstream = make_server("--blob-dir", str(shared), "--shared-blob-dir", path=tmp_path / "upstream.fs")
    proxy = make_server.proxy(upstream.addr, "proxy", "--blob-dir", str(shared), "--shared-blob-dir")
    direct, via = blob_db(upstream, tmp_path), blob_db(proxy, tmp_path)
    with direct.transaction() as conn:
        write_blob(conn, "d", b"written upstream")
    assert reads(via, "d", b"written upstream")
    with via.transaction() as conn:
        write_blob(conn, "p", b"written through the proxy " * 1000)
    assert reads(direct, "p", b"written through the proxy " * 1000)
    assert [p for p in shared.rglob("*") if p.name.endswith((".tmp-", ".tmp"))] == []
    assert len(server_files(shared)) == 2
    # Downstream clients sharing the directory too.
    both = blob_db(proxy, tmp_path, blob_dir=str(shared), shared_blob_dir=True)
    with both.transaction() as conn:
        write_blob(conn, "s", b"shared all the way")
    assert reads(direct, "s", b"shared all the way")
    for d in (direct, via, both):
        d.close()


@pytest.mark.parametrize("kind", ["zeors-upstream", "stock-upstream"])
def test_a_blob_of_more_than_one_gib_through_the_proxy(kind, make_server, stock_blobs, tmp_path):
    size_mib = int(os.environ.get("ZEORS_BIG_BLOB_MIB", "1100"))
    need_free_space(tmp_path, 5, size_mib)
    if kind == "stock-upstream":
        upstream = stock_blobs()
    else:
        upstream = make_server("--blob-dir", str(tmp_path / "upstream-blobs"), path=tmp_path / "upstream.fs")
    proxy = blob_proxy(make_server, upstream, tmp_path)
    up = RssSampler(proxy.proc.pid)
    up_base = up.rss()
    up.start()

    d1 = blob_db(proxy, tmp_path)
    conn = d1.open()
    b = conn.root()["big"] = Blob()
    h = hashlib.sha256()
    with b.open("w") as f:
        for block in seeded_blocks(size_mib):
            h.update(block)
            f.write(block)
    t0 = time.time()
    transaction.commit()
    upload = time.time() - t0
    conn.close()
    d1.close()
    up.stop.set()
    up.join()
    up_hwm = up.high_water_mark()
    # Fetched from upstream, not from the copy the proxy kept of the upload.
    for p in (tmp_path / "proxy-blobs").rglob("*.blob"):
        p.unlink()
    proxy.restart()
    down = RssSampler(proxy.proc.pid)
    down_base = down.rss()
    down.start()

    d2 = blob_db(proxy, tmp_path)
    conn = d2.open()
    t0 = time.time()
    with conn.root()["big"].open("r") as f:
        download = time.time() - t0
        h2 = hashlib.sha256()
        while True:
            data = f.read(CHUNK)
            if not data:
                break
            h2.update(data)
    down.stop.set()
    down.join()
    down_hwm = down.high_water_mark()
    conn.close()
    d2.close()
    assert h2.hexdigest() == h.hexdigest()
    print(
        f"\n{kind}: {size_mib} MiB blob through the proxy: upload {upload:.1f}s "
        f"({size_mib / upload:.0f} MiB/s), download {download:.1f}s ({size_mib / download:.0f} MiB/s); "
        f"proxy RSS high-water mark {up_hwm / 1024:.0f} MiB uploading (from {up_base / 1024:.0f}), "
        f"{down_hwm / 1024:.0f} MiB downloading (from {down_base / 1024:.0f})"
    )
    assert up_hwm - up_base < 150 * 1024, (up_base, up_hwm)
    assert down_hwm - down_base < 150 * 1024, (down_base, down_hwm)


def test_an_upstream_without_blobs_is_not_offered_blobs(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    proxy = blob_proxy(make_server, upstream, tmp_path)
    via = blob_db(proxy, tmp_path)
    assert ("ZODB.interfaces", "IBlobStorage") not in via.storage._info["interfaces"]
    conn = via.open()
    write_blob(conn, "b", b"x")
    with pytest.raises(Exception):
        transaction.commit()
    transaction.abort()
    conn.close()
    # The proxy's link upstream is unharmed.
    with via.transaction() as conn:
        conn.root()["plain"] = 1
    other = blob_db(upstream, tmp_path)
    with other.transaction() as conn:
        assert wait_until(lambda: (conn.sync() or True) and conn.root().get("plain") == 1)
    via.close()
    other.close()
