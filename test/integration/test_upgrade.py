#!/usr/bin/env python3
"""Upgrades keep data: a store written by the previous release is read, migrated if need be,
and extended by the build under test.

The previous release is built from the archive vendored in test/upgrade/ (test/upgrade/
build-previous, cached by the archive's sha256; FERRY_PREVIOUS_BIN overrides it). Then:

(a) OLD receiver + OLD `replicate --interval 1` on two disks (qcow2 + raw) while the test
    writes between RPs, about 10 RPs; writes stop and a quiet RP must equal the source. Both
    stop cleanly on SIGTERM. The OLD binary restores every RP of every disk into reference
    files and its `points` output is kept.
(b) The NEW binary, before any new receiver ran: `points` lists the same RPs (ids, bases,
    times, disks, sizes, full flag, changed and zero bytes; stored_bytes is a layout fact and
    may change), `restore` of every RP equals the reference byte for byte, and `export` of one
    old RP equals its reference (`qemu-img compare` over NBD).
    A new receiver then opens the store. When the layout changed it migrates it in place: any
    log line saying "migrat..." must name the store or the group, and only one process may
    log one (the first receiver start, or the first reader if readers migrate): the second
    start of the receiver must not migrate again.
(c) OLD source -> NEW receiver, same state dir: exactly one of two outcomes is accepted.
    Either it keeps working (3 incremental RPs, each restored by the new binary equal to the
    source copy taken right after its writes), or the new receiver refuses the hello and its
    log names both protocol versions (the old one, read from the archive's wire.h, and the
    new one, from this tree's wire.h, which must then differ), the old source exits 1 saying
    it was refused, and nothing is committed. Anything else fails. (The refusal branch was
    checked once with this tree's kProtocolVersion set to 2.)
(d) NEW source -> NEW receiver on the same store and state dir: RPs continue after the old
    ones (ids grow, base = the newest before, incremental: the source's state dir and
    bitmaps carry over), across a receiver restart (the second start, which must not migrate
    again). At the end every RP, down to the oldest old one, restores equal to its reference
    or source copy.

Version negotiation today (transport/include/ferry/transport/wire.h, docs/wire-protocol.md
"Versioning"): one protocol version, kProtocolVersion = 1, in the first 2 bytes of hello. A
receiver that gets any other version decodes only that field, answers hello_reply(its own
version, status bad_version) with the message "protocol version X is not supported (this
receiver speaks version Y)", logs the same line and closes; there is no fallback to an older
version. A source decodes only version and status of a hello_reply in a foreign version and
does not print the reply's version, so a v1 source refused by a v2 receiver exits 1 with
"protocol-error: receiver refused group 'G': " and nothing after the colon; the versions are
only in the receiver's log. Compatible additions are feature bits instead
(hello.features offered, hello_reply.features = the accepted subset: hash_list, zero_ranges,
disk_identity); a v1 receiver ignores bits it does not know, and a source without
disk_identity is matched by disk name (the receiver logs "an older release"). 0.1.0 and this
tree both speak version 1, so (c) takes the "keeps working" branch until the version is
bumped.
"""

import json
import os
import re
import shutil
import subprocess
import time

import ferrytest as ft

GROUP = "grp-upgrade"
SIZES = {"vda": 48 * ft.MiB + 4 * ft.KiB, "vdb": 24 * ft.MiB}  # vda: last block partial
OLD_RPS = 8
WIRE_H = os.path.join("transport", "include", "ferry", "transport", "wire.h")
UPGRADE_DIR = os.path.join(ft.REPO, "test", "upgrade")
# Fields of a `points --json` entry that an upgrade must keep. stored_bytes is left out: it
# counts the store's own bytes, which a new layout may change.
POINT_KEYS = ("rp_id", "base_rp", "created_unix_ns", "committed_unix_ns")
DISK_KEYS = ("name", "size_bytes", "full", "changed_bytes", "zero_bytes")


def previous_ferry():
    """The previous release's ferry: $FERRY_PREVIOUS_BIN, else test/upgrade/build-previous."""
    path = os.environ.get("FERRY_PREVIOUS_BIN")
    if path:
        ft.check(os.access(path, os.X_OK), f"FERRY_PREVIOUS_BIN={path} is not executable")
        return path
    script = os.path.join(UPGRADE_DIR, "build-previous")
    t0 = time.monotonic()
    p = subprocess.run([script], capture_output=True, text=True, timeout=3000)
    if p.stderr.strip():
        print(p.stderr.rstrip(), flush=True)
    # Not a skip: the build needs only what scripts/install-deps installs.
    ft.check(p.returncode == 0, f"test/upgrade/build-previous exited {p.returncode}")
    path = p.stdout.strip().splitlines()[-1]
    ft.check(os.access(path, os.X_OK), f"build-previous printed {path!r}, not an executable")
    ft.log(f"previous release: {path} ({time.monotonic() - t0:.1f} s to build or find)")
    return path


