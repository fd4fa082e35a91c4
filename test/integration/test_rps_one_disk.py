#!/usr/bin/env python3
"""Several RPs of one qcow2 disk: a full first RP, then incrementals with overwrites, zero
writes over data (QEMU write_zeroes and zero bytes written as data), writes smaller than and
not aligned to 64 KiB (down to 1 byte at odd offsets), a write ending at the last byte of the
disk, and an RP with no change at all. Writes stop before each `--once`; every RP is restored
and must equal the copy of the source taken right after that RP's writes. `ferry points` must
list every acknowledged RP with the right base, and an incremental must carry no more than the
64 KiB blocks written since the previous RP."""

import ferrytest as ft

GROUP = "one"
SIZE = 96 * ft.MiB + 12 * ft.KiB  # not a multiple of 64 KiB: the last block is partial

with ft.Env("rps-one-disk") as env:
    wl = env.workload()
    rng = env.rng
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2")])
    vda = qsd.disks[0]
    rx = env.receiver()
    hist = ft.History(env, rx.store, GROUP)
    written = []  # (offset, length) of data written so far, to overwrite and zero later

    def step_initial():
        for i in range(12):
            off = rng.randrange(0, SIZE - 512 * ft.KiB, 512)
            n = rng.randrange(4 * ft.KiB, 512 * ft.KiB, 512)
            wl.write(qsd, vda, off, n)
            written.append((off, n))

    def step_overwrite():
        for off, n in rng.sample(written, 6):
            o = off + rng.randrange(0, n // 2)
            wl.write(qsd, vda, o, rng.randrange(1, n // 2 + 1))

    def step_small_unaligned():
        for _ in range(40):
            off = rng.randrange(0, SIZE - 70000)
            wl.write(qsd, vda, off, rng.choice([1, 7, 511, 513, 4095, 65535, 65537]))
        wl.write(qsd, vda, SIZE - 3000, 3000)  # ends at the last byte of the disk

    def step_zero_over_data():
        for (off, n), how in zip(rng.sample(written, 4), ["zero_range", "pwrite"] * 2):
            o = off + rng.randrange(0, n // 2)
            wl.zero(qsd, vda, o, max(1, n // 3), how)
        # a whole aligned 64 KiB block of data, then zeros over exactly that block
        wl.write(qsd, vda, 40 * ft.MiB, 64 * ft.KiB)
        wl.zero(qsd, vda, 40 * ft.MiB, 64 * ft.KiB, "zero_range")

    def step_nothing():
        pass

    def step_mixed():
        wl.random_writes(qsd, vda, 30, min_len=1, max_len=200 * ft.KiB, align=1)
        step_overwrite()
        wl.zero(qsd, vda, SIZE - 64 * ft.KiB, 64 * ft.KiB, "zero_range")

    steps = [step_initial, step_overwrite, step_small_unaligned, step_zero_over_data,
             step_nothing, step_mixed]
    if ft.LONG:
        steps += [step_mixed, step_small_unaligned, step_zero_over_data, step_overwrite] * 3

    prev = 0
    for i, step in enumerate(steps):
        step()
        snaps = hist.snapshot_all(qsd, f"rp{i}")
        touched = wl.take_touched(0)
        rp = env.replicate_once(qsd, rx.addr, GROUP)
        hist.record(rp, snaps)
        pts = hist.verify(rps=[rp], what=f"(step {step.__name__}) ")
        p = pts[rp]
        ft.check_eq(p["base_rp"], prev, f"base_rp of RP {rp}")
        ft.check_eq([d["name"] for d in p["disks"]], ["vda"], f"disks of RP {rp}")
        d = p["disks"][0]
        ft.check_eq(d["size_bytes"], SIZE, f"size_bytes of RP {rp}")
        ft.check_eq(d["full"], i == 0, f"full flag of RP {rp}")
        if i > 0:
            ft.check(d["changed_bytes"] <= touched,
                     f"RP {rp} ({step.__name__}) carries {d['changed_bytes']} changed bytes, "
                     f"but only {touched} bytes of 64 KiB blocks were written")
        if step is step_nothing:
            ft.check_eq(d["changed_bytes"], 0, f"changed_bytes of the RP without writes")
        ft.log(f"RP {rp} ({step.__name__}): {d}")
        prev = rp

    # Every RP still restores to its own content after later ones were committed.
    hist.verify(what="(after all RPs) ")
    # The receiver stops cleanly on SIGTERM and a restart serves the same points.
    rx.stop()
    rx.restart()
    hist.verify(rps=[hist.acked[0], hist.acked[-1]], what="(after a receiver restart) ")
    qsd.stop()
