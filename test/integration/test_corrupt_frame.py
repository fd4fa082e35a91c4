#!/usr/bin/env python3
"""A corrupting TCP proxy between `ferry replicate` and `ferry receive` flips one byte in the
block data of a DATA frame (C3): the receiver rejects it and says so in its log, replicate
fails (exit 1), nothing is committed (`ferry points` unchanged), the receiver stays up. Then a
clean run through the same proxy succeeds and equals the source, so the blocks of the failed
RP were not lost from the bitmap either. Done for a full first RP and for an incremental."""

import re

import ferrytest as ft

GROUP = "cf"

# Mutual TLS on both legs (ft.TlsLegs): the proxy sits between a TLS terminator and a TLS
# originator, where the frames are visible, so it corrupts what a bug or a bad disk would
# (TLS's own integrity check would catch a flip on the wire first).
with ft.Env("corrupt-frame") as env:
    wl = env.workload()
    qsd = env.qsd([ft.Disk("vda", 64 * ft.MiB, "qcow2")])
    vda = qsd.disks[0]
    rx = env.receiver()
    legs = ft.TlsLegs(env, rx.port)
    proxy = ft.CorruptingProxy(env, legs.back_port)
    front = legs.front(proxy.port)
    hist = ft.History(env, rx.store, GROUP)
    flips = 0

    for round_ in ("full", "incremental", "incremental-2"):
        wl.random_writes(qsd, vda, 20, min_len=4 * ft.KiB, max_len=256 * ft.KiB)
        snaps = hist.snapshot_all(qsd, round_)
        before = env.points(rx.store, GROUP) if hist.acked else []
        log_at = len(rx.log_text())

        proxy.corrupt = True
        flipped0 = proxy.flipped
        r = env.run(env.replicate_args(qsd, front, GROUP), timeout=180)
        ft.check(proxy.flipped > flipped0, f"{round_}: the proxy found no DATA frame to corrupt "
                                           f"({proxy.data_frames} DATA frames seen)")
        ft.log(f"{round_}: flipped {proxy.flips[-1]}; replicate exited {r.rc}")
        ft.check_eq(r.rc, 1, f"{round_}: exit status of replicate through a corrupting link\n{r}")
        ft.check(r.err.strip(), f"{round_}: replicate failed without a message")
        after = env.points(rx.store, GROUP) if hist.acked else []
        ft.check_eq(after, before, f"{round_}: committed points after a corrupted RP")
        if not hist.acked:
            ft.check_eq(env.points(rx.store, GROUP), [], "points after a corrupted first RP")
        new_log = rx.log_text()[log_at:]
        ft.check(re.search(r"checksum|corrupt", new_log, re.I),
                 f"{round_}: receiver log does not report the corrupt frame:\n{new_log[-3000:]}")
        ft.check(rx.alive(), f"{round_}: receiver died on a corrupt frame")
        flips += proxy.flipped - flipped0

        proxy.corrupt = False
        rp = env.replicate_once(qsd, front, GROUP)
        hist.record(rp, snaps)
        p = hist.verify(rps=[rp], what=f"({round_}, after the corrupted attempt) ")[rp]
        ft.check_eq(p["disks"][0]["full"], round_ == "full", f"{round_}: full flag")

    hist.verify(what="(at the end) ")
    qsd.stop()
    rx.stop()
    ft.write_result("corrupt-frame", f"{flips} corrupted frames, 100% detected, 0 applied",
                    seed=env.seed, corrupted=flips, detected=flips, applied=0)
