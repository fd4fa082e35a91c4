"""The peers: nbdcopy of the whole disk, the bare dirty-extent copy, rsync through its daemon,
virtnbdbackup."""
import json, os, re, socket, subprocess, time
from .procs import Watch, free_port, run_child


def peer_result(r, src=None, wire=None, write_bytes=None, extra=None):
    res = {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss_mib": r["peak_rss_mib"],
           "write_bytes": r["write_bytes"] if write_bytes is None else write_bytes}
    if src:
        res["source_read_bytes"] = src["rchar"]
        res["qemu_cpu_s"] = src["cpu_s"]
        # NBD over a unix socket: QEMU sends with sendmsg, which /proc/PID/io does not count,
        # so the payload is taken as what QEMU read from the image to serve it (block status
        # lets the tools skip holes and zeros without reads); marked as such in the report.
        res["wire_bytes"] = src["rchar"] if wire is None else wire
        res["wire_is_nbd_payload_from_reads"] = wire is None
    elif wire is not None:
        res["wire_bytes"] = wire
    if extra:
        res.update(extra)
    return res


def nbdcopy_whole(qsd, dest):
    qsd.export("img")
    w = Watch(qsd.proc.pid)
    r = run_child(["nbdcopy", "--flush", qsd.uri("img"), dest])
    src = w.delta()
    qsd.unexport("img")
    return peer_result(r, src)


def dirty_extent_copy(bins, qsd, bitmap, dest):
    qsd.export("dirty", bitmap=bitmap)
    w = Watch(qsd.proc.pid)
    r = run_child([bins["dirty-copy"], qsd.uri("dirty"), bitmap, dest])
    src = w.delta()
    qsd.unexport("dirty")
    copied = json.loads(r["stdout"])
    return peer_result(r, src, wire=copied["bytes"], extra=copied)


class RsyncDaemon:
    def __init__(self, workdir):
        self.dir = os.path.join(workdir, "rsync-dst")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        conf = os.path.join(workdir, "rsyncd.conf")
        with open(conf, "w") as f:
            f.write(f"pid file = {workdir}/rsyncd.pid\nuse chroot = no\n[bench]\n  path = {self.dir}\n"
                    "  read only = no\n  uid = root\n  gid = root\n")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                      f"--port={self.port}", "--address=127.0.0.1"],
                                     stderr=open(os.path.join(workdir, "rsyncd.log"), "w"))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsync daemon did not start")

    def push(self, src):
        w = Watch(self.proc.pid)
        r = run_child(["rsync", "--inplace", "--no-whole-file", "--fsync", "--stats", src,
                       f"rsync://127.0.0.1:{self.port}/bench/disk.raw"])
        time.sleep(0.3)  # the daemon reaps its per-connection child: its counters join the daemon's
        d = w.delta()
        sent = re.search(r"Total bytes sent: ([\d,]+)", r["stdout"])
        recv = re.search(r"Total bytes received: ([\d,]+)", r["stdout"])
        wire = (int(sent[1].replace(",", "")) + int(recv[1].replace(",", ""))) if sent and recv else None
        res = peer_result(r, wire=wire, write_bytes=d["write_bytes"],
                          extra={"daemon_cpu_s": d["cpu_s"], "source_read_bytes": r["rchar"]})
        return res

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def virtnbdbackup(dom, level, outdir, compress):
    cmd = ["virtnbdbackup", "-d", dom.name, "-l", level, "-o", outdir, "-n",
           "-f", os.path.join(os.path.dirname(outdir), f"{dom.name}-vnb.sock")]
    if compress:
        cmd.append("-z")
    w = Watch(dom.pid)
    r = run_child(cmd)
    src = w.delta()
    return peer_result(r, src)
