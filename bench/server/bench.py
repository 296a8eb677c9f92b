"""zeors against the stock Python ZEO server (`runzeo`), side by side, in one run.

Run through `bench/server/run.sh` (which builds the release binaries and provides the
Python environment); it calls this with the venv's Python, so `runzeo` and ZODB are the
ones from `interop/requirements.txt`.

Both servers serve their own copy of one generated database (gendb.py) on loopback and
run at the same time; every workload runs against one and then the other, the order
alternating between repetitions, and the figures reported are medians over repetitions.
The load generator is `zeo-bench` (Rust, on the zeo-client crate); pyclient.py adds the
stock Python client.

Two references sit beside the servers in the load workloads:

* the floor, `zeo-bench floor`: a minimal server on the same framing that answers every
  load from memory (one read and one write per request, no storage, no decoding). The
  servers' CPU per load and loads/s are also reported as multiples of its own, measured
  in the same run: what a server on this machine's loopback TCP cannot go below;
* a pinned mode: each server started on one CPU and the load generator run on another
  (`sched_setaffinity`), so that the two do not compete for the same cores, reported
  next to the unpinned figures.

Results go to bench/out/<timestamp>.json; report.py turns them into
bench/server/latest.md and latest.svg (and the README's Benchmarks block). A third
part, `postgresql` (bench_pg.py), measures zeors on PostgreSQL against `runzeo` serving
the same RelStorage database, a fourth, `replication`, a primary, a replica and a
`--warm` proxy; `--parts` picks the parts to run.
"""
import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(HERE))
import bench_pg  # noqa: E402
import report  # noqa: E402

SIDES = ("stock", "zeors")
# The suite's parts, in the order they run (`--parts` picks some): 1, the two servers side
# by side on a Data.fs (with the pinned loads); 2, proxies over a shaped link; 3, on
# PostgreSQL in RelStorage's schema (bench_pg.py); 4, replication: a primary, a replica
# and a --warm proxy.
PARTS = ("servers", "proxies", "postgresql", "replication")
# The load workloads also run against the floor (`zeo-bench floor`).
LOAD_SIDES = ("stock", "zeors", "floor")

MODES = {
    # A couple of minutes: every workload once, short windows, a small proxy sample, and
    # 200 upstream transactions while a proxy is down (still twice upstream's queue).
    "quick": dict(
        objects=100_000, reps=1, duration=2.0, warmup=0.5, py_duration=2.0,
        fanout_rounds=5, proxy_sample=300, proxy_txns=200, proxy_reps=1, hits_window=2.0, proxy_traverse=400,
    ),
    # About a quarter of an hour: three repetitions of everything.
    "full": dict(
        objects=100_000, reps=3, duration=8.0, warmup=1.0, py_duration=5.0,
        fanout_rounds=20, proxy_sample=2000, proxy_txns=1000, proxy_reps=1, hits_window=5.0, proxy_traverse=2000,
    ),
}

# The shaped link between a proxy and its upstream.
LINK = dict(bandwidth=1_000_000, rtt_ms=20.0)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def rss_mb(pid, key="VmRSS:"):
    """Resident memory in MB; key "RssAnon:" leaves out mapped files' cached pages."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return None


def on_cpus(cpus):
    """A preexec_fn that confines the child (and the threads it will start) to `cpus`."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Server:
    """A server process: zeors (FileStorage or proxy), runzeo (FileStorage or zeoclient)
    or the floor; started on `cpus` only when given."""

    def __init__(self, name, argv, port, logpath, cwd, cpus=None):
        self.name, self.argv, self.port, self.logpath, self.cwd = name, argv, port, logpath, cwd
        self.cpus = cpus
        self.proc = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self):
        return self.proc.pid

    def start(self, wait=True):
        self.logfile = open(self.logpath, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self.logfile, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     preexec_fn=on_cpus(self.cpus))
        if wait:
            wait_for_port(self.port, self.proc)
        return self

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.logfile.close()


