"""The Prometheus endpoint: counters move while clients work, in both storage modes."""
import re
import urllib.request

from BTrees.OOBTree import OOBTree

from conftest import db, free_port


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r'^(\w+)(?:\{([^}]*)\})?\s+(\S+)$', line)
        assert m, f"not exposition format: {line!r}"
        name, labels, value = m.groups()
        values[(name, labels or "")] = float(value)
    return values


def metric(values, name, storage="1"):
    return values.get((name, f'storage="{storage}"'), values.get((name, "")))


def test_metrics_move_with_the_workload(make_server):
    mport = free_port()
    server = make_server("--metrics-address", f"127.0.0.1:{mport}")
    before = scrape(mport)
    d = db(server)
    with d.transaction() as conn:
        conn.root()["t"] = OOBTree()
    for i in range(20):
        with d.transaction() as conn:
            conn.root()["t"][i] = i
    during = scrape(mport)
    assert metric(during, "zeors_connected_clients") == 1
    assert metric(during, "zeors_commits_total") >= metric(before, "zeors_commits_total") + 21
    assert metric(during, "zeors_stores_total") > metric(before, "zeors_stores_total")
    assert metric(during, "zeors_bytes_received_total") > metric(before, "zeors_bytes_received_total")
    assert metric(during, "zeors_database_size_bytes") > metric(before, "zeors_database_size_bytes")
    assert during[("zeors_commit_lock_wait_seconds_count", 'storage="all"')] >= 21
    d.close()
    d2 = db(server)
    with d2.transaction() as conn:
        assert len(conn.root()["t"]) == 20
    after = scrape(mport)
    assert metric(after, "zeors_loads_total") > metric(during, "zeors_loads_total")
    d2.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5):
        pass
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{mport}/other", timeout=5)
        raise AssertionError("expected 404")
    except urllib.error.HTTPError as e:
        assert e.code == 404


def test_proxy_cache_metrics(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "up.fs")
    d = db(upstream)
    with d.transaction() as conn:
        conn.root()["t"] = OOBTree()
        for i in range(50):
            conn.root()["t"][i] = str(i)
    d.close()
    mport = free_port()
    proxy = make_server.proxy(upstream.addr, "proxy", "--metrics-address", f"127.0.0.1:{mport}")
    for _ in range(2):
        d = db(proxy)
        with d.transaction() as conn:
            assert len(conn.root()["t"]) == 50
        d.close()
    m = scrape(mport)
    assert metric(m, "zeors_cache_misses_total") >= 1
    assert metric(m, "zeors_cache_hits_total") >= 1
    assert metric(m, "zeors_upstream_bytes_received_total") > 0
    assert metric(m, "zeors_upstream_connected") == 1
