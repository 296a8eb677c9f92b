"""Replication (zc.zrs's protocol) with the real binary, real clients and zc.zrs itself.

- The bank test (test_bank.py's clients and checks) on a primary and a replica whose
  clients forward their commits to the primary, with SIGKILLs of the replica and of the
  primary (some while a client is inside its commit): after every crash the replica's
  Data.fs equals the primary's up to its last transaction, byte for byte, both pass
  `zeors check` and at the end Python's `fstest`, and no acknowledged transfer is lost.
- Promotion under load: the primary stops, the replica is promoted with
  `zeors promote`, the clients go on against it, no acknowledged commit is lost, and the
  old primary comes back as a replica of the new one.
- An old primary holding transactions the new one lacks is refused, with the tids.
- A chain of three; read-only clients of a replica; `server_status` and metrics.
- zc.zrs from PyPI (its own virtualenv, scripts/venv-zrs.sh) both ways: a zc.zrs primary
  feeding a zeors replica, a zeors primary feeding a zc.zrs secondary.
"""
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import ZODB
import ZODB.blob
from ZEO.ClientStorage import ClientStorage
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadOnlyError

from conftest import ROOT, Server, free_port, zeors_binary
from test_bank import (
    ACK,
    CLIENTS,
    CRASHES,
    KILL,
    KILL_MID_COMMIT,
    STOP,
    UNKNOWN,
    Bank,
    check_state,
    crash_schedule,
    read_state,
    report,
    setup_bank,
    zeors_check,
)
from test_compat import fstest


def status(addr):
    s = ClientStorage(addr, read_only=True, wait_timeout=30)
    try:
        return s.server_status()
    finally:
        s.close()


def last_tid(addr):
    return status(addr)["last-transaction"]


def wait_caught_up(replica, primary, timeout=60):
    deadline = time.time() + timeout
    while True:
        want = last_tid(primary.addr)
        got = last_tid(replica.addr)
        if got == want:
            return want
        assert time.time() < deadline, f"replica at {got}, primary at {want}"
        time.sleep(0.05)


def assert_prefix(replica_path, primary_path):
    """The replica's Data.fs is the primary's up to its end, byte for byte."""
    r = pathlib.Path(replica_path).read_bytes()
    p = pathlib.Path(primary_path).read_bytes()
    assert len(r) > 4
    assert len(r) <= len(p), "the replica's file is longer than the primary's"
    if r != p[: len(r)]:
        at = next(i for i in range(len(r)) if r[i] != p[i])
        raise AssertionError(f"the replica's Data.fs differs from the primary's at offset {at}")


def blobs(path):
    """{relative path: content} of the blob files under `path`."""
    root = pathlib.Path(path)
    return {
        str(f.relative_to(root)): f.read_bytes()
        for f in root.rglob("*.blob")
        if "tmp" not in f.relative_to(root).parts
    }


def records(path):
    """Every transaction and record of a Data.fs, as Python's iterator reports them."""
    fs = FileStorage(str(path), read_only=True)
    try:
        return [
            (t.tid, t.status, t.user, t.description, t.extension,
             [(r.oid, r.tid, r.data, r.data_txn) for r in t])
            for t in fs.iterator()
        ]
    finally:
        fs.close()


def replicate_to(port):
    return ("--replicate-to", f"127.0.0.1:{port}")


def replicate_from(port):
    return ("--replicate-from", f"127.0.0.1:{port}")


def kill_mid_commit_of(server, clients, rng, timeout=60):
    """test_bank's mid-commit kill, for the commits of `clients` only (those talking to
    `server`): freeze it while one of them is inside its commit, kill it if after a
    pause one still is."""
    def inflight():
        return [(c.cid, s) for c in clients if (s := c.committing) is not None]

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not inflight():
            time.sleep(0.002)
            continue
        server.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        cut = inflight()
        if cut:
            server.kill()
            return cut
        server.proc.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.02, 0.2))
    raise AssertionError(f"no commit was in flight within {timeout} s")


def acked_by(clients):
    return sum(1 for c in clients for v in list(c.outcome.values()) if v == ACK)


