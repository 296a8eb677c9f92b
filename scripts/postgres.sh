# Sourced by scripts/test.sh: makes sure PostgreSQL's server programs (initdb, pg_ctl,
# postgres) are installed, from Debian's `postgresql` package when missing, and exports
# ZEORS_PG_BIN, the directory that holds them. The tests start throwaway clusters of
# their own with these programs (never a system-wide server).
find_pg_bin() {
    if [ -n "${ZEORS_PG_BIN:-}" ] && [ -x "$ZEORS_PG_BIN/initdb" ]; then
        echo "$ZEORS_PG_BIN"
        return 0
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

if ! ZEORS_PG_BIN=$(find_pg_bin); then
    echo "== installing PostgreSQL (Debian package postgresql)"
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    # The package may start a system cluster; the tests do not use it.
    ZEORS_PG_BIN=$(find_pg_bin) || { echo "PostgreSQL's initdb not found after installing"; exit 1; }
fi
export ZEORS_PG_BIN
echo "== PostgreSQL server programs: $ZEORS_PG_BIN"
