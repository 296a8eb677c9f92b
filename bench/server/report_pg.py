"""The report section of the suite's `postgresql` part (bench_pg.py): zeors on PostgreSQL
against stock `runzeo` serving the same RelStorage database, RelStorage clients without
a server, and two zeors servers on the database.

report.py appends `markdown(results)` to the suite's report; the figures are medians
over repetitions of `results["postgresql"]["runs"][workload][side]`, sides "zeors",
"stock" (runzeo + RelStorage), "relstorage" (RelStorage clients, no server) and "two"
(two zeors servers sharing the load).
"""

# Targets (issue 15): zeors / runzeo+RelStorage.
LOADS_TARGET = 3.0
COMMITS_TARGET = 2.0
# Two zeors servers on one database: at least what one delivers, with no errors.
TWO_SERVERS_TARGET = 1.0


def value(results, workload, side, fn):
    import report  # imported here: report imports this module

    return report._run_value(results.get("postgresql", {}), workload, side, fn)


def _rate(r):
    return r["loads_per_s"]


def _commit_rate(r):
    return r["commits_per_s"]


def _p(k):
    return lambda r: r["latency"][k]


def _fmt(v, unit=""):
    import report

    return report._fmt(v, unit)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fmt_ratio(r):
    import report

    return report._fmt_ratio(r)


def summarize(results):
    """Target rows: (label, stock, zeors, ratio, target text, met)."""
    rows = []
    for c in (1, 8, 64):
        w, conns = f"loads-{c}", f"{c} connection{'s' if c > 1 else ''}"
        stock, zeors = value(results, w, "stock", _rate), value(results, w, "zeors", _rate)
        ratio = _ratio(zeors, stock)
        rows.append((f"loads/s, {conns}", stock, zeors, "/s", ratio,
                     f"≥ {LOADS_TARGET:g}×", None if ratio is None else ratio >= LOADS_TARGET))
        stock, zeors = value(results, w, "stock", _p("p99_ms")), value(results, w, "zeors", _p("p99_ms"))
        rows.append((f"p99 load latency, {conns}", stock, zeors, "ms", _ratio(zeors, stock), "", None))
    for n in (1, 8):
        w = f"commits-{n}"
        stock, zeors = value(results, w, "stock", _commit_rate), value(results, w, "zeors", _commit_rate)
        ratio = _ratio(zeors, stock)
        rows.append((f"commits/s, {n} writer{'s' if n > 1 else ''}, fsync on", stock, zeors, "/s", ratio,
                     f"≥ {COMMITS_TARGET:g}×", None if ratio is None else ratio >= COMMITS_TARGET))
    for n in (100, 1000):
        w = f"fanout-{n}"
        stock, zeors = value(results, w, "stock", _p("p99_ms")), value(results, w, "zeors", _p("p99_ms"))
        rows.append((f"invalidation fan-out to {n:,} clients, p99", stock, zeors, "ms", _ratio(zeors, stock),
                     "", None))
    two = []
    for w, label, fn in (("loads-64", "loads/s, 64 connections (32 on each server)", _rate),
                         ("commits-8", "commits/s, 8 writers (4 on each server)", _commit_rate)):
        one, both = value(results, w, "one", fn), value(results, w, "two", fn)
        ratio = _ratio(both, one)
        two.append((label, one, both, "/s", ratio, f"≥ {TWO_SERVERS_TARGET:g}×",
                    None if ratio is None else ratio >= TWO_SERVERS_TARGET))
    errors = None
    runs = results.get("postgresql", {}).get("runs", {})
    if any("two" in runs.get(w, {}) for w in ("loads-64", "commits-8")):
        errors = sum(r.get("errors", 0) for w in ("loads-64", "commits-8") for r in runs.get(w, {}).get("two", []))
        errors += sum(results["postgresql"].get("two_servers_logged_errors", []))
        errors += sum(1 for e in results["postgresql"].get("errors", []) if e.startswith("two servers"))
        errors += sum(len(runs.get(w, {}).get("two", [])) == 0 for w in ("loads-64", "commits-8"))
    two.append(("errors (failed loads and commits, errors logged by the servers)", None, errors, "", None, "0",
                None if errors is None else errors == 0))
    return {"targets": rows, "two": two}


