"""The proxy's --warm: a proxy of a zeors upstream fills its cache in the background, so
it serves every object without upstream; clients' misses are still answered promptly
while it warms; a restart resumes the warm-up; over a stock upstream it does nothing."""
import os
import time

from BTrees.IOBTree import IOBTree
from persistent.mapping import PersistentMapping

from conftest import db, free_port
from relay import Relay
from test_metrics import metric, scrape

PAYLOAD = 1000


def fill(server, n):
    d = db(server)
    with d.transaction() as conn:
        conn.root()["items"] = IOBTree()
    for start in range(0, n, 1000):
        with d.transaction() as conn:
            tree = conn.root()["items"]
            for i in range(start, min(start + 1000, n)):
                tree[i] = PersistentMapping({"i": i, "payload": os.urandom(PAYLOAD)})
    objects = len(d.storage)
    d.close()
    return objects


def traverse(server):
    d = db(server)
    try:
        with d.transaction() as conn:
            return {k: (m["i"], m["payload"]) for k, m in conn.root()["items"].items()}
    finally:
        d.close()


def wait_metric(mport, name, pred, timeout, what):
    deadline = time.time() + timeout
    while True:
        v = metric(scrape(mport), name)
        if v is not None and pred(v):
            return v
        assert time.time() < deadline, f"{what}: {name} = {v} after {timeout} s"
        time.sleep(0.1)


def warm_proxy(make_server, upstream, name, *extra, **link):
    relay = Relay(upstream.addr, **link)
    mport = free_port()
    proxy = make_server.proxy(relay.addr, name, "--warm", "--metrics-address", f"127.0.0.1:{mport}", *extra)
    return proxy, relay, mport


def test_a_warmed_proxy_serves_every_object_with_upstream_stopped(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    objects = fill(upstream, 1500)
    expected = traverse(upstream)
    proxy, relay, mport = warm_proxy(make_server, upstream, "warm", delay=0.01, bandwidth=1_000_000)
    wait_metric(mport, "zeors_cache_warm_done", lambda v: v == 1, 60, "warming")
    m = scrape(mport)
    assert metric(m, "zeors_cache_warmed_objects_total") == objects
    assert metric(m, "zeors_cache_misses_total") == 0
    assert "the proxy cache is warm" in proxy.log_text()
    upstream.stop()
    relay.close()
    # Every object, root to leaves, from the cache alone.
    assert traverse(proxy) == expected
    assert metric(scrape(mport), "zeors_cache_misses_total") == 0


def test_clients_misses_are_served_while_the_proxy_warms(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    n = 6000  # about 6 MB: six seconds of warming at 1 MB/s
    fill(upstream, n)
    expected = traverse(upstream)
    # Without prefetching, so that every object read is a miss of its own.
    proxy, relay, mport = warm_proxy(make_server, upstream, "warm", "--prefetch", "0", delay=0.01,
                                     bandwidth=1_000_000)
    wait_metric(mport, "zeors_cache_warmed_objects_total", lambda v: v > 0, 30, "warm-up start")
    # One client reads items the warm-up reaches last (it walks up from the first oid),
    # one object at a time as an application does: each is a miss over the link.
    d = db(proxy)
    latencies = []
    try:
        with d.transaction() as conn:
            tree = conn.root()["items"]
            for k in range(n - 1, n - 41, -1):
                began = time.monotonic()
                item = tree[k]
                got = (item["i"], item["payload"])
                latencies.append(time.monotonic() - began)
                assert got == expected[k]
    finally:
        d.close()
    m = scrape(mport)
    assert metric(m, "zeors_cache_warm_done") == 0, "warming ended before the reads: nothing was measured"
    assert metric(m, "zeors_cache_misses_total") >= 40
    latencies.sort()
    # A miss waits for its own round trip (20 ms) and at most the warm-up's two 32 KB
    # replies ahead of it on the link (64 ms at 1 MB/s); not for the warm-up to end.
    assert latencies[len(latencies) // 2] < 0.25, latencies
    wait_metric(mport, "zeors_cache_warm_done", lambda v: v == 1, 120, "warming")
    misses = metric(scrape(mport), "zeors_cache_misses_total")
    assert traverse(proxy) == expected
    assert metric(scrape(mport), "zeors_cache_misses_total") == misses
    relay.close()


def test_a_restart_resumes_the_warm_up(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    objects = fill(upstream, 6000)
    proxy, relay, mport = warm_proxy(make_server, upstream, "warm", delay=0.01, bandwidth=1_000_000)
    wait_metric(mport, "zeors_cache_warm_position", lambda v: v >= 2000, 60, "warming")
    assert metric(scrape(mport), "zeors_cache_warm_done") == 0
    proxy.stop()
    proxy.start()
    deadline = time.time() + 20
    while "resuming the warm-up" not in proxy.log_text():
        assert time.time() < deadline, proxy.log_text()
        time.sleep(0.1)
    resumed_at = metric(scrape(mport), "zeors_cache_warm_position")
    assert resumed_at >= 2000
    wait_metric(mport, "zeors_cache_warm_done", lambda v: v == 1, 120, "warming after the restart")
    second = metric(scrape(mport), "zeors_cache_warmed_objects_total")
    # Only what lay above the recorded position was fetched again (and what the other
    # stripe in progress had fetched: at most its 256 oids).
    assert second <= objects - resumed_at + 256, (second, objects, resumed_at)
    assert traverse(proxy) == traverse(upstream)
    # Done is remembered: a further restart does not warm again.
    proxy.restart()
    time.sleep(1)
    m = scrape(mport)
    assert metric(m, "zeors_cache_warm_done") == 1
    assert metric(m, "zeors_cache_warmed_objects_total") == 0
    relay.close()


def test_over_a_stock_upstream_warm_does_nothing(make_server):
    upstream = make_server.stock()
    fill(upstream, 50)
    expected = traverse(upstream)
    mport = free_port()
    proxy = make_server.proxy(upstream.addr, "warm", "--warm", "--metrics-address", f"127.0.0.1:{mport}")
    deadline = time.time() + 20
    while "the cache is not warmed" not in proxy.log_text():
        assert time.time() < deadline, proxy.log_text()
        time.sleep(0.1)
    assert metric(scrape(mport), "zeors_cache_warmed_objects_total") == 0
    # The proxy itself works as without --warm.
    assert traverse(proxy) == expected
