#!/usr/bin/env bash
# The chat page end to end in a real browser: Debian's Chromium driven by playwright-core
# (scripts/browser/chat.test.mjs). Installs Chromium and the npm package when missing.
# Screenshots land in reports/browser/.
#
# Environment:
#   SWITCHBOARD_BIN   server binary to test (default: builds target/release/switchboard)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[browser] %s\n' "$*"; }

if [[ ! -x /usr/bin/chromium ]]; then
    log "installing Debian's chromium"
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if [[ ! -d scripts/browser/node_modules/playwright-core ]]; then
    log "installing playwright-core (npm ci)"
    (cd scripts/browser && npm ci --no-audit --no-fund --silent)
fi
if [[ -z "${SWITCHBOARD_BIN:-}" ]]; then
    cargo build --release --quiet -p switchboard
    SWITCHBOARD_BIN="$ROOT/target/release/switchboard"
fi
export SWITCHBOARD_BIN
export BROWSER_REPORTS="${BROWSER_REPORTS:-$ROOT/reports/browser}"
log "$(/usr/bin/chromium --version 2>/dev/null || echo chromium), server $SWITCHBOARD_BIN"
cd scripts/browser
node --test --test-reporter=spec chat.test.mjs
log "screenshots: $BROWSER_REPORTS"
