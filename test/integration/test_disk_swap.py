#!/usr/bin/env python3
"""A disk keeps its identity across RPs (issue 18, item 5): two disks of one size, RP 1 and 2
with `--disk drive0=root --disk drive1=data`, distinct writes to both, then RP 3 with the
names swapped (`--disk drive0=data --disk drive1=root`). Before disk identities, RP 3 was an
incremental of drive1's changes into root's replica: acknowledged and restorable with wrong
bytes. Now each disk carries an identity (a tag bitmap on its node), the receiver holds the
identity of each disk, and RP 3 is a resync of both disks: every RP restores equal to the
source, and the log names both identities. RP 4 (names kept) is incremental again."""

import ferrytest as ft

GROUP = "swap"
SIZE = 16 * ft.MiB

with ft.Env("disk-swap") as env:
    wl = env.workload()
    qsd = env.qsd([ft.Disk("d0", SIZE, "qcow2", node="drive0"),
                   ft.Disk("d1", SIZE, "qcow2", node="drive1")])
    d0, d1 = qsd.disks
    rx = env.receiver()
    straight = ["drive0=root", "drive1=data"]
    swapped = ["drive0=data", "drive1=root"]

    def snap(label, mapping):
        """{group disk name: snapshot of the node it maps to}."""
        qsd.sync()
        out = {}
        for spec in mapping:
            node, name = spec.split("=")
            disk = d0 if node == "drive0" else d1
            out[name] = qsd.snapshot(disk, env.path("snaps", f"{label}-{name}.img"))
        return out

    def verify(rp, snaps, what):
        for name, img in sorted(snaps.items()):
            env.check_restore(rx.store, GROUP, rp, name, img, what)

    def modes(rp):
        p = next(p for p in env.points(rx.store, GROUP) if p["rp_id"] == rp)
        return {d["name"]: d for d in p["disks"]}

    kept = {}
    wl.random_writes(qsd, d0, 12, min_len=4 * ft.KiB, max_len=200 * ft.KiB)
    wl.random_writes(qsd, d1, 12, min_len=4 * ft.KiB, max_len=200 * ft.KiB)
    s = snap("rp1", straight)
    rp1 = env.replicate_once(qsd, rx.addr, GROUP, disks=straight)
    verify(rp1, s, "(RP 1) ")
    kept[rp1] = s

    wl.random_writes(qsd, d0, 8, min_len=4 * ft.KiB, max_len=100 * ft.KiB)
    wl.random_writes(qsd, d1, 8, min_len=4 * ft.KiB, max_len=100 * ft.KiB)
    s = snap("rp2", straight)
    rp2 = env.replicate_once(qsd, rx.addr, GROUP, disks=straight)
    verify(rp2, s, "(RP 2) ")
    kept[rp2] = s

    # Distinct data on both, then the names swapped on the command line.
    wl.random_writes(qsd, d0, 8, min_len=4 * ft.KiB, max_len=100 * ft.KiB)
    wl.random_writes(qsd, d1, 8, min_len=4 * ft.KiB, max_len=100 * ft.KiB)
    s = snap("rp3", swapped)
    r = env.run(env.replicate_args(qsd, rx.addr, GROUP, disks=swapped), timeout=300)
    ft.log(f"swapped run: exit {r.rc}")
    if r.rc == 0:
        rp3 = int(r.out.strip().splitlines()[-1])
        # Whatever the engine did, what it acknowledged must restore equal to the source.
        verify(rp3, s, "(RP 3, names swapped) ")
        kept[rp3] = s
        ft.check("swapped or replaced" in r.err,
                 f"the swapped run must warn that the disks were swapped or replaced:\n{r}")
        for name, d in modes(rp3).items():
            ft.check(d["mode"] in ("resync", "full"),
                     f"disk {name} of RP {rp3} (identity changed) is {d['mode']}, "
                     "never an incremental")
        # With the new names kept, the next RP is an incremental again.
        wl.random_writes(qsd, d0, 4, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
        wl.random_writes(qsd, d1, 4, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
        s = snap("rp4", swapped)
        rp4 = env.replicate_once(qsd, rx.addr, GROUP, disks=swapped)
        verify(rp4, s, "(RP 4, after the swap) ")
        kept[rp4] = s
        for name, d in modes(rp4).items():
            ft.check_eq(d["mode"], "incremental", f"mode of {name} in RP {rp4}")
    else:
        # Refused: it must say why, naming both identities, and commit nothing.
        ft.check("identity" in r.err, f"the refusal must name the identities:\n{r}")
        ft.check_eq(max(p["rp_id"] for p in env.points(rx.store, GROUP)), rp2,
                    "last RP after the refused swap")

    # Nothing acknowledged restores wrong, in the end either.
    for rp, s in sorted(kept.items()):
        verify(rp, s, "(at the end) ")
    qsd.stop()
    rx.stop()
