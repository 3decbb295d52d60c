#!/usr/bin/env bash
# vhost-user-blk export throughput: strata-storage-daemon against qemu-storage-daemon,
# side by side in one run, driven by the same load generator
# (crates/vhost-user-blk/examples/vub_load/main.rs: a vhost-user frontend with shared
# memory and a real split virtqueue).
#
# Usage: tests/perf/vhost_user_blk.sh [workdir]   (default: a new temporary folder)
# Env:   SIZE=1G (image size), SECONDS_PER_ROW=5, RUNS=3 (runs per daemon and row,
#        alternating; the median is reported), ONLY=regex (run only the rows whose
#        "format rw bs qd" matches, e.g. ONLY='raw read 1048576')
#
# Prints a Markdown table: IOPS (and MiB/s) of each daemon per row and the ratio
# strata/qemu of the medians (at or above 1.0: Strata is as fast or faster). Both
# daemons serve the same fully written image with cache.direct=off; each run gets a
# fresh daemon and is followed by a `sync`, so that none inherits another's dirty pages.
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d)}
size=${SIZE:-1G}
secs=${SECONDS_PER_ROW:-5}
runs=${RUNS:-3}
mkdir -p "$work"
target=${CARGO_TARGET_DIR:-$here/target}

cargo build --release -q -p strata-storage-daemon --manifest-path "$here/Cargo.toml"
cargo build --release -q -p strata-vhost-user-blk --example vub_load \
    --manifest-path "$here/Cargo.toml"
strata="$target/release/strata-storage-daemon"
load="$target/release/examples/vub_load"

for fmt in raw qcow2; do
    img="$work/disk.$fmt"
    if [ ! -f "$img" ]; then
        qemu-img create -q -f "$fmt" "$img" "$size"
        qemu-io -f "$fmt" -c "write -P 0x33 0 $size" "$img" >/dev/null
    fi
done

serve() { # daemon format -> starts it in the background, sets pid
    local bin=$1 fmt=$2
    rm -f "$work/vub.sock"
    "$bin" --blockdev "driver=file,filename=$work/disk.$fmt,node-name=f0" \
        --blockdev "driver=$fmt,file=f0,node-name=d0" \
        --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$work/vub.sock,writable=on" \
        >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 100); do [ -S "$work/vub.sock" ] && return; sleep 0.05; done
    echo "daemon $bin did not start" >&2; exit 1
}

run_one() { # daemon fmt rw bs qd -> "iops mib_s"
    local bin=$1 fmt=$2 rw=$3 bs=$4 qd=$5 j
    serve "$bin" "$fmt"
    j=$("$load" --socket "$work/vub.sock" --rw "$rw" --bs "$bs" --qd "$qd" --seconds "$secs")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    # Write back what this run dirtied, so that the next one does not pay for it.
    sync
    echo "$j" | sed -n 's/.*"iops":\([0-9.]*\).*"mib_s":\([0-9.]*\).*/\1 \2/p'
}

# The median of "iops mib_s" lines, by IOPS.
median() { sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}'; }

row() { # fmt rw bs qd -> "iops mib_s" (medians) for qemu then strata
    # The daemons alternate run by run (and which goes first alternates too), so
    # that drift in the machine's load hits both alike.
    local q=() s=() i
    for i in $(seq "$runs"); do
        if [ $((i % 2)) -eq 1 ]; then
            q+=("$(run_one qemu-storage-daemon "$@")")
            s+=("$(run_one "$strata" "$@")")
        else
            s+=("$(run_one "$strata" "$@")")
            q+=("$(run_one qemu-storage-daemon "$@")")
        fi
    done
    echo "$(printf '%s\n' "${q[@]}" | median) $(printf '%s\n' "${s[@]}" | median)"
}

echo "| format | workload | qemu IOPS (MiB/s) | strata IOPS (MiB/s) | strata/qemu |"
echo "| --- | --- | --- | --- | --- |"
for fmt in raw qcow2; do
    for spec in "randread 4096 1" "randread 4096 32" "randwrite 4096 1" "randwrite 4096 32" \
        "read 1048576 8" "write 1048576 8"; do
        set -- $spec
        if [ -n "${ONLY:-}" ] && ! echo "$fmt $spec" | grep -Eq "$ONLY"; then continue; fi
        read -r qi qm si sm < <(row "$fmt" "$1" "$2" "$3")
        ratio=$(awk -v a="$si" -v b="$qi" 'BEGIN {printf "%.2f", a / b}')
        echo "| $fmt | $1 bs=$2 qd=$3 | $qi ($qm) | $si ($sm) | $ratio |"
    done
done
