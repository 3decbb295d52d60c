#!/bin/sh
# /init of Strata's test guest. Runs the steps named on the kernel command line
# (strata.run=STEP,STEP,...; strata.seed=N) against /dev/vda, reports each result on
# the console as a line starting with "STRATA:", and powers off.
#
# Steps (offsets and lengths in MiB unless noted):
#   info                 size, read-only flag, queue count, logical block size
#   write:OFF:LEN        pattern write with O_DIRECT
#   read:OFF:LEN         O_DIRECT read, prints sha256
#   verify:OFF:LEN       O_DIRECT read compared with the pattern
#   discard:OFF:LEN      blkdiscard
#   zero:OFF:LEN         blkdiscard -z (write zeroes)
#   stamp:COUNT:BLOCKS   point-in-time stamps: stamp n (1..COUNT) goes to 4 KiB block
#                        ((n-1) * 37) % BLOCKS (BLOCKS a power of two, so every block
#                        is hit once per BLOCKS stamps, in scattered order), written one
#                        at a time with O_DIRECT: the disk always holds exactly the
#                        stamps up to the latest one, and a copy that mixes two moments
#                        is recognisable. Every 25th stamp prints "stamped N" once
#                        it is on the disk (a lower bound for any later copy)
#   sleep:SECONDS
#   flush                blockdev --flushbufs
#
# Pattern: 4 KiB block k of the disk (k = byte offset / 4096) holds 128 lines
# "%08d %08d strata-virtio\n" of k and the seed (32 bytes each).
# A stamp block holds 128 lines "%08d %08d strata-stamps\n" of the stamp number n
# and the block index.

export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_mmio \
    virtio_blk; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done

arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
RUN=$(arg strata.run)
SEED=$(arg strata.seed)
[ -n "$SEED" ] || SEED=1
DEV=/dev/vda
i=0
while [ ! -b $DEV ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -b $DEV ] || echo "STRATA: error no-disk"

pattern() { # OFF_MiB LEN_MiB -> stdout
    awk -v first=$(($1 * 256)) -v n=$(($2 * 256)) -v seed="$SEED" 'BEGIN {
        for (k = first; k < first + n; k++) {
            line = sprintf("%08d %08d strata-virtio\n", k, seed)
            blk = line
            for (j = 0; j < 7; j++) blk = blk blk
            printf "%s", blk
        }
    }'
}

stamp_block() { # N BLOCK -> stdout
    awk -v s="$1" -v b="$2" 'BEGIN {
        line = sprintf("%08d %08d strata-stamps\n", s, b)
        blk = line
        for (j = 0; j < 7; j++) blk = blk blk
        printf "%s", blk
    }'
}

step() {
    set -- $(echo "$1" | tr ':' ' ')
    case "$1" in
    info)
        echo "STRATA: info size=$(blockdev --getsize64 $DEV) ro=$(blockdev --getro $DEV)" \
            "queues=$(ls /sys/block/vda/mq | wc -l)" \
            "lbs=$(cat /sys/block/vda/queue/logical_block_size)" \
            "discard=$(cat /sys/block/vda/queue/discard_max_bytes)" \
            "wz=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
        ;;
    write)
        pattern $2 $3 > /tmp/p
        if dd if=/tmp/p of=$DEV bs=1M seek=$2 oflag=direct conv=notrunc 2>/tmp/err; then
            echo "STRATA: write ok"
        else
            echo "STRATA: write failed $(tail -n 1 /tmp/err)"
        fi
        rm -f /tmp/p
        ;;
    read)
        h=$(dd if=$DEV bs=1M skip=$2 count=$3 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        echo "STRATA: read sha256=$h"
        ;;
    verify)
        a=$(dd if=$DEV bs=1M skip=$2 count=$3 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        b=$(pattern $2 $3 | sha256sum | cut -d' ' -f1)
        if [ "$a" = "$b" ]; then echo "STRATA: verify ok"; else echo "STRATA: verify mismatch"; fi
        ;;
    discard)
        if blkdiscard -o $(($2 << 20)) -l $(($3 << 20)) $DEV 2>/tmp/err; then
            echo "STRATA: discard ok"
        else
            echo "STRATA: discard failed $(tail -n 1 /tmp/err)"
        fi
        ;;
    zero)
        if /bin/blkdiscard-ul -z -o $(($2 << 20)) -l $(($3 << 20)) $DEV 2>/tmp/err; then
            echo "STRATA: zero ok"
        else
            echo "STRATA: zero failed $(tail -n 1 /tmp/err)"
        fi
        ;;
    stamp)
        n=1
        while [ $n -le $2 ]; do
            b=$((((n - 1) * 37) % $3))
            stamp_block $n $b > /tmp/s
            dd if=/tmp/s of=$DEV bs=4096 seek=$b oflag=direct conv=notrunc 2>/dev/null ||
                { echo "STRATA: stamp failed $n"; break; }
            [ $((n % 25)) -eq 0 ] && echo "STRATA: stamped $n"
            n=$((n + 1))
        done
        echo "STRATA: stamp done $(($n - 1))"
        ;;
    sleep) sleep $2 ;;
    flush) blockdev --flushbufs $DEV && echo "STRATA: flush ok" ;;
    *) echo "STRATA: error unknown-step $1" ;;
    esac
}

echo "STRATA: boot"
for s in $(echo "$RUN" | tr ',' ' '); do
    step "$s"
done
sync
echo "STRATA: done"
poweroff -f
