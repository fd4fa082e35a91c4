#!/usr/bin/env python3
"""kill -9 of the receiver at every named receiver kill point (FERRY_KILL_AT=<point>:<n>),
including the retention ones (prune.*, and apply.* which fire while pruning compacts the
replica), and at random moments of receive/journal/commit/ack/prune/compact, checked with
the oracle (C1, C2) under a pruning policy.

The receiver runs with `--keep-last 4` (KEEP): the replica images hold the base RP, the oldest
kept one; after every commit the receiver prunes the oldest RP and compacts the images forward
to the new base, so nearly every round crosses the prune.* and apply.* points. Before the loop
KEEP + 1 RPs are committed, so every later commit prunes.

After each kill the receiver is restarted (it recovers every group at start-up, redoing a
compaction cut short; the time from its start until it listens is the recovery time), stopped
cleanly, and then, with O = the RPs `ferry points` offers now, A = those offered at the
previous check and N = the RPs committed since (acknowledged ones, plus at most one that was
not acknowledged: the interrupted attempt's):
  * the newest RP of O is between the last acknowledged and the last sent;
  * retention (O is exactly what the policy keeps): O == newest KEEP of (A + N), "pruned";
    or, only when the crash may have hit between the last commit and the durable prune
    decision (a random kill, a named point in WINDOW_POINTS, or no RP committed this round),
    O == P + [N[-1]] with P = A when N has one RP, else the newest KEEP of (A + N[:-1])
    (the prune after the other commits of the round ran), "unpruned". Anything else is a
    violation: a kept RP lost (kept_lost_or_wrong) or an RP too many;
  * no RP once seen pruned (committed, not offered, older than the newest) is offered again
    (pruned_half_back); one that came back is restored and counted as identical or not;
    a pruned RP is refused by `ferry restore` with "pruned by retention" (one per check);
  * every offered RP restores equal to the oracle's state for it (a kill during compaction
    rewrites the base image every kept RP reads through); kept_lost_or_wrong otherwise;
  * replica/<disk>.img of both disks together equal exactly the base, the oldest offered RP.
Once per run a base image is deleted while the receiver is down: the group must be refused
naming R13 (the replicate fails, the receiver's log names R13); the image is then put back
from a copy and the run goes on.
Then replication continues. Default: every receiver point x n in {1,2} plus random kills up to
>= 100 crash points; FERRY_LONG=1: points x n in {1,2,3,5,8} and random kills up to >= 1000.
A random kill lands uniformly in [0, 1.3 x the median time of an unkilled RP round] after the
replicate started, so it falls inside receive/commit/prune rather than after them. RPs are
small (2..12 runs of <= 16 blocks). Long runs restore every offered RP at every 5th check (the
newly committed ones at every check).
Prints one JSON figure line and appends it to results/crash-receiver.jsonl."""

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402
from oracle import ft  # noqa: E402

GROUP = "cr"
SIZE = 32 * ft.MiB
TEST = "crash-receiver"
KEEP = 4  # --keep-last: every commit past the 4th prunes one RP and compacts the images
MIN_CRASH_POINTS = 1000 if ft.LONG else 100
# Named points at which the last commit may be durable while its prune decision is not
# (state.before_rename also fires at the decision's own state write).
WINDOW_POINTS = {"journal.after_commit_record", "journal.after_commit_sync",
                 "receiver.before_ack", "receiver.after_ack", "state.before_rename"}


def start_receiver(env, rx, extra_env=None, may_die=False):
    """Starts rx on its port with the pruning policy; returns seconds from spawn until it
    listens (recovery time), or None when may_die and it was killed by its kill point during
    recovery."""
    with open(rx.log_path, "ab") as f:
        f.write(f"--- crash_receiver: start, FERRY_KILL_AT={(extra_env or {}).get('FERRY_KILL_AT')} ---\n".encode())
    t0 = time.monotonic()
    proc = ft.Proc(env, rx.tag, [env.ferry, "receive", "--listen", f"127.0.0.1:{rx.port}",
                                 "--store", rx.store, "--keep-last", str(KEEP)] + rx.args,
                   rx.log_path, extra_env=extra_env)
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


