#!/usr/bin/env python3
"""The event log on both ends of a real replication (qemu-storage-daemon source, real receiver
over mutual TLS), read with `ferry events`, and the same events in journald.

- receiver (`--keep-last 2`): rp_started, rp_committed, rp_applied per RP, in order, and
  rp_pruned for the RPs retention drops;
- source (`--state-dir`): rp_started, rp_committed per RP; after the test removes the group's
  dirty bitmap through QMP, bitmap_lost (no_bitmap) before the RP and bitmap_healed after it;
  an RP refused by the receiver (the group's disk over `--max-disk-bytes`): rp_refused on the
  receiver and error with the cause on the source;
- `--since` as RFC 3339 and as an age filters; a malformed one is a usage error (exit 2);
- a torn last line (a crash in the middle of a write) is skipped with a note on stderr and the
  next events start on a line of their own;
- journald: the test runs in a private mount namespace with its own systemd-journald (tmpfs
  over /run/systemd, /run/log and /var/log/journal, so the host's journal, if any, is not
  touched) and finds the events with `journalctl FERRY_GROUP=...`, with FERRY_EVENT, FERRY_RP
  and FERRY_DISK. Without root or unshare the journald part is skipped (said in the log)."""

import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import ferrytest as ft

GROUP = "evg"
JOURNALD = "/lib/systemd/systemd-journald"
NS_FLAG = "FERRY_EVENTS_NAMESPACE"


def in_namespace():
    return os.environ.get(NS_FLAG) == "1"


# Re-run in a private mount namespace, where a journald of the test's own can listen on
# /run/systemd/journal/socket without touching the host's.
if not in_namespace() and os.geteuid() == 0 and shutil.which("unshare") and \
        os.path.exists(JOURNALD) and shutil.which("journalctl"):
    os.environ[NS_FLAG] = "1"
    os.execvp("unshare", ["unshare", "-m", "--propagation", "private", sys.executable,
                          os.path.abspath(__file__)] + sys.argv[1:])


def start_journald(env):
    for m in ("/run/systemd", "/run/log", "/var/log/journal"):
        if os.path.isdir(m):
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", m], check=True)
    p = ft.Proc(env, "journald", [JOURNALD], env.path("journald.log"))
    deadline = time.monotonic() + 10
    while not os.path.exists("/run/systemd/journal/socket"):
        ft.check(p.alive() and time.monotonic() < deadline,
                 f"systemd-journald did not start:\n{ft.tail(p.log_path)}")
        time.sleep(0.05)
    ft.log("journald: private instance running")
    return p


def events(env, where, since=None, check_rc=0):
    args = ["events", "--group", GROUP, "--json"] + where
    if since is not None:
        args += ["--since", since]
    r = env.run(args, timeout=60)
    ft.check(r.rc == check_rc, f"ferry events exited {r.rc}, expected {check_rc}:\n{r}")
    if check_rc != 0:
        return r
    doc = json.loads(r.out)
    return doc["events"], r


def kinds(evs):
    return [(e["kind"], e["rp"]) for e in evs]


