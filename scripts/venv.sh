# Sourced by scripts/test.sh and bench/server/run.sh (from the repository root): makes
# ./.venv with the Python packages pinned in interop/requirements.txt, reinstalling them
# only when that file changes.
PYTHON=${PYTHON:-python3}
VENV=.venv
REQS=interop/requirements.txt
STAMP=$VENV/.requirements.sha

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
want=$(sha256sum "$REQS" | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "== installing Python dependencies"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    echo "$want" > "$STAMP"
fi
