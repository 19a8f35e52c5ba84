#!/usr/bin/env bash
# Side-by-side benchmark: builds Switchboard and the peer servers (peers/, other engines
# and a raw TCP echo) in release mode, installs the Node peers (peers/node) with npm, then
# runs `switchboard bench compare`, each server pinned to core 0 and the load to core 1.
# Extra arguments go to `compare` (`--quick` for the short CI run). Results:
# reports/bench/compare.{md,json} and the charts compare-{echo,fanout,memory}.{svg,png}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

cargo build --release --quiet -p switchboard -p switchboard-bench
cargo build --release --quiet --manifest-path peers/Cargo.toml
# The Node peers (ws, Socket.IO) at the versions of peers/node/package-lock.json: installed
# when missing or older than the lock file, kept otherwise.
if [[ ! -f peers/node/node_modules/.package-lock.json ||
    peers/node/package-lock.json -nt peers/node/node_modules/.package-lock.json ]]; then
    command -v npm >/dev/null || {
        echo "bench.sh: the Node peers need node and npm (Debian: apt-get install nodejs npm)" >&2
        exit 1
    }
    npm ci --prefix peers/node --no-audit --no-fund --loglevel=error
fi
exec target/release/switchboard bench compare \
    --peers peers/target/release/switchboard-peers --out reports/bench "$@"
