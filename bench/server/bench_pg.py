"""Part 3 of the suite, `postgresql`: zeors on PostgreSQL (RelStorage's schema) against
the stock stack on the same database.

A throwaway PostgreSQL cluster (interop/pgcluster.py: `initdb` and `pg_ctl` into a
temporary directory on the local disk) runs with a production site's durability: fsync,
synchronous commit and full-page writes on (PG_SETTINGS, reported with the figures as
the server states them). The suite's generated Data.fs is copied into one
history-preserving database with RelStorage's own `zodbconvert`; then, on that one
database:

(a) `zeors serve --postgresql`;
(b) stock `runzeo` serving a `<relstorage>` section (RelStorage in Python);
(c) RelStorage clients without any ZEO server: Python processes opening RelStorage on
    the DSN and loading random oids (pyclient.py `rsloads`);
(d) two zeors servers on the database with the load split between them.

(a) and (b) take turns (never running at the same time: a RelStorage under `runzeo`
only polls the database when a transaction begins, so it must not serve while another
server writes), each on a freshly started server, in alternating order between
repetitions; the figures reported are medians. Both servers keep the same memory for
object states (CACHE_MB: zeors `--pg-cache-size`, RelStorage `cache-local-mb`).

Results go to the run's JSON under "postgresql"; report_pg.py makes the report section.
"""
import json
import os
import subprocess
import sys
import time

import report_pg

ROOT_INTEROP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "interop")

# What a production site runs with: nothing traded for speed. shared_buffers holds the
# whole benchmark database (about 300 MB with indexes), as a tuned site's would.
PG_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "512MB",
    "max_connections": "300",
}
# Settings read back from the server for the report.
PG_SHOW = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method",
           "shared_buffers", "max_connections", "wal_level", "checkpoint_timeout")

# Memory for object states in each server (zeors --pg-cache-size, RelStorage cache-local-mb).
CACHE_MB = 64

SIDES = ("stock", "zeors")

