"""Ferry's tiny test guest under libvirt: define, boot, drive, check, destroy.

    g = Guest(workdir, "ferry-t1", [Disk("vda"), Disk("vdb"), Disk("vdc", fmt="raw")])
    g.start()                            # transient domain, TCG, boots to READY
    g.write("vda", [0, 7, 300], gen=1)   # returns once the blocks are on the virtual disk
    g.destroy()

The guest (test/guest/init) writes self-validating 4 KiB blocks; `block_bytes` computes the
exact bytes of one and `parse_block` checks any 4 KiB read back from a copy of the disk.
The Guest keeps its own write log (`writes`: dev, block, generation, seed, host time) and the
latest generation of every block (`model`), so a test can tell which blocks changed between
two instants without trusting the system under test.
"""

import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

BLOCK_BYTES = 4096
HEADER_BYTES = 128
URI = "qemu:///system"
HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = 77


class GuestError(Exception):
    pass


def virsh(*args, check=True, timeout=60):
    """Runs virsh against qemu:///system; returns stdout (raises GuestError on failure)."""
    p = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise GuestError(f"virsh {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout if check else p


def block_body(dev, blk, gen, seed):
    unit = f"{dev}:{blk}:{gen}:{seed}\n".encode()
    n = BLOCK_BYTES - HEADER_BYTES
    return (unit * (n // len(unit) + 1))[:n]


def block_bytes(dev, blk, gen, seed):
    """The exact 4 KiB the guest writes for (dev, blk, gen, seed)."""
    body = block_body(dev, blk, gen, seed)
    md5 = hashlib.md5(body).hexdigest()
    header = f"FERRYBLK v1 dev={dev} blk={blk} gen={gen} seed={seed} md5={md5}"
    return header.ljust(HEADER_BYTES - 1).encode() + b"\n" + body


_HEADER = re.compile(rb"FERRYBLK v1 dev=(\w+) blk=(\d+) gen=(\d+) seed=(\d+) md5=([0-9a-f]{32}) *\n")


def parse_block(data):
    """(dev, blk, gen, seed) of a valid block, None for an all-zero block; raises on garbage."""
    assert len(data) == BLOCK_BYTES
    if data == bytes(BLOCK_BYTES):
        return None
    m = _HEADER.fullmatch(data[:HEADER_BYTES])
    if not m:
        raise GuestError(f"not a Ferry block: {data[:64]!r}")
    dev, blk, gen, seed = m.group(1).decode(), int(m.group(2)), int(m.group(3)), int(m.group(4))
    if data != block_bytes(dev, blk, gen, seed):
        raise GuestError(f"corrupt block {dev}/{blk} gen {gen}")
    return dev, blk, gen, seed


def fixture_dir():
    """Builds (once, cached) the kernel and initramfs; None when that is impossible here."""
    cache = os.environ.get("FERRY_GUEST_DIR", "/var/tmp/ferry-guest")
    p = subprocess.run([os.path.join(HERE, "build-guest"), cache], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr.strip())
        return None
    return p.stdout.strip().splitlines()[-1]


def start_libvirtd():
    """True when libvirtd answers (started if needed by scripts/start-libvirtd)."""
    script = os.path.join(HERE, "..", "..", "scripts", "start-libvirtd")
    p = subprocess.run([script], capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stderr.strip())
    return p.returncode == 0


def accel_domain_type():
    # /dev/kvm can be kvm-pvm here, which cannot run a stock kernel: only trust real KVM.
    real_kvm = os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")
    return "kvm" if real_kvm and os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"


@dataclass
class Disk:
    dev: str
    fmt: str = "qcow2"
    size_mib: int = 64
    cluster_bytes: int = 4096  # bitmap granularity = cluster size: exact 4 KiB extents


@dataclass
class Write:
    dev: str
    block: int
    gen: int
    seed: int
    acked_at: float


@dataclass
class Guest:
    workdir: str
    name: str
    disks: list
    agent: bool = False
    boot_timeout_s: float = 120
    cmd_timeout_s: float = 60
    writes: list = field(default_factory=list)
    model: dict = field(default_factory=dict)  # (dev, block) -> Write
    boot_s: float = 0.0

    def disk_path(self, dev):
        return os.path.join(self.workdir, f"{dev}.img")

    @property
    def console_path(self):
        return os.path.join(self.workdir, "console.log")

    def _xml(self, fixture):
        initrd = "initrd-qga.gz" if self.agent else "initrd.gz"
        disks = "".join(
            f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='{d.fmt}' cache='none'/>
      <source file='{self.disk_path(d.dev)}'/>
      <target dev='{d.dev}' bus='virtio'/>
    </disk>""" for d in self.disks)
        agent = """
    <controller type='virtio-serial' index='0'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>""" if self.agent else ""
        return f"""<domain type='{accel_domain_type()}'>
  <name>{self.name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{fixture}/vmlinuz</kernel>
    <initrd>{fixture}/{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disks}
    <serial type='file'><source path='{self.console_path}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{self.ctl_path}'/><target port='1'/></serial>{agent}
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

    @property
    def ctl_path(self):
        return os.path.join(self.workdir, "ctl.sock")

    def create_disks(self):
        for d in self.disks:
            args = ["qemu-img", "create", "-q", "-f", d.fmt]
            if d.fmt == "qcow2":
                args += ["-o", f"cluster_size={d.cluster_bytes}"]
            subprocess.run(args + [self.disk_path(d.dev), f"{d.size_mib}M"], check=True)

    def start(self, fixture, fresh_disks=True):
        """Boots the guest (disks created unless fresh_disks=False) and waits for READY."""
        os.makedirs(self.workdir, exist_ok=True)
        if fresh_disks:
            self.create_disks()
        for p in (self.console_path, self.ctl_path):
            if os.path.exists(p):
                os.unlink(p)  # libvirt appends to a file console: one file per boot
        xml = os.path.join(self.workdir, "domain.xml")
        with open(xml, "w") as f:
            f.write(self._xml(fixture))
        t0 = time.monotonic()
        virsh("create", xml)
        self._connect(t0)
        self.boot_s = time.monotonic() - t0

    def _connect(self, t0):
        # The UART socket drops what the guest sends before we connect, so connect at once
        # and ping until the guest answers.
        deadline = t0 + self.boot_timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(self.ctl_path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"{self.name}: no ctl socket {self.ctl_path}")
                time.sleep(0.05)
        self.sock.settimeout(1.0)
        self.buf = b""
        while True:
            if time.monotonic() > deadline:
                raise GuestError(f"{self.name}: not ready after {self.boot_timeout_s}s; "
                                 f"console: {self.console()[-2000:]}")
            try:
                self.sock.sendall(b"ping\n")
                line = self._readline(time.monotonic() + 1.0)
            except (GuestError, OSError):
                continue
            if line == "ok ping":
                return

    def _readline(self, deadline):
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                raise GuestError(f"{self.name}: no reply")
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise GuestError(f"{self.name}: ctl channel closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def command(self, line):
        self.sock.sendall((line + "\n").encode())
        deadline = time.monotonic() + self.cmd_timeout_s
        while True:
            reply = self._readline(deadline)
            if reply in ("READY", "ok ping"):  # late answers to the boot-time pings
                continue
            if not reply.startswith("ok"):
                raise GuestError(f"{self.name}: '{line}' -> '{reply}'")
            return reply

    def write(self, dev, blocks, gen, seed=0):
        """Writes self-validating blocks; returns when they are on the virtual disk."""
        blocks = list(blocks)
        for i in range(0, len(blocks), 32):  # bounded line length
            chunk = blocks[i:i + 32]
            self.command(f"w {dev} {gen} {seed} " + " ".join(map(str, chunk)))
            now = time.monotonic()
            for b in chunk:
                w = Write(dev, b, gen, seed, now)
                self.writes.append(w)
                self.model[(dev, b)] = w

    def expected(self, dev, blk):
        """What block `blk` of `dev` holds now according to the guest's own log."""
        w = self.model.get((dev, blk))
        return bytes(BLOCK_BYTES) if w is None else block_bytes(dev, blk, w.gen, w.seed)

    def written_since(self, t):
        """{dev: set(blocks)} written (acknowledged) after host time t."""
        out = {}
        for w in self.writes:
            if w.acked_at > t:
                out.setdefault(w.dev, set()).add(w.block)
        return out

    def wait_agent(self, timeout_s=60):
        """Waits until libvirt sees the guest agent connected (it starts after boot)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            p = virsh("qemu-agent-command", self.name, '{"execute":"guest-ping"}', check=False)
            if p.returncode == 0:
                return
            time.sleep(0.5)
        raise GuestError(f"{self.name}: guest agent not connected after {timeout_s}s")

    def freeze_events(self):
        """[(action, guest uptime)] logged by the guest's fsfreeze hook (qemu-ga -F)."""
        return [(m.group(1), float(m.group(2)))
                for m in re.finditer(r"FX FSFREEZE (\w+) t=([0-9.]+)", self.console())]

    def console(self):
        try:
            with open(self.console_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self):
        p = virsh("domstate", self.name, check=False)
        return p.returncode == 0 and "running" in p.stdout

    def destroy(self):
        try:
            self.sock.close()
        except AttributeError:
            pass
        virsh("destroy", self.name, check=False)

    def remove(self):
        self.destroy()
        shutil.rmtree(self.workdir, ignore_errors=True)
