#!/usr/bin/env bash
# Strata's main job on a built-in default, until the live-backup demo replaces it:
# an image round trip between strata-img and qemu-img.
#
#   1. make a 64 MiB raw disk holding a pattern (text, random data and holes),
#   2. strata-img create a qcow2 and strata-img convert -n the pattern into it,
#   3. qemu-img check it and qemu-img compare it with the pattern,
#   4. strata-img convert it back to raw (and to a compressed qcow2), compare again.
#
# Usage: tests/demo/round_trip.sh [workdir]   (default: a temporary folder, removed after)
# Env:   STRATA_IMG=/path/to/strata-img to use another binary than the one built here.
# Exit status 0 means every step agreed; any mismatch stops the script with an error.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
if [[ $# -ge 1 ]]; then
    work=$1
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

step() { printf '\n== %s\n' "$*"; }

step "build strata-img"
cargo build --release -q -p strata-img --manifest-path "$root/Cargo.toml"
target=$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
strata=${STRATA_IMG:-$target/release/strata-img}
command -v qemu-img >/dev/null || { echo "qemu-img is not installed" >&2; exit 1; }

step "make a 64 MiB pattern disk: text, random data and holes"
src="$work/pattern.raw"
truncate -s 0 "$src"
truncate -s 64M "$src"
# (head reads from process substitutions so that the producers' SIGPIPE is not an error)
head -c 16M < <(yes "Strata round trip: the quick brown fox jumps over the lazy dog") |
    dd of="$src" conv=notrunc status=none
head -c 8M < /dev/urandom | dd of="$src" bs=1M seek=24 conv=notrunc status=none
printf 'the last bytes of the disk' | dd of="$src" bs=1 seek=$((64 * 1024 * 1024 - 26)) \
    conv=notrunc status=none

step "strata-img create + convert -n into it"
"$strata" create -f qcow2 -o cluster_size=65536 "$work/disk.qcow2" 64M
"$strata" convert -n -f raw -O qcow2 "$src" "$work/disk.qcow2"
"$strata" info "$work/disk.qcow2"

step "qemu-img check and compare"
qemu-img check "$work/disk.qcow2"
qemu-img compare -f raw -F qcow2 "$src" "$work/disk.qcow2"

step "strata-img convert back to raw; compressed qcow2"
"$strata" convert -f qcow2 -O raw "$work/disk.qcow2" "$work/back.raw"
cmp "$src" "$work/back.raw"
"$strata" convert -c -f qcow2 -O qcow2 "$work/disk.qcow2" "$work/small.qcow2"
qemu-img check "$work/small.qcow2"
qemu-img compare -f raw -F qcow2 "$src" "$work/small.qcow2"
"$strata" compare "$work/disk.qcow2" "$work/small.qcow2"
ls -ls "$work"/*.qcow2

step "round trip OK"
