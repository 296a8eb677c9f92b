"""The suite's replication part: a zeors primary, a replica following it over the shaped
link of the proxy rows (1 MB/s each way, 20 ms round trip), and (with `--warm`) a zeors
proxy over the same link. Kept apart from bench.py and report.py, which call `run` and
the rendering functions below: `bench.py --parts replication` runs it alone.

Scenario, in order:

1. **Initial copy**: the primary serves a copy of the benchmark database; a replica with
   an empty Data.fs follows it through the relay. Measured from the replica's start until
   its `lastTransaction` is the primary's, against the time the database's raw bytes
   (its Data.fs) need on the link. Target: at most half (zstd between zeors peers).
2. **Lag**: the replica, restarted to follow the primary directly (it resumes from its
   last transaction), while 8 writers commit on the primary (`zeo-bench commits`):
   `zeo-bench lag` times every transaction from the primary's invalidation to the
   replica's (milliseconds, and transactions behind). Over loopback, not the shaped link:
   8 writers commit several MB/s of incompressible payload, more than the 1 MB/s link
   carries, so on it the lag would only measure the link.
3. **Cold reads through the replica**: 8 connections read a random sample once.
   Compared with the proxy rows' cold read (stock and zeors proxies) of the same run when
   the proxies part ran, else with the issue's figures (41.6 and 337 objects/s). Target:
   at least 100 times the stock proxy.
4. **A `--warm` proxy** of the primary over the shaped link: time until its cache is
   warm (from its metrics) and bytes over the link, with one client reading cold objects
   one after another through it early on (their misses go first: the mean time per
   object, against the link's round trip); then cold random reads by 8 connections, as
   in 3, with the proxy's misses counted from its metrics (none when the warm-up covered
   the sample).
"""
import json
import re
import shutil
import subprocess
import time
import urllib.request

# The proxy rows' cold read (objects/s) in the issue, used when the proxies part did not
# run alongside: the stock proxy's and zeors' proxy's at the time.
ISSUE_STOCK_PROXY_RATE = 41.6
ISSUE_ZEORS_PROXY_RATE = 337.0
# Objects read by the local-speed rows (a replica, a warmed proxy): enough to last a
# measurable time at tens of thousands of objects/s.
LOCAL_SAMPLE = {"quick": 20_000, "full": 50_000}
# Targets.
COPY_SHARE_TARGET = 0.5
READ_TARGET_X_STOCK = 100.0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True, file=__import__("sys").stderr)


