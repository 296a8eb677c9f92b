"""What an administration front-end does through a proxy: history and iteration (backup
and conversion tools), the Undo tab, the Pack button — against a stock and a zeors
upstream, each checked against what upstream itself answers.

The pack tests are about what a pack removes that the proxy's cache may hold: the
current revision of an object garbage-collected by the pack (no invalidation ever says
it is gone), old revisions (history), and the blob files of both. Each test first shows
that the proxy holds the revision (a cache hit, or the blob in its blob cache) and then
that, after the pack, the proxy answers what upstream answers: POSKeyError.
"""
import os
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
import ZODB.POSException
import ZODB.utils
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZopeUndo.Prefix import Prefix

from conftest import client, db, free_port, wait_seen
from test_blobs import blob_db
from test_metrics import metric, scrape
from test_proxy_blobs import blob_proxy, stock_blobs, upstream  # noqa: F401 (fixtures)


def outcome(f, *args):
    """What a call answers: its value, or the class of the exception it raises."""
    try:
        return ("ok", f(*args))
    except Exception as e:  # noqa: BLE001 - the class is the answer compared
        return ("raises", type(e).__name__)


def metered_proxy(make_server, upstream, tmp_path):
    mport = free_port()
    proxy = blob_proxy(make_server, upstream, tmp_path, "--metrics-address", f"127.0.0.1:{mport}")
    return proxy, mport


def hits(mport):
    return metric(scrape(mport), "zeors_cache_hits_total")


def commit_history(server, tmp_path):
    """Root -> 'keep' (3 revisions) and 'gone' (3 revisions, then unlinked), and a blob
    'blob' (2 revisions, then unlinked). Returns oids, the serials of every revision, and
    the tid after which 'gone' and 'blob' are unreachable."""
    d = blob_db(server, tmp_path)
    serials = {"keep": [], "gone": [], "blob": []}
    with d.transaction() as conn:
        root = conn.root()
        root["keep"], root["gone"], root["blob"] = PersistentMapping(), PersistentMapping(), Blob(b"v0")
    conn = d.open()
    root = conn.root()
    oids = {k: root[k]._p_oid for k in serials}
    for i in range(3):
        root["keep"]["v"] = i
        root["gone"]["v"] = i
        if i < 2:
            with root["blob"].open("w") as f:
                f.write(b"blob revision %d" % i)
        transaction.commit()
        for k in serials:
            if i < 2 or k != "blob":
                serials[k].append(root[k]._p_serial)
    del root["gone"], root["blob"]
    transaction.commit()
    unlinked = root._p_serial
    conn.close()
    d.close()
    return oids, serials, unlinked


def warm_proxy(proxy, oids, serials, tmp_path):
    """Loads every revision through the proxy, so that its caches hold them."""
    cs = client(proxy, blob_dir=str(tmp_path / "warm-blobs"))
    for k, oid in oids.items():
        cs.load(oid)
        for s in serials[k]:
            cs.loadBefore(oid, ZODB.utils.p64(ZODB.utils.u64(s) + 1))
        if k == "blob":
            for s in serials[k]:
                with open(cs.loadBlob(oid, s), "rb") as f:
                    assert f.read()
    cs.close()


def answers(server, oids, serials, tmp_path, name):
    """What `server` answers for each object and revision, from a fresh client."""
    cs = client(server, blob_dir=str(tmp_path / name))
    out = {}
    for k, oid in oids.items():
        out[k, "load"] = outcome(lambda: cs.load(oid)[1])
        for s in serials[k]:
            after = ZODB.utils.p64(ZODB.utils.u64(s) + 1)
            out[k, s, "loadBefore"] = outcome(lambda: cs.loadBefore(oid, after)[1])
            out[k, s, "loadSerial"] = outcome(lambda: len(cs.loadSerial(oid, s)))
            if k == "blob":
                out[k, s, "loadBlob"] = outcome(lambda: os.path.exists(cs.loadBlob(oid, s)))
    cs.close()
    return out


