#!/usr/bin/env python3
"""kill -9 of the receiver at every named receiver kill point (FERRY_KILL_AT=<point>:<n>) and at
random moments of receive/journal/commit/apply, checked with the oracle (C1, C2). The
rebuild.* points fire during the start-up rebuild of a replica whose image was deleted or cut
short while the receiver was down (R13, R16).

After each kill: the receiver is restarted (it recovers every group at start-up; the time from
its start until it listens is the recovery time), stopped cleanly, and then
  * replica/<disk>.img of both disks together equal exactly one committed RP k, the newest
    committed one, with last acknowledged <= k <= last sent (acknowledged = `replicate --once`
    printed its id);
  * no acknowledged RP is missing from `ferry points`; at most one RP appeared that was not
    acknowledged, and it is the interrupted attempt's;
  * the newly committed RPs (and a random older one) restore equal to their catalog state
    (every committed RP is restored at the end of a short run).
Then replication continues. Default: every receiver point once plus a few random kills;
FERRY_LONG=1: points x n in {1,2,3,5,8} and random kills up to >= 1000 crash points. To keep a
long run near a second per point, it writes smaller RPs (2..12 runs of <= 16 blocks instead
of 4..40 runs of <= 64) and restores the new RP at every 5th point and an older one at every
20th (the replica is still checked against the oracle after every kill, and a sample of 40
RPs is restored at the end).
Prints one JSON figure line and appends it to results/crash-receiver.jsonl."""

import contextlib
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402
from oracle import ft  # noqa: E402
import struct  # noqa: E402

GROUP = "cr"
SIZE = 32 * ft.MiB
TEST = "crash-receiver"


def start_receiver(env, rx, extra_env=None, may_die=False):
    """Starts rx on its port; returns seconds from spawn until it listens (recovery time), or
    None when may_die and it was killed by its kill point during recovery."""
    with open(rx.log_path, "ab") as f:
        f.write(f"--- crash_receiver: start, FERRY_KILL_AT={(extra_env or {}).get('FERRY_KILL_AT')} ---\n".encode())
    t0 = time.monotonic()
    proc = ft.Proc(env, rx.tag, [env.ferry, "receive", "--listen", f"127.0.0.1:{rx.port}",
                                 "--store", rx.store], rx.log_path, extra_env=extra_env)
    while not ft.pid_listens_on(proc.pid, rx.port):
        if not proc.alive():
            if may_die and proc.p.returncode == -9:
                rx.proc = proc
                return None
            raise ft.TestFailure(f"receiver exited {proc.p.returncode} at start:\n"
                                 f"{ft.tail(rx.log_path)}")
        if time.monotonic() - t0 > 30:
            raise ft.TestFailure(f"receiver not listening after 30s:\n{ft.tail(rx.log_path)}")
        time.sleep(0.002)
    rx.proc = proc
    return time.monotonic() - t0


def reap(env, proc):
    """A finished child: close its log and forget it (long runs start thousands)."""
    proc.close()
    if proc in env._procs:
        env._procs.remove(proc)


def stop_receiver(rx):
    rc = rx.proc.terminate(timeout=20)
    reap(rx.env, rx.proc)
    ft.check(rc == 0, f"receiver exited {rc} on SIGTERM after recovery:\n{ft.tail(rx.log_path)}")


PHASE_S = {}  # where the time of a crash point goes (reported in the figure line)


@contextlib.contextmanager
def phase(name):
    t0 = time.monotonic()
    try:
        yield
    finally:
        PHASE_S[name] = PHASE_S.get(name, 0.0) + time.monotonic() - t0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


