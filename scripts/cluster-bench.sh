#!/usr/bin/env bash
# Fan-out through a cluster: one Switchboard node on Redis, then two (subscribers spread
# over both, the publisher on the first), with a standalone node for reference; and the
# Redis commands each published message costs (from INFO commandstats). Then, at one
# fixed publish rate every setup holds (FIXED_RATE, default 100/s), the node's own CPU
# per delivery (user + system, from /proc) alone, on one Redis, on three standalone
# Redis shards and on a Redis Cluster of three masters, rounds alternating, with each
# setup's ratio to the node alone.
#
#   scripts/cluster-bench.sh [SUBSCRIBERS] [RATES]
#   FIXED_RATE=100 ROUNDS=3 scripts/cluster-bench.sh 2000
#   FIXED_ONLY=1 scripts/cluster-bench.sh 2000     # the fixed-rate comparison alone
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

if [[ -z "${FIXED_ONLY:-}" ]]; then
A="$(free_port)"; node "$A"
fanout "one node, no Redis" "ws://127.0.0.1:$A/room/bench"

B="$(free_port)"; node "$B" --redis "$REDIS"
fanout "one node on Redis" "ws://127.0.0.1:$B/room/bench1"

C="$(free_port)"; node "$C" --redis "$REDIS"
fanout "two nodes on Redis" "ws://127.0.0.1:$B/room/bench2" --also "ws://127.0.0.1:$C/room/bench2"
fi

# The fixed-rate comparison: the same node binary, fresh each round, alone and on Redis.
FIXED_RATE="${FIXED_RATE:-100}"
ROUNDS="${ROUNDS:-3}"
SHARD_URLS=()
for _ in 1 2 3; do
    port="$(free_port)"
    taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK" >/dev/null &
    PIDS+=($!)
    wait_port "$port"
    SHARD_URLS+=(--redis "redis://127.0.0.1:$port")
done
# A Redis Cluster of three masters (no replicas: the comparison is the node's work), on
# ports whose bus port (+10000) is free too.
CLUSTER_NODES=()
while ((${#CLUSTER_NODES[@]} < 3)); do
    port="$(free_port)"
    ((port < 55000)) || continue
    (echo > "/dev/tcp/127.0.0.1/$((port + 10000))") 2>/dev/null && continue
    mkdir -p "$WORK/cluster-$port"
    taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --cluster-enabled yes --cluster-config-file nodes.conf --dir "$WORK/cluster-$port" >/dev/null &
    PIDS+=($!)
    wait_port "$port"
    CLUSTER_NODES+=("127.0.0.1:$port")
done
redis-cli --cluster create "${CLUSTER_NODES[@]}" --cluster-yes >/dev/null
until redis-cli -h 127.0.0.1 -p "${CLUSTER_NODES[0]#*:}" CLUSTER INFO | grep -q cluster_state:ok; do sleep 0.2; done
CLUSTER_SEEDS="$(printf 'redis://%s,' "${CLUSTER_NODES[@]}")"
CLUSTER_SEEDS="${CLUSTER_SEEDS%,}"

fixed() { # fixed LABEL [serve args...]: one step at FIXED_RATE; the path of its JSON
    local label="$1"; shift
    local port pid
    port="$(free_port)"
    taskset -c 0 "$BIN" serve --listen "127.0.0.1:$port" --memory --workers 1 \
        --config "$WORK/bench.toml" "$@" 2>"$WORK/fixed-$port.log" &
    pid=$!
    wait_port "$port"
    taskset -c 1 "$BIN" bench fanout "ws://127.0.0.1:$port/room/fixed-$RANDOM" \
        --subscribers "$SUBSCRIBERS" --rates "$FIXED_RATE" --step-secs 5 \
        --p99-bound-ms 250 --server-pid "$pid" --json > "$WORK/fixed-$label-$port.json"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    echo "$WORK/fixed-$label-$port.json"
}
: > "$WORK/fixed.list"
for round in $(seq 1 "$ROUNDS"); do
    echo "alone $(fixed alone)" >> "$WORK/fixed.list"
    echo "one-redis $(fixed one-redis --redis "$REDIS")" >> "$WORK/fixed.list"
    echo "three-shards $(fixed three-shards "${SHARD_URLS[@]}")" >> "$WORK/fixed.list"
    echo "redis-cluster $(fixed redis-cluster --redis-cluster "$CLUSTER_SEEDS")" >> "$WORK/fixed.list"
done
python3 - "$WORK/fixed.list" "$FIXED_RATE" "$SUBSCRIBERS" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    label, path = line.split()
    step = json.load(open(path))["steps"][0]
    cpu = (step.get("server_user_us") or 0) + (step.get("server_system_us") or 0)
    runs.setdefault(label, []).append((cpu, step["p99_ms"], step["held"], step["delivered"], step["expected"]))
rounds = len(runs["alone"])
print(f"\nnode CPU per delivery at {sys.argv[2]} publishes/s to {sys.argv[3]} subscribers (median of {rounds} rounds):")
alone = statistics.median(r[0] for r in runs["alone"])
for label in ("alone", "one-redis", "three-shards", "redis-cluster"):
    cpu = statistics.median(r[0] for r in runs[label])
    p99 = statistics.median(r[1] for r in runs[label])
    held = all(r[2] for r in runs[label])
    lost = sum(r[4] - r[3] for r in runs[label])
    print(f"  {label:13} {cpu:6.2f} us  ({cpu / alone:.2f}x alone)  p99 {p99:.1f} ms  held {held}  undelivered {lost}")
EOF