def zeors_server(binary, path, port, workdir, *extra, cpus=None):
    argv = [binary, "serve", "-a", f"127.0.0.1:{port}", "-f", str(path), "--log-level", "warn", *extra]
    return Server("zeors", argv, port, workdir / f"zeors-{port}.log", workdir, cpus)


def floor_server(tool, meta, port, workdir, cpus=None):
    argv = [tool, "floor", "--listen", f"127.0.0.1:{port}", "--meta", str(meta)]
    return Server("floor", argv, port, workdir / f"floor-{port}.log", workdir, cpus)


def stock_server(path, port, workdir, storage_section=None, queue=100, cpus=None):
    conf = workdir / f"zeo-{port}.conf"
    storage_section = storage_section or f"<filestorage 1>\n  path {path}\n</filestorage>"
    conf.write_text(
        f"<zeo>\n  address 127.0.0.1:{port}\n  invalidation-queue-size {queue}\n</zeo>\n{storage_section}\n"
        "<eventlog>\n  level WARNING\n  <logfile>\n    path STDOUT\n  </logfile>\n</eventlog>\n"
    )
    runzeo = pathlib.Path(sys.executable).parent / "runzeo"
    return Server("stock", [str(runzeo), "-C", str(conf)], port, workdir / f"runzeo-{port}.log", workdir, cpus)