def cold_ceiling(results):
    """What one connection's loads can reach when they miss the server's cache, from the
    two floors of the same run: the ZEO floor's round trip (`zeo-bench floor`, servers
    part) plus one database round trip for the miss statement (`zeo-bench pgfloor`)."""
    import report

    pg = results.get("postgresql", {})
    mean = _p("mean_ms")
    db_load = value(results, "pgfloor", "floor", lambda r: r["load"]["latency"]["mean_ms"])
    select_1 = value(results, "pgfloor", "floor", lambda r: r["select_1"]["latency"]["mean_ms"])
    if db_load is None:
        return ""
    text = (f"The database's floor (`zeo-bench pgfloor`, one connection from the driver zeors uses): "
            f"`SELECT 1` takes {_fmt(select_1, 'ms')} on average, the statement of a cache miss on a "
            f"random oid {_fmt(db_load, 'ms')}.")
    zeo = report._run_value(results, "loads-1", "floor", mean)
    stock = value(results, "loads-1", "stock", _rate)
    if zeo is None or not stock:
        return text + " (The ZEO floor was not measured in this run: run the servers part too.)"
    ceiling = 1000 / (zeo + db_load)
    needed = 1000 / (LOADS_TARGET * stock)
    zeors = value(results, "loads-1", "zeors", _rate)
    return (text + f" With the ZEO floor's round trip at one connection ({_fmt(zeo, 'ms')}), a load that "
            f"misses cannot take less than {_fmt(zeo + db_load, 'ms')}: at most {_fmt(ceiling, '/s')} "
            f"loads/s at one connection while the cache is cold (zeors: {_fmt(zeors, '/s')}, "
            f"{_fmt_ratio(_ratio(zeors, ceiling))} of it). {LOADS_TARGET:g}× `runzeo` + RelStorage there is "
            f"{_fmt(LOADS_TARGET * stock, '/s')}, {_fmt(needed, 'ms')} per load: less than the ZEO round trip "
            f"and the database's together, whichever server answers. Both servers start this workload with "
            f"empty caches ({pg.get('cache_mb')} MB each).")


def settings_line(pg):
    s = pg.get("settings", {})
    return (
        f"PostgreSQL {s.get('server_version', '?')}, a throwaway cluster on this machine's disk, unix socket: "
        f"fsync {s.get('fsync')}, synchronous_commit {s.get('synchronous_commit')}, full_page_writes "
        f"{s.get('full_page_writes')}, wal_sync_method {s.get('wal_sync_method')}, shared_buffers "
        f"{s.get('shared_buffers')}, wal_level {s.get('wal_level')}, other settings initdb's defaults. "
        f"Database: {pg.get('objects') or 0:,} objects ({(pg.get('database_bytes') or 0) / 1e6:.0f} MB, "
        f"{pg.get('layout')}) copied from the suite's Data.fs with RelStorage's zodbconvert in "
        f"{pg.get('load_s')} s, then VACUUM ANALYZE. Object-state memory: {pg.get('cache_mb')} MB in each "
        f"server (zeors `--pg-cache-size`, RelStorage `cache-local-mb`)."
    )