# Loads on each of the two servers before they are measured, alone and together: long
# enough for a fresh server's cache to fill (the single servers of (a) and (b) fill
# theirs over their earlier workloads).
TWO_WARMUP_S = 4.0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PgPart:
    def __init__(self, bench, db):
        # The orchestrator's module (Server, free_port, stock_server): __main__ when
        # bench.py runs as a script, so looked up rather than imported a second time.
        self.suite = sys.modules[type(bench).__module__]
        self.bench, self.db, self.cfg = bench, db, bench.cfg
        self.meta = db / "meta.json"
        self.out = bench.results.setdefault("postgresql", {"runs": {}, "errors": []})

    # -- bookkeeping -------------------------------------------------------------

    def wanted(self, name):
        only = self.bench.args.only
        return not only or any(name.startswith(o) for o in only)

    def record(self, workload, side, fn):
        if not self.wanted(workload):
            return
        try:
            value = fn()
        except Exception as e:  # keep going: one broken workload must not lose the rest
            log(f"  pg {workload} on {side}: FAILED {e}")
            self.error(f"{workload} on {side}: {e}")
            return
        self.out["runs"].setdefault(workload, {}).setdefault(side, []).append(value)
        log(f"  pg {workload:>14} {side:>10}: {report_pg.one_line(value)}")

    def error(self, text):
        self.out["errors"].append(text)
        self.bench.results["errors"].append(f"postgresql: {text}")

    # -- the database ------------------------------------------------------------

    def load_database(self, cluster):
        """Copies the generated Data.fs into a new database with zodbconvert."""
        name = cluster.new_database("zodb_bench")
        dsn = cluster.dsn(name)
        conf = self.bench.work / "zodbconvert.conf"
        conf.write_text(
            "%import relstorage\n"
            f"<filestorage source>\n  path {self.db / 'Data.fs'}\n  read-only true\n</filestorage>\n"
            f"<relstorage destination>\n  keep-history true\n  <postgresql>\n    dsn {dsn}\n"
            "  </postgresql>\n</relstorage>\n"
        )
        zodbconvert = os.path.join(os.path.dirname(sys.executable), "zodbconvert")
        began = time.monotonic()
        r = subprocess.run([zodbconvert, str(conf)], capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"zodbconvert failed: {(r.stderr or r.stdout).strip()[-2000:]}")
        convert_s = time.monotonic() - began
        conn = cluster.connect(name)
        try:
            cur = conn.cursor()
            # What autovacuum would have done by the time a site serves the data: the
            # planner's statistics, the visibility map.
            cur.execute("VACUUM ANALYZE")
            cur.execute("CHECKPOINT")
            cur.execute("SELECT count(*), pg_database_size(current_database()) FROM current_object")
            objects, size = cur.fetchone()
            settings = {}
            for key in PG_SHOW:
                cur.execute(f"SHOW {key}")
                settings[key] = cur.fetchone()[0]
        finally:
            conn.close()
        self.out.update(dsn=dsn, settings=settings, load_s=round(convert_s, 1), objects=objects,
                        database_bytes=size, layout="history-preserving", cache_mb=CACHE_MB,
                        two_warmup_s=TWO_WARMUP_S)
        log(f"  zodbconvert: {objects:,} objects into PostgreSQL in {convert_s:.1f} s "
            f"({size / 1e6:.0f} MB database)")
        return dsn

    # -- the servers -------------------------------------------------------------

    def zeors(self, dsn, tag):
        port = self.suite.free_port()
        argv = [self.bench.zeors, "serve", "-a", f"127.0.0.1:{port}", "--postgresql", dsn,
                "--pg-cache-size", f"{CACHE_MB}MB", "--log-level", "warn"]
        return self.suite.Server("zeors", argv, port, self.bench.work / f"pg-zeors-{tag}-{port}.log",
                                 self.bench.work)

    def runzeo(self, dsn):
        section = (
            "%import relstorage\n"
            f"<relstorage 1>\n  keep-history true\n  cache-local-mb {CACHE_MB}\n"
            f"  <postgresql>\n    dsn {dsn}\n  </postgresql>\n</relstorage>"
        )
        return self.suite.stock_server(None, self.suite.free_port(), self.bench.work, storage_section=section)

    def side_workloads(self):
        cfg, meta, tool, py = self.cfg, self.meta, self.bench.tool_json, self.bench.py_json
        dur, warm = cfg["duration"], cfg["warmup"]
        w = [(f"loads-{c}", lambda s, c=c: tool(
            "loads", "--address", s.address, "--meta", meta, "--connections", c,
            "--duration", dur, "--warmup", warm, "--server-pid", s.pid)) for c in (1, 8, 64)]
        if not self.bench.args.no_python:
            w += [(f"pyloads-{p}", lambda s, p=p: py(
                "loads", "--address", s.address, "--meta", meta, "--procs", p,
                "--duration", cfg["py_duration"], "--warmup", warm, "--server-pid", s.pid)) for p in (1, 8)]
        w += [(f"commits-{n}", lambda s, n=n: tool(
            "commits", "--address", s.address, "--meta", meta, "--writers", n,
            "--duration", dur, "--warmup", warm, "--server-pid", s.pid)) for n in (1, 8)]
        w += [(f"fanout-{n}", lambda s, n=n: tool(
            "fanout", "--address", s.address, "--meta", meta, "--clients", n,
            "--rounds", cfg["fanout_rounds"], "--server-pid", s.pid)) for n in (100, 1000)]
        return w

    def one_side(self, side, dsn, rep):
        server = self.zeors(dsn, f"a{rep}") if side == "zeors" else self.runzeo(dsn)
        server.start()
        try:
            time.sleep(0.5)
            for name, fn in self.side_workloads():
                self.record(name, side, lambda: fn(server))
        finally:
            server.stop()

    # -- the database's floor -------------------------------------------------------

    def pg_floor(self, dsn):
        """One database round trip from the driver zeors uses (`zeo-bench pgfloor`): a
        cold load at one connection can be no faster than the ZEO floor plus this."""
        cfg = self.cfg
        self.record("pgfloor", "floor", lambda: self.bench.tool_json(
            "pgfloor", "--dsn", dsn, "--meta", self.meta, "--duration", cfg["duration"],
            "--warmup", cfg["warmup"]))

    # -- (c) RelStorage clients without a server -----------------------------------

    def relstorage_direct(self, dsn):
        if self.bench.args.no_python:
            return
        cfg = self.cfg
        for p in (1, 8):
            self.record(f"rsloads-{p}", "relstorage", lambda p=p: self.bench.py_json(
                "rsloads", "--dsn", dsn, "--meta", self.meta, "--procs", p,
                "--duration", cfg["py_duration"], "--warmup", cfg["warmup"]))

    # -- (d) two zeors servers on the database -------------------------------------

    def tools_together(self, argvs):
        """Runs zeo-bench processes at the same time; returns (reports, failures)."""
        env = dict(os.environ, RUST_BACKTRACE="0")
        procs = [subprocess.Popen([self.bench.tool, *map(str, a)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for a in argvs]
        reports, failures = [], []
        for p in procs:
            out, err = p.communicate(timeout=900)
            if p.returncode != 0:
                failures.append(err.strip()[-500:])
            else:
                reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports, failures

    def two_servers(self, dsn, rep):
        """One zeors server, then two on the database with the load split between them,
        measured the same way: 64 connections or 8 writers in all, on servers whose
        caches were filled first (TWO_WARMUP_S of loads on each, alone)."""
        cfg, meta = self.cfg, self.meta
        dur, warm = cfg["duration"], cfg["warmup"]
        servers = [self.zeors(dsn, f"d{rep}-{i}") for i in (1, 2)]
        logs_at = {}

        def together(kind, total, per_server_args, among):
            reports, failures = self.tools_together([
                [kind, "--address", s.address, "--meta", meta, *per_server_args(i, total // len(among)),
                 "--duration", dur, "--warmup", warm, "--server-pid", s.pid]
                for i, s in enumerate(among)])
            for f in failures:
                self.error(f"two servers, {kind}: {f}")
            out = {
                "servers": len(among),
                "latency": {k: max((r["latency"][k] for r in reports), default=None)
                            for k in ("p50_ms", "p99_ms", "max_ms")},
                "errors": sum(r.get("errors", 0) for r in reports) + len(failures),
                "parts": reports,
            }
            if kind == "loads":
                out.update(connections=total, loads_per_s=sum(r["loads_per_s"] for r in reports))
            else:
                out.update(writers=total, commits_per_s=sum(r["commits_per_s"] for r in reports),
                           conflicted_attempts=sum(r.get("conflicted_attempts", 0) for r in reports))
            return out

        def loads(i, n):
            return ["--connections", n, "--seed", 1 + i]

        def commits(i, n):
            return ["--writers", n, "--seed", 1 + i]

        try:
            for s in servers:
                s.start()
            time.sleep(0.5)
            for s in servers:
                logs_at[s.logpath] = s.logpath.stat().st_size
            if self.wanted("loads-64"):
                for i, s in enumerate(servers):
                    self.bench.tool_json("loads", "--address", s.address, "--meta", meta, "--connections", 64,
                                         "--duration", TWO_WARMUP_S, "--warmup", 0, "--seed", 100 + i)
            one = servers[:1]
            self.record("loads-64", "one", lambda: together("loads", 64, loads, one))
            self.record("commits-8", "one", lambda: together("commits", 8, commits, one))
            self.record("loads-64", "two", lambda: together("loads", 64, loads, servers))
            self.record("commits-8", "two", lambda: together("commits", 8, commits, servers))
            # Invalidations of commits made through the other server.
            self.record("fanout-100", "two", lambda: self.bench.tool_json(
                "fanout", "--address", servers[1].address, "--writer-address", servers[0].address,
                "--meta", meta, "--clients", 100, "--rounds", cfg["fanout_rounds"]))
        finally:
            for s in servers:
                s.stop()
        # Errors the servers logged while serving.
        logged = 0
        for path, at in logs_at.items():
            with open(path, errors="replace") as f:
                f.seek(at)
                logged += sum(1 for line in f if " ERROR " in line)
        self.out.setdefault("two_servers_logged_errors", []).append(logged)
        if logged:
            self.error(f"two servers logged {logged} error line(s), see {', '.join(map(str, logs_at))}")

    # -- the part ---------------------------------------------------------------------

    def run(self):
        sys.path.insert(0, ROOT_INTEROP)
        from pgcluster import PgCluster

        cluster = PgCluster(settings=PG_SETTINGS)
        log(f"postgresql: throwaway cluster in {cluster.dir} ({cluster.bin})")
        try:
            cluster.init().start()
            dsn = self.load_database(cluster)
            for rep in range(self.cfg["reps"]):
                order = SIDES if rep % 2 == 0 else SIDES[::-1]
                log(f"postgresql repetition {rep + 1}/{self.cfg['reps']} ({' then '.join(order)}, "
                    "RelStorage clients, two zeors servers)")
                self.pg_floor(dsn)
                for side in order:
                    self.one_side(side, dsn, rep)
                self.relstorage_direct(dsn)
                self.two_servers(dsn, rep)
                self.bench.save()
        finally:
            if self.bench.args.keep:
                self.out["postgres_log"] = cluster.log_text()[-20000:]
            cluster.destroy()


def run(bench, db):
    """The part, as bench.py calls it; a failure to set up is reported, not raised."""
    try:
        PgPart(bench, db).run()
    except Exception as e:
        log(f"postgresql part: FAILED {e}")
        bench.results.setdefault("postgresql", {"runs": {}, "errors": []})["errors"].append(str(e))
        bench.results["errors"].append(f"postgresql: {e}")
