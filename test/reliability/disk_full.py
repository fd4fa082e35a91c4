#!/usr/bin/env python3
"""The receiver's volume fills up mid-transfer, then space returns (C2, C6).

The store lives on a small ext4 file system on a loop device (image under /var/tmp; unmounted,
detached and removed on any exit). `ferry replicate --interval 1` runs all along while a writer
thread keeps writing single self-validating 4 KiB blocks (the catalog marks a state after every
write, so every RP must equal one of those states). Per episode, at a seeded moment, a balloon
file takes all free space. While it is full, for FULL_S seconds:
  * no new RP commits (nothing is acknowledged that is not durable);
  * the receiver names the cause once per episode: at most MAX_NOSPACE_ERRORS error lines
    naming no-space (the failure as the store saw it and as the session refused the RP), not
    one per retry of the source;
  * its CPU time over the period stays low (no busy loop);
  * the last committed RP still restores equal to a catalog state.
Then the balloon goes and a new RP must commit within RESUME_BOUND_S without an operator, and
the receiver logs exactly one "storage resumed" line (info) for the episode.
At the end the writer stops and the next RP equals the source exactly.
Figure: "E episodes, 0 violations, resume time after space returns p50/max"."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402
from oracle import ft  # noqa: E402

TEST = "disk-full"
GROUP = "df"
SIZE = 16 * ft.MiB
REGION_BLOCKS = 512          # writes stay in the first 2 MiB: the journal grows slowly
FULL_S = 8.0
RESUME_BOUND_S = 60.0
MAX_CPU_SHARE = 0.25         # of one core, while full
NOSPACE = re.compile(r"no space|ENOSPC|space left", re.I)
ERROR_LINE = re.compile(r"^\S+ \S+ error: ")   # "<time> receive error: ..." (ferrytest log)
RESUMED = re.compile(r" info: group '[^']+': storage resumed: ")
MAX_NOSPACE_ERRORS = 2


def log_since(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(path):
    """A balloon that takes every free byte of the file system holding `path`."""
    with open(path, "wb") as f:
        st = os.statvfs(os.path.dirname(path))
        want = st.f_bavail * st.f_frsize
        while want >= 4096:
            try:
                os.posix_fallocate(f.fileno(), f.seek(0, 2), want)
                f.seek(0, 2)
            except OSError:
                want //= 2
                continue
            st = os.statvfs(os.path.dirname(path))
            want = st.f_bavail * st.f_frsize
        try:
            while True:
                f.write(b"\xff" * 4096)
                f.flush()
        except OSError:
            pass
    return os.path.getsize(path)


with ft.Env(TEST) as env:
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if not shutil.which(tool):
            raise ft.Skip(f"{tool} not installed")
    rng = env.rng
    t_start = time.monotonic()
    img = f"/var/tmp/ferry-diskfull-{os.getpid()}.img"
    mnt = env.path("mnt", ".")[:-2]
    with open(img, "wb") as f:
        f.truncate((96 if not ft.LONG else 192) * ft.MiB)

    loop = None

    def teardown():
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        if os.path.exists(img):
            os.unlink(img)
    env.on_cleanup(teardown)
    try:
        loop = sh("losetup", "-f", "--show", img)
    except subprocess.CalledProcessError as e:
        raise ft.Skip(f"no loop device: {e.stderr}")
    sh("mkfs.ext4", "-q", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
    sh("mount", loop, mnt)
    ft.log(f"store volume: {img} on {loop} at {mnt}")

    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2")])
    disks = {"vda": (0, SIZE)}
    wr, cat = oracle.Writer(env.seed, disks), oracle.Catalog(env.seed, disks)
    lock = threading.Lock()
    stop_writer = threading.Event()
    writer_error = []

    def writer():
        r = ft.random.Random(env.seed + 1)
        try:
            while not stop_writer.is_set():
                with lock:
                    b = r.randrange(REGION_BLOCKS)
                    if r.random() < 0.1:
                        wr.zero_blocks(qsd, "vda", b, 1)
                    else:
                        wr.write_blocks(qsd, "vda", b, 1)
                    cat.mark(wr)
                time.sleep(0.2)
        except Exception as e:  # reported by the main thread
            writer_error.append(repr(e))

    store = os.path.join(mnt, "store")
    rx = env.receiver(store=store)
    args = env.replicate_args(qsd, rx.addr, GROUP)
    args[args.index("--once")] = "--interval"
    args.insert(args.index("--interval") + 1, "1")
    th = threading.Thread(target=writer, daemon=True)
    th.start()
    rep = ft.Proc(env, "replicate", [env.ferry] + args, env.path("replicate.log"))
    violations, resume_s, episodes, nospace_lines, cpu_shares = [], [], 0, [], []
    nospace_errors, resumed_lines = [], []

    def points():
        r = env.run(["points", "--store", store, "--group", GROUP, "--json"], timeout=60)
        return [p["rp_id"] for p in ft.json.loads(r.out)] if r.rc == 0 else []

    def wait_new_rp(after, bound):
        t0 = time.monotonic()
        while time.monotonic() - t0 < bound:
            ids = points()
            if ids and ids[-1] > after:
                return ids[-1], time.monotonic() - t0
            ft.check(rep.alive(), f"replicate --interval exited:\n{ft.tail(rep.log_path)}")
            time.sleep(0.2)
        return None, None

    def check_rp(rp, what):
        out = env.restore(store, GROUP, rp, "vda")
        with lock:
            v = cat.check({"vda": out})
        os.unlink(out)
        if not v.equals_states:
            violations.append(f"{what}: RP {rp} {v.describe()}")

    first, _ = wait_new_rp(0, 120)
    ft.check(first is not None, "no first RP within 120 s")
    n_episodes = 2 if not ft.LONG else 6
    for ep in range(n_episodes):
        time.sleep(rng.uniform(0.1, 2.5))  # a different moment of the RP cycle each time
        balloon = os.path.join(mnt, f"balloon-{ep}")
        log_at = os.path.getsize(rx.log_path)
        size = fill(balloon)
        ft.log(f"episode {ep}: balloon of {size} bytes; volume full")
        time.sleep(3)  # an RP whose journal bytes were already allocated may still commit
        before = points()
        cpu0, t0 = cpu_seconds(rx.proc.pid), time.monotonic()
        time.sleep(FULL_S)
        cpu = cpu_seconds(rx.proc.pid) - cpu0
        share = cpu / (time.monotonic() - t0)
        cpu_shares.append(round(share, 3))
        during = points()
        new_log = log_since(rx.log_path, log_at)
        n_lines = sum(1 for line in new_log.splitlines() if NOSPACE.search(line))
        nospace_lines.append(n_lines)
        ft.log(f"episode {ep}: while full: points {before[-3:]} -> {during[-3:]}, receiver CPU "
               f"{share:.1%}, {n_lines} log lines naming no-space")
        if during != before:
            violations.append(f"episode {ep}: RP(s) {sorted(set(during) - set(before))} "
                              f"committed while the volume was full")
        if n_lines == 0:
            violations.append(f"episode {ep}: the receiver never named the lack of space")
        if n_lines > 5 + FULL_S + 3:  # one per refused session at most (--interval 1)
            violations.append(f"episode {ep}: {n_lines} no-space log lines in {FULL_S + 3}s")
        if share > MAX_CPU_SHARE:
            violations.append(f"episode {ep}: receiver used {share:.0%} CPU while full")
        if not rx.alive():
            violations.append(f"episode {ep}: the receiver died:\n{ft.tail(rx.log_path)}")
            break
        if during:
            check_rp(during[-1], f"episode {ep}, while full")
        os.unlink(balloon)
        rp, took = wait_new_rp(during[-1] if during else 0, RESUME_BOUND_S)
        if rp is None:
            violations.append(f"episode {ep}: no RP within {RESUME_BOUND_S}s after space came "
                              f"back:\n{ft.tail(rx.log_path)}")
            break
        resume_s.append(took)
        ft.log(f"episode {ep}: RP {rp} committed {took:.1f}s after space came back")
        check_rp(rp, f"episode {ep}, after space came back")
        # The whole episode's log: the cause once, at error level; then one "resumed" line.
        ep_log = log_since(rx.log_path, log_at).splitlines()
        errs = [l for l in ep_log if ERROR_LINE.search(l) and NOSPACE.search(l)]
        resumed = [l for l in ep_log if RESUMED.search(l)]
        nospace_errors.append(len(errs))
        resumed_lines.append(len(resumed))
        ft.log(f"episode {ep}: {len(errs)} error lines naming no-space, {len(resumed)} "
               f"'storage resumed' lines")
        if len(errs) > MAX_NOSPACE_ERRORS:
            violations.append(f"episode {ep}: {len(errs)} error lines naming no-space (at most "
                              f"{MAX_NOSPACE_ERRORS} per episode):\n" + "\n".join(errs[:6]))
        if len(resumed) != 1:
            violations.append(f"episode {ep}: {len(resumed)} 'storage resumed' lines (1 "
                              f"expected)")
        episodes += 1

    # Quiet source: the next RP equals it exactly.
    stop_writer.set()
    th.join(10)
    ft.check(not writer_error, f"writer failed: {writer_error}")
    with lock:
        final = cat.mark(wr, "final")
    last = points()[-1]
    rp, _ = wait_new_rp(last, 60)
    ft.check(rp is not None, "no RP after the writer stopped")
    out = env.restore(store, GROUP, rp, "vda")
    v = cat.check({"vda": out})
    if final not in v.equals_states:
        # an RP captured before the final mark may still be in flight: take the next one
        rp, _ = wait_new_rp(rp, 60)
        out = env.restore(store, GROUP, rp, "vda")
        v = cat.check({"vda": out})
    if final not in v.equals_states:
        violations.append(f"final RP {rp} is not the quiet source: {v.describe()}")
    rep.terminate(30)
    qsd.stop()
    rx.stop()
    for line in violations:
        ft.log(f"VIOLATION {line}")
    p50 = sorted(resume_s)[len(resume_s) // 2] if resume_s else None
    mx = max(resume_s) if resume_s else None
    figure = (f"{episodes} episodes, {len(violations)} violations, resume time after space "
              f"returns p50/max {p50 or 0:.1f}/{mx or 0:.1f} s")
    oracle.write_figure(TEST, figure, seed=env.seed, iterations=n_episodes,
                        faults_injected=n_episodes, violations=len(violations),
                        duration_s=round(time.monotonic() - t_start, 1),
                        resume_s=[round(x, 2) for x in resume_s],
                        nospace_log_lines=nospace_lines, nospace_error_lines=nospace_errors,
                        resumed_lines=resumed_lines, receiver_cpu_share_while_full=cpu_shares,
                        violation_texts=violations[:5])
    ft.check(not violations, f"{len(violations)} violations: {violations}")
