"""The bank test (test_bank.py) across two zeors servers on one PostgreSQL database.

Half the clients use server A, half server B; they move money between the same accounts,
so their transactions conflict across servers (RelStorage's object locks in the
database, conflicts resolved by the clients). Server A is ended at every round (SIGTERM,
SIGKILL, or SIGKILL while one of its clients is inside its commit, the server frozen
first so the commit cannot complete) and restarted; in the middle of the run PostgreSQL
itself is stopped abruptly (`pg_ctl -m immediate`, a crash) and restarted while B's
clients keep working. After every round, with the clients paused:

- both servers serve the same state, and the bank invariants hold (nothing acknowledged
  lost, nothing failed or unacknowledged half-visible; see test_bank.py);
- the database has no session left inside a transaction and no advisory lock held: a
  server killed mid-commit left no lock and no partial transaction behind.
"""
import os
import random
import signal
import time

import psycopg2
from ZEO.ClientStorage import ClientStorage

from conftest import PgServer
from pgcluster import PgCluster
from test_bank import (CRASHES, KILL, KILL_MID_COMMIT, STOP, UNKNOWN, Bank, check_state,
                       crash_schedule, read_state, report, setup_bank)


def wait_same_tid(a, b, timeout=10.0):
    """Waits until both servers have announced the same last transaction."""
    deadline = time.time() + timeout
    while True:
        sa = ClientStorage(a.addr, wait_timeout=30)
        sb = ClientStorage(b.addr, wait_timeout=30)
        try:
            ta, tb = sa.lastTransaction(), sb.lastTransaction()
        finally:
            sa.close()
            sb.close()
        if ta == tb:
            return
        assert time.time() < deadline, f"servers disagree on the last transaction: {ta!r} {tb!r}"
        time.sleep(0.05)


def database_is_quiet(cluster, dbname):
    """No session of the database inside a transaction, no advisory lock held."""
    conn = psycopg2.connect(cluster.dsn(dbname))
    conn.autocommit = True
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = %s AND state LIKE 'idle in transaction%%'", (dbname,))
        idle_in_txn = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                    " WHERE l.locktype = 'advisory' AND d.datname = %s", (dbname,))
        advisory = cur.fetchone()[0]
    finally:
        conn.close()
    return idle_in_txn, advisory


def kill_a_mid_commit(server, bank, timeout=60):
    """SIGKILLs server A while one of *its* clients is inside its commit (server frozen
    with SIGSTOP first, killed only if that client is still inside after a pause)."""
    def mine():
        return [(cid, seq) for cid, seq in bank.in_commit() if bank.addr_for(cid) == server.addr]

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not mine():
            time.sleep(0.002)
            continue
        server.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        inflight = mine()
        if inflight:
            server.kill()
            return inflight
        server.proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"no commit through A was in flight within {timeout} s")


def test_bank_across_two_servers_with_kills_and_a_database_restart(tmp_path):
    seed = int(os.environ.get("ZEORS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    cluster = PgCluster().init().start()
    try:
        dbname = cluster.new_database("bank")
        dsn = cluster.dsn(dbname)
        a = PgServer(tmp_path, dsn).start()
        b = PgServer(tmp_path, dsn).start()
        setup_bank(a.addr)
        bank = Bank([a.addr, b.addr], seed)
        stats = {"crashes": 0, "clean_stops": 0, "mid_commit_crashes": 0, "inflight_at_kill": 0,
                 "database_restarts": 0, "checks": 0}
        rounds = max(CRASHES, 4)
        schedule = crash_schedule(rng, rounds)
        restart_at = rounds // 2
        t0 = time.time()

        def crash(r):
            kind = schedule[r]
            if kind == STOP:
                assert a.stop(signal.SIGTERM) == 0
                stats["clean_stops"] += 1
            elif kind == KILL:
                a.kill()
                stats["crashes"] += 1
            else:
                stats["inflight_at_kill"] += len(kill_a_mid_commit(a, bank))
                stats["crashes"] += 1
                stats["mid_commit_crashes"] += 1
            if r == restart_at:
                # PostgreSQL crashes and comes back while B's clients are working.
                cluster.restart("immediate")
                stats["database_restarts"] += 1
                time.sleep(rng.uniform(0.5, 1.5))
            a.start()

        def verify(r):
            where = f"round {r} (seed {seed})"
            wait_same_tid(a, b)
            state_a = read_state(ClientStorage(a.addr, wait_timeout=30))
            check_state(bank, state_a, where + " via A")
            state_b = read_state(ClientStorage(b.addr, wait_timeout=30))
            assert state_b == state_a, f"{where}: the two servers serve different states"
            idle_in_txn, advisory = database_is_quiet(cluster, dbname)
            assert idle_in_txn == 0, f"{where}: {idle_in_txn} session(s) left inside a transaction"
            assert advisory == 0, f"{where}: {advisory} advisory lock(s) still held"
            stats["checks"] += 1

        bank.start()
        try:
            for r in range(rounds):
                time.sleep(rng.uniform(0.3, 2.0))
                crash(r)
                bank.pause()
                verify(r)
                bank.resume()
            bank.run_until_acknowledged(10 * rounds + 1)
        finally:
            bank.finish()
        wait_same_tid(a, b)
        state = read_state(ClientStorage(a.addr, wait_timeout=30))
        acked = check_state(bank, state, "final")
        assert read_state(ClientStorage(b.addr, wait_timeout=30)) == state
        assert a.stop() == 0, a.log_text()[-3000:]
        assert b.stop() == 0, b.log_text()[-3000:]
        counts = bank.counts()
        report({"test": "bank-postgresql-two-servers", "seed": seed, **stats, "acknowledged": acked,
                "unknown": counts[UNKNOWN], "committed": state[2], "lost": 0,
                "seconds": round(time.time() - t0, 1)})
        assert stats["mid_commit_crashes"] == schedule.count(KILL_MID_COMMIT) >= 1
        assert stats["crashes"] == schedule.count(KILL) + schedule.count(KILL_MID_COMMIT)
        assert stats["database_restarts"] == 1
        assert counts[UNKNOWN] >= 1, "no kill interrupted a commit"
        # B's clients went through the restart too, and came back.
        b_acked = sum(1 for c in bank.clients if bank.addr_for(c.cid) == b.addr
                      for v in c.outcome.values() if v == "ack")
        assert b_acked > 0
    finally:
        cluster.destroy()
