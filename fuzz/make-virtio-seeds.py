#!/usr/bin/env python3
"""Writes the seed corpus of the virtio_blk fuzz target (fuzz/corpus-seeds/virtio_blk).

Each seed is a guest memory image laid out as the harness expects: descriptor table at
0, available ring at 0x100, used ring at 0x200, request headers from 0x1000, data from
0x2000, status bytes from 0x3f00, indirect tables from 0x4000. Trailing zeroes are
trimmed (the harness zero-fills the rest)."""
import os
import struct

NEXT, WRITE, INDIRECT = 1, 2, 4
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus-seeds", "virtio_blk")


def seed(name, chains, headers, extra=b"", indirect=None, event_idx=False):
    mem = bytearray(0x5000)
    heads = []
    i = 0
    for chain in chains:
        heads.append(i)
        for j, (addr, ln, fl) in enumerate(chain):
            last = j == len(chain) - 1
            flags = fl | (0 if last else NEXT)
            struct.pack_into("<QIHH", mem, 16 * i, addr, ln, flags, 0 if last else i + 1)
            i += 1
    struct.pack_into("<HH", mem, 0x100, 0, len(heads))
    for k, h in enumerate(heads):
        struct.pack_into("<H", mem, 0x104 + 2 * k, h)
    for addr, (ty, sector) in headers.items():
        struct.pack_into("<IIQ", mem, addr, ty, 0, sector)
    if indirect:
        for j, (addr, ln, fl) in enumerate(indirect):
            last = j == len(indirect) - 1
            struct.pack_into("<QIHH", mem, 0x4000 + 16 * j, addr, ln,
                             fl | (0 if last else NEXT), 0 if last else j + 1)
    for addr, data in extra:
        mem[addr:addr + len(data)] = data
    if event_idx:
        mem[0x300] = 1  # the harness turns EVENT_IDX on from this byte's low bit
    with open(os.path.join(out, name), "wb") as f:
        f.write(bytes(mem).rstrip(b"\0"))


os.makedirs(out, exist_ok=True)
H = 0x1000
rw = [[(H, 16, 0), (0x2000, 4096, WRITE), (0x3f00, 1, WRITE)],
      [(H + 16, 16, 0), (0x2000, 512, 0), (0x3f01, 1, WRITE)]]
seed("read-write", rw, {H: (0, 8), H + 16: (1, 16)})
seed("read-write-event-idx", rw, {H: (0, 8), H + 16: (1, 16)}, event_idx=True)
seed("flush-getid", [[(H, 16, 0), (0x3f00, 1, WRITE)],
                     [(H + 16, 16, 0), (0x2000, 20, WRITE), (0x3f01, 1, WRITE)]],
     {H: (4, 0), H + 16: (8, 0)})
dwz = struct.pack("<QII", 8, 8, 0) + struct.pack("<QII", 64, 16, 1)
seed("discard-write-zeroes",
     [[(H, 16, 0), (0x2000, 16, 0), (0x3f00, 1, WRITE)],
      [(H + 16, 16, 0), (0x2010, 16, 0), (0x3f01, 1, WRITE)]],
     {H: (11, 0), H + 16: (13, 0)}, extra=[(0x2000, dwz)])
seed("indirect", [[(0x4000, 48, INDIRECT)]], {H: (0, 2)},
     indirect=[(H, 16, 0), (0x2000, 1024, WRITE), (0x3f00, 1, WRITE)])
seed("split-header", [[(H, 5, 0), (H + 5, 11, 0), (0x2000, 513, WRITE)]], {H: (0, 1)})
