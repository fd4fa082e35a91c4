"""Ferry: the receiver, one `ferry replicate --once` RP with its counters, a throwaway PKI."""
import datetime, os, re, socket, struct, subprocess, time
from .procs import ROOT, Watch, free_port, log, proc_hwm_mib, reset_hwm, run_child, sh


def make_pki(top):
    """A throwaway PKI (test/tls/make-certs) and a receive.toml letting client-a write any
    group: the material of a mutual TLS run."""
    d = os.path.join(top, "pki")
    if not os.path.exists(os.path.join(d, "ca.pem")):
        sh("bash", os.path.join(ROOT, "test", "tls", "make-certs"), d)
        with open(os.path.join(d, "receive.toml"), "w") as f:
            f.write('[[access]]\nidentity = "uri:spiffe://ferry/source-a"\nwrite = ["*"]\n')
    return d


class Receiver:
    """`ferry receive` on 127.0.0.1, or (netns, host) inside a network namespace on a veth
    address (bench/run --links; plaintext there needs --insecure-plaintext)."""
    def __init__(self, ferry, store, logpath, pki=None, netns=None, host="127.0.0.1"):
        self.port = free_port()
        self.host = host
        self.store = store
        self.logpath = logpath
        tls = []
        if pki:
            tls = ["--tls-cert", os.path.join(pki, "server.pem"), "--tls-key",
                   os.path.join(pki, "server.key"), "--tls-ca", os.path.join(pki, "ca.pem"),
                   "--config", os.path.join(pki, "receive.toml")]
        prefix = ["ip", "netns", "exec", netns] if netns else []
        if netns and not pki:
            tls = ["--insecure-plaintext"]
        self.proc = subprocess.Popen(prefix + [ferry, "receive", "--listen", f"{host}:{self.port}",
                                               "--store", store] + tls, stderr=open(logpath, "w"))
        deadline = time.time() + 10
        while time.time() < deadline:
            if netns:  # not reachable from this namespace: its log says when it listens
                if "listening on" in open(logpath).read():
                    return
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
                continue
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"receiver did not start: {open(logpath).read()[-500:]}")

    @property
    def addr(self):
        return f"{self.host}:{self.port}"

    def wait_applied(self, group, rp_id, timeout=300):
        """Waits until the state file says rp_id is applied; returns the state file's mtime."""
        path = os.path.join(self.store, group, "state")
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                b = open(path, "rb").read()
                if struct.unpack_from("<H", b, 4)[0] >= 2:
                    # Layout 2 (retention): the images move only when retention compacts
                    # (after RP 1, the full copy), on the session after the acknowledgement;
                    # no state field says "done". Done = the receiver idle (its CPU time
                    # still for 0.3 s); the time returned is when it went idle.
                    return self.wait_idle(deadline)
                applied, applying = struct.unpack_from("<QQ", b, 16)
                if applied >= rp_id and applying == 0:
                    return os.stat(path).st_mtime
            except (OSError, struct.error):
                pass
            time.sleep(0.02)
        raise RuntimeError(f"RP {rp_id} not applied after {timeout} s")

    def cpu_s(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_idle(self, deadline):
        last, since = self.cpu_s(), time.time()
        while time.time() < deadline:
            time.sleep(0.1)
            now = self.cpu_s()
            if now != last:
                last, since = now, time.time()
            elif time.time() - since >= 0.3:
                return since
        raise RuntimeError("receiver still busy")

    def ack_time(self, rp_id):
        for line in reversed(open(self.logpath).read().splitlines()):
            if f"RP {rp_id} committed and acknowledged" in line:
                ts = line.split()[0]
                return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%f").timestamp()
        return None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def parse_describe(err):
    d = {}
    m = re.search(r"RP (\d+) \(base (\d+)\).*?([0-9.]+) MB changed \(([0-9.]+) MB data, ([0-9.]+) MB "
                  r"zero[^)]*\).*?capture ([0-9.]+) s, transfer ([0-9.]+) s, commit ([0-9.]+) s.*?(\d+) wire bytes",
                  err, re.S)
    if m:
        d = {"rp_id": int(m[1]), "base_rp": int(m[2]), "changed_mb": float(m[3]),
             "data_mb": float(m[4]), "zero_mb": float(m[5]), "capture_s": float(m[6]),
             "transfer_s": float(m[7]), "commit_s": float(m[8]), "wire_bytes": int(m[9])}
        t = re.search(r"MB on the wire, ([0-9.]+) s \(.*?then finish ([0-9.]+) s", err, re.S)
        if t:
            d["total_s"], d["finish_s"] = float(t[1]), float(t[2])
            # What the RP spent outside capture, transfer, commit and finish: connecting and
            # the handshake, i.e. waiting for the receiver to take the group.
            d["handshake_s"] = max(0.0, d["total_s"] - d["capture_s"] - d["transfer_s"]
                                   - d["commit_s"] - d["finish_s"])
    return d


def ferry_rp(bins, qsd, rcv, state_dir, level, group="bench", pki=None, netns=None):
    """One `ferry replicate --once` RP (from inside `netns` when given: bench/run --links)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    cmd = prefix + [bins["ferry"], "replicate", "--qmp", qsd.qmp, "--disk", "disk0", "--to",
           rcv.addr, "--group", group, "--once", "--state-dir", state_dir,
           "--zstd-level", str(level), "--nbd-socket", qsd.nbd]
    if pki:
        cmd += ["--tls-cert", os.path.join(pki, "client-a.pem"), "--tls-key",
                os.path.join(pki, "client-a.key"), "--tls-ca", os.path.join(pki, "ca.pem")]
    reset_hwm(rcv.proc.pid)
    wq, wr = Watch(qsd.proc.pid), Watch(rcv.proc.pid)
    r = run_child(cmd)
    at_ack = wr.delta()
    d = parse_describe(r["stderr"])
    rp_id = int(r["stdout"].split()[-1])
    try:
        applied_mtime = rcv.wait_applied(group, rp_id, timeout=60)
    except RuntimeError as e:  # reported with the logs, never turned into a figure
        log(f"{e}; replicate said: {r['stderr'].strip()[-400:]}; receiver log tail: "
            f"{open(rcv.logpath).read()[-800:]}")
        applied_mtime = None
    ack = rcv.ack_time(rp_id)
    time.sleep(0.2)  # let the page cache accounting of the last apply writes settle
    after = wr.delta()
    src = wq.delta()
    return {"wall_s": r["wall_s"], "source_cpu_s": r["cpu_s"], "source_peak_rss_mib": r["peak_rss_mib"],
            "receiver_cpu_s": at_ack["cpu_s"], "receiver_cpu_with_apply_s": after["cpu_s"],
            "receiver_peak_rss_mib": proc_hwm_mib(rcv.proc.pid),
            "apply_s": (applied_mtime - ack) if ack and applied_mtime else None,
            "applied": applied_mtime is not None, "rp_id": rp_id,
            "source_read_bytes": src["rchar"], "qemu_cpu_s": src["cpu_s"],
            "wire_bytes": d.get("wire_bytes"), "receiver_write_bytes_at_ack": at_ack["write_bytes"],
            "receiver_write_bytes": after["write_bytes"], "describe": d,
            "log": r["stderr"].strip().splitlines()[-1][:500] if r["stderr"].strip() else ""}