@pytest.mark.parametrize("packed_by", ["proxy", "upstream"])
def test_after_a_pack_the_proxy_answers_what_upstream_answers(
        upstream, make_server, tmp_path, packed_by):  # noqa: F811
    proxy, mport = metered_proxy(make_server, upstream, tmp_path)
    oids, serials, unlinked = commit_history(proxy, tmp_path)
    warm_proxy(proxy, oids, serials, tmp_path)
    # The proxy holds them: loading them again is all cache hits.
    before = hits(mport)
    cs = client(proxy)
    cs.load(oids["gone"])
    cs.loadBefore(oids["keep"], ZODB.utils.p64(ZODB.utils.u64(serials["keep"][0]) + 1))
    cs.close()
    assert hits(mport) >= before + 2
    assert answers(proxy, oids, serials, tmp_path, "c1")["gone", "load"][0] == "ok"

    time.sleep(0.05)  # the pack time is after the unlinking transaction
    packer = blob_db(proxy if packed_by == "proxy" else upstream, tmp_path)
    packer.pack()
    packer.close()
    if packed_by == "upstream":
        # The proxy learns of a pack made without it from upstream's size broadcast.
        time.sleep(0.5)

    want = answers(upstream, oids, serials, tmp_path, "c2")
    got = answers(proxy, oids, serials, tmp_path, "c3")
    assert want["gone", "load"] == ("raises", "POSKeyError")
    assert want["keep", serials["keep"][0], "loadSerial"] == ("raises", "POSKeyError")
    assert got == want
    # What survived is still served from the cache after one check with upstream.
    for n in range(2):
        before = hits(mport)
        cs = client(proxy)
        assert cs.load(oids["keep"])[1] == serials["keep"][-1]
        cs.close()
    assert hits(mport) >= before + 1


def test_the_proxy_cache_stays_correct_across_a_restart_after_a_pack(
        upstream, make_server, tmp_path):  # noqa: F811
    proxy, _ = metered_proxy(make_server, upstream, tmp_path)
    oids, serials, _ = commit_history(proxy, tmp_path)
    warm_proxy(proxy, oids, serials, tmp_path)
    time.sleep(0.05)
    d = db(proxy)
    d.pack()
    d.close()
    proxy.restart()
    assert answers(proxy, oids, serials, tmp_path, "c1") == answers(
        upstream, oids, serials, tmp_path, "c2")


def test_undo_through_the_proxy(upstream, make_server, tmp_path):  # noqa: F811
    proxy = blob_proxy(make_server, upstream, tmp_path)
    undoer, other, direct = db(proxy), db(proxy), db(upstream)
    with undoer.transaction("create /site/a alice") as conn:
        conn.root()["doc"] = PersistentMapping({"v": 0})
    for v in (1, 2):
        with undoer.transaction(f"edit /site/{'a' if v == 1 else 'b'} bob") as conn:
            conn.root()["doc"]["v"] = v
    wait_seen(other, undoer.storage.lastTransaction())
    conn_other = other.open()
    assert conn_other.root()["doc"]["v"] == 2  # cached by the other client and the proxy

    # The undo log is upstream's, with Zope's filters (the Undo tab asks by path).
    log = undoer.undoLog(0, 20)
    assert [e["id"] for e in log] == [e["id"] for e in direct.undoLog(0, 20)]
    assert [e["description"] for e in log][:3] == ["edit /site/b bob", "edit /site/a bob",
                                                   "create /site/a alice"]
    by_path = undoer.undoInfo(0, 20, {"description": Prefix("edit /site/a")})
    assert [e["description"] for e in by_path] == ["edit /site/a bob"]
    assert [e["id"] for e in undoer.undoInfo(1, 2, {"description": Prefix("edit /site")})] == [
        e["id"] for e in log if e["description"] == "edit /site/a bob"]

    # Undo the last edit through the proxy: every client sees v == 1 again.
    undoer.undo(log[0]["id"])
    transaction.commit()
    transaction.begin()
    wait_seen(other, undoer.storage.lastTransaction())
    conn_other.sync()
    assert conn_other.root()["doc"]["v"] == 1
    fresh = db(proxy)
    with fresh.transaction() as conn:
        assert conn.root()["doc"]["v"] == 1
    with direct.transaction() as conn:
        assert conn.root()["doc"]["v"] == 1
    # An undo upstream refuses (that edit is undone already) comes back as its error.
    with pytest.raises(ZODB.POSException.UndoError):
        undoer.undo(log[0]["id"])
        transaction.commit()
    transaction.abort()
    for d in (undoer, other, direct, fresh):
        d.close()


