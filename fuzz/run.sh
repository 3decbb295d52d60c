#!/usr/bin/env bash
# Builds and runs Strata's fuzz targets.
#
#   fuzz/run.sh ci            every target for FUZZ_SECONDS (default 60) seconds; exits
#                             non-zero if any target crashes, leaks, times out or runs
#                             out of memory
#   fuzz/run.sh soak [secs]   the same for developers, default 600 seconds a target
#   fuzz/run.sh build         build only
#
# Environment: FUZZ_SECONDS (ci), FUZZ_TARGETS (space-separated subset), FUZZ_JOBS
# (cargo build jobs, default 1), FUZZ_TOOLCHAIN (default nightly).
#
# Seed corpora (fuzz/corpus-seeds/<target>) are copied into the working corpus
# (fuzz/corpus/<target>, not committed) before each run. A crashing input is left in
# fuzz/artifacts/<target>/; copy it to fuzz/regressions/<target>/ so that `cargo test`
# replays it. Per-target logs go to fuzz/target/fuzz-logs/.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

toolchain="${FUZZ_TOOLCHAIN:-nightly}"
targets="${FUZZ_TARGETS:-qcow2_header qcow2_open qcow2_model raw_model qmp_json qmp_session qmp_commands blockdev_options virtio_blk virtio_mmio vm_options}"
export CARGO_BUILD_JOBS="${FUZZ_JOBS:-1}"

# Per-target libFuzzer options: the longest input and the dictionary.
target_args() {
    case "$1" in
        qcow2_header) echo "-max_len=4096 -dict=dict/qcow2.dict" ;;
        qcow2_open) echo "-max_len=262144 -dict=dict/qcow2.dict" ;;
        qcow2_model | raw_model) echo "-max_len=1024 -len_control=0" ;;
        qmp_json | qmp_session) echo "-max_len=4096 -dict=dict/qmp.dict" ;;
        qmp_commands) echo "-max_len=2048 -len_control=0" ;;
        blockdev_options) echo "-max_len=1024 -dict=dict/blockdev.dict" ;;
        virtio_blk) echo "-max_len=65536" ;;
        virtio_mmio) echo "-max_len=8192" ;;
        vm_options) echo "-max_len=1024 -dict=dict/blockdev.dict" ;;
        *) echo "unknown target $1" >&2; exit 2 ;;
    esac
}

build() {
    # -a: debug assertions and overflow checks, so that arithmetic overflow is a crash.
    cargo "+$toolchain" fuzz build -a
}

run_all() {
    local seconds="$1" failed=() logs="$here/target/fuzz-logs"
    mkdir -p "$logs"
    for t in $targets; do
        mkdir -p "corpus/$t" "artifacts/$t"
        if [ -d "corpus-seeds/$t" ]; then
            cp -n "corpus-seeds/$t"/* "corpus/$t/" 2>/dev/null || true
        fi
        echo "=== $t: ${seconds}s"
        # shellcheck disable=SC2046
        cargo "+$toolchain" fuzz run -a "$t" "corpus/$t" -- \
            $(target_args "$t") \
            -max_total_time="$seconds" \
            -timeout=30 \
            -rss_limit_mb=2048 \
            -malloc_limit_mb=1024 \
            -detect_leaks=1 \
            -print_final_stats=1 \
            -artifact_prefix="artifacts/$t/" \
            >"$logs/$t.log" 2>&1
        local rc=$?
        grep -E '^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units|^stat::peak_rss_mb' "$logs/$t.log" | sed "s/^/  /"
        if [ $rc -ne 0 ]; then
            echo "  FAILED (exit $rc); log: $logs/$t.log" >&2
            grep -A1 -E 'panicked at' "$logs/$t.log" | head -n 4 | sed 's/^/  /' >&2
            grep -E 'ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY|Test unit written' \
                "$logs/$t.log" | head -n 6 | sed 's/^/  /' >&2
            # The input itself, so that a failure on a machine whose files are gone
            # can still be replayed: base64 of the newest artifact when it is small.
            local art
            art="$(ls -t "artifacts/$t"/* 2>/dev/null | head -n 1)"
            if [ -n "$art" ] && [ "$(stat -c %s "$art")" -le 8192 ]; then
                echo "  input (base64 of $art):" >&2
                base64 -w 0 "$art" | fold -w 100 | sed 's/^/    /' >&2
                echo >&2
            fi
            failed+=("$t")
        fi
    done
    if [ ${#failed[@]} -ne 0 ]; then
        echo "fuzzing failed: ${failed[*]}" >&2
        return 1
    fi
    echo "all fuzz targets passed"
}

case "${1:-}" in
    build) build ;;
    ci) build && run_all "${FUZZ_SECONDS:-60}" ;;
    soak) build && run_all "${2:-600}" ;;
    *)
        echo "usage: $0 ci | soak [seconds] | build" >&2
        exit 2
        ;;
esac
