"""Runs ZEO's own tests against zeors: a replacement for ZEO's test forker.

ZEO's test modules start their servers through one function,
`ZEO._forker.start_zeo_server(storage_conf, zeo_conf, port, keep, ...)` (re-exported as
`ZEO.tests.forker.start_zeo_server`, and used by `ZEO.server()`), which writes a runzeo
configuration and runs the Python server in a subprocess. `installed(role)` swaps that
function for one that starts the server of a *role* from the same configuration, so the
tests themselves run unchanged:

- `direct`: zeors serving the storage (`zeors serve -C`, the same configuration file);
- `proxy-zeors`: a zeors proxy (`<zeoclient>`), with the test's `<zeo>` settings, in front
  of a zeors upstream serving the test's storage;
- `proxy-stock`: the same zeors proxy in front of the stock server (runzeo);
- `stock`, `stock-proxy-stock`, `stock-proxy-zeors`: the stock server in the same three
  roles (the stock proxy is runzeo with a `<zeoclient>` storage), the baseline.

What the translation does, since zeors serves FileStorages only and the test
configurations name a few Python storages:

- `<blobstorage>` around a `<filestorage>` becomes the `<filestorage>` with `blob-dir`
  (zeors' FileStorage has blobs built in);
- `<mappingstorage>` becomes a FileStorage in a fresh file, removed when the server stops
  (what a MappingStorage's contents do);
- `create true` (which empties the file at start, and which zeors refuses in a
  configuration file) becomes removing the file before the start;
- a server stopped without `keep` removes its storage files, as the stock runner's
  `storage.cleanup()` does (and a proxy's cache with them, since it caches that storage).

In the proxy roles the storage options (path, blob directory, storage read-only) go to the
upstream server and the `<zeo>` options (address, read-only, invalidation queue,
transaction timeout, conflict resolution, log) to the proxy, which is the server the
test's clients talk to. Blobs: the proxy keeps its own blob cache, or, for tests whose
clients share the server's blob directory (`shared_blob_dir`), shares upstream's.

Storages that only exist in Python (`<hexstorage>`, `<demostorage>`, the load-delaying
wrapper) and a server impersonating an older protocol raise `NotApplicable`: those tests
are not run against zeors (see test_zeo_suites.py).
"""
import contextlib
import hashlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from conftest import free_port, zeors_binary

ROLES = ("direct", "proxy-zeors", "proxy-stock", "stock", "stock-proxy-stock", "stock-proxy-zeors")
ZEORS_ROLES = ROLES[:3]


class NotApplicable(Exception):
    """The test's server configuration cannot be served by zeors."""


# --- a small reader of the ZConfig text the tests write -----------------------------------

class Section:
    def __init__(self, kind, name=None):
        self.kind = kind
        self.name = name
        self.keys = []  # (key, value) in order
        self.sections = []

    def get(self, key, default=None):
        for k, v in self.keys:
            if k == key:
                return v
        return default

    def set(self, key, value):
        self.keys = [(k, v) for k, v in self.keys if k != key]
        if value is not None:
            self.keys.append((key, value))

    def render(self, indent=""):
        head = self.kind + (" " + self.name if self.name else "")
        out = [f"{indent}<{head}>"]
        out += [f"{indent}  {k} {v}" for k, v in self.keys]
        for s in self.sections:
            out.append(s.render(indent + "  "))
        out.append(f"{indent}</{self.kind}>")
        return "\n".join(out)


def parse(text):
    """The top-level sections and `%import`s of a ZConfig text."""
    root = Section("root")
    stack = [root]
    imports = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("%import"):
            imports.append(line.split(None, 1)[1])
            continue
        if line.startswith("</"):
            stack.pop()
            continue
        if line.startswith("<"):
            body = line[1:-1].strip()
            closed = body.endswith("/")
            body = body.rstrip("/").strip()
            parts = body.split(None, 1)
            s = Section(parts[0].lower(), parts[1] if len(parts) > 1 else None)
            stack[-1].sections.append(s)
            if not closed:
                stack.append(s)
            continue
        parts = line.split(None, 1)
        stack[-1].keys.append((parts[0].lower(), parts[1] if len(parts) > 1 else ""))
    return root.sections, imports


def truthy(v):
    return str(v).lower() in ("1", "true", "yes", "on")


# --- the storage of a test configuration ----------------------------------------------------

