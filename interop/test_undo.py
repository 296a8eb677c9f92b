"""Undo over ZEO against zeors, as Zope's undo screen and ZODB applications use it:
`undoLog`/`undoInfo` (with `ZopeUndo.Prefix` filters), transactional undo, undoing a
creation and an undo, the errors Python gives, invalidations to other clients, undo from
two clients at once, and undo conflicts resolved by the client (BTrees).
"""
import threading

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.POSException import MultipleUndoErrors, POSKeyError, UndoError
from ZopeUndo.Prefix import Prefix

from conftest import client, db
from test_basic import wait_until


def commit(d, note, user=None, **changes):
    with d.transaction(note) as conn:
        if user:
            conn.transaction_manager.get().setUser(user, "/acl_users")
        for k, v in changes.items():
            conn.root()[k] = v


def test_undo_log_and_info(server):
    d = db(server)
    for i in range(25):
        commit(d, f"/site/folder{i % 3}/edit {i}", user=f"user{i % 2}", **{f"k{i}": i})
    log = d.undoLog(0, 100)
    assert len(log) == 26  # with the initial root creation
    assert [e["description"] for e in log[:2]] == ["/site/folder0/edit 24", "/site/folder2/edit 23"]
    assert log[0]["user_name"] == "/acl_users user0"
    assert isinstance(log[0]["id"], bytes) and len(log[0]["id"]) == 12
    assert log[0]["time"] > log[1]["time"] and log[0]["size"] > 0
    assert len(d.undoLog()) == 20  # default: the last 20
    assert [e["id"] for e in d.undoLog(5, 10)] == [e["id"] for e in log[5:10]]
    assert [e["id"] for e in d.undoLog(20, -3)] == [e["id"] for e in log[20:23]]
    cs = d.storage
    # undoInfo with plain values and with Zope's Prefix filters.
    only1 = cs.undoInfo(0, 100, {"user_name": b"/acl_users user1"})
    assert len(only1) == 12 and all(e["user_name"] == b"/acl_users user1" for e in only1)
    if server.extra == []:  # Prefix objects only travel in pickle mode
        folder2 = cs.undoInfo(0, 100, {"description": Prefix("/site/folder2")})
        assert len(folder2) == 8
        assert all(e["description"].startswith(b"/site/folder2/") for e in folder2)
        both = cs.undoInfo(0, 3, {"description": Prefix("/site"), "user_name": Prefix("/acl_users")})
        assert len(both) == 3
        assert cs.undoInfo(0, 100, {"description": Prefix("/other")}) == []
    assert len(cs.undoInfo(0, 100, None)) == 26
    assert len(cs.undoInfo(0, 100, {})) == 26
    d.close()


def test_undo_change_creation_and_undo_of_undo(server):
    d = db(server)
    commit(d, "create", m=PersistentMapping({"v": 1}))
    commit(d, "new m", m2=PersistentMapping({"v": 10}))
    with d.transaction("change") as conn:
        conn.root()["m"]["v"] = 2
    d.undo(d.undoLog(0, 1)[0]["id"])
    transaction.commit()
    with d.transaction() as conn:
        assert conn.root()["m"]["v"] == 1
    # Undo the undo.
    d.undo(d.undoLog(0, 1)[0]["id"])
    transaction.commit()
    with d.transaction() as conn:
        assert conn.root()["m"]["v"] == 2
        m2_oid = conn.root()["m2"]._p_oid
    # Undo the creation of m2: the root loses it and the object has no state.
    create_m2 = [e for e in d.undoLog(0, 100) if e["description"] == "new m"][0]
    d.undo(create_m2["id"])
    transaction.commit()
    with d.transaction() as conn:
        assert "m2" not in conn.root()
    with pytest.raises(POSKeyError):
        d.storage.load(m2_oid)
    history = d.history(m2_oid, 10)
    assert history[0]["size"] == 0
    d.close()


def test_refused_undos_raise_what_python_raises(server):
    d = db(server)
    commit(d, "create", m=PersistentMapping({"v": 1}))
    with d.transaction("change") as conn:
        conn.root()["m"]["v"] = 2
    change_id = d.undoLog(0, 1)[0]["id"]
    with d.transaction("change again") as conn:
        conn.root()["m"]["v"] = 3
    d.undo(change_id)
    with pytest.raises(MultipleUndoErrors) as e:
        transaction.commit()
    assert "Some data were modified by a later transaction" in str(e.value)
    assert isinstance(e.value, UndoError)
    transaction.abort()
    # The creation of an object changed since cannot be undone.
    create_id = d.undoLog(0, 100)[-2]["id"]
    d.undo(create_id)
    with pytest.raises(UndoError) as e:
        transaction.commit()
    assert "Can't undo an add transaction followed by conflicting transactions" in str(e.value)
    transaction.abort()
    with d.transaction() as conn:
        assert conn.root()["m"]["v"] == 3
    d.close()


