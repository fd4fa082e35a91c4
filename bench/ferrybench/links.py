"""Shaped links (bench/run --links): the source side and the receiver side in two network
namespaces joined by a veth pair, shaped with a tbf qdisc on each end (this kernel has no
netem), plus unshaped (same namespaces, no qdisc).

    root ns: qemu-storage-daemon (its QMP and NBD unix sockets are files: both sides reach them)
    ferrybench-src-<pid> 10.203.0.1 [fb-s] ==veth== [fb-d] 10.203.0.2 ferrybench-dst-<pid>
      ferry replicate, dirty-copy,                      ferry receive, qemu-nbd (raw replica),
      rsync client, tcp-limit --connect                 rsync daemon, tcp-limit --listen

Per link, every tool moves the same change set C: before each run C is written again through
QEMU (same offsets, same bytes), so QEMU's dirty bitmaps, Ferry and the dirty-extent copy see
exactly C; rsync pushes the image with C onto a copy of the image without it. The seed (Ferry's
full RP, the replicas) goes over the unshaped link and is not a figure here.
"""
import atexit, json, os, re, shutil, signal, subprocess, threading, time

from .ferry import Receiver, ferry_rp
from .procs import GIB, Watch, free_port, log, proc_hwm_mib, reset_hwm, run_child, sh
from .qemu import Qsd

SRC_IP, DST_IP = "10.203.0.1", "10.203.0.2"
SRC_DEV, DST_DEV = "fb-s", "fb-d"
# name -> rate in bit/s (None: no qdisc)
LINKS = {"unshaped": None, "10g": 10e9, "1g": 1e9, "100m": 100e6}
TBF_BURST_S = 0.004        # burst: 4 ms of the rate ...
TBF_MIN_BURST = 128 << 10  # ... and at least 128 KiB, above one 64 KiB GSO packet of the veth
TBF_QUEUE_S = 0.050        # limit: 50 ms of the rate queued before tbf drops


def tbf_params(rate_bps):
    burst = max(int(rate_bps / 8 * TBF_BURST_S), TBF_MIN_BURST)
    limit = max(int(rate_bps / 8 * TBF_QUEUE_S), 2 * burst)
    return {"rate_bit_s": int(rate_bps), "burst_bytes": burst, "limit_bytes": limit}


