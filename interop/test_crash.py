"""Durability: commits a client saw finish survive kill -9."""
import threading
import time

import transaction
import ZODB
from BTrees.IOBTree import IOBTree
from ZEO.ClientStorage import ClientStorage
from ZODB.POSException import ConflictError

from conftest import db
from test_compat import fstest
from test_soak import exhausted_conflict_rounds


def test_kill_9_during_commit_burst_loses_no_acknowledged_commit(make_server, tmp_path):
    server = make_server()
    d = db(server)
    with d.transaction() as conn:
        conn.root()["t"] = IOBTree()
    d.close()
    acknowledged = []
    # Every error a writer met, as (class, when): only ZEO's "disconnected" errors are
    # expected, and only once the server is gone.
    errors = []
    exhausted = []
    killed = []
    for round_ in range(3):
        stop = threading.Event()
        opened = threading.Barrier(4)

        def writer(wid):
            d = ZODB.DB(ClientStorage(server.addr, wait_timeout=5))
            opened.wait(30)
            try:
                tm = transaction.TransactionManager()
                conn = d.open(tm)
                n = 0
                while not stop.is_set():
                    key = round_ * 1_000_000 + wid * 10_000 + n
                    conn.root()["t"][key] = key
                    try:
                        tm.commit()
                    except ConflictError:
                        tm.abort()
                        continue
                    except Exception as e:
                        if exhausted_conflict_rounds(e):  # one more conflict: retried
                            exhausted.append(e)
                            tm.abort()
                            continue
                        # The server was killed under this commit.
                        errors.append((f"{type(e).__module__}.{type(e).__name__}", time.monotonic(), repr(e)[:200]))
                        tm.abort()
                        break
                    acknowledged.append(key)
                    n += 1
            finally:
                d.close()

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        opened.wait(30)  # every writer has its database before the kill
        time.sleep(1.0 + round_ * 0.37)
        killed.append(time.monotonic())
        server.kill()
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), f"round {round_}: a writer did not stop"
        server.start()
    classes = {c for c, _, _ in errors}
    assert classes <= {"ZEO.Exceptions.ClientDisconnected"}, errors
    assert all(when >= killed[0] for _, when, _ in errors), "an error before the first kill"
    # The kills did hit writers in the middle of their work.
    assert errors, "no writer noticed a kill"
    print(f"{len(acknowledged)} acknowledged, {len(errors)} commits cut by a kill, "
          f"{len(exhausted)} retried after ZEO's client ran out of conflict rounds")
    assert len(acknowledged) > 10
    d = db(server)
    with d.transaction() as conn:
        tree = conn.root()["t"]
        missing = [k for k in acknowledged if k not in tree]
    d.close()
    assert not missing, f"{len(missing)} acknowledged commits lost"
    server.stop()
    fstest(server.path)
