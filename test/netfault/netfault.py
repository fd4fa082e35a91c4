"""netfault: network-fault harness for Ferry (docs/netfault.md).

Three namespaces joined through a router, the real `ferry receive` in dst, the real `ferry
replicate --interval 1` in src (qemu-storage-daemon in the root namespace; its QMP and NBD
unix sockets live in the file system, so src reaches them), a workload writing through the
FUSE export. Faults are nftables rules in the router's forward chain (this kernel has no
netem) or a userspace delay relay (relay.py) in the router namespace.

    src 10.201.0.2 --veth-- 10.201.0.1 rtr 10.202.0.1 --veth-- 10.202.0.2 dst

After each scenario the faults stop and the checks run:
  V1 convergence: a committed RP captured after the last write equals the source, within
     CONVERGE_BOUND_S of the end of the fault;
  V2 no duplicate apply: committed RP ids strictly increase and each RP's base is the RP
     before it (`ferry points --json`);
  V3 the replica image equals exactly one committed RP (the oldest kept: layout 2's base);
  V4 re-sent bytes: bytes forwarded src->dst (nft counter after the fault rules, so what the
     receiver read) minus the bytes of the RPs committed during the scenario stay within
     (new sessions) x (in-flight window + largest RP) + framing slack.
Any violation raises TestFailure (exit 1); a machine without ip/nft/namespaces skips (77).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import ferrytest as ft  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SRC_IP, RTR_SRC_IP, RTR_DST_IP, DST_IP = "10.201.0.2", "10.201.0.1", "10.202.0.1", "10.202.0.2"
RX_PORT, RELAY_PORT = 7700, 7701
TABLE = "ferrynf"
# The sender's in-flight window: read buffers (SenderOptions::max_buffer_bytes, 16 MiB) plus
# the kernel's socket send buffer (tcp_wmem max of src, read at run time).
SENDER_BUFFER_BYTES = 16 << 20
# The engine's silent-peer bound (docs/wire-protocol.md: dead_peer_timeout 60 s) + an RP
# interval + a transfer: the longest a stuck connection may hold replication after a fault.
CONVERGE_BOUND_S = float(os.environ.get("FERRY_NETFAULT_CONVERGE_S", "150"))
IP_TCP_HEADER_BYTES = 52  # IPv4 20 + TCP 20 + timestamps 12 (Linux default)


def sh(*argv, check=True, timeout=30):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise ft.TestFailure(f"`{' '.join(map(str, argv))}` exited {p.returncode}: "
                             f"{p.stderr.strip()}")
    return p


def require_net():
    for tool in ("ip", "nft"):
        if not shutil.which(tool):
            raise ft.Skip(f"{tool} not installed")
    if os.geteuid() != 0:
        raise ft.Skip("network namespaces need root")


class Topology:
    """ferry-src-<id>, ferry-rtr-<id>, ferry-dst-<id>; removed by close() even on failure."""

    def __init__(self, ident):
        self.src, self.rtr, self.dst = (f"ferry-{r}-{ident}" for r in ("src", "rtr", "dst"))
        self.made = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self):
        try:
            for ns in (self.src, self.rtr, self.dst):
                sh("ip", "netns", "add", ns)
                self.made.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        except ft.TestFailure as e:
            self.close()
            raise ft.Skip(f"cannot create network namespaces here: {e}")
        sh("ip", "-n", self.src, "link", "add", "s0", "type", "veth", "peer", "name", "rs",
           "netns", self.rtr)
        sh("ip", "-n", self.dst, "link", "add", "d0", "type", "veth", "peer", "name", "rd",
           "netns", self.rtr)
        for ns, dev, addr in ((self.src, "s0", SRC_IP), (self.rtr, "rs", RTR_SRC_IP),
                              (self.rtr, "rd", RTR_DST_IP), (self.dst, "d0", DST_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.src, "route", "add", "default", "via", RTR_SRC_IP)
        sh("ip", "-n", self.dst, "route", "add", "default", "via", RTR_DST_IP)
        sh("ip", "netns", "exec", self.rtr, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.nft(f"add table inet {TABLE}\n"
                 f"add counter inet {TABLE} s2d\n"
                 f"add counter inet {TABLE} d2s\n"
                 f"add chain inet {TABLE} faults\n"
                 f"add chain inet {TABLE} through {{ type filter hook forward priority 0; "
                 f"policy accept; }}\n"
                 f"add rule inet {TABLE} through jump faults\n"
                 f'add rule inet {TABLE} through iifname "rs" counter name s2d\n'
                 f'add rule inet {TABLE} through iifname "rd" counter name d2s\n'
                 # The delay relay terminates src's connection in the router: count its input.
                 f"add chain inet {TABLE} arrive {{ type filter hook input priority 0; "
                 f"policy accept; }}\n"
                 f'add rule inet {TABLE} arrive iifname "rs" tcp dport {RELAY_PORT} '
                 f"counter name s2d\n")
        wmem = sh("ip", "netns", "exec", self.src, "cat", "/proc/sys/net/ipv4/tcp_wmem").stdout
        self.tcp_wmem_max = int(wmem.split()[2])

    def nft(self, script):
        p = subprocess.run(["ip", "netns", "exec", self.rtr, "nft", "-f", "-"], input=script,
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise ft.TestFailure(f"nft failed: {p.stderr.strip()}\n{script}")

    def set_faults(self, rules):
        """Replaces the fault rules (a list of nft rule bodies) atomically."""
        body = "".join(f"add rule inet {TABLE} faults {r}\n" for r in rules)
        self.nft(f"flush chain inet {TABLE} faults\n{body}")

    def counters(self, reset=False):
        verb = "reset" if reset else "list"
        out = {}
        for name in ("s2d", "d2s"):
            p = sh("ip", "netns", "exec", self.rtr, "nft", "-j", verb, "counter", "inet", TABLE,
                   name)
            for item in json.loads(p.stdout)["nftables"]:
                if "counter" in item:
                    out[name] = (item["counter"]["packets"], item["counter"]["bytes"])
        return out

    def close(self):
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []


class Writer:
    """The workload: self-validating random writes through the FUSE export, in a thread."""

    def __init__(self, qsd, wl, disk, period_s=0.25, max_len=128 * ft.KiB):
        self.qsd, self.wl, self.disk = qsd, wl, disk
        self.period_s, self.max_len = period_s, max_len
        self.stop_ev = threading.Event()
        self.error = None
        self.thread = None

    def start(self):
        self.stop_ev.clear()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop_ev.wait(self.period_s):
                self.wl.random_writes(self.qsd, self.disk, 1, min_len=4096, max_len=self.max_len,
                                      align=4096)
        except Exception as e:  # surfaced by stop()
            self.error = e

    def stop(self):
        self.stop_ev.set()
        if self.thread:
            self.thread.join(timeout=30)
            ft.check(not self.thread.is_alive(), "workload thread did not stop in 30 s")
        if self.error:
            raise ft.TestFailure(f"workload failed: {self.error}")


class Harness:
    def __init__(self, env, disk_bytes=64 * ft.MiB):
        self.env = env
        self.topo = Topology(os.getpid())
        env.on_cleanup(self.topo.close)
        self.qsd = env.qsd([ft.Disk("vda", disk_bytes)])
        self.disk = self.qsd.disks[0]
        self.store = env.path("store")
        os.makedirs(self.store, exist_ok=True)
        self.group = "nf"
        self.state_dir = env.path("state")
        os.makedirs(self.state_dir, exist_ok=True)
        self.wl = env.workload()
        self.writer = Writer(self.qsd, self.wl, self.disk)
        self.rx = self._start_receiver()
        probe = sh("ip", "netns", "exec", self.topo.src, sys.executable, "-c",
                   f"import socket; socket.create_connection(('{DST_IP}', {RX_PORT}), 5).close()",
                   check=False)
        ft.check(probe.returncode == 0,
                 f"src cannot reach the receiver through the router: {probe.stderr.strip()}")
        self.rep = None
        self.relay = None
        self.results = []

    # -- processes --

    def _start_receiver(self):
        log = os.path.join(self.env.dir, "receiver.log")
        # Mutual TLS (the harness's PKI and access map); the relay passes TLS records through
        # as opaque bytes. Without TLS (FERRY_TLS=0) the non-loopback listen needs
        # --insecure-plaintext.
        extra = (self.env.tls_receiver_args([], "receiver") if self.env.tls
                 else ["--insecure-plaintext"])
        p = ft.Proc(self.env, "receiver", ["ip", "netns", "exec", self.topo.dst, self.env.ferry,
                    "receive", "--listen", f"{DST_IP}:{RX_PORT}", "--store", self.store] + extra,
                    log)
        deadline = time.monotonic() + 20
        while f"listening on {DST_IP}:{RX_PORT} with store" not in ft.tail(log):
            ft.check(p.alive(), f"receiver exited at start:\n{ft.tail(log)}")
            ft.check(time.monotonic() < deadline, f"receiver not listening:\n{ft.tail(log)}")
            time.sleep(0.1)
        return p

    def start_replicate(self, to=f"{DST_IP}:{RX_PORT}"):
        args = ["replicate", "--qmp", self.qsd.qmp_path, "--disk", self.disk.spec, "--to", to,
                "--group", self.group, "--interval", "1", "--state-dir", self.state_dir]
        # The receiver's certificate names localhost and loopback addresses, not DST_IP.
        args += self.env.tls_client_args(server_name="localhost")
        self.rep = ft.Proc(self.env, "replicate", ["ip", "netns", "exec", self.topo.src,
                           self.env.ferry] + args, os.path.join(self.env.dir, "replicate.log"))

    def stop_replicate(self):
        """SIGTERM must stop `replicate --interval` within 60 s, even mid-fault-recovery."""
        t0 = time.monotonic()
        rc = self.rep.terminate(timeout=60)
        ft.log(f"replicate stopped: exit {rc} after {time.monotonic() - t0:.1f}s")
        ft.check(rc is not None, "replicate did not stop within 60 s of SIGTERM (hang)")

    def start_relay(self, delay_ms, jitter_ms):
        argv = ["ip", "netns", "exec", self.topo.rtr, sys.executable,
                os.path.join(HERE, "relay.py"), f"{RTR_SRC_IP}:{RELAY_PORT}",
                f"{DST_IP}:{RX_PORT}", str(delay_ms), str(jitter_ms), str(self.env.seed), "900"]
        self.relay = ft.Proc(self.env, "relay", argv, os.path.join(self.env.dir, "relay.log"))
        deadline = time.monotonic() + 10
        while "ready" not in ft.tail(self.relay.log_path):
            ft.check(self.relay.alive() and time.monotonic() < deadline, "relay did not start")
            time.sleep(0.1)

    def stop_relay(self):
        if self.relay:
            self.relay.terminate(timeout=10)
            self.relay = None

    # -- observations --

    def points(self):
        return self.env.points(self.store, self.group)

    def sessions(self):
        text = ft.tail(os.path.join(self.env.dir, "receiver.log"), 10 ** 8)
        return text.count(f"for group '{self.group}'")

    def check_chain(self, pts, what):
        """V2: strictly increasing ids, each base the RP before (no RP applied twice)."""
        for i, p in enumerate(pts):
            if i == 0:
                continue
            prev = pts[i - 1]["rp_id"]
            ft.check(p["rp_id"] > prev, f"{what}: RP ids not increasing: {prev} then {p['rp_id']}")
            ft.check(p["base_rp"] == prev,
                     f"{what}: RP {p['rp_id']} has base {p['base_rp']}, not the RP before "
                     f"({prev}): an RP applied twice or skipped")

    def wait_converged(self, after_ns, t_fault_end, what):
        """V1: waits for a committed RP captured after `after_ns` (the last write)."""
        while True:
            pts = self.points()
            fresh = [p for p in pts if p["created_unix_ns"] > after_ns]
            if fresh:
                return pts, fresh[0], time.monotonic() - t_fault_end
            if time.monotonic() - t_fault_end > CONVERGE_BOUND_S:
                raise ft.TestFailure(
                    f"{what}: no RP captured after the faults stopped within {CONVERGE_BOUND_S:.0f}"
                    f" s (last points {[p['rp_id'] for p in pts[-3:]]}); replicate log:\n"
                    f"{ft.tail(self.rep.log_path, 3000)}\nreceiver log:\n"
                    f"{ft.tail(os.path.join(self.env.dir, 'receiver.log'), 3000)}")
            ft.check(self.rx.alive(), f"{what}: receiver died:\n{ft.tail(self.rx.log_path)}")
            time.sleep(0.5)

    def check_replica(self, pts, what):
        """V3: with replicate stopped, the replica images hold the oldest kept RP (layout 2:
        the base retention compacts into), equal to its restore, and the newest RP restores."""
        base = pts[0]["rp_id"]
        image = os.path.join(self.store, self.group, "replica", f"{self.disk.name}.img")
        restored = self.env.restore(self.store, self.group, base, self.disk.name)
        diff = None
        for _ in range(20):  # compaction follows the commit; give it a moment
            diff = ft.first_difference(image, restored)
            if not diff:
                break
            time.sleep(0.5)
        os.unlink(restored)
        ft.check(not diff, f"{what}: the replica is not the oldest kept RP {base}: {diff}")
        os.unlink(self.env.restore(self.store, self.group, pts[-1]["rp_id"], self.disk.name))

    def baseline(self):
        """The first (full) RP over the clean link, so every scenario starts from one."""
        self.wl.random_writes(self.qsd, self.disk, 16, min_len=4096, max_len=256 * ft.KiB,
                              align=4096)
        self.start_replicate()
        deadline = time.monotonic() + 120
        while True:
            r = self.env.run(["points", "--store", self.store, "--group", self.group, "--json"],
                             timeout=60)
            if r.rc == 0 and json.loads(r.out):
                break
            ft.check(time.monotonic() < deadline,
                     f"no first RP over a clean link in 120 s:\n{ft.tail(self.rep.log_path)}")
            time.sleep(0.5)
        self.stop_replicate()

    # -- one scenario --

    def run(self, name, apply_fault, fault_s, kind="nft", seed_note=""):
        """apply_fault(harness) starts the fault and returns a function that ends it (or None
        when the fault is the relay route, ended by the harness)."""
        what = f"{name}{seed_note}"
        ft.log(f"=== scenario {what}: fault for {fault_s:.0f}s")
        pts0 = self.points()
        last0 = pts0[-1]["rp_id"] if pts0 else 0
        sessions0 = self.sessions()
        self.topo.counters(reset=True)
        self.writer.start()
        end_fault = apply_fault(self)
        time.sleep(fault_s)
        if end_fault:
            end_fault()
        self.topo.set_faults([])
        t_end = time.monotonic()
        time.sleep(1.0)  # writes continue a little after the faults stop, then the last write
        self.writer.stop()
        self.qsd.sync()
        snap = self.qsd.snapshot(self.disk, self.env.path("snaps", f"{name}.img"))
        after_ns = time.time_ns()
        pts, fresh, conv_s = self.wait_converged(after_ns, t_end, what)
        ft.log(f"{what}: converged in {conv_s:.1f}s (RP {fresh['rp_id']})")
        self.env.check_restore(self.store, self.group, fresh["rp_id"], self.disk.name, snap,
                               f"({what}) ")
        os.unlink(snap)
        self.stop_replicate()
        pts = self.points()
        self.check_chain(pts, what)
        self.check_replica(pts, what)
        # V4: bytes the receiver read vs bytes it committed. Over TLS the counter also sees
        # each session's handshake (about 2 KiB: both certificate chains) and the records'
        # framing (22 bytes per 16 KiB record), counted here as "re-sent": a few KiB per
        # session, far inside the bound.
        c = self.topo.counters()
        packets, nbytes = c["s2d"]
        wire = nbytes - packets * IP_TCP_HEADER_BYTES
        new = [p for p in pts if p["rp_id"] > last0]
        committed = sum(d["stored_bytes"] for p in new for d in p["disks"])
        biggest = max((sum(d["stored_bytes"] for d in p["disks"]) for p in new), default=0)
        window = SENDER_BUFFER_BYTES + self.topo.tcp_wmem_max
        # The source opens one session per RP attempt: sessions without a committed RP are
        # the interrupted (or refused) attempts whose bytes may be sent again.
        interrupted = max(0, self.sessions() - sessions0 - len(new))
        ft.check(wire >= committed * 0.98,
                 f"{what}: counted {wire} B on the wire but {committed} B committed: the "
                 "byte counter missed the traffic")
        resent = max(0, wire - committed)
        slack = committed // 50 + (1 << 20)  # frame headers, hellos, acks, TCP options
        bound = interrupted * (window + biggest) + slack
        ft.check(resent <= bound,
                 f"{what}: {resent} B re-sent after {interrupted} interruption(s); bound "
                 f"{bound} B (window {window} B, largest RP {biggest} B)")
        ratio = resent / (window + biggest) / max(1, interrupted)
        rec = {"scenario": name, "seed": self.env.seed, "fault_s": fault_s,
               "converge_s": round(conv_s, 2), "rps": len(new), "sessions": self.sessions() - sessions0, "interrupted": interrupted,
               "wire_bytes": wire, "committed_bytes": committed, "resent_bytes": resent,
               "window_bytes": window, "largest_rp_bytes": biggest,
               "resent_per_window": round(ratio, 4), "violations": 0, "duplicate_applies": 0}
        ft.log(f"{what}: {json.dumps(rec, sort_keys=True)}")
        self.results.append(rec)
        return rec


# -- the scenarios: each starts its fault and returns what ends it ------------------------


def loss(percent):
    def start(h):
        h.start_replicate()
        h.topo.set_faults([f"numgen random mod 100 < {percent} drop"])
    return start


def partition(h):
    """The link goes while an RP is in transfer: a 6 MiB burst of incompressible writes is
    sent through a 512 KiB/s limit, and 2.5 s later every packet is dropped."""
    h.start_replicate()
    h.topo.set_faults(['iifname "rs" limit rate over 512 kbytes/second drop'])
    h.wl.random_writes(h.qsd, h.disk, 24, min_len=256 * ft.KiB, max_len=256 * ft.KiB,
                       align=4096)
    time.sleep(2.5)
    h.topo.set_faults(["drop"])


def flapping(period_s, rng):
    def start(h):
        h.start_replicate()
        stop = threading.Event()

        def flap():
            down = False
            for _ in range(1000):  # bounded; the scenario's stop ends it first
                if stop.wait(period_s * rng.uniform(0.5, 1.5)):
                    return
                down = not down
                h.topo.set_faults(["drop"] if down else [])
        t = threading.Thread(target=flap, daemon=True)
        t.start()

        def end():
            stop.set()
            t.join(timeout=10)
        return end
    return start


def half_open(h):
    h.start_replicate()
    time.sleep(2)
    h.topo.set_faults(['iifname "rd" drop'])  # receiver -> source lost: ACKs never arrive


def rate_limit(bytes_per_s):
    def start(h):
        h.start_replicate()
        h.topo.set_faults([f'iifname "rs" limit rate over {bytes_per_s // 1024} kbytes/second '
                           'drop'])
    return start


def delay(delay_ms, jitter_ms):
    def start(h):
        h.start_relay(delay_ms, jitter_ms)
        h.start_replicate(to=f"{RTR_SRC_IP}:{RELAY_PORT}")

        def end():
            pass  # the relay keeps carrying traffic until the scenario's checks are done
        return end
    return start


def scenarios(rng, long):
    """(name, start, fault seconds) in run order. The default run keeps every kind of fault
    with shorter windows (each still spans several RP intervals and the receiver's idle
    timeout); FERRY_LONG=1 runs the full windows and the 30 s and 120 s partitions."""
    def s(short, full):
        return full if long else short
    out = [
        ("loss-5pct", loss(5), s(6, 10)),
        ("loss-30pct", loss(30), 10),
        ("partition-5s", partition, 5),
        ("flapping", flapping(2.0, rng), s(10, 16)),
        ("half-open", half_open, 10),
        ("rate-limit-1MBps", rate_limit(1 << 20), s(8, 10)),
        ("delay-jitter", delay(40, 30), s(6, 10)),
        ("long-fat-pipe", delay(150, 10), s(6, 10)),
    ]
    if long:
        out.insert(3, ("partition-30s", partition, 30))
        out.append(("partition-120s", partition, 120))
    return out


def main():
    name = "netfault"
    only = [s for s in os.environ.get("FERRY_NETFAULT_ONLY", "").split(",") if s]
    try:
        require_net()
    except ft.Skip as e:
        print(f"SKIP {name}: {e}", flush=True)
        sys.exit(ft.SKIP)
    seeds = int(os.environ.get("FERRY_NETFAULT_SEEDS", "3" if ft.LONG else "1"))
    with ft.Env(name) as env:
        h = Harness(env)
        h.baseline()
        results = []
        for k in range(seeds):
            rng = __import__("random").Random(env.seed + k)
            for sname, start, fault_s in scenarios(rng, ft.LONG):
                if only and sname not in only:
                    continue
                rec = h.run(sname, lambda hh, s=start: _with_relay_cleanup(hh, s), fault_s,
                            seed_note=f" (seed {env.seed}+{k})")
                h.stop_relay()
                results.append(rec)
        ft.check(results, "no scenario ran (FERRY_NETFAULT_ONLY matched nothing?)")
        conv = sorted(r["converge_s"] for r in results)
        p99 = conv[min(len(conv) - 1, int(round(0.99 * (len(conv) - 1))))]
        worst = max(r["resent_per_window"] for r in results)
        nsc = len({r["scenario"] for r in results})
        figure = (f"{nsc} scenarios x {seeds} seed(s), 0 violations, 0 duplicate applies, "
                  f"convergence p99 {p99:.1f} s, re-sent bytes / in-flight window "
                  f"<= {worst:.3f} per interruption")
        write_jsonl(name, figure, results, seeds)


def _with_relay_cleanup(h, start):
    return start(h)


def write_jsonl(name, figure, results, seeds):
    rec = {"test": name, "figure": figure, "unix_time": int(time.time()), "seeds": seeds,
           "scenarios": results}
    line = json.dumps(rec, sort_keys=True)
    d = os.environ.get("FERRY_RESULTS_DIR") or os.path.join(ft.REPO, "test", "reliability",
                                                            "results")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{name}.jsonl"), "a") as f:
        f.write(line + "\n")
    print(f"RESULT {line}", flush=True)


if __name__ == "__main__":
    main()
