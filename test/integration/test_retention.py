#!/usr/bin/env python3
"""Retention at the recovery site: the store keeps a bounded window of RPs.

(a) Continuous replication (`replicate --interval 0.3`, 1 s with FERRY_LONG) into a receiver
    with `--keep-last 20` while a thread keeps writing random data, for 180 RPs (300 with
    FERRY_LONG; either way past two 64 MiB journal segments). At ~90 and ~180 RPs (~100,
    ~200, ~300 with FERRY_LONG; writer paused, two quiet RPs, pruning done) the allocated
    bytes of journal/ + replica/ stay within: replica allocated + the kept RPs' store_bytes + one 64 MiB segment +
    1 MiB. Then the writer stops, two quiet RPs, replicate stops: the newest RP restores equal
    to the source, exactly 20 RPs are listed, a pruned RP is refused by restore and export
    (exit 1, "pruned by retention").
(b) Deterministic RPs (`--once`) into a second group after a receiver restart with
    `--keep-last 20`: ~40 RPs; every kept RP restores equal to the source copy of its time,
    pruned ones are refused.
(c) `ferry prune --dry-run --json --keep-last 2 --keep-hourly 3` on (b)'s group, receiver
    stopped: the JSON says what is kept (and by which rule) and removed, the store is unchanged;
    `ferry prune` then removes exactly that; with a receiver running, prune exits 1 naming it.
(d) receive.toml with `[group.G.retention] keep-last = 10`: 12 RPs -> 10 listed; keep-last 5
    and SIGHUP -> 5 after the next RP; a broken file and SIGHUP -> an error naming the file, the
    policy stays (next RP still pruned to 5).
(e) `ferry points` text output has the retention columns and marks the RP an export pins,
    with a client connected and between clients, and no longer once the export stops.
(f) a prune killed at prune.after_intent (the receiver's, once the first journal segment is
    gone; then `ferry prune`'s): the group recovers and reads, the next RP restores equal.
Parts run in the order b c a d e f; `test_retention.py c e` runs only some (and what they need;
(f) checks `ferry prune` on (d)'s group when (d) ran)."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import ferrytest as ft

SEGMENT = 64 * ft.MiB  # the journal's segment size: at most one segment of pruned data stays
SLACK = 1 * ft.MiB
HAVE_NBDKIT = shutil.which("nbdkit") is not None


def newest_committed(rx):
    ids = [int(m) for m in re.findall(r"RP (\d+) committed", rx.log_text())]
    return max(ids) if ids else 0


def wait_committed(rx, rp, timeout=60):
    """Waits until the receiver log shows RP `rp` (or later) committed; returns the newest."""
    deadline = time.monotonic() + timeout
    while True:
        n = newest_committed(rx)
        if n >= rp:
            return n
        ft.check(rx.alive(), f"receiver exited:\n{ft.tail(rx.log_path)}")
        ft.check(time.monotonic() < deadline,
                 f"RP {rp} not committed within {timeout}s (newest {n}):\n{ft.tail(rx.log_path)}")
        time.sleep(0.1)


def wait_listed(env, store, group, count, newest=None, timeout=30):
    """Polls `ferry points` until it lists `count` RPs (the receiver prunes after the ack, so
    an RP just acknowledged may still see its predecessor's window for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        pts = env.points(store, group)
        ids = [p["rp_id"] for p in pts]
        if len(pts) == count and (newest is None or (ids and ids[-1] == newest)):
            return pts
        ft.check(time.monotonic() < deadline,
                 f"group {group}: expected {count} RPs listed (newest {newest}), after {timeout}s "
                 f"still {len(pts)}: {ids}")
        time.sleep(0.2)


def allocated_under(*dirs):
    total = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
                except OSError:
                    pass  # a segment removed meanwhile
    return total


def expect_pruned(env, store, group, rp, disk, what=""):
    """restore and export of a pruned RP: exit 1, "pruned by retention" naming the RP."""
    out = env.path("restores", f"pruned-{group}-{rp}.img")
    r = env.run(["restore", "--store", store, "--group", group, "--point", rp, "--disk", disk,
                 "--out", out], timeout=60)
    ft.check(r.rc == 1 and "pruned by retention" in r.err and f"RP {rp}" in r.err,
             f"restore of pruned RP {rp} {what}must exit 1 with 'pruned by retention':\n{r}")
    if HAVE_NBDKIT:
        sock = env.path(f"pruned-{rp}.sock")
        r = env.run(["export", "--store", store, "--group", group, "--point", rp, "--disk", disk,
                     "--socket", sock], timeout=30)
        ft.check(r.rc == 1 and "pruned by retention" in r.err and f"RP {rp}" in r.err,
                 f"export of pruned RP {rp} {what}must exit 1 with 'pruned by retention':\n{r}")
        ft.check("serving" not in r.out + r.err, f"a refused export must not serve:\n{r}")
    ft.log(f"RP {rp} of {group}: refused as pruned by retention {what}".rstrip())


def store_digest(store, group):
    """Names, sizes and content of the group's state, journal and replica files."""
    h = hashlib.sha256()
    gdir = os.path.join(store, group)
    for root, dirs, files in os.walk(gdir):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            if name == "LOCK" or os.path.basename(root) == "pins":
                continue
            h.update(os.path.relpath(p, gdir).encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def start_export(env, tag, args):
    p = ft.Proc(env, tag, [env.ferry, "export"] + [str(a) for a in args], env.path(f"{tag}.log"))
    t0 = time.monotonic()
    while "serving" not in p.log_text():
        ft.check(p.alive(), f"ferry export {tag} exited {p.p.returncode}:\n{p.log_text()}")
        ft.check(time.monotonic() - t0 < 20, f"export {tag} not ready in 20 s:\n{p.log_text()}")
        time.sleep(0.02)
    return p


# ------------------------------------------------------------------------------------------
# (a) continuous replication, bounded store


def part_a(env, rx):
    group = "cont"
    interval = "1" if ft.LONG else "0.3"
    marks = [100, 200, 300] if ft.LONG else [90, 180]
    pause_s = 0.05 * float(interval) / 0.3
    wl = env.workload(salt=1)
    qsd = env.qsd([ft.Disk("vda", 64 * ft.MiB, "qcow2")], tag="qsda")
    vda = qsd.disks[0]
    run_writer, stop_writer, paused = threading.Event(), threading.Event(), threading.Event()
    run_writer.set()
    written = [0]
    errors = []

    def writer():
        try:
            while not stop_writer.is_set():
                if not run_writer.wait(0.05):
                    paused.set()
                    continue
                paused.clear()
                # Whole 64 KiB blocks, ~0.8 MiB an RP at any interval: the journal's record
                # framing (~1.4 KiB a frame, not in store_bytes) of 20 kept RPs stays within the
                # bound's 1 MiB.
                written[0] += wl.random_writes(qsd, vda, 2, min_len=64 * ft.KiB,
                                               max_len=128 * ft.KiB, align=64 * ft.KiB)
                time.sleep(pause_s)
        except Exception as e:  # reported by the main thread
            errors.append(e)
        paused.set()

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    args = env.replicate_args(qsd, rx.addr, group)
    args[args.index("--once")] = "--interval"
    args.insert(args.index("--interval") + 1, interval)
    rep = ft.Proc(env, "replicate-cont", [env.ferry] + args, env.path("replicate-cont.log"))
    ft.log(f"(a) replicate --interval {interval} with a writer, receiver --keep-last 20")
    gdir = os.path.join(rx.store, group)
    samples = []
    t0 = time.monotonic()
    per_rp = 2.0 if ft.SANITIZE else 1.0
    for mark in marks:
        wait_committed(rx, mark, timeout=60 + mark * per_rp * (3 if ft.LONG else 1))
        ft.check(rep.alive(), f"replicate exited {rep.p.returncode}:\n{ft.tail(rep.log_path)}")
        ft.check(not errors, f"writer failed: {errors}")
        # Quiet the source for the sample: the RP in flight and the next one carry the last
        # writes, after them the RPs are empty; so the journal holds no uncounted RP data.
        run_writer.clear()
        ft.check(paused.wait(10), "writer did not pause")
        quiet = wait_committed(rx, newest_committed(rx) + 2, timeout=30)
        pts = wait_listed(env, rx.store, group, 20, timeout=30)
        journal = allocated_under(os.path.join(gdir, "journal"))
        replica = allocated_under(os.path.join(gdir, "replica"))
        size = journal + replica
        pts2 = env.points(rx.store, group)
        # The source keeps sending (empty) RPs: a listing taken between an RP's commit and the
        # retention pass that follows it shows the oldest RP as "prune next" (keep false) for
        # a moment; slow builds (ASan) widen that moment. Read again until the pass ran.
        settle = time.monotonic() + 15
        while not all(p["keep"] for p in pts2) and time.monotonic() < settle:
            time.sleep(0.1)
            pts2 = env.points(rx.store, group)
        kept = max(sum(p["store_bytes"] for p in pts), sum(p["store_bytes"] for p in pts2))
        bound = replica + kept + SEGMENT + SLACK
        s = {"rps": quiet, "seconds": round(time.monotonic() - t0, 1), "store_bytes": size,
             "replica_bytes": replica, "journal_bytes": journal, "kept_store_bytes": kept, "bound_bytes": bound,
             "listed": len(pts2), "written_bytes": written[0]}
        samples.append(s)
        ft.log(f"(a) after {quiet} RPs ({s['seconds']} s, {written[0] / ft.MiB:.0f} MiB written): "
               f"store {size / ft.MiB:.1f} MiB, bound {bound / ft.MiB:.1f} MiB (replica "
               f"{replica / ft.MiB:.1f} + kept {kept / ft.MiB:.1f} + 64 + 1)")
        ft.check(size <= bound, f"store {size} B after {quiet} RPs exceeds the bound {bound} B "
                                f"(replica {replica} + kept RPs {kept} + 64 MiB + 1 MiB); "
                                f"journal: {sorted(os.listdir(os.path.join(gdir, 'journal')))}")
        ft.check(all(p["keep"] for p in pts2), f"a listed RP is not kept: {pts2}")
        run_writer.set()
    # The end: a copy of the source, two quiet RPs, then stop.
    stop_writer.set()
    t.join(10)
    ft.check(not errors, f"writer failed: {errors}")
    qsd.sync()
    snap = qsd.snapshot(vda, env.path("snaps", "cont-end.img"))
    last = wait_committed(rx, newest_committed(rx) + 2, timeout=30)
    rc = rep.terminate(timeout=30)
    ft.check(rc == 0, f"replicate --interval exited {rc} on SIGTERM:\n{ft.tail(rep.log_path)}")
    newest = newest_committed(rx)
    ft.check(newest >= last, "newest RP went back")
    pts = wait_listed(env, rx.store, group, 20, newest=newest)
    ids = [p["rp_id"] for p in pts]
    ft.check_eq(ids, list(range(newest - 19, newest + 1)), "the RPs kept by keep-last 20")
    ft.check_eq([p["rule"] for p in pts], ["keep-last"] * 19 + ["newest"], "rules of the kept RPs")
    env.check_restore(rx.store, group, newest, "vda", snap, "(newest, after 300+ RPs) ")
    for rp in (1, newest // 2, newest - 20):
        expect_pruned(env, rx.store, group, rp, "vda", "(a) ")
    ft.write_result("retention", "store_bytes_at_rps", samples=samples, keep_last=20,
                    interval_seconds=float(interval), rps=newest)
    qsd.stop()
    return samples


# ------------------------------------------------------------------------------------------
# (b) deterministic RPs: every kept RP restores equal


def part_b(env, rx, qsd, wl, group, rps, snaps, start=0):
    vdb = qsd.disks[0]
    rng = env.rng
    for i in range(start, start + rps):
        if i == 0:
            wl.random_writes(qsd, vdb, 16, min_len=4 * ft.KiB, max_len=512 * ft.KiB)
        else:
            wl.random_writes(qsd, vdb, rng.randrange(1, 8), min_len=1, max_len=192 * ft.KiB,
                             align=1)
            if i % 5 == 0:
                wl.zero(qsd, vdb, rng.randrange(0, vdb.size_bytes - 256 * ft.KiB, 512),
                        rng.randrange(512, 256 * ft.KiB, 512), "zero_range")
        qsd.sync()
        snap = qsd.snapshot(vdb, env.path("snaps", f"{group}-{i}.img"))
        rp = env.replicate_once(qsd, rx.addr, group)
        ft.check(rp not in snaps, f"RP {rp} reported twice")
        snaps[rp] = snap
        for old in sorted(snaps)[:-25]:  # bound the copies kept: the last 25 RPs
            os.unlink(snaps.pop(old))
    return rp


# ------------------------------------------------------------------------------------------
# (c) ferry prune by hand: the dry run's contract


def expected_tiers(pts, keep_last, keep_hourly):
    """What `keep-last N, keep-hourly M` keeps of `pts` (docs/operations.md, "Retention"),
    as {rp: rule}. Hours are UTC: created_unix_ns // 3600 s."""
    order = sorted(pts, key=lambda p: p["rp_id"], reverse=True)
    kept = {order[0]["rp_id"]: "newest"}
    for p in order[1:keep_last]:
        kept[p["rp_id"]] = "keep-last"
    hour = lambda p: p["created_unix_ns"] // (3600 * 10**9)  # noqa: E731
    covered = {hour(p) for p in order if p["rp_id"] in kept}
    taken = set()
    for p in order:
        if len(taken) >= keep_hourly:
            break
        h = hour(p)
        if p["rp_id"] in kept or h in covered or h in taken:
            continue
        kept[p["rp_id"]] = "keep-hourly"
        taken.add(h)
    return kept


def part_c(env, rx, group, snaps):
    before = env.points(rx.store, group)
    digest = store_digest(rx.store, group)
    r = env.run(["prune", "--store", rx.store, "--group", group, "--dry-run", "--json",
                 "--keep-last", 2, "--keep-hourly", 3], timeout=60)
    ft.check(r.rc == 0, f"prune --dry-run failed:\n{r}")
    try:
        dry = json.loads(r.out)
    except ValueError as e:
        raise ft.TestFailure(f"prune --dry-run --json is not JSON ({e}):\n{r}")
    for key in ("group", "dry_run", "policy", "removed", "removed_bytes", "points"):
        ft.check(key in dry, f"prune --json lacks {key!r}:\n{r.out}")
    ft.check_eq(dry["group"], group, "prune --json group")
    ft.check_eq(dry["dry_run"], True, "prune --json dry_run")
    ft.check("keep-last 2" in dry["policy"] and "keep-hourly 3" in dry["policy"],
             f"the policy named in the dry run: {dry['policy']!r}")
    ft.check_eq([p["rp_id"] for p in dry["points"]], [p["rp_id"] for p in before],
                "the RPs the dry run judges (every listed RP)")
    want = expected_tiers(before, 2, 3)
    got = {p["rp_id"]: p["rule"] for p in dry["points"] if p["keep"]}
    ft.check_eq(got, want, "RPs the dry run keeps, with the rule that keeps each")
    removed = [p for p in dry["points"] if not p["keep"]]
    ft.check_eq(dry["removed"], len(removed), "removed count of the dry run")
    ft.check_eq(dry["removed_bytes"], sum(p["store_bytes"] for p in removed),
                "removed_bytes of the dry run (the removed RPs' store_bytes)")
    ft.check(all(p["rule"] == "none" for p in removed), f"removed RPs name no rule: {removed}")
    ft.log(f"(c) dry run: keeps {sorted(want.items())}, removes {len(removed)} RPs "
           f"({dry['removed_bytes']} B)")
    ft.check_eq(env.points(rx.store, group), before, "points after a dry run")
    ft.check_eq(store_digest(rx.store, group), digest, "the store's files after a dry run")

    # Text output of the dry run says the same.
    r = env.run(["prune", "--store", rx.store, "--group", group, "--dry-run",
                 "--keep-last", 2, "--keep-hourly", 3], check_rc=0)
    ft.check("dry run" in r.out and "would remove" in r.out, f"text dry run:\n{r.out}")
    ft.check_eq(store_digest(rx.store, group), digest, "the store after a text dry run")

    r = env.run(["prune", "--store", rx.store, "--group", group, "--json", "--keep-last", 2,
                 "--keep-hourly", 3], timeout=120)
    ft.check(r.rc == 0, f"prune failed:\n{r}")
    done = json.loads(r.out)
    ft.check_eq(done["dry_run"], False, "prune --json dry_run")
    ft.check_eq({p["rp_id"]: (p["keep"], p["rule"]) for p in done["points"]},
                {p["rp_id"]: (p["keep"], p["rule"]) for p in dry["points"]},
                "prune's verdicts against the dry run's")
    ft.check_eq(done["removed"], dry["removed"], "RPs removed against the dry run")
    after = env.points(rx.store, group)
    ft.check_eq([p["rp_id"] for p in after], sorted(want), "RPs listed after prune")
    for rp in sorted(want):
        env.check_restore(rx.store, group, rp, "vdb", snaps[rp], "(kept by prune) ")
    for p in removed[:1] + removed[-1:]:
        expect_pruned(env, rx.store, group, p["rp_id"], "vdb", "(removed by prune) ")
    return sorted(want)


# ------------------------------------------------------------------------------------------
# (d) receive.toml and SIGHUP


def part_d(env, qsd, wl):
    group = "cfg"
    vdb = qsd.disks[0]
    cfg = env.path("receive.toml")

    def write_cfg(text):
        # Over TLS the file also carries the harness's access map (ferrytest), so a reload
        # keeps the test's client allowed.
        with open(cfg + ".tmp", "w") as f:
            f.write(env.access_toml(text) if env.tls else text)
        os.replace(cfg + ".tmp", cfg)

    write_cfg(f"# ferrytest\n[group.{group}.retention]\nkeep-last = 10\n")
    rx = env.receiver(store=os.path.join(env.dir, "store-cfg"), tag="receiver-cfg",
                      args=["--config", cfg])

    def one_rp():
        wl.random_writes(qsd, vdb, 3, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
        return env.replicate_once(qsd, rx.addr, group)

    for _ in range(12):
        rp = one_rp()
    pts = wait_listed(env, rx.store, group, 10, newest=rp)
    ft.check_eq([p["rp_id"] for p in pts], list(range(rp - 9, rp + 1)), "keep-last 10 from the file")
    ft.log(f"(d) [group.{group}.retention] keep-last = 10: RPs {pts[0]['rp_id']}..{rp} listed")

    write_cfg(f"[group.{group}.retention]\nkeep-last = 5\n")
    n_reloaded = rx.log_text().count("retention reloaded (SIGHUP)")
    os.kill(rx.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while rx.log_text().count("retention reloaded (SIGHUP)") == n_reloaded:
        ft.check(rx.alive(), f"receiver died on SIGHUP:\n{ft.tail(rx.log_path)}")
        ft.check(time.monotonic() < deadline,
                 f"no 'retention reloaded (SIGHUP)' line in 10 s:\n{ft.tail(rx.log_path)}")
        time.sleep(0.05)
    rp = one_rp()
    pts = wait_listed(env, rx.store, group, 5, newest=rp)
    ft.check_eq([p["rp_id"] for p in pts], list(range(rp - 4, rp + 1)), "keep-last 5 after SIGHUP")
    ft.log(f"(d) keep-last = 5 and SIGHUP: RPs {pts[0]['rp_id']}..{rp} listed")

    write_cfg(f"[group.{group}.retention]\nkeep-last = \"many\"\n[[[\n")
    log_before = len(rx.log_text())
    os.kill(rx.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while cfg not in rx.log_text()[log_before:]:
        ft.check(rx.alive(), f"receiver died on SIGHUP with a broken file:\n{ft.tail(rx.log_path)}")
        ft.check(time.monotonic() < deadline,
                 f"no error naming {cfg} in 10 s after SIGHUP:\n{ft.tail(rx.log_path)}")
        time.sleep(0.05)
    time.sleep(0.3)
    line = next(l for l in rx.log_text()[log_before:].splitlines() if cfg in l)
    ft.check("error" in line.lower(), f"the reload failure must be logged as an error: {line}")
    ft.check("retention reloaded" not in rx.log_text()[log_before:],
             f"a broken file must not be reloaded:\n{rx.log_text()[log_before:]}")
    ft.log(f"(d) broken file: {line.strip()}")
    rp = one_rp()
    pts = wait_listed(env, rx.store, group, 5, newest=rp)
    ft.check(rx.alive(), "receiver must keep working after a bad reload")
    ft.log(f"(d) after the bad reload the policy stays: RPs {pts[0]['rp_id']}..{rp} listed")
    rx.stop()
    return rx.store


# ------------------------------------------------------------------------------------------
# (f) a prune killed after writing its intent


def part_f(env, store, group):
    """A prune killed after writing its intent (the state names the RPs to drop, the replica
    is not compacted yet) must leave a store that opens and reads.
    1. The receiver killed there (FERRY_KILL_AT=prune.after_intent) once the journal's first
       segment is gone: after a restart the group is recovered, lists its RPs, takes the next
       RP, and that RP restores equal to the source.
    2. `ferry prune` killed there: `ferry points` reads the points before or after the prune,
       and a second prune finishes it."""
    r = env.run(["debug", "kill-points"], check_rc=0)
    if "prune.after_intent" not in r.out:
        ft.log("(f) kill points compiled out of this build: not checked")
        return
    # 1. The receiver, after the first journal segment was removed (8 MiB an RP, keep-last 2).
    g = "crash"
    wl = env.workload(salt=6)
    qsd = env.qsd([ft.Disk("vdc", 16 * ft.MiB, "qcow2")], tag="qsdc")
    vdc = qsd.disks[0]
    rx = env.receiver(store=os.path.join(env.dir, "store-crash"), tag="receiver-crash",
                      args=["--keep-last", 2])
    jdir = os.path.join(rx.store, g, "journal")
    for i in range(40):
        wl.random_writes(qsd, vdc, 8, min_len=ft.MiB, max_len=ft.MiB, align=ft.MiB)
        env.replicate_once(qsd, rx.addr, g)
        if i > 2 and "0000000000000001.seg" not in os.listdir(jdir):
            break
    ft.check("0000000000000001.seg" not in os.listdir(jdir),
             f"the first journal segment is still there: {os.listdir(jdir)}")
    rx.stop()
    rx.restart(extra_env={"FERRY_KILL_AT": "prune.after_intent"})
    wl.random_writes(qsd, vdc, 8, min_len=ft.MiB, max_len=ft.MiB, align=ft.MiB)
    r = env.run(env.replicate_args(qsd, rx.addr, g), timeout=120)
    rx.proc.wait(20)
    ft.check("kill point prune.after_intent fired" in rx.log_text(),
             f"the receiver's kill point did not fire:\n{ft.tail(rx.log_path)}")
    rx.restart(extra_env={})
    qsd.sync()
    snap = qsd.snapshot(vdc, env.path("snaps", "crash.img"))
    r = env.run(["points", "--store", rx.store, "--group", g, "--json"], timeout=60)
    recovery = [l for l in rx.log_text().splitlines()[-20:] if "recover" in l]
    ft.check(r.rc == 0, f"ferry points after the receiver was killed at prune.after_intent:\n{r}"
                        f"\nthe receiver's recovery: {recovery}")
    rp = env.replicate_once(qsd, rx.addr, g)
    env.check_restore(rx.store, g, rp, "vdc", snap, "(after a crash at prune.after_intent) ")
    wait_listed(env, rx.store, g, 2, newest=rp)
    rx.stop()
    qsd.stop()
    ft.log("(f) receiver killed at prune.after_intent: recovered, next RP restores equal")
    if store is None:
        return
    # 2. ferry prune, on (d)'s group.
    before = [p["rp_id"] for p in env.points(store, group)]
    ft.check(len(before) > 2, f"(f) needs more than 2 RPs: {before}")
    r = env.run(["prune", "--store", store, "--group", group, "--keep-last", 2],
                extra_env={"FERRY_KILL_AT": "prune.after_intent"}, timeout=60)
    ft.check(r.rc != 0 and "prune.after_intent" in r.err, f"kill point did not fire:\n{r}")
    r = env.run(["points", "--store", store, "--group", group, "--json"], timeout=60)
    ft.check(r.rc == 0, f"ferry points after a prune killed at prune.after_intent:\n{r}")
    ids = [p["rp_id"] for p in json.loads(r.out)]
    ft.check(ids in (before, before[-2:]), f"after the killed prune: {ids}, expected {before} "
                                           f"or {before[-2:]}")
    r = env.run(["prune", "--store", store, "--group", group, "--keep-last", 2], timeout=60)
    ft.check(r.rc == 0, f"prune after the killed one:\n{r}")
    ft.check_eq([p["rp_id"] for p in env.points(store, group)], before[-2:],
                "RPs after the second prune")
    ft.log(f"(f) prune killed at prune.after_intent: readable ({ids}), finished by a second prune")


# ------------------------------------------------------------------------------------------
# (e) the text output of ferry points, and the pin of an export


def points_text(env, store, group):
    r = env.run(["points", "--store", store, "--group", group], check_rc=0)
    lines = r.out.splitlines()
    head = next((l for l in lines if l.startswith("RP ")), None)
    ft.check(head is not None, f"no header line in ferry points:\n{r.out}")
    for col in ("CREATED", "IN STORE", "KEPT BY", "PINNED"):
        ft.check(col in head, f"ferry points header lacks {col}: {head!r}")
    rows = {}
    for l in lines[lines.index(head) + 1:]:
        f = l.split()
        if f and f[0].isdigit():
            rows[int(f[0])] = f
    return r.out, rows


def held_client(env, sock):
    """A qemu-io connected to the export and kept open (commands on its stdin)."""
    p = subprocess.Popen(["qemu-io", "-r", "-f", "raw", f"nbd+unix:///?socket={sock}"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, cwd=env.dir)
    env.on_cleanup(lambda: p.poll() is None and p.kill())
    p.stdin.write(b"read 0 64k\n")
    p.stdin.flush()
    return p


def wait_pinned(env, store, group, rp, want, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        out, rows = points_text(env, store, group)
        if rp in rows and (rows[rp][-1] == "yes") == want:
            return out, rows
        if time.monotonic() > deadline:
            return out, rows
        time.sleep(0.1)


def part_e(env, rx, group, kept):
    out, rows = points_text(env, rx.store, group)
    ft.check_eq(sorted(rows), kept, "RPs in the text output")
    ft.check(all(r[-1] == "no" for r in rows.values()), f"nothing pinned yet:\n{out}")
    if not HAVE_NBDKIT:
        ft.log("(e) nbdkit not installed: the pin of an export is not checked")
        return
    rp = kept[0] if len(kept) > 1 and kept[0] != max(kept) else kept[-1]
    sock = env.path("pin.sock")
    e = start_export(env, "export-pin", ["--store", rx.store, "--group", group, "--disk", "vdb",
                                          "--point", rp, "--socket", sock])
    # With a client connected to the export.
    client = held_client(env, sock)
    out, rows = wait_pinned(env, rx.store, group, rp, True)
    ft.check(client.poll() is None, f"qemu-io could not stay connected to {sock}")
    ft.check_eq(rows[rp][-1], "yes", f"PINNED of RP {rp} while a client reads its export:\n{out}")
    ft.check(all(r[-1] == "no" for k, r in rows.items() if k != rp),
             f"only RP {rp} is pinned:\n{out}")
    pts = {p["rp_id"]: p for p in env.points(rx.store, group)}
    ft.check_eq(pts[rp]["pinned"], True, f"JSON pinned of RP {rp} while exported")
    ft.log(f"(e) ferry points while RP {rp} is exported (a client connected):\n{out}")
    # The export pins its RP for as long as it runs, not only while a client is connected:
    # a client may connect at any time and must find the RP the export announced.
    client.stdin.write(b"quit\n")
    client.stdin.close()
    client.wait(10)
    out, rows = wait_pinned(env, rx.store, group, rp, True, timeout=1)
    ft.check_eq(rows[rp][-1], "yes", f"PINNED of RP {rp} while its export runs (no client "
                                     f"connected at this moment):\n{out}")
    ft.check_eq(e.terminate(), 0, "ferry export exit status on SIGTERM")
    out, rows = wait_pinned(env, rx.store, group, rp, False)
    ft.check_eq(rows[rp][-1], "no", f"PINNED of RP {rp} after the export stopped:\n{out}")


# Parts to run: all by default; `test_retention.py c e` runs (b) and those (to debug one).
PARTS = set(sys.argv[1:]) or set("abcdef")

with ft.Env("retention") as env:
    t_start = time.monotonic()
    rx = env.receiver()  # the default policy (keep-last 48, ...) for the first RPs of (b)
    wl = env.workload(salt=2)
    qsd = env.qsd([ft.Disk("vdb", 24 * ft.MiB + 4 * ft.KiB, "qcow2")], tag="qsdb")

    if PARTS & set("bce"):
        # (b): ~40 deterministic RPs; after 5, the receiver is restarted with --keep-last 20.
        group = "det"
        snaps = {}
        rps = 60 if ft.LONG else 40
        part_b(env, rx, qsd, wl, group, 5, snaps)
        ft.check_eq(len(env.points(rx.store, group)), 5, "RPs under the default policy")
        rx.stop()
        rx.restart(args=["--keep-last", 20])
        newest = part_b(env, rx, qsd, wl, group, rps - 5, snaps, start=5)
        pts = wait_listed(env, rx.store, group, 20, newest=newest)
        ids = [p["rp_id"] for p in pts]
        ft.check_eq(ids, list(range(newest - 19, newest + 1)), "RPs kept by keep-last 20")
        ft.check_eq([p["rule"] for p in pts], ["keep-last"] * 19 + ["newest"], "rules of kept RPs")
        for rp in ids:
            env.check_restore(rx.store, group, rp, "vdb", snaps[rp], "(kept, keep-last 20) ")
        for rp in (1, newest - 20):
            expect_pruned(env, rx.store, group, rp, "vdb", "(b) ")
        ft.log(f"(b) done at {time.monotonic() - t_start:.0f} s: {rps} RPs, the 20 kept restore "
               f"equal")

    if PARTS & set("ce"):
        # (c): by hand, with the receiver stopped; then refused while it runs.
        rx.stop()
        kept = part_c(env, rx, group, snaps)
        rx.restart(args=["--keep-last", 20])
        before = env.points(rx.store, group)
        for extra in ([], ["--dry-run"]):
            r = env.run(["prune", "--store", rx.store, "--group", group, "--keep-last", 1] + extra,
                        timeout=60)
            ft.check(r.rc == 1 and "running receiver" in r.err and group in r.err,
                     f"prune {' '.join(extra)} while a receiver holds the group must exit 1 "
                     f"naming it:\n{r}")
        ft.check_eq(env.points(rx.store, group), before, "points after a refused prune")
        ft.log(f"(c) done at {time.monotonic() - t_start:.0f} s: prune refused while the "
               f"receiver runs: {r.err.strip()}")

    if "a" in PARTS:
        rx.stop()
        rx.restart(args=["--keep-last", 20])
        part_a(env, rx)
        ft.log(f"(a) done at {time.monotonic() - t_start:.0f} s")

    cfg_store = None
    if "d" in PARTS:
        cfg_store = part_d(env, qsd, wl)
        ft.log(f"(d) done at {time.monotonic() - t_start:.0f} s")
    qsd.stop()

    if "e" in PARTS:
        part_e(env, rx, group, kept)
        ft.log(f"(e) done at {time.monotonic() - t_start:.0f} s")

    if "f" in PARTS:
        part_f(env, cfg_store, "cfg")
        ft.log(f"(f) done at {time.monotonic() - t_start:.0f} s")
    rx.stop()
