#!/usr/bin/env bash
# Strata's main job on its built-in default: build the binaries, then run a live
# backup of a disk that keeps being written and verify it (tests/demo/live_backup.py).
#
# Usage: tests/demo/live_backup.sh [workdir]   (default: a temporary folder, removed after)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
if [[ $# -ge 1 ]]; then
    work=$1
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
cargo build --release -q -p strata-img -p strata-storage-daemon --manifest-path "$root/Cargo.toml"
target=$(cargo metadata --format-version 1 --no-deps --manifest-path "$root/Cargo.toml" |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
exec python3 "$root/tests/demo/live_backup.py" \
    "$target/release/strata-img" "$target/release/strata-storage-daemon" "$work"
