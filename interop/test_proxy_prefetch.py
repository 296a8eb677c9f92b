"""Proxy prefetch: after a miss, the objects the fetched record references are fetched
before they are asked for, so a cold traversal over a slow link costs round trips per
level of the object graph rather than per object, and what is served stays exact."""
import time

import pytest
from BTrees.IOBTree import IOBTree
from persistent.mapping import PersistentMapping

from conftest import db, free_port
from relay import Relay
from test_metrics import metric, scrape

N = 300


@pytest.fixture(params=["stock-upstream", "zeors-upstream"])
def upstream(request, make_server, tmp_path):
    if request.param == "stock-upstream":
        server = make_server.stock()
    else:
        server = make_server(path=tmp_path / "upstream.fs")
    d = db(server)
    with d.transaction() as conn:
        tree = conn.root()["tree"] = IOBTree()
        for i in range(N):
            tree[i] = PersistentMapping({"i": i, "v": 0})
    d.close()
    return server


def traverse(server):
    """Every value, reached the way an application does: root, tree, buckets, items."""
    d = db(server)
    try:
        with d.transaction() as conn:
            return {k: (m["i"], m["v"]) for k, m in conn.root()["tree"].items()}
    finally:
        d.close()


def cold_traversal(make_server, upstream, name, *extra):
    relay = Relay(upstream.addr, delay=0.01)  # 20 ms round trip
    mport = free_port()
    proxy = make_server.proxy(relay.addr, name, "--metrics-address", f"127.0.0.1:{mport}", *extra)
    began = time.monotonic()
    values = traverse(proxy)
    seconds = time.monotonic() - began
    return proxy, relay, mport, values, seconds


def test_a_cold_traversal_prefetches_and_serves_the_same_data(make_server, upstream):
    expected = traverse(upstream)
    assert len(expected) == N
    _, _, mport_off, off, slow = cold_traversal(make_server, upstream, "noprefetch", "--prefetch", "0")
    assert off == expected
    assert metric(scrape(mport_off), "zeors_cache_prefetched_total") == 0

    proxy, relay, mport, on, fast = cold_traversal(make_server, upstream, "prefetch")
    assert on == expected
    m = scrape(mport)
    assert metric(m, "zeors_cache_prefetched_total") >= N // 2
    # One object per round trip without prefetch (over 300 x 20 ms); with it the items of
    # a bucket arrive together.
    assert fast < slow / 3, (fast, slow)
    relay.close()


def test_prefetched_objects_are_invalidated_like_any_other(make_server, upstream):
    proxy, relay, _, values, _ = cold_traversal(make_server, upstream, "prefetch")
    assert values == traverse(upstream)
    # Change objects upstream, directly: the proxy's prefetched copies must not be served.
    d = db(upstream)
    with d.transaction() as conn:
        tree = conn.root()["tree"]
        for i in range(0, N, 7):
            tree[i]["v"] = i + 1000
    d.close()
    want = traverse(upstream)
    deadline = time.time() + 10
    while traverse(proxy) != want:
        assert time.time() < deadline, "the proxy kept serving prefetched stale objects"
        time.sleep(0.1)
    relay.close()
