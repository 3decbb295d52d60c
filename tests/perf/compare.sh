#!/usr/bin/env bash
# Side-by-side performance of strata-img and qemu-img on the same images, in one run.
#
# Usage: tests/perf/compare.sh [workdir]      (default workdir: a new temporary folder)
# Env:   RUNS=5 (runs per tool and row, interleaved; the median is reported), SIZE=1G,
#        ONLY=text (run only the rows whose name contains it)
#
# Prints a Markdown table: for each row the median wall time of qemu-img and of
# strata-img and the ratio qemu/strata (above 1.0: Strata is faster). Every row runs
# the same arguments through both tools on the same image; the image is recreated
# between runs of write rows so that both tools start from the same state.
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d)}
runs=${RUNS:-5}
size=${SIZE:-1G}
mkdir -p "$work"

cargo build --release -q -p strata-img --manifest-path "$here/Cargo.toml"
strata="${CARGO_TARGET_DIR:-$here/target}/release/strata-img"
qemu=$(command -v qemu-img)

now() { date +%s.%N; }
# wall time of one run of "$@" (which prints nothing we keep), after running $prep
once() {
    local prep=$1; shift
    eval "$prep"
    local t0 t1
    t0=$(now)
    "$@" >/dev/null
    t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}'
}
median() { sort -n | awk '{a[NR]=$1} END {printf "%.3f", a[int((NR+1)/2)]}'; }

# A fully allocated image holding data (bench writes use the same pattern, so the
# convert rows below copy real data rather than zeroes).
full="$work/full.qcow2"
if [ ! -f "$full" ]; then
    "$qemu" create -q -f qcow2 "$full" "$size"
    qemu-io -c "write -P 0x5a 0 $size" "$full" >/dev/null
fi
empty="$work/empty.qcow2"
fresh_empty="\"$qemu\" create -q -f qcow2 \"$empty\" $size"

row() { # name prep args...
    # The two tools alternate run by run (and which goes first alternates too), so
    # that drift in the machine's load or the host's caches hits both alike.
    local name=$1 prep=$2; shift 2
    case "$name" in *"${ONLY:-}"*) ;; *) return 0 ;; esac
    local tq=() ts=() i
    for i in $(seq "$runs"); do
        if [ $((i % 2)) -eq 1 ]; then
            tq+=("$(once "$prep" "$qemu" "$@")")
            ts+=("$(once "$prep" "$strata" "$@")")
        else
            ts+=("$(once "$prep" "$strata" "$@")")
            tq+=("$(once "$prep" "$qemu" "$@")")
        fi
    done
    local mq ms
    mq=$(printf '%s\n' "${tq[@]}" | median)
    ms=$(printf '%s\n' "${ts[@]}" | median)
    printf '| %s | %s | %s | %s |\n' "$name" "$mq" "$ms" \
        "$(awk -v q="$mq" -v s="$ms" 'BEGIN {printf "%.2f", q / s}')"
}

echo "| row | qemu-img (s) | strata-img (s) | ratio qemu/strata |"
echo "| --- | ---: | ---: | ---: |"
for bs in 4k 64k; do
    count=$([ "$bs" = 4k ] && echo 100000 || echo 20000)
    for depth in 1 32; do
        row "bench read $bs qd$depth cache=none" ":" \
            bench -f qcow2 -t none -d "$depth" -c "$count" -s "$bs" "$full"
        row "bench write $bs qd$depth cache=none" ":" \
            bench -f qcow2 -t none -w --pattern=0x5a -d "$depth" -c "$count" -s "$bs" "$full"
    done
done
for bs in 4k 64k; do
    count=$([ "$bs" = 4k ] && echo 100000 || echo 16384)
    row "bench allocating write $bs qd32 cache=none (empty image)" "$fresh_empty" \
        bench -f qcow2 -t none -w -d 32 -c "$count" -s "$bs" "$empty"
done
rm -f "$work/out.qcow2" "$work/out.raw"
row "convert qcow2 -> qcow2" "rm -f \"$work/out.qcow2\"; sync" \
    convert -f qcow2 -O qcow2 "$full" "$work/out.qcow2"
row "convert qcow2 -> raw" "rm -f \"$work/out.raw\"; sync" \
    convert -f qcow2 -O raw "$full" "$work/out.raw"
# Internal snapshots of the fully allocated image (a copy per run; the snapshot the
# apply and delete rows need is made by qemu-img in the preparation).
snap="$work/snap.qcow2"
copy="cp \"$full\" \"$snap\""
row "snapshot -c" "$copy; sync" snapshot -c s "$snap"
row "snapshot -a" "$copy; \"$qemu\" snapshot -c s \"$snap\"; sync" snapshot -a s "$snap"
row "snapshot -d" "$copy; \"$qemu\" snapshot -c s \"$snap\"; sync" snapshot -d s "$snap"
rm -f "$snap"
