#!/usr/bin/env bash
# Long fuzzing runs: every target at once, each for SECONDS (default 5400), at the lowest
# priority (they take the CPU nothing else wants). Build first with scripts/fuzz.sh
# --build-only. Logs, with libFuzzer's final stats (executions, exec/s), go to
# reports/fuzz/long-<target>.log; crashing inputs to reports/fuzz/artifacts/<target>/.
#
#   scripts/fuzz-long.sh [SECONDS]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PER_TARGET="${1:-5400}"
BIN_DIR="fuzz/target/x86_64-unknown-linux-gnu/release"
for target in frame_decoder handshake inflate room_event; do
    [[ -x "$BIN_DIR/$target" ]] || { echo "no $BIN_DIR/$target: run scripts/fuzz.sh --build-only" >&2; exit 1; }
done
mkdir -p reports/fuzz
for target in frame_decoder handshake inflate room_event; do
    (
        log="reports/fuzz/long-$target.log"
        mkdir -p "target/fuzz-corpus/$target" "reports/fuzz/artifacts/$target"
        {
            echo "start $(date -u +%FT%TZ) $target for $PER_TARGET s"
            nice -n 19 "$BIN_DIR/$target" \
                -artifact_prefix="reports/fuzz/artifacts/$target/" \
                -max_total_time="$PER_TARGET" -print_final_stats=1 \
                "target/fuzz-corpus/$target" "fuzz/corpus/$target" </dev/null
            echo "exit $? end $(date -u +%FT%TZ)"
        } >"$log" 2>&1
    ) &
done
wait
grep -H -E '^stat::number_of_executed_units|^exit' reports/fuzz/long-*.log
