"""Network faults: clients that stop reading, connection storms, upstream links that
drop while a proxy is busy. Nothing acknowledged may be lost, nobody else may stall."""
import os
import socket
import struct
import threading
import time

import pytest
import transaction
from BTrees.IOBTree import IOBTree
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError
from ZODB.utils import p64, z64

from conftest import db
from rawzeo import Raw
from relay import Relay


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_client_that_stops_reading_is_disconnected_and_blocks_nobody(make_server):
    server = make_server("--max-client-queue", "2MB")
    d = db(server)
    with d.transaction() as conn:
        conn.root()["big"] = PersistentMapping({"blob": b"x" * 200_000})
    big_oid = d.open().root()["big"]._p_oid
    stuck = Raw(server.addr)
    stuck.register()
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Pipeline loads of a 200 KB object and never read the replies.
    for _ in range(200):
        stuck.send("loadBefore", big_oid, p64(2**62))
    # Meanwhile another client keeps committing with normal latency.
    t0 = time.time()
    for i in range(20):
        with d.transaction() as conn:
            conn.root()["n"] = i
    assert time.time() - t0 < 10
    deadline = time.time() + 20
    while time.time() < deadline and "not reading" not in server.log_text():
        time.sleep(0.1)
    assert "not reading" in server.log_text()
    assert rss_kb(server.proc.pid) < 200_000, "the server buffered far more than the limit"
    d.close()
    stuck.close()


def test_connection_storm(make_server):
    server = make_server()
    base_fds = fd_count(server.proc.pid)
    socks = []
    for _ in range(1000):
        s = socket.create_connection(server.addr, timeout=10)
        socks.append(s)
    # Everyone completes the handshake and registers.
    register = None
    for s in socks:
        s.recv(6)
        from zodbpickle import pickle
        import io

        if register is None:
            f = io.BytesIO()
            p = pickle.Pickler(f, 3)
            p.fast = 1
            p.dump((1, False, "register", ("1", False)))
            body = f.getvalue()
            register = struct.pack(">I", 2) + b"Z5" + struct.pack(">I", len(body)) + body
        s.sendall(register)
    for s in socks:
        data = b""
        while len(data) < 4:
            data += s.recv(4 - len(data))
    # The server is still responsive for a normal client.
    d = db(server)
    with d.transaction() as conn:
        conn.root()["after-storm"] = True
    d.close()
    status = Raw(server.addr)
    status.register()
    assert status.call("server_status")[3]["connections"] >= 1000
    status.close()
    for s in socks:
        s.close()
    deadline = time.time() + 20
    while time.time() < deadline and fd_count(server.proc.pid) > base_fds + 5:
        time.sleep(0.2)
    assert fd_count(server.proc.pid) <= base_fds + 5, "file descriptors leaked"


def test_proxy_survives_upstream_link_cuts_during_reads_and_commits(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    d = db(upstream)
    with d.transaction() as conn:
        conn.root()["t"] = IOBTree()
    d.close()
    relay = Relay(upstream.addr)
    proxy = make_server.proxy(relay.addr)
    acknowledged = []
    stop = threading.Event()
    errors = []

    def writer():
        import ZODB
        from ZEO.ClientStorage import ClientStorage

        dd = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
        tm = transaction.TransactionManager()
        conn = dd.open(tm)
        n = 0
        while not stop.is_set():
            try:
                conn.root()["t"][n] = n
                tm.commit()
                acknowledged.append(n)
                n += 1
            except ConflictError:
                tm.abort()
            except Exception as e:  # upstream away: the commit fails, the app retries
                errors.append(type(e).__name__)
                tm.abort()
                time.sleep(0.05)
        dd.close()

    def reader():
        import ZODB
        from ZEO.ClientStorage import ClientStorage

        while not stop.is_set():
            try:
                dd = ZODB.DB(ClientStorage(proxy.addr, wait_timeout=30))
                with dd.transaction() as conn:
                    len(conn.root()["t"])
                dd.close()
            except Exception as e:
                errors.append(type(e).__name__)
            time.sleep(0.05)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for _ in range(5):
        time.sleep(0.7)
        relay.cut()
        time.sleep(0.5)
        relay.restore()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert len(acknowledged) > 5
    # Every acknowledged commit is upstream, and the proxy agrees with upstream.
    for server in (upstream, proxy):
        dd = db(server)
        with dd.transaction() as conn:
            tree = conn.root()["t"]
            missing = [n for n in acknowledged if n not in tree]
            assert not missing, f"{len(missing)} acknowledged commits missing via {server}"
            keys = sorted(tree.keys())
        dd.close()
        if server is upstream:
            upstream_keys = keys
        else:
            assert keys == upstream_keys
    relay.close()