def test_bank_with_a_replica_forwarding_writes_survives_sigkills(make_server, tmp_path):
    seed = int(os.environ.get("ZEORS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    rport = free_port()
    primary = make_server(*replicate_to(rport), path=tmp_path / "primary.fs")
    replica = make_server(*replicate_from(rport), "--forward-writes", f"127.0.0.1:{primary.port}",
                          path=tmp_path / "replica.fs")
    setup_bank(primary.addr)
    wait_caught_up(replica, primary)
    bank = Bank(primary.addr, seed)
    on_replica = bank.clients[CLIENTS // 2:]
    for c in on_replica:
        c.addr = replica.addr
    on_primary = bank.clients[: CLIENTS // 2]
    # Which server each round kills, and how: both servers, each way, at least once.
    rounds = max(CRASHES, 6)
    kinds = crash_schedule(rng, rounds)
    targets = ["replica", "primary"] * (rounds // 2) + ["replica"] * (rounds % 2)
    rng.shuffle(targets)
    for kind in (KILL, KILL_MID_COMMIT):
        for target in ("replica", "primary"):
            if not any(k == kind and t == target for k, t in zip(kinds, targets)):
                i = next(i for i, k in enumerate(kinds) if k == kind)
                targets[i] = target
    stats = {"primary_kills": 0, "replica_kills": 0, "mid_commit_kills": 0, "clean_stops": 0,
             "checks": 0, "bytes_compared": 0}
    t0 = time.time()
    bank.start()
    try:
        for r in range(rounds):
            time.sleep(rng.uniform(0.3, 2.0))
            server = primary if targets[r] == "primary" else replica
            clients = on_primary if server is primary else on_replica
            if kinds[r] == STOP:
                assert server.stop(signal.SIGTERM) == 0
                stats["clean_stops"] += 1
            elif kinds[r] == KILL:
                server.kill()
                stats[f"{targets[r]}_kills"] += 1
            else:
                kill_mid_commit_of(server, clients, rng)
                stats[f"{targets[r]}_kills"] += 1
                stats["mid_commit_kills"] += 1
            server.start()
            bank.pause()
            where = f"round {r} ({kinds[r]} {targets[r]}, seed {seed})"
            wait_caught_up(replica, primary)
            state = read_state(ClientStorage(primary.addr, wait_timeout=30))
            check_state(bank, state, where + " primary")
            assert read_state(ClientStorage(replica.addr, read_only=True, wait_timeout=30)) == state, where
            assert_prefix(replica.path, primary.path)
            stats["bytes_compared"] += replica.path.stat().st_size
            zeors_check(replica.path)
            zeors_check(primary.path)
            stats["checks"] += 1
            bank.resume()
        bank.run_until_acknowledged(10 * rounds + 1)
        # The replica's clients read what the replica has applied, a little behind the
        # primary, so under this contention most of their transfers conflict; go on until
        # enough of them went through (this fails only if they stop making progress).
        deadline = time.time() + 180
        while acked_by(on_replica) < 20:
            bank.check_clients()
            assert time.time() < deadline, f"only {acked_by(on_replica)} transfers through the replica"
            time.sleep(0.1)
    finally:
        bank.finish()
    wait_caught_up(replica, primary)
    state = read_state(ClientStorage(primary.addr, wait_timeout=30))
    acked = check_state(bank, state, "final")
    replica.stop()
    primary.stop()
    assert replica.path.read_bytes() == primary.path.read_bytes()
    assert read_state(FileStorage(str(replica.path), read_only=True)) == state
    fstest(replica.path)
    fstest(primary.path)
    counts = bank.counts()
    on_replica_acked = acked_by(on_replica)
    report({"test": "bank-replication", "seed": seed, **stats, "acknowledged": acked,
            "acknowledged_through_replica": on_replica_acked, "unknown": counts[UNKNOWN],
            "committed": state[2], "lost": 0, "seconds": round(time.time() - t0, 1)})
    assert stats["mid_commit_kills"] >= 2 and stats["primary_kills"] >= 2 and stats["replica_kills"] >= 2
    assert on_replica_acked >= 20
    assert counts[UNKNOWN] >= 1, "no kill interrupted a commit"


def promote(server, pid_file):
    r = subprocess.run([zeors_binary(), "promote", "--pid-file", str(pid_file), "--address",
                        f"127.0.0.1:{server.port}", "--timeout", "60"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promotion_under_load_loses_no_acknowledged_commit(make_server, tmp_path):
    seed = int(os.environ.get("ZEORS_SEED", random.randrange(1 << 30)))
    rport, rport2 = free_port(), free_port()
    primary = make_server(*replicate_to(rport), path=tmp_path / "primary.fs")
    pid_file = tmp_path / "replica.pid"
    replica = make_server(*replicate_from(rport), *replicate_to(rport2), "--forward-writes",
                          f"127.0.0.1:{primary.port}", "--pid-file", str(pid_file), path=tmp_path / "replica.fs")
    setup_bank(primary.addr)
    wait_caught_up(replica, primary)
    bank = Bank(primary.addr, seed)
    for c in bank.clients:
        # Clients of the primary fail over to the replica (ZEO tries the addresses in turn).
        c.addr = [primary.addr, replica.addr] if c.cid % 2 == 0 else replica.addr
    bank.start()
    try:
        bank.run_until_acknowledged(30)
        # Switch-over under load: the primary stops (its commits in progress complete and
        # reach the replica before it exits), the replica takes over.
        assert primary.stop(signal.SIGTERM) == 0
        before = bank.counts()[ACK]
        promote(replica, pid_file)
        assert status(replica.addr)["role"] == "primary"
        bank.run_until_acknowledged(before + 30)
        bank.pause()
        state = read_state(ClientStorage(replica.addr, wait_timeout=30))
        acked = check_state(bank, state, f"after promotion (seed {seed})")
        # The old primary comes back as a replica of the new one: its history is a prefix
        # of the new primary's, so it is accepted and catches up.
        old = Server(primary.path, *replicate_from(rport2), port=primary.port).start()
        try:
            wait_caught_up(old, replica)
            assert status(old.addr)["role"] == "replica"
            assert_prefix(old.path, replica.path)
            bank.resume()
            bank.run_until_acknowledged(bank.counts()[ACK] + 20)
            bank.pause()
            wait_caught_up(old, replica)
            state = read_state(ClientStorage(replica.addr, wait_timeout=30))
            acked = check_state(bank, state, f"final (seed {seed})")
            assert read_state(ClientStorage(old.addr, read_only=True, wait_timeout=30)) == state
        finally:
            assert old.stop() == 0
    finally:
        bank.finish()
    assert_prefix(primary.path, replica.path)
    report({"test": "promotion", "seed": seed, "acknowledged": acked, "lost": 0})


def test_an_old_primary_with_transactions_the_new_one_lacks_is_refused(make_server, tmp_path):
    rport, rport2 = free_port(), free_port()
    primary = make_server(*replicate_to(rport), path=tmp_path / "primary.fs")
    replica = make_server(*replicate_from(rport), path=tmp_path / "replica.fs")
    d = ZODB.DB(ClientStorage(primary.addr, wait_timeout=30))
    with d.transaction() as conn:
        conn.root()["x"] = 0
    wait_caught_up(replica, primary)
    assert replica.stop() == 0
    # The primary commits two transactions the replica never receives...
    lost = []
    for i in (1, 2):
        with d.transaction() as conn:
            conn.root()["x"] = i
        lost.append(d.storage.lastTransaction())
    d.close()
    assert primary.stop() == 0
    # ...the replica becomes a primary of its own and commits...
    new = Server(replica.path, *replicate_to(rport2), port=replica.port).start()
    d = ZODB.DB(ClientStorage(new.addr, wait_timeout=30))
    with d.transaction() as conn:
        conn.root()["x"] = 10
    d.close()
    # ...and the old primary may not follow it.
    before = primary.path.read_bytes()
    old = Server(primary.path, *replicate_from(rport2), port=primary.port).start()
    try:
        deadline = time.time() + 30
        while status(old.addr).get("replication") != "diverged":
            assert time.time() < deadline, status(old.addr)
            time.sleep(0.05)
        error = status(old.addr)["replication-error"]
        for tid in lost:
            assert "0x" + tid.hex() in error, error
        assert "the replica holds 2 transaction(s) this primary does not" in error, error
        assert "refuses this replica's history" in old.log_text()
        assert primary.path.read_bytes() == before
        # It still serves what it has, read-only.
        d = ZODB.DB(ClientStorage(old.addr, read_only=True, wait_timeout=30))
        with d.transaction() as conn:
            assert conn.root()["x"] == 2
        d.close()
    finally:
        assert old.stop() == 0
        assert new.stop() == 0


def test_a_chain_of_three_with_read_only_clients(make_server, tmp_path):
    p1, p2 = free_port(), free_port()
    primary = make_server(*replicate_to(p1), "--blob-dir", str(tmp_path / "primary.blobs"),
                          path=tmp_path / "primary.fs")
    middle = make_server(*replicate_from(p1), *replicate_to(p2), "--blob-dir", str(tmp_path / "middle.blobs"),
                         path=tmp_path / "middle.fs")
    last = make_server(*replicate_from(p2), "--keep-alive-delay", "1", "--blob-dir",
                       str(tmp_path / "last.blobs"), "--metrics-address", f"127.0.0.1:{free_port()}",
                       path=tmp_path / "last.fs")
    d = ZODB.DB(ClientStorage(primary.addr, wait_timeout=30, blob_dir=str(tmp_path / "client-blobs")))
    for i in range(20):
        with d.transaction(f"t{i}") as conn:
            conn.root()["n"] = i
            if i % 5 == 0:
                conn.root()[f"blob{i}"] = ZODB.blob.Blob(os.urandom(150_000))
    wait_caught_up(last, primary)
    assert_prefix(middle.path, primary.path)
    assert_prefix(last.path, primary.path)
    assert blobs(tmp_path / "last.blobs") == blobs(tmp_path / "primary.blobs")
    # A replica's clients read, get invalidations as transactions arrive, cannot commit.
    dr = ZODB.DB(ClientStorage(last.addr, read_only=True, wait_timeout=30,
                               blob_dir=str(tmp_path / "replica-client-blobs")))
    conn = dr.open()
    assert conn.root()["n"] == 19
    with conn.root()["blob15"].open() as f:
        assert len(f.read()) == 150_000
    with d.transaction() as c:
        c.root()["n"] = 100
    deadline = time.time() + 30
    while True:
        conn.transaction_manager.begin()
        if conn.root()["n"] == 100:
            break
        assert time.time() < deadline
        time.sleep(0.05)
    conn.root()["n"] = 5
    with pytest.raises(ReadOnlyError):
        conn.transaction_manager.commit()
    conn.transaction_manager.abort()
    conn.close()
    dr.close()
    with pytest.raises(Exception):
        # A writable registration is refused by a replica without --forward-writes.
        ClientStorage(last.addr, wait_timeout=2)
    st = status(last.addr)
    assert st["role"] == "replica" and st["replication"] == "following"
    assert st["replication-lag-transactions"] == "0"
    assert status(middle.addr)["replicas"] == "1"
    assert status(primary.addr)["role"] == "primary"
    metrics_port = last.extra[last.extra.index("--metrics-address") + 1].rsplit(":", 1)[1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for name in ("replication_lag_transactions", "replication_lag_seconds", "replication_received_bytes",
                 "replication_reconnects", "replication_applied_transactions"):
        assert f"zeors_{name}" in text, name
    d.close()


def test_a_replication_socket_is_never_taken_from_a_running_primary(make_server, tmp_path):
    """`--replicate-to` a unix socket: a second server given the same path is refused
    ("address already in use") and the first keeps feeding its replica; a socket left by a
    killed primary is replaced when it restarts."""
    sock = tmp_path / "replication.sock"
    primary = make_server("--replicate-to", str(sock), path=tmp_path / "primary.fs")
    replica = make_server("--replicate-from", str(sock), path=tmp_path / "replica.fs")
    d = ZODB.DB(ClientStorage(primary.addr, wait_timeout=30))

    def commit(n):
        with d.transaction() as conn:
            conn.root()["n"] = n
        wait_caught_up(replica, primary)

    commit(1)
    second = Server(tmp_path / "second.fs", "--replicate-to", str(sock))
    r = subprocess.run(second.command(), capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "address already in use" in out, out
    assert sock.is_socket()
    commit(2)
    d.close()
    primary.kill()
    assert sock.is_socket(), "the killed primary's socket is left behind"
    primary.start()
    d = ZODB.DB(ClientStorage(primary.addr, wait_timeout=30))
    commit(3)
    d.close()
    assert_prefix(replica.path, primary.path)


def zrs_python():
    path = os.environ.get("ZEORS_ZRS_PYTHON") or str(ROOT / ".venv-zrs" / "bin" / "python")
    if not os.path.exists(path):
        raise RuntimeError(f"no zc.zrs virtualenv at {path}: run `source scripts/venv-zrs.sh` (scripts/test.sh does)")
    return path


class ZrsNode:
    """A zc.zrs primary or secondary (interop/zrs_node.py in the zc.zrs virtualenv)."""

    def __init__(self, mode, path, port):
        self.path = pathlib.Path(path)
        self.log = open(self.path.parent / f"zrs-{mode}.log", "ab")
        self.proc = subprocess.Popen(
            [zrs_python(), str(ROOT / "interop" / "zrs_node.py"), mode, str(path), f"127.0.0.1:{port}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def cmd(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        assert words and words[0] == "last", words
        return words[1]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(30)
        self.log.close()


def same_history(a, b):
    """Two Data.fs hold the same transactions and records (zc.zrs pickles the extension
    again, so its bytes may differ: it is compared as a dict)."""
    ra, rb = records(a), records(b)
    assert len(ra) == len(rb)
    for ta, tb in zip(ra, rb):
        assert ta == tb, f"{ta[0].hex()} differs"
    return len(ra)


def test_a_zc_zrs_primary_feeds_a_zeors_replica(make_server, tmp_path):
    port = free_port()
    zrs = ZrsNode("primary", tmp_path / "zrs-primary.fs", port)
    try:
        last = zrs.cmd("commit 10")
        replica = make_server(*replicate_from(port), "--blob-dir", str(tmp_path / "replica.blobs"),
                              path=tmp_path / "replica.fs")
        deadline = time.time() + 60
        while last_tid(replica.addr) != last:
            assert time.time() < deadline
            time.sleep(0.05)
        last = zrs.cmd("commit 8")
        while last_tid(replica.addr) != last:
            assert time.time() < deadline
            time.sleep(0.05)
        d = ZODB.DB(ClientStorage(replica.addr, read_only=True, wait_timeout=30,
                                  blob_dir=str(tmp_path / "client-blobs")))
        with d.transaction() as conn:
            assert conn.root()["counter"] == 18
            with conn.root()["blob18"].open() as f:
                assert f.read() == b"blob 18 " * 1000
        d.close()
        assert "speaks zc.zrs's protocol only" in replica.log_text()
        assert replica.stop() == 0
    finally:
        zrs.close()
    assert same_history(tmp_path / "zrs-primary.fs", replica.path) == 19
    assert blobs(tmp_path / "replica.blobs") == blobs(tmp_path / "zrs-primary.fs.blobs")
    fstest(replica.path)


def test_a_zeors_primary_feeds_a_zc_zrs_secondary(make_server, tmp_path):
    port = free_port()
    primary = make_server(*replicate_to(port), "--blob-dir", str(tmp_path / "primary.blobs"),
                          path=tmp_path / "primary.fs")
    d = ZODB.DB(ClientStorage(primary.addr, wait_timeout=30, blob_dir=str(tmp_path / "client-blobs")))

    def commit(n):
        for i in range(n):
            with d.transaction(f"zeors {i}") as conn:
                conn.transaction_manager.get().setExtendedInfo("i", i)
                conn.root()[f"k{i % 7}"] = i
                if i % 4 == 0:
                    conn.root()[f"blob{i}"] = ZODB.blob.Blob(b"zeors blob %d " % i * 5000)
        return "%016x" % int.from_bytes(d.storage.lastTransaction(), "big")

    want = commit(10)
    zrs = ZrsNode("secondary", tmp_path / "zrs-secondary.fs", port)
    try:
        deadline = time.time() + 60
        while zrs.cmd("last") != want:
            assert time.time() < deadline, "the zc.zrs secondary did not catch up"
            time.sleep(0.1)
        want = commit(6)
        while zrs.cmd("last") != want:
            assert time.time() < deadline
            time.sleep(0.1)
    finally:
        zrs.close()
    d.close()
    assert primary.stop() == 0
    assert same_history(primary.path, tmp_path / "zrs-secondary.fs") == 17
    assert blobs(tmp_path / "zrs-secondary.fs.blobs") == blobs(tmp_path / "primary.blobs")
    fstest(tmp_path / "zrs-secondary.fs")
