"""ZEO's and ZODB's own test suites, run through the stock `ClientStorage` against zeors.

The tests are ZEO's own (`ZEO.tests`: the storage mixins of `testZEO`, the connection,
reconnection, read-only, invalidation-queue and timeout tests of `testConnection`, the
zrpc tests, client conflict resolution, blobs, and the doctests including
`zeo-fan-out.test`) and the ZODB blob suites ZEO runs, unchanged: only the server they
start is swapped (see zeo_forker.py). Each test runs in three roles:

- `direct`: zeors serving the storage;
- `proxy-zeors`: a zeors proxy in front of a zeors upstream;
- `proxy-stock`: a zeors proxy in front of the stock server.

With `ZEORS_SUITES_STOCK=1` the same tests also run against the stock server in the same
roles (`stock`, `stock-proxy-stock`, `stock-proxy-zeors`), as the baseline; there a failure
is recorded (xfail), not an error, since it is the stock server's.

`ZEORS_SUITES_ROLES=direct,proxy-stock` restricts the roles; `-k` selects tests as usual.

Tests are in three groups besides those that pass:

- `INTENDED`: differences zeors keeps on purpose (listed in the README with the reason).
  They are marked xfail(strict): if one starts to pass, the list is wrong and the run fails.
- `NOT_APPLICABLE`: tests that never reach a server started by zeo_forker (they test the
  Python server's classes in-process, runzeo's command line, or a Python-only storage), or
  that belong to another part of the project (TLS, testssl). They are not collected.
"""
import doctest
import faulthandler
import os
import re
import sys
import unittest

import pytest

import zeo_forker


ROLES = [r for r in os.environ.get("ZEORS_SUITES_ROLES", ",".join(zeo_forker.ZEORS_ROLES)).split(",") if r]
if os.environ.get("ZEORS_SUITES_STOCK") and "ZEORS_SUITES_ROLES" not in os.environ:
    ROLES += ["stock", "stock-proxy-stock", "stock-proxy-zeors"]
PROXY_ROLES = {"proxy-zeors", "proxy-stock"}
ZEORS = set(zeo_forker.ZEORS_ROLES)

# One test may not take longer than this (a hang dumps every thread's stack and ends the
# run, instead of stalling CI until its own timeout).
TEST_TIMEOUT = float(os.environ.get("ZEORS_SUITES_TEST_TIMEOUT", "600"))


# --- what is run ---------------------------------------------------------------------------

def _unittest_cases(module, cls_name, prefixes=("check", "test")):
    """(id, factory) of each test method of a unittest class, as ZEO's add_tests loads them."""
    import importlib
    mod = importlib.import_module(module)
    cls = getattr(mod, cls_name)
    loader = unittest.TestLoader()
    out = []
    seen = set()
    for prefix in prefixes:
        loader.testMethodPrefix = prefix
        for name in loader.getTestCaseNames(cls):
            if name in seen:
                continue
            seen.add(name)
            out.append((f"{cls_name}.{name}", (lambda cls=cls, name=name: cls(name))))
    return out


def _suite_cases(label, build):
    """(id, factory) of each case of a suite built by `build()` (doctests): built again for
    each run, so that no state is shared between roles."""
    out = []
    for case in _flatten(build()):
        cid = case.id()
        out.append((f"{label}:{_short(cid)}", (lambda cid=cid: _find(build(), cid))))
    return out


def _short(cid):
    return cid.rsplit(".", 1)[-1] if cid.startswith("ZEO.") or cid.startswith("ZODB.") else cid


def _flatten(suite):
    if isinstance(suite, unittest.TestSuite):
        for t in suite:
            yield from _flatten(t)
    else:
        yield suite


def _find(suite, cid):
    for case in _flatten(suite):
        if case.id() == cid:
            return case
    raise LookupError(cid)


def _zeo_doctests(module, **kw):
    import importlib

    from zope.testing import renormalizing, setupstack

    from ZEO.tests import forker
    from ZEO.tests.testZEO import test_suite  # noqa: F401 (the patterns live in it)

    def build():
        return doctest.DocTestSuite(importlib.import_module(module), setUp=forker.setUp,
                                    tearDown=setupstack.tearDown,
                                    checker=renormalizing.RENormalizing(_patterns()), **kw)
    return build


def _zeo_docfiles(*names):
    from zope.testing import renormalizing, setupstack

    from ZEO.tests import forker

    def build():
        return doctest.DocFileSuite(*names, package="ZEO.tests", setUp=forker.setUp,
                                    tearDown=setupstack.tearDown,
                                    checker=renormalizing.RENormalizing(_patterns()))
    return build