def protocol_version(wire_h_text, where):
    m = re.search(r"kProtocolVersion\s*=\s*(\d+)", wire_h_text)
    ft.check(m, f"no kProtocolVersion in {where}")
    return int(m[1])


def old_protocol_version():
    archives = [n for n in os.listdir(UPGRADE_DIR) if re.fullmatch(r"ferry-.*\.tar\.zst", n)]
    ft.check(len(archives) == 1, f"expected one ferry-*.tar.zst in {UPGRADE_DIR}: {archives}")
    p = subprocess.run(f"zstd -dc '{os.path.join(UPGRADE_DIR, archives[0])}' | "
                       f"tar -xO '{WIRE_H}'", shell=True, capture_output=True, text=True)
    ft.check(p.returncode == 0, f"cannot read {WIRE_H} from {archives[0]}: {p.stderr}")
    return protocol_version(p.stdout, f"{archives[0]}:{WIRE_H}")


def new_protocol_version():
    with open(os.path.join(ft.REPO, WIRE_H)) as f:
        return protocol_version(f.read(), WIRE_H)


def summary(points):
    return {p["rp_id"]: ({k: p[k] for k in POINT_KEYS},
                         [{k: d[k] for k in DISK_KEYS} for d in p["disks"]]) for p in points}


def segments(log_text):
    """The receiver log split at ferrytest's '--- ferrytest: start on port' markers: one entry
    per start of the receiver."""
    return [s for s in re.split(r"^--- ferrytest: start on port \d+ ---$", log_text,
                                flags=re.M)[1:]]


def migration_lines(text):
    return [l for l in text.splitlines() if "migrat" in l.lower()]


