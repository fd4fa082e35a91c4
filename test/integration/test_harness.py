#!/usr/bin/env python3
"""The harness checks itself, without ferry: FUSE writes reach QEMU's dirty bitmap, snapshots
and the sparse comparison see every byte (and name the first differing offset), an 8 GiB sparse
disk is snapshotted without reading it whole, the proxy flips exactly one payload byte of a
DATA frame and nothing else, and a qsd killed with -9 leaves no mount behind."""

import os
import socket
import struct
import threading
import time

import ferrytest as ft

with ft.Env("harness", need_ferry=False) as env:
    wl = env.workload()
    qsd = env.qsd([ft.Disk("vda", 64 * ft.MiB, "qcow2"), ft.Disk("vdb", 8 * ft.MiB, "raw"),
                   ft.Disk("big", 8 * ft.GiB, "qcow2")])
    vda, vdb, big = qsd.disks

    # A dirty bitmap sees writes made through the FUSE file, including zero writes.
    for d in (vda, vdb):
        qsd.qmp.execute("block-dirty-bitmap-add", node=d.node, name="t", granularity=65536)
    qsd.write(vda, 3 * ft.MiB + 100, wl.block(0, 3 * ft.MiB + 100, 5000))
    qsd.write(vdb, 0, wl.block(1, 0, 4096))
    qsd.sync()
    bm = qsd.qmp.bitmaps(vda.node)["t"]
    ft.check_eq(bm["count"], 65536, "dirty bytes on vda after a 5000-byte write in one cluster")
    ft.check(qsd.qmp.bitmaps(vdb.node)["t"]["count"] > 0, "raw disk bitmap saw the write")
    qsd.write(vda, 10 * ft.MiB, wl.block(0, 10 * ft.MiB, 192 * ft.KiB))
    qsd.sync()
    qsd.qmp.execute("block-dirty-bitmap-clear", node=vda.node, name="t")
    how = qsd.zero_range(vda, 10 * ft.MiB + 64 * ft.KiB, 128 * ft.KiB)
    qsd.sync()
    ft.check_eq(qsd.qmp.bitmaps(vda.node)["t"]["count"], 2 * 65536,
                f"dirty bytes after a 128 KiB zero write over data ({how})")
    ft.check_eq(qsd.read(vda, 10 * ft.MiB + 64 * ft.KiB, 128 * ft.KiB), bytes(128 * ft.KiB),
                "zeroed range reads as zeros")
    ft.check(qsd.read(vda, 10 * ft.MiB, 16) != bytes(16), "data before the zeroed range kept")

    # Snapshot + comparison: equal to itself, a one-byte change is found at its offset.
    wl.random_writes(qsd, vda, 40)
    a = qsd.snapshot(vda, env.path("a.img"))
    b = qsd.snapshot(vda, env.path("b.img"))
    ft.check(ft.first_difference(a, b) is None, "two snapshots of an idle disk are equal")
    off = 5 * ft.MiB + 12345
    old = qsd.read(vda, off, 1)
    qsd.write(vda, off, bytes([old[0] ^ 0xFF]))
    c = qsd.snapshot(vda, env.path("c.img"))
    diff = ft.first_difference(a, c)
    ft.check(diff is not None and f"offset {off} " in diff, f"difference found at {off}: {diff}")
    # A byte changed in a hole of one file and absent in the other is found too.
    with open(a, "r+b") as f:
        f.seek(60 * ft.MiB + 7)
        f.write(b"\x01")
    diff = ft.first_difference(b, a)
    ft.check(diff is not None and f"offset {60 * ft.MiB + 7} " in diff, f"hole diff: {diff}")
    # Size mismatch is a difference.
    with open(b, "r+b") as f:
        f.truncate(64 * ft.MiB + 512)
    ft.check("sizes differ" in (ft.first_difference(a, b) or ""), "size difference reported")

    # 8 GiB sparse: snapshot and compare only touch data extents.
    for i in range(4):
        o = i * 2 * ft.GiB + 4096 * i
        qsd.write(big, o, wl.block(2, o, 300 * ft.KiB))
    t0 = time.monotonic()
    s1 = qsd.snapshot(big, env.path("big1.img"))
    s2 = ft.sparse_copy(s1, env.path("big2.img"))
    ft.check(ft.first_difference(s1, s2) is None, "8 GiB sparse copies equal")
    took = time.monotonic() - t0
    ft.check(took < 30, f"8 GiB sparse snapshot+compare took {took:.1f}s (reads the whole disk?)")
    ft.check(ft.allocated_bytes(s1) < 64 * ft.MiB,
             f"snapshot of the sparse disk is sparse ({ft.allocated_bytes(s1)} bytes allocated)")

    # The corrupting proxy flips exactly one byte of the first big DATA frame payload.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = bytearray()

    def sink():
        c, _ = srv.accept()
        while True:
            b = c.recv(65536)
            if not b:
                break
            got.extend(b)
        c.close()

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    proxy = ft.CorruptingProxy(env, srv.getsockname()[1])
    frames = [ft.encode_frame(ft.MSG["hello"], b"h" * 40),
              ft.encode_frame(ft.MSG["data"], b"\x00" * 100),     # too small: untouched
              ft.encode_frame(ft.MSG["data"], bytes(range(256)) * 8),
              ft.encode_frame(ft.MSG["data"], b"\x11" * 4096)]    # after the flip: untouched
    sent = b"".join(frames)
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(sent)
        s.shutdown(socket.SHUT_WR)
        t.join(10)
    ft.check_eq(len(got), len(sent), "proxy forwarded every byte")
    diffs = [i for i in range(len(sent)) if sent[i] != got[i]]
    flip_at = len(frames[0]) + len(frames[1]) + len(frames[2]) - 1
    ft.check_eq(diffs, [flip_at], "offsets the proxy changed")
    ft.check_eq((proxy.flipped, proxy.data_frames), (1, 3), "proxy flips and DATA frames seen")
    # The frame checksum matches libxxhash (the codec's own reference value for "abc").
    ft.check_eq(ft.xxh3_64(b"abc"), 0x78AF5F94892F3950, "XXH3-64 of 'abc'")
    hdr = ft.FRAME_HEADER.unpack(frames[0][:24])
    ft.check_eq(hdr[:5], (0x31595246, 1, 0, 40, 0), "frame header fields")

    # kill -9 of qsd: the harness unmounts what it left behind.
    mounts = [d.mount for d in qsd.disks]
    qsd.kill9()
    ft.check(not any(ft.is_mounted(m) for m in mounts), "FUSE mounts gone after kill -9")
