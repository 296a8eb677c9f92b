"""Data.fs compatibility both ways with Python's FileStorage."""
import subprocess
import sys

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64, u64

from conftest import client, db


def fstest(path):
    r = subprocess.run([sys.executable, "-m", "ZODB.scripts.fstest", "-v", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"fstest failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def build_python_database(path):
    d = ZODB.DB(FileStorage(str(path)))
    with d.transaction("create") as conn:
        root = conn.root()
        root["tree"] = OOBTree()
        for i in range(500):
            root["tree"][i] = PersistentMapping({"i": i})
    for rev in range(5):
        with d.transaction(f"rev {rev}") as conn:
            conn.root()["rev"] = rev
            conn.root()["tree"][rev]["i"] = -rev
    with d.transaction() as conn:
        conn.root()["gone"] = PersistentMapping()
    undo_id = d.undoLog(0, 1)[0]["id"]
    d.undo(undo_id)
    transaction.commit()
    d.close()


def all_revisions_python(path):
    """{(oid, tid): data} for every record, via Python's iterator."""
    fs = FileStorage(str(path), read_only=True)
    out = {}
    for txn in fs.iterator():
        for rec in txn:
            out[(rec.oid, txn.tid)] = rec.data
    last = fs.lastTransaction()
    current = {}
    for oid in fs._index.keys():
        try:
            current[oid] = fs.load(oid)
        except Exception as e:  # deleted / uncreated objects
            current[oid] = type(e).__name__
    fs.close()
    return out, current, last


def test_python_database_is_served_by_zeors(make_server, tmp_path):
    path = tmp_path / "py.fs"
    build_python_database(path)
    revisions, current, last = all_revisions_python(path)
    (tmp_path / "py.fs.index").unlink()  # also exercise the rebuild-by-scan path
    server = make_server(path=path)
    st = client(server)
    assert st.lastTransaction() == last
    for oid, expected in current.items():
        if isinstance(expected, str):
            continue
        data, serial = st.load(oid)
        assert (data, serial) == expected
    for (oid, tid), data in revisions.items():
        if data is None:
            continue
        assert st.loadSerial(oid, tid) == data
    st.close()
    d = db(server)
    with d.transaction() as conn:
        assert conn.root()["rev"] == 4
        assert conn.root()["tree"][3]["i"] == -3
        assert "gone" not in conn.root()
        conn.root()["zeors"] = "was here"
    d.close()
    server.stop()
    fstest(path)
    d = ZODB.DB(FileStorage(str(path), read_only=True))
    with d.transaction() as conn:
        assert conn.root()["zeors"] == "was here"
    d.close()


def test_zeors_database_opens_in_python(make_server, tmp_path):
    path = tmp_path / "z.fs"
    server = make_server(path=path)
    d = db(server)
    for n in range(30):
        with d.transaction(f"txn {n}") as conn:
            root = conn.root()
            if n == 0:
                root["tree"] = OOBTree()
            root["tree"][n] = PersistentMapping({"n": n, "blob": b"\x00\xff" * n})
            root["n"] = n
    d.close()
    # Python reads the file while zeors is still serving it (read-only, no lock).
    revisions, current, last = all_revisions_python(path)
    st = client(server)
    assert st.lastTransaction() == last
    for (oid, tid), data in revisions.items():
        assert st.loadSerial(oid, tid) == data
    for oid, expected in current.items():
        assert st.load(oid) == expected
    st.close()
    assert server.stop() == 0
    out = fstest(path)
    assert "30" in out or out  # fstest -v lists transactions
    fs = FileStorage(str(path), read_only=True)
    assert fs._used_index, "Python did not accept the .index zeors wrote"
    fs.close()
    d = ZODB.DB(FileStorage(str(path)))
    with d.transaction() as conn:
        root = conn.root()
        assert root["n"] == 29
        assert [root["tree"][i]["n"] for i in range(30)] == list(range(30))
        root["python"] = "appended"
    d.close()
    # ... and zeors reads what Python appended.
    server.start()
    d = db(server)
    with d.transaction() as conn:
        assert conn.root()["python"] == "appended"
    d.close()


def test_oids_continue_after_restart(make_server, tmp_path):
    server = make_server()
    st = client(server)
    first = [u64(st.new_oid()) for _ in range(3)]
    st.close()
    d = db(server)
    with d.transaction() as conn:
        conn.root()["a"] = PersistentMapping()
    d.close()
    server.restart()
    d = db(server)
    with d.transaction() as conn:
        used = u64(conn.root()["a"]._p_oid)
        conn.root()["b"] = PersistentMapping()
        conn.savepoint()
        new = u64(conn.root()["b"]._p_oid)
    assert new > used
    d.close()
    assert first[0] >= 1
