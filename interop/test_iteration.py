"""History and iteration over ZEO against zeors: `ClientStorage.iterator()`, `DB.history()`,
`loadSerial`, `record_iternext`, `copyTransactionsFrom` (what zodbconvert and backups do),
and the offline `zeors dump` / `zeors check` tools compared with `fsdump` / `fstest`.
"""
import subprocess
import sys

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.POSException import POSKeyError
from ZODB.utils import z64

from conftest import client, db, zeors_binary


def populate(server, n=30):
    """Commits a small history: a tree, revisions, metadata, an undo. Returns the oid of
    an object with several revisions."""
    d = db(server)
    with d.transaction() as conn:
        root = conn.root()
        root["tree"] = OOBTree()
        for i in range(500):
            root["tree"][f"k{i:04d}"] = PersistentMapping({"i": i})
    for r in range(n):
        with d.transaction(f"revision {r}") as conn:
            conn.root()["tree"]["k0001"]["r"] = r
            conn.transaction_manager.get().setUser("alice")
            conn.transaction_manager.get().setExtendedInfo("rev", r)
    with d.transaction() as conn:
        oid = conn.root()["tree"]["k0001"]._p_oid
        conn.root()["gone"] = PersistentMapping()
    d.undo(d.undoLog(0, 1)[0]["id"])
    transaction.commit()
    d.close()
    return oid


def python_view(path):
    """Every transaction and record as Python's own FileIterator reads the file."""
    out = []
    it = ZODB.FileStorage.FileIterator(str(path))
    for t in it:
        out.append(("T", t.tid, t.status, t.user, t.description, dict(t.extension)))
        for r in t:
            out.append(("R", r.oid, r.tid, r.data, r.data_txn))
    it.close()
    return out


def zeo_view(storage, start=None, stop=None):
    out = []
    for t in storage.iterator(start, stop):
        out.append(("T", t.tid, t.status, t.user, t.description, dict(t.extension)))
        for r in t:
            out.append(("R", r.oid, r.tid, r.data, r.data_txn))
    return out


def test_iterator_lists_every_transaction_like_python(server):
    populate(server)
    cs = client(server)
    theirs = python_view(server.path)
    ours = zeo_view(cs)
    assert ours == theirs
    assert sum(1 for x in ours if x[0] == "T") > 30
    # The undone creation comes through as data None, the undo's back pointers with data_txn.
    assert any(x[0] == "R" and x[3] is None for x in ours)
    assert any(x[0] == "R" and x[4] is not None for x in ours)
    cs.close()


def test_iterator_start_and_stop(pickle_server):
    populate(pickle_server, n=10)
    cs = client(pickle_server)
    tids = [t.tid for t in cs.iterator()]
    for a, b in [(2, 5), (0, 0), (len(tids) - 1, len(tids) - 1), (3, len(tids) - 1)]:
        assert [t.tid for t in cs.iterator(tids[a], tids[b])] == tids[a : b + 1]
    assert [t.tid for t in cs.iterator(tids[5])] == tids[5:]
    assert [t.tid for t in cs.iterator(None, tids[4])] == tids[:5]
    assert list(cs.iterator(tids[5], tids[4])) == []
    # Iterators are independent and see the storage as it was when started.
    it1, it2 = cs.iterator(), cs.iterator()
    first = next(it1)
    d = db(pickle_server)
    with d.transaction() as conn:
        conn.root()["late"] = 1
    assert next(it2).tid == first.tid
    assert [t.tid for t in it1] == tids[1:]
    assert len(list(cs.iterator())) == len(tids) + 1
    d.close()
    cs.close()


def test_history_and_load_serial(server):
    oid = populate(server, n=12)
    d = db(server)
    hist = d.history(oid, size=100)
    assert len(hist) == 13
    assert [h["tid"] for h in hist] == sorted((h["tid"] for h in hist), reverse=True)
    # DB.history gives text, as it does over a local FileStorage.
    assert hist[0]["description"] == "revision 11" and hist[0]["user_name"].endswith("alice")
    assert hist[0]["rev"] == 11
    assert all(h["size"] > 0 for h in hist)
    assert len(d.history(oid, size=3)) == 3
    conn = d.open()
    for i, h in enumerate(hist[:-1]):
        state = conn._reader.getState(d.storage.loadSerial(oid, h["tid"]))["data"]
        assert state == {"i": 1, "r": 11 - i}
    with pytest.raises(POSKeyError):
        d.storage.loadSerial(oid, z64)
    with pytest.raises(POSKeyError):
        d.history(b"\0\0\0\0\0\1\0\0", 1)
    conn.close()
    d.close()


def test_record_iternext_walks_every_object(pickle_server):
    populate(pickle_server, n=2)
    cs = client(pickle_server)
    seen, nxt = [], None
    while True:
        try:
            oid, tid, data, nxt = cs.record_iternext(nxt)
        except POSKeyError:
            # An object without state (its creation was undone); Python raises too.
            break
        seen.append(oid)
        if nxt is None:
            break
    assert seen[0] == z64 and len(seen) > 500
    assert seen == sorted(seen)
    cs.close()


def test_copy_transactions_from_zeors_like_zodbconvert(pickle_server, tmp_path):
    populate(pickle_server, n=5)
    cs = client(pickle_server)
    dest = ZODB.FileStorage.FileStorage(str(tmp_path / "copy.fs"))
    dest.copyTransactionsFrom(cs)
    dest.close()
    cs.close()
    theirs = python_view(pickle_server.path)
    copied = python_view(tmp_path / "copy.fs")
    assert copied == theirs
    d = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "copy.fs"), read_only=True))
    with d.transaction() as conn:
        assert conn.root()["tree"]["k0001"]["r"] == 4
    d.close()


def run_tool(*args):
    return subprocess.run([zeors_binary(), *map(str, args)], capture_output=True, text=True)


def test_dump_matches_fsdump_and_check_is_clean(pickle_server):
    populate(pickle_server, n=5)
    ours = run_tool("dump", pickle_server.path)
    assert ours.returncode == 0, ours.stderr
    theirs = subprocess.run(
        [sys.executable, "-m", "ZODB.FileStorage.fsdump", str(pickle_server.path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert ours.stdout == theirs.stdout
    assert "undo or abort of object creation" in ours.stdout and " bp=" in ours.stdout
    checked = run_tool("check", pickle_server.path)
    assert checked.returncode == 0, checked.stdout
    assert "format: OK" in checked.stdout and "references: OK" in checked.stdout


def test_check_reports_damage_and_dangling_references(tmp_path):
    path = tmp_path / "bad.fs"
    fs = ZODB.FileStorage.FileStorage(str(path))
    d = ZODB.DB(fs)
    with d.transaction() as conn:
        conn.root()["a"] = PersistentMapping({"x": 1})
    oid = d.open().root()["a"]._p_oid
    transaction.abort()
    # Delete the object behind the root's back (external GC done wrong).
    from ZODB.Connection import TransactionMetaData

    t = TransactionMetaData()
    fs.tpc_begin(t)
    fs.deleteObject(oid, fs.load(oid)[1], t)
    fs.tpc_vote(t)
    fs.tpc_finish(t)
    d.close()
    r = run_tool("check", path)
    assert r.returncode == 1
    assert "refers to invalid objects" in r.stdout and "pack would fail" in r.stdout
    data = bytearray(path.read_bytes())
    data[20] = ord("x")  # the first transaction's status byte
    path.write_bytes(bytes(data))
    r = run_tool("check", path)
    assert r.returncode == 1 and f"{path}: damaged Data.fs at offset 4: invalid transaction status 'x'" in r.stdout
