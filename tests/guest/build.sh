#!/bin/sh
# Builds Strata's test guest from Debian packages: the cloud kernel (the bzImage, and
# the ELF vmlinux extracted from it for PVH boot) and a gzip'd newc initramfs with
# busybox-static, util-linux's blkdiscard (for -z), the virtio modules (PCI and MMIO
# transports) and tests/guest/init.sh as /init.
#
# The result is cached in $STRATA_GUEST_CACHE (default: $XDG_CACHE_HOME/strata/guest,
# or ~/.cache/strata/guest) under a key made from the package versions and the init
# script, so later runs return at once. Prints KERNEL=... and INITRD=..., and
# VMLINUX=... when the vmlinux could be extracted (needs lz4).
#
# Needs: apt-get (package lists present), dpkg-deb, gzip, and busybox (host or
# extracted). Exits 2 with a reason on stderr when something is missing.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
cache=${STRATA_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/guest}
mkdir -p "$cache/debs"

skip() { echo "guest build: $*" >&2; exit 2; }
command -v apt-get >/dev/null || skip "apt-get not found"
command -v dpkg-deb >/dev/null || skip "dpkg-deb not found"

kpkg=${STRATA_GUEST_KERNEL:-$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/.*Depends: \(linux-image-[0-9].*\)/\1/p' | head -n 1)}
[ -n "$kpkg" ] || skip "cannot resolve linux-image-cloud-amd64 (run apt-get update)"

fetch() { # package -> path of the .deb in the cache
    f=$(ls "$cache/debs/$1"_*.deb 2>/dev/null | head -n 1 || true)
    if [ -z "$f" ]; then
        (cd "$cache/debs" && apt-get download "$1" >/dev/null 2>&1) ||
            skip "apt-get download $1 failed"
        f=$(ls "$cache/debs/$1"_*.deb | head -n 1)
    fi
    echo "$f"
}

kdeb=$(fetch "$kpkg")
bdeb=$(fetch busybox-static)
key=$( (basename "$kdeb"; basename "$bdeb"; cat "$here/init.sh" "$0";
    ls -l /usr/sbin/blkdiscard 2>/dev/null || true) | sha256sum | cut -c1-16)
out="$cache/$key"
# The ELF vmlinux inside the bzImage of DIR/vmlinuz, as DIR/vmlinux (it carries the PVH
# entry note, for VMMs that boot by PVH): the payload is LZ4 (legacy frame, magic
# 02 21 4c 18); like the kernel's scripts/extract-vmlinux, try each place the magic
# occurs and keep the first that decompresses to an ELF file. Needs lz4; without it
# there is no VMLINUX line. With lz4 and no ELF found, the build fails.
extract_vmlinux() {
    [ -f "$1/vmlinux" ] && return 0
    if ! command -v lz4 >/dev/null; then
        echo "guest build: lz4 not found, no vmlinux extracted" >&2
        return 0
    fi
    for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$1/vmlinuz" | cut -d: -f1); do
        tail -c +$((off + 1)) "$1/vmlinuz" | lz4 -dc > "$1/vmlinux" 2>/dev/null || true
        [ "$(head -c 4 "$1/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ] && return 0
        rm -f "$1/vmlinux"
    done
    echo "guest build: no LZ4-compressed ELF found in $1/vmlinuz" >&2
    exit 1
}

if [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/vmlinuz" ]; then
    # A cache made before lz4 was installed gets its vmlinux now.
    extract_vmlinux "$out"
    echo "KERNEL=$out/vmlinuz"
    echo "INITRD=$out/initramfs.cpio.gz"
    [ -f "$out/vmlinux" ] && echo "VMLINUX=$out/vmlinux"
    exit 0
fi

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/k"
dpkg-deb -x "$bdeb" "$work/b"
root="$work/root"
mkdir -p "$root/bin" "$root/sbin" "$root/lib/modules" "$root/lib64" \
    "$root/lib/x86_64-linux-gnu" "$root/dev" "$root/proc" "$root/sys" "$root/tmp"
cp "$work/b/bin/busybox" "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
done
# util-linux's blkdiscard (busybox's has no -z) with the libraries it needs.
if [ -x /usr/sbin/blkdiscard ]; then
    cp /usr/sbin/blkdiscard "$root/bin/blkdiscard-ul"
    for lib in $(ldd /usr/sbin/blkdiscard | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p'); do
        cp -L "$lib" "$root/lib/x86_64-linux-gnu/"
    done
    cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
fi
kver=$(ls "$work/k/lib/modules" | head -n 1)
mods="$work/k/lib/modules/$kver/kernel/drivers"
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
    virtio/virtio_pci_modern_dev virtio/virtio_pci virtio/virtio_mmio block/virtio_blk; do
    src=$(ls "$mods/$m".ko* 2>/dev/null | head -n 1 || true)
    [ -n "$src" ] || continue
    case "$src" in
    *.xz) xz -dc "$src" > "$root/lib/modules/$(basename "$m").ko" ;;
    *) cp "$src" "$root/lib/modules/$(basename "$m").ko" ;;
    esac
done
cp "$here/init.sh" "$root/init"
chmod 755 "$root/init"
mkdir -p "$work/out"
cp "$work/k/boot/vmlinuz-$kver" "$work/out/vmlinuz"
extract_vmlinux "$work/out"
(cd "$root" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null) |
    gzip -9 > "$work/out/initramfs.cpio.gz"
rm -rf "$out"
mv "$work/out" "$out"
echo "KERNEL=$out/vmlinuz"
echo "INITRD=$out/initramfs.cpio.gz"
if [ -f "$out/vmlinux" ]; then echo "VMLINUX=$out/vmlinux"; fi