class GroupRefused(Exception):
    """`ferry points` refuses the group after a kill: the loop cannot go on."""


def newest(ids, n=KEEP):
    """What keep-last n keeps of `ids`."""
    return sorted(ids)[-n:]


with ft.Env(TEST) as env:
    rng = env.rng
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2"), ft.Disk("vdb", SIZE - 12 * 4096, "raw")])
    disks = {d.name: (i, d.size_bytes) for i, d in enumerate(qsd.disks)}
    wr = oracle.Writer(env.seed, disks)
    cat = oracle.Catalog(env.seed, disks)
    rx = env.receiver()
    stop_receiver(rx)  # replaced by ours, with the pruning policy
    replica = {d: os.path.join(rx.store, GROUP, "replica", f"{d}.img") for d in disks}
    state_path = os.path.join(rx.store, GROUP, "state")
    acked = []          # RP ids printed by replicate --once
    committed = set()   # every RP known committed: acknowledged, or found after a kill
    last_sent_state = None
    stats = {"crash_points": 0, "kills_at_points": 0, "random_kills": 0, "points_not_hit": 0,
             "base_image_not_equal": 0, "acked_rps_lost": 0, "kept_lost_or_wrong": 0,
             "retention_wrong": 0, "pruned_rps_seen": 0, "pruned_half_back": 0,
             "half_back_identical": 0, "pruned_restore_refused": 0, "restores_checked": 0,
             "unacked_commits": 0, "attempts": 0, "checks": 0, "checks_pruned": 0,
             "checks_unpruned": 0, "checks_base_0": 0, "r13_refused": 0, "group_refused": 0,
             "pruned_restore_not_refused": 0,
             "r13_postponed": 0}
    recovery_s = []
    round_s = []        # replicate time of rounds that were not killed
    fired = set()
    checked_rps = set()
    pruned_seen = set()
    offered_before = []  # A: what the previous check saw offered
    seen_at_check = set()  # committed RPs known at the previous check

    def attempt(label, extra_env=None, kill_after=None, big=False):
        """Writes, marks a state, runs one `replicate --once`. With kill_after (seconds), the
        receiver is killed -9 that long after the replicate started (if still running).
        Returns (rc, rp or None, state)."""
        global last_sent_state
        with phase("write"):
            if big:  # the same 4 MiB region, so the images stay small for the oracle
                wr.write_blocks(qsd, rng.choice(sorted(disks)), 0, 1024)
            else:
                wr.random_writes(qsd, rng.randint(2, 12), max_run=rng.choice([4, 16]))
            qsd.sync()
            state = cat.mark(wr, label)
        last_sent_state = state
        stats["attempts"] += 1
        with phase("replicate"):
            t0 = time.monotonic()
            rep = env.replicate_popen(qsd, rx.addr, GROUP, tag="replicate")
            if kill_after is not None:
                while rep.alive() and time.monotonic() - t0 < kill_after:
                    time.sleep(0.002)
                if rx.alive():
                    rx.proc.kill9()
            try:
                out, _ = rep.p.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                raise ft.TestFailure(f"{label}: replicate did not finish in 180s:\n"
                                     f"{ft.tail(rep.log_path)}")
            if kill_after is None and rep.p.returncode == 0:
                round_s.append(time.monotonic() - t0)
        rc = rep.p.returncode
        reap(env, rep)
        lines = out.decode().split()
        rp = int(lines[-1]) if rc == 0 and lines and lines[-1].isdigit() else None
        ft.check(rc != 0 or rp is not None, f"{label}: replicate exited 0 without an RP id")
        if rp is not None:
            cat.bind(state, rp)
            acked.append(rp)
            committed.add(rp)
        return rc, rp, state

    def read_state():
        """(base_rp, target_rp) of the state file (version 2), or None."""
        try:
            with open(state_path, "rb") as f:
                head = f.read(32)
            magic, version = struct.unpack_from("<IH", head, 0)
            if magic != 0x41545346 or version != 2:
                return None
            return struct.unpack_from("<QQ", head, 16)
        except (OSError, struct.error):
            return None

    def wait_pruned(bound_s):
        """Until the state file says the prune after the last commit is done (the base is the
        oldest of the KEEP newest committed RPs, no compaction under way), the receiver died,
        or bound_s passed: prune and apply points fire just after the ack."""
        if len(committed) <= KEEP:
            return
        want = newest(committed)[0]
        t0 = time.monotonic()
        while rx.alive() and time.monotonic() - t0 < bound_s:
            s = read_state()
            if s and s[0] >= want and s[1] == 0:
                return
            time.sleep(0.005)

    def restore_check(r, label):
        """Restores RP r of both disks; True when they equal its catalog state."""
        with phase("restore"):
            outs = {d: env.restore(rx.store, GROUP, r, d) for d in disks}
        with phase("check_restore"):
            v = cat.check(outs)
        for p in outs.values():
            os.unlink(p)
        stats["restores_checked"] += 1
        if r not in v.equals_rps:
            ft.log(f"{label}: restore of RP {r} {v.describe()}")
        return r in v.equals_rps

    evidence = []  # one entry per violation: what, where, the receiver's log around it

    def fail(label, msg):
        """A violation: kept as evidence (the run goes on, so the figure counts them all;
        it fails at the end)."""
        cat.save(env.path("catalog.json"))
        with open(rx.log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(rx.log_path) - 2500))
            log_tail = f.read().decode("utf-8", "replace").splitlines()[-14:]
        evidence.append({"label": label, "violation": msg[:1500], "receiver_log": log_tail})
        if len(evidence) <= 20:
            ft.log(f"VIOLATION {label}: {msg[:1500]}\n    " + "\n    ".join(log_tail))

    def check_pruned_refused(label):
        """`ferry restore` of one pruned RP must fail naming retention."""
        gone = sorted(pruned_seen - set(offered_before))  # not those that came back
        if not gone:
            return
        r = rng.choice(gone)
        out = env.path("restores", "pruned.img")
        res = env.run(["restore", "--store", rx.store, "--group", GROUP, "--point", r,
                       "--disk", "vda", "--out", out], timeout=60)
        if res.rc == 0 or "pruned by retention" not in res.err:
            stats["pruned_restore_not_refused"] += 1
            fail(label, f"restore of pruned RP {r} was not refused with 'pruned by retention':"
                        f"\n{res}")
        stats["pruned_restore_refused"] += 1

    def check_after_crash(label, window_ok, restore_all=True):
        """Restart (recovery), stop, then retention, the restores and the base image.
        window_ok: the crash may have hit between the last commit and its prune decision."""
        global offered_before, seen_at_check
        with phase("recover"):
            recovery_s.append(start_receiver(env, rx))
        with phase("stop"):
            stop_receiver(rx)
        with phase("points"):
            r_ = env.run(["points", "--store", rx.store, "--group", GROUP, "--json"], timeout=60)
        if r_.rc != 0:  # the group is refused after a kill: every kept RP is out of reach
            stats["group_refused"] += 1
            stats["kept_lost_or_wrong"] += len(offered_before)
            fail(label, f"the group is refused after the kill, its {len(offered_before)} kept "
                        f"RPs {offered_before} can no longer be read: {r_.err.strip()[-600:]}")
            raise GroupRefused()
        try:
            pts = json.loads(r_.out)
        except ValueError as e:
            raise ft.TestFailure(f"{label}: ferry points --json is not JSON ({e}):\n{r_}")
        for p in pts:  # retention's fields; every listed RP is still readable
            for key in ("rp_id", "base_rp", "disks", "keep", "rule", "pinned", "store_bytes"):
                ft.check(key in p, f"{label}: point lacks {key!r}: {p}")
        ids = sorted(p["rp_id"] for p in pts)
        stats["checks"] += 1
        unknown = [r for r in ids if r not in cat.state_of]
        ft.check(len(unknown) <= 1, f"{label}: RPs {unknown} committed but never sent")
        if unknown:  # committed, not acknowledged: the interrupted attempt
            ft.check(last_sent_state not in cat.rp_of,
                     f"{label}: RP {unknown[0]} committed but the last attempt was RP "
                     f"{cat.rp_of.get(last_sent_state)}")
            cat.bind(last_sent_state, unknown[0])
            committed.add(unknown[0])
            stats["unacked_commits"] += 1
        ft.check(ids, f"{label}: no RP offered")
        # 0 pruned RPs half back: one that came back must at least be byte-identical.
        back = sorted((set(ids) & pruned_seen) - set(offered_before))  # newly back
        if back:
            stats["pruned_half_back"] += len(back)
            same = [r for r in back if restore_check(r, label)]
            stats["half_back_identical"] += len(same)
            fail(label, f"pruned RPs {back} are offered again ({len(same)} of them restore "
                        f"byte-identical); offered {ids}")
        k = ids[-1]
        last_acked = max(acked) if acked else 0
        ft.check(last_acked <= k, f"{label}: newest committed RP {k} < last acknowledged "
                                  f"{last_acked}")
        ft.check(cat.state_of[k] <= last_sent_state, f"{label}: RP {k} is newer than sent")
        # Retention: exactly what the policy keeps, or (crash in the window) the last commit
        # not pruned for yet.
        new = sorted(committed - seen_at_check)
        pruned_want = newest(set(offered_before) | set(new))
        if not new:
            unpruned_want = sorted(offered_before)
        else:
            pre = offered_before if len(new) == 1 else newest(set(offered_before) | set(new[:-1]))
            unpruned_want = sorted(set(pre) | {new[-1]})
        retention_ok = True
        if back:
            retention_ok = False  # counted above
        elif ids == pruned_want:
            stats["checks_pruned"] += 1
        elif ids == unpruned_want and (window_ok or not new):
            stats["checks_unpruned"] += 1
        else:
            lost = [r for r in pruned_want if r not in ids]
            stats["kept_lost_or_wrong"] += len(lost)
            stats["acked_rps_lost"] += len([r for r in lost if r in acked])
            stats["retention_wrong"] += 1
            retention_ok = False
            fail(label, f"offered RPs {ids}, but keep-last {KEEP} keeps {pruned_want}"
                        + (f" (or, a crash before the prune decision, {unpruned_want})"
                           if window_ok else f" ({unpruned_want} only if the crash hit before "
                                             f"the prune decision, which this one did not)")
                        + f"; lost {lost}; previous check {offered_before}, committed since {new}")
        for r in committed:
            if r < k and r not in ids:
                pruned_seen.add(r)
        stats["pruned_rps_seen"] = len(pruned_seen)
        offered_before, seen_at_check = ids, set(committed)
        # The replica images are the base: the oldest offered RP (base 0: no images yet, every
        # RP is read from the journal).
        base = (read_state() or (None, None))[0]
        if base is None or (base != 0 and base != ids[0]):
            stats["base_image_not_equal"] += 1
            fail(label, f"the state file names base RP {base}, the oldest offered is {ids[0]}")
        elif base != 0 and retention_ok:
            with phase("check_replica"):
                v = cat.check(replica)
            if base not in v.equals_rps:
                stats["base_image_not_equal"] += 1
                fail(label, f"replica images must equal the base, RP {base} (the oldest "
                            f"offered of {ids}), they {v.describe()}")
        else:
            stats["checks_base_0"] += 1
        # Every offered RP restores to its state (a compaction rewrote what they read through).
        todo = [r for r in ids if restore_all or r not in checked_rps]
        for r in todo:
            if restore_check(r, label):
                checked_rps.add(r)
            else:
                stats["kept_lost_or_wrong"] += 1
                fail(label, f"kept RP {r} does not restore to its state (offered {ids})")
        with phase("pruned_refused"):
            check_pruned_refused(label)

    jdir = os.path.join(rx.store, GROUP, "journal")
    ROLL_RPS = 20  # RPs of 4 MiB that fill more than a 64 MiB journal segment

    def r13_round(label):
        """A base image deleted while the receiver is down: the group is refused naming R13.
        The image is then put back from a copy so the run goes on."""
        victim = replica[rng.choice(sorted(disks))]
        keep = env.path("r13-copy.img")
        ft.sparse_copy(victim, keep)
        os.unlink(victim)
        log_start = os.path.getsize(rx.log_path)
        start_receiver(env, rx)
        rc, rp, _st = attempt(f"{label} with {os.path.basename(victim)} deleted")
        stop_receiver(rx)
        with open(rx.log_path, "rb") as f:
            f.seek(log_start)
            text = f.read().decode("utf-8", "replace")
        ft.check(rp is None, f"{label}: RP {rp} committed with the base image "
                             f"{victim} deleted")
        ft.check("R13" in text and "missing" in text,
                 f"{label}: the group was not refused naming R13:\n{text[-3000:]}")
        ft.log(f"{label}: refused: " + next(l for l in text.splitlines() if "R13" in l)[:300])
        stats["r13_refused"] += 1
        shutil.copyfile(keep, victim)
        os.unlink(keep)

    # KEEP + 1 RPs first, so every later commit prunes and compacts.
    start_receiver(env, rx)
    for b in range(KEEP + 1):
        _rc, rp, _ = attempt(f"base {b}")
        ft.check(rp is not None, f"base RP {b} failed")
        wait_pruned(5.0)
    stop_receiver(rx)
    check_after_crash("base", window_ok=False)

    r = env.run(["debug", "kill-points"], timeout=30, check_rc=0)
    points = [p for p in r.out.split() if p.split(".")[0] in
              ("receiver", "journal", "apply", "state", "prune")]
    ft.check(points, f"`ferry debug kill-points` lists no receiver points:\n{r}")
    ft.check(any(p.startswith("prune.") for p in points),
             f"`ferry debug kill-points` lists no prune.* points:\n{r}")
    hits = [1, 2] if not ft.LONG else [1, 2, 3, 5, 8]
    plan = [("point", kp, n) for n in hits for kp in points]
    plan += [("random", None, None)] * max(0, MIN_CRASH_POINTS - len(plan))
    rng.shuffle(plan)
    plan.insert(rng.randrange(len(plan) // 2, len(plan)), ("r13", None, None))
    t_start = time.monotonic()
    refused = False
    try:
        i = -1
        while i + 1 < len(plan):
            i += 1
            kind, kp, n = plan[i]
            label = f"#{i} {kp}:{n}" if kind == "point" else f"#{i} {kind}"
            window_ok = kind == "random"
            if kind == "r13":
                if (read_state() or (0, 0))[0] == 0:  # no base image yet: try later
                    stats["r13_postponed"] += 1
                    if stats["r13_postponed"] <= 5:
                        plan.append(("r13", None, None))
                    continue
                r13_round(label)
                check_after_crash(label, window_ok=False)
                continue
            if kind == "point" and "truncate" in kp:
                # These fire while recovery cuts a torn tail (R1): an RP, then a torn write
                # (garbage after the last commit), then a start with the point armed: recovery
                # itself is killed.
                start_receiver(env, rx)
                attempt(f"{label} before a torn tail")
                wait_pruned(5.0)
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
            elif kind == "point":
                window_ok = kp in WINDOW_POINTS
                # Journal segments are 64 MiB, far more than the small RPs of a round:
                # prune.mid_remove fires once per segment that falls wholly below the base. For
                # it the round writes RPs of 4 MiB until the n-th segment is removed.
                rolls = kp == "prune.mid_remove"
                rounds = (n + 1) * ROLL_RPS + KEEP if rolls else n + 1
                start_receiver(env, rx, {"FERRY_KILL_AT": f"{kp}:{n}"})
                for a in range(rounds):
                    _rc, rp_, _st = attempt(f"{label} a{a}", big=rolls)
                    if not rx.alive():
                        break
                    with phase("sleep"):
                        # prune and apply points fire just after the ack: give them their time
                        wait_pruned(2.0 if rp_ is not None else 0.2)
                    if not rx.alive():
                        break
                if rx.alive():
                    # Pruning runs after the ack and may still be going at SIGTERM: a point that
                    # fires during shutdown is a kill like any other (-9 instead of 0).
                    with phase("stop"):
                        rc = rx.proc.terminate(timeout=20)
                    ft.check(rc in (0, -9), f"{label}: receiver exited {rc} on SIGTERM:\n"
                                            f"{ft.tail(rx.log_path)}")
                    window_ok = True  # a SIGTERM may end the session before its prune
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
                typical = pct(round_s[-50:], 50) or 0.5
                attempt(label, kill_after=rng.uniform(0.0, 1.3 * typical))
                if rx.alive():  # the RP ended before the kill: kill now, during its prune
                    rx.proc.kill9()
                reap(env, rx.proc)
                stats["random_kills"] += 1
            stats["crash_points"] = stats["kills_at_points"] + stats["random_kills"]
            check_after_crash(label, window_ok,
                              restore_all=not ft.LONG or stats["checks"] % 5 == 0)
            if i % 25 == 0:
                ft.log(f"{i + 1}/{len(plan)}: {stats}")
            if i + 1 == len(plan) and stats["crash_points"] < MIN_CRASH_POINTS:
                plan.append(("random", None, None))  # make up for named points that were not hit
    except GroupRefused:
        refused = True

    # Continue replicating after all that, and check every offered RP.
    all_ids = []
    if not refused:
        start_receiver(env, rx)
        rc, rp, _ = attempt("final")
        ft.check(rp is not None, "the final RP failed after the crash loop")
        wait_pruned(5.0)
        stop_receiver(rx)
        check_after_crash("final", window_ok=False)
        all_ids = [p["rp_id"] for p in env.points(rx.store, GROUP)]
    qsd.stop()
    not_fired = sorted(set(points) - fired)
    violations = len(evidence)
    figure = (f"{stats['crash_points']} crash points (keep-last {KEEP}), "
              f"{stats['kept_lost_or_wrong']} kept RPs lost or wrong, "
              f"{stats['pruned_half_back']} pruned RPs half back "
              f"({stats['pruned_rps_seen']} pruned), {stats['base_image_not_equal']} base "
              f"images not equal to the oldest kept RP, {stats['acked_rps_lost']} acknowledged "
              f"RPs lost" + (", the group refused after a kill" if refused else "")
              + f", recovery p50/p99 {pct(recovery_s, 50) * 1000:.0f}/"
              f"{pct(recovery_s, 99) * 1000:.0f} ms")
    oracle.write_figure(TEST, figure, seed=env.seed, iterations=len(plan),
                        faults_injected=stats["crash_points"], violations=violations,
                        keep_last=KEEP,
                        duration_s=round(time.monotonic() - t_start, 1),
                        recovery_p50_ms=round(pct(recovery_s, 50) * 1000, 1),
                        recovery_p99_ms=round(pct(recovery_s, 99) * 1000, 1),
                        points_fired=sorted(fired), points_never_fired=not_fired,
                        committed_rps=len(committed), offered_rps_at_end=len(all_ids),
                        evidence=evidence[:5],
                        phase_s={k_: round(v_, 1) for k_, v_ in sorted(PHASE_S.items())}, **stats)
    ft.check(stats["kills_at_points"] > 0, "no kill point fired: a build without fault points?")
    ft.check(not evidence, f"{violations} violations; the first: {evidence[0] if evidence else None}")
    ft.check(not not_fired, f"named points never fired: {not_fired}")