with ft.Env("events") as env:
    journald = start_journald(env) if in_namespace() else None
    if journald is None:
        ft.log("journald part skipped: needs root, unshare and systemd-journald")
    wl = env.workload()
    qsd = env.qsd([ft.Disk("vda", 32 * ft.MiB, "qcow2")])
    vda = qsd.disks[0]
    rx = env.receiver(args=["--keep-last", "2"])
    state = os.path.join(env.dir, "state")
    os.makedirs(state)
    store_args = ["--store", rx.store]
    source_args = ["--work-dir", state]

    def rp():
        """One RP; returns once the receiver logged its apply (which follows the ack)."""
        wl.random_writes(qsd, vda, 8)
        qsd.sync()
        n = env.replicate_once(qsd, rx.addr, GROUP, state_dir=state)
        deadline = time.monotonic() + 20
        while ("rp_applied", n) not in kinds(events(env, store_args)[0]):
            ft.check(time.monotonic() < deadline, f"no rp_applied for RP {n} in 20 s")
            time.sleep(0.05)
        return n

    for expected in (1, 2, 3):
        ft.check_eq(rp(), expected, "RP id")

    # --- receiver: every step, in order; retention's prunes ---
    rx_events, _ = events(env, store_args)
    got = [k for k in kinds(rx_events) if k[0] != "rp_pruned"]
    want = [(k, n) for n in (1, 2, 3) for k in ("rp_started", "rp_committed", "rp_applied")]
    ft.check_eq(got, want, "receiver events (without prunes)")
    pruned = [n for k, n in kinds(rx_events) if k == "rp_pruned"]
    ft.check_eq(pruned, [1], "RPs pruned by --keep-last 2 after RP 3")
    ft.check(kinds(rx_events).index(("rp_pruned", 1)) > kinds(rx_events).index(("rp_committed", 3)),
             "RP 1 is pruned after RP 3 is committed")
    c3 = next(e for e in rx_events if e["kind"] == "rp_committed" and e["rp"] == 3)
    ft.check(c3["fields"]["base_rp"] == 2 and c3["fields"]["frames"] > 0 and
             c3["fields"]["acked"] == 1, f"rp_committed fields: {c3}")
    for e in rx_events:
        ft.check(e["group"] == GROUP and e["time"].endswith("Z"), f"event: {e}")

    # --- source: started and committed per RP ---
    src_events, _ = events(env, source_args)
    ft.check_eq(kinds(src_events),
                [(k, n) for n in (1, 2, 3) for k in ("rp_started", "rp_committed")],
                "source events")

    # --- change tracking lost: bitmap_lost before the RP, bitmap_healed after it ---
    t_before_4 = datetime.datetime.now(datetime.timezone.utc)
    time.sleep(0.05)
    names = list(qsd.qmp.bitmaps(vda.node))
    ours = [n for n in names if n.startswith(f"ferry.{GROUP}.") and n.split(".")[-1].isdigit()]
    ft.check(ours, f"a ferry bitmap on {vda.node}: {names}")
    for n in ours:
        qsd.qmp.execute("block-dirty-bitmap-remove", node=vda.node, name=n)
    ft.check_eq(rp(), 4, "RP id after the bitmap was removed")
    src_events, _ = events(env, source_args)
    tail4 = [(e["kind"], e["rp"], e["disk"]) for e in src_events if e["rp"] == 4]
    ft.check_eq(tail4, [("rp_started", 4, ""), ("bitmap_lost", 4, "vda"),
                        ("rp_committed", 4, ""), ("bitmap_healed", 4, "vda")],
                "source events of RP 4")
    lost = next(e for e in src_events if e["kind"] == "bitmap_lost")
    ft.check_eq(lost["fields"]["reason"], "no_bitmap", "bitmap_lost reason")
    ft.check_eq(lost["fields"]["mode"], "resync", "bitmap_lost mode")

    # --- --since: RFC 3339 and ages ---
    since = t_before_4.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    recent, _ = events(env, source_args, since=since)
    ft.check_eq(sorted({e["rp"] for e in recent}), [4], f"--since {since}")
    recent, _ = events(env, store_args, since=since)
    ft.check({e["rp"] for e in recent if e["kind"] != "rp_pruned"} == {4},
             f"receiver --since {since}: {kinds(recent)}")
    every, _ = events(env, source_args, since="10m")
    ft.check_eq(len(every), len(src_events), "--since 10m keeps everything")
    none, _ = events(env, source_args, since="2099-01-01T00:00:00+02:00")
    ft.check_eq(none, [], "--since in the future")
    r = events(env, source_args, since="yesterday", check_rc=2)
    ft.check("RFC 3339" in r.err, f"a bad --since names the format:\n{r}")
    r = env.run(["events", "--group", "nosuch", "--store", rx.store], timeout=30)
    ft.check(r.rc == 1 and "no event log" in r.err, f"unknown group:\n{r}")

    # --- a torn last line is skipped with a note; the next event starts a new line ---
    log_path = os.path.join(rx.store, GROUP, "events", "events.jsonl")
    with open(log_path, "a") as f:
        f.write('{"time":"2026-12-08T02:50:00.000000Z","group":"evg","kind":"rp_comm')
    torn, r = events(env, store_args)
    ft.check_eq(len(torn), len(rx_events) + len(recent), "events around a torn line")
    ft.check("torn last line" in r.err, f"a note for the torn line:\n{r}")
    ft.check_eq(rp(), 5, "RP after the torn line")
    after, r = events(env, store_args)
    ft.check(("rp_committed", 5) in kinds(after), f"RP 5 read after the torn line: {kinds(after)}")
    ft.check("not an event" in r.err, f"the torn line is still skipped with a note:\n{r}")

    # --- a refused RP: rp_refused on the receiver, error with the cause on the source ---
    rx.stop()
    rx.restart(args=["--keep-last", "2", "--max-disk-bytes", "16M"])
    wl.random_writes(qsd, vda, 2)
    qsd.sync()
    r = env.run(env.replicate_args(qsd, rx.addr, GROUP, state_dir=state), timeout=120)
    ft.check(r.rc == 1, f"an RP over --max-disk-bytes is refused:\n{r}")
    refused = [e for e in events(env, store_args)[0] if e["kind"] == "rp_refused"]
    ft.check(len(refused) == 1 and refused[0]["rp"] == 6 and
             "max-disk-bytes" in refused[0]["fields"]["cause"], f"rp_refused: {refused}")
    errors = [e for e in events(env, source_args)[0] if e["kind"] == "error"]
    ft.check(len(errors) == 1 and "max-disk-bytes" in errors[0]["fields"]["cause"],
             f"source error event: {errors}")

    # --- an export (when nbdkit is here) and `ferry prune` write to the receiver's log too ---
    if shutil.which("nbdkit"):
        sock = env.path("export.sock")
        p = ft.Proc(env, "export", [env.ferry, "export", "--store", rx.store, "--group", GROUP,
                                    "--point", "latest", "--disk", "vda", "--socket", sock],
                    env.path("export.log"))
        t0 = time.monotonic()
        while "serving" not in p.log_text():
            ft.check(p.alive() and time.monotonic() - t0 < 10, f"export:\n{p.log_text()}")
            time.sleep(0.02)
        p.terminate()
        exported = [e for e in events(env, store_args)[0] if e["kind"] == "rp_exported"]
        ft.check(len(exported) == 1 and exported[0]["rp"] == 5 and exported[0]["disk"] == "vda"
                 and sock in exported[0]["fields"]["uri"], f"rp_exported: {exported}")
    else:
        ft.log("nbdkit not installed: rp_exported not exercised")
    rx.stop()
    r = env.run(["prune", "--store", rx.store, "--group", GROUP, "--keep-last", "1"], timeout=60)
    ft.check(r.rc == 0, f"ferry prune:\n{r}")
    by_hand = [e for e in events(env, store_args)[0]
               if e["kind"] == "rp_pruned" and e["fields"]["by"] == "ferry prune"]
    ft.check_eq([e["rp"] for e in by_hand], [4], "RPs pruned by ferry prune --keep-last 1")

    # --- --event-log-bytes bounds the receiver's two files ---
    rx.restart(args=["--keep-last", "2", "--event-log-bytes", "4096"])
    for _ in range(5):
        last = rp()
    cur = os.path.join(rx.store, GROUP, "events", "events.jsonl")
    prev = os.path.join(rx.store, GROUP, "events", "events.1.jsonl")
    ft.check(os.path.exists(prev), "rotated to events.1.jsonl")
    for p in (cur, prev):
        ft.check(os.path.getsize(p) <= 4096, f"{p}: {os.path.getsize(p)} bytes > 4096")
    bounded, r = events(env, store_args)
    ft.check(r.err == "" and ("rp_committed", last) in kinds(bounded),
             f"the bounded log reads clean and holds the newest RP: {kinds(bounded)}\n{r}")

    # --- a store that cannot be recovered at start-up: an error event with the cause ---
    rx.stop()
    jdir = os.path.join(rx.store, GROUP, "journal")
    os.rename(jdir, jdir + ".aside")
    open(jdir, "w").close()
    rx.restart()
    deadline = time.monotonic() + 20
    while True:
        errs = [e for e in events(env, store_args)[0] if e["kind"] == "error"]
        if errs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ft.check(len(errs) == 1 and "recovery at start-up failed" in errs[0]["fields"]["what"] and
             errs[0]["fields"]["cause"] and errs[0]["priority"] == 3,
             f"one error event for the failed recovery: {errs}")
    rx.stop()
    os.unlink(jdir)
    os.rename(jdir + ".aside", jdir)
    rx.restart()
    ft.check_eq(rp(), last + 1, "RP after the store was repaired")

    # --- journald: the same events, by FERRY_GROUP ---
    if journald is not None:
        deadline = time.monotonic() + 10
        while True:
            j = subprocess.run(["journalctl", "--no-pager", "-o", "json", f"FERRY_GROUP={GROUP}"],
                               capture_output=True, text=True, timeout=30)
            entries = [json.loads(l) for l in j.stdout.splitlines() if l.strip()]
            evs = [(e.get("FERRY_EVENT"), e.get("FERRY_RP"), e.get("FERRY_DISK")) for e in entries]
            if ("error", "6", None) in evs or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ft.log(f"journald: {len(entries)} entries for FERRY_GROUP={GROUP}")
        for want in [("rp_started", "1", None), ("rp_committed", "3", None),
                     ("rp_applied", "3", None), ("rp_pruned", "1", None),
                     ("bitmap_lost", "4", "vda"), ("bitmap_healed", "4", "vda"),
                     ("rp_refused", "6", None), ("error", "6", None), ("error", None, None)]:
            ft.check(want in evs, f"journald has {want}: {evs}")
        e = next(x for x in entries if x.get("FERRY_EVENT") == "rp_refused")
        ft.check(e["PRIORITY"] == "3" and "refused" in e["MESSAGE"] and
                 "max-disk-bytes" in e.get("FERRY_CAUSE", ""), f"journald rp_refused: {e}")