def _patterns():
    # testZEO.test_suite's output normalisation.
    return [
        (re.compile(r"'start': '[^\n]+'"), "start"),
        (re.compile(r"'last-transaction': '[0-9a-f]+'"), "last-transaction"),
        (re.compile("ZODB.POSException.ConflictError"), "ConflictError"),
        (re.compile("ZODB.POSException.POSKeyError"), "POSKeyError"),
        (re.compile("ZEO.Exceptions.ClientStorageError"), "ClientStorageError"),
        (re.compile("ZEO.Exceptions.ClientDisconnected"), "ClientDisconnected"),
        (re.compile(r"\[Errno \d+\]"), "[Errno N]"),
        (re.compile(r"loads=\d+\.\d+"), "loads=42.42"),
    ]


def _blob_suites():
    import ZODB.tests.testblob
    from ZEO.tests import testZEO

    def reusable(prefix, factory):
        return lambda: ZODB.tests.testblob.storage_reusable_suite(prefix, factory)

    def external_gc():
        import ZODB.tests.PackableStorage
        return ZODB.tests.PackableStorage.IExternalGC_suite(
            lambda: testZEO.ServerManagingClientStorageForIExternalGCTest(
                "data.fs", "blobs", extrafsoptions="pack-gc false"))

    return (
        _suite_cases("ClientStorageNonSharedBlobs",
                     reusable("ClientStorageNonSharedBlobs", testZEO.ServerManagingClientStorage))
        + _suite_cases("ClientStorageSharedBlobs",
                       reusable("ClientStorageSharedBlobs", testZEO.create_storage_shared))
        + _suite_cases("IExternalGC", external_gc)
    )


# Every test ZEO's own suite runs is run with `ZEORS_SUITES_FULL=1`. By default the
# copies are left out: against zeors, the MappingStorage classes run the FileStorage
# classes' tests again (the harness serves a FileStorage for <mappingstorage>), and the
# two blob classes repeat all of FullGenericTests (which FileStorageTests runs) around
# their few blob tests; only those blob tests are kept.
FULL = bool(os.environ.get("ZEORS_SUITES_FULL"))
COPIES = {
    "ZEO.tests.testZEO": ("MappingStorageTests",),
    "ZEO.tests.testConnection": ("MappingStorageConnectionTests", "MappingStorageTimeoutTests"),
}


def _blob_tests_only(cases):
    from ZEO.tests import testZEO
    own = set(vars(testZEO.CommonBlobTests)) | set(vars(testZEO.BlobAdaptedFileStorageTests))
    return [(tid, f) for tid, f in cases if tid.split(".", 1)[1] in own]


def collect():
    cases = []
    z = "ZEO.tests.testZEO"
    for cls in ("FileStorageTests", "MappingStorageTests", "BlobAdaptedFileStorageTests",
                "BlobWritableCacheTests", "ClientConflictResolutionTests",
                "ZRPCConnectionTests", "FileStorageRecoveryTests", "MultiprocessingTests"):
        found = _unittest_cases(z, cls)
        if not FULL:
            if cls in COPIES[z]:
                continue
            if cls.startswith("Blob"):
                found = _blob_tests_only(found)
        cases += found
    c = "ZEO.tests.testConnection"
    for cls in ("FileStorageConnectionTests", "FileStorageReconnectionTests",
                "FileStorageInvqTests", "FileStorageTimeoutTests",
                "MappingStorageConnectionTests", "MappingStorageTimeoutTests"):
        if not FULL and cls in COPIES[c]:
            continue
        cases += _unittest_cases(c, cls, prefixes=("check",))
    cases += _unittest_cases("ZEO.tests.test_client_side_conflict_resolution",
                             "ClientSideConflictResolutionTests", prefixes=("test",))
    cases += _unittest_cases("ZEO.tests.testConfig", "ZEOConfigTest", prefixes=("test",))
    cases += _unittest_cases("ZEO.tests.test_sync", "SyncTests", prefixes=("test",))
    cases += _unittest_cases("ZEO.tests.test_client_credentials", "ClientAuthTests",
                             prefixes=("test",))
    cases += _suite_cases("testZEO", _zeo_doctests(z))
    cases += _suite_cases("IterationTests", _zeo_doctests("ZEO.tests.IterationTests"))
    cases += _suite_cases("testConnection", _zeo_doctests(c))
    cases += _suite_cases("docs", _zeo_docfiles(
        "drop_cache_rather_than_verify.txt", "client-config.test", "protocols.test",
        "zeo_blob_cache.test", "invalidation-age.txt", "zeo-fan-out.test", "new_addr.test",
        "../nagios.rst"))
    cases += _blob_suites()
    return cases


# --- what is not run, and what differs on purpose -------------------------------------------

