"""Soak: a bounded run of mixed work against one server, looking for what only shows
over time — memory or file descriptors that grow, invalidations that stop, counts that
drift.

`CLIENTS` real clients (`ZEO.ClientStorage` + `ZODB.DB`, as threads spread over a few
worker processes) work at a modest pace until a common deadline:

- *writes*: bump the client's own counter, a shared `BTrees.Length` total and one of
  `ITEMS` shared items (sometimes replacing the item with a new object, so that the old
  one becomes garbage), in one transaction. Concurrent writers conflict: on the `Length`
  and on BTree buckets the clients resolve the conflict; on the same item they cannot,
  get a `ConflictError` and retry until the increment commits, so every increment is
  acknowledged exactly once;
- *reads*: a few objects, and now and then the whole snapshot, which must be consistent
  (sum of the counters == total == sum of the items' counts) — a client that missed an
  invalidation sees a stale object and breaks it; the total a client sees never goes
  back, and it must see other clients' increments arrive (invalidations flowing);
- *churn*: clients close their `DB` and open a new one; besides them, a raw client
  connects and drops in every state (before the handshake, registered, mid-frame, with a
  voted transaction holding the commit lock, with unread replies).

In the middle (every ~150 s in long runs) the database is packed (`db.pack()`, to a few
seconds ago) while all this goes on.

The server process's RSS (anonymous memory: heap; `VmRSS` also counts the mapped
Data.fs pages, reported but not asserted on) and its open file descriptors are read
from /proc after a warm-up and near the end, both under the same load, and must be flat;
once every client is gone the descriptors must be back to what the idle server had
before. No client may see an error other than a conflict it retried, and at the end the
counters, the total and the items must all equal the number of acknowledged increments
as a fresh client reads them, and the file must pass `zeors check` (and, direct, Python's
`fstest`).

The proxy variant runs the same load through a zeors proxy in front of a zeors upstream
(the pack is sent to upstream, as `zeopack` would be) and measures both processes. A
proxy's memory holds bounded structures that fill as its cache is used: redb's page cache
of the cache index and the window of recent invalidations (both sized by
`--cache-index-memory`, 16 MB at the default cache size) and the second-chance marks.
A heap profile of a 600 s run at the default size (heaptrack attached after the warm-up)
put all of the anonymous memory the proxy gained in those three: 7.2 MB of index pages,
1.7 MB of recent invalidations, 1.0 MB of marks, out of 11 MB; at that size they take
over half an hour of this load to fill. So that the run shows the plateau rather than the
filling, the proxy here gets an 8 MB cache (which this load fills and evicts from over and
over) and `--cache-index-memory 1MB`.

`ZEORS_SOAK_SECONDS` (default 20) sets the length of each variant's load;
`ZEORS_SOAK_CLIENTS` (50), `ZEORS_SOAK_PROCESSES` (5) the clients and the worker
processes they are spread over; `ZEORS_SOAK_RSS_SLACK_MB` overrides the growth of anonymous RSS
allowed between the warm-up and the end, which is otherwise proportionate to that window:
1 MB plus 4 kB per second (1.05 MB in a 20 s run, 5.5 MB in a 1,200 s one), plus 0.25 MB
for each thread the window's peak has over its start: a thread tokio's blocking pool adds
gets a malloc arena of its own, a step of a few hundred kB that is not a leak (a run that
failed without this allowance: +1.15 MB, half of it in the second its threads went from 5
to 9); a pile of threads has an assertion of its own. Calibration
(debug build, 2 CPUs shared with other work): 20 s runs grow 0.37-0.76 MB (both variants);
the same runs with the proxy defect the 600 s soak found reinstated (each cache store on a
blocking thread of its own) grew 0.66-1.6 MB, so a 20 s run catches that defect only in
its stronger runs; the 600 s run it was found in grew 8.7 MB, over three times the 3.3 MB
this rule allows there. Peak threads during the window are reported too (5-7 without the
defect, 7-9 with it in 20 s runs; 51 in the 600 s one).
`ZEORS_SOAK_OUT=FILE` appends the figures as JSON lines.
"""
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

ITEMS = 64
WRITE_SHARE = 0.25
CHURN_SHARE = 0.01
FULL_CHECK_SHARE = 0.05
REPLACE_SHARE = 0.2
PAUSE = (0.1, 0.7)  # seconds between a client's operations


