#!/usr/bin/env python3
"""No store failure leaves a group stuck until the receiver restarts (issue 18, item 7).

The receiver keeps one RP (--keep-last 1), so each commit compacts it into the replica images
(layout 2's apply). Part A, a failure after the acknowledgement, of a kind other than
EIO/ENOSPC: the group's replica directory is moved away, so compacting RP 2 (after its ack)
fails with ENOENT
(not-found). The group stays open with the apply pending (R19): `ferry status --socket`
shows `apply_pending` with the cause; the receiver retries the apply by itself (with
back-off) and takes the next RP without a restart; the replica then equals the source.
Part A2: the replica image is made immutable (chattr +i), so the compaction fails while the
image still reads (the capacity check passes): an RP is still acknowledged and restorable,
`ferry status` exits 3, an RP committed during the retry back-off does not retry the apply
(each retry rewrites the replica), and once the directory is gone the replica catches up in
the background, with no source.
Part B, a failure at start-up: the receiver starts while the group's journal directory is
replaced by a file, so its recovery fails. `ferry status --socket` shows the group failing
with the cause (exit 3); once the journal is put back the receiver re-opens the group in the
background, without a restart and without any source connecting, and status shows it ok."""

import json
import os
import shutil
import subprocess
import time

import ferrytest as ft

GROUP = "sf"
SIZE = 16 * ft.MiB


def status(env, sock):
    r = env.run(["status", "--socket", sock, "--json"], timeout=20)
    ft.check(r.rc in (0, 3), f"ferry status --socket failed:\n{r}")
    doc = json.loads(r.out)
    groups = {g["group"]: g for g in doc.get("groups", [])}
    return r.rc, groups


