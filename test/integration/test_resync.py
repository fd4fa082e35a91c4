#!/usr/bin/env python3
"""Contract C4: lost change tracking degrades to a checksum-based resync, never to a silently
incomplete incremental and never to a full copy when the receiver holds the disk.

1. RAW disk (its bitmap lives in QEMU's memory only) of 1 GiB with 256 MiB of data; full RP;
   qemu-storage-daemon restarted (the bitmap is gone: no_bitmap); 1% of the disk changed in
   scattered 64 KiB blocks (data into data, data into holes, zeros over data); `--once` must
   resync: the RP restores byte-identical to the source, it carries exactly the changed
   blocks, and the bytes on the wire stay close to the changed bytes plus the digests.
2. qcow2 disk whose qemu-storage-daemon is killed -9 after writes (the persistent bitmap is
   left inconsistent): the next RP is a resync too, equal, and carries the writes made both
   before and after the kill.
After each resync the next RP is an ordinary incremental again."""

import os
import re
import subprocess

import ferrytest as ft

GROUP_RAW = "resync-raw"
GROUP_QCOW2 = "resync-qcow2"
BLOCK = 64 * ft.KiB


def reopen_qsd(env, old, tag):
    """Starts qemu-storage-daemon again on the images of `old` (stopped or killed). Qsd()
    always creates fresh images with `qemu-img create`; here that one command is skipped so
    the new daemon opens the existing images (ferrytest.py could grow a reopen option)."""
    disks = [ft.Disk(d.name, d.size_bytes, d.fmt, d.node) for d in old.disks]
    for p in (old.qmp_path, old.test_qmp_path):
        if os.path.exists(p):
            os.unlink(p)  # a stale socket would look like a ready daemon
    real_run = subprocess.run

    def run(argv, *args, **kwargs):
        if list(argv[:2]) == ["qemu-img", "create"]:
            ft.check(os.path.exists(argv[-2]), f"image {argv[-2]} to reopen is missing")
            return subprocess.CompletedProcess(argv, 0)
        return real_run(argv, *args, **kwargs)

    subprocess.run = run
    try:
        return env.qsd(disks, tag=tag)
    finally:
        subprocess.run = real_run


def figures(result):
    """(wire bytes, hash bytes, resync described?) from the describe() line of --once."""
    text = result.err + result.out
    wire = re.findall(r"(\d+) wire bytes", text)
    ft.check(wire, f"replicate did not log its wire bytes:\n{result}")
    hashes = re.findall(r"(\d+) hash bytes", text)
    return int(wire[-1]), int(hashes[-1]) if hashes else 0, "resync of 1 disk(s)" in text


def scattered_changes(env, wl, qsd, disk, data_blocks, count):
    """`count` distinct 64 KiB blocks changed: new data over old data, new data into holes,
    and zeros over old data. Returns the blocks touched."""
    rng = env.rng
    total = disk.size_bytes // BLOCK
    holes = [b for b in rng.sample(range(total), count * 2) if b not in data_blocks]
    olds = rng.sample(sorted(data_blocks), count)
    picked = set()
    for i in range(count):
        if i % 8 == 7:
            b = olds[i]
            if b in picked:
                continue
            wl.zero(qsd, disk, b * BLOCK, BLOCK, "zero_range")
        else:
            b = olds[i] if i % 2 else holes[i % len(holes)]
            if b in picked:
                continue
            wl.write(qsd, disk, b * BLOCK, BLOCK)
        picked.add(b)
    return picked


def resync_rp(env, qsd, rx, hist, group, label, base, expect_reason):
    """One --once that must be a resync on `base`; returns (rp, point, wire, hashes)."""
    snaps = hist.snapshot_all(qsd, label)
    rp = env.replicate_once(qsd, rx.addr, group)
    hist.record(rp, snaps)
    pts = hist.verify(rps=[rp], what=f"({label}) ")
    p = pts[rp]
    ft.check_eq(p["base_rp"], base, f"base_rp of the resync RP {rp}")
    d = p["disks"][0]
    ft.check(not d["full"], f"RP {rp} after lost change tracking is a full copy: {d}")
    wire, hashes, described = figures(env.last_replicate)
    ft.check(described, f"replicate did not report a resync:\n{env.last_replicate}")
    ft.check(expect_reason in env.last_replicate.err,
             f"replicate did not name the reason {expect_reason}:\n{env.last_replicate}")
    return rp, d, wire, hashes


def incremental_after(env, wl, qsd, disk, rx, hist, group, label, base):
    """The next RP tracks changes again: an incremental carrying only what was written."""
    wl.write(qsd, disk, 3 * BLOCK, BLOCK)
    wl.take_touched(0)
    snaps = hist.snapshot_all(qsd, label)
    rp = env.replicate_once(qsd, rx.addr, group)
    hist.record(rp, snaps)
    p = hist.verify(rps=[rp], what=f"({label}) ")[rp]
    ft.check_eq(p["base_rp"], base, f"base_rp of RP {rp}")
    ft.check_eq(p["disks"][0]["changed_bytes"], BLOCK, f"changed bytes of incremental RP {rp}")
    _, _, described = figures(env.last_replicate)
    ft.check(not described, f"RP {rp} resynced although the bitmap was back:\n"
                            f"{env.last_replicate}")


