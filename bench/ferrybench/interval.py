"""Long-lived sources (bench/run, issue 15): the fixed cost of an empty RP and of a 1% RP when
`ferry replicate --interval` keeps running across RPs, next to one `--once` process per RP, the
bare dirty-extent copy of the same 1% change, and how long the first RP after the seed waits for
the receiver (its handshake: the RP's total time minus capture, transfer, commit and finish,
from the source's own RP log line).

In `--interval` mode the figures come from the source's RP log lines (`RP N (base M): ... X s
(...)`): wall per RP is the line's total; CPU per RP is the growth of the process's CPU time
between two lines (it sleeps in between); RSS is read at each line.
"""
import os, re, shutil, statistics, subprocess, time

from .ferry import Receiver, ferry_rp, parse_describe
from .peers import dirty_extent_copy
from .procs import log, proc_cpu, proc_hwm_mib, sh
from .qemu import Qsd

RP_LINE = re.compile(r"^.*RP \d+ \(base \d+\): \d+ disk.*$", re.M)


def _rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _apply(bins, qsd, path):
    qsd.export("w", writable=True)
    sh(bins["nbd-apply"], qsd.uri("w"), path, stdout=subprocess.DEVNULL)
    qsd.unexport("w")


class IntervalSource:
    """`ferry replicate --interval S` running in the background; next_rp() waits for its next
    RP log line and returns it with the process's CPU and RSS at that moment."""

    def __init__(self, bins, qsd, rcv, state_dir, level, interval_s, logpath):
        self.logpath = logpath
        self.seen = 0
        self.proc = subprocess.Popen(
            [bins["ferry"], "replicate", "--qmp", qsd.qmp, "--disk", "disk0", "--to", rcv.addr,
             "--group", "bench", "--interval", str(interval_s), "--state-dir", state_dir,
             "--zstd-level", str(level), "--nbd-socket", qsd.nbd],
            stdout=subprocess.DEVNULL, stderr=open(logpath, "w"))
        self.cpu_last = 0.0

    def next_rp(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            lines = RP_LINE.findall(open(self.logpath).read())
            if len(lines) > self.seen:
                cpu = proc_cpu(self.proc.pid, children=False)
                rss = _rss_mib(self.proc.pid)
                line = lines[self.seen]
                self.seen += 1
                d = parse_describe(line)
                res = {"total_s": d.get("total_s"), "changed_mb": d.get("changed_mb"),
                       "handshake_s": d.get("handshake_s"), "cpu_s": cpu - self.cpu_last,
                       "rss_mib": rss, "line": line[:300]}
                self.cpu_last = cpu
                return res
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferry replicate --interval exited: {open(self.logpath).read()[-800:]}")
            time.sleep(0.01)
        raise RuntimeError(f"no RP line in {timeout} s: {open(self.logpath).read()[-800:]}")

    def stop(self):
        peak = proc_hwm_mib(self.proc.pid) if self.proc.poll() is None else None
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return peak


def _med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def interval_run(bins, top, base_img, one_pct, level, interval_s=3.0, repeats=3):
    """one_pct: (name, path, bytes) of the 1% change set."""
    name, path, changed = one_pct
    wd = os.path.join(top, "interval")
    os.makedirs(wd)
    img = os.path.join(wd, "disk.qcow2")
    sh("cp", "--sparse=always", base_img, img)
    qsd = Qsd(wd, img)
    rcv = Receiver(bins["ferry"], os.path.join(wd, "store"), os.path.join(wd, "receive.log"))
    state = os.path.join(wd, "state")
    res = {"change_set": name, "changed_bytes": changed, "interval_s": interval_s,
           "repeats": repeats, "zstd_level": level}
    src = None
    try:
        log("long-lived: seed, then at once the first RP after it")
        first = _seed_then_empty(bins, qsd, rcv, state, level)
        res["first_after_seed"] = first
        log(f"long-lived: seed {first['seed_wall_s']:.2f} s, next RP waited {first['handshake_s']:.2f} s")
        rcv.wait_idle(time.time() + 300)

        log("long-lived: --once, empty and 1% RPs")
        once_empty = [ferry_rp(bins, qsd, rcv, state, level) for _ in range(repeats)]
        once_1 = []
        for _ in range(repeats):
            _apply(bins, qsd, path)
            once_1.append(ferry_rp(bins, qsd, rcv, state, level))

        log("long-lived: bare dirty-extent copy of the 1% change set")
        bare = []
        dest = os.path.join(wd, "dirty-dest.raw")
        for i in range(repeats):
            bm = f"lived-{i}"
            qsd.q.cmd("block-dirty-bitmap-add", node="disk0", name=bm)
            _apply(bins, qsd, path)
            qsd.q.cmd("block-dirty-bitmap-disable", node="disk0", name=bm)
            bare.append(dirty_extent_copy(bins, qsd, bm, dest))
            qsd.q.cmd("block-dirty-bitmap-remove", node="disk0", name=bm)
        os.unlink(dest)

        log(f"long-lived: ferry replicate --interval {interval_s:g}")
        src = IntervalSource(bins, qsd, rcv, state, level, interval_s, os.path.join(wd, "interval.log"))
        src.next_rp()  # warm-up: it carries the bare copies' writes
        iv_empty = [src.next_rp() for _ in range(repeats)]
        iv_1 = []
        for _ in range(repeats):
            _apply(bins, qsd, path)  # lands between two RPs (the tick follows the previous RP)
            iv_1.append(src.next_rp())
        res["interval_peak_rss_mib"] = src.stop()
        src = None

        def once_row(rows):
            return {"wall_s": _med(rows, "wall_s"),
                    "rp_total_s": statistics.median(r["describe"].get("total_s", 0) for r in rows),
                    "cpu_s": statistics.median(r["source_cpu_s"] for r in rows),
                    "rss_mib": max(r["source_peak_rss_mib"] for r in rows),
                    "changed_mb": statistics.median(r["describe"].get("changed_mb", 0) for r in rows),
                    "receiver_rss_mib": max(r["receiver_peak_rss_mib"] for r in rows)}

        def iv_row(rows):
            return {"wall_s": _med(rows, "total_s"), "rp_total_s": _med(rows, "total_s"),
                    "cpu_s": _med(rows, "cpu_s"), "rss_mib": max(r["rss_mib"] for r in rows),
                    "changed_mb": _med(rows, "changed_mb"), "samples": rows}

        res["rows"] = {"once_empty": once_row(once_empty), "once_1pct": once_row(once_1),
                       "interval_empty": iv_row(iv_empty), "interval_1pct": iv_row(iv_1),
                       "bare_1pct": {"wall_s": statistics.median(b["wall_s"] for b in bare),
                                     "cpu_s": statistics.median(b["cpu_s"] + b["qemu_cpu_s"] for b in bare),
                                     "rss_mib": max(b["peak_rss_mib"] for b in bare)}}
        res["receiver_peak_rss_mib"] = proc_hwm_mib(rcv.proc.pid)
    finally:
        if src:
            src.stop()
        rcv.stop()
        qsd.stop()
        shutil.rmtree(wd, ignore_errors=True)
    return res


def _seed_then_empty(bins, qsd, rcv, state, level):
    """The seed with --once, then an empty RP started the moment the seed's process returns
    (its ack): the second RP's handshake waits while the receiver still works on the seed."""
    base = [bins["ferry"], "replicate", "--qmp", qsd.qmp, "--disk", "disk0", "--to", rcv.addr,
            "--group", "bench", "--once", "--state-dir", state, "--zstd-level", str(level),
            "--nbd-socket", qsd.nbd]
    t0 = time.monotonic()
    a = subprocess.run(base, capture_output=True, text=True, check=True)
    t1 = time.monotonic()
    b = subprocess.run(base, capture_output=True, text=True, check=True)
    t2 = time.monotonic()
    da, db = parse_describe(a.stderr), parse_describe(b.stderr)
    return {"seed_wall_s": t1 - t0, "seed_changed_mb": da.get("changed_mb"),
            "next_wall_s": t2 - t1, "handshake_s": db.get("handshake_s"),
            "next_total_s": db.get("total_s"), "next_line": b.stderr.strip().splitlines()[-1][:300]}
