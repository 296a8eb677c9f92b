"""zeo.conf compatibility (the same files runzeo reads), TLS, pid file and log file."""
import os
import signal
import ssl
import subprocess
import sys
import time

import pytest
import transaction
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage

from conftest import free_port, wait_for_port, zeors_binary, db, Server

import ZODB


class Proc:
    def __init__(self, args, port, log):
        self.log = log
        self.logfile = open(log, "ab")
        self.proc = subprocess.Popen(args, stdout=self.logfile, stderr=subprocess.STDOUT)
        wait_for_port(port, self.proc)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(20)
        self.logfile.close()
        return rc


def runzeo(conf, port, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "runzeo")
    return Proc([exe, "-C", str(conf)], port, tmp_path / "runzeo.log")


def zeors(conf, port, tmp_path):
    return Proc([zeors_binary(), "serve", "-C", str(conf)], port, tmp_path / "zeors.log")


def use(port, storage="1", key="k", value=None, **kw):
    d = ZODB.DB(ClientStorage(("127.0.0.1", port), storage=storage, wait_timeout=10, **kw))
    with d.transaction() as conn:
        root = conn.root()
        seen = dict(root)
        if value is not None:
            root[key] = value
    d.close()
    return seen


CONFS = {
    "plain": """
<zeo>
  address 127.0.0.1:{port}
</zeo>
<filestorage>
  path {dir}/Data.fs
</filestorage>
""",
    "defines-two-storages-logs": """
%define DIR {dir}
<zeo>
  address 127.0.0.1:{port}
  read-only false
  invalidation-queue-size 200
  pid-filename $DIR/zeo.pid
  transaction-timeout 30
</zeo>
<filestorage 1>
  path $DIR/one.fs
</filestorage>
<filestorage 2>
  path ${{DIR}}/two.fs
  pack-keep-old false
</filestorage>
<eventlog>
  level INFO
  <logfile>
    path $DIR/server.log
    format %(asctime)s %(message)s
  </logfile>
</eventlog>
""",
}


@pytest.mark.parametrize("shape", sorted(CONFS))
def test_runzeo_and_zeors_serve_the_same_conf(shape, tmp_path):
    port = free_port()
    conf = tmp_path / "zeo.conf"
    conf.write_text(CONFS[shape].format(port=port, dir=tmp_path))
    storages = ["1", "2"] if "two" in shape else ["1"]

    stock = runzeo(conf, port, tmp_path)
    for name in storages:
        use(port, name, "by", f"runzeo-{name}")
    assert stock.stop() == 0

    ours = zeors(conf, port, tmp_path)
    for name in storages:
        assert use(port, name, "by", f"zeors-{name}")["by"] == f"runzeo-{name}"
    if "pid" in CONFS[shape]:
        assert (tmp_path / "zeo.pid").read_text().strip() == str(ours.proc.pid)
    assert ours.stop() == 0
    if "pid" in CONFS[shape]:
        assert not (tmp_path / "zeo.pid").exists()
        assert "listening" in (tmp_path / "server.log").read_text()

    stock = runzeo(conf, port, tmp_path)
    for name in storages:
        assert use(port, name)["by"] == f"zeors-{name}"
    assert stock.stop() == 0