# -- The clients (run in worker processes) -----------------------------------------------


def exhausted_conflict_rounds(e):
    """ZEO's client resolves the conflicts a vote returns and votes again, at most 9
    times (ClientStorage.tpc_vote); when the 9th vote still returns conflicts it calls
    `tpc_finish` anyway, on a transaction the server has not locked, and the server
    answers as the stock one does (`assert self.locked, "finished called wo lock"`).
    Nothing was committed: on a hot object under contention this is one more conflict,
    retried like the others (the final counts prove nothing of it was committed)."""
    return e.args[:1] == ("builtins.AssertionError",) and "finished called wo lock" in repr(e.args[1:])


class SoakClient(threading.Thread):
    def __init__(self, addr, cid, clients, deadline, seed):
        super().__init__(daemon=True)
        self.addr = addr
        self.cid = cid
        self.clients = clients
        self.deadline = deadline
        self.rng = random.Random(seed * 1_000_003 + cid)
        self.acked = 0
        self.conflicts = 0
        self.exhausted = 0  # see exhausted_conflict_rounds
        self.reads = 0
        self.full_checks = 0
        self.reconnects = 0
        self.saw_others = 0  # reads where the total moved by more than our own commits
        self.errors = []
        self.last_total = None
        self.acked_at_last = 0
        self.db = None

    def open(self):
        import transaction
        import ZODB
        from ZEO.ClientStorage import ClientStorage

        self.db = ZODB.DB(ClientStorage(self.addr, wait_timeout=30, cache_size=1 << 20), cache_size=300)
        self.tm = transaction.TransactionManager()
        self.conn = self.db.open(self.tm)

    def error(self, what):
        if len(self.errors) < 20:
            self.errors.append(f"client {self.cid}: {what}")

    def run(self):
        try:
            self.open()
            while time.time() < self.deadline:
                x = self.rng.random()
                try:
                    if x < CHURN_SHARE:
                        self.db.close()
                        self.db = None
                        self.open()
                        self.reconnects += 1
                    elif x < CHURN_SHARE + WRITE_SHARE:
                        self.write()
                    else:
                        self.read()
                except Exception as e:
                    self.error(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
                    self.abort()
                    if self.db is None:
                        self.open()
                time.sleep(self.rng.uniform(*PAUSE))
            self.db.close()
        except BaseException as e:
            self.error(f"client died: {e!r}\n{traceback.format_exc()}")

    def abort(self):
        try:
            self.tm.abort()
        except Exception:
            pass

    def write(self):
        from persistent.mapping import PersistentMapping
        from ZEO.Exceptions import ServerException
        from ZODB.POSException import ConflictError, ReadConflictError

        while True:
            if time.time() > self.deadline + 60:
                raise RuntimeError("an increment could not be committed within a minute")
            self.tm.begin()
            root = self.conn.root()
            k = self.rng.randrange(ITEMS)
            payload = self.rng.randbytes(self.rng.randint(200, 2000))
            try:
                items = root["items"]
                # The tree itself never changes: checkCurrentSerialInTransaction.
                self.conn.readCurrent(items)
                item = items[k]
                if self.rng.random() < REPLACE_SHARE:
                    items[k] = PersistentMapping({"v": item["v"] + 1, "data": payload})
                    # Written too, so that a concurrent in-place increment of the item
                    # being replaced conflicts instead of landing on the garbage copy.
                    item._p_changed = True
                else:
                    item["v"] += 1
                    item["data"] = payload
                root["counters"][self.cid]["n"] += 1
                root["total"].change(1)
                self.tm.commit()
            except ReadConflictError:
                raise  # no reader's snapshot is older than the pack time: a bug
            except ConflictError:
                self.conflicts += 1
                self.abort()
                continue
            except ServerException as e:
                if not exhausted_conflict_rounds(e):
                    raise
                self.exhausted += 1
                self.abort()
                continue
            self.acked += 1
            return

    def read(self):
        self.tm.begin()
        root = self.conn.root()
        total = root["total"]()
        if self.rng.random() < FULL_CHECK_SHARE:
            counters = sum(root["counters"][c]["n"] for c in range(self.clients))
            items = sum(v["v"] for v in root["items"].values())
            if not counters == total == items:
                self.error(f"inconsistent snapshot: counters {counters}, total {total}, items {items}")
            self.full_checks += 1
        else:
            for k in self.rng.sample(range(ITEMS), 3):
                len(root["items"][k]["data"])
            mine = root["counters"][self.cid]["n"]
            if mine != self.acked:
                self.error(f"own counter {mine} != {self.acked} acknowledged increments")
        if self.last_total is not None:
            if total < self.last_total:
                self.error(f"total went back from {self.last_total} to {total}")
            elif total - self.last_total > self.acked - self.acked_at_last:
                self.saw_others += 1
        self.last_total = total
        self.acked_at_last = self.acked
        self.reads += 1
        self.tm.abort()


def worker_main(host, port, first, count, clients, deadline, seed):
    """Entry point of a worker process: runs `count` clients, prints their figures."""
    addr = (host, int(port))
    threads = [SoakClient(addr, c, int(clients), float(deadline), int(seed))
               for c in range(int(first), int(first) + int(count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {"clients": {}}
    for t in threads:
        out["clients"][t.cid] = {k: getattr(t, k) for k in
                                 ("acked", "conflicts", "exhausted", "reads", "full_checks", "reconnects", "saw_others", "errors")}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(*sys.argv[2:])
        sys.exit(0)


# -- The test ------------------------------------------------------------------------------

from conftest import free_port, zeors_binary  # noqa: E402

SECONDS = float(os.environ.get("ZEORS_SOAK_SECONDS", "20"))
CLIENTS = int(os.environ.get("ZEORS_SOAK_CLIENTS", "50"))
PROCESSES = int(os.environ.get("ZEORS_SOAK_PROCESSES", "5"))
RSS_SLACK_MB = os.environ.get("ZEORS_SOAK_RSS_SLACK_MB")


ARENA_MB = 0.25


def rss_slack_mb(window_seconds, new_threads):
    """The growth of anonymous RSS allowed over a measured window (see the module docs),
    with `new_threads` more threads at the window's peak than at its start."""
    if RSS_SLACK_MB is not None:
        return float(RSS_SLACK_MB)
    return 1.0 + 4.0 * window_seconds / 1024 + ARENA_MB * max(0, new_threads)
THREAD_SLACK = 16
FD_SLACK = 3  # descriptors under load: a churning client may be between connections


def proc_stats(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0])
            elif key == "Threads":
                out[key] = int(value)
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    out["fds"] = len(fds)
    out["files"] = sorted(t for t in fds.values() if t.startswith("/"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = float(value)
    return values


def setup_data(addr):
    import ZODB
    from BTrees.IOBTree import IOBTree
    from BTrees.Length import Length
    from persistent.mapping import PersistentMapping
    from ZEO.ClientStorage import ClientStorage

    d = ZODB.DB(ClientStorage(addr, wait_timeout=30))
    with d.transaction("soak setup") as conn:
        root = conn.root()
        root["counters"] = IOBTree({c: PersistentMapping({"n": 0}) for c in range(CLIENTS)})
        root["items"] = IOBTree({k: PersistentMapping({"v": 0, "data": b""}) for k in range(ITEMS)})
        root["total"] = Length()
    d.close()


def read_totals(addr):
    """(per-client counters, total, sum of the items) as a fresh client sees them."""
    import ZODB
    from ZEO.ClientStorage import ClientStorage

    d = ZODB.DB(ClientStorage(addr, wait_timeout=30))
    try:
        with d.transaction() as conn:
            root = conn.root()
            counters = {c: root["counters"][c]["n"] for c in range(CLIENTS)}
            return counters, root["total"](), sum(v["v"] for v in root["items"].values())
    finally:
        d.close()


def pack(addr, seconds_ago):
    import ZODB
    from ZEO.ClientStorage import ClientStorage

    d = ZODB.DB(ClientStorage(addr, wait_timeout=30))
    try:
        # Pack to a few seconds ago: no reader's snapshot is that old, so nobody may
        # meet a revision packed away (that would be a ReadConflictError, and a bug).
        t0 = time.time()
        d.pack(t=time.time() - seconds_ago)
        return time.time() - t0
    finally:
        d.close()


class RawChurn(threading.Thread):
    """Connections dropped in every state, one every ~0.2 s."""

    def __init__(self, addr, deadline, seed):
        super().__init__(daemon=True)
        self.addr = addr
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.counts = {}
        self.errors = []

    def run(self):
        from rawzeo import Raw

        kinds = [self.bare, self.registered, self.mid_frame, self.voted, self.unread]
        while time.time() < self.deadline:
            kind = self.rng.choice(kinds)
            try:
                kind(Raw)
                self.counts[kind.__name__] = self.counts.get(kind.__name__, 0) + 1
            except Exception as e:
                if len(self.errors) < 20:
                    self.errors.append(f"raw {kind.__name__}: {e!r}")
            time.sleep(self.rng.uniform(0.1, 0.3))

    def drop(self, sock):
        if self.rng.random() < 0.5:  # an RST rather than a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def bare(self, Raw):
        s = socket.create_connection(self.addr, timeout=10)
        self.drop(s)

    def registered(self, Raw):
        r = Raw(self.addr)
        r.register()
        self.drop(r.sock)

    def mid_frame(self, Raw):
        r = Raw(self.addr)
        r.register()
        r.sock.sendall(struct.pack(">I", 1000) + b"\x80\x03(")
        self.drop(r.sock)

    def voted(self, Raw):
        """A transaction voted (holding the commit lock) by a client that then vanishes:
        the server must abort it, release the lock and leave nothing behind."""
        from persistent.mapping import PersistentMapping
        from zodbpickle import pickle

        r = Raw(self.addr)
        r.register()
        oid = r.call("new_oids", 1)[3][0]
        state = pickle.dumps(PersistentMapping, 3) + pickle.dumps({"data": {"orphan": 1}}, 3)
        r.send("tpc_begin", 1, b"", b"", {}, None, " ", oneway=True)
        r.send("storea", oid, b"\0" * 8, state, 1, oneway=True)
        r.call("vote", 1)
        self.drop(r.sock)

    def unread(self, Raw):
        from ZODB.utils import p64, z64

        r = Raw(self.addr)
        r.register()
        for _ in range(20):
            r.send("loadBefore", z64, p64(2**62))
        self.drop(r.sock)


def wait_until(cond, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return cond()


def soak(tmp_path, target, measured, pack_addr, variant):
    """Runs the load against `target` (clients, raw churn), packs through `pack_addr`,
    measures the `measured` servers ({name: Server}); returns the figures."""
    seed = int(os.environ.get("ZEORS_SEED", random.randrange(1 << 30)))
    setup_data(target.addr)
    # The idle baseline: every setup connection gone.
    time.sleep(1.0)
    idle = {name: proc_stats(s.proc.pid) for name, s in measured.items()}

    t_start = time.time()
    deadline = t_start + SECONDS
    procs = []
    per = -(-CLIENTS // PROCESSES)
    for first in range(0, CLIENTS, per):
        count = min(per, CLIENTS - first)
        err = open(tmp_path / f"worker-{first}.err", "wb")
        procs.append((subprocess.Popen(
            [sys.executable, __file__, "worker", target.addr[0], str(target.addr[1]), str(first), str(count),
             str(CLIENTS), repr(deadline), str(seed)],
            stdout=subprocess.PIPE, stderr=err, cwd=os.path.dirname(__file__)), err, first))
    churn = RawChurn(target.addr, deadline, seed)
    churn.start()

    samples = {name: [] for name in measured}
    stop_sampling = threading.Event()

    def sampler():
        while not stop_sampling.is_set():
            for name, s in measured.items():
                st = proc_stats(s.proc.pid)
                samples[name].append((round(time.time() - t_start, 1), st["VmRSS"], st["RssAnon"], st["fds"],
                                      st["Threads"]))
            stop_sampling.wait(1.0)

    threading.Thread(target=sampler, daemon=True).start()

    warmup = min(max(0.25 * SECONDS, 4.0), 60.0)
    n_packs = max(1, int(SECONDS // 150))
    pack_at = [t_start + SECONDS * (i + 1) / (n_packs + 1) for i in range(n_packs)]
    end_at = deadline - max(1.5, 0.02 * SECONDS)
    events = sorted([(t_start + warmup, "warm")] + [(t, "pack") for t in pack_at] + [(end_at, "end")])
    warm, end, pack_seconds = {}, {}, []
    for when, what in events:
        time.sleep(max(0.0, when - time.time()))
        if what == "warm":
            warm = {name: proc_stats(s.proc.pid) for name, s in measured.items()}
        elif what == "pack":
            pack_seconds.append(round(pack(pack_addr, 5.0), 2))
        else:
            end = {name: proc_stats(s.proc.pid) for name, s in measured.items()}

    results = {}
    worker_errors = []
    for p, err, first in procs:
        try:
            out, _ = p.communicate(timeout=max(0.0, deadline - time.time()) + 180)
        except subprocess.TimeoutExpired:
            for q, _, _ in procs:
                q.kill()
            raise AssertionError(f"worker {first} did not finish: a client hangs (its stderr: {err.name})")
        err.close()
        if p.returncode != 0 or not out.strip():
            worker_errors.append(f"worker {first} exited with {p.returncode}:\n"
                                 + (tmp_path / f"worker-{first}.err").read_text()[-3000:])
            continue
        results.update({int(c): r for c, r in json.loads(out.decode().strip().splitlines()[-1])["clients"].items()})
    churn.join(30)
    elapsed = time.time() - t_start
    stop_sampling.set()

    assert not worker_errors, "\n".join(worker_errors)
    assert sorted(results) == list(range(CLIENTS))
    errors = [e for r in results.values() for e in r["errors"]] + churn.errors

    # Every client gone: the descriptors return to what the idle server had.
    after = {}
    for name, s in measured.items():
        base = idle[name]["fds"]
        wait_until(lambda: proc_stats(s.proc.pid)["fds"] <= base, 30)
        after[name] = proc_stats(s.proc.pid)

    acked = sum(r["acked"] for r in results.values())
    totals = {name: read_totals(s.addr) for name, s in measured.items()}

    figures = {
        "test": f"soak-{variant}", "seed": seed, "seconds": round(elapsed, 1), "load_seconds": SECONDS,
        "clients": CLIENTS, "processes": len(procs),
        "acknowledged_commits": acked,
        "conflicts_retried": sum(r["conflicts"] for r in results.values()),
        "conflict_rounds_exhausted_retried": sum(r["exhausted"] for r in results.values()),
        "errors": len(errors),
        "read_transactions": sum(r["reads"] for r in results.values()),
        "snapshot_checks": sum(r["full_checks"] for r in results.values()),
        "reads_seeing_other_clients_commits": sum(r["saw_others"] for r in results.values()),
        "client_reconnects": sum(r["reconnects"] for r in results.values()),
        "raw_connections_dropped": churn.counts,
        "packs": len(pack_seconds), "pack_seconds": pack_seconds,
        "servers": {},
    }
    for name, s in measured.items():
        figures["servers"][name] = {
            "rss_kb": {"idle": idle[name]["VmRSS"], "warm": warm[name]["VmRSS"], "end": end[name]["VmRSS"],
                       "after": after[name]["VmRSS"], "peak": after[name]["VmHWM"]},
            "anon_kb": {"idle": idle[name]["RssAnon"], "warm": warm[name]["RssAnon"], "end": end[name]["RssAnon"],
                        "after": after[name]["RssAnon"]},
            "fds": {"idle": idle[name]["fds"], "warm": warm[name]["fds"], "end": end[name]["fds"],
                    "after": after[name]["fds"]},
            "threads": {"warm": warm[name]["Threads"], "end": end[name]["Threads"],
                        "peak": max([t[4] for t in samples[name] if t[0] >= warmup] or [0])},
            "cpu_seconds": round(after[name]["cpu_s"] - idle[name]["cpu_s"], 1),
            # One sample every ~10% of the run, to see the trend.
            "trend": samples[name][:: max(1, len(samples[name]) // 10)],
        }
    report(figures)

    assert not errors, f"{len(errors)} errors, first ones:\n" + "\n".join(errors[:10])
    # Consistency: everything acknowledged is there, exactly once.
    for name, (counters, total, items) in totals.items():
        assert total == acked, f"{name}: total {total} != {acked} acknowledged increments"
        assert items == acked, f"{name}: items count {items} increments, {acked} were acknowledged"
        for c, r in results.items():
            assert counters[c] == r["acked"], f"{name}: client {c}: counter {counters[c]} != {r['acked']} acknowledged"
    for name in measured:
        w, e, i, a = warm[name], end[name], idle[name], after[name]
        growth = (e["RssAnon"] - w["RssAnon"]) / 1024
        peak_threads = max([t[4] for t in samples[name] if t[0] >= warmup] or [w["Threads"]])
        slack = rss_slack_mb(end_at - (t_start + warmup), peak_threads - w["Threads"])
        assert growth < slack, (
            f"{name}: anonymous RSS grew {growth:.2f} MB (allowed {slack:.2f}) between the warm-up ({w['RssAnon']} kB) and the end "
            f"({e['RssAnon']} kB) under the same load; trend {samples[name][::max(1, len(samples[name]) // 20)]}")
        # Threads come and go with tokio's blocking pool; a pile of them means tasks queued
        # behind a lock each on a thread of their own (seen once: 51 threads in a proxy
        # whose cache stores waited on evictions), each leaving a malloc arena behind.
        assert e["Threads"] <= w["Threads"] + THREAD_SLACK, (
            f"{name}: {w['Threads']} threads after the warm-up, {e['Threads']} at the end")
        # A proxy keeps its cache's segment files open, one more each time the cache rolls
        # over to a new segment until eviction closes the oldest (bounded by the cache
        # size): those are not leaks.
        def seg_fds(st):
            return sum(1 for f in st["files"] if "/segments/" in f and f.endswith(".seg"))
        assert e["fds"] - seg_fds(e) <= w["fds"] - seg_fds(w) + FD_SLACK, (
            f"{name}: {w['fds']} descriptors after the warm-up, {e['fds']} at the end "
            f"(cache segments: {seg_fds(w)}, {seg_fds(e)})")
        segments = [f for f in set(a["files"]) - set(i["files"]) if "/segments/" in f and f.endswith(".seg")]
        assert a["fds"] <= i["fds"] + len(segments), (
            f"{name}: {i['fds']} descriptors idle before the load, {a['fds']} once every client left: "
            f"leaked {sorted(set(a['files']) - set(i['files']) - set(segments))}")
        assert len(a["files"]) <= len(i["files"]) + len(segments), (
            f"{name}: files open before {i['files']}, after {a['files']}")
    return figures


def report(record):
    out = os.environ.get("ZEORS_SOAK_OUT")
    print(json.dumps(record))
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def zeors_check(path):
    r = subprocess.run([zeors_binary(), "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"zeors check failed:\n{r.stdout}\n{r.stderr}"


def no_panics(server):
    log = server.log_text()
    assert "panicked" not in log, log[-4000:]


def test_soak(make_server, tmp_path):
    from test_compat import fstest

    mport = free_port()
    server = make_server("--metrics-address", f"127.0.0.1:{mport}")
    figures = soak(tmp_path, server, {"server": server}, server.addr, "server")
    m = scrape(mport)
    assert m["zeors_invalidations_sent_total"] > 0
    assert figures["reads_seeing_other_clients_commits"] > 0, "no client ever saw another's commit: invalidations?"
    assert figures["acknowledged_commits"] > 0.1 * CLIENTS * SECONDS, "too few commits to prove anything"
    report({"test": "soak-server-metrics", **{k: m.get(f"zeors_{k}_total") for k in
            ("loads", "commits", "conflicts", "aborts", "invalidations_sent", "connections_accepted")}})
    no_panics(server)
    assert server.stop() == 0
    zeors_check(server.path)
    fstest(server.path)


def test_soak_through_a_proxy(make_server, tmp_path):
    mport = free_port()
    upstream = make_server(path=tmp_path / "upstream.fs")
    # A small cache, so its bounded structures are full early and eviction runs under load.
    proxy = make_server.proxy(upstream.addr, "proxy", "--metrics-address", f"127.0.0.1:{mport}",
                              "--cache-size", "8MB", "--cache-index-memory", "1MB")
    figures = soak(tmp_path, proxy, {"proxy": proxy, "upstream": upstream}, upstream.addr, "proxy")
    m = scrape(mport)
    assert m["zeors_invalidations_sent_total"] > 0
    assert figures["reads_seeing_other_clients_commits"] > 0
    assert figures["acknowledged_commits"] > 0.1 * CLIENTS * SECONDS, "too few commits to prove anything"
    report({"test": "soak-proxy-metrics", **{k: m.get(f"zeors_{k}_total") for k in
            ("loads", "commits", "conflicts", "aborts", "invalidations_sent", "connections_accepted",
             "cache_hits", "cache_misses", "cache_evictions")},
            "cache_bytes": m.get("zeors_cache_bytes"), "cache_entries": m.get("zeors_cache_entries")})
    assert m["zeors_cache_bytes"] <= 8 << 20, "the proxy cache outgrew --cache-size"
    no_panics(proxy)
    no_panics(upstream)
    assert proxy.stop() == 0
    assert upstream.stop() == 0
    zeors_check(upstream.path)
