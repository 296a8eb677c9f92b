"""Hostile or buggy clients cannot corrupt, hang or exhaust the server.

Each test drives the real binary through the wire, as an attacker on loopback would, and
checks that the damage stays with that client: the file stays valid, other clients keep
working, the server still answers and stops when told.
"""
import os
import signal
import subprocess
import threading
import time

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import StorageError
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import p64, u64, z64
from persistent.TimeStamp import TimeStamp

from conftest import client, db, zeors_binary

MAX_TID = b"\xff" * 8


def tid_at(seconds_from_now):
    t = time.gmtime(time.time() + seconds_from_now)
    return TimeStamp(*t[:5] + (t[5],)).raw()


def commit_with_tid(storage, tid, value=1):
    """One explicit-tid transaction storing a new object; returns (oid, the tid)."""
    t = TransactionMetaData()
    storage.tpc_begin(t, tid)
    oid = storage.new_oid()
    storage.store(oid, z64, zodb_pickle(MinPO(value)), "", t)
    try:
        storage.tpc_vote(t)
    except BaseException:
        storage.tpc_abort(t)
        raise
    return oid, storage.tpc_finish(t)


def ordinary_commit(server, key="probe"):
    d = db(server)
    try:
        with d.transaction() as conn:
            conn.root()[key] = conn.root().get(key, 0) + 1
        return d.storage.lastTransaction()
    finally:
        d.close()


def zeors_check(path):
    r = subprocess.run([zeors_binary(), "check", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, f"zeors check failed:\n{r.stdout}\n{r.stderr}"


def refused(storage, tid):
    """The explicit-tid commit fails with a storage error naming the cause."""
    with pytest.raises(Exception) as e:
        commit_with_tid(storage, tid)
    assert "transaction id" in str(e.value), repr(e.value)
    return e.value


@pytest.mark.parametrize("tid", [MAX_TID, b"\xff\xff\xff\xfe\x00\x00\x00\x00"], ids=["max", "year-9917"])
def test_explicit_tid_far_in_the_future_is_refused(pickle_server, tid):
    first = ordinary_commit(pickle_server)
    s = client(pickle_server)
    try:
        refused(s, tid)
        assert s.lastTransaction() == first
        # The connection stays usable, and so does the server.
        oid, t = commit_with_tid(s, tid_at(5))
        assert s.load(oid)[1] == t
    finally:
        s.close()
    later = ordinary_commit(pickle_server)
    assert u64(later) > u64(first)
    pickle_server.stop()
    zeors_check(pickle_server.path)


def test_explicit_tids_as_zodb_uses_them_still_work(pickle_server):
    """copyTransactionsFrom / ZODB's own tests: explicit tids later than the last one and
    not ahead of the clock are accepted, stores included."""
    s = client(pickle_server)
    try:
        a, ta = commit_with_tid(s, p64(1))
        b, tb = commit_with_tid(s, p64(2))
        assert (ta, tb) == (p64(1), p64(2))
        c, tc = commit_with_tid(s, tid_at(-10))
        assert s.lastTransaction() == tc
    finally:
        s.close()


LAST_OPENABLE = b"\xff" * 7 + b"\xfe"


def python_file_ending_at_the_last_tid(path):
    """A Data.fs whose last transaction has tid 0xff..fe, as Python's FileStorage (and
    the stock server) write when a client asks for it. (0xff..ff itself makes ZODB's
    MVCC adapter overflow when a connection opens: no ZODB client can use such a file.)"""
    fs = FileStorage(str(path))
    d = ZODB.DB(fs)
    with d.transaction() as conn:
        conn.root()["x"] = PersistentMapping({"v": 1})
    d.close()
    fs = FileStorage(str(path))
    commit_with_tid(fs, LAST_OPENABLE)
    fs.close()


def test_a_file_ending_at_the_last_tid_is_served_and_refuses_new_commits_cleanly(make_server, tmp_path):
    path = tmp_path / "Data.fs"
    python_file_ending_at_the_last_tid(path)
    size = os.path.getsize(path)
    server = make_server(path=path)
    # Loads of current objects are answered (they used to be refused as stale forever,
    # spinning a runtime thread).
    d = db(server)
    conn = d.open()
    assert conn.root()["x"]["v"] == 1
    conn.close()
    # A commit fails with a clear error instead of wrapping to tid 0.
    s = client(server)
    try:
        with pytest.raises(Exception) as e:
            commit_with_tid(s, None)
        assert "transaction id" in str(e.value), repr(e.value)
        assert s.lastTransaction() == LAST_OPENABLE
    finally:
        s.close()
    d.close()
    assert os.path.getsize(path) == size
    # Still responsive from a new connection, and stops on SIGTERM.
    assert client_last(server) == LAST_OPENABLE
    assert server.stop(signal.SIGTERM, timeout=20) == 0
    zeors_check(path)


def test_proxy_refuses_an_explicit_tid_far_ahead_and_keeps_following_upstream(make_server, tmp_path):
    """Through a proxy of a stock upstream (which would accept any tid): the proxy refuses
    the tid itself, and keeps applying upstream's invalidations."""
    upstream = make_server.stock(path=tmp_path / "upstream.fs")
    proxy = make_server.proxy(upstream.addr)
    d = db(proxy)
    conn = d.open()
    conn.root()["x"] = PersistentMapping({"v": 1})
    transaction.commit()
    s = client(proxy)
    try:
        refused(s, MAX_TID)
    finally:
        s.close()
    # A commit made directly upstream reaches the proxy's clients.
    du = db(upstream)
    with du.transaction() as c:
        c.root()["x"]["v"] = 2
    du.close()
    deadline = time.time() + 10
    while time.time() < deadline:
        conn.sync()
        if conn.root()["x"]["v"] == 2:
            break
        time.sleep(0.1)
    assert conn.root()["x"]["v"] == 2
    conn.close()
    d.close()
    assert u64(client_last(upstream)) < u64(MAX_TID)


def client_last(server):
    s = client(server)
    try:
        return s.lastTransaction()
    finally:
        s.close()
