#!/usr/bin/env python3
"""A sparse 8 GiB qcow2 disk with a few MiB written: the first (full) RP sends only allocated
data (unallocated ranges as zero records), so its data bytes (changed_bytes - zero_bytes) and
stored_bytes stay small, the receiver's store stays small and the RP is quick; the restore is sparse and equal to the
source. Then incrementals of a few writes each, restored and compared the same way."""

import time

import ferrytest as ft

GROUP = "sparse"
SIZE = 8 * ft.GiB
FIRST_RP_MAX_S = 120  # reading 8 GiB through NBD on 2 busy cores takes far longer than this

with ft.Env("sparse-8g") as env:
    wl = env.workload()
    rng = env.rng
    qsd = env.qsd([ft.Disk("big", SIZE, "qcow2")])
    big = qsd.disks[0]
    rx = env.receiver()
    hist = ft.History(env, rx.store, GROUP)

    # ~4 MiB of data spread over the disk, including its first and last blocks.
    wl.write(qsd, big, 0, 64 * ft.KiB)
    wl.write(qsd, big, SIZE - 100 * ft.KiB, 100 * ft.KiB)
    for _ in range(14):
        wl.write(qsd, big, rng.randrange(0, SIZE - ft.MiB, 4096), rng.randrange(4096, 384 * ft.KiB, 512))
    touched = wl.take_touched(0)
    snaps = hist.snapshot_all(qsd, "rp0")

    t0 = time.monotonic()
    rp = env.replicate_once(qsd, rx.addr, GROUP, timeout=600)
    took = time.monotonic() - t0
    hist.record(rp, snaps)
    p = {q["rp_id"]: q for q in env.points(rx.store, GROUP)}[rp]
    d = p["disks"][0]
    ft.log(f"first RP {rp}: {took:.1f}s, {d}")
    ft.check(d["full"], "the first RP is a full copy")
    ft.check_eq(d["size_bytes"], SIZE, "size_bytes")
    # changed_bytes counts data + zero records (store.h); the data part and what the journal
    # stores must be about the data written, nowhere near 8 GiB.
    data_bytes = d["changed_bytes"] - d["zero_bytes"]
    limit = touched + 4 * ft.MiB
    ft.check(data_bytes <= limit,
             f"first RP of a sparse disk carried {data_bytes} data bytes (changed "
             f"{d['changed_bytes']} - zero {d['zero_bytes']}); only {touched} bytes of 64 KiB "
             f"blocks hold data (limit {limit})")
    ft.check(data_bytes >= 3 * ft.MiB,
             f"first RP carried only {data_bytes} data bytes of the ~4 MiB written")
    ft.check(d["stored_bytes"] <= limit, f"stored_bytes {d['stored_bytes']} > {limit}")
    store_size = env.store_bytes(rx.store)
    ft.check(store_size <= 64 * ft.MiB, f"receiver store holds {store_size} bytes after one "
                                        f"sparse RP (whole zero ranges written?)")
    ft.check(took < FIRST_RP_MAX_S, f"first RP took {took:.0f}s: was the whole disk read?")

    out = env.restore(rx.store, GROUP, rp, "big", timeout=300)
    ft.check(ft.allocated_bytes(out) <= 64 * ft.MiB,
             f"restore of a sparse disk is not sparse: {ft.allocated_bytes(out)} bytes allocated")
    diff = ft.first_difference(snaps["big"], out)
    ft.check(diff is None, f"restore of RP {rp} differs: {diff}")

    prev = rp
    for i in range(1, 4 if not ft.LONG else 10):
        for _ in range(5):
            wl.write(qsd, big, rng.randrange(0, SIZE - ft.MiB, 512), rng.randrange(1, 256 * ft.KiB))
        wl.zero(qsd, big, 0, 4096, "zero_range")
        touched = wl.take_touched(0)
        snaps = hist.snapshot_all(qsd, f"rp{i}")
        t0 = time.monotonic()
        rp = env.replicate_once(qsd, rx.addr, GROUP, timeout=300)
        took = time.monotonic() - t0
        hist.record(rp, snaps)
        p = {q["rp_id"]: q for q in env.points(rx.store, GROUP)}[rp]
        d = p["disks"][0]
        ft.log(f"incremental RP {rp}: {took:.1f}s, {d}")
        ft.check(not d["full"], f"RP {rp} is incremental")
        ft.check_eq(p["base_rp"], prev, f"base of RP {rp}")
        ft.check(d["changed_bytes"] <= touched, f"RP {rp} carried {d['changed_bytes']} bytes, "
                                                f"{touched} bytes of blocks were written")
        out = env.restore(rx.store, GROUP, rp, "big", timeout=300)
        ft.check(ft.allocated_bytes(out) <= 64 * ft.MiB, "restore stays sparse")
        diff = ft.first_difference(snaps["big"], out)
        ft.check(diff is None, f"restore of RP {rp} differs: {diff}")
        prev = rp
    hist.verify(rps=[hist.acked[0]], what="(first RP, at the end) ")
    qsd.stop()
    rx.stop()
