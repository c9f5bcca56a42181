#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 60), one after
# the other. Returns non-zero if any target crashed (or failed to build).
#
#   fuzz/run.sh SECONDS [TARGET...]
#
# The checked-in seeds (fuzz/corpus/<target>) are read but never written:
# what the fuzzer learns goes to $FUZZ_WORK/corpus/<target> (default
# fuzz/target/work), crashes to fuzz/artifacts/<target>/. Extra libFuzzer
# flags can be given in $FUZZ_FLAGS. Needs `cargo install cargo-fuzz` and a
# nightly toolchain. Not part of CI.
set -u -o pipefail

cd "$(dirname "$0")"
SECONDS_EACH=${1:-60}
shift || true
WORK=${FUZZ_WORK:-$PWD/target/work}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
FLAGS=${FUZZ_FLAGS:-}

if [ $# -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo "+$TOOLCHAIN" fuzz list)
fi

echo "== building ${#TARGETS[@]} targets"
if ! cargo "+$TOOLCHAIN" fuzz build; then
    echo "build failed" >&2
    exit 2
fi

declare -A RESULT
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "$WORK/corpus/$t" "artifacts/$t" "$WORK/logs"
    log="$WORK/logs/$t.log"
    echo "== $t: ${SECONDS_EACH}s (log: $log)"
    # -timeout: a unit slower than this is a finding (a decoder that can be
    # made to spin); -rss_limit_mb: libFuzzer's default, stated.
    # shellcheck disable=SC2086
    cargo "+$TOOLCHAIN" fuzz run "$t" "$WORK/corpus/$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=2048 \
        -print_final_stats=1 $FLAGS >"$log" 2>&1
    rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -E '^#[0-9]+.*(DONE|pulse|NEW|REDUCE)' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' )
    if [ $rc -eq 0 ]; then
        RESULT[$t]="ok    execs=${execs:-?} ${cov:-}"
    else
        failed=1
        crash=$(grep -oE "(Test unit written to|artifact_prefix.*Test unit written to) [^ ]+" "$log" | tail -1)
        RESULT[$t]="FAIL  rc=$rc execs=${execs:-?} ${cov:-} ${crash:-}"
    fi
    echo "   ${RESULT[$t]}"
done

echo
echo "== summary (${SECONDS_EACH}s each)"
for t in "${TARGETS[@]}"; do
    printf '%-22s %s\n' "$t" "${RESULT[$t]}"
done
exit $failed
