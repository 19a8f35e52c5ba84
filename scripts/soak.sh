#!/usr/bin/env bash
# Soak: a release server on its own SQLite data dir, 10k room connections with steady
# traffic for 30 minutes (`switchboard bench soak`): the server's RSS, open files and the
# delivery latency every interval, then the drift. Fails on any lost, repeated or
# unacknowledged message, a dropped connection or a server that dies.
#
#   scripts/soak.sh                 # 10k connections, 30 minutes, a line every 30 s
#   scripts/soak.sh --short         # CI: 2k connections for 30 s, a line every 5 s
#   scripts/soak.sh -- ARGS...      # extra arguments for `bench soak` (later ones win)
#
# Loopback only; the server runs on core 0, the load on core 1. Every connection comes
# from 127.0.0.1, so the server's limits per address are off for the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ARGS=(--connections 10000 --rooms 100 --rate 200 --duration 30m --interval 30s)
if [[ "${1:-}" == "--short" ]]; then
    ARGS=(--connections 2000 --rooms 20 --rate 200 --duration 30s --interval 5s --churn 0.05)
    shift
fi
[[ "${1:-}" == "--" ]] && shift
ARGS+=("$@")

cargo build --release --quiet -p switchboard -p switchboard-bench
BIN="$ROOT/target/release/switchboard"

WORK="$(mktemp -d)"
SERVER=""
# The server is stopped (SIGTERM, then SIGKILL after 15 s) and waited for before its
# directory goes.
cleanup() {
    if [[ -n "$SERVER" ]] && kill "$SERVER" 2>/dev/null; then
        for _ in $(seq 1 150); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
# Server on core 0, load on core 1 (taskset execs the command: $! is the server itself).
PIN0=() PIN1=()
if command -v taskset >/dev/null && (($(nproc) > 1)); then PIN0=(taskset -c 0) PIN1=(taskset -c 1); fi

cat > "$WORK/soak.toml" <<'TOML'
max_connections_per_ip = 0
handshakes_per_ip_per_sec = 0.0
TOML
PORT="$(free_port)"
# The server gets the process's hard open-file limit (10k connections need more than
# the usual soft 1024).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NO_COLOR=1 "${PIN0[@]}" "$BIN" serve --listen "127.0.0.1:$PORT" --data-dir "$WORK/data" \
    --config "$WORK/soak.toml" 2>"$WORK/server.log" &
SERVER=$!
wait_port "$PORT"
echo "soak: server pid $SERVER on 127.0.0.1:$PORT, history in $WORK/data"
status=0
NO_COLOR=1 "${PIN1[@]}" "$BIN" bench soak "ws://127.0.0.1:$PORT" --server-pid "$SERVER" "${ARGS[@]}" || status=$?
if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "soak: the server died; its log:" >&2
    tail -20 "$WORK/server.log" >&2
    status=1
fi
if grep -qE ' (ERROR|WARN) ' "$WORK/server.log"; then
    echo "soak: the server logged warnings or errors (the first five):"
    grep -m5 -E ' (ERROR|WARN) ' "$WORK/server.log" || true
fi
exit "$status"
