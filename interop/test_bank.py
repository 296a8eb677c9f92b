"""Crash consistency, in the spirit of Jepsen's bank test: nothing acknowledged is lost,
nothing unacknowledged is half-visible, across SIGKILLs at random moments.

Accounts are `PersistentMapping`s holding a balance. Client threads (real
`ZEO.ClientStorage` + `ZODB` connections) move random amounts between random accounts,
so concurrent transfers conflict; each transfer also writes an entry into the client's
own ledger (an `IOBTree` keyed by the client's attempt number) and bumps a shared
`BTrees.Length` counter, whose conflicts the clients resolve through the server. Each
client remembers every attempt and what it was told: *acknowledged* (`commit()`
returned), *failed* (a `ConflictError`: certainly not committed) or *unknown* (the
connection dropped somewhere in the two-phase commit).

The server is killed with SIGKILL (now and then stopped with SIGTERM instead, which
leaves an index the next crash makes stale) after a random stretch of this load,
sometimes only moments after it came back. How many rounds end each way is fixed (only
their order is drawn); some kills wait until a client is inside its commit, and the test
asserts that some transfers were cut in flight. Clients keep their connections and reconnect
by themselves. After every restart, with the clients paused, a fresh client checks:

- every acknowledged transfer is in its ledger (durability);
- no failed and no never-attempted transfer is (no phantom commits);
- each balance equals its initial amount plus the ledger's credits minus its debits, the
  total is unchanged, no balance is negative and the counter equals the number of ledger
  entries: an unacknowledged transaction is there completely or not at all (atomicity);
- the file passes `zeors check` (fstest's and fsrefs' checks) and, at the end, Python's
  own `fstest`, and Python's FileStorage reads the same state the server served.

The proxy variant runs the same load through a zeors proxy in front of a zeors upstream
and kills the proxy (every third round the upstream too). Besides the checks above,
made through both, every object's current revision read through the proxy, from its
persistent cache, must equal upstream's.

The normal suite runs a handful of crashes; `ZEORS_LONG=1` runs `ZEORS_BANK_CRASHES`
(default 60) of each kind. `ZEORS_RELIABILITY_OUT=FILE` appends the figures as JSON lines.
"""
import json
import os
import random
import signal
import subprocess
import threading
import time
import traceback

import pytest
import transaction
import ZODB
from BTrees.IOBTree import IOBTree
from BTrees.Length import Length
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError

from conftest import zeors_binary
from test_compat import fstest

LONG = bool(os.environ.get("ZEORS_LONG"))
CRASHES = int(os.environ.get("ZEORS_BANK_CRASHES", "60")) if LONG else 5
ACCOUNTS = 8
INITIAL = 1000
CLIENTS = 6

ACK, FAILED, UNKNOWN = "ack", "failed", "unknown"


def report(record):
    out = os.environ.get("ZEORS_RELIABILITY_OUT")
    print(json.dumps(record))
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")


def setup_bank(addr):
    d = ZODB.DB(ClientStorage(addr, wait_timeout=30))
    with d.transaction("bank setup") as conn:
        root = conn.root()
        for a in range(ACCOUNTS):
            root[f"account{a}"] = PersistentMapping({"balance": INITIAL})
        for c in range(CLIENTS):
            root[f"ledger{c}"] = IOBTree()
        root["count"] = Length()
    d.close()


