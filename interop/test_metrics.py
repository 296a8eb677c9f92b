"""The Prometheus endpoint: counters move while clients work, in both storage modes."""
import json
import pathlib
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
    # Every commit's hold of the lock, taken apart: each phase counted once per commit,
    # and the phases together no longer than the run.
    hold = {
        p: (during[("zeors_commit_lock_hold_seconds_count", f'storage="all",phase="{p}"')],
            during[("zeors_commit_lock_hold_seconds_sum", f'storage="all",phase="{p}"')])
        for p in ("vote", "client", "finish", "reply", "abort")
    }
    for p in ("vote", "client", "finish", "reply"):
        assert hold[p][0] >= 21, (p, hold)
        assert hold[p][1] > 0, (p, hold)
    assert hold["abort"][0] == 0, hold
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


DASHBOARD = pathlib.Path(__file__).resolve().parent.parent / "monitoring" / "grafana-dashboard.json"
# Metrics only a proxy has: its cache, its upstream link, its blob cache.
PROXY_ONLY = ("zeors_cache_", "zeors_upstream_", "zeors_blob_cache_")


def dashboard_queries():
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append((panel["title"], target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append((var["name"], var["query"]["query"]))
    return dash, exprs


def test_dashboard_queries_only_metrics_that_exist(make_server, tmp_path):
    """Every metric the Grafana dashboard queries is served by /metrics: the common ones
    by a direct server and a proxy, the proxy's own by a proxy (with a blob cache)."""
    dash, exprs = dashboard_queries()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("clients", "loads", "commits", "commit-lock wait", "conflicts", "hit rate", "upstream traffic", "cache fill"):
        assert topic in titles, topic
    queried = set()
    for where, expr in exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), (where, expr)
        names = set(re.findall(r"\bzeors_[a-z_]+\b", expr))
        assert names, (where, expr)
        queried |= names

    up_blobs = tmp_path / "up-blobs"
    upstream = make_server("--blob-dir", str(up_blobs), path=tmp_path / "up.fs")
    direct_port, proxy_port = free_port(), free_port()
    direct = make_server("--metrics-address", f"127.0.0.1:{direct_port}", path=tmp_path / "direct.fs")
    proxy = make_server.proxy(
        upstream.addr,
        "proxy",
        "--blob-dir",
        str(tmp_path / "proxy-blobs"),
        "--metrics-address",
        f"127.0.0.1:{proxy_port}",
    )
    for server in (direct, proxy):
        d = db(server)
        with d.transaction() as conn:
            conn.root()["x"] = 1
        d.close()

    def names(port):
        return {name for name, _ in scrape(port)}

    served_direct, served_proxy = names(direct_port), names(proxy_port)
    for name in sorted(queried):
        assert name in served_proxy, f"the dashboard queries {name}, which a proxy does not serve"
        if not name.startswith(PROXY_ONLY):
            assert name in served_direct, f"the dashboard queries {name}, which a server does not serve"
    # And the dashboard leaves out nothing an operator of either mode would miss.
    unqueried = {n for n in served_direct | served_proxy if not n.endswith(("_created",))} - queried
    unqueried = {n for n in unqueried if not re.sub(r"_(bucket|sum|count)$", "", n) + "_bucket" in queried}
    assert unqueried == set(), f"served but not on the dashboard: {sorted(unqueried)}"