def metrics(address):
    """The Prometheus text of a zeors server, as {name: value} (labels dropped: one storage)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(3))
    return out


def run(b, db, m):
    """Runs the scenario. `b` is the Bench, `m` the bench module (servers, relay)."""
    cfg = dict(b.cfg, local_sample=LOCAL_SAMPLE.get(b.args.mode, 20_000))
    meta = db / "meta.json"
    dbmeta = json.loads(meta.read_text())
    link = m.LINK
    out = {"data_fs_bytes": dbmeta["data_fs_bytes"]}
    b.results["replication"] = out

    repl_port = m.free_port()
    primary = m.zeors_server(b.zeors, b.copy_db(db, "primary"), m.free_port(), b.work,
                             "--replicate-to", f"127.0.0.1:{repl_port}")
    replica_dir = b.work / "replica"
    replica_dir.mkdir()
    replica_port, replica_metrics = m.free_port(), f"127.0.0.1:{m.free_port()}"

    def replica_server(source):
        return m.zeors_server(b.zeors, replica_dir / "Data.fs", replica_port, b.work,
                              "--replicate-from", source, "--metrics-address", replica_metrics)

    relay = m.Relay(b.tool, f"127.0.0.1:{repl_port}")
    replica = None
    try:
        primary.start()
        # 1. The initial copy over the shaped link.
        relay.reset()
        began = time.monotonic()
        replica = replica_server(relay.address).start()
        asked = time.monotonic()
        r = b.tool_json("read", "--address", replica.address, "--meta", meta, "--sample", 1000,
                        "--seed", 4242, "--connections", 1, "--wait-ready", cfg.get("copy_timeout", 1200),
                        "--verify-against", primary.address, "--wait-current",
                        timeout=cfg.get("copy_timeout", 1200) + 60)
        seconds = asked - began + r["current_s"]
        counts = relay.counts()
        stats = metrics(replica_metrics)
        raw_s = dbmeta["data_fs_bytes"] / link["bandwidth"]
        out["copy"] = dict(
            seconds=seconds, raw_link_s=raw_s, share=seconds / raw_s, up=counts["up"], down=counts["down"],
            stream_bytes=stats.get("zeors_replication_received_stream_bytes_total"),
            wire_bytes=stats.get("zeors_replication_received_bytes_total"),
            mismatches=r["mismatches"],
        )
        c = out["copy"]
        log(f"  replication initial copy: {seconds:.1f} s for {dbmeta['data_fs_bytes'] / 1e6:.1f} MB "
            f"(raw bytes need {raw_s:.1f} s on the link: {c['share']:.2f} of it), "
            f"{(counts['up'] + counts['down']) / 1e6:.1f} MB over the link"
            + (f", stream {c['stream_bytes'] / 1e6:.1f} MB sent as {c['wire_bytes'] / 1e6:.1f} MB"
               if c["stream_bytes"] and c["wire_bytes"] else "")
            + (f", {c['mismatches']} of 1000 sampled objects differ" if c["mismatches"] else ""))
        b.save()

        # 2. Lag under 8 writers, the replica following the primary directly.
        replica.stop()
        replica = replica_server(f"127.0.0.1:{repl_port}").start()
        b.tool_json("read", "--address", replica.address, "--meta", meta, "--sample", 1, "--connections", 1,
                    "--wait-ready", 120, "--verify-against", primary.address, "--wait-current")
        dur, warm = cfg["duration"], cfg["warmup"]
        lag = subprocess.Popen(
            [b.tool, "lag", "--primary", primary.address, "--replica", replica.address,
             "--duration", str(dur), "--warmup", str(warm)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.3)  # both registered before the first commit
            w = b.tool_json("commits", "--address", primary.address, "--meta", meta, "--writers", 8,
                            "--duration", dur + 0.5, "--warmup", warm, "--seed", 31)
            stdout, stderr = lag.communicate(timeout=dur + warm + 120)
        finally:
            if lag.poll() is None:
                lag.kill()
                lag.wait()
        if lag.returncode != 0:
            raise RuntimeError(f"zeo-bench lag failed: {stderr.strip()[:2000]}")
        lr = json.loads(stdout.strip().splitlines()[-1])
        lr["commits_per_s"] = w["commits_per_s"]
        lr["objects_stored"] = w["objects_stored"]
        out["lag"] = lr
        log(f"  replication lag, 8 writers ({w['commits_per_s']:,.0f} commits/s): "
            f"p50 {lr['lag']['p50_ms']:.2f} ms, p99 {lr['lag']['p99_ms']:.2f} ms, max {lr['lag']['max_ms']:.1f} ms; "
            f"transactions behind p50 {lr['lag_txns_p50']}, p99 {lr['lag_txns_p99']}, max {lr['lag_txns_max']}"
            + (f"; {lr['missing']} never reached the replica" if lr["missing"] else ""))
        b.save()

        # 3. Cold random reads through the replica.
        r = b.tool_json("read", "--address", replica.address, "--meta", meta, "--sample", cfg["local_sample"],
                        "--seed", 6001, "--connections", 8, "--verify-against", primary.address)
        r["rate"] = r["objects"] / r["read_s"]
        out["replica_read"] = r
        log(f"  replica cold read: {r['objects']} objects in {r['read_s']:.3f} s, {r['rate']:,.0f} objects/s"
            + (f", {r['mismatches']} differ from the primary" if r["mismatches"] else ""))
        b.save()
        replica.stop()
        replica = None

        # 4. A --warm proxy over the shaped link, to the primary's ZEO port.
        if not b.args.no_warm:
            warm_proxy(b, m, out, primary, meta, cfg)
    finally:
        if replica is not None:
            replica.stop()
        relay.close()
        primary.stop()
    return out


def warm_proxy(b, m, out, primary, meta, cfg):
    relay = m.Relay(b.tool, primary.address)
    cache = b.work / "warm-proxy-cache"
    cache.mkdir()
    maddr = f"127.0.0.1:{m.free_port()}"
    proxy = m.zeors_server(b.zeors, cache / "unused.fs", m.free_port(), b.work,
                           "--upstream", relay.address, "--cache-dir", cache, "--cache-size", "500MB",
                           "--warm", "--metrics-address", maddr)
    try:
        relay.reset()
        began = time.monotonic()
        proxy.start()
        # One client reading cold objects one after another while the proxy warms: its
        # misses go first on the link (the warm-up waits for them).
        time.sleep(cfg.get("probe_after", 5.0))
        m0 = metrics(maddr)
        p = b.tool_json("read", "--address", proxy.address, "--meta", meta, "--sample", cfg.get("probe_sample", 200),
                        "--seed", 7001, "--connections", 1)
        m1 = metrics(maddr)
        probe_ms = 1000 * p["read_s"] / p["objects"]
        probe_misses = m1.get("zeors_cache_misses_total", 0) - m0.get("zeors_cache_misses_total", 0)
        log(f"    during the warm-up one client read {p['objects']} cold objects at {probe_ms:.1f} ms each "
            f"({probe_misses:.0f} of them misses)")
        deadline = began + cfg.get("warm_timeout", 1200)
        last_log = began
        while True:
            s = metrics(maddr)
            if s.get("zeors_cache_warm_done") == 1:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy did not finish warming in time")
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                log(f"    warming: {s.get('zeors_cache_warmed_objects_total', 0):,.0f} objects so far")
            time.sleep(0.2)
        seconds = time.monotonic() - began
        counts = relay.counts()
        out["warm"] = dict(seconds=seconds, up=counts["up"], down=counts["down"],
                           objects=s.get("zeors_cache_warmed_objects_total"),
                           cache_bytes=s.get("zeors_cache_bytes"),
                           probe_ms=probe_ms, probe_misses=probe_misses, probe_objects=p["objects"])
        log(f"  proxy --warm: warm after {seconds:.1f} s, {out['warm']['objects']:,.0f} objects, "
            f"{(counts['up'] + counts['down']) / 1e6:.1f} MB over the link")
        relay.reset()
        before = metrics(maddr)
        r = b.tool_json("read", "--address", proxy.address, "--meta", meta, "--sample", cfg["local_sample"],
                        "--seed", 6001, "--connections", 8, "--verify-against", primary.address)
        after = metrics(maddr)
        r["rate"] = r["objects"] / r["read_s"]
        r["misses"] = after.get("zeors_cache_misses_total", 0) - before.get("zeors_cache_misses_total", 0)
        r.update(relay.counts())
        out["warm_read"] = r
        log(f"  warmed proxy cold read: {r['objects']} objects in {r['read_s']:.3f} s, {r['rate']:,.0f} objects/s, "
            f"{r['misses']:.0f} misses" + (f", {r['mismatches']} differ from upstream" if r["mismatches"] else ""))
        b.save()
    finally:
        proxy.stop()
        relay.close()


# -- report -----------------------------------------------------------------------


def _proxy_cold_rate(results, side):
    rates = []
    for r in results.get("proxy", {}).get(side, []):
        try:
            rates.append(r["cold_read"]["objects"] / r["cold_read"]["seconds"])
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    rates.sort()
    return rates[len(rates) // 2] if rates else None


def summarize(results):
    """Rows of the replication table: (label, value, unit, comparison, target text, met)."""
    rep = results.get("replication")
    if not rep:
        return None
    stock = _proxy_cold_rate(results, "stock")
    zeors = _proxy_cold_rate(results, "zeors")
    source = "this run"
    if stock is None or zeors is None:
        stock, zeors, source = ISSUE_STOCK_PROXY_RATE, ISSUE_ZEORS_PROXY_RATE, "issue 16"
    rows = []
    c = rep.get("copy")
    if c:
        comp = f"{c['raw_link_s']:.0f} s for the raw {rep['data_fs_bytes'] / 1e6:.0f} MB"
        if c.get("stream_bytes") and c.get("wire_bytes"):
            comp += f"; stream {c['stream_bytes'] / 1e6:.0f} MB, {c['wire_bytes'] / 1e6:.0f} MB on the link (zstd)"
        rows.append(dict(id="repl_copy", label="initial copy to a replica over the link: seconds",
                         value=c["seconds"], unit="s", comparison=comp,
                         target=f"≤ {COPY_SHARE_TARGET:g} of the raw bytes' time ({c['share']:.2f})",
                         met=c["share"] <= COPY_SHARE_TARGET))
    lag = rep.get("lag")
    if lag:
        comp = f"{lag['commits_per_s']:,.0f} commits/s on the primary, {lag['transactions']:,} measured"
        rows.append(dict(id="repl_lag_ms", label="replica lag, 8 writers on the primary: p99", value=lag["lag"]["p99_ms"],
                         unit="ms", comparison=comp + f"; p50 {lag['lag']['p50_ms']:.2f} ms, max {lag['lag']['max_ms']:.1f} ms",
                         target="", met=None))
        rows.append(dict(id="repl_lag_txns", label="replica lag, 8 writers on the primary: transactions behind, p99",
                         value=lag["lag_txns_p99"], unit="", comparison=f"mean {lag['lag_txns_mean']:.2f}, max {lag['lag_txns_max']}"
                         + (f"; {lag['missing']} never arrived" if lag.get("missing") else ""), target="", met=None))
    for key, label in (("replica_read", "cold random reads through a replica, 8 clients: objects/s"),
                       ("warm_read", "cold random reads through a `--warm`ed proxy, 8 clients: objects/s")):
        r = rep.get(key)
        if not r:
            continue
        x = r["rate"] / stock
        comp = (f"{x:,.0f}× the stock proxy ({stock:,.1f}/s), {r['rate'] / zeors:,.0f}× zeors' proxy without "
                f"--warm ({zeors:,.0f}/s; proxy figures of {source})")
        if key == "warm_read":
            comp += f"; {r.get('misses', 0):.0f} misses"
        rows.append(dict(id=key, label=label, value=r["rate"], unit="/s", comparison=comp,
                         target=f"≥ {READ_TARGET_X_STOCK:g}× stock proxy", met=x >= READ_TARGET_X_STOCK,
                         x_stock=x))
    w = rep.get("warm")
    if w:
        comp = f"{w['objects']:,.0f} objects, {(w['up'] + w['down']) / 1e6:.0f} MB over the link"
        if w.get("probe_ms") is not None:
            comp += (f"; meanwhile one client's cold reads took {w['probe_ms']:.1f} ms each "
                     f"(link round trip {results.get('link', {}).get('rtt_ms', 20):g} ms)")
        rows.append(dict(id="warm_s", label="`--warm` proxy: seconds until warm", value=w["seconds"], unit="s",
                         comparison=comp, target="", met=None))
    return {"rows": rows, "compared_with": source}


def chart_rows(s):
    """The rows of the chart (report.svg) this part adds: the reads against the stock proxy."""
    out = []
    for r in (s or {}).get("rows", []):
        if "x_stock" in r:
            out.append({"id": r["id"], "label": r["label"].replace("`", "").replace(": objects/s", ", × stock proxy"),
                        "ratio": r["x_stock"], "better": "higher", "target": READ_TARGET_X_STOCK, "met": r["met"]})
    return out


def markdown(results, fmt):
    """The replication section of the report (empty when the part did not run)."""
    s = (results.get("summary") or {}).get("replication") or summarize(results)
    if not s:
        return []
    lines = ["", "Replication (zeors primary and replica; the link of the proxy rows between them for the copy):", "",
             "| | zeors | compared with | target | |", "|---|---:|---|---|---|"]
    for r in s["rows"]:
        verdict = {True: "met", False: "**missed**", None: "–"}[r["met"]]
        lines.append(f"| {r['label']} | {fmt(r['value'], r['unit'])} | {r['comparison']} | {r['target']} | {verdict} |")
    return lines
