"""What an operator sees: error messages, which files a start creates, colour in logs,
the words for damage, and progress on long work.

Every case runs the real binary the way a person or an init system would (a pipe or a log
file for stderr, or a pseudo-terminal) and looks at exactly what it printed and left on
disk.
"""
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from persistent.mapping import PersistentMapping

from conftest import db, free_port, wait_for_port, zeors_binary

ANSI = "\x1b["


def run(*args, env=None, cwd=None, timeout=60, binary=None, **kw):
    e = dict(os.environ)
    e.pop("NO_COLOR", None)
    e.update(env or {})
    return subprocess.run(
        [binary or zeors_binary(), *args], capture_output=True, text=True, env=e, cwd=cwd, timeout=timeout, **kw
    )


def one_error_line(r):
    """The stderr of a failed run: exactly one line, `zeors: error: ...`."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("zeors: error: "), r.stderr
    assert "backtrace" not in r.stderr.lower() and ANSI not in r.stderr
    return lines[0]


def make_fs(path, transactions=5):
    d = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    conn = d.open()
    for i in range(transactions):
        conn.root()[f"x{i}"] = PersistentMapping(a=i)
        transaction.commit()
    d.close()
    for suffix in (".index", ".lock", ".tmp"):
        if os.path.exists(f"{path}{suffix}"):
            os.remove(f"{path}{suffix}")
    return path


def in_pty(args, env=None, until=None, timeout=30):
    """Runs zeors with stderr on a pseudo-terminal; returns (returncode, what it drew).
    With `until`, stops it with SIGTERM once that text appeared."""
    e = dict(os.environ)
    e.pop("NO_COLOR", None)
    e.update(env or {})
    master, slave = pty.openpty()
    proc = subprocess.Popen([zeors_binary(), *args], stdout=subprocess.DEVNULL, stderr=slave, env=e)
    os.close(slave)
    out = b""
    deadline = time.time() + timeout
    stopped = False
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        if until and not stopped and until.encode() in out:
            proc.send_signal(signal.SIGTERM)
            stopped = True
        if proc.poll() is not None and not ready:
            break
    os.close(master)
    if proc.poll() is None:
        proc.kill()
    proc.wait(20)
    return proc.returncode, out.decode(errors="replace")


# --- which files a start creates -----------------------------------------------------


def test_a_typo_in_the_path_is_an_error_not_a_new_database(tmp_path):
    target = tmp_path / "typo" / "dir" / "Data.fs"
    r = run("serve", "-a", f"127.0.0.1:{free_port()}", "-f", str(target))
    line = one_error_line(r)
    assert str(target) in line and "no such directory" in line, line
    assert not (tmp_path / "typo").exists(), "a mistyped path must not create directories"


def test_the_default_var_directory_is_created(tmp_path):
    port = free_port()
    e = dict(os.environ)
    proc = subprocess.Popen(
        [zeors_binary(), "serve", "-a", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=e,
    )
    try:
        wait_for_port(port, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert (tmp_path / "var" / "Data.fs").stat().st_size == 4  # the magic only


@pytest.mark.parametrize("case", ["port in use", "invalid port", "metrics port in use"])
def test_a_start_that_fails_leaves_no_new_database(tmp_path, case):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        address = {
            "port in use": f"127.0.0.1:{busy}",
            "invalid port": "127.0.0.1:99999",
        }.get(case, f"127.0.0.1:{free_port()}")
        extra = ["--metrics-address", f"127.0.0.1:{busy}"] if case == "metrics port in use" else []
        r = run("serve", "-a", address, "-f", str(tmp_path / "Data.fs"), *extra)
    finally:
        holder.close()
    line = one_error_line(r)
    assert (str(busy) if "in use" in case else address) in line, line
    assert sorted(os.listdir(tmp_path)) == [], "a failed start left files behind"


def test_the_default_directory_is_removed_again_after_a_failed_start(tmp_path):
    r = run("serve", "-a", "127.0.0.1:99999", cwd=tmp_path)
    one_error_line(r)
    assert not (tmp_path / "var").exists()


# --- error messages --------------------------------------------------------------------


def test_errors_are_one_line_without_backtrace_even_with_rust_backtrace(tmp_path):
    missing = tmp_path / "missing.fs"
    for args in (["check", str(missing)], ["info", str(missing)], ["dump", str(missing)], ["pack", str(missing)]):
        r = run(*args, env={"RUST_BACKTRACE": "1", "RUST_LIB_BACKTRACE": "1"})
        line = one_error_line(r)
        assert str(missing) in line and "No such file or directory" in line, line
        # Each cause once (it used to be "0: I/O error: X" and then "1: X").
        assert line.count("No such file or directory") == 1, line


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="needs POSIX users")
def test_permission_denied_names_the_path():
    # Root passes every permission check, so as root the server is run as `nobody`.
    base = tempfile.mkdtemp(prefix="zeors-perm-")
    try:
        os.chmod(base, 0o755)
        locked = os.path.join(base, "locked")
        os.mkdir(locked)
        os.chmod(locked, 0o555)
        as_nobody = None
        if os.geteuid() == 0:
            def as_nobody():
                os.setgid(65534)
                os.setuid(65534)
        # A copy of the binary that `nobody` may run wherever the checkout is.
        binary = os.path.join(base, "zeors")
        shutil.copy(zeors_binary(), binary)
        path = os.path.join(locked, "Data.fs")
        r = run("serve", "-a", f"127.0.0.1:{free_port()}", "-f", path, preexec_fn=as_nobody, binary=binary, cwd=base)
        line = one_error_line(r)
        assert "Permission denied" in line, line
        assert f"{path}.lock: Permission denied" in line or f"{path}: Permission denied" in line, line
    finally:
        shutil.rmtree(base)


# --- the same words for the same damage --------------------------------------------------


def test_check_info_and_serve_describe_a_torn_tail_alike(tmp_path):
    good = make_fs(tmp_path / "good.fs")
    data = good.read_bytes()
    torn = tmp_path / "torn.fs"
    torn.write_bytes(data[:-7])  # the last transaction lost its end, as in a crash
    checked = run("check", str(torn))
    assert checked.returncode == 1
    sentence = next(l for l in checked.stdout.splitlines() if "torn tail at offset" in l)
    sentence = sentence.split(": ", 1)[1]  # without the file name
    assert "runs past the end of the file" in sentence, sentence
    assert "format: OK up to the torn tail" in checked.stdout

    info = run("info", str(torn))
    assert info.returncode == 0, info.stderr
    assert f"damage: {sentence}" in info.stdout, info.stdout

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [zeors_binary(), "serve", "-a", f"127.0.0.1:{port}", "-f", str(torn)], stdout=f, stderr=f
        )
        wait_for_port(port, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert sentence in log.read_text(), log.read_text()
    assert run("check", str(torn)).returncode == 0  # the server moved the tail away


def test_check_and_serve_describe_damage_inside_the_file_alike(tmp_path):
    path = make_fs(tmp_path / "bad.fs")
    data = bytearray(path.read_bytes())
    # The second transaction's first data record points to the wrong transaction
    # (`tloc`), and valid transactions follow: damage, not a torn tail.
    first_tlen = int.from_bytes(data[12:20], "big")
    second = 4 + first_tlen + 8
    tlen = int.from_bytes(data[second + 8 : second + 16], "big")
    ulen, dlen, elen = data[second + 17], int.from_bytes(data[second + 18 : second + 20], "big"), int.from_bytes(data[second + 20 : second + 22], "big")
    record = second + 23 + ulen + dlen + elen
    tloc_at = record + 8 + 8 + 8
    data[tloc_at : tloc_at + 8] = (12345).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    assert tlen > 0

    checked = run("check", str(path))
    assert checked.returncode == 1
    words = f"damaged Data.fs at offset {second}: data record at {record} points to transaction 12345 instead of {second}"
    assert f"{path}: {words}" in checked.stdout, checked.stdout

    served = run("serve", "-a", f"127.0.0.1:{free_port()}", "-f", str(path))
    line = one_error_line(served)
    assert str(path) in line and words in line, line


# --- colour ------------------------------------------------------------------------------


def test_logs_to_a_file_or_pipe_have_no_colour(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [zeors_binary(), "serve", "-a", f"127.0.0.1:{port}", "-f", str(tmp_path / "Data.fs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "NO_COLOR"},
    )
    wait_for_port(port, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    text = out.decode()
    assert "listening" in text and ANSI not in text, repr(text)


def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path):
    port = free_port()
    args = ["serve", "-a", f"127.0.0.1:{port}", "-f", str(tmp_path / "Data.fs")]
    rc, drawn = in_pty(args, until="listening")
    assert rc == 0 and "listening" in drawn and ANSI in drawn, repr(drawn)
    rc, drawn = in_pty(args, env={"NO_COLOR": "1"}, until="listening")
    assert rc == 0 and "listening" in drawn and ANSI not in drawn, repr(drawn)


# --- progress ----------------------------------------------------------------------------


def big_fs(path, transactions=60, per=50):
    d = ZODB.DB(ZODB.FileStorage.FileStorage(str(path)))
    conn = d.open()
    root = conn.root()
    for t in range(transactions):
        for i in range(per):
            root[f"o{t}-{i}"] = PersistentMapping(v="x" * 200)
        transaction.commit()
    # Garbage for pack to remove.
    for t in range(transactions // 2):
        for i in range(per):
            del root[f"o{t}-{i}"]
    transaction.commit()
    d.close()
    return path


@pytest.mark.parametrize(
    "tool, phases",
    [
        (["check"], ["checking the format", "checking references"]),
        (["info", "--iterate"], ["reading every record"]),
        (["pack"], ["packing: reading to the pack time", "packing: copying to the pack time"]),
    ],
)
def test_progress_is_logged_when_not_on_a_terminal(tmp_path, tool, phases):
    path = big_fs(tmp_path / "Data.fs")
    # Every update is logged with a zero interval (the default, 10 s, keeps short work quiet).
    r = run(tool[0], str(path), *tool[1:], env={"ZEORS_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    assert ANSI not in r.stderr and "\r" not in r.stderr
    for phase in phases:
        lines = [l for l in r.stderr.splitlines() if f": {phase}: " in l]
        assert any("% (" in l and " left" in l for l in lines), (phase, r.stderr)
        assert any(": done, " in l for l in lines), (phase, r.stderr)
    quiet = run(tool[0], str(path), *tool[1:])
    assert quiet.returncode == 0 and "progress" not in quiet.stderr, quiet.stderr


def test_progress_is_a_bar_on_a_terminal(tmp_path):
    path = big_fs(tmp_path / "Data.fs")
    rc, drawn = in_pty(["check", str(path)])
    assert rc == 0, drawn
    assert "checking the format [" in drawn and "100%" in drawn, repr(drawn[-2000:])
    assert "left" in drawn and "/s" in drawn
    assert "zeors::progress" not in drawn  # a bar, not log lines


# --- the README documents every flag ---------------------------------------------------


@pytest.mark.parametrize("command", ["serve", "check", "dump", "info", "pack"])
def test_the_readme_documents_every_flag(command):
    import re

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    helped = run(command, "--help")
    assert helped.returncode == 0
    flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", helped.stdout, re.M)) - {"--help"}
    assert flags, helped.stdout
    if command == "serve":
        # The flag tables: `-a, --address ...` or `--upstream ...` in a cell.
        missing = [f for f in sorted(flags) if f"`{f}" not in readme and f", {f}" not in readme]
    else:
        # The tools' table: `check --no-refs`, `check -v, --verbose`.
        missing = [f for f in sorted(flags) if not re.search(rf"`{command} (?:-\w, )?{re.escape(f)}\b", readme)]
    assert missing == [], f"`zeors {command}` flags missing from README.md: {missing}"