def test_proxy_conf_with_zeoclient(make_server, tmp_path):
    upstream = make_server(path=tmp_path / "upstream.fs")
    use(upstream.port, "1", "x", "upstream value")
    for impl in ("runzeo", "zeors"):
        port = free_port()
        conf = tmp_path / f"proxy-{impl}.conf"
        conf.write_text(
            f"""
<zeo>
  address 127.0.0.1:{port}
</zeo>
<zeoclient 1>
  server 127.0.0.1:{upstream.port}
  storage 1
  cache-size 20MB
  var {tmp_path}
  client proxy-{impl}
</zeoclient>
"""
        )
        p = runzeo(conf, port, tmp_path) if impl == "runzeo" else zeors(conf, port, tmp_path)
        assert use(port, "1", "via", impl)["x"] == "upstream value"
        assert p.stop() == 0
    assert use(upstream.port)["via"] == "zeors"


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("<zeo>\n  address 127.0.0.1:1\n  no-such-key 1\n</zeo>\n<filestorage>\n  path {dir}/x.fs\n</filestorage>\n", "zeo.conf:3"),
        ("<zeo>\n  address 127.0.0.1:1\n</zeo>\n<filestorage>\n  path {dir}/x.fs\n  colour blue\n</filestorage>\n", "zeo.conf:6"),
        ("<zeo>\n  address 127.0.0.1:1\n</zeo>\n<nosuchsection>\n</nosuchsection>\n", "nosuchsection"),
    ],
)
def test_bad_conf_is_refused_with_a_line_number(bad, needle, tmp_path):
    conf = tmp_path / "zeo.conf"
    conf.write_text(bad.format(dir=tmp_path))
    r = subprocess.run([zeors_binary(), "serve", "-C", str(conf)], capture_output=True, text=True, timeout=20)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
    exe = os.path.join(os.path.dirname(sys.executable), "runzeo")
    r = subprocess.run([exe, "-C", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, "runzeo accepted it too?"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """A CA, a server certificate for localhost and a client certificate, plus a client
    certificate from another CA."""
    for ca in ("ca", "otherca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    for name, ca in (("server", "ca"), ("client", "ca"), ("intruder", "otherca")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={'localhost' if name == 'server' else name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        ext = d / f"{name}.ext"
        # The key identifiers OpenSSL's strict checks (which ZEO turns on) require.
        ext.write_text(("subjectAltName=DNS:localhost,IP:127.0.0.1\n" if name == "server" else "extendedKeyUsage=clientAuth\n")
                       + "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-days", "2", "-extfile", ext.name, "-out", f"{name}.pem", cwd=d)


def client_context(d, cert=None):
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(d / f"{cert}.pem"), str(d / f"{cert}.key"))
    return ctx


def test_tls_with_client_certificates(tmp_path):
    make_pki(tmp_path)
    port = free_port()
    conf = tmp_path / "zeo.conf"
    conf.write_text(
        f"""
<zeo>
  address 127.0.0.1:{port}
  <ssl>
    certificate {tmp_path}/server.pem
    key {tmp_path}/server.key
    authenticate {tmp_path}/ca.pem
  </ssl>
</zeo>
<filestorage>
  path {tmp_path}/Data.fs
</filestorage>
"""
    )
    server = zeors(conf, port, tmp_path)
    good = ZODB.DB(ClientStorage(("127.0.0.1", port), ssl=client_context(tmp_path, "client"),
                                 ssl_server_hostname="localhost", wait_timeout=10))
    with good.transaction() as conn:
        conn.root()["secret"] = PersistentMapping({"ok": True})
    good.close()
    from ZEO.Exceptions import ClientDisconnected

    for cert in (None, "intruder"):
        with pytest.raises(ClientDisconnected):
            ClientStorage(("127.0.0.1", port), ssl=client_context(tmp_path, cert),
                          ssl_server_hostname="localhost", wait_timeout=3)
    # Plain TCP is not served either.
    with pytest.raises(ClientDisconnected):
        ClientStorage(("127.0.0.1", port), wait_timeout=3)
    assert server.stop() == 0
    log = (tmp_path / "zeors.log").read_text()
    assert "TLS handshake failed" in log


def test_sighup_reopens_the_log_file(tmp_path):
    port = free_port()
    conf = tmp_path / "zeo.conf"
    log = tmp_path / "zeo.log"
    conf.write_text(
        f"""
<zeo>
  address 127.0.0.1:{port}
</zeo>
<filestorage>
  path {tmp_path}/Data.fs
</filestorage>
<eventlog>
  level debug
  <logfile>
    path {log}
  </logfile>
</eventlog>
"""
    )
    server = zeors(conf, port, tmp_path)
    use(port, "1", "a", 1)
    rotated = tmp_path / "zeo.log.1"
    log.rename(rotated)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while time.time() < deadline and not log.exists():
        time.sleep(0.05)
    assert log.exists(), "SIGHUP did not reopen the log file"
    use(port, "1", "b", 2)
    assert server.stop() == 0
    assert "listening" in rotated.read_text()
    assert "registered" in log.read_text() or "connected" in log.read_text()
