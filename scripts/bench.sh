#!/usr/bin/env bash
# Side-by-side benchmark: builds Switchboard and the peer servers (peers/, other engines
# and a raw TCP echo) in release mode, then runs `switchboard bench compare`, each server
# pinned to core 0 and the load to core 1. Extra arguments go to `compare` (`--quick` for
# the short CI run). Results: reports/bench/compare.{md,json,svg}.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

cargo build --release --quiet -p switchboard -p switchboard-bench
cargo build --release --quiet --manifest-path peers/Cargo.toml
exec target/release/switchboard bench compare \
    --peers peers/target/release/switchboard-peers --out reports/bench "$@"
