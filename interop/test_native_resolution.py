"""Conflicts on BTrees buckets and `BTrees.Length` are resolved on the server, natively,
with the result Python's `_p_resolveConflict` gives (proven case by case against the real
BTrees package in crates/btrees); other classes go back to the client as before.

Checked on the wire: the second writer's vote answers with the oid the server resolved
(not a conflict dict for the client), the committed state is the merged one, and
`server_status` counts it — directly and through a proxy of zeors.
"""
import transaction
import ZODB
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from zodbpickle import pickle

from conftest import client
from rawzeo import Raw


def record(obj):
    """A ZODB record for `obj` as a client stores it: its class, then its state."""
    return pickle.dumps(type(obj), 3) + pickle.dumps(obj.__getstate__(), 3)


def setup(server):
    d = ZODB.DB(client(server))
    with d.transaction() as conn:
        root = conn.root()
        root["n"] = Length(10)
        root["t"] = OOBTree()
        root["t"].update({"a": 1, "m": 2})
        root["m"] = PersistentMapping({"v": 0})
    conn = d.open()
    oids = {k: conn.root()[k]._p_oid for k in ("n", "t", "m")}
    conn.close()
    return d, oids


def raw_vote(addr, oid, serial, data):
    raw = Raw(addr)
    raw.register()
    raw.send("tpc_begin", 1, b"", b"", {}, None, " ", oneway=True)
    raw.send("storea", oid, serial, data, 1, oneway=True)
    reply = raw.call("vote", 1)
    return raw, reply


def check_native(server, status_server):
    d, oids = setup(server)
    s = client(server)
    n_serial = s.load(oids["n"])[1]
    t_serial = s.load(oids["t"])[1]
    s.close()
    # Another client changes both while ours are in flight.
    with d.transaction() as conn:
        conn.root()["n"].change(5)
        conn.root()["t"]["b"] = 3
    # Ours: +1 on the counter from the old state; a new key in the tree's bucket.
    mine = Length(10)
    mine.change(1)
    raw, reply = raw_vote(server.addr, oids["n"], n_serial, record(mine))
    assert reply[1] == 0 and reply[3] == [oids["n"]], f"expected a server-resolved oid, got {reply}"
    assert raw.call("tpc_finish", 1)[1] == 0
    raw.close()
    tree = OOBTree()
    tree.update({"a": 1, "m": 2, "z": 26})
    raw, reply = raw_vote(server.addr, oids["t"], t_serial, record(tree))
    assert reply[3] == [oids["t"]], reply
    assert raw.call("tpc_finish", 1)[1] == 0
    raw.close()
    # A class the server does not resolve still goes back to the client.
    s = client(server)
    m_serial = s.load(oids["m"])[1]
    s.close()
    with d.transaction() as conn:
        conn.root()["m"]["v"] = 1
    raw, reply = raw_vote(server.addr, oids["m"], m_serial, record(PersistentMapping({"v": 2})))
    assert isinstance(reply[3][0], dict) and reply[3][0]["oid"] == oids["m"], reply
    raw.call("tpc_abort", 1)
    raw.close()
    with d.transaction() as conn:
        root = conn.root()
        assert root["n"]() == 16
        assert dict(root["t"].items()) == {"a": 1, "m": 2, "b": 3, "z": 26}
    d.close()
    r = Raw(status_server.addr)
    r.register()
    status = r.call("server_status")[3]
    r.close()
    return status


def test_btrees_and_length_conflicts_are_resolved_on_the_server(pickle_server):
    status = check_native(pickle_server, pickle_server)
    assert status["conflicts_resolved"] == 2
    assert status["conflicts"] == 1  # the PersistentMapping one, for the client


def test_native_resolution_through_a_proxy_of_zeors(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    proxy = make_server.proxy(upstream.addr)
    status = check_native(proxy, upstream)
    assert status["conflicts_resolved"] == 2