def test_other_clients_are_invalidated_and_the_undoer_does_not_cache_its_own(server):
    d1, d2 = db(server), db(server)
    commit(d1, "create", m=PersistentMapping({"v": 1}))
    with d1.transaction() as conn:
        m_oid = conn.root()["m"]._p_oid
    first_state = d1.storage.load(m_oid)[0]
    with d1.transaction("change") as conn:
        conn.root()["m"]["v"] = 2
    tm2 = transaction.TransactionManager()
    c2 = d2.open(tm2)
    assert c2.root()["m"]["v"] == 2
    tm2.abort()
    # Undo through the storage API to see the vote's oid list.
    from ZODB.Connection import TransactionMetaData

    cs = d1.storage
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.undo(d1.undoLog(0, 1)[0]["id"], t)
    oids = cs.tpc_vote(t)
    cs.tpc_finish(t)
    # The vote lists the undone oid, so the client drops its cached copy: the next load
    # comes from the server and has the state from before the undone change.
    assert oids == [m_oid]
    assert cs.load(m_oid)[0] == first_state

    def seen():
        tm2.begin()
        return c2.root()["m"]["v"] == 1

    assert wait_until(seen), "the other client never saw the undo"
    d1.close()
    d2.close()


def test_undo_from_two_clients_at_once(pickle_server):
    d = db(pickle_server)
    commit(d, "setup", **{f"m{i}": PersistentMapping({"v": 0}) for i in range(4)})
    for i in range(4):
        with d.transaction(f"change {i}") as conn:
            conn.root()[f"m{i}"]["v"] = i + 1
    ids = {e["description"]: e["id"] for e in d.undoLog(0, 10)}
    d.close()
    errors, done = [], []

    def undo(descriptions):
        dd = db(pickle_server)
        tm = transaction.TransactionManager()
        try:
            for desc in descriptions:
                dd.undo(ids[desc], tm.get())
                tm.commit()
                done.append(desc)
        except Exception as e:  # reported below
            errors.append(e)
        finally:
            dd.close()

    threads = [
        threading.Thread(target=undo, args=(["change 0", "change 2"],)),
        threading.Thread(target=undo, args=(["change 1", "change 3"],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(done) == ["change 0", "change 1", "change 2", "change 3"]
    d = db(pickle_server)
    with d.transaction() as conn:
        assert [conn.root()[f"m{i}"]["v"] for i in range(4)] == [0, 0, 0, 0]
    # The same transaction undone by two clients: one wins, the other is refused.
    with d.transaction("again") as conn:
        conn.root()["m0"]["v"] = 7
    again = d.undoLog(0, 1)[0]["id"]
    barrier = threading.Barrier(2)
    results = []

    def undo_again():
        dd = db(pickle_server)
        tm = transaction.TransactionManager()
        dd.undo(again, tm.get())
        barrier.wait()
        try:
            tm.commit()
            results.append("ok")
        except UndoError:
            results.append("refused")
            tm.abort()
        finally:
            dd.close()

    threads = [threading.Thread(target=undo_again) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["ok", "refused"]
    with d.transaction() as conn:
        assert conn.root()["m0"]["v"] == 0
    d.close()


def test_btree_undo_conflicts_are_resolved_by_the_client(server):
    """Undoing an insertion into a BTree bucket that changed since needs BTrees' conflict
    resolution: zeors hands it to the client, which has the classes."""
    d = db(server)
    with d.transaction("setup") as conn:
        # Not empty, and the undone key not the first: BTrees refuses to resolve those
        # cases, in Python too.
        conn.root()["tree"] = OOBTree({"a": 0})
        conn.root()["count"] = Length(0)
    with d.transaction("add m") as conn:
        conn.root()["tree"]["m"] = 1
        conn.root()["count"].change(1)
    add_m = d.undoLog(0, 1)[0]["id"]
    with d.transaction("add z") as conn:
        conn.root()["tree"]["z"] = 2
        conn.root()["count"].change(1)
    d.undo(add_m)
    transaction.commit()
    with d.transaction() as conn:
        assert dict(conn.root()["tree"]) == {"a": 0, "z": 2}
        assert conn.root()["count"]() == 1
    # A real conflict (the same key changed since) cannot be resolved.
    with d.transaction("set c") as conn:
        conn.root()["tree"]["c"] = 1
    set_c = d.undoLog(0, 1)[0]["id"]
    with d.transaction("change c") as conn:
        conn.root()["tree"]["c"] = 2
    d.undo(set_c)
    with pytest.raises(Exception):
        transaction.commit()
    transaction.abort()
    d.close()


def test_undo_in_a_file_written_by_python(make_server, tmp_path):
    path = tmp_path / "py.fs"
    pd = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    with pd.transaction() as conn:
        conn.root()["m"] = PersistentMapping({"v": 1})
    with pd.transaction("python change") as conn:
        conn.root()["m"]["v"] = 2
    pd.close()
    s = make_server(path=path)
    d = db(s)
    [entry] = [e for e in d.undoLog(0, 10) if e["description"] == "python change"]
    d.undo(entry["id"])
    transaction.commit()
    with d.transaction() as conn:
        assert conn.root()["m"]["v"] == 1
    d.close()
    assert s.stop() == 0
    pd = ZODB.DB(ZODB.FileStorage.FileStorage(str(path), read_only=True))
    with pd.transaction() as conn:
        assert conn.root()["m"]["v"] == 1
    assert [e["description"] for e in pd.undoLog(0, 2)] == ["", "python change"]
    pd.close()
