#!/usr/bin/env bash
# Fan-out through a cluster: one Switchboard node on Redis, then two (subscribers spread
# over both, the publisher on the first), with a standalone node for reference; and the
# Redis commands each published message costs (from INFO commandstats).
#
#   scripts/cluster-bench.sh [SUBSCRIBERS] [RATES]
#
# Needs redis-server and a release build (cargo build --release). Loopback only; nodes
# and Redis share core 0, the load runs on core 1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SUBSCRIBERS="${1:-2000}"
RATES="${2:-10,50,100,200,500,1000,2000}"
BIN="$ROOT/target/release/switchboard"
[[ -x "$BIN" ]] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install -y redis-server)" >&2; exit 1; }

WORK="$(mktemp -d)"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

REDIS_PORT="$(free_port)"
taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" >/dev/null &
PIDS+=($!)
wait_port "$REDIS_PORT"
REDIS="redis://127.0.0.1:$REDIS_PORT"
printf 'rate_limit_per_sec = 1000000000.0\nrate_limit_burst = 1000000000\nmax_connections_per_ip = 0\nhandshakes_per_ip_per_sec = 0.0\n' > "$WORK/bench.toml"

node() { # node PORT [--redis URL]
    local port="$1"; shift
    taskset -c 0 "$BIN" serve --listen "127.0.0.1:$port" --memory --workers 1 \
        --config "$WORK/bench.toml" "$@" 2>"$WORK/node-$port.log" &
    PIDS+=($!)
    wait_port "$port"
}

fanout() { # fanout LABEL URL [--also URL]
    local label="$1"; shift
    local before after
    before="$(redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r')"
    taskset -c 1 "$BIN" bench fanout "$@" --subscribers "$SUBSCRIBERS" --rates "$RATES" \
        --step-secs 3 --p99-bound-ms 250 --json > "$WORK/$label.json"
    after="$(redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r')"
    python3 - "$label" "$WORK/$label.json" <<EOF
import json, re, sys
label, path = sys.argv[1], sys.argv[2]
result = json.load(open(path))
held = [s for s in result["steps"] if s["held"]]
best = max(held, key=lambda s: s["delivered_per_sec"]) if held else None
def stats(text):
    out = {}
    for name, calls in re.findall(r"cmdstat_(\w+):calls=(\d+)", text):
        out[name] = int(calls)
    return out
before, after = stats("""$before"""), stats("""$after""")
delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
published = sum(s["published"] for s in result["steps"])
if best:
    print(f"{label}: {best['delivered_per_sec']:,.0f} delivered msg/s held (publish {best['rate']:g}/s, p99 {best['p99_ms']:.1f} ms)")
else:
    print(f"{label}: no rate held")
if published and delta.get("publish"):
    per = {k: v / published for k, v in sorted(delta.items()) if v and k not in ("info",)}
    print("  Redis commands per published message: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
EOF
}

A="$(free_port)"; node "$A"
fanout "one node, no Redis" "ws://127.0.0.1:$A/room/bench"

B="$(free_port)"; node "$B" --redis "$REDIS"
fanout "one node on Redis" "ws://127.0.0.1:$B/room/bench1"

C="$(free_port)"; node "$C" --redis "$REDIS"
fanout "two nodes on Redis" "ws://127.0.0.1:$B/room/bench2" --also "ws://127.0.0.1:$C/room/bench2"