class Client(threading.Thread):
    """One bank client: a ZODB connection doing transfers until told to stop, parking
    whenever the test pauses the load."""

    def __init__(self, bank, cid):
        super().__init__(daemon=True)
        self.bank = bank
        self.cid = cid
        self.rng = random.Random(cid * 7919 + bank.seed)
        self.seq = 0
        self.outcome = {}  # attempt -> ACK | FAILED | UNKNOWN
        # The attempt inside `tm.commit()` right now, if any: what a mid-commit kill waits for.
        self.committing = None
        self.idle = threading.Event()
        # Set once its database is open (or it failed): the first kill must not land
        # inside `ZODB.DB()`, whose first load is not retried by ZODB on a disconnect.
        self.opened = threading.Event()
        self.error = None

    def run(self):
        try:
            # A client may have a server of its own (a replica's clients, in
            # test_replication.py); by default the bank picks one.
            addr = getattr(self, "addr", None) or self.bank.addr_for(self.cid)
            d = ZODB.DB(ClientStorage(addr, wait_timeout=60), cache_size=1000)
            tm = transaction.TransactionManager()
            conn = d.open(tm)
            self.opened.set()
            while not self.bank.stop.is_set():
                if not self.bank.running.is_set():
                    self.idle.set()
                    self.bank.running.wait()
                    self.idle.clear()
                    continue
                self.transfer(tm, conn)
            d.close()
        except BaseException as e:  # surfaces in the test through `check_clients`
            self.error = f"{e!r}\n{traceback.format_exc()}"
            self.idle.set()
            self.opened.set()

    def transfer(self, tm, conn):
        src, dst = self.rng.sample(range(ACCOUNTS), 2)
        amount = self.rng.randint(1, 40)
        self.seq += 1
        seq = self.seq
        try:
            tm.begin()
            root = conn.root()
            a, b = root[f"account{src}"], root[f"account{dst}"]
            if a["balance"] < amount:
                tm.abort()
                return
            a["balance"] -= amount
            b["balance"] += amount
            root[f"ledger{self.cid}"][seq] = (src, dst, amount)
            root["count"].change(1)
            self.outcome[seq] = UNKNOWN
            self.committing = seq
            try:
                tm.commit()
            finally:
                self.committing = None
            self.outcome[seq] = ACK
        except ConflictError:
            if seq in self.outcome:
                self.outcome[seq] = FAILED
            self._abort(tm)
        except Exception:
            # Disconnected somewhere in the commit: the outcome stays unknown.
            self._abort(tm)
            time.sleep(0.05)

    @staticmethod
    def _abort(tm):
        try:
            tm.abort()
        except Exception:
            pass


class Bank:
    def __init__(self, addr, seed):
        # One server address, or a list: client `c` then uses `addr[c % len(addr)]`
        # (several servers on one database, test_pg_bank.py).
        self.addrs = addr if isinstance(addr, list) else [addr]
        self.addr = self.addrs[0]
        self.seed = seed
        self.stop = threading.Event()
        self.running = threading.Event()
        self.running.set()
        self.clients = [Client(self, c) for c in range(CLIENTS)]

    def addr_for(self, cid):
        return self.addrs[cid % len(self.addrs)]

    def start(self):
        for c in self.clients:
            c.start()
        for c in self.clients:
            assert c.opened.wait(60), f"client {c.cid} did not open its database"
        self.check_clients()

    def pause(self, timeout=120):
        """Stops new transfers and waits until every client is idle."""
        self.running.clear()
        deadline = time.time() + timeout
        for c in self.clients:
            assert c.idle.wait(max(0.0, deadline - time.time())), f"client {c.cid} did not park"
        self.check_clients()

    def resume(self):
        self.running.set()

    def finish(self):
        self.stop.set()
        self.running.set()
        for c in self.clients:
            c.join(90)
        self.check_clients()

    def check_clients(self):
        for c in self.clients:
            assert c.error is None, f"client {c.cid} crashed: {c.error}"

    def run_until_acknowledged(self, n, timeout=180):
        """Keeps the load going until `n` transfers are acknowledged in all, so that the
        final checks always have enough commits behind them, however short the drawn
        rounds were; fails only if the clients stop making progress."""
        self.resume()
        deadline = time.time() + timeout
        while self.counts()[ACK] < n:
            self.check_clients()
            assert time.time() < deadline, f"only {self.counts()[ACK]} of {n} transfers acknowledged in {timeout} s"
            time.sleep(0.1)

    def in_commit(self):
        """[(client, attempt)] of the transfers inside `tm.commit()` at this moment."""
        return [(c.cid, seq) for c in self.clients if (seq := c.committing) is not None]

    def counts(self):
        out = {ACK: 0, FAILED: 0, UNKNOWN: 0}
        for c in self.clients:
            for v in c.outcome.values():
                out[v] += 1
        return out


def read_state(storage):
    """(balances, ledgers, count) as a fresh connection on `storage` sees them."""
    d = ZODB.DB(storage)
    try:
        with d.transaction() as conn:
            root = conn.root()
            balances = [root[f"account{a}"]["balance"] for a in range(ACCOUNTS)]
            ledgers = [dict(root[f"ledger{c}"].items()) for c in range(CLIENTS)]
            count = root["count"]()
    finally:
        d.close()
    return balances, ledgers, count


