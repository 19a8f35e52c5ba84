#!/usr/bin/env bash
# Autobahn TestSuite conformance run for Switchboard, using kosoku (a Python 3
# port of the Autobahn TestSuite with a Rust runner).
#
#   (a) server: kosoku -m fuzzingclient drives `switchboard serve` at /echo
#       -> reports/server/index.json, compared with conformance/expected-server.json
#   (a2) server over HTTP/2: the same cases reach /echo of a TLS `switchboard serve`
#       through h2-bridge (crates/test-support), which opens each upgrade as an RFC 8441
#       extended CONNECT stream of one HTTP/2 connection and passes the frames on
#       unchanged -> reports/server-h2/index.json, compared with the same
#       conformance/expected-server.json; the server's metrics must count the
#       WebSockets as HTTP/2 ones
#   (b) client: kosoku -m fuzzingserver is the peer that `switchboard connect --echo`
#       connects to, once per case -> reports/client/index.json, compared with
#       conformance/expected-client.json
#
# Exits non-zero if either report differs from its expected file, if any case
# FAILED, or if a run could not complete.
#
# Environment (all optional):
#   SWITCHBOARD_BIN          binary to test (default: cargo build --release -p switchboard,
#                            then $CARGO_TARGET_DIR or target/ /release/switchboard)
#   CONFORMANCE_CASES        comma-separated case ids/globs, e.g. "1.*,2.*" (default: all
#                            517); only those are run and compared
#   CONFORMANCE_UPDATE=1     rewrite the expected files from the reports (only the selected
#                            cases when CONFORMANCE_CASES is set)
#   CONFORMANCE_MODES        "server server-h2 client" (default), or some of them
#   CONFORMANCE_PARALLELISM  kosoku fuzzingclient -p (default 2)
#   CONFORMANCE_CASE_TIMEOUT seconds for one `switchboard connect` (default 60)
#   CONFORMANCE_RUN_TIMEOUT  seconds for the whole fuzzingclient run (default 1800)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

KOSOKU_VERSION=0.1.0
VENV="$ROOT/.venv"
REPORTS="$ROOT/reports"
CASES="${CONFORMANCE_CASES:-}"
MODES="${CONFORMANCE_MODES:-server server-h2 client}"
PARALLELISM="${CONFORMANCE_PARALLELISM:-2}"
CASE_TIMEOUT="${CONFORMANCE_CASE_TIMEOUT:-60}"
RUN_TIMEOUT="${CONFORMANCE_RUN_TIMEOUT:-1800}"
AGENT=switchboard