class Bench:
    def __init__(self, args, cfg):
        self.args, self.cfg = args, cfg
        target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
        self.zeors = os.environ.get("ZEORS_BIN") or str(target / "release" / "zeors")
        self.tool = os.environ.get("ZEO_BENCH_BIN") or str(target / "release" / "zeo-bench")
        for b in (self.zeors, self.tool):
            if not os.path.exists(b):
                raise SystemExit(f"{b} not found: build with `cargo build --release -p zeors -p zeo-bench`")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        built = datetime.datetime.fromtimestamp(os.path.getmtime(self.zeors))
        self.json_path = OUT / f"{stamp}.json"
        self.work = OUT / stamp
        self.work.mkdir(parents=True, exist_ok=True)
        self.results = {
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "mode": args.mode,
            "config": cfg,
            "link": LINK,
            "machine": dict(machine_info(), zeors_built=built.isoformat(timespec="seconds")),
            "runs": {},
            "rss": {},
            "proxy": {},
            "errors": [],
        }

    # -- helpers ---------------------------------------------------------------

    def tool_json(self, *argv, timeout=None, cpus=None):
        cmd = [self.tool, *map(str, argv)]
        env = dict(os.environ, RUST_BACKTRACE="0")  # errors, not backtraces, in the report
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or 900, env=env,
                           preexec_fn=on_cpus(cpus))
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[:2000]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def py_json(self, *argv, timeout=None):
        cmd = [sys.executable, str(HERE / "pyclient.py"), *map(str, argv)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or 900)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[:2000]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def record(self, workload, side, fn):
        try:
            value = fn()
        except Exception as e:  # keep going: one broken workload must not lose the rest
            log(f"  {workload} on {side}: FAILED {e}")
            self.results["errors"].append(f"{workload} on {side}: {e}")
            return
        self.results["runs"].setdefault(workload, {}).setdefault(side, []).append(value)
        log(f"  {workload:>18} {side:>5}: {report.one_line(value)}")

    def save(self):
        self.results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.results["summary"] = report.summarize(self.results)
        self.json_path.write_text(json.dumps(self.results, indent=1))

    # -- the database ----------------------------------------------------------

    def database(self):
        gen = HERE / "gendb.py"
        digest = hashlib.sha256(gen.read_bytes()).hexdigest()[:8]
        db = OUT / f"db-{self.cfg['objects']}-{digest}"
        if not (db / "meta.json").exists():
            log(f"generating {self.cfg['objects']} objects in {db}")
            subprocess.run([sys.executable, str(gen), str(db), "--objects", str(self.cfg["objects"])], check=True)
        return db

    def copy_db(self, db, name):
        d = self.work / name
        d.mkdir()
        for f in ("Data.fs", "Data.fs.index"):
            shutil.copy(db / f, d / f)
        return d / "Data.fs"

    # -- part 1: the two servers side by side ------------------------------------

    def servers(self, db):
        meta = db / "meta.json"
        cfg = self.cfg
        servers = {
            "zeors": zeors_server(self.zeors, self.copy_db(db, "zeors"), free_port(), self.work),
            "stock": stock_server(self.copy_db(db, "stock"), free_port(), self.work),
            "floor": floor_server(self.tool, meta, free_port(), self.work),
        }
        try:
            for s in servers.values():
                s.start()
            time.sleep(1)
            for side in SIDES:
                s = servers[side]
                self.results["rss"][side] = {"started_mb": rss_mb(s.pid), "started_anon_mb": rss_mb(s.pid, "RssAnon:")}
            # Memory per connection on fresh servers, before any workload grows the heap.
            for side in SIDES:
                s = servers[side]
                r = self.tool_json("fanout", "--address", s.address, "--meta", meta, "--clients", 1000,
                                   "--rounds", 0, "--server-pid", s.pid)
                self.results["rss"][side]["idle_1000_mb"] = r["server_rss_connected_mb"]
                self.results["rss"][side]["idle_1000_anon_mb"] = r.get("server_rss_anon_connected_mb")
                log(f"  RSS {side:>5}: started {self.results['rss'][side]['started_mb']:.1f} MB, "
                    f"{r['server_rss_connected_mb']:.1f} MB with 1,000 idle connections")
                time.sleep(1)
            dur, warm = cfg["duration"], cfg["warmup"]
            # (name, run against a server, sides); the loads also run against the floor.
            workloads = [
                (f"loads-{c}", lambda s, c=c: self.tool_json(
                    "loads", "--address", s.address, "--meta", meta, "--connections", c,
                    "--duration", dur, "--warmup", warm, "--server-pid", s.pid), LOAD_SIDES)
                for c in (1, 8, 64)
            ]
            workloads.append(("loads-8x16", lambda s: self.tool_json(
                "loads", "--address", s.address, "--meta", meta, "--connections", 8, "--depth", 16,
                "--duration", dur, "--warmup", warm, "--server-pid", s.pid), LOAD_SIDES))
            if not self.args.no_python:
                for p in (1, 8):
                    workloads.append((f"pyloads-{p}", lambda s, p=p: self.py_json(
                        "loads", "--address", s.address, "--meta", meta, "--procs", p,
                        "--duration", cfg["py_duration"], "--warmup", warm, "--server-pid", s.pid), SIDES))
            for name, extra in (("commits-1", ["--writers", 1]), ("commits-8", ["--writers", 8]),
                                ("commits-8-hot", ["--writers", 8, "--hot", 4])):
                workloads.append((name, lambda s, extra=extra: self.tool_json(
                    "commits", "--address", s.address, "--meta", meta, *extra,
                    "--duration", dur, "--warmup", warm, "--server-pid", s.pid), SIDES))
            for n in (100, 1000):
                workloads.append((f"fanout-{n}", lambda s, n=n: self.tool_json(
                    "fanout", "--address", s.address, "--meta", meta, "--clients", n,
                    "--rounds", cfg["fanout_rounds"], "--server-pid", s.pid), SIDES))
            self.repeat(workloads, servers)
            time.sleep(1)
            for side in SIDES:
                s = servers[side]
                self.results["rss"][side]["after_runs_mb"] = rss_mb(s.pid)
                self.results["rss"][side]["after_runs_anon_mb"] = rss_mb(s.pid, "RssAnon:")
        finally:
            for s in servers.values():
                s.stop()

    def wanted(self, name):
        return not self.args.only or any(name.startswith(o) for o in self.args.only)

    def repeat(self, workloads, servers):
        """Runs every wanted workload on each of its sides, `reps` times, the order of the
        sides alternating between repetitions."""
        cfg = self.cfg
        for rep in range(cfg["reps"]):
            log(f"repetition {rep + 1}/{cfg['reps']}")
            for name, fn, sides in workloads:
                if not self.wanted(name):
                    continue
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    self.record(name, side, lambda: fn(servers[side]))
            self.save()

    # -- part 1b: the loads with the server and the load generator on a core each ----

    def pinned(self, db):
        """loads-1/8/64 again, each server (stock, zeors, the floor) started confined to one
        CPU and the load generator confined to another: neither competes with the other
        for a core, as they do in the unpinned runs on a small machine. The servers are
        started pinned (not moved later), so that zeors' and the floor's runtimes size
        themselves to the one CPU they have."""
        names = [f"pinned-loads-{c}" for c in (1, 8, 64)]
        if not any(self.wanted(n) for n in names):
            return
        allowed = os.sched_getaffinity(0)
        server_cpu, client_cpu = self.args.pin or (sorted(allowed) * 2)[:2]
        if server_cpu == client_cpu or not {server_cpu, client_cpu} <= allowed:
            log(f"pinned loads skipped: CPUs {server_cpu} and {client_cpu} are not two of the usable {sorted(allowed)}")
            self.results["errors"].append("pinned loads skipped: fewer than two usable CPUs")
            return
        self.results["pinned"] = {"server_cpus": [server_cpu], "client_cpus": [client_cpu]}
        log(f"pinned: servers on CPU {server_cpu}, load generator on CPU {client_cpu}")
        meta = db / "meta.json"
        cpus = {server_cpu}
        servers = {
            "zeors": zeors_server(self.zeors, self.copy_db(db, "zeors-pinned"), free_port(), self.work, cpus=cpus),
            "stock": stock_server(self.copy_db(db, "stock-pinned"), free_port(), self.work, cpus=cpus),
            "floor": floor_server(self.tool, meta, free_port(), self.work, cpus=cpus),
        }
        dur, warm = self.cfg["duration"], self.cfg["warmup"]
        workloads = [
            (f"pinned-loads-{c}", lambda s, c=c: self.tool_json(
                "loads", "--address", s.address, "--meta", meta, "--connections", c,
                "--duration", dur, "--warmup", warm, "--server-pid", s.pid, cpus={client_cpu}), LOAD_SIDES)
            for c in (1, 8, 64)
        ]
        try:
            for s in servers.values():
                s.start()
            time.sleep(1)
            self.repeat(workloads, servers)
        finally:
            for s in servers.values():
                s.stop()

    # -- part 2: proxies over a shaped link -------------------------------------

    def proxies(self, db):
        cfg = self.cfg
        meta = db / "meta.json"
        upstream = stock_server(self.copy_db(db, "upstream"), free_port(), self.work, queue=100)
        upstream.start()
        try:
            for rep in range(cfg["proxy_reps"]):
                order = SIDES if rep % 2 == 0 else SIDES[::-1]
                for side in order:
                    self.record_proxy(side, rep, upstream, meta)
                self.save()
        finally:
            upstream.stop()

    def record_proxy(self, side, rep, upstream, meta):
        try:
            value = self.proxy_scenario(side, rep, upstream, meta)
        except Exception as e:
            log(f"  proxy on {side}: FAILED {e}")
            self.results["errors"].append(f"proxy on {side}: {e}")
            return
        self.results["proxy"].setdefault(side, []).append(value)

    def proxy_scenario(self, side, rep, upstream, meta):
        cfg = self.cfg
        sample = cfg["proxy_sample"]
        relay = Relay(self.tool, upstream.address)
        port = free_port()
        cache = self.work / f"{side}-proxy-cache-{rep}"
        cache.mkdir()
        if side == "zeors":
            proxy = zeors_server(self.zeors, cache / "unused.fs", port, self.work,
                                 "--upstream", relay.address, "--cache-dir", cache, "--cache-size", "500MB")
        else:
            section = (f"<zeoclient 1>\n  server {relay.address}\n  storage 1\n  client proxy\n"
                       f"  var {cache}\n  cache-size 500MB\n</zeoclient>")
            proxy = stock_server(None, port, self.work, storage_section=section)

        def read(*extra):
            return self.tool_json("read", "--address", proxy.address, "--meta", meta, "--sample", sample,
                                  "--seed", 1000 + rep, "--connections", 8, *extra)

        def timed_restart(phase):
            proxy.stop()
            if phase == "restart_after_txns":
                w = self.tool_json("commits", "--address", upstream.address, "--meta", meta, "--writers", 1,
                                   "--min-objects", 1, "--max-objects", 1, "--transactions", cfg["proxy_txns"],
                                   "--seed", 77 + rep)
                log(f"    {w['commits']} transactions committed upstream while the proxy was down")
            relay.reset()
            began = time.monotonic()
            proxy.start(wait=False)
            extra = ["--wait-ready", 600, "--verify-against", upstream.address, "--wait-current"]
            r = read(*extra)
            r["seconds"] = time.monotonic() - began
            r.update(relay.counts())
            return r

        out = {}
        try:
            relay.reset()
            proxy.start()
            r = read("--verify-against", upstream.address)
            r["seconds"] = r["read_s"]
            r.update(relay.counts())
            out["cold_read"] = r
            relay.reset()
            r = read()
            r["seconds"] = r["read_s"]
            r.update(relay.counts())
            out["warm_read"] = r
            out["hits"] = self.hit_rates(proxy, read, meta, rep)
            relay.reset()
            t = self.py_json("traverse", "--address", proxy.address, "--meta", meta, "--procs", 8,
                             "--first", 50_000 + 10_000 * rep, "--count", cfg["proxy_traverse"])
            t.update(relay.counts())
            out["cold_traverse"] = t
            log(f"  proxy {side:>5}      cold_traverse: {t['objects']} objects in {t['seconds']:.2f} s, "
                f"{(t['up'] + t['down']) / 1e6:.3f} MB over the link")
            out["warm_restart"] = timed_restart("warm_restart")
            out["restart_after_txns"] = timed_restart("restart_after_txns")
            for phase, r in out.items():
                if phase in ("hits", "cold_traverse"):
                    continue
                log(f"  proxy {side:>5} {phase:>18}: {r['seconds']:.2f} s, "
                    f"{(r['up'] + r['down']) / 1e6:.3f} MB over the link"
                    + (f", accepting clients after {r['connect_s']:.2f} s, current after {r['current_s']:.2f} s"
                       if r.get("current_s") is not None else "")
                    + (f", {r['mismatches']} objects differ from upstream" if r.get("mismatches") else "")
                    + (f", {r['refused']} loads refused (upstream not ready) and retried" if r.get("refused") else ""))
        finally:
            proxy.stop()
            relay.close()
        return out

    def hit_rates(self, proxy, read, meta, rep):
        """Cache-hit reads/s of 8 connections re-reading the warm sample: alone, while one
        other client misses (reads objects never read before, one at a time), and while one
        other client commits through the proxy."""
        window = self.cfg["hits_window"]

        def hits():
            return read("--repeat-for", window)["loads_per_s"]

        def during(argv):
            bg = subprocess.Popen([self.tool, *map(str, argv)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
            try:
                time.sleep(1.0)  # connected and busy before the window opens
                if bg.poll() is not None:
                    raise RuntimeError(f"{argv[0]} in the background ended early")
                return hits()
            finally:
                bg.terminate()
                bg.wait()

        out = {"idle": hits()}
        out["during_misses"] = during(["read", "--address", proxy.address, "--meta", meta, "--sample", 20_000,
                                       "--seed", 5000 + rep, "--connections", 1])
        out["during_commits"] = during(["commits", "--address", proxy.address, "--meta", meta, "--writers", 1,
                                        "--duration", 3600, "--warmup", 0, "--seed", 99 + rep])
        log(f"  proxy cache hits/s: idle {out['idle']:,.0f}, during another client's misses "
            f"{out['during_misses']:,.0f}, during another client's commits {out['during_commits']:,.0f}")
        return out

    # -- part 3: replication (and a warmed proxy) over the same link -------------

    def replication(self, db):
        import replication  # bench/server/replication.py

        try:
            replication.run(self, db, sys.modules[__name__])
        except Exception as e:  # keep the other parts' figures
            log(f"  replication: FAILED {e}")
            self.results["errors"].append(f"replication: {e}")

    def run(self):
        began = time.monotonic()
        db = self.database()
        self.results["database"] = json.loads((db / "meta.json").read_text())
        for k in ("item_template", "item_ranges"):
            self.results["database"].pop(k, None)
        try:
            parts = self.args.parts or PARTS
            if "servers" in parts and not self.args.no_servers:
                self.servers(db)
            if "servers" in parts and not self.args.no_servers and not self.args.no_pinned:
                self.pinned(db)
            if "proxies" in parts and not self.args.no_proxy:
                self.proxies(db)
            if "postgresql" in parts:
                bench_pg.run(self, db)
            if "replication" in parts:
                self.replication(db)
        finally:
            self.results["elapsed_s"] = round(time.monotonic() - began, 1)
            self.save()
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)
        log(f"wrote {self.json_path} ({self.results['elapsed_s']} s)")
        return self.json_path


class Relay:
    """`zeo-bench relay`: a shaped link to `target` with byte counts on demand."""

    def __init__(self, tool, target):
        self.proc = subprocess.Popen(
            [tool, "relay", "--target", target, "--rtt-ms", str(LINK["rtt_ms"]),
             "--bandwidth", str(LINK["bandwidth"])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.port = json.loads(self.proc.stdout.readline())["port"]

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def _command(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        c = json.loads(self.proc.stdout.readline())
        return {"up": c["up"], "down": c["down"]}

    def counts(self):
        return self._command("counts")

    def reset(self):
        return self._command("reset")

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def machine_info():
    def first(path, key):
        try:
            for line in open(path):
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return None

    import ZEO  # noqa: F401  (versions of the stack under test)
    from importlib.metadata import version

    mem = first("/proc/meminfo", "MemTotal")
    return {
        "cpu": first("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "memory_gb": round(int(mem.split()[0]) / 1024**2, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ZEO": version("ZEO"),
        "ZODB": version("ZODB"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_at_start": os.getloadavg(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=sorted(MODES), default="quick")
    p.add_argument("--reps", type=int, help="override the mode's repetitions")
    p.add_argument("--duration", type=float, help="override the mode's measured seconds per workload")
    p.add_argument("--only", nargs="*", help="run only workloads whose names start with these")
    p.add_argument("--no-python", action="store_true", help="skip the stock Python client workloads")
    p.add_argument("--no-servers", action="store_true", help="skip the side-by-side server workloads")
    p.add_argument("--no-proxy", action="store_true", help="skip the proxy scenarios")
    p.add_argument("--parts", type=lambda v: v.split(","), default=PARTS,
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all); "
                        "replication: a zeors primary, a replica and a --warm proxy over the shaped link")
    p.add_argument("--no-warm", action="store_true", help="replication part: skip the --warm proxy")
    p.add_argument("--no-pinned", action="store_true",
                   help="skip the loads with the server and the load generator pinned to a CPU each")
    p.add_argument("--pin", type=lambda v: tuple(int(c) for c in v.split(",")), metavar="SERVER,CLIENT",
                   help="the CPUs of the pinned runs: the server's and the load generator's (default: the first "
                        "two this process may use)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (databases, logs)")
    p.add_argument("--no-publish", action="store_true",
                   help="do not update bench/server/latest.{md,svg} and the README")
    args = p.parse_args()
    if unknown := set(args.parts) - set(PARTS):
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; the parts are {', '.join(PARTS)}")
    cfg = dict(MODES[args.mode])
    if args.reps:
        cfg["reps"] = args.reps
    if args.duration:
        cfg["duration"] = args.duration
    path = Bench(args, cfg).run()
    results = json.loads(path.read_text())
    print(report.markdown(results))
    if not args.no_publish:
        report.publish(results, HERE, ROOT / "README.md")
        log("updated bench/server/latest.md, latest.svg and the README's Benchmarks block")


if __name__ == "__main__":
    main()