class Storage:
    """What the test asks the server to serve, in zeors' terms."""

    def __init__(self, section, imports):
        self.name = section.name or "1"
        self.temporary = False  # a MappingStorage's stand-in: removed at stop
        self.section = None  # a <filestorage> or <zeoclient> section zeors reads
        self.original = section
        self.imports = imports
        kind = section.kind
        if kind == "blobstorage":
            inner = [s for s in section.sections]
            if len(inner) != 1 or inner[0].kind != "filestorage":
                raise NotApplicable(f"<blobstorage> around <{inner[0].kind if inner else ''}>")
            fs = inner[0]
            sec = Section("filestorage", self.name)
            sec.keys = list(fs.keys)
            sec.set("blob-dir", section.get("blob-dir"))
            self.section = sec
        elif kind == "filestorage":
            sec = Section("filestorage", self.name)
            sec.keys = list(section.keys)
            self.section = sec
        elif kind == "mappingstorage":
            sec = Section("filestorage", self.name)
            workdir = _current["harness"].workdir
            fd, path = tempfile.mkstemp(prefix="mapping-", suffix=".fs", dir=workdir)
            os.close(fd)
            os.remove(path)
            sec.set("path", path)
            self.section = sec
            self.temporary = True
        elif kind in ("zeoclient", "clientstorage"):
            sec = Section("zeoclient", self.name)
            sec.keys = list(section.keys)
            self.section = sec
        else:
            raise NotApplicable(f"storage <{kind}> exists only in Python")
        if imports and kind not in ("zeoclient",):
            raise NotApplicable(f"%import {imports}: a Python storage")

    @property
    def is_proxy(self):
        return self.section.kind == "zeoclient"

    @property
    def path(self):
        p = self.section.get("path")
        return os.path.abspath(p) if p else None

    @property
    def blob_dir(self):
        b = self.section.get("blob-dir")
        return os.path.abspath(b) if b else None

    @property
    def read_only(self):
        return truthy(self.section.get("read-only", "false"))

    def for_zeors(self, shared_blobs=False):
        """The section zeors reads, after applying `create` (which empties the file).
        With `shared_blobs` (the test's clients share the blob directory), the storage is
        configured so: zeors accepts `storeBlobShared` only from a storage declared
        shared, where the stock server accepts it from any."""
        sec = Section(self.section.kind, self.section.name)
        sec.keys = [(k, v) for k, v in self.section.keys if k != "create"]
        if shared_blobs and self.blob_dir and sec.get("shared-blob-dir") is None:
            sec.set("shared-blob-dir", "true")
        if truthy(self.section.get("create", "false")):
            remove_storage_files(self.path)
        return sec

    def cleanup(self):
        """What the stock runner's `storage.cleanup()` removes when a server stops
        without `keep`: the FileStorage's files."""
        if self.path:
            remove_storage_files(self.path)


def remove_storage_files(path):
    for ext in ("", ".old", ".tmp", ".lock", ".index", ".pack"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + ext)


# --- processes ------------------------------------------------------------------------------

