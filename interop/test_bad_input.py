"""Hostile and broken clients get an error or a closed connection; nobody else suffers."""
import os
import struct
import time

import transaction
from persistent.mapping import PersistentMapping
from ZODB.utils import p64, z64

from conftest import db
from rawzeo import Raw


def healthy(server):
    d = db(server)
    with d.transaction() as conn:
        conn.root()["probe"] = conn.root().get("probe", 0) + 1
    d.close()


def test_garbage_before_handshake_closes(pickle_server):
    r = Raw(pickle_server.addr)
    r.sock.sendall(os.urandom(1000))
    assert r.is_closed()
    healthy(pickle_server)


def test_huge_frame_length_is_refused(pickle_server):
    healthy(pickle_server)
    size = os.path.getsize(pickle_server.path)
    r = Raw(pickle_server.addr)
    r.register()
    r.sock.sendall(struct.pack(">I", 0xFFFFFFFF) + b"x" * 100)
    assert r.is_closed()
    assert os.path.getsize(pickle_server.path) == size
    healthy(pickle_server)


def test_unknown_method_closes(pickle_server):
    r = Raw(pickle_server.addr)
    r.register()
    r.send("os_system", "rm -rf /")
    assert r.is_closed()
    healthy(pickle_server)


def test_malformed_pickle_closes(pickle_server):
    r = Raw(pickle_server.addr)
    r.register()
    r.send_frame(b"\x80\x03(K\x01\x89X\x04\x00\x00\x00pingq")  # truncated
    assert r.is_closed()
    r = Raw(pickle_server.addr)
    r.register()
    r.send_frame(b"\x80\x03cos\nsystem\nX\x02\x00\x00\x00ls\x85R.")  # a global we never load
    assert r.is_closed()
    healthy(pickle_server)


def test_wrong_argument_types_get_an_error_reply(pickle_server):
    r = Raw(pickle_server.addr)
    r.register()
    reply = r.call("loadBefore", b"short", b"x" * 8)
    assert reply[1] == 2  # exception
    # ... and the connection still works.
    assert r.call("ping")[3] is None
    r.close()


def test_storea_without_tpc_begin_closes_and_writes_nothing(pickle_server):
    healthy(pickle_server)
    size = os.path.getsize(pickle_server.path)
    r = Raw(pickle_server.addr)
    r.register()
    r.send("storea", p64(1), z64, b"data", 12345, oneway=True)
    assert r.is_closed()
    assert os.path.getsize(pickle_server.path) == size
    healthy(pickle_server)


def test_call_before_register_closes(pickle_server):
    r = Raw(pickle_server.addr)
    r.handshake()
    r.send("loadBefore", z64, p64(2**62))
    assert r.is_closed()


def test_bad_protocol_version_closes(pickle_server):
    r = Raw(pickle_server.addr)
    r.send_frame(b"Z4")
    assert r.is_closed()


def _vote_and_hold(server):
    d = db(server)
    with d.transaction() as conn:
        conn.root()["held"] = 0
    serial = d.storage.load(z64)[1]
    d.close()
    r = Raw(server.addr)
    r.register()
    r.send("tpc_begin", 1, b"", b"", {}, None, " ", oneway=True)
    r.send("storea", z64, serial, b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.\x80\x03}q\x01X\x04\x00\x00\x00dataq\x02}q\x03s.", 1, oneway=True)
    reply = r.call("vote", 1)
    assert reply[1:] == (0, ".reply", []), reply  # voted, holding the commit lock
    return r


def test_disconnect_while_holding_commit_lock_releases_it(pickle_server):
    r = _vote_and_hold(pickle_server)
    r.close()
    t0 = time.time()
    healthy(pickle_server)
    assert time.time() - t0 < 5


def test_transaction_timeout_releases_lock(make_server):
    server = make_server("-t", "1")
    r = _vote_and_hold(server)
    assert r.is_closed(timeout=10)
    t0 = time.time()
    healthy(server)
    assert time.time() - t0 < 5
    st = Raw(server.addr)
    st.register()
    status = st.call("server_status")[3]
    assert status["waiting"] == 0 and status["lock_time"] is None
    assert status["connections"] == 1


def test_slow_committer_does_not_block_readers(pickle_server):
    r = _vote_and_hold(pickle_server)
    d = db(pickle_server)
    t0 = time.time()
    with d.transaction() as conn:
        assert conn.root()["held"] == 0
    assert time.time() - t0 < 2
    d.close()
    r.close()
