"""Real ZODB applications over zeors: objects, BTrees, invalidations, conflicts, errors."""
import multiprocessing
import time

import pytest
import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError, POSKeyError, ReadOnlyError
from ZODB.utils import p64, z64

from conftest import client, db


def test_tree_written_by_one_client_is_read_by_another(server):
    d1 = db(server)
    with d1.transaction() as conn:
        root = conn.root()
        root["tree"] = tree = OOBTree()
        for i in range(3000):
            tree[f"k{i:05d}"] = PersistentMapping({"i": i, "payload": "x" * (i % 50)})
        root["length"] = Length(3000)
        root["nested"] = PersistentMapping({"a": PersistentMapping({"b": PersistentMapping({"c": 42})})})
    d2 = db(server)
    with d2.transaction() as conn:
        root = conn.root()
        tree = root["tree"]
        assert len(tree) == 3000
        assert [tree[k]["i"] for k in ("k00000", "k01234", "k02999")] == [0, 1234, 2999]
        assert root["length"]() == 3000
        assert root["nested"]["a"]["b"]["c"] == 42
        assert sum(v["i"] for v in tree.values()) == sum(range(3000))
    d1.close()
    d2.close()


def wait_until(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_other_clients_see_invalidations(server):
    d1, d2 = db(server), db(server)
    with d1.transaction() as conn:
        conn.root()["value"] = PersistentMapping({"n": 1})
    c2 = d2.open()

    def created():
        # d2 learns of d1's commit asynchronously, as any ZEO client does.
        c2.transaction_manager.begin()
        return "value" in c2.root()

    assert wait_until(created), "client 2 never saw the first commit"
    assert c2.root()["value"]["n"] == 1  # now cached in c2 and in d2's client cache
    transaction.abort()
    with d1.transaction() as conn:
        conn.root()["value"]["n"] = 2

    def seen():
        c2.transaction_manager.begin()
        return c2.root()["value"]["n"] == 2

    assert wait_until(seen), "client 2 never saw the new value"
    c2.close()
    d1.close()
    d2.close()


def _two_connections(server):
    d1, d2 = db(server), db(server)
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    return d1, d2, d1.open(tm1), d2.open(tm2), tm1, tm2


def test_length_increments_from_two_clients_are_resolved(server):
    d1 = db(server)
    with d1.transaction() as conn:
        conn.root()["len"] = Length(10)
    d1.close()
    d1, d2, c1, c2, tm1, tm2 = _two_connections(server)
    c1.root()["len"].change(1)
    c2.root()["len"].change(5)
    tm1.commit()
    tm2.commit()  # conflicts at the server; the client resolves it with Length's rules
    d3 = db(server)
    with d3.transaction() as conn:
        assert conn.root()["len"]() == 16
    for d in (d1, d2, d3):
        d.close()


def test_bucket_inserts_of_different_keys_are_resolved(server):
    d1 = db(server)
    with d1.transaction() as conn:
        t = conn.root()["t"] = OOBTree()
        for k in ("m", "n", "o"):
            t[k] = k
    d1.close()
    d1, d2, c1, c2, tm1, tm2 = _two_connections(server)
    c1.root()["t"]["a"] = 1
    c2.root()["t"]["z"] = 2
    tm1.commit()
    tm2.commit()
    d3 = db(server)
    with d3.transaction() as conn:
        assert sorted(conn.root()["t"].items()) == [("a", 1), ("m", "m"), ("n", "n"), ("o", "o"), ("z", 2)]
    for d in (d1, d2, d3):
        d.close()


def test_true_conflict_raises_conflict_error(server):
    d1 = db(server)
    with d1.transaction() as conn:
        conn.root()["m"] = PersistentMapping({"k": 0})
    d1.close()
    d1, d2, c1, c2, tm1, tm2 = _two_connections(server)
    c1.root()["m"]["k"] = 1
    c2.root()["m"]["k"] = 2
    tm1.commit()
    with pytest.raises(ConflictError):
        tm2.commit()
    tm2.abort()
    d3 = db(server)
    with d3.transaction() as conn:
        assert conn.root()["m"]["k"] == 1
    # The losing client can retry and win.
    c2.root()["m"]["k"] = 3
    tm2.commit()
    for d in (d1, d2, d3):
        d.close()


def test_missing_oid_raises_poskeyerror(server):
    st = client(server)
    with pytest.raises(POSKeyError):
        st.load(p64(987654321))
    d = db(server)  # creates the root
    with pytest.raises(POSKeyError):
        st.loadSerial(z64, p64(1))
    d.close()
    st.close()


def test_read_only_client_cannot_write(server):
    d = db(server)
    with d.transaction() as conn:
        conn.root()["x"] = 1
    d.close()
    ro = db(server, read_only=True)
    conn = ro.open()
    assert conn.root()["x"] == 1
    conn.root()["x"] = 2
    with pytest.raises(ReadOnlyError):
        transaction.commit()
    transaction.abort()
    conn.close()
    with pytest.raises(ReadOnlyError):
        ro.storage.new_oid()
    ro.close()


def test_read_only_server_refuses_writable_clients_and_serves_readers(make_server, tmp_path):
    first = make_server()
    d = db(first)
    with d.transaction() as conn:
        conn.root()["x"] = "hello"
    d.close()
    first.stop()
    ro_server = make_server("--read-only")
    from ZEO.ClientStorage import ClientStorage
    from ZEO.Exceptions import ClientDisconnected

    with pytest.raises(ClientDisconnected):
        ClientStorage(ro_server.addr, wait_timeout=3)  # registration refused: ReadOnlyError
    reader = db(ro_server, read_only=True)
    with reader.transaction() as conn:
        assert conn.root()["x"] == "hello"
    reader.close()


def _writer(addr, name, count, msgpack_unused):
    import ZODB
    import transaction as txn
    from ZEO.ClientStorage import ClientStorage

    d = ZODB.DB(ClientStorage(addr, wait_timeout=30))
    tm = txn.TransactionManager()
    conn = d.open(tm)
    done = 0
    while done < count:
        try:
            root = conn.root()
            root["counter"].change(1)
            root["tree"][f"{name}-{done:04d}"] = done
            root[f"own-{name}"] = done + 1
            tm.commit()
            done += 1
        except ConflictError:
            tm.abort()
    conn.close()
    d.close()


def test_concurrent_writer_processes(server):
    d = db(server)
    with d.transaction() as conn:
        conn.root()["counter"] = Length(0)
        conn.root()["tree"] = OOBTree()
    d.close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(server.addr, f"w{i}", 25, None)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    d = db(server)
    with d.transaction() as conn:
        root = conn.root()
        assert root["counter"]() == 100
        assert len(root["tree"]) == 100
        for i in range(4):
            assert root[f"own-w{i}"] == 25
    d.close()


def test_history_and_undo_log(server):
    d = db(server)
    for n in range(3):
        with d.transaction(f"step {n}") as conn:
            conn.root()["v"] = n
    st = d.storage
    h = st.history(z64, 10)
    assert [e["description"] for e in h[:3]] == [b"step 2", b"step 1", b"step 0"]
    assert all(isinstance(e["time"], float) for e in h)
    d.close()


def test_server_status_and_ruok(server):
    import json
    import socket
    import struct

    st = client(server)
    status = st.server_status()
    assert status["connections"] >= 1
    assert set(status) >= {"loads", "stores", "commits", "aborts", "last-transaction", "start", "waiting"}
    st.close()
    with socket.create_connection(server.addr) as s:
        hello = s.recv(6)
        assert hello[4:] in (b"Z5", b"M5")
        s.sendall(struct.pack(">I", 4) + b"ruok")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    (n,) = struct.unpack(">I", data[:4])
    answer = json.loads(data[4 : 4 + n])
    assert "1" in answer and "connections" in answer["1"]


def test_unix_socket_and_sigint(make_server, tmp_path):
    import signal

    sock = tmp_path / "zeo.sock"
    server = make_server("-a", str(sock))
    d = db(server)
    with d.transaction() as conn:
        conn.root()["via"] = "tcp"
    d.close()
    from ZEO.ClientStorage import ClientStorage
    import ZODB

    d = ZODB.DB(ClientStorage(str(sock), wait_timeout=10))
    with d.transaction() as conn:
        assert conn.root()["via"] == "tcp"
        conn.root()["via"] = "unix"
    d.close()
    assert server.stop(signal.SIGINT) == 0
    assert not sock.exists(), "the socket file is removed on shutdown"
    server.start()
    d = db(server)
    with d.transaction() as conn:
        assert conn.root()["via"] == "unix"
    d.close()
