"""A zeors proxy's link to a zeors upstream is compressed (zstd, negotiated): fewer bytes
cross it for the same objects; over a stock upstream nothing changes on the wire."""
import re
import time

from BTrees.IOBTree import IOBTree
from persistent.mapping import PersistentMapping

from conftest import db, free_port
from relay import Relay
from test_metrics import metric, scrape

N = 400


def fill(server):
    d = db(server)
    with d.transaction() as conn:
        tree = conn.root()["tree"] = IOBTree()
        for i in range(N):
            # Text as applications store it: repetitive, compressible.
            tree[i] = PersistentMapping({"i": i, "title": f"Document {i}", "body": "lorem ipsum dolor sit amet " * 40})
    d.close()


def traverse(server):
    d = db(server)
    try:
        with d.transaction() as conn:
            return {k: dict(m) for k, m in conn.root()["tree"].items()}
    finally:
        d.close()


def cold_read_bytes(make_server, upstream, name, *extra):
    """Objects and link bytes (both directions) of a cold traversal through a new proxy
    (whose link stays up)."""
    relay = Relay(upstream.addr)
    mport = free_port()
    proxy = make_server.proxy(relay.addr, name, "--prefetch", "0", "--metrics-address", f"127.0.0.1:{mport}", *extra)
    proxy.metrics_port = mport
    values = traverse(proxy)
    up, down = relay.counts()
    print(f"{name}: {N} objects read cold, {up} bytes up, {down} bytes down")
    return proxy, values, up + down


def compressed(proxy):
    """Whether the proxy says its link is compressed, in its log and in its metrics (the
    two must agree)."""
    m = re.search(r"upstream connected and caught up.*compressed=(\w+)", proxy.log_text())
    assert m, proxy.log_text()[-2000:]
    gauge = metric(scrape(proxy.metrics_port), "zeors_upstream_compressed")
    assert gauge == (m.group(1) == "true"), (gauge, m.group(1))
    return m.group(1) == "true"


def test_the_link_to_a_zeors_upstream_is_compressed(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    fill(upstream)
    expected = traverse(upstream)
    plain, got_plain, plain_bytes = cold_read_bytes(make_server, upstream, "plain", "--no-upstream-compression")
    zstd, got_zstd, zstd_bytes = cold_read_bytes(make_server, upstream, "zstd")
    assert got_plain == expected and got_zstd == expected
    assert not compressed(plain)
    assert compressed(zstd)
    assert zstd_bytes * 3 < plain_bytes, (zstd_bytes, plain_bytes)
    # Invalidations and commits keep flowing over the compressed link, both ways.
    d = db(zstd)
    with d.transaction() as conn:
        conn.root()["tree"][0]["title"] = "changed through the proxy"
    d.close()
    d = db(upstream)
    with d.transaction() as conn:
        assert conn.root()["tree"][0]["title"] == "changed through the proxy"
        conn.root()["tree"][1]["title"] = "changed upstream"
    d.close()
    deadline = time.time() + 10
    while traverse(zstd)[1]["title"] != "changed upstream":
        assert time.time() < deadline, "the upstream change never reached the proxy"
        time.sleep(0.1)


def test_a_stock_upstream_sees_plain_zeo(make_server):
    upstream = make_server.stock()
    fill(upstream)
    expected = traverse(upstream)
    plain, got_plain, plain_bytes = cold_read_bytes(make_server, upstream, "plain", "--no-upstream-compression")
    default, got_default, default_bytes = cold_read_bytes(make_server, upstream, "default")
    assert got_plain == expected and got_default == expected
    assert not compressed(default)
    # The same conversation byte for byte but for the catch-up's figures.
    assert abs(default_bytes - plain_bytes) < plain_bytes * 0.02, (default_bytes, plain_bytes)