with ft.Env(TEST) as env:
    rng = env.rng
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2"), ft.Disk("vdb", SIZE - 12 * 4096, "raw")])
    disks = {d.name: (i, d.size_bytes) for i, d in enumerate(qsd.disks)}
    wr = oracle.Writer(env.seed, disks)
    cat = oracle.Catalog(env.seed, disks)
    rx = env.receiver()
    replica = {d: os.path.join(rx.store, GROUP, "replica", f"{d}.img") for d in disks}
    acked = []          # RP ids printed by replicate --once
    last_sent_state = None
    stats = {"crash_points": 0, "kills_at_points": 0, "random_kills": 0, "points_not_hit": 0,
             "replicas_not_equal": 0, "acked_rps_lost": 0, "restores_checked": 0,
             "unacked_commits": 0, "attempts": 0}
    recovery_s = []
    fired = set()
    checked_rps = set()

    def attempt(label, extra_env=None, kill_after=None):
        """Writes, marks a state, runs one `replicate --once`. With kill_after (seconds), the
        receiver is killed -9 that long after the replicate started (if still running).
        Returns (rc, rp or None, state)."""
        global last_sent_state
        with phase("write"):
            if ft.LONG:
                wr.random_writes(qsd, rng.randint(2, 12), max_run=rng.choice([4, 16]))
            else:
                wr.random_writes(qsd, rng.randint(4, 40), max_run=rng.choice([4, 16, 64]))
            qsd.sync()
            state = cat.mark(wr, label)
        last_sent_state = state
        stats["attempts"] += 1
        with phase("replicate"):
            rep = env.replicate_popen(qsd, rx.addr, GROUP, tag="replicate")
            if kill_after is not None:
                t0 = time.monotonic()
                while rep.alive() and time.monotonic() - t0 < kill_after:
                    time.sleep(0.002)
                if rx.alive():
                    rx.proc.kill9()
            try:
                out, _ = rep.p.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                raise ft.TestFailure(f"{label}: replicate did not finish in 180s:\n"
                                     f"{ft.tail(rep.log_path)}")
        rc = rep.p.returncode
        reap(env, rep)
        lines = out.decode().split()
        rp = int(lines[-1]) if rc == 0 and lines and lines[-1].isdigit() else None
        ft.check(rc != 0 or rp is not None, f"{label}: replicate exited 0 without an RP id")
        if rp is not None:
            cat.bind(state, rp)
            acked.append(rp)
        return rc, rp, state

    def check_after_crash(label, restore_old=True):
        """Restart (recovery), stop, then the oracle on the replica and the RPs. restore_old:
        also restore an older RP (a round that wrote nothing to the journal skips it)."""
        with phase("recover"):
            recovery_s.append(start_receiver(env, rx))
        with phase("stop"):
            stop_receiver(rx)
        with phase("points"):
            pts = env.points(rx.store, GROUP)
        ids = [p["rp_id"] for p in pts]
        lost = [r for r in acked if r not in ids]
        stats["acked_rps_lost"] += len(lost)
        ft.check(not lost, f"{label}: acknowledged RPs {lost} lost; committed {ids}")
        unknown = [r for r in ids if r not in cat.state_of]
        ft.check(len(unknown) <= 1, f"{label}: RPs {unknown} committed but never sent")
        if unknown:  # committed, not acknowledged: the interrupted attempt
            ft.check(last_sent_state not in cat.rp_of,
                     f"{label}: RP {unknown[0]} committed but the last attempt was RP "
                     f"{cat.rp_of.get(last_sent_state)}")
            cat.bind(last_sent_state, unknown[0])
            stats["unacked_commits"] += 1
        if not ids:
            return
        k = max(ids)
        last_acked = max(acked) if acked else 0
        ft.check(last_acked <= k, f"{label}: newest committed RP {k} < last acknowledged "
                                  f"{last_acked}")
        ft.check(cat.state_of[k] <= last_sent_state, f"{label}: RP {k} is newer than sent")
        with phase("check_replica"):
            v = cat.check(replica)
        if v.equals_rps != [k]:
            stats["replicas_not_equal"] += 1
            cat.save(env.path("catalog.json"))
            raise ft.TestFailure(f"{label}: replica must equal exactly the newest committed RP "
                                 f"{k}, it {v.describe()} (catalog kept in {env.dir})")
        todo = [r for r in ids if r not in checked_rps]
        old = [r for r in ids if r in checked_rps]
        if ft.LONG:  # the newest at every 5th check, an older one at every 20th
            n_checks = stats["checks"] = stats.get("checks", 0) + 1
            todo = todo[-1:] if n_checks % 5 == 0 else []
            old = old if n_checks % 20 == 0 else []
        if old and restore_old:
            todo.append(rng.choice(old))
        for r in todo:
            restore_and_check(r, label)

    state_path = os.path.join(rx.store, GROUP, "state")

    def wait_applied(rp, bound_s):
        """Until the receiver's state file says RP `rp` is applied (apply and state points
        fire just after the ack), the receiver died, or bound_s passed."""
        t0 = time.monotonic()
        while rx.alive() and time.monotonic() - t0 < bound_s:
            try:
                with open(state_path, "rb") as f:
                    applied, applying = struct.unpack_from("<QQ", f.read(40), 16)
                if rp is not None and applied == rp and applying == 0:
                    return
            except (OSError, struct.error):
                pass
            time.sleep(0.005)

    def restore_and_check(r, label):
        with phase("restore"):
            outs = {d: env.restore(rx.store, GROUP, r, d) for d in disks}
        with phase("check_restore"):
            v = cat.check(outs)
        for p in outs.values():
            os.unlink(p)
        stats["restores_checked"] += 1
        if r not in v.equals_rps:
            stats["replicas_not_equal"] += 1
            cat.save(env.path("catalog.json"))
            raise ft.TestFailure(f"{label}: restore of RP {r} {v.describe()}")
        checked_rps.add(r)

    # A first RP so there is something to lose.
    rc, rp, _ = attempt("base")
    ft.check(rp is not None, "the first RP failed")

    r = env.run(["debug", "kill-points"], timeout=30, check_rc=0)
    points = [p for p in r.out.split() if p.split(".")[0] in
              ("receiver", "journal", "apply", "state", "rebuild")]
    ft.check(points, f"`ferry debug kill-points` lists no receiver points:\n{r}")
    hits = [1] if not ft.LONG else [1, 2, 3, 5, 8]
    plan = [("point", kp, n) for n in hits for kp in points]
    n_random = 4 if not ft.LONG else max(0, 1000 - len(plan))
    plan += [("random", None, None)] * n_random
    rng.shuffle(plan)
    t_start = time.monotonic()
    # The first receiver (from env.receiver()) is replaced by ours.
    stop_receiver(rx)
    i = -1
    while i + 1 < len(plan):
        i += 1
        kind, kp, n = plan[i]
        label = f"#{i} {kp}:{n}" if kind == "point" else f"#{i} random"
        if kind == "point" and "truncate" in kp:
            # These fire while recovery cuts a torn tail (R1): an RP, then a torn write
            # (garbage after the last commit), then a start with the point armed: recovery
            # itself is killed.
            start_receiver(env, rx)
            attempt(f"{label} before a torn tail")
            stop_receiver(rx)
            jdir = os.path.join(rx.store, GROUP, "journal")
            with open(os.path.join(jdir, sorted(os.listdir(jdir))[-1]), "ab") as f:
                f.write(rng.randbytes(rng.randrange(100, 9000)))
            if start_receiver(env, rx, {"FERRY_KILL_AT": f"{kp}:{n}"}, may_die=True) is None:
                stats["kills_at_points"] += 1
                fired.add(kp)
            else:
                stats["points_not_hit"] += 1
                stop_receiver(rx)
                ft.log(f"{label}: not hit")
            reap(env, rx.proc)
        elif kind == "point" and kp.startswith("rebuild."):
            # These fire while recovery rewrites the replica from the journal (R13/R5b/R16):
            # an image of the applied RP is deleted or cut short while the receiver is down,
            # then a start with the point armed kills the start-up rebuild. The next start
            # must rebuild again (the state says "applying") and the oracle checks the result.
            victim = replica[rng.choice(sorted(disks))]
            if os.path.exists(victim):
                if rng.random() < 0.5:
                    os.unlink(victim)
                else:
                    os.truncate(victim, rng.randrange(0, max(1, os.path.getsize(victim)), 4096))
            if start_receiver(env, rx, {"FERRY_KILL_AT": f"{kp}:{n}"}, may_die=True) is None:
                stats["kills_at_points"] += 1
                fired.add(kp)
            else:
                stats["points_not_hit"] += 1
                stop_receiver(rx)
                ft.log(f"{label}: not hit")
            reap(env, rx.proc)
        elif kind == "point":
            start_receiver(env, rx, {"FERRY_KILL_AT": f"{kp}:{n}"})
            # Enough RPs for the n-th hit; truncate points fire at recovery (a torn tail).
            for a in range(n + 1):
                _rc, rp_, _st = attempt(f"{label} a{a}")
                if not rx.alive():
                    break
                with phase("sleep"):
                    # apply / state points fire just after the ack: give the apply its time
                    wait_applied(rp_, 2.0 if rp_ is not None else 0.2)
                if not rx.alive():
                    break
            if rx.alive():
                # Apply runs after the ack and may still be going at SIGTERM: a point that
                # fires during shutdown is a kill like any other (-9 instead of 0).
                with phase("stop"):
                    rc = rx.proc.terminate(timeout=20)
                ft.check(rc in (0, -9), f"{label}: receiver exited {rc} on SIGTERM:\n"
                                        f"{ft.tail(rx.log_path)}")
                if rc == 0:
                    stats["points_not_hit"] += 1
                    ft.log(f"{label}: not hit")
                else:
                    stats["kills_at_points"] += 1
                    fired.add(kp)
                    ft.log(f"{label}: fired during shutdown")
                reap(env, rx.proc)
            else:
                ft.check(rx.proc.p.returncode == -9,
                         f"{label}: receiver died with {rx.proc.p.returncode}, not the kill "
                         f"point:\n{ft.tail(rx.log_path)}")
                stats["kills_at_points"] += 1
                fired.add(kp)
                reap(env, rx.proc)
        else:
            start_receiver(env, rx)
            attempt(label, kill_after=rng.uniform(0.0, 1.5))
            if rx.alive():  # the RP ended before the kill: kill now, during apply
                rx.proc.kill9()
            reap(env, rx.proc)
            stats["random_kills"] += 1
        stats["crash_points"] = stats["kills_at_points"] + stats["random_kills"]
        # A rebuild round changes only the replica: the oracle checks it; the journal's RPs
        # were restored in earlier rounds.
        check_after_crash(label, restore_old=not (kind == "point" and kp.startswith("rebuild.")))
        if i % 25 == 0:
            ft.log(f"{i + 1}/{len(plan)}: {stats}")
        if ft.LONG and i + 1 == len(plan) and stats["crash_points"] < 1000:
            plan.append(("random", None, None))  # make up for named points that were not hit

    # Continue replicating after all that, and check every RP that is still small enough.
    start_receiver(env, rx)
    rc, rp, _ = attempt("final")
    ft.check(rp is not None, "the final RP failed after the crash loop")
    stop_receiver(rx)
    check_after_crash("final")
    all_ids = [p["rp_id"] for p in env.points(rx.store, GROUP)]
    for r_ in (all_ids if not ft.LONG else rng.sample(all_ids, min(40, len(all_ids)))):
        restore_and_check(r_, "at the end")
    qsd.stop()
    not_fired = sorted(set(points) - fired)
    figure = (f"{stats['crash_points']} crash points, {stats['replicas_not_equal']} replicas not "
              f"equal to one committed RP, {stats['acked_rps_lost']} acknowledged RPs lost, "
              f"recovery p50/p99 {pct(recovery_s, 50) * 1000:.0f}/"
              f"{pct(recovery_s, 99) * 1000:.0f} ms")
    oracle.write_figure(TEST, figure, seed=env.seed, iterations=len(plan),
                        faults_injected=stats["crash_points"],
                        violations=stats["replicas_not_equal"] + stats["acked_rps_lost"],
                        duration_s=round(time.monotonic() - t_start, 1),
                        recovery_p50_ms=round(pct(recovery_s, 50) * 1000, 1),
                        recovery_p99_ms=round(pct(recovery_s, 99) * 1000, 1),
                        points_fired=sorted(fired), points_never_fired=not_fired,
                        committed_rps=len(all_ids),
                        phase_s={k_: round(v_, 1) for k_, v_ in sorted(PHASE_S.items())}, **stats)
    ft.check(stats["kills_at_points"] > 0, "no kill point fired: a build without fault points?")
