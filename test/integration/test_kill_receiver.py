#!/usr/bin/env python3
"""kill -9 of the receiver in the middle of an RP, then a restart and `--once` again (C1, C2).

Two kinds of kill:
  * at a random moment of a large RP: after the store has grown by a seeded random amount (or
    a short random delay), while `ferry replicate` is still sending;
  * at every named receiver kill point (`ferry debug kill-points`, FERRY_KILL_AT=<point>).
After each kill the receiver restarts on the same port and: every acknowledged RP is still
listed and restores as before; an RP committed but not acknowledged before the kill equals the
source as it was at that attempt; the next `--once` equals the source (nothing the bitmap
recorded is lost, including writes made after the interrupted capture)."""

import os
import struct
import time

import ferrytest as ft

GROUP = "kr"


def applied_rp(store):
    """(base RP, compaction target) from the receiver's state file (docs/journal-format.md,
    version 2: the images hold the base RP; target != 0 while a compaction runs)."""
    try:
        with open(os.path.join(store, GROUP, "state"), "rb") as f:
            return struct.unpack_from("<QQ", f.read(40), 16)
    except (OSError, struct.error):
        return None
SIZE = 256 * ft.MiB

with ft.Env("kill-receiver") as env:
    wl = env.workload()
    rng = env.rng
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2")])
    vda = qsd.disks[0]
    rx = env.receiver()
    hist = ft.History(env, rx.store, GROUP, keep_last=3)
    stats = {"random_kills": 0, "random_kills_mid_rp": 0, "kill_points_fired": [],
             "kill_points_not_fired": [], "acked_rps_lost": 0, "replicas_not_equal": 0}

    # A first RP to have something to lose.
    wl.random_writes(qsd, vda, 20)
    snaps = hist.snapshot_all(qsd, "base")
    hist.record(env.replicate_once(qsd, rx.addr, GROUP), snaps)

    def known_points():
        return {p["rp_id"] for p in env.points(rx.store, GROUP)}

    def after_restart(attempt_snaps, attempt_rp, label):
        """Checks after a receiver restart; then one more RP with new writes."""
        before = set(hist.acked)
        pts = known_points()
        lost = [rp for rp in hist.acked if rp not in pts]
        stats["acked_rps_lost"] += len(lost)
        ft.check(not lost, f"{label}: acknowledged RPs {lost} lost after the restart")
        if attempt_rp is not None:  # the interrupted replicate did get its acknowledgement
            ft.check(attempt_rp in pts, f"{label}: acknowledged RP {attempt_rp} lost")
        for rp in sorted(pts - before):
            if rp != attempt_rp:
                ft.log(f"{label}: RP {rp} was committed but not acknowledged; it must equal "
                       f"the source at the interrupted attempt")
            hist.snaps[rp] = attempt_snaps
            hist.acked.append(rp)
        hist.acked.sort()
        newest = max(pts)
        try:
            hist.verify(rps=sorted({newest, hist.acked[0]}), what=f"({label}, after restart) ")
        except ft.TestFailure:
            stats["replicas_not_equal"] += 1
            raise
        # New writes, then an RP: it must carry the interrupted RP's blocks and the new ones.
        wl.random_writes(qsd, vda, 6, max_len=128 * ft.KiB)
        snaps = hist.snapshot_all(qsd, f"{label}-next")
        rp = env.replicate_once(qsd, rx.addr, GROUP)
        hist.record(rp, snaps)
        hist.verify(rps=[rp], what=f"({label}, next RP) ")

    # 1. Random-time kills during a large RP.
    rounds = 8 if ft.LONG else 1 if ft.SANITIZE else 2
    for r in range(rounds):
        change = rng.choice([24, 32, 48]) * ft.MiB if not ft.LONG else rng.choice([64, 128]) * ft.MiB
        start = rng.randrange(0, SIZE - change, ft.MiB)
        for off in range(start, start + change, ft.MiB):
            wl.write(qsd, vda, off, ft.MiB)
        snaps = hist.snapshot_all(qsd, f"rand{r}")
        store0 = env.store_bytes(rx.store)
        grow = int(change * rng.uniform(0.1, 0.6))
        delay = rng.uniform(0.2, 3.0)
        rep = env.replicate_popen(qsd, rx.addr, GROUP, tag=f"replicate-rand{r}")
        t0 = time.monotonic()
        while rep.alive() and time.monotonic() - t0 < delay and \
                env.store_bytes(rx.store) - store0 < grow:
            time.sleep(0.01)
        mid = rep.alive()
        grown = env.store_bytes(rx.store) - store0
        rx.kill9()
        rx.restart()  # at once: a sender that retries may finish its RP on the new receiver
        stats["random_kills"] += 1
        stats["random_kills_mid_rp"] += int(mid)
        ft.log(f"round {r}: killed the receiver {time.monotonic() - t0:.2f}s into the RP, store "
               f"+{grown} bytes, replicate {'still running' if mid else 'already done'}")
        rc = rep.wait(180)
        out = rep.p.stdout.read().decode().strip()
        ft.log(f"round {r}: interrupted replicate exited {rc} ({out!r})")
        acked = int(out.splitlines()[-1]) if rc == 0 and out else None
        if mid:
            ft.check(rc != 0 or acked is not None, "replicate exited 0 without an RP id")
        after_restart(snaps, acked, f"random kill {r}")
    ft.check(stats["random_kills_mid_rp"] > 0,
             "no random kill landed in the middle of an RP (change set too small?)")

    # 2. Every named receiver kill point.
    r = env.run(["debug", "kill-points"], timeout=30, check_rc=0)
    points = [p for p in r.out.split() if p.split(".")[0] in
              ("receiver", "journal", "apply", "state")]
    ft.check(points, f"ferry debug kill-points lists no receiver points:\n{r}")
    for kp in points:
        wl.random_writes(qsd, vda, 8, max_len=256 * ft.KiB)
        snaps = hist.snapshot_all(qsd, f"kp-{kp}")
        rx.stop()
        rx.restart(extra_env={"FERRY_KILL_AT": kp})
        res = env.run(env.replicate_args(qsd, rx.addr, GROUP), timeout=180)
        acked = int(res.out.strip().splitlines()[-1]) if res.rc == 0 else None
        # Points after the acknowledgement (retention: apply, state, prune) may fire a little
        # later: give the retention pass that follows the ack 0.5 s, then wait while the state
        # file says a compaction runs (at most 2 s in all), then stop the receiver; -9 means
        # the point fired.
        t0 = time.monotonic()
        time.sleep(0.5)
        while rx.alive() and time.monotonic() - t0 < 2:
            st = applied_rp(rx.store)
            if acked is not None and st is not None and st[1] == 0:
                break
            time.sleep(0.02)
        if rx.alive():
            rx.proc.p.send_signal(15)
            try:
                rx.proc.p.wait(20)
            except Exception:
                raise ft.TestFailure(f"receiver ignored SIGTERM:\n{ft.tail(rx.log_path)}")
        rc = rx.proc.p.returncode
        if rc == -9:
            stats["kill_points_fired"].append(kp)
            ft.log(f"kill point {kp}: fired; replicate exited {res.rc}")
        else:
            ft.check_eq(rc, 0, f"exit status of a receiver at {kp} that did not fire")
            # Not on this RP's path: the RP must have gone through.
            stats["kill_points_not_fired"].append(kp)
            ft.check(res.rc == 0, f"replicate failed while {kp} did not fire:\n{res}")
            ft.log(f"kill point {kp}: not hit by this RP")
        rx.restart()
        after_restart(snaps, acked, f"kill point {kp}")
    ft.check(stats["kill_points_fired"], f"no receiver kill point fired (points {points}); "
             "is the build without fault points?")

    hist.verify(what="(at the end) ")
    qsd.stop()
    rx.stop()
    n = stats["random_kills"] + len(stats["kill_points_fired"])
    ft.write_result("kill-receiver",
                    f"{n} crash points, {stats['replicas_not_equal']} replicas not equal to one "
                    f"committed RP, {stats['acked_rps_lost']} acknowledged RPs lost",
                    seed=env.seed, long=ft.LONG, **stats)