def wait_for(what, cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise ft.TestFailure(f"{what}: not within {timeout} s")


def replicate_until_ok(env, qsd, rx, bound_s):
    """The source retries like `--interval 1` would; the group must take an RP within bound_s."""
    t0 = time.monotonic()
    while True:
        r = env.run(env.replicate_args(qsd, rx.addr, GROUP), timeout=60)
        if r.rc == 0:
            rp = int(r.out.strip().splitlines()[-1])
            ft.log(f"RP {rp} after {time.monotonic() - t0:.1f} s")
            return rp
        ft.log(f"replicate refused ({r.err.strip().splitlines()[-1] if r.err.strip() else r.rc})")
        if time.monotonic() - t0 > bound_s:
            raise ft.TestFailure(f"the group took no RP within {bound_s} s of the cause being "
                                 f"gone (stuck until restart?):\n{r}\n{ft.tail(rx.log_path)}")
        time.sleep(1)


with ft.Env("store-failure-recovers") as env:
    t0 = time.monotonic()
    help_text = env.run(["receive", "--help"], timeout=20).out
    sock = env.path("receive.sock") if "--status-socket" in help_text else None
    store = env.path("store", ".")[:-2]
    if sock:
        # ferrytest's Receiver starts `ferry receive` with fixed flags: add the status socket.
        class ProcWithSocket(ft.Proc):
            def __init__(self, env_, name, argv, *a, **k):
                if name == "receiver":
                    argv = argv + ["--status-socket", sock]
                super().__init__(env_, name, argv, *a, **k)
        ft.Proc = ProcWithSocket
    # keep-last 1: every commit compacts the new RP into the replica images (layout 2), so
    # the images follow the newest RP and a broken image fails the compaction after each ack.
    rx = env.receiver(store=store, args=["--keep-last", "1"])

    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2")])
    vda = qsd.disk("vda")
    wl = env.workload()
    wl.random_writes(qsd, vda, 10)
    rp1 = env.replicate_once(qsd, rx.addr, GROUP)
    # The apply runs after the acknowledgement: let it finish before breaking the replica.
    if sock:
        wait_for("RP 1 applied", lambda: status(env, sock)[1][GROUP]["last_applied_rp"] == rp1, 10)
    else:
        time.sleep(1)

    # --- Part A: apply fails after the ack with not-found ---
    replica = os.path.join(store, GROUP, "replica")
    os.rename(replica, replica + ".away")
    wl.random_writes(qsd, vda, 10)
    rp2 = env.replicate_once(qsd, rx.addr, GROUP)   # acknowledged: it is in the journal
    wait_for("the failed apply in the receiver's log",
             lambda: "applying RP 2" in rx.log_text(), 10)
    if sock:
        rc, groups = status(env, sock)
        g = groups.get(GROUP)
        ft.check(g and g["state"] == "apply_pending" and "replica" in g["cause"],
                 f"status must show {GROUP} apply_pending with the cause (R19): {groups}")
        ft.check_eq(g["last_committed_rp"], rp2, "RP 2 is committed while its apply is pending")
    # The cause goes away (or the receiver's re-open already re-made the directory).
    if os.path.isdir(replica):
        shutil.rmtree(replica + ".away")
    else:
        os.rename(replica + ".away", replica)
    wl.random_writes(qsd, vda, 10)
    snap = qsd.snapshot(vda, env.path("snaps", "a.img"))
    rp3 = replicate_until_ok(env, qsd, rx, 20)
    env.check_restore(store, GROUP, rp3, "vda", snap)
    wait_for("the replica image brought to RP 3",
             lambda: ft.first_difference(snap, os.path.join(replica, "vda.img")) is None, 10)
    ft.log("part A: recovered without a restart")

    # --- Part A2 (R19): the replica image cannot be written; RPs are still acknowledged ---
    # The image is made immutable (chattr +i: writes fail with EPERM, even for root), so the
    # compaction fails while the image still reads: in layout 2 it holds the base every kept
    # RP reads where no record covers a byte (a missing image would be data lost, R13).
    image = os.path.join(replica, "vda.img")
    subprocess.run(["chattr", "+i", image], check=True)
    env.on_cleanup(lambda: subprocess.run(["chattr", "-i", image], check=False))
    wl.random_writes(qsd, vda, 10)
    snap = qsd.snapshot(vda, env.path("snaps", "a2.img"))
    rp_a2 = env.replicate_once(qsd, rx.addr, GROUP)   # acknowledged while the apply fails
    rp_last = rp_a2
    env.check_restore(store, GROUP, rp_a2, "vda", snap, "(apply pending) ")
    if sock:
        g = wait_for("apply_pending in status",
                     lambda: (lambda g_: g_ if g_["state"] == "apply_pending" else None)(
                         status(env, sock)[1][GROUP]), 10)
        ft.check("vda.img" in g["cause"], f"status must name the image: {g}")
        ft.check_eq(g["last_committed_rp"], rp_a2, "the RP is committed while the apply fails")
        ft.check_eq(status(env, sock)[0], 3, "ferry status exit code while an apply fails")
        # A retry rewrites the whole replica: a commit during the back-off must not retry
        # (the attempt counter stays). Wait for a back-off long enough to commit inside it.
        g = wait_for("an apply back-off of 3 s or more",
                     lambda: (lambda g_: g_ if g_["state"] == "apply_pending"
                              and g_["next_reopen_seconds"] >= 3 else None)(
                         status(env, sock)[1][GROUP]), 20)
        t_commit = time.monotonic()
        rp_during = env.replicate_once(qsd, rx.addr, GROUP)   # no writes: the disk is still `snap`
        rp_last = rp_during
        rc, groups = status(env, sock)
        if time.monotonic() - t_commit < g["next_reopen_seconds"] - 0.5:
            ft.check_eq(groups[GROUP]["failed_attempts"], g["failed_attempts"],
                        f"apply attempts after RP {rp_during} committed during the back-off")
        else:
            ft.log("the commit outlasted the back-off: attempt counter not checked")
        ft.check_eq(groups[GROUP]["last_committed_rp"], rp_during, "committed during the back-off")
        ft.check_eq(rc, 3, "ferry status exit code while the apply waits for its retry")
    subprocess.run(["chattr", "-i", image], check=True)  # the cause goes away: no source, no restart
    wait_for("the replica caught up in the background",
             lambda: os.path.isfile(image) and ft.first_difference(snap, image) is None, 40)
    if sock:
        wait_for("state ok", lambda: status(env, sock)[1][GROUP]["state"] == "ok", 10)
    ft.log("part A2: RPs acknowledged while the apply failed; caught up by itself")

    # --- Part B: recovery fails at start-up; repaired while the receiver runs ---
    rx.stop()
    journal = os.path.join(store, GROUP, "journal")
    os.rename(journal, journal + ".away")
    with open(journal, "w") as f:
        f.write("not a directory\n")
    log_at = len(rx.log_text())
    rx.restart()
    wait_for("the start-up failure in the log", lambda: "start-up failed" in rx.log_text()[log_at:], 10)
    if sock:
        rc, groups = status(env, sock)
        g = groups.get(GROUP)
        ft.check(g and g["state"] == "failing", f"status must show {GROUP} failing: {groups}")
        ft.check("journal" in g["cause"] and g["failing_since_unix_ns"] > 0,
                 f"status must name the cause and since when: {g}")
        ft.check_eq(rc, 3, "ferry status exit code while a group fails")
        table = env.run(["status", "--socket", sock], timeout=20)
        ft.check(GROUP in table.out and "failing" in table.out,
                 f"the status table must show the failing group:\n{table}")
    time.sleep(2)
    os.unlink(journal)
    os.rename(journal + ".away", journal)
    t_fixed = time.monotonic()
    wait_for("the group re-opened in the background (no source connected)",
             lambda: f"group '{GROUP}': store re-opened" in rx.log_text()[log_at:], 40)
    ft.log(f"part B: re-opened {time.monotonic() - t_fixed:.1f} s after the repair")
    if sock:
        rc, groups = status(env, sock)
        ft.check_eq(groups[GROUP]["state"], "ok", f"state of {GROUP} after the repair")
        ft.check_eq(groups[GROUP]["last_committed_rp"], rp_last, "last committed RP in status")
        ft.check_eq(rc, 0, "ferry status exit code once every group is ok")
    wl.random_writes(qsd, vda, 5)
    snap = qsd.snapshot(vda, env.path("snaps", "b.img"))
    rp4 = env.replicate_once(qsd, rx.addr, GROUP)
    env.check_restore(store, GROUP, rp4, "vda", snap)
    rx.stop()
    ft.log(f"done in {time.monotonic() - t0:.1f} s")
