#!/usr/bin/env python3
"""kill -9 of the source (`ferry replicate --once`) in the middle of an RP, then `--once`
again: the new RP equals the source, so no dirty block is lost - neither those of the
interrupted RP (its frozen bitmap must be merged back or re-read) nor the writes made while it
ran (recorded by the new bitmap). Kills happen at a random moment of a large RP, with writes
going on meanwhile, and at every named source kill point (FERRY_KILL_AT). Afterwards each
disk holds exactly one Ferry bitmap of the group: leftovers of killed runs are healed."""

import threading
import time

import ferrytest as ft

GROUP = "ks"
SIZE = 256 * ft.MiB

with ft.Env("kill-source") as env:
    wl = env.workload()
    rng = env.rng
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2"), ft.Disk("vdb", 32 * ft.MiB, "raw")])
    vda, vdb = qsd.disks
    rx = env.receiver()
    hist = ft.History(env, rx.store, GROUP, keep_last=3)
    stats = {"random_kills": 0, "random_kills_mid_rp": 0, "kill_points_fired": [],
             "kill_points_not_fired": [], "dirty_blocks_lost": 0}

    wl.random_writes(qsd, vda, 10)
    wl.random_writes(qsd, vdb, 10)
    snaps = hist.snapshot_all(qsd, "base")
    hist.record(env.replicate_once(qsd, rx.addr, GROUP), snaps)

    def ferry_bitmaps():
        # RP bitmaps only: the identity tag ferry.G.id.<hex> names the disk and stays.
        return {d.name: sorted(b for b in qsd.qmp.bitmaps(d.node) if b.startswith(f"ferry.{GROUP}.")
                               and not b.startswith(f"ferry.{GROUP}.id."))
                for d in qsd.disks}

    def next_rp_equal(label, interrupted_rp=None):
        """After a killed source: the next --once must equal the source."""
        pts = {p["rp_id"] for p in env.points(rx.store, GROUP)}
        for rp in hist.acked:
            ft.check(rp in pts, f"{label}: committed RP {rp} vanished")
        if interrupted_rp is not None:
            ft.check(interrupted_rp in pts, f"{label}: RP {interrupted_rp} printed but not listed")
        snaps = hist.snapshot_all(qsd, f"{label}-after")
        rp = env.replicate_once(qsd, rx.addr, GROUP)
        hist.record(rp, snaps)
        try:
            hist.verify(rps=[rp], what=f"({label}) ")
        except ft.TestFailure:
            stats["dirty_blocks_lost"] += 1
            raise
        left = ferry_bitmaps()
        ft.check(all(len(v) == 1 for v in left.values()),
                 f"{label}: Ferry bitmaps left on the disks after a healthy RP: {left}")

    # 1. Random-time kills of a large RP while the guest keeps writing.
    rounds = 8 if ft.LONG else 1 if ft.SANITIZE else 2
    for r in range(rounds):
        change = rng.choice([24, 32, 48]) * ft.MiB if not ft.LONG else rng.choice([64, 128]) * ft.MiB
        start = rng.randrange(0, SIZE - change, ft.MiB)
        for off in range(start, start + change, ft.MiB):
            wl.write(qsd, vda, off, ft.MiB)
        wl.random_writes(qsd, vdb, 5)
        qsd.sync()
        store0 = env.store_bytes(rx.store)
        grow = int(change * rng.uniform(0.05, 0.5))
        delay = rng.uniform(0.2, 3.0)
        stop = threading.Event()
        errors = []

        def writer():
            w = env.workload(salt=1000 + r)
            try:
                while not stop.is_set():
                    w.random_writes(qsd, vda, 1, max_len=64 * ft.KiB)
                    w.random_writes(qsd, vdb, 1, max_len=64 * ft.KiB)
                    time.sleep(0.01)
            except Exception as e:
                errors.append(e)

        t = threading.Thread(target=writer, daemon=True)
        rep = env.replicate_popen(qsd, rx.addr, GROUP, tag=f"replicate-rand{r}")
        t.start()
        t0 = time.monotonic()
        while rep.alive() and time.monotonic() - t0 < delay and \
                env.store_bytes(rx.store) - store0 < grow:
            time.sleep(0.01)
        mid = rep.alive()
        rep.kill9()
        stop.set()
        t.join(10)
        ft.check(not errors, f"guest writer failed: {errors}")
        stats["random_kills"] += 1
        stats["random_kills_mid_rp"] += int(mid)
        out = rep.p.stdout.read().decode().strip()
        ft.log(f"round {r}: killed replicate {time.monotonic() - t0:.2f}s in "
               f"({'mid-RP' if mid else 'after it finished'}), store grew "
               f"{env.store_bytes(rx.store) - store0} bytes")
        if not mid and out:
            hist.acked.append(int(out.splitlines()[-1]))  # it finished: a normal RP
        ft.check(rx.alive(), "the receiver died when its source was killed")
        next_rp_equal(f"random kill {r}")
    ft.check(stats["random_kills_mid_rp"] > 0, "no kill landed in the middle of an RP")

    # 2. Every named source kill point.
    r = env.run(["debug", "kill-points"], timeout=30, check_rc=0)
    points = [p for p in r.out.split() if p.startswith("source.")]
    ft.check(points, f"ferry debug kill-points lists no source points:\n{r}")
    for kp in points:
        wl.random_writes(qsd, vda, 8, max_len=512 * ft.KiB)
        wl.random_writes(qsd, vdb, 4)
        res = env.run(env.replicate_args(qsd, rx.addr, GROUP), timeout=180,
                      extra_env={"FERRY_KILL_AT": kp})
        printed = None
        if res.rc == -9:
            stats["kill_points_fired"].append(kp)
            ft.log(f"kill point {kp}: fired")
        else:
            stats["kill_points_not_fired"].append(kp)
            ft.check(res.rc == 0, f"replicate failed while {kp} did not fire:\n{res}")
            printed = int(res.out.strip().splitlines()[-1])
            hist.acked.append(printed)
            ft.log(f"kill point {kp}: not hit")
        # Writes after the kill, before the next RP: must arrive as well.
        wl.random_writes(qsd, vdb, 3)
        next_rp_equal(f"kill point {kp}", printed)
    ft.check(stats["kill_points_fired"], f"no source kill point fired ({points})")

    hist.verify(what="(at the end) ")
    qsd.stop()
    rx.stop()
    n = stats["random_kills"] + len(stats["kill_points_fired"])
    ft.write_result("kill-source", f"{n} source kills, {stats['dirty_blocks_lost']} RPs with "
                    f"dirty blocks lost", seed=env.seed, long=ft.LONG, **stats)