def markdown(results):
    pg = results.get("postgresql")
    if not pg or not pg.get("runs") and not pg.get("errors"):
        return ""
    s = summarize(results)
    verdict = {True: "met", False: "**missed**", None: "–"}
    lines = [
        "",
        "### On PostgreSQL (RelStorage's schema)",
        "",
        "zeors `--postgresql` against stock `runzeo` serving a `<relstorage>` section (RelStorage "
        "in Python), on one database, taking turns. " + settings_line(pg),
        "",
        "| target | `runzeo` + RelStorage | zeors | zeors / stock | target | |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label, stock, zeors, unit, ratio, target, met in s["targets"]:
        lines.append(f"| {label} | {_fmt(stock, unit)} | {_fmt(zeors, unit)} | {_fmt_ratio(ratio)} | "
                     f"{target} | {verdict[met]} |")
    ceiling = cold_ceiling(results)
    if ceiling:
        lines += ["", ceiling]
    lines += [
        "",
        "Two zeors servers on the database, the load split between them, against one of them alone "
        f"(both caches filled first by {pg.get('two_warmup_s', '?')} s of loads on each; p99 is the worse "
        "of the two servers'):",
        "",
        "| | one zeors | two zeors | two / one | target | |",
        "|---|---:|---:|---:|---|---|",
    ]
    for label, one, both, unit, ratio, target, met in s["two"]:
        lines.append(f"| {label} | {_fmt(one, unit)} | {_fmt(both, unit)} | {_fmt_ratio(ratio)} | "
                     f"{target} | {verdict[met]} |")
    details = []
    for c in (1, 8, 64):
        for k, lbl, unit, fn in (("rate", "loads/s", "/s", _rate), ("p50", "p50", "ms", _p("p50_ms")),
                                 ("p99", "p99", "ms", _p("p99_ms")),
                                 ("cpu", "server CPU per load (PostgreSQL's not counted)", "µs",
                                  lambda r: r["server_cpu_us_per_load"])):
            details.append((f"loads, {c} conn{'s' if c > 1 else ''}: {lbl}", f"loads-{c}", unit, fn))
    for p in (1, 8):
        for lbl, unit, fn in (("loads/s", "/s", _rate), ("p99", "ms", _p("p99_ms"))):
            details.append((f"ZEO.ClientStorage, {p} process{'es' if p > 1 else ''}: {lbl}", f"pyloads-{p}",
                            unit, fn))
    for n in (1, 8):
        for lbl, unit, fn in (("commits/s", "/s", _commit_rate), ("p99 latency", "ms", _p("p99_ms")),
                              ("server CPU per commit (PostgreSQL's not counted)", "ms",
                               lambda r: r["server_cpu_ms_per_commit"])):
            details.append((f"commits, {n} writer{'s' if n > 1 else ''}: {lbl}", f"commits-{n}", unit, fn))
    for n in (100, 1000):
        for lbl, fn in (("p50", _p("p50_ms")), ("p99", _p("p99_ms")), ("max", _p("max_ms"))):
            details.append((f"fan-out to {n:,} clients: {lbl}", f"fanout-{n}", "ms", fn))
    lines += [
        "",
        "<details><summary>All PostgreSQL figures</summary>",
        "",
        "| | `runzeo` + RelStorage | zeors | zeors / stock |",
        "|---|---:|---:|---:|",
    ]
    for label, w, unit, fn in details:
        stock, zeors = value(results, w, "stock", fn), value(results, w, "zeors", fn)
        if stock is None and zeors is None:
            continue
        lines.append(f"| {label} | {_fmt(stock, unit)} | {_fmt(zeors, unit)} | {_fmt_ratio(_ratio(zeors, stock))} |")
    lines += [
        "",
        "Python processes loading random objects, cache disabled (every load leaves the process): "
        "RelStorage clients of the database itself (`cache-local-mb 0`, no ZEO server), and "
        "`ZEO.ClientStorage` through each server:",
        "",
        "| | RelStorage, no server | ClientStorage → zeors | ClientStorage → `runzeo` + RelStorage |",
        "|---|---:|---:|---:|",
    ]
    for p in (1, 8):
        for lbl, unit, fn in (("loads/s", "/s", _rate), ("p99", "ms", _p("p99_ms"))):
            rs = value(results, f"rsloads-{p}", "relstorage", fn)
            z, st = value(results, f"pyloads-{p}", "zeors", fn), value(results, f"pyloads-{p}", "stock", fn)
            lines.append(f"| {p} process{'es' if p > 1 else ''}: {lbl} | {_fmt(rs, unit)} | {_fmt(z, unit)} | "
                         f"{_fmt(st, unit)} |")
    cross = value(results, "fanout-100", "two", _p("p99_ms"))
    cross50 = value(results, "fanout-100", "two", _p("p50_ms"))
    if cross is not None:
        lines += ["", f"Fan-out across servers (100 clients on one zeors server, commits through the other): "
                      f"p50 {_fmt(cross50, 'ms')}, p99 {_fmt(cross, 'ms')}."]
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def one_line(v):
    """A short log line for one workload result."""
    if "select_1" in v:
        return (f"SELECT 1 mean {v['select_1']['latency']['mean_ms']:.3f} ms, miss statement mean "
                f"{v['load']['latency']['mean_ms']:.3f} ms")
    if "servers" in v:
        lat = v["latency"]
        rate = v.get("loads_per_s", v.get("commits_per_s"))
        unit = "loads/s" if "loads_per_s" in v else "commits/s"
        return (f"{rate:>9,.0f} {unit} on {v['servers']} server(s)  p99 (the worse) {lat['p99_ms']:.3f} ms  "
                f"errors {v['errors']}")
    import report

    return report.one_line(v)