def _quiet(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def remove_stale():
    """Namespaces of an earlier bench run that died without cleaning up (its pid is gone)."""
    for ns in _quiet("ip", "netns", "list").stdout.split():
        m = re.fullmatch(r"ferrybench-(?:src|dst)-(\d+)", ns)
        if m and not os.path.exists(f"/proc/{m[1]}"):
            _quiet("ip", "netns", "del", ns)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class Netns:
    """Two namespaces and the veth pair; close() removes them (also from atexit and on
    SIGTERM, which is turned into SystemExit so that every `finally` runs; Ctrl-C raises
    KeyboardInterrupt, which does the same)."""

    def __init__(self):
        remove_stale()
        pid = os.getpid()
        self.src, self.dst = f"ferrybench-src-{pid}", f"ferrybench-dst-{pid}"
        self.made = []
        self.shaping = None
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            for ns in (self.src, self.dst):
                sh("ip", "netns", "add", ns)
                self.made.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.src, "link", "add", SRC_DEV, "type", "veth", "peer", "name",
               DST_DEV, "netns", self.dst)
            for ns, dev, ip in ((self.src, SRC_DEV, SRC_IP), (self.dst, DST_DEV, DST_IP)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise

    def exec(self, side):
        return ["ip", "netns", "exec", self.src if side == "src" else self.dst]

    def shape(self, link):
        """tbf on both ends' egress at the link's rate; none for unshaped."""
        rate = LINKS[link]
        for ns, dev in ((self.src, SRC_DEV), (self.dst, DST_DEV)):
            _quiet("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root")
            if rate:
                p = tbf_params(rate)
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                   "rate", f"{p['rate_bit_s']}bit", "burst", str(p["burst_bytes"]), "limit",
                   str(p["limit_bytes"]))
        self.shaping = link
        return tbf_params(rate) if rate else None

    def qdisc(self):
        return _quiet("ip", "netns", "exec", self.src, "tc", "qdisc", "show", "dev",
                      SRC_DEV).stdout.strip()

    def tx_bytes(self):
        """Bytes each end's veth sent (IP packets with their headers)."""
        res = {}
        for side, ns, dev in (("src", self.src, SRC_DEV), ("dst", self.dst, DST_DEV)):
            j = json.loads(_quiet("ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev).stdout)
            res[side] = j[0]["stats64"]["tx"]["bytes"]
        return res

    def close(self):
        for ns in reversed(self.made):
            _quiet("ip", "netns", "del", ns)
        self.made = []


class TreeRss(threading.Thread):
    """Peak of the summed RSS of a process and its descendants, sampled every 50 ms (the rsync
    daemon forks a receiver per connection: no high-water mark of ours covers it)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_kib = pid, 0
        self.stop_ev = threading.Event()

    def tree(self):
        kids = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                    kids.setdefault(ppid, []).append(int(d))
                except (OSError, IndexError, ValueError):
                    pass
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += kids.get(p, [])
        return out

    def run(self):
        while not self.stop_ev.is_set():
            total = 0
            for p in self.tree():
                try:
                    for line in open(f"/proc/{p}/status"):
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                except OSError:
                    pass
            self.peak_kib = max(self.peak_kib, total)
            self.stop_ev.wait(0.05)

    def stop(self):
        self.stop_ev.set()
        self.join()
        return self.peak_kib / 1024


def tcp_check(bins, ns, seconds):
    """tcp-limit across the link: listener in dst, sender in src; what the listener received."""
    port = free_port()
    lst = subprocess.Popen(ns.exec("dst") + [bins["tcp-limit"], "--listen", f"{DST_IP}:{port}"],
                           stdout=subprocess.PIPE, text=True)
    try:
        lst.stdout.readline()  # {"listening": true}
        snd = subprocess.run(ns.exec("src") + [bins["tcp-limit"], "--connect", f"{DST_IP}:{port}",
                                               "--seconds", str(seconds)],
                             capture_output=True, text=True, check=True, timeout=seconds + 60)
        got = json.loads(lst.stdout.readline())
        lst.wait(30)
    finally:
        if lst.poll() is None:
            lst.kill()
            lst.wait()
    got["sent"] = json.loads(snd.stdout)
    return got


class NbdReplica:
    """qemu-nbd in the receiver namespace serving a raw replica over TCP (the bare copy's
    destination)."""

    def __init__(self, ns, path, workdir):
        self.port = free_port()
        self.uri = f"nbd://{DST_IP}:{self.port}/replica"
        logf = open(os.path.join(workdir, "qemu-nbd.log"), "w")
        self.proc = subprocess.Popen(ns.exec("dst") + [
            "qemu-nbd", "-f", "raw", "-x", "replica", "-b", DST_IP, "-p", str(self.port), "-t",
            "--cache=writeback", path], stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while time.time() < deadline:
            r = _quiet(*ns.exec("src"), "nbdinfo", "--size", self.uri)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("qemu-nbd did not come up in the receiver namespace")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


class NsRsyncd:
    """rsync daemon in the receiver namespace."""

    def __init__(self, ns, workdir):
        self.dir = os.path.join(workdir, "rsync-dst")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        conf = os.path.join(workdir, "rsyncd.conf")
        with open(conf, "w") as f:
            f.write(f"pid file = {workdir}/rsyncd.pid\nuse chroot = no\n[bench]\n  path = {self.dir}\n"
                    "  read only = no\n  uid = root\n  gid = root\n")
        self.proc = subprocess.Popen(ns.exec("dst") + [
            "rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={self.port}",
            f"--address={DST_IP}"], stderr=open(os.path.join(workdir, "rsyncd.log"), "w"))
        time.sleep(0.5)
        if self.proc.poll() is not None:
            raise RuntimeError("rsync daemon did not start in the receiver namespace")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def apply_change(bins, qsd, path):
    qsd.export("w", writable=True)
    sh(bins["nbd-apply"], qsd.uri("w"), path, stdout=subprocess.DEVNULL)
    qsd.unexport("w")


def _row(tool, wall, wire, cpu, rss, changed, extra=None):
    r = {"tool": tool, "wall_s": wall, "wire_bytes": wire, "source_cpu_s": cpu,
         "source_cpu_s_per_changed_gib": cpu / (changed / GIB), "receiver_peak_rss_mib": rss}
    if extra:
        r.update(extra)
    return r


def _median_row(rows):
    """The run with the median wall time, with every run's wall time beside it."""
    rows = sorted(rows, key=lambda r: r["wall_s"])
    r = dict(rows[(len(rows) - 1) // 2])
    r["walls_s"] = [x["wall_s"] for x in rows]
    return r


def _bare_copy(bins, ns, link, qsd, replica, change):
    name, path, changed = change
    bitmap = f"link-{link}"
    qsd.q.cmd("block-dirty-bitmap-add", node="disk0", name=bitmap)
    apply_change(bins, qsd, path)
    qsd.q.cmd("block-dirty-bitmap-disable", node="disk0", name=bitmap)
    qsd.export("dirty", bitmap=bitmap)
    sh("sync")  # the flush at its end must not write anything but its own extents
    reset_hwm(replica.proc.pid)
    wq, tx0 = Watch(qsd.proc.pid), ns.tx_bytes()
    r = run_child(ns.exec("src") + [bins["dirty-copy"], qsd.uri("dirty"), bitmap, replica.uri])
    tx = ns.tx_bytes()
    qsd.unexport("dirty")
    qsd.q.cmd("block-dirty-bitmap-remove", node="disk0", name=bitmap)
    src = wq.delta()
    return _row("dirty-extent copy", r["wall_s"], tx["src"] - tx0["src"], r["cpu_s"] + src["cpu_s"],
                proc_hwm_mib(replica.proc.pid), changed,
                {"payload_bytes": json.loads(r["stdout"])["bytes"]})


def _ferry(bins, ns, qsd, rcv, state_dir, change, lv):
    name, path, changed = change
    apply_change(bins, qsd, path)
    sh("sync")
    tx0 = ns.tx_bytes()
    f = ferry_rp(bins, qsd, rcv, state_dir, lv, netns=ns.src)
    tx = ns.tx_bytes()
    return _row(f"Ferry zstd {lv}", f["wall_s"], tx["src"] - tx0["src"],
                f["source_cpu_s"] + f["qemu_cpu_s"], f["receiver_peak_rss_mib"], changed,
                {"level": lv, "ferry_wire_bytes": f["wire_bytes"], "describe": f["describe"]})


def _rsync(ns, rsyncd, old_raw, new_raw, change, z):
    changed = change[2]
    sh("cp", "--sparse=always", "--reflink=auto", old_raw, os.path.join(rsyncd.dir, "disk.raw"))
    sh("sync")
    w, tx0 = Watch(rsyncd.proc.pid), ns.tx_bytes()
    rss = TreeRss(rsyncd.proc.pid)
    rss.start()
    r = run_child(ns.exec("src") + ["rsync", "--inplace", "--no-whole-file", "--fsync", "--stats"]
                  + (["-z"] if z else []) + [new_raw, f"rsync://{DST_IP}:{rsyncd.port}/bench/disk.raw"])
    tx = ns.tx_bytes()
    time.sleep(0.3)  # the daemon reaps its per-connection child
    d = w.delta()
    return _row("rsync -z" if z else "rsync", r["wall_s"], tx["src"] - tx0["src"], r["cpu_s"],
                rss.stop(), changed, {"receiver_cpu_s": d["cpu_s"]})


def run_link(bins, ns, link, qsd, rcv, state_dir, replica, rsyncd, old_raw, new_raw, change,
             levels, tcp_seconds, repeats=1):
    """Every tool over one link; each `repeats` times, the run with the median time kept."""
    shaping = ns.shape(link)
    log(f"link {link}: {ns.qdisc() or 'no qdisc'}")
    res = {"link": link, "tbf": shaping, "qdisc": ns.qdisc(), "change_set": change[0],
           "changed_bytes": change[2], "repeats": repeats, "rows": []}
    res["tcp_limit"] = tcp_check(bins, ns, tcp_seconds)
    log(f"link {link}: tcp-limit {res['tcp_limit']['gbit_s']:.3f} Gbit/s")
    tools = [("dirty-extent copy", lambda: _bare_copy(bins, ns, link, qsd, replica, change))]
    # Ferry at each fixed level (a later `auto` is one more entry of `levels`)
    tools += [(f"Ferry zstd {lv}", lambda lv=lv: _ferry(bins, ns, qsd, rcv, state_dir, change, lv))
              for lv in levels]
    tools += [(n, lambda z=z: _rsync(ns, rsyncd, old_raw, new_raw, change, z))
              for n, z in (("rsync", False), ("rsync -z", True))]
    for name, measure in tools:
        log(f"link {link}: {name}")
        res["rows"].append(_median_row([measure() for _ in range(repeats)]))
    bare = res["rows"][0]["wall_s"]
    for row in res["rows"]:
        row["x_vs_bare"] = bare / row["wall_s"]
    return res


def links_run(bins, top, base_img, change, links, levels, tcp_seconds=3, repeats=1):
    """Every link in `links` (names of LINKS) with the change set `change` (name, path, bytes)."""
    wd = os.path.join(top, "links")
    os.makedirs(wd)
    img = os.path.join(wd, "disk.qcow2")
    sh("cp", "--sparse=always", base_img, img)
    ns = Netns()
    qsd = rcv = replica = rsyncd = None
    out = {"links": [], "topology": f"{SRC_IP} {ns.src} --veth-- {ns.dst} {DST_IP}",
           "tbf": {"burst": f"max({TBF_BURST_S * 1000:.0f} ms of the rate, {TBF_MIN_BURST >> 10} KiB)",
                   "limit": f"max({TBF_QUEUE_S * 1000:.0f} ms of the rate, 2 bursts)",
                   "where": "egress of both veth ends"},
           "virtnbdbackup": "not run per link: it reads the disk through the unix socket of the "
                            "libvirt-run QEMU and writes its backup on the same host; its only "
                            "way across a link is its remote mode (qemu+ssh to a libvirtd), which "
                            "has no receiver in the other namespace here"}
    try:
        qsd = Qsd(wd, img)
        rcv = Receiver(bins["ferry"], os.path.join(wd, "store"), os.path.join(wd, "receive.log"),
                       netns=ns.dst, host=DST_IP)
        state = os.path.join(wd, "state")
        ns.shape("unshaped")
        log("links: seed (Ferry full RP, raw images) over the unshaped link")
        out["seed"] = {k: v for k, v in ferry_rp(bins, qsd, rcv, state, levels[0], netns=ns.src).items()
                       if k in ("wall_s", "wire_bytes")}
        old_raw, new_raw = os.path.join(wd, "old.raw"), os.path.join(wd, "new.raw")
        qsd.export("img")
        sh("nbdcopy", qsd.uri("img"), old_raw)
        replica_path = os.path.join(wd, "replica.raw")
        sh("cp", "--sparse=always", old_raw, replica_path)
        apply_change(bins, qsd, change[1])
        sh("nbdcopy", qsd.uri("img"), new_raw)
        qsd.unexport("img")
        sh("sync")
        replica = NbdReplica(ns, replica_path, wd)
        rsyncd = NsRsyncd(ns, wd)
        for link in links:
            out["links"].append(run_link(bins, ns, link, qsd, rcv, state, replica, rsyncd, old_raw,
                                         new_raw, change, levels, tcp_seconds, repeats))
    finally:
        for p in (rsyncd, replica, rcv, qsd):
            if p:
                try:
                    p.stop()
                except Exception as e:  # noqa: BLE001 - keep cleaning up
                    log(f"stopping {type(p).__name__}: {e}")
        ns.close()
        shutil.rmtree(wd, ignore_errors=True)
    return out