def wait_for(what, fn, timeout, every=0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise ft.TestFailure(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


# Plaintext on loopback: the previous release (0.1.0) has no TLS.
with ft.Env("upgrade", tls=False) as env:
    NEW = env.ferry = os.path.abspath(env.ferry)  # the commands run in the temp dir
    OLD = previous_ferry()
    ft.check(os.path.realpath(OLD) != os.path.realpath(NEW), "the old and new binary are one")
    wl = env.workload()
    rng = env.rng
    qsd = env.qsd([ft.Disk("vda", SIZES["vda"], "qcow2"), ft.Disk("vdb", SIZES["vdb"], "raw")])
    store = os.path.join(env.dir, "store")
    state_dir = os.path.join(env.dir, "state")
    os.makedirs(state_dir)
    hist = ft.History(env, store, GROUP)  # source copies of the RPs whose content is known
    written = []

    def write_some(n, max_len=192 * ft.KiB):
        """Random writes on both disks, now and then zeros over earlier data."""
        for d in qsd.disks:
            for _ in range(n):
                length = rng.randrange(512, max_len, 512)
                off = rng.randrange(0, d.size_bytes - length, 512)
                wl.write(qsd, d, off, length)
                written.append((d, off, length))
        for d, off, length in rng.sample(written, min(2, len(written))):
            wl.zero(qsd, d, off, max(512, length // 2), rng.choice(["zero_range", "pwrite"]))

    # ---------------------------------------------------------------------------------------
    # (a) The previous release writes the store.
    env.ferry = OLD
    r = env.run(["--version"], timeout=20)
    ft.log(f"old binary: {(r.out or r.err).strip()!r}")
    rx = env.receiver(store, tag="receiver-old")
    write_some(12, max_len=1 * ft.MiB)
    qsd.sync()
    args = env.replicate_args(qsd, rx.addr, GROUP, state_dir=state_dir)
    args[args.index("--once")] = "--interval"
    args.insert(args.index("--interval") + 1, "1")
    rep = ft.Proc(env, "replicate-old", [OLD] + args, env.path("replicate-old.log"))

    def count():
        if not os.path.isdir(os.path.join(store, GROUP)):
            return 0  # before the first RP: no group yet, and `points` says not found
        return len(env.points(store, GROUP))

    n = 0
    while n < OLD_RPS:
        n = wait_for(f"RP {n + 1} of the old source", lambda: (lambda c: c if c > n else 0)(
            count()), 60)
        ft.check(rep.alive(), f"old replicate exited {rep.p.returncode}:\n{rep.log_text()}")
        write_some(rng.randrange(2, 6))
        qsd.sync()
    # Quiet: the second RP committed after this point began after the writes ended.
    n = count()
    snaps = hist.snapshot_all(qsd, "old-quiet")
    wait_for("two RPs after the writes stopped", lambda: count() >= n + 2, 60)
    ft.check_eq(rep.terminate(timeout=30), 0, "old replicate's exit status on SIGTERM")
    rx.stop()
    old_json = env.run(["points", "--store", store, "--group", GROUP, "--json"], check_rc=0)
    old_text = env.run(["points", "--store", store, "--group", GROUP], check_rc=0)
    # Kept with the logs when the test fails (the temp dir keeps .json and .log files).
    for name, res in (("points-old.json", old_json), ("points-old-text.log", old_text)):
        with open(env.path(name), "w") as f:
            f.write(res.out)
    old_points = json.loads(old_json.out)
    old_rps = [p["rp_id"] for p in old_points]
    ft.check(len(old_rps) >= OLD_RPS + 2, f"old points: {old_rps}")
    ft.check(old_points[0]["disks"][0]["full"], f"the first old RP is full: {old_points[0]}")
    ref = {}  # (rp, disk) -> the old binary's restore
    for rp in old_rps:
        for d in SIZES:
            ref[rp, d] = env.restore(store, GROUP, rp, d,
                                     out=env.path("ref", f"{d}-rp{rp}.img"))
    quiet = old_rps[-1]
    hist.record(quiet, snaps)
    for d in SIZES:
        diff = ft.first_difference(snaps[d], ref[quiet, d])
        ft.check(not diff, f"old restore of the quiet RP {quiet} {d} differs from the source: "
                           f"{diff}")
    ft.log(f"(a) old release: RPs {old_rps} (2 disks), restored into references; the quiet RP "
           f"{quiet} equals the source")

    # ---------------------------------------------------------------------------------------
    # (b) The build under test reads the old store, before any new receiver touched it.
    env.ferry = NEW
    said_migrate = []  # (who, lines mentioning a migration)

    def note(who, text):
        lines = migration_lines(text)
        if lines:
            said_migrate.append((who, lines))
            ft.log(f"{who} mentions a migration: {lines}")
            ft.check(any(store in l or GROUP in l for l in lines),
                     f"{who}: a migration must be logged with the store ({store}) or the group "
                     f"({GROUP}) it concerns: {lines}")

    r = env.run(["points", "--store", store, "--group", GROUP, "--json"], check_rc=0)
    note("new points", r.err)
    ft.check_eq(summary(json.loads(r.out)), summary(old_points),
                "the new binary's points of the old store")
    for (rp, d), image in sorted(ref.items()):
        out = env.path("restores", "new.img")
        if os.path.exists(out):
            os.unlink(out)
        r = env.run(["restore", "--store", store, "--group", GROUP, "--point", rp, "--disk", d,
                     "--out", out], check_rc=0)
        note(f"new restore of RP {rp} {d}", r.err)
        diff = ft.first_difference(image, out)
        ft.check(not diff, f"new restore of old RP {rp} {d} differs from the old restore: {diff}")
    ft.log(f"(b) new points and restore of all {len(ref)} old images equal the old ones")

    if shutil.which("nbdkit"):
        mid = old_rps[len(old_rps) // 2]
        sock = env.path("export.sock")
        exp = ft.Proc(env, "export", [NEW, "export", "--store", store, "--group", GROUP,
                                      "--disk", "vda", "--point", str(mid), "--socket", sock],
                      env.path("export.log"))
        wait_for("ferry export serving", lambda: ft.check(
            exp.alive(), f"ferry export exited {exp.p.returncode}:\n{exp.log_text()}") or
            "serving" in exp.log_text(), 20, 0.05)
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                            f"nbd+unix:///?socket={sock}", ref[mid, "vda"]],
                           capture_output=True, text=True, timeout=120)
        ft.check(p.returncode == 0, f"qemu-img compare of the export of old RP {mid} and its "
                                    f"reference exited {p.returncode}:\n{p.stdout}{p.stderr}")
        ft.check_eq(exp.terminate(), 0, "ferry export's exit status on SIGTERM")
        note("new export", exp.log_text())
        ft.log(f"(b) export of old RP {mid}: qemu-img compare identical")
    else:
        ft.log("(b) nbdkit not installed: the export check is left out")

    # ---------------------------------------------------------------------------------------
    # (c) The new receiver opens the store; the old source keeps sending to it.
    rx = env.receiver(store, tag="receiver-new")
    old_v, new_v = old_protocol_version(), new_protocol_version()
    env.ferry = OLD
    c_rps, refused = [], None
    for i in range(3):
        write_some(3)
        snaps = hist.snapshot_all(qsd, f"old-to-new-{i}")
        log_mark = len(rx.log_text())
        r = env.run(env.replicate_args(qsd, rx.addr, GROUP, state_dir=state_dir), timeout=180)
        if r.rc == 0:
            rp = int(r.out.strip().splitlines()[-1])
            hist.record(rp, snaps)
            c_rps.append(rp)
            continue
        ft.check(i == 0, f"the old source worked with the new receiver, then failed:\n{r}")
        refused = (r, rx.log_text()[log_mark:])
        break
    env.ferry = NEW
    if refused is None:
        ft.check(c_rps[0] > quiet, f"RP ids grow across the upgrade: {c_rps} after {quiet}")
        pts = hist.verify(rps=c_rps, what="(old source, new receiver) ")
        ft.check_eq(pts[c_rps[0]]["base_rp"], quiet, f"base of RP {c_rps[0]}")
        for rp in c_rps:
            ft.check(not any(d["full"] for d in pts[rp]["disks"]),
                     f"RP {rp} of the old source to the new receiver is incremental: {pts[rp]}")
        ft.log(f"(c) outcome: the old source (protocol {old_v}) keeps replicating to the new "
               f"receiver (protocol {new_v}): RPs {c_rps} equal the source")
    else:
        r, rx_log = refused
        lines = [l for l in rx_log.splitlines() if "version" in l.lower() and
                 re.search(rf"\b{old_v}\b", l) and re.search(rf"\b{new_v}\b", l)]
        ft.check(old_v != new_v and lines,
                 f"the old source failed against the new receiver, but not as a refusal naming "
                 f"both protocol versions ({old_v} and {new_v}):\n{r}\nreceiver log:\n{rx_log}")
        ft.check(r.rc == 1 and "refus" in r.err,
                 f"the refused old source must exit 1 saying it was refused:\n{r}")
        ft.check_eq(sorted(p["rp_id"] for p in env.points(store, GROUP)), old_rps,
                    "points after the refusal")
        ft.log(f"(c) outcome: the new receiver refuses the old source: {lines[0].strip()}; "
               f"the old source says: {r.err.strip().splitlines()[-1]}")

    # ---------------------------------------------------------------------------------------
    # (d) The new source continues, across a restart of the new receiver.
    last = c_rps[-1] if c_rps else quiet
    d_rps = []

    def new_rp(label):
        global last
        write_some(3)
        snaps = hist.snapshot_all(qsd, label)
        rp = env.replicate_once(qsd, rx.addr, GROUP, state_dir=state_dir)
        hist.record(rp, snaps)
        pts = hist.verify(rps=[rp], what=f"({label}) ")
        ft.check_eq(pts[rp]["base_rp"], last, f"base of RP {rp}")
        ft.check(not any(d["full"] for d in pts[rp]["disks"]),
                 f"RP {rp} of the new source is incremental: {pts[rp]}")
        last = rp
        d_rps.append(rp)

    new_rp("new-1")  # the group has surely been opened (and migrated) by this start
    rx.stop()
    rx.restart()
    new_rp("new-2")
    new_rp("new-3")
    rx.stop()

    starts = segments(rx.log_text())
    ft.check_eq(len(starts), 2, "starts of the new receiver")
    for k, text in enumerate(starts):
        note(f"new receiver start {k + 1}", text)
    # One process migrates (the first new receiver start, or a first reader if the design
    # has readers migrate); every later one finds the new layout and says nothing about it.
    who = [w for w, _ in said_migrate]
    ft.check(len(who) <= 1, f"a migration is logged by more than one process: {said_migrate}")
    ft.check(not migration_lines(starts[1]), "the second start of the new receiver must not "
             f"migrate again:\n{migration_lines(starts[1])}")

    # Everything, from the oldest old RP to the newest new one.
    pts = hist.verify(what="(at the end) ")
    ft.check_eq(sorted(pts), sorted(old_rps + c_rps + d_rps), "RPs at the end")
    ft.check_eq({k: v for k, v in summary(pts.values()).items() if k in old_rps},
                summary(old_points), "the old RPs' points at the end")
    for (rp, d), image in sorted(ref.items()):
        env.check_restore(store, GROUP, rp, d, image, "(old RP, at the end) ")
    qsd.stop()
    ft.log(f"upgrade: old RPs {old_rps}, old source -> new receiver "
           f"{'refused' if refused else c_rps}, new RPs {d_rps}; migration "
           f"{'logged by ' + who[0] if who else 'not needed (same layout)'}")
