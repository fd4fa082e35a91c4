#!/usr/bin/env python3
"""Two sources, one group name (issue 18, item 5): two qemu-storage-daemons ("host A" and
"host B") with their own images and the same disk names replicate into one group. Before
disk identities, host B's first run found no bitmap, resynced its disk over host A's replica
and was acknowledged; host A's next incremental then landed on host B's bytes. Now host B is
refused with an error naming the group, both sources and the fix, and commits nothing; host
A keeps working; `--take-over` makes host B's run a resync that restores equal, and host A is
then the one refused."""

import os

import ferrytest as ft

GROUP = "shared"
SIZE = 8 * ft.MiB

with ft.Env("two-sources") as env:
    wl = env.workload()
    qa = env.qsd([ft.Disk("vda", SIZE, "qcow2")], tag="hostA")
    qb = env.qsd([ft.Disk("vda", SIZE, "qcow2")], tag="hostB")
    a, b = qa.disks[0], qb.disks[0]
    rx = env.receiver()
    state_a = os.path.join(env.dir, "state-a")
    state_b = os.path.join(env.dir, "state-b")
    os.makedirs(state_a)
    os.makedirs(state_b)

    def snap(q, d, label):
        return {"vda": q.snapshot(d, env.path("snaps", f"{label}.img"))}

    def verify(rp, snaps, what):
        for name, img in snaps.items():
            env.check_restore(rx.store, GROUP, rp, name, img, what)

    def last_rp():
        return max(p["rp_id"] for p in env.points(rx.store, GROUP))

    kept = {}
    for i in range(2):
        wl.random_writes(qa, a, 10, min_len=4 * ft.KiB, max_len=128 * ft.KiB)
        s = snap(qa, a, f"a{i}")
        rp = env.replicate_once(qa, rx.addr, GROUP, state_dir=state_a)
        verify(rp, s, f"(host A, RP {rp}) ")
        kept[rp] = s

    # Host B, same group and disk name, other image.
    wl.random_writes(qb, b, 10, min_len=4 * ft.KiB, max_len=128 * ft.KiB)
    before = last_rp()
    r = env.run(env.replicate_args(qb, rx.addr, GROUP, state_dir=state_b), timeout=120)
    ft.check(r.rc != 0, f"a second source writing into group {GROUP} must be refused:\n{r}")
    for what in (GROUP, "--take-over", "--group", "hostA"):
        ft.check(what in r.err, f"the refusal must name {what!r}:\n{r}")
    ft.check_eq(last_rp(), before, "last RP after the refused second source")
    ft.log(f"host B refused: {r.err.strip().splitlines()[-1]}")

    # Host A keeps working, incrementally.
    wl.random_writes(qa, a, 6, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
    s = snap(qa, a, "a2")
    rp = env.replicate_once(qa, rx.addr, GROUP, state_dir=state_a)
    verify(rp, s, f"(host A after the refusal, RP {rp}) ")
    kept[rp] = s
    p = next(p for p in env.points(rx.store, GROUP) if p["rp_id"] == rp)
    ft.check_eq(p["disks"][0]["mode"], "incremental", f"mode of host A's RP {rp}")

    # Host B takes the group over: a resync (same size), restoring equal to host B's disk.
    s = snap(qb, b, "b-take")
    r = env.run(env.replicate_args(qb, rx.addr, GROUP, state_dir=state_b) + ["--take-over"],
                timeout=120)
    ft.check(r.rc == 0, f"--take-over must be accepted:\n{r}")
    rp = int(r.out.strip().splitlines()[-1])
    verify(rp, s, f"(host B took over, RP {rp}) ")
    kept[rp] = s
    p = next(p for p in env.points(rx.store, GROUP) if p["rp_id"] == rp)
    ft.check(p["disks"][0]["mode"] in ("resync", "full"),
             f"host B's take-over RP {rp} must be a resync or full copy: {p}")

    # Now host A is the second source.
    wl.random_writes(qa, a, 4, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
    before = last_rp()
    r = env.run(env.replicate_args(qa, rx.addr, GROUP, state_dir=state_a), timeout=120)
    ft.check(r.rc != 0, f"host A must now be refused (host B took the group over):\n{r}")
    ft.check_eq(last_rp(), before, "last RP after host A was refused")

    for rp, s in sorted(kept.items()):
        verify(rp, s, "(at the end) ")
    qa.stop()
    qb.stop()
    rx.stop()
