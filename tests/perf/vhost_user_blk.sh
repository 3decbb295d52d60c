#!/usr/bin/env bash
# vhost-user-blk export throughput: strata-storage-daemon against qemu-storage-daemon,
# side by side in one run, driven by the same load generator
# (crates/vhost-user-blk/examples/vub_load/main.rs: a vhost-user frontend with shared
# memory and a real split virtqueue).
#
# Usage: tests/perf/vhost_user_blk.sh [workdir]   (default: a new temporary folder)
# Env:   SIZE=1G (image size), SECONDS_PER_ROW=5, ONLY=regex (run only the rows whose
#        "format rw bs qd" matches, e.g. ONLY='raw read 1048576')
#
# Prints a Markdown table: IOPS (and MiB/s) of each daemon per row and the ratio
# strata/qemu (at or above 1.0: Strata is as fast or faster). Both daemons serve the
# same fully written image with cache.direct=off; rows run one after the other, with
# a `sync` after each daemon's run so that none inherits another's dirty pages.
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d)}
size=${SIZE:-1G}
secs=${SECONDS_PER_ROW:-5}
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

row() { # fmt rw bs qd -> "iops mib_s" for qemu then strata
    local fmt=$1 rw=$2 bs=$3 qd=$4 out=()
    for bin in qemu-storage-daemon "$strata"; do
        serve "$bin" "$fmt"
        local j
        j=$("$load" --socket "$work/vub.sock" --rw "$rw" --bs "$bs" --qd "$qd" --seconds "$secs")
        kill "$pid"; wait "$pid" 2>/dev/null || true
        # Write back what this run dirtied, so that the next one does not pay for it.
        sync
        out+=("$(echo "$j" | sed -n 's/.*"iops":\([0-9.]*\).*"mib_s":\([0-9.]*\).*/\1 \2/p')")
    done
    echo "${out[0]} ${out[1]}"
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