def transactions(storage):
    out = []
    for t in storage.iterator():
        out.append((t.tid, t.status, t.user, t.description, t.extension,
                    [(r.oid, r.tid, r.data, r.data_txn) for r in t]))
    return out


def test_iteration_through_the_proxy_survives_an_upstream_restart(
        make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    proxy = make_server.proxy(upstream.addr)
    d = db(proxy)
    for i in range(30):
        with d.transaction(f"txn {i}") as conn:
            conn.root()[i % 7] = PersistentMapping({"i": i, "pad": "x" * i})
    d.close()
    direct = client(upstream)
    want = transactions(direct)
    direct.close()

    cs = client(proxy)
    it = cs.iterator()
    got = []
    for n, t in enumerate(it):
        records = iter(t)
        first = next(records)
        if n == 10:
            # Upstream goes away and comes back in the middle of a transaction's records.
            upstream.restart()
            time.sleep(0.5)
        rest = list(records)
        got.append((t.tid, t.status, t.user, t.description, t.extension,
                    [(r.oid, r.tid, r.data, r.data_txn) for r in [first] + rest]))
    cs.close()
    assert got == want


def test_copy_transactions_from_the_proxy_like_zodbconvert(upstream, make_server, tmp_path):  # noqa: F811
    proxy = blob_proxy(make_server, upstream, tmp_path)
    d = blob_db(proxy, tmp_path)
    for i in range(10):
        with d.transaction(f"txn {i}") as conn:
            conn.root()[i] = PersistentMapping({"i": i})
            if i == 3:
                conn.root()["blob"] = Blob(b"a blob")
    d.undo(d.undoLog(0, 1)[0]["id"])
    transaction.commit()
    d.close()
    source = client(proxy, blob_dir=str(tmp_path / "copy-src-blobs"))
    dest = ZODB.FileStorage.FileStorage(str(tmp_path / "copy.fs"),
                                        blob_dir=str(tmp_path / "copy-blobs"))
    dest.copyTransactionsFrom(source)
    want = transactions(source)
    source.close()
    assert transactions(dest) == want
    dest.close()
    copied = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "copy.fs"),
                                                  blob_dir=str(tmp_path / "copy-blobs")))
    with copied.transaction() as conn:
        assert sorted(k for k in conn.root() if k != "blob") == list(range(9))
        with conn.root()["blob"].open() as f:
            assert f.read() == b"a blob"
    copied.close()


def test_get_info_through_the_proxy_advertises_what_upstream_offers(
        upstream, make_server, tmp_path):  # noqa: F811
    proxy = blob_proxy(make_server, upstream, tmp_path)
    no_blobs = make_server.proxy(upstream.addr, "noblobs")
    via, direct, plain = client(proxy), client(upstream), client(no_blobs)
    assert via._info["interfaces"] == direct._info["interfaces"]
    assert ("ZODB.interfaces", "IStorageIteration") in via._info["interfaces"]
    assert via._info["supportsUndo"] and via._info["supports_record_iternext"]
    assert [i for i in plain._info["interfaces"] if "Blob" in i[1]] == []
    for cs in (via, direct, plain):
        cs.close()