log() { printf '[conformance] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
PIDS=()  # long-lived processes we started
CHILD="" # the foreground command run_child is waiting for
cleanup() {
    local pid
    for pid in $CHILD "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
    done
    for pid in $CHILD "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    CHILD=""
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run_child CMD...: run CMD in the background and wait for it, so that INT/TERM
# reach our traps at once (bash defers traps while a foreground command runs,
# and `timeout` puts its command in a process group of its own).
run_child() {
    local rc=0
    "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

# ---------------------------------------------------------------- tools
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('kosoku') != '$KOSOKU_VERSION')" 2>/dev/null; then
    log "installing kosoku==$KOSOKU_VERSION into $VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION"
fi
KOSOKU="$VENV/bin/kosoku"

if [[ -n "${SWITCHBOARD_BIN:-}" ]]; then
    BIN="$SWITCHBOARD_BIN"
else
    log "building switchboard (release)"
    cargo build --release -p switchboard
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/switchboard"
fi
[[ -x "$BIN" ]] || die "switchboard binary $BIN not found or not executable"
if [[ " $MODES " == *" server-h2 "* ]]; then
    log "building h2-bridge (release)"
    cargo build --release --quiet -p switchboard-test-support --bin h2-bridge
    BRIDGE="${CARGO_TARGET_DIR:-$ROOT/target}/release/h2-bridge"
fi

# CONFORMANCE_CASES="1.*,2.*" -> kosoku -i '1.*' -i '2.*'
INCLUDE=()
if [[ -n "$CASES" ]]; then
    IFS=',' read -r -a _patterns <<<"$CASES"
    for p in "${_patterns[@]}"; do
        p="${p//[[:space:]]/}"
        if [[ -n "$p" ]]; then INCLUDE+=(-i "$p"); fi
    done
fi

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for_log FILE PATTERN PID TIMEOUT: poll FILE for an ERE until it shows up,
# failing early if PID exits.
wait_for_log() {
    local file=$1 pattern=$2 pid=$3 timeout=$4
    local deadline=$((SECONDS + timeout))
    until grep -Eq "$pattern" "$file" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { cat "$file" >&2 || true; die "process $pid exited before logging /$pattern/"; }
        ((SECONDS < deadline)) || { cat "$file" >&2 || true; die "timed out after ${timeout}s waiting for /$pattern/ in $file"; }
        sleep 0.1
    done
}

# wait_exit PID TIMEOUT: wait for a process we started to exit; 0 if it did.
wait_exit() {
    local pid=$1 timeout=$2
    local deadline=$((SECONDS + timeout))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
    wait "$pid" 2>/dev/null || true
    return 0
}

# kosoku's fuzzingserver only answers over WebSocket, also /getCaseCount and
# /updateReports (a plain HTTP GET is dropped). ws_get PORT PATH prints the text
# the server sends before closing.
ws_get() {
    "$PY" - "$1" "$2" <<'PYEOF'
import base64, os, socket, struct, sys
port, path = int(sys.argv[1]), sys.argv[2]
s = socket.create_connection(("127.0.0.1", port), timeout=30)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit(f"{path}: connection closed during the handshake")
    buf += chunk
head, buf = buf.split(b"\r\n\r\n", 1)
status = head.split(b"\r\n", 1)[0].split()
if len(status) < 2 or status[1] != b"101":
    sys.exit(f"{path}: unexpected response {head[:100]!r}")
def need(n):
    global buf
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk
    return True
text = b""
while need(2):
    op, ln = buf[0] & 0x0F, buf[1] & 0x7F
    hl = 2 + {126: 2, 127: 8}.get(ln, 0)
    if not need(hl):
        break
    if ln == 126:
        ln = struct.unpack(">H", buf[2:4])[0]
    elif ln == 127:
        ln = struct.unpack(">Q", buf[2:10])[0]
    if not need(hl + ln):
        break
    payload, buf = buf[hl:hl + ln], buf[hl + ln:]
    if op == 8:
        break
    if op in (0, 1, 2):
        text += payload
s.close()
print(text.decode())
PYEOF
}

mkdir -p "$REPORTS"
STATUS=0

compare() { # compare LABEL AGENT_ARGS...
    compare_with "$1" "$@"
}

compare_with() { # compare_with LABEL EXPECTED_LABEL AGENT_ARGS...: LABEL's report against EXPECTED_LABEL's file
    local label=$1 expected=$2
    shift 2
    local args=("$REPORTS/$label/index.json" "conformance/expected-$expected.json" --label "$label" "$@")
    if [[ -n "$CASES" ]]; then args+=(--cases "$CASES"); fi
    if [[ "${CONFORMANCE_UPDATE:-}" == 1 ]]; then args+=(--update); fi
    "$PY" "$ROOT/scripts/conformance_compare.py" "${args[@]}" || STATUS=1
}

# ---------------------------------------------------------------- (a) server
run_server_mode() {
    local port out="$REPORTS/server" slog="$REPORTS/switchboard-serve.log" rc=0
    port=$(free_port)
    rm -rf "$out"
    log "starting $BIN serve --listen 127.0.0.1:$port (log: $slog)"
    # The cases all come from loopback, as fast as the runner goes: no limits per address.
    NO_COLOR=1 SWITCHBOARD_MAX_CONNECTIONS_PER_IP=0 SWITCHBOARD_HANDSHAKE_RATE_PER_IP=0 \
        "$BIN" serve --listen "127.0.0.1:$port" >"$slog" 2>&1 &
    local spid=$!
    PIDS+=("$spid")
    wait_for_log "$slog" 'listening on http://' "$spid" 30

    log "kosoku fuzzingclient -> ws://127.0.0.1:$port/echo ${CASES:+(cases: $CASES)}"
    local t0=$SECONDS
    run_child timeout -k 10 "$RUN_TIMEOUT" "$KOSOKU" -m fuzzingclient -p "$PARALLELISM" "${INCLUDE[@]}" \
        -o "$out" "ws://127.0.0.1:$port/echo" >"$REPORTS/kosoku-server.log" 2>&1 || rc=$?
    log "fuzzingclient finished in $((SECONDS - t0))s (exit $rc; 1 just means some case did not pass)"
    if ((rc != 0 && rc != 1)) || [[ ! -f "$out/index.json" ]]; then
        tail -n 20 "$REPORTS/kosoku-server.log" >&2 || true
        log "error: fuzzingclient run did not complete (exit $rc)"
        STATUS=1
    fi
    kill -0 "$spid" 2>/dev/null || { log "error: switchboard serve exited during the run"; STATUS=1; }
    kill "$spid" 2>/dev/null || true
    wait_exit "$spid" 10 || kill -9 "$spid" 2>/dev/null || true
    if [[ -f "$out/index.json" ]]; then compare server; fi
}

# ---------------------------------------------------------------- (a2) server over HTTP/2
run_server_h2_mode() {
    local port bport out="$REPORTS/server-h2" slog="$REPORTS/switchboard-serve-h2.log"
    local blog="$REPORTS/h2-bridge.log" tls="$REPORTS/h2-tls" rc=0
    port=$(free_port)
    bport=$(free_port)
    rm -rf "$out" "$tls"
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=localhost -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
        -addext "basicConstraints=critical,CA:FALSE" \
        -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null || die "openssl could not make a certificate"
    log "starting $BIN serve --listen 127.0.0.1:$port over TLS (log: $slog)"
    NO_COLOR=1 SWITCHBOARD_MAX_CONNECTIONS_PER_IP=0 SWITCHBOARD_HANDSHAKE_RATE_PER_IP=0 \
        "$BIN" serve --listen "127.0.0.1:$port" --tls-cert "$tls/cert.pem" --tls-key "$tls/key.pem" >"$slog" 2>&1 &
    local spid=$!
    PIDS+=("$spid")
    wait_for_log "$slog" 'listening on https://' "$spid" 30
    "$BRIDGE" --listen "127.0.0.1:$bport" --to "127.0.0.1:$port" --ca "$tls/cert.pem" >"$blog" 2>&1 &
    local bpid=$!
    PIDS+=("$bpid")
    wait_for_log "$blog" 'h2-bridge listening' "$bpid" 30

    log "kosoku fuzzingclient -> ws://127.0.0.1:$bport/echo -> HTTP/2 streams of https://127.0.0.1:$port/echo ${CASES:+(cases: $CASES)}"
    local t0=$SECONDS
    run_child timeout -k 10 "$RUN_TIMEOUT" "$KOSOKU" -m fuzzingclient -p "$PARALLELISM" "${INCLUDE[@]}" \
        -o "$out" "ws://127.0.0.1:$bport/echo" >"$REPORTS/kosoku-server-h2.log" 2>&1 || rc=$?
    log "fuzzingclient over HTTP/2 finished in $((SECONDS - t0))s (exit $rc)"
    if ((rc != 0 && rc != 1)) || [[ ! -f "$out/index.json" ]]; then
        tail -n 20 "$REPORTS/kosoku-server-h2.log" >&2 || true
        log "error: fuzzingclient run over HTTP/2 did not complete (exit $rc)"
        STATUS=1
    fi
    local streams
    streams=$("$PY" - "$port" "$tls/cert.pem" <<'PYEOF'
import ssl, sys, urllib.request
port, ca = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=ca)
text = urllib.request.urlopen(f"https://localhost:{port}/metrics", context=context, timeout=10).read().decode()
print(sum(float(l.split()[-1]) for l in text.splitlines()
          if l.startswith('switchboard_websocket_connections_total{http="2"}')))
PYEOF
    ) || streams=0
    log "the server counted $streams WebSockets over HTTP/2"
    if ! "$PY" -c "import sys; sys.exit(0 if float('$streams') > 0 else 1)"; then
        log "error: no WebSocket went over HTTP/2"
        STATUS=1
    fi
    kill -0 "$spid" 2>/dev/null || { log "error: switchboard serve exited during the run"; STATUS=1; }
    kill "$bpid" "$spid" 2>/dev/null || true
    wait_exit "$spid" 10 || kill -9 "$spid" 2>/dev/null || true
    if [[ -f "$out/index.json" ]]; then compare_with server-h2 server; fi
}

# ---------------------------------------------------------------- (b) client
run_client_mode() {
    local port out="$REPORTS/client" klog="$REPORTS/kosoku-client.log" clog="$REPORTS/switchboard-connect.log"
    port=$(free_port)
    rm -rf "$out"
    : >"$clog"
    log "starting kosoku fuzzingserver on 127.0.0.1:$port ${CASES:+(cases: $CASES)}"
    "$KOSOKU" -m fuzzingserver "${INCLUDE[@]}" -o "$out" "127.0.0.1:$port" >"$klog" 2>&1 &
    local kpid=$!
    PIDS+=("$kpid")
    # Wait until it accepts TCP connections (it drops ones that do not upgrade).
    "$PY" - "$port" "$kpid" <<'PYEOF' || die "kosoku fuzzingserver did not start (see $klog)"
import os, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit(1)
        time.sleep(0.05)
sys.exit(1)
PYEOF
    local count
    count=$(ws_get "$port" /getCaseCount)
    [[ "$count" =~ ^[0-9]+$ ]] || die "bad case count from /getCaseCount: '$count'"
    log "running $count case(s): $BIN connect --echo ws://127.0.0.1:$port/runCase?case=N&agent=$AGENT"
    local n rc t0=$SECONDS timeouts=() nonzero=0
    for ((n = 1; n <= count; n++)); do
        rc=0
        echo "=== case $n" >>"$clog"
        run_child timeout -k 5 "$CASE_TIMEOUT" "$BIN" connect --echo \
            "ws://127.0.0.1:$port/runCase?case=$n&agent=$AGENT" >>"$clog" 2>&1 </dev/null || rc=$?
        if ((rc == 124 || rc == 137)); then
            timeouts+=("$n")
            echo "=== case $n: timed out after ${CASE_TIMEOUT}s" >>"$clog"
        elif ((rc != 0)); then
            nonzero=$((nonzero + 1))
            echo "=== case $n: exit $rc" >>"$clog"
        fi
        if ((n % 50 == 0)); then log "  $n/$count cases ($((SECONDS - t0))s)"; fi
    done
    log "client cases done in $((SECONDS - t0))s; $nonzero exited non-zero (not an error by itself; see $clog)"
    if ((${#timeouts[@]})); then
        log "warning: ${#timeouts[@]} case(s) hit the ${CASE_TIMEOUT}s timeout (case numbers: ${timeouts[*]})"
    fi
    ws_get "$port" "/updateReports?agent=$AGENT" >/dev/null || log "warning: /updateReports failed"
    if ! wait_exit "$kpid" 60; then
        log "error: kosoku fuzzingserver did not finish after /updateReports"
        STATUS=1
    fi
    if [[ ! -f "$out/index.json" ]]; then
        tail -n 20 "$klog" >&2 || true
        log "error: no $out/index.json (kosoku writes none when no case ran at all)"
        STATUS=1
        return 0
    fi
    compare client --agent "$AGENT"
}

for mode in $MODES; do
    case "$mode" in
        server) run_server_mode ;;
        server-h2) run_server_h2_mode ;;
        client) run_client_mode ;;
        *) die "unknown mode '$mode' in CONFORMANCE_MODES (use server, server-h2 and/or client)" ;;
    esac
done

if ((STATUS != 0)); then
    log "FAILED (reports in $REPORTS/)"
else
    log "OK"
fi
exit "$STATUS"
