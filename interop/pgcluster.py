"""A throwaway PostgreSQL cluster for the tests: made with `initdb`, started with
`pg_ctl` as an unprivileged user (the `postgres` account when the tests run as root), on
a unix socket in a temporary directory, and removed when stopped.

The server programs come from ZEORS_PG_BIN (set by scripts/postgres.sh, which installs
Debian's `postgresql` package when missing) or the newest /usr/lib/postgresql/*/bin.
"""
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile

import psycopg2


def pg_bin():
    d = os.environ.get("ZEORS_PG_BIN")
    if d and os.path.exists(os.path.join(d, "initdb")):
        return d
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: [int(x) if x.isdigit() else x for x in p.split("/")])
    if not found:
        raise RuntimeError("PostgreSQL's initdb not found: run scripts/postgres.sh (scripts/test.sh does)")
    return os.path.dirname(found[-1])


# The tests' settings: durability is not what they test, speed is welcome.
TEST_SETTINGS = {"fsync": "off", "full_page_writes": "off", "max_connections": "200"}


class PgCluster:
    _names = itertools.count()

    def __init__(self, settings=None):
        """`settings`: the server's `-c` options (TEST_SETTINGS unless given; the
        benchmark passes a production site's, fsync on)."""
        self.bin = pg_bin()
        self.settings = dict(TEST_SETTINGS if settings is None else settings)
        # Not tempfile.gettempdir(): ZODB's test base points it into a per-test directory
        # that is removed after each test, and the cluster outlives tests.
        self.dir = tempfile.mkdtemp(prefix="zeors-pg-", dir="/tmp")
        self.data = os.path.join(self.dir, "data")
        self.socket_dir = self.dir
        self.log = os.path.join(self.dir, "postgres.log")
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.running = False

    def _run(self, *args, check=True, timeout=120):
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--"] + cmd
        return subprocess.run(cmd, check=check, timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def init(self):
        self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        return self

    def start(self):
        opts = f"-k {self.socket_dir} -c listen_addresses=''" + "".join(
            f" -c {k}={v}" for k, v in self.settings.items())
        self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", self.log,
                  "-o", opts, "-w", "-t", "60", "start")
        self.running = True
        return self

    def stop(self, mode="fast"):
        if self.running:
            self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", mode, "-w",
                      "-t", "60", "stop", check=False)
            self.running = False

    def restart(self, mode="fast"):
        """Stops the server (`immediate`: as if it crashed) and starts it again."""
        self.stop(mode)
        self.start()

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def dsn(self, dbname="postgres"):
        return f"host={self.socket_dir} user=postgres dbname={dbname}"

    def connect(self, dbname="postgres"):
        conn = psycopg2.connect(self.dsn(dbname))
        conn.autocommit = True
        return conn

    def new_database(self, prefix="zodb"):
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        conn = self.connect()
        try:
            conn.cursor().execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return name

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""
