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


def test_kill_9_during_commit_burst_loses_no_acknowledged_commit(make_server, tmp_path):
    server = make_server()
    d = db(server)
    with d.transaction() as conn:
        conn.root()["t"] = IOBTree()
    d.close()
    acknowledged = []
    for round_ in range(3):
        stop = threading.Event()
        errors = []

        def writer(wid):
            try:
                d = ZODB.DB(ClientStorage(server.addr, wait_timeout=5))
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
                    except Exception:
                        tm.abort()
                        break
                    acknowledged.append(key)
                    n += 1
                d.close()
            except Exception as e:  # connection refused after the kill is fine
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0 + round_ * 0.37)
        server.kill()
        stop.set()
        for t in threads:
            t.join(60)
        server.start()
    assert len(acknowledged) > 10
    d = db(server)
    with d.transaction() as conn:
        tree = conn.root()["t"]
        missing = [k for k in acknowledged if k not in tree]
    d.close()
    assert not missing, f"{len(missing)} acknowledged commits lost"
    server.stop()
    fstest(server.path)