def check_state(bank, state, where):
    """The bank invariants for `state`; returns the number of acknowledged transfers."""
    balances, ledgers, count = state
    expected = [INITIAL] * ACCOUNTS
    entries = 0
    acked = 0
    for client, ledger in zip(bank.clients, ledgers):
        for seq, outcome in client.outcome.items():
            if outcome == ACK:
                acked += 1
                assert seq in ledger, f"{where}: acknowledged transfer {client.cid}/{seq} lost"
        for seq, (src, dst, amount) in ledger.items():
            told = client.outcome.get(seq)
            assert told in (ACK, UNKNOWN), f"{where}: transfer {client.cid}/{seq} committed but the client was told {told}"
            expected[src] -= amount
            expected[dst] += amount
            entries += 1
    assert sum(balances) == INITIAL * ACCOUNTS, f"{where}: total {sum(balances)}: money created or destroyed"
    assert min(balances) >= 0, f"{where}: negative balance {balances}"
    assert balances == expected, f"{where}: balances {balances} disagree with the ledgers {expected}: a partial transaction"
    assert count == entries, f"{where}: counter {count} != {entries} ledger entries"
    return acked


def zeors_check(path):
    r = subprocess.run([zeors_binary(), "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"zeors check failed:\n{r.stdout}\n{r.stderr}"


STOP, KILL, KILL_MID_COMMIT = "stop", "kill", "kill mid-commit"


def crash_schedule(rng, rounds):
    """How each round ends, fixed by construction (only the order is drawn): about 15%
    clean stops (SIGTERM, at least one), and of the SIGKILLs half wait for a commit in
    flight (at least one), so that every run exercises all three and the assertions on
    their counts cannot fail by chance."""
    stops = max(1, round(rounds * 0.15))
    mid = max(1, (rounds - stops) // 2)
    kinds = [STOP] * stops + [KILL_MID_COMMIT] * mid + [KILL] * (rounds - stops - mid)
    rng.shuffle(kinds)
    return kinds


def kill_mid_commit(server, bank, rng, timeout=60):
    """SIGKILLs `server` while a client is inside `tm.commit()` waiting on it: the server
    is frozen (SIGSTOP) the moment some client is committing, and killed only if after a
    pause some client is still inside its commit, which then cannot have completed. Returns
    the attempts that were in flight."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not bank.in_commit():
            time.sleep(0.002)
            continue
        server.proc.send_signal(signal.SIGSTOP)
        # Long enough for the clients to consume any reply already in their sockets.
        time.sleep(0.3)
        inflight = bank.in_commit()
        if inflight:
            server.kill()
            return inflight
        server.proc.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.02, 0.2))
    raise AssertionError(f"no commit was in flight within {timeout} s: the clients are stuck")


def end_round(kind, server, bank, rng, stats):
    if kind == STOP:
        assert server.stop(signal.SIGTERM) == 0
        stats["clean_stops"] += 1
    elif kind == KILL:
        server.kill()
        stats["crashes"] += 1
    else:
        stats["inflight_at_kill"] += len(kill_mid_commit(server, bank, rng))
        stats["crashes"] += 1
        stats["mid_commit_crashes"] += 1


def check_schedule(stats, schedule, counts):
    """The rounds ended as scheduled, and the mid-commit kills did cut commits: some
    transfers ended with their outcome unknown to the client."""
    assert stats["clean_stops"] == schedule.count(STOP)
    assert stats["crashes"] == schedule.count(KILL) + schedule.count(KILL_MID_COMMIT)
    assert stats["mid_commit_crashes"] == schedule.count(KILL_MID_COMMIT) >= 1
    assert counts[UNKNOWN] >= 1, "no kill interrupted a commit: the mid-commit kills did not do their job"


def run_rounds(bank, rng, rounds, crash, verify):
    """`rounds` times: load for a random while, `crash`, restart, pause, `verify`."""
    for r in range(rounds):
        # Most kills land in the thick of the load; some right after a restart, while
        # clients reconnect and the first commits go through.
        time.sleep(rng.uniform(0.0, 0.15) if rng.random() < 0.15 else rng.uniform(0.3, 2.0))
        crash(r)
        bank.pause()
        verify(r)
        bank.resume()


def test_bank_survives_sigkill(make_server, tmp_path):
    seed = int(os.environ.get("ZEORS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    server = make_server()
    setup_bank(server.addr)
    bank = Bank(server.addr, seed)
    stats = {"crashes": 0, "clean_stops": 0, "mid_commit_crashes": 0, "inflight_at_kill": 0, "checks": 0}
    schedule = crash_schedule(rng, CRASHES)
    t0 = time.time()

    def crash(r):
        end_round(schedule[r], server, bank, rng, stats)
        server.start()

    def verify(r):
        state = read_state(ClientStorage(server.addr, wait_timeout=30))
        check_state(bank, state, f"round {r} (seed {seed})")
        zeors_check(server.path)
        stats["checks"] += 1

    bank.start()
    try:
        run_rounds(bank, rng, CRASHES, crash, verify)
        bank.run_until_acknowledged(10 * CRASHES + 1)
    finally:
        bank.finish()
    state = read_state(ClientStorage(server.addr, wait_timeout=30))
    acked = check_state(bank, state, "final")
    server.stop()
    # Python's FileStorage reads the same state from the file, and its checker agrees.
    assert read_state(FileStorage(str(server.path), read_only=True)) == state
    fstest(server.path)
    counts = bank.counts()
    report({"test": "bank", "seed": seed, **stats, "acknowledged": acked, "unknown": counts[UNKNOWN],
            "failed_conflicts": counts[FAILED], "committed": state[2], "lost": 0,
            "seconds": round(time.time() - t0, 1)})
    check_schedule(stats, schedule, counts)


def current_revisions(storage):
    """{oid: (data, tid)} for every object, by walking `record_iternext`."""
    out = {}
    nxt = None
    while True:
        oid, tid, data, nxt = storage.record_iternext(nxt)
        out[oid] = (data, tid)
        if nxt is None:
            return out


def test_bank_through_a_proxy_killed_mid_commit(make_server, tmp_path):
    seed = int(os.environ.get("ZEORS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    upstream = make_server(path=tmp_path / "upstream.fs")
    proxy = make_server.proxy(upstream.addr)
    setup_bank(proxy.addr)
    bank = Bank(proxy.addr, seed)
    stats = {"crashes": 0, "clean_stops": 0, "mid_commit_crashes": 0, "inflight_at_kill": 0,
             "upstream_crashes": 0, "checks": 0, "objects_compared": 0}
    schedule = crash_schedule(rng, CRASHES)
    t0 = time.time()

    def crash(r):
        end_round(schedule[r], proxy, bank, rng, stats)
        if r % 3 == 2:
            upstream.kill()
            stats["upstream_crashes"] += 1
            upstream.start()
        proxy.start()

    def verify(r):
        where = f"round {r} (seed {seed})"
        up = read_state(ClientStorage(upstream.addr, wait_timeout=30))
        check_state(bank, up, where + " upstream")
        via_proxy = read_state(ClientStorage(proxy.addr, wait_timeout=30))
        assert via_proxy == up, f"{where}: the proxy serves a different state than upstream"
        # Every current revision, as the proxy serves it (from its cache where it has
        # one), equals upstream's.
        s_up = ClientStorage(upstream.addr, wait_timeout=30)
        s_px = ClientStorage(proxy.addr, wait_timeout=30)
        try:
            want = current_revisions(s_up)
            for oid, (data, tid) in want.items():
                assert s_px.load(oid) == (data, tid), f"{where}: proxy and upstream disagree on oid {oid!r}"
            stats["objects_compared"] += len(want)
        finally:
            s_up.close()
            s_px.close()
        zeors_check(upstream.path)
        stats["checks"] += 1

    bank.start()
    try:
        run_rounds(bank, rng, CRASHES, crash, verify)
        bank.run_until_acknowledged(5 * CRASHES + 1)
    finally:
        bank.finish()
    state = read_state(ClientStorage(upstream.addr, wait_timeout=30))
    acked = check_state(bank, state, "final")
    proxy.stop()
    upstream.stop()
    fstest(upstream.path)
    counts = bank.counts()
    report({"test": "bank-proxy", "seed": seed, **stats, "acknowledged": acked, "unknown": counts[UNKNOWN],
            "failed_conflicts": counts[FAILED], "committed": state[2], "lost": 0,
            "seconds": round(time.time() - t0, 1)})
    check_schedule(stats, schedule, counts)


# Regressions for the two proxy bugs the bank test found. Both lost or corrupted
# acknowledged money: the proxy cached a conflicting transaction's unresolved state as
# current, so clients computed on a wrong counter and upstream got a lost update; and a
# conflict left the transaction open on the proxy's single upstream connection, so the
# next client's commit made upstream drop that connection.


def test_proxy_caches_the_resolved_state_after_a_conflict(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    proxy = make_server.proxy(upstream.addr)
    d0 = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
    with d0.transaction() as conn:
        conn.root()["count"] = Length()
    d0.close()
    d1 = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
    d2 = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = d1.open(tm1), d2.open(tm2)
    assert c1.root()["count"]() == 0 and c2.root()["count"]() == 0
    c1.root()["count"].change(1)
    tm1.commit()
    # c2 still has the old revision: its vote conflicts, ZEO resolves (Length adds the
    # increments) and votes again with the resolved state.
    c2.root()["count"].change(1)
    tm2.commit()
    d1.close()
    d2.close()
    for server in (upstream, proxy):
        d = ZODB.DB(ClientStorage(server.addr, wait_timeout=30))
        with d.transaction() as conn:
            assert conn.root()["count"]() == 2, f"via {server.port}"
        d.close()


def test_a_commit_through_the_proxy_waits_while_another_client_resolves_a_conflict(make_server, tmp_path):
    """A transaction keeps the commit lock through its conflict rounds, end to end
    through the proxy: another client's commit waits until the resolving one finishes
    (rather than committing in between and making its second vote conflict again), then
    goes through; nothing is lost on either side."""
    from rawzeo import Raw
    from zodbpickle import pickle

    upstream = make_server(path=tmp_path / "upstream.fs")
    proxy = make_server.proxy(upstream.addr)
    d = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
    with d.transaction() as conn:
        conn.root()["m"] = PersistentMapping({"v": 0})
    oid = d.open().root()["m"]._p_oid
    d.close()
    d = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
    stale = d.storage.load(oid)[1]
    with d.transaction() as conn:
        conn.root()["m"]["v"] = 1
    current = d.storage.load(oid)[1]
    state = pickle.dumps(PersistentMapping, 3) + pickle.dumps({"data": {"v": 2}}, 3)
    raw = Raw(proxy.addr)
    raw.register()
    raw.send("tpc_begin", 1, b"", b"", {}, None, " ", oneway=True)
    raw.send("storea", oid, stale, state, 1, oneway=True)
    conflicts = raw.call("vote", 1)[3]
    assert [c["oid"] for c in conflicts] == [oid]
    assert conflicts[0]["serials"] == (current, stale)
    # While that client "resolves", another one commits through the proxy: it waits.
    other_done = threading.Event()
    errors = []

    def other():
        try:
            with d.transaction() as conn:
                conn.root()["other"] = 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))
        other_done.set()

    t = threading.Thread(target=other, daemon=True)
    t.start()
    assert not other_done.wait(1.5), "a commit went through while another transaction held the lock"
    # The resolution is stored on the serial the conflict named: nothing committed since.
    raw.send("storea", oid, current, state, 1, oneway=True)
    assert raw.call("vote", 1)[3] == []
    assert raw.call("tpc_finish", 1)[1] == 0
    raw.close()
    assert other_done.wait(30), "the waiting commit never went through"
    t.join(5)
    assert errors == []
    d.close()
    assert "lost" not in proxy.log_text()
    du = ZODB.DB(ClientStorage(upstream.addr, wait_timeout=30))
    with du.transaction() as conn:
        assert conn.root()["m"]["v"] == 2 and conn.root()["other"] == 1
    du.close()


def test_an_object_committed_through_the_proxy_and_not_cached_can_be_loaded(make_server, tmp_path):
    """Found by test_disk_faults (a proxy whose cache disk is full): an object whose last
    change was committed through the proxy, and which the cache could not keep (here:
    bigger than a 1 MB cache takes), was refused as overtaken on every fetch, and its
    load spun until someone else committed upstream."""
    upstream = make_server(path=tmp_path / "upstream.fs")
    proxy = make_server.proxy(upstream.addr, "proxy", "--cache-size", "1MB")
    d = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
    with d.transaction() as conn:
        conn.root()["big"] = PersistentMapping({"v": b"x" * 400_000})
    d.close()
    got = []

    def load():
        dd = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
        with dd.transaction() as conn:
            got.append(len(conn.root()["big"]["v"]))
        dd.close()

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(30)
    assert got == [400_000], "the load through the proxy did not complete"
