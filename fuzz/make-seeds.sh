#!/usr/bin/env bash
# Regenerates the committed seed corpora in fuzz/corpus-seeds/ with qemu-img and qemu-io.
#
# Each qcow2 seed covers one creation option (compat, cluster size, refcount width, lazy
# refcounts, compression type, extended L2, backing file, internal snapshot, compressed
# clusters, preallocation, a dirty image). Images are kept tiny: small clusters, small
# virtual sizes, trailing zero bytes trimmed (the driver reads past the end of the file
# as zeroes, so trimming changes no content) as long as every table the header points
# at still lies inside the file. The qcow2_header seeds are the first cluster of each,
# trimmed the same way.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/corpus-seeds"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out/qcow2_open" "$out/qcow2_header"

io() { qemu-io -f qcow2 "$@" >/dev/null; }

# Writes a few recognisable patterns: data in the first cluster, a partial write
# further on, and a zeroed range.
fill() {
    local img="$1" cs="$2"
    io -c "write -P 0xa5 0 $cs" -c "write -P 0x3c $((cs * 3 + 100)) 700" \
        -c "write -z $((cs * 5)) $cs" "$img"
}

make() {
    local name="$1" size="$2" opts="$3" cs="$4"
    qemu-img create -q -f qcow2 -o "$opts" "$work/$name.qcow2" "$size"
    fill "$work/$name.qcow2" "$cs"
}

make v2-c512            64k compat=0.10,cluster_size=512 512
make v3-c4k             64k compat=1.1,cluster_size=4k 4096
make v3-c4k-rc1         64k cluster_size=4k,refcount_bits=1 4096
make v3-c4k-rc64        64k cluster_size=4k,refcount_bits=64 4096
make v3-c512-rc8        64k cluster_size=512,refcount_bits=8 512
make v3-c4k-lazy        64k cluster_size=4k,lazy_refcounts=on 4096
make v3-c16k-extl2      256k cluster_size=16k,extended_l2=on 16384
make v3-c4k-prealloc    32k cluster_size=4k,preallocation=metadata 4096

# 64k clusters put the first data cluster 320k into the file: keep this one empty.
qemu-img create -q -f qcow2 -o cluster_size=64k "$work/v3-c64k.qcow2" 1M

# Subcluster writes on the extended-L2 image.
io -c "write -P 0x11 $((16384 * 2 + 2048)) 1024" -c "write -z $((16384 * 2 + 8192)) 2048" \
    "$work/v3-c16k-extl2.qcow2"

# A backing file name and format (the raw backing node is supplied by the harness).
qemu-img create -q -f raw "$work/base.raw" 64k
qemu-img create -q -f qcow2 -o cluster_size=4k -b base.raw -F raw "$work/backing-c4k.qcow2" 64k
io -c "write -P 0x77 4096 4096" -c "discard 8192 4096" "$work/backing-c4k.qcow2"
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 -b base.raw -F raw \
    "$work/backing-v2-c512.qcow2" 64k
io -c "write -P 0x78 512 1024" "$work/backing-v2-c512.qcow2"

# Compressed clusters, zlib and zstd.
qemu-io -f raw -c "write -P 0x42 0 8k" -c "write -P 0x43 12k 4k" "$work/base.raw" >/dev/null
qemu-img convert -q -c -O qcow2 -o cluster_size=4k "$work/base.raw" "$work/zlib-c4k.qcow2"
qemu-img convert -q -c -O qcow2 -o cluster_size=4k,compression_type=zstd \
    "$work/base.raw" "$work/zstd-c4k.qcow2"

# An internal snapshot, then a write that diverges from it.
make snapshot-c4k 64k cluster_size=4k 4096
qemu-img snapshot -c snap1 "$work/snapshot-c4k.qcow2"
io -c "write -P 0x99 0 4096" "$work/snapshot-c4k.qcow2"

# An image left dirty (lazy refcounts, dirty bit set): opening it read-write repairs it.
cp "$work/v3-c4k-lazy.qcow2" "$work/dirty-lazy-c4k.qcow2"
printf '\x00\x00\x00\x00\x00\x00\x00\x01' |
    dd of="$work/dirty-lazy-c4k.qcow2" bs=1 seek=72 conv=notrunc status=none

for img in "$work"/*.qcow2; do
    name="$(basename "$img" .qcow2)"
    python3 - "$img" "$out/qcow2_open/$name" "$out/qcow2_header/$name" <<'PY'
import struct, sys
src, open_seed, header_seed = sys.argv[1:]
data = open(src, 'rb').read()
(cluster_bits,) = struct.unpack_from('>I', data, 20)
cs = 1 << cluster_bits
(l1_size,) = struct.unpack_from('>I', data, 36)
(l1_off, rt_off) = struct.unpack_from('>QQ', data, 40)
(rt_clusters, nb_snap) = struct.unpack_from('>II', data, 56)
(snap_off,) = struct.unpack_from('>Q', data, 64)
keep = max(l1_off + 8 * l1_size, rt_off + cs * rt_clusters, 512)
if nb_snap:
    keep = max(keep, snap_off + 1)
end = len(data.rstrip(b'\0'))
data = data[:max(end, keep)]
open(open_seed, 'wb').write(data)
open(header_seed, 'wb').write(data[:cs].rstrip(b'\0').ljust(112, b'\0'))
PY
done
du -sh "$out"
