# Sourced by scripts/test.sh (from the repository root): makes ./.venv-zrs with zc.zrs
# and the older ZODB its secondary needs (interop/requirements-zrs.txt), reinstalling
# only when that file changes. The interop tests run zc.zrs primaries and secondaries
# with this Python ($ZEORS_ZRS_PYTHON).
ZRS_PYTHON_BASE=${PYTHON:-python3}
ZRS_VENV=.venv-zrs
ZRS_REQS=interop/requirements-zrs.txt
ZRS_STAMP=$ZRS_VENV/.requirements.sha

if [ ! -x "$ZRS_VENV/bin/python" ]; then
    echo "== creating $ZRS_VENV"
    "$ZRS_PYTHON_BASE" -m venv "$ZRS_VENV"
fi
zrs_want=$(sha256sum "$ZRS_REQS" | cut -d' ' -f1)
if [ "$(cat "$ZRS_STAMP" 2>/dev/null)" != "$zrs_want" ]; then
    echo "== installing zc.zrs"
    "$ZRS_VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$ZRS_REQS"
    echo "$zrs_want" > "$ZRS_STAMP"
fi
export ZEORS_ZRS_PYTHON="$PWD/$ZRS_VENV/bin/python"
