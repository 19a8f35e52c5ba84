#!/usr/bin/env bash
# Runs Centrifugo's Python SDK (centrifuge-python) and server-API client (cent), and
# Pusher's server library (pusher, test_pusher.py), unchanged, against a Switchboard
# binary: SWITCHBOARD_BIN, by default target/release/switchboard. Installs
# requirements.txt into .venv when missing.
# Extra arguments go to pytest (e.g. -k recovery).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
VENV="$ROOT/.venv"

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
# pip install only when a pin is not met (pip check-free: compare installed versions).
if ! "$VENV/bin/python" - "$HERE/requirements.txt" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, want = line.partition("==")
    try:
        ok &= version(name) == want
    except PackageNotFoundError:
        ok = False
sys.exit(0 if ok else 1)
PY
then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$HERE/requirements.txt"
fi

export SWITCHBOARD_BIN="${SWITCHBOARD_BIN:-$ROOT/target/release/switchboard}"
if [[ ! -x "$SWITCHBOARD_BIN" ]]; then
    echo "no server binary at $SWITCHBOARD_BIN (build it, or set SWITCHBOARD_BIN)" >&2
    exit 1
fi
cd "$HERE"
exec "$VENV/bin/python" -m pytest -q "$@"
