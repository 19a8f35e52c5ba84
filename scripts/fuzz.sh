#!/usr/bin/env bash
# Fuzzing: builds every cargo-fuzz target in fuzz/ and runs each for SECONDS (default 60),
# as many at once as there are cores (FUZZ_JOBS to change it).
#
#   scripts/fuzz.sh [SECONDS]
#   scripts/fuzz.sh --build-only     # build the targets (CI does it early, in the background)
#
# Works on a stable toolchain: `-s none` turns off AddressSanitizer (which needs nightly's
# -Z flags) and keeps the sancov coverage passes, which are stable codegen options; `-a`
# keeps debug assertions and overflow checks on. Each target starts from the seeds
# committed in fuzz/corpus/<target>/ and grows its corpus in target/fuzz-corpus/<target>/
# (not committed; kept between runs). libFuzzer's output goes to
# target/fuzz-logs/<target>.log. Exits non-zero if any target crashes; the crashing input
# is in fuzz/artifacts/<target>/, named in the output.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TERM_COLOR=never

BUILD_ONLY=false
if [[ "${1:-}" == "--build-only" ]]; then
    BUILD_ONLY=true
    shift
fi
SECONDS_PER_TARGET="${1:-60}"
if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || ((SECONDS_PER_TARGET < 1)); then
    echo "usage: scripts/fuzz.sh [--build-only] [SECONDS]  (seconds per target, default 60)" >&2
    exit 2
fi
FLAGS=(-s none -a)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked </dev/null
fi

LIST="$(cargo fuzz list </dev/null)"
mapfile -t TARGETS <<<"$LIST"
if [[ -z "$LIST" ]]; then
    echo "no fuzz targets found in fuzz/" >&2
    exit 1
fi

echo "==> building ${TARGETS[*]} (cargo fuzz build ${FLAGS[*]})"
start=$(date +%s)
cargo fuzz build "${FLAGS[@]}" </dev/null
echo "built in $(($(date +%s) - start)) s"
if $BUILD_ONLY; then
    exit 0
fi

mkdir -p target/fuzz-logs
# Targets run side by side, one per core: each gets SECONDS of wall time.
JOBS="${FUZZ_JOBS:-$(nproc)}"
((JOBS >= 1)) || JOBS=1
# An interrupted run takes its fuzzers with it.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
run_target() { # run_target TARGET: libFuzzer's exit status
    local target="$1"
    local seeds="fuzz/corpus/$target" corpus="target/fuzz-corpus/$target"
    mkdir -p "$corpus" "$seeds" "fuzz/artifacts/$target"
    # New inputs go to the first directory; the seeds are only read.
    cargo fuzz run "${FLAGS[@]}" "$target" "$corpus" "$seeds" -- \
        -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1 \
        </dev/null >"target/fuzz-logs/$target.log" 2>&1
}
declare -A STATUS=()
i=0
while ((i < ${#TARGETS[@]})); do
    batch=("${TARGETS[@]:i:JOBS}")
    echo "==> ${batch[*]}: ${SECONDS_PER_TARGET} s each, side by side"
    declare -A PIDS=()
    for target in "${batch[@]}"; do
        run_target "$target" &
        PIDS[$target]=$!
    done
    for target in "${batch[@]}"; do
        status=0
        wait "${PIDS[$target]}" || status=$?
        STATUS[$target]=$status
    done
    unset PIDS
    i=$((i + JOBS))
done

failed=()
summary=()
for target in "${TARGETS[@]}"; do
    log="target/fuzz-logs/$target.log"
    status="${STATUS[$target]}"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    units=$(find "target/fuzz-corpus/$target" -type f | wc -l)
    line=$(printf '%-14s %12s executions %8s exec/s %6s corpus files' \
        "$target" "${execs:-?}" "${rate:-?}" "$units")
    if ((status != 0)); then
        failed+=("$target")
        line+="  CRASHED (exit $status)"
        echo "$line"
        echo "---- last lines of $log ----"
        tail -n 60 "$log"
        echo "----"
        grep -E 'Test unit written to|Failing input|artifact' "$log" || true
    else
        echo "$line"
    fi
    summary+=("$line")
done

echo
echo "==> fuzzing summary (${SECONDS_PER_TARGET} s per target; logs in target/fuzz-logs/)"
printf '%s\n' "${summary[@]}"
if ((${#failed[@]})); then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