with ft.Env("resync") as env:
    wl = env.workload()
    rng = env.rng
    rx = env.receiver()

    # --- 1. RAW disk, qsd restarted: no_bitmap -> resync ------------------------------
    SIZE = 1024 * ft.MiB
    qsd = env.qsd([ft.Disk("vda", SIZE, "raw")], tag="qsdraw")
    vda = qsd.disks[0]
    data_blocks = set()
    for chunk in rng.sample(range(SIZE // (4 * ft.MiB)), 64):  # 256 MiB in 4 MiB pieces
        wl.write(qsd, vda, chunk * 4 * ft.MiB, 4 * ft.MiB)
        data_blocks.update(range(chunk * 64, chunk * 64 + 64))
    hist = ft.History(env, rx.store, GROUP_RAW, keep_last=2)
    snaps = hist.snapshot_all(qsd, "raw-full")
    rp1 = env.replicate_once(qsd, rx.addr, GROUP_RAW)
    hist.record(rp1, snaps)
    ft.check(hist.verify(rps=[rp1])[rp1]["disks"][0]["full"], "first RP must be full")
    allocated = ft.allocated_bytes(vda.image)

    qsd.stop()
    qsd = reopen_qsd(env, qsd, "qsdraw")
    vda = qsd.disks[0]
    wl.take_touched(0)
    picked = scattered_changes(env, wl, qsd, vda, data_blocks, SIZE // 100 // BLOCK)
    changed = len(picked) * BLOCK
    ft.check_eq(wl.take_touched(0), changed, "blocks touched")
    rp2, d, wire, hashes = resync_rp(env, qsd, rx, hist, GROUP_RAW, "raw-resync", rp1, "no_bitmap")
    ft.check_eq(d["changed_bytes"], changed, f"bytes carried by resync RP {rp2}")
    ft.check(hashes >= (SIZE // BLOCK) * 16, f"{hashes} hash bytes cannot cover {SIZE} bytes")
    bound = 1.5 * changed + 2 * hashes
    ft.check(wire < bound, f"resync sent {wire} bytes, bound {bound:.0f} "
                           f"(changed {changed}, hashes {hashes})")
    ft.check(wire < allocated / 4, f"resync sent {wire} bytes, the disk holds {allocated}")
    figure = (f"resync: {changed / ft.MiB:.1f} MiB changed, {wire / ft.MiB:.1f} MiB sent, "
              f"{hashes / ft.MiB:.2f} MiB hashes (disk {SIZE // ft.MiB} MiB, "
              f"{allocated / ft.MiB:.0f} MiB allocated)")
    ft.log(figure)
    print(figure)
    incremental_after(env, wl, qsd, vda, rx, hist, GROUP_RAW, "raw-incremental", rp2)
    qsd.stop()

    # --- 2. qcow2, qsd killed -9: bitmap_inconsistent -> resync ------------------------
    SIZE2 = 256 * ft.MiB
    q2 = env.qsd([ft.Disk("vdq", SIZE2, "qcow2")], tag="qsdq")
    vdq = q2.disks[0]
    wl2 = env.workload(salt=2)
    blocks2 = set()
    for chunk in rng.sample(range(SIZE2 // ft.MiB), 48):
        wl2.write(q2, vdq, chunk * ft.MiB, ft.MiB)
        blocks2.update(range(chunk * 16, chunk * 16 + 16))
    hist2 = ft.History(env, rx.store, GROUP_QCOW2, keep_last=2)
    snaps = hist2.snapshot_all(q2, "q-full")
    rq1 = env.replicate_once(q2, rx.addr, GROUP_QCOW2)
    hist2.record(rq1, snaps)
    # QEMU writes a persistent bitmap into the image only when it closes it: a clean restart
    # stores it, the restarted daemon marks it in use, and a kill -9 leaves it so.
    q2.stop()
    q2 = reopen_qsd(env, q2, "qsdq")
    vdq = q2.disks[0]
    wl2.take_touched(0)
    n = SIZE2 // 100 // BLOCK
    picked2 = scattered_changes(env, wl2, q2, vdq, blocks2, n // 2)  # before the kill: lost
    q2.sync()                                                      # from the bitmap
    q2.kill9()
    q2 = reopen_qsd(env, q2, "qsdq")
    vdq = q2.disks[0]
    picked2 |= scattered_changes(env, wl2, q2, vdq, blocks2 - picked2, n - n // 2)
    changed2 = len(picked2) * BLOCK
    rq2, d2, wire2, hashes2 = resync_rp(env, q2, rx, hist2, GROUP_QCOW2, "q-resync", rq1,
                                        "bitmap_inconsistent")
    ft.check_eq(d2["changed_bytes"], changed2, f"bytes carried by resync RP {rq2}")
    ft.check(wire2 < 1.5 * changed2 + 2 * hashes2,
             f"qcow2 resync sent {wire2} bytes (changed {changed2}, hashes {hashes2})")
    ft.log(f"qcow2 after kill -9: {changed2 / ft.MiB:.1f} MiB changed, {wire2 / ft.MiB:.1f} MiB "
           f"sent, {hashes2 / ft.MiB:.2f} MiB hashes")
    incremental_after(env, wl2, q2, vdq, rx, hist2, GROUP_QCOW2, "q-incremental", rq2)
    q2.stop()
    rx.stop()
    ft.write_result("resync", figure, seed=env.seed, changed_bytes=changed, wire_bytes=wire,
                    hash_bytes=hashes, qcow2_changed_bytes=changed2, qcow2_wire_bytes=wire2,
                    qcow2_hash_bytes=hashes2)
