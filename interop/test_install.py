"""Installing zeors the way Zope and Plone operators install their servers: `pip install`
of the repository into a virtualenv puts a `zeors` command on that virtualenv's PATH.

The test does exactly that into a fresh virtualenv (pyproject.toml, maturin from PyPI as
the build backend), then runs the installed command: `--version`, and a server that a
ZODB client commits to and reads from. To stay cheap on a small machine it asks maturin
for the dev profile in the cargo target directory the rest of the suite uses
(`MATURIN_PEP517_ARGS=--profile dev`), so the build reuses what `cargo build` made and
takes seconds; an operator's `pip install` builds the release profile.
"""
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import transaction

from conftest import ROOT, Server, db, free_port, wait_for_port


def crate_version():
    text = (ROOT / "Cargo.toml").read_text()
    return re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', text, re.M | re.S).group(1)


def test_pip_install_puts_a_working_zeors_on_the_virtualenv_path(tmp_path):
    venv = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ)
    env["MATURIN_PEP517_ARGS"] = "--profile dev"
    env.setdefault("CARGO_TARGET_DIR", str(ROOT / "target"))
    started = time.time()
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(f"pip install took {time.time() - started:.1f} s")

    # On the virtualenv's PATH, as Zope's scripts are once it is activated.
    path = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    found = shutil.which("zeors", path=path)
    assert found == str(venv / "bin" / "zeors"), found
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"zeors {crate_version()}"
    listed = subprocess.run(
        [str(venv / "bin" / "pip"), "show", "zeors"], capture_output=True, text=True, check=True
    )
    assert f"Version: {crate_version()}" in listed.stdout

    # A serve smoke test with the installed command: a ZODB client commits and reads.
    port = free_port()
    data = tmp_path / "Data.fs"
    log = open(tmp_path / "installed.log", "wb")
    proc = subprocess.Popen([found, "serve", "-a", f"127.0.0.1:{port}", "-f", str(data)], stdout=log, stderr=log)
    try:
        wait_for_port(port, proc)
        server = Server(data, port=port)
        d = db(server)
        with d.transaction() as conn:
            conn.root()["installed"] = "by pip"
        d.close()
        d = db(server)
        with d.transaction() as conn:
            assert conn.root()["installed"] == "by pip"
        d.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.close()
    transaction.abort()