NOT_APPLICABLE = {
    # In-process tests of the Python server's classes: no server is started.
    "ClientSideConflictResolutionTests.test_server_side":
        "drives ZEO.StorageServer in-process",
    "testZEO:multiple_storages_invalidation_queue_is_not_insane":
        "drives ZEO.StorageServer in-process",
    "testZEO:getInvalidationsAfterServerRestart": "drives ZEO.StorageServer in-process",
    # runzeo's own command line and process handling.
    "testZEO:runzeo_without_configfile": "runs runzeo's command line",
    "testZEO:runzeo_logrotate_on_sigusr2": "runs runzeo (zeors' SIGUSR2: test_config.py)",
    # TLS (testssl and its users) is item 5 of issue 20, tested with the TLS work.
    "testZEO:quick_close_doesnt_kill_server": "TLS (testssl's server_config)",
    "SyncTests.test_server_sync": "instruments ZEO.StorageServer's ping in-process",
    "ClientAuthTests.test_passing_credentials": "instruments ZEO.StorageServer's register",
    # A test of the client: it must refuse a server speaking ZEO 4 (the stock server is
    # made to impersonate one); zeors speaks ZEO 5 only.
    "docs:protocols_test": "a server impersonating ZEO 4 (a test of the client)",
    # No server involved.
    "testZEO:ClientDisconnected_errors_are_TransientErrors": "no server",
}

if os.geteuid() == 0:
    # The file permissions these check do not stop root: with any server, run as root the
    # doctest opens a committed blob for writing (and then truncates it).
    for _prefix in ("ClientStorageNonSharedBlobs", "ClientStorageSharedBlobs"):
        NOT_APPLICABLE[f"{_prefix}:blob_transaction_txt"] = (
            "read-only blob files are writable by root (run as root)")


def _intended(role, test):
    """The reason `test` differs on purpose from the stock server in `role`, or None."""
    if role not in ZEORS:
        return None
    for pattern, roles, why in INTENDED:
        if roles is not None and role not in roles:
            continue
        if re.fullmatch(pattern, test):
            return why
    return None


# (test id pattern, roles or None for all zeors roles, reason). README, "Intended
# differences", lists them.
_UNDO_RESOLUTION = (
    "zeors runs no Python: an undo conflict of a class it does not resolve natively (here "
    "ZODB's test class PCounter) is refused with UndoError, where Python's FileStorage "
    "runs the class's _p_resolveConflict on the server")
_QUICK_VERIFICATION = (
    "a client whose last tid is older than the invalidation queue is answered from the "
    "storage itself ('quick verification', its cache kept) where the stock server answers "
    "'cache too old, clearing' and the client drops its whole cache")
_LOG_FORMAT = (
    "zeors writes its own log format (tracing, with fields), not the Python logging "
    "module's lines with ZEO's logger names that the test greps for")
PROXIES = ("proxy-zeors", "proxy-stock")
INTENDED = [
    # A stock upstream resolves these itself, with Python.
    (r".*\.testUndo(Multiple)?ConflictResolution(Reversed)?", ("direct", "proxy-zeors"),
     _UNDO_RESOLUTION),
    (r".*\.checkVerificationWith2ClientsInvqOverflow", None, _QUICK_VERIFICATION),
    (r"docs:invalidation-age_txt", None, _QUICK_VERIFICATION),
    (r"docs:drop_cache_rather_than_verify_txt", None, _QUICK_VERIFICATION),
    (r".*TimeoutTests\.checkTimeout", None, _LOG_FORMAT),
    (r"testZEO:client_labels", None, _LOG_FORMAT),
    (r"docs:zeo-fan-out_test", None,
     "a proxy whose upstream restarted without changes keeps its clients' caches (it "
     "catches up from upstream and finds nothing changed); the doctest expects the stock "
     "proxy's behaviour, every object invalidated"),
    (r"testZEO:client_has_newer_data_than_server", PROXIES,
     "a proxy whose upstream went back in time (restored from an older copy) refuses that "
     "upstream and logs an error, as a ZEO client refuses a server older than its cache; "
     "its own clients, whose caches match the proxy's, are not told, so they log nothing"),
]


# --- running one test ------------------------------------------------------------------------

CASES = collect()


def _params():
    out = []
    for role in ROLES:
        for tid, factory in CASES:
            if tid in NOT_APPLICABLE:
                continue
            marks = []
            why = _intended(role, tid)
            if why:
                marks.append(pytest.mark.xfail(strict=True, reason="intended difference: " + why))
            elif role not in ZEORS:
                marks.append(pytest.mark.xfail(strict=False, reason="baseline: the stock server's result"))
            out.append(pytest.param(role, tid, factory, id=f"{role}::{tid}", marks=marks))
    return out


SHARED_BLOB_TESTS = ("BlobWritableCacheTests.", "ClientStorageSharedBlobs:")


@pytest.mark.parametrize("role,tid,factory", _params())
def test_zeo(role, tid, factory, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    shared = tid.startswith(SHARED_BLOB_TESTS)
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    try:
        with zeo_forker.installed(role, tmp_path / "servers", shared_blobs=shared):
            case = factory()
            result = unittest.TestResult()
            case.run(result)
    finally:
        faulthandler.cancel_dump_traceback_later()
    problems = result.errors + result.failures
    if problems:
        pytest.fail("\n".join(text for _, text in problems), pytrace=False)
    if result.skipped:
        pytest.skip(result.skipped[0][1])
