#!/usr/bin/env bash
# The official client and server libraries of the ecosystems Switchboard's doors speak
# for, unchanged: Centrifugo's centrifuge-js (npm `centrifuge`) in Node, JSON and Protobuf
# builds (scripts/sdk/centrifuge.test.mjs), over its HTTP-streaming and SSE transports
# (scripts/sdk/centrifuge-http.test.mjs), and its browser bundles in Debian's Chromium
# (scripts/sdk/browser.test.mjs); Pusher's `pusher` server library checking Switchboard's
# webhooks (scripts/sdk/pusher-webhooks.test.mjs); pusher-js and the `pusher` server
# library against the Pusher door (scripts/sdk/pusher.test.mjs), and Laravel Echo over
# pusher-js's browser bundle in Chromium (scripts/sdk/pusher-browser.test.mjs); then the
# Python tests (scripts/sdk/python/run.sh). Installs what it needs: the npm packages
# (npm ci), Chromium and redis-server from Debian.
#
# Environment:
#   SWITCHBOARD_BIN   server binary to test (default: builds target/release/switchboard)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[sdk] %s\n' "$*"; }

missing=()
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt)"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [[ ! -d scripts/sdk/node_modules/centrifuge || ! -d scripts/sdk/node_modules/playwright-core || ! -d scripts/sdk/node_modules/ws || ! -d scripts/sdk/node_modules/pusher-js || ! -d scripts/sdk/node_modules/pusher || ! -d scripts/sdk/node_modules/laravel-echo || ! -d scripts/sdk/node_modules/eventsource ]]; then
    log "installing centrifuge, ws, eventsource, playwright-core, pusher-js, pusher and laravel-echo (npm ci)"
    (cd scripts/sdk && npm ci --no-audit --no-fund --silent)
fi
if [[ -z "${SWITCHBOARD_BIN:-}" ]]; then
    cargo build --release --quiet -p switchboard
    SWITCHBOARD_BIN="$ROOT/target/release/switchboard"
fi
export SWITCHBOARD_BIN
log "$(/usr/bin/chromium --version 2>/dev/null || echo chromium), $(node --version), server $SWITCHBOARD_BIN"

# Both suites run whatever the other gives; any failure fails the script.
status=0
(cd scripts/sdk && node --test --test-reporter=spec centrifuge.test.mjs centrifuge-http.test.mjs browser.test.mjs pusher-webhooks.test.mjs pusher.test.mjs pusher-browser.test.mjs) || status=$?

if [[ -f scripts/sdk/python/run.sh ]]; then
    log "the Python SDK (scripts/sdk/python/run.sh)"
    bash scripts/sdk/python/run.sh || status=$?
fi
if ((status != 0)); then
    log "FAILED (exit $status)"
fi
exit "$status"