def _die_with_parent():
    """In the child: SIGKILL when the test process dies (a test that hangs is ended by
    faulthandler's exit, which runs no cleanup)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_listening(addr, proc, log, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening:\n"
                               + read_head(log))
        try:
            if isinstance(addr, str):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(addr)
            else:
                socket.create_connection(addr, timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"server did not listen on {addr} within {timeout}s:\n" + read_tail(log))


def read_head(path, n=3000):
    try:
        return pathlib.Path(path).read_text(errors="replace")[:n]
    except OSError:
        return ""


def read_tail(path, n=4000):
    try:
        return pathlib.Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


class Harness:
    """Where the servers of one test keep their configuration files, logs and proxy
    caches (outside the test's own working directory, which tests list), and which
    processes are still running."""

    def __init__(self, role, workdir, shared_blobs=False):
        self.role = role
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.shared_blobs = shared_blobs
        self.procs = []  # every zeors process started, to reap at the end
        self.stops = []
        self.counter = 0

    def _file(self, stem, ext):
        self.counter += 1
        return self.workdir / f"{stem}-{self.counter}{ext}"

    def run_zeors(self, conf_text, addr):
        conf = self._file("zeors", ".conf")
        conf.write_text(conf_text)
        log = conf.with_suffix(".log")
        logf = open(log, "ab")
        proc = subprocess.Popen([zeors_binary(), "serve", "-C", str(conf)],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                preexec_fn=_die_with_parent)
        logf.close()
        self.procs.append((proc, log))
        wait_listening(addr, proc, log)
        return proc, log

    def stop_zeors(self, proc, log, timeout=20):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"zeors did not stop on SIGTERM within {timeout}s:\n"
                                     + read_tail(log))
        if proc.returncode != 0:
            raise AssertionError(f"zeors exited with {proc.returncode}:\n" + read_tail(log))

    def close(self):
        """Stops whatever a test left running (a failed test, a test that expects the
        setup stack to stop its servers)."""
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def address_of(zeo):
    """(host, port) or a unix socket path, with a free port chosen for port 0."""
    a = zeo.get("address")
    if "/" in a or a.startswith("."):
        return a, a
    if ":" in a:
        host, port = a.rsplit(":", 1)
    else:
        host, port = "127.0.0.1", a
    host = host or "127.0.0.1"
    port = int(port) if port else 0
    if port == 0:
        port = free_port()
    return (host, port), f"{host}:{port}"


def split_zeo_conf(text):
    """The <zeo> section and the rest (<eventlog>) of a ZEO configuration text."""
    sections, _ = parse(text)
    zeo = next(s for s in sections if s.kind == "zeo")
    others = [s for s in sections if s.kind != "zeo"]
    return zeo, others


# --- the replacement of ZEO._forker.start_zeo_server ------------------------------------------

_original = {}
_current = {"harness": None}


def _normalise(storage_conf, zeo_conf, port, path, blob_dir, log):
    """The same defaults as ZEO._forker.start_zeo_server."""
    from ZEO._forker import ZEOConfig
    if not storage_conf:
        storage_conf = "<filestorage>\npath %s\n</filestorage>" % path
    if blob_dir:
        storage_conf = f"<blobstorage>\nblob-dir {blob_dir}\n{storage_conf}\n</blobstorage>"
    if zeo_conf is None or isinstance(zeo_conf, dict):
        if port is None:
            port = 0
        addr = ("127.0.0.1", port) if isinstance(port, int) else port
        z = ZEOConfig(addr, log=log)
        if zeo_conf:
            z.__dict__.update(zeo_conf)
        zeo_conf = z
    return storage_conf, str(zeo_conf)


def start_zeo_server(storage_conf=None, zeo_conf=None, port=None, keep=False,
                     path="Data.fs", protocol=None, blob_dir=None, suicide=True,
                     debug=False, threaded=False, start_timeout=33, name=None, log=None,
                     show_config=False):
    h = _current["harness"]
    if h is None or h.role == "stock":
        return _original["start"](storage_conf, zeo_conf, port, keep, path, protocol,
                                  blob_dir, suicide, debug, threaded, start_timeout, name,
                                  log, show_config)
    storage_conf, zeo_text = _normalise(storage_conf, zeo_conf, port, path, blob_dir, log)
    if zeo_conf is not None and not isinstance(zeo_conf, dict) and port:
        # ZEO's forker ignores `port` when given a ZEOConfig: so do we.
        pass
    sections, imports = parse(storage_conf)
    if h.role.startswith("stock-proxy"):
        return _start_stock_proxy(h, sections, imports, storage_conf, zeo_text, keep)
    if protocol:
        raise NotApplicable(f"a server speaking protocol {protocol!r} (zeors speaks ZEO 5)")
    storages = [Storage(s, imports) for s in sections]
    zeo, others = split_zeo_conf(zeo_text)
    if h.role == "direct" or all(s.is_proxy for s in storages):
        return _start_zeors(h, storages, zeo, others, keep)
    return _start_zeors_proxy(h, storages, storage_conf, zeo, others, keep)


def _render(zeo, others, storage_sections):
    return "\n".join([zeo.render()] + [o.render() for o in others]
                     + [s.render() for s in storage_sections]) + "\n"


def _cleanup(storages, keep):
    for s in storages:
        if s.temporary or not keep:
            s.cleanup()


def _start_zeors(h, storages, zeo, others, keep):
    addr, spelled = address_of(zeo)
    zeo.set("address", spelled)
    proc, log = h.run_zeors(_render(zeo, others, [s.for_zeors(h.shared_blobs) for s in storages]), addr)

    def stop(stop_timeout=99):
        try:
            h.stop_zeors(proc, log, stop_timeout)
        finally:
            _cleanup(storages, keep)

    return addr, stop


def _proxy_section(h, storage, upstream_addr, cache_dir):
    """The <zeoclient> section of a proxy of `storage` served at `upstream_addr`."""
    sec = Section("zeoclient", storage.name)
    sec.set("server", "%s:%s" % upstream_addr)
    sec.set("storage", storage.name)
    sec.set("var", str(cache_dir))
    if storage.read_only:
        sec.set("read-only", "true")
    if storage.blob_dir:
        if h.shared_blobs:
            sec.set("blob-dir", storage.blob_dir)
            sec.set("shared-blob-dir", "true")
        else:
            sec.set("blob-dir", str(cache_dir) + "-blobs")
    return sec


def _cache_dir(h, storage):
    """A proxy's cache lives as long as the storage it caches: a server restarted on a
    kept file finds its cache again."""
    key = hashlib.sha1(f"{storage.name}:{storage.path}".encode()).hexdigest()[:12]
    return h.workdir / f"proxy-cache-{key}"


def _drop_caches(h, storages, keep):
    for s in storages:
        if s.temporary or not keep:
            cache = _cache_dir(h, s)
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(str(cache) + "-blobs", ignore_errors=True)


def _start_upstream(h, storages, storage_conf, zeo, keep):
    """The upstream server of a proxy role, zeors or stock, serving `storages`. Of the
    test's <zeo> settings, client-conflict-resolution is upstream's too: conflicts are
    detected there (zeors always leaves resolution to the clients)."""
    port = free_port()
    if h.role in ("proxy-stock", "stock-proxy-stock"):
        from ZEO._forker import ZEOConfig
        conf = ZEOConfig(("127.0.0.1", port))
        if truthy(zeo.get("client-conflict-resolution", "false")):
            conf.client_conflict_resolution = "true"
        addr, stop = _original["start"](storage_conf, conf, None, keep)
        return tuple(addr), stop
    zeo = Section("zeo")
    zeo.set("address", f"127.0.0.1:{port}")
    proc, log = h.run_zeors(_render(zeo, [], [s.for_zeors(h.shared_blobs) for s in storages]),
                            ("127.0.0.1", port))

    def stop(stop_timeout=99):
        try:
            h.stop_zeors(proc, log, stop_timeout)
        finally:
            _cleanup(storages, keep)

    return ("127.0.0.1", port), stop


def _start_zeors_proxy(h, storages, storage_conf, zeo, others, keep):
    up_addr, up_stop = _start_upstream(h, storages, storage_conf, zeo, keep)
    addr, spelled = address_of(zeo)
    zeo.set("address", spelled)
    secs = [_proxy_section(h, s, up_addr, _cache_dir(h, s)) for s in storages]
    try:
        proc, log = h.run_zeors(_render(zeo, others, secs), addr)
    except Exception:
        up_stop()
        raise

    def stop(stop_timeout=99):
        try:
            h.stop_zeors(proc, log, stop_timeout)
        finally:
            up_stop()
            _drop_caches(h, storages, keep)

    return addr, stop


def _start_stock_proxy(h, sections, imports, storage_conf, zeo_text, keep):
    """runzeo with <zeoclient> storages, in front of a stock or zeors upstream."""
    if all(s.kind in ("zeoclient", "clientstorage") for s in sections):
        return _original["start"](storage_conf, zeo_text, None, keep)
    storages = [Storage(s, imports) for s in sections]
    zeo, _ = split_zeo_conf(zeo_text)
    up_addr, up_stop = _start_upstream(h, storages, storage_conf, zeo, keep)
    secs = []
    for s in storages:
        cache = _cache_dir(h, s)
        cache.mkdir(parents=True, exist_ok=True)
        secs.append(_proxy_section(h, s, up_addr, cache))
    try:
        addr, stop = _original["start"]("\n".join(x.render() for x in secs), zeo_text,
                                        None, keep)
    except Exception:
        up_stop()
        raise

    def both(stop_timeout=99):
        try:
            stop(stop_timeout)
        finally:
            up_stop()
            _drop_caches(h, storages, keep)

    return addr, both


@contextlib.contextmanager
def installed(role, workdir, shared_blobs=False):
    """Within the block, ZEO's tests start the servers of `role`."""
    import ZEO._forker
    import ZEO.tests.forker
    if not _original:
        _original["start"] = ZEO._forker.start_zeo_server
    h = Harness(role, workdir, shared_blobs)
    _current["harness"] = h
    import ZEO.tests.testConfig
    modules = (ZEO._forker, ZEO.tests.forker, ZEO.tests.testConfig)
    for m in modules:
        m.start_zeo_server = start_zeo_server
    try:
        yield h
    finally:
        for m in modules:
            m.start_zeo_server = _original["start"]
        _current["harness"] = None
        h.close()
