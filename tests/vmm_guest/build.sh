#!/bin/sh
# Assembles Strata's bare-metal test guest (tests/vmm_guest/*.asm, *.inc) with nasm into
# OUTDIR/guest.elf and prints its path. The result is cached in OUTDIR under the hash of
# the sources and the nasm version, so a second run with unchanged sources returns at
# once. Exits 2 with a reason on stderr when nasm is missing.
#
# Usage: tests/vmm_guest/build.sh OUTDIR
set -eu

here=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 1; }
out=$1
command -v nasm >/dev/null || { echo "guest build: nasm not found" >&2; exit 2; }
mkdir -p "$out"

key=$( (nasm -v; cd "$here" && cat guest.asm ./*.inc) | sha256sum | cut -c1-16)
elf="$out/guest-$key.elf"
if [ ! -f "$elf" ]; then
    tmp="$out/.guest-$key.$$"
    nasm -f bin -w+all -I "$here/" -o "$tmp" "$here/guest.asm"
    mv -f "$tmp" "$elf"
fi
ln -sf "guest-$key.elf" "$out/guest.elf.tmp.$$" && mv -f "$out/guest.elf.tmp.$$" "$out/guest.elf"
echo "$out/guest.elf"
