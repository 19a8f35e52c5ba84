#!/usr/bin/env bash
# Runs every test of the workspace. Python's `websockets` (an outside client the
# integration tests talk to) is installed into .venv first if it is missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

WEBSOCKETS_VERSION=17.4
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import websockets, sys; sys.exit(websockets.__version__ != '$WEBSOCKETS_VERSION')" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "websockets==$WEBSOCKETS_VERSION"
fi
export SWITCHBOARD_PYTHON="$ROOT/.venv/bin/python"

cargo test --workspace "$@"
