"""ferrytest: the harness behind Ferry's end-to-end tests (Python 3 stdlib only).

Real processes only: qemu-storage-daemon with a writable FUSE export per disk (writes through
it are seen by QEMU's dirty bitmaps), the real `ferry receive` on loopback TCP, the real
`ferry replicate`. A test is a script:

    import ferrytest as ft
    with ft.Env("name") as env:
        qsd = env.qsd([ft.Disk("vda", 64 * ft.MiB)])
        rx = env.receiver()
        ...

Exit codes follow meson/automake: 0 pass, 1 fail, 77 skip (machine lacks a tool). Env cleans up
on any exit (exception, SIGTERM from meson's timeout, SIGINT): processes are killed, FUSE
mounts unmounted, the temp dir removed (kept on failure, or always with FERRY_KEEP_TMP=1).
Every run is seeded; a failing run prints `FERRY_SEED=<n>` which reproduces its workload.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

SKIP = 77
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LONG = os.environ.get("FERRY_LONG", "") not in ("", "0")
# The ASan+UBSan pass of test/run: the same tests, the long randomised loops with fewer rounds
# (the sanitizers look at code paths, which the first rounds already take); its figures are
# printed, not kept in results/ (they describe an instrumented build).
SANITIZE = os.environ.get("FERRY_SANITIZE", "") not in ("", "0")
# Mutual TLS 1.3 by default (issue 13): receivers and sources started through the harness use
# a throwaway PKI (test/tls/make-certs, one CA per test, in its temp dir) and an access map
# that lets the test's client (client-a) write and manage every group. FERRY_TLS=0 runs the
# same tests in plaintext on loopback; a test that must stay plaintext (a 0.1.0 source) says
# Env(..., tls=False). A proxy that parses frames sits between two TLS legs (TlsLegs).
TLS_DEFAULT = os.environ.get("FERRY_TLS", "1") not in ("", "0")
MAKE_CERTS = os.path.join(REPO, "test", "tls", "make-certs")
TLS_CLIENT = "client-a"
TLS_CLIENT_URI = "spiffe://ferry/source-a"


class TestFailure(Exception):
    """An assertion of the test failed (exit 1)."""


class Skip(Exception):
    """The machine lacks something the test needs (exit 77)."""


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def check_eq(actual, expected, what):
    if actual != expected:
        raise TestFailure(f"{what}: expected {expected!r}, got {actual!r}")


def tail(path, max_bytes=6000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
        return ("...\n" if size > max_bytes else "") + text
    except OSError as e:
        return f"<cannot read {path}: {e}>"


# --------------------------------------------------------------------------------------
# Requirements


def ferry_bin():
    """The ferry binary: $FERRY_BIN (set by test/meson.build), else a build dir in the repo."""
    path = os.environ.get("FERRY_BIN")
    if not path:
        for d in ("build-test", "build", "build-asan"):
            cand = os.path.join(REPO, d, "tools", "ferry")
            if os.access(cand, os.X_OK):
                path = cand
                break
    if not path or not os.access(path, os.X_OK):
        # Not a skip: the binary is part of what is under test.
        raise TestFailure(f"ferry binary not found or not executable (FERRY_BIN={path!r})")
    return path


def require_qsd():
    for tool in ("qemu-storage-daemon", "qemu-img"):
        if not shutil.which(tool):
            raise Skip(f"{tool} not installed")
    if not os.path.exists("/dev/fuse"):
        raise Skip("/dev/fuse missing (FUSE exports of qemu-storage-daemon need it)")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        raise Skip(f"/dev/fuse not usable: {e}")
    if not (shutil.which("fusermount3") or shutil.which("umount")):
        raise Skip("neither fusermount3 nor umount available to clean FUSE mounts")


# --------------------------------------------------------------------------------------
# Mounts


def _mounts():
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mp = parts[1].replace("\\040", " ")
                    out.append((mp, parts[2]))
    except OSError:
        pass
    return out


def is_mounted(path):
    path = os.path.abspath(path)
    return any(mp == path for mp, _ in _mounts())


def unmount(path):
    """Unmounts a FUSE mount, lazily if it is busy or its daemon is dead."""
    for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        if shutil.which(cmd[0]):
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if is_mounted(path):
        log(f"warning: could not unmount {path}")


def _tmp_root():
    return os.environ.get("FERRY_TEST_TMP") or "/tmp"  # short: unix socket paths <= 107 bytes


def _sweep_stale():
    """Unmounts and removes temp dirs of earlier runs whose process is gone (kill -9, OOM)."""
    root = _tmp_root()
    for mp, fstype in _mounts():
        if not fstype.startswith("fuse") or not mp.startswith(os.path.join(root, "ferrytest-")):
            continue
        try:
            pid = int(os.path.relpath(mp, root).split(os.sep)[0].split("-")[1])
        except (ValueError, IndexError):
            continue
        if not os.path.exists(f"/proc/{pid}"):
            unmount(mp)
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith("ferrytest-"):
            continue
        try:
            pid = int(name.split("-")[1])
        except (ValueError, IndexError):
            continue
        d = os.path.join(root, name)
        if os.path.exists(f"/proc/{pid}") or any(
                mp.startswith(d + os.sep) for mp, _ in _mounts()):
            continue
        # A dead run: drop its images now (they can be GiBs), its logs after a day.
        try:
            old = time.time() - os.stat(d).st_mtime > 86400
        except OSError:
            continue
        if old:
            shutil.rmtree(d, ignore_errors=True)
            continue
        for sub, _, files in os.walk(d):
            for f in files:
                if not f.endswith((".log", ".json")):
                    try:
                        os.unlink(os.path.join(sub, f))
                    except OSError:
                        pass


# --------------------------------------------------------------------------------------
# Ports and processes


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_inodes_on(port):
    """Socket inodes listening on TCP port `port` (from /proc/net/tcp{,6})."""
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    local, state, inode = p[1], p[3], p[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        out.add(inode)
        except (OSError, StopIteration):
            pass
    return out


def pid_listens_on(pid, port):
    """True when process `pid` holds a socket listening on `port` (no probe connection, so
    the receiver never sees a spurious client)."""
    inodes = listening_inodes_on(port)
    if not inodes:
        return False
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return True
    except OSError:
        return False
    return False


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, env, name, argv, log_path, stdout=None, extra_env=None, cwd=None):
        self.name, self.argv, self.log_path = name, argv, log_path
        self.logf = open(log_path, "ab")
        penv = dict(os.environ)
        penv["TMPDIR"] = env.dir
        if extra_env:
            penv.update(extra_env)
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                  stdout=stdout if stdout is not None else self.logf,
                                  stderr=self.logf, env=penv, cwd=cwd or env.dir)
        self.pid = self.p.pid
        env._procs.append(self)

    def alive(self):
        return self.p.poll() is None

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TestFailure(f"{self.name} (pid {self.pid}) did not exit within {timeout}s; "
                              f"log {self.log_path}:\n{tail(self.log_path)}")

    def kill9(self):
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.p.wait()

    def terminate(self, timeout=20):
        """SIGTERM, then SIGKILL after `timeout` s. Returns the exit status."""
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                raise TestFailure(f"{self.name} ignored SIGTERM for {timeout}s:\n"
                                  f"{tail(self.log_path)}")
        return self.p.returncode

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def close(self):
        try:
            self.logf.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------
# QMP


class Qmp:
    """A tiny QMP client: enough for a test to look at block nodes and bitmaps."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        greeting = self._recv()
        check("QMP" in greeting, f"not a QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _recv(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise TestFailure("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._recv()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise TestFailure(f"QMP {cmd} failed: {r['error']}")
            # an event: ignore

    def bitmaps(self, node):
        """Names of the dirty bitmaps on `node` with their dirty byte count."""
        out = {}
        for n in self.execute("query-named-block-nodes", flat=True):
            if n.get("node-name") == node:
                for b in n.get("dirty-bitmaps", []):
                    out[b["name"]] = b
        return out

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------
# qemu-storage-daemon with FUSE exports


class Disk:
    """One disk of a qsd instance. `node` is the QEMU node name, `name` the name in the group."""

    def __init__(self, name, size_bytes, fmt="qcow2", node=None):
        assert fmt in ("qcow2", "raw")
        self.name, self.size_bytes, self.fmt = name, size_bytes, fmt
        self.node = node or f"node-{name}"
        self.image = self.mount = None
        self.fd = -1

    @property
    def spec(self):
        """The --disk argument of `ferry replicate`."""
        return f"{self.node}={self.name}"


class Qsd:
    def __init__(self, env, disks, tag="qsd"):
        self.env, self.disks, self.tag = env, list(disks), tag
        self.qmp_path = os.path.join(env.dir, f"{tag}.qmp")
        argv = ["qemu-storage-daemon"]
        for i, d in enumerate(self.disks):
            d.image = os.path.join(env.dir, f"{tag}-{d.name}.{d.fmt}")
            d.mount = os.path.join(env.dir, f"{tag}-{d.name}.fuse")
            subprocess.run(["qemu-img", "create", "-q", "-f", d.fmt, d.image, str(d.size_bytes)],
                           check=True)
            open(d.mount, "w").close()
            argv += ["--blockdev", f"driver=file,filename={d.image},node-name=file{i}",
                     "--blockdev", f"driver={d.fmt},file=file{i},node-name={d.node}",
                     "--export", f"type=fuse,id=e{i},node-name={d.node},mountpoint={d.mount},"
                                 "writable=on"]
        # Two monitors: one for ferry (a QMP socket serves one client at a time), one that
        # the test keeps connected for its own queries.
        self.test_qmp_path = os.path.join(env.dir, f"{tag}-test.qmp")
        argv += ["--chardev", f"socket,id=m0,path={self.qmp_path},server=on,wait=off",
                 "--monitor", "chardev=m0",
                 "--chardev", f"socket,id=m1,path={self.test_qmp_path},server=on,wait=off",
                 "--monitor", "chardev=m1"]
        self.proc = Proc(env, tag, argv, os.path.join(env.dir, f"{tag}.log"))
        env._mounts.extend(d.mount for d in self.disks)
        deadline = time.monotonic() + 30
        while True:
            ready = os.path.exists(self.qmp_path) and os.path.exists(self.test_qmp_path) and all(
                is_mounted(d.mount) and os.stat(d.mount).st_size == d.size_bytes
                for d in self.disks)
            if ready:
                break
            if not self.proc.alive():
                text = tail(self.proc.log_path)
                # A machine that cannot FUSE-mount (container without CAP_SYS_ADMIN, qsd built
                # without FUSE exports) lacks a tool: skip, do not fail.
                if re.search(r"failed to mount fuse|fuse: (device not found|failed to open)|"
                             r"fusermount3?: [^\n]*(permission|not permitted|not found)|"
                             r"does not accept value 'fuse'|/dev/fuse", text, re.I):
                    raise Skip(f"qemu-storage-daemon cannot provide FUSE exports here: {text}")
                raise TestFailure(f"qemu-storage-daemon exited {self.proc.p.returncode}:\n"
                                  f"{text}")
            if time.monotonic() > deadline:
                raise TestFailure(f"qemu-storage-daemon not ready in 30s:\n"
                                  f"{tail(self.proc.log_path)}")
            time.sleep(0.05)
        for d in self.disks:
            d.fd = os.open(d.mount, os.O_RDWR)
        self.qmp = Qmp(self.test_qmp_path)
        log(f"{tag}: pid {self.proc.pid}, disks " +
            ", ".join(f"{d.name}({d.fmt}, {d.size_bytes} B)" for d in self.disks))

    def disk(self, name):
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def specs(self):
        return [d.spec for d in self.disks]

    # -- writes through FUSE, seen by QEMU's dirty bitmaps --

    def write(self, disk, offset, data):
        n = os.pwrite(disk.fd, data, offset)
        check(n == len(data), f"short write through FUSE: {n} of {len(data)} at {offset}")

    def zero_range(self, disk, offset, length):
        """Zeroes a range with a zero write (fallocate ZERO_RANGE through FUSE -> QEMU
        write_zeroes; PUNCH_HOLE would be a discard); falls back to writing zero bytes."""
        if _fallocate(disk.fd, 0x10, offset, length):  # FALLOC_FL_ZERO_RANGE
            return "zero_range"
        self.write(disk, offset, bytes(length))
        return "pwrite"

    def sync(self):
        for d in self.disks:
            os.fsync(d.fd)

    def read(self, disk, offset, length):
        return os.pread(disk.fd, length, offset)

    def snapshot(self, disk, dest):
        """Copies the disk's current content (as the guest sees it) to `dest`, sparsely."""
        self.sync()
        sparse_copy(disk.mount, dest)
        return dest

    def stop(self):
        for d in self.disks:
            if d.fd >= 0:
                os.close(d.fd)
                d.fd = -1
        self.qmp.close()
        self.proc.terminate(timeout=20)
        for d in self.disks:
            unmount(d.mount)

    def kill9(self):
        for d in self.disks:
            if d.fd >= 0:
                os.close(d.fd)
                d.fd = -1
        self.qmp.close()
        self.proc.kill9()
        for d in self.disks:
            unmount(d.mount)


_libc = None


def _fallocate(fd, mode, offset, length):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(e, f"fallocate({mode:#x}, {offset}, {length})")


# --------------------------------------------------------------------------------------
# Sparse-aware images


def data_extents(fd, size):
    """[(offset, length)] of the data extents of fd (everything if SEEK_DATA is unsupported)."""
    out, off = [], 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end > start:
                out.append((start, end - start))
            off = end
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return [(0, size)] if size else []
    return out


def sparse_copy(src, dest, chunk=4 * MiB):
    with open(src, "rb") as fs, open(dest, "wb") as fd:
        size = os.fstat(fs.fileno()).st_size
        fd.truncate(size)
        for off, length in data_extents(fs.fileno(), size):
            end = off + length
            while off < end:
                n = min(chunk, end - off)
                buf = os.pread(fs.fileno(), n, off)
                check(len(buf) == n, f"short read of {src} at {off}")
                if buf.count(0) != n:
                    os.pwrite(fd.fileno(), buf, off)
                off += n
    return dest


def _merge(extents):
    out = []
    for off, length in sorted(extents):
        if out and off <= out[-1][0] + out[-1][1]:
            o, l = out[-1]
            out[-1] = (o, max(o + l, off + length) - o)
        else:
            out.append((off, length))
    return out


def first_difference(a, b, chunk=4 * MiB):
    """None when files a and b have equal size and bytes, else a description naming the first
    differing offset. Reads only the union of both files' data extents."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        sa, sb = os.fstat(fa.fileno()).st_size, os.fstat(fb.fileno()).st_size
        if sa != sb:
            return f"sizes differ: {a} has {sa} bytes, {b} has {sb}"
        union = _merge(data_extents(fa.fileno(), sa) + data_extents(fb.fileno(), sb))
        for off, length in union:
            end = off + length
            while off < end:
                n = min(chunk, end - off)
                x, y = os.pread(fa.fileno(), n, off), os.pread(fb.fileno(), n, off)
                if x != y:
                    i = next(i for i in range(min(len(x), len(y))) if x[i] != y[i]) \
                        if len(x) == len(y) else min(len(x), len(y))
                    return (f"first difference at offset {off + i} (block of 64 KiB #"
                            f"{(off + i) // (64 * KiB)}): {a} has {x[i:i+8].hex()}, "
                            f"{b} has {y[i:i+8].hex()}")
                off += n
    return None


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


# --------------------------------------------------------------------------------------
# Workload: self-validating writes from a seed


class Workload:
    """Deterministic writes. Every write of >= 48 bytes starts with a header (magic, disk id,
    offset, generation, blake2b-64 of the rest) so a misplaced or torn block is recognisable in
    any image; the rest is pseudo-random from the seed."""

    MAGIC = b"FTWB"

    def __init__(self, seed):
        self.seed = seed
        self.rng = random.Random(seed)
        self.gen = 0
        self.touched = {}  # disk id -> set of 64 KiB block indexes written since reset

    def touch(self, disk_id, offset, length, block=64 * KiB):
        s = self.touched.setdefault(disk_id, set())
        s.update(range(offset // block, (offset + max(length, 1) - 1) // block + 1))

    def take_touched(self, disk_id, block=64 * KiB):
        """Bytes of the 64 KiB blocks written since the last call (the most an incremental
        RP of that disk may carry)."""
        return len(self.touched.pop(disk_id, set())) * block

    def block(self, disk_id, offset, length):
        self.gen += 1
        body = random.Random(f"{self.seed}/{disk_id}/{offset}/{self.gen}").randbytes(length)
        if length < 48:
            return body
        rest = body[32:]
        hdr = self.MAGIC + struct.pack("<IQQ", disk_id & 0xffffffff, offset, self.gen)
        hdr += hashlib.blake2b(rest, digest_size=8).digest()
        return hdr + rest

    def write(self, qsd, disk, offset, length):
        """One self-validating write of `length` bytes at `offset` (any alignment)."""
        i = qsd.disks.index(disk)
        qsd.write(disk, offset, self.block(i, offset, length))
        self.touch(i, offset, length)

    def zero(self, qsd, disk, offset, length, how="zero_range"):
        """Zeros over a range: how="zero_range" (a QEMU write_zeroes) or "pwrite" (zero bytes
        written as data)."""
        if how == "zero_range":
            qsd.zero_range(disk, offset, length)
        else:
            qsd.write(disk, offset, bytes(length))
        self.touch(qsd.disks.index(disk), offset, length)

    def random_writes(self, qsd, disk, count, min_len=512, max_len=256 * KiB,
                      region=(0, None), align=512):
        """`count` writes of random (unaligned to 64 KiB) size and place within `region`."""
        start, end = region
        end = end if end is not None else disk.size_bytes
        written = 0
        for _ in range(count):
            length = self.rng.randrange(min_len, max_len + 1, align)
            off = self.rng.randrange(start, max(start + 1, end - length), align)
            qsd.write(disk, off, self.block(qsd.disks.index(disk), off, length))
            self.touch(qsd.disks.index(disk), off, length)
            written += length
        return written


class History:
    """What the source looked like at each RP: {rp: {disk name: snapshot path}}, plus the
    group's committed points as last seen. verify() restores RPs and compares."""

    def __init__(self, env, store, group, keep_last=None):
        """keep_last: keep the snapshots of only the first and the last `keep_last` RPs (long
        crash loops would otherwise copy GiBs); older RPs stay in `acked` (still checked to be
        listed) but are no longer restored."""
        self.env, self.store, self.group = env, store, group
        self.keep_last = keep_last
        self.snaps = {}
        self.acked = []

    def prune(self):
        if self.keep_last is None or len(self.snaps) <= self.keep_last + 1:
            return
        rps = sorted(self.snaps)
        keep = set(rps[:1] + rps[-self.keep_last:])
        for rp in rps:
            if rp not in keep:
                del self.snaps[rp]
        live = {p for s in self.snaps.values() for p in s.values()}
        d = os.path.join(self.env.dir, "snaps")
        for name in os.listdir(d) if os.path.isdir(d) else []:
            p = os.path.join(d, name)
            if p not in live and p not in self._pending:
                os.unlink(p)

    _pending = set()  # snapshots taken but not yet recorded (never pruned)

    def snapshot_all(self, qsd, label):
        qsd.sync()
        out = {d.name: qsd.snapshot(d, self.env.path("snaps", f"{label}-{d.name}.img"))
               for d in qsd.disks}
        self._pending = set(out.values())
        return out

    def record(self, rp, snaps):
        check(rp not in self.snaps or self.snaps[rp] == snaps, f"RP {rp} reported twice")
        check(not self.acked or rp > self.acked[-1],
              f"RP ids must grow: got {rp} after {self.acked[-1] if self.acked else None}")
        self.snaps[rp] = snaps
        self.acked.append(rp)
        self.prune()

    def verify(self, rps=None, what=""):
        pts = {p["rp_id"]: p for p in self.env.points(self.store, self.group)}
        for rp in self.acked:
            check(rp in pts, f"acknowledged RP {rp} is not among the committed points "
                             f"{sorted(pts)} {what}")
        for rp in (rps if rps is not None else sorted(self.snaps)):
            for disk, snap in sorted(self.snaps[rp].items()):
                self.env.check_restore(self.store, self.group, rp, disk, snap, what)
        return pts


# --------------------------------------------------------------------------------------
# The receiver and the ferry CLI


class Receiver:
    def __init__(self, env, store, port=None, tag="receiver", extra_env=None, args=None):
        """args: extra `ferry receive` arguments (--keep-last 20, --config F), kept for
        restarts unless restart() is given others."""
        self.env, self.store, self.tag = env, store, tag
        self.extra_env = extra_env
        self.args = env.tls_receiver_args([str(a) for a in (args or [])], tag)
        os.makedirs(store, exist_ok=True)
        self.log_path = os.path.join(env.dir, f"{tag}.log")
        self.proc = None
        self.port = port
        self.start(port, extra_env=extra_env)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def start(self, port=None, attempts=5, extra_env=None):
        """Starts `ferry receive`; picks a free port unless given; retries on bind failure.
        extra_env (e.g. FERRY_KILL_AT) applies to this start only."""
        last = ""
        for attempt in range(attempts):
            p = port or free_port()
            with open(self.log_path, "ab") as f:
                f.write(f"--- ferrytest: start on port {p} ---\n".encode())
            proc = Proc(self.env, self.tag, [self.env.ferry, "receive", "--listen",
                        f"127.0.0.1:{p}", "--store", self.store] + self.args, self.log_path,
                        extra_env=extra_env)
            deadline = time.monotonic() + 20
            while proc.alive() and not pid_listens_on(proc.pid, p):
                if time.monotonic() > deadline:
                    proc.kill9()
                    raise TestFailure(f"receiver not listening on {p} after 20s:\n"
                                      f"{tail(self.log_path)}")
                time.sleep(0.05)
            if proc.alive():
                self.proc, self.port = proc, p
                log(f"{self.tag}: pid {proc.pid} on 127.0.0.1:{p}")
                return
            last = tail(self.log_path)
            log(f"{self.tag}: exited {proc.p.returncode} at start (attempt {attempt + 1})")
            time.sleep(0.3 * (attempt + 1))
        raise TestFailure(f"receiver failed to start after {attempts} attempts:\n{last}")

    def alive(self):
        return self.proc is not None and self.proc.alive()

    def kill9(self):
        self.proc.kill9()
        log(f"{self.tag}: killed -9 (pid {self.proc.pid})")

    def stop(self):
        """SIGTERM must stop the receiver cleanly (exit 0)."""
        rc = self.proc.terminate(timeout=20)
        check(rc == 0, f"receiver exited {rc} on SIGTERM:\n{tail(self.log_path)}")

    def restart(self, same_port=True, extra_env=None, args=None):
        if args is not None:
            self.args = self.env.tls_receiver_args([str(a) for a in args], self.tag)
        self.start(self.port if same_port else None, extra_env=extra_env)

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


class Result:
    def __init__(self, argv, rc, out, err, seconds):
        self.argv, self.rc, self.out, self.err, self.seconds = argv, rc, out, err, seconds

    def __str__(self):
        return (f"$ {' '.join(self.argv)}\nexit {self.rc} after {self.seconds:.1f}s\n"
                f"stdout: {self.out[-3000:]}\nstderr: {self.err[-5000:]}")


class Env:
    """Temp dir, processes and mounts of one test; cleans all of it on exit."""

    def __init__(self, name, need_qsd=True, need_ferry=True, seed=None, tls=None):
        self.name = name
        self.tls = TLS_DEFAULT if tls is None else tls
        self._pki = None
        self.need_qsd, self.need_ferry = need_qsd, need_ferry
        env_seed = os.environ.get("FERRY_SEED")
        self.seed = int(env_seed) if env_seed else (seed if seed is not None
                                                     else random.randrange(1 << 31))
        self._procs, self._mounts, self._cleanups = [], [], []
        self.dir = None
        self.failed = False
        self.ferry = None

    # -- context --

    def __enter__(self):
        signal.signal(signal.SIGTERM, _raise_on_signal)
        signal.signal(signal.SIGHUP, _raise_on_signal)
        try:
            _sweep_stale()
            if self.need_qsd:
                require_qsd()
            if self.need_ferry:
                self.ferry = ferry_bin()
        except Skip as e:
            print(f"SKIP {self.name}: {e}", flush=True)
            sys.exit(SKIP)
        except TestFailure as e:
            print(f"FAIL {self.name}: {e}", flush=True)
            sys.exit(1)
        self.dir = tempfile.mkdtemp(prefix=f"ferrytest-{os.getpid()}-", dir=_tmp_root())
        self.rng = random.Random(self.seed)
        log(f"{self.name}: seed {self.seed} (rerun with FERRY_SEED={self.seed}), dir {self.dir}")
        log(f"ferry: {self.ferry}")
        return self

    def __exit__(self, et, ev, tb):
        code = 0
        if et is None or (et is SystemExit and (ev.code in (0, None))):
            print(f"PASS {self.name}", flush=True)
        elif et is Skip:
            print(f"SKIP {self.name}: {ev}", flush=True)
            code = SKIP
        else:
            self.failed = True
            code = 1
            if et is TestFailure:
                print(f"FAIL {self.name}: {ev}", flush=True)
            elif et is SystemExit:
                code = ev.code if isinstance(ev.code, int) else 1
                print(f"FAIL {self.name}: exit {ev.code}", flush=True)
            else:
                print(f"FAIL {self.name}: unexpected error", flush=True)
                traceback.print_exception(et, ev, tb)
            print(f"FAIL {self.name}: reproduce with FERRY_SEED={self.seed}", flush=True)
            self._dump_logs()
        self.cleanup()
        sys.stdout.flush()
        sys.exit(code)

    def _dump_logs(self):
        if not self.dir:
            return
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                print(f"----- {name} (tail) -----\n{tail(os.path.join(self.dir, name), 4000)}")

    def cleanup(self):
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:
                log(f"cleanup: {e}")
        for p in self._procs:
            if p.alive():
                try:
                    p.p.send_signal(signal.SIGTERM)
                    p.p.wait(timeout=5)
                except Exception:
                    try:
                        p.p.kill()
                        p.p.wait(timeout=5)
                    except Exception:
                        pass
            p.close()
        for m in self._mounts:
            unmount(m)
        if self.dir:
            keep = os.environ.get("FERRY_KEEP_TMP", "") not in ("", "0")
            if keep or self.failed:
                log(f"kept {self.dir}")
            if not keep and not any(mp.startswith(self.dir + os.sep) for mp, _ in _mounts()):
                if not self.failed:
                    shutil.rmtree(self.dir, ignore_errors=True)
                else:
                    # keep logs and small files, drop the big images
                    for name in os.listdir(self.dir):
                        p = os.path.join(self.dir, name)
                        if os.path.isfile(p) and not name.endswith((".log", ".json")):
                            try:
                                os.unlink(p)
                            except OSError:
                                pass

    def on_cleanup(self, fn):
        self._cleanups.append(fn)

    # -- factories --

    def path(self, *parts):
        p = os.path.join(self.dir, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def qsd(self, disks, tag="qsd"):
        return Qsd(self, disks, tag)

    def receiver(self, store=None, port=None, tag="receiver", extra_env=None, args=None):
        return Receiver(self, store or os.path.join(self.dir, "store"), port, tag, extra_env,
                        args)

    def workload(self, salt=0):
        return Workload(self.seed * 1000003 + salt)

    # -- mutual TLS (on unless Env(tls=False) or FERRY_TLS=0) --

    def pki(self):
        """The test's throwaway PKI (test/tls/make-certs), made once per test in its dir."""
        if self._pki is None:
            d = os.path.join(self.dir, "pki")
            if not os.path.exists(MAKE_CERTS):
                raise TestFailure(f"{MAKE_CERTS} is missing (it comes with the TLS transport)")
            t0 = time.monotonic()
            r = subprocess.run(["bash", MAKE_CERTS, d], capture_output=True, timeout=120)
            if r.returncode != 0:
                raise TestFailure(f"make-certs failed ({r.returncode}):\n"
                                  f"{r.stderr.decode(errors='replace')[-3000:]}")
            log(f"pki: {d} ({time.monotonic() - t0:.1f}s)")
            self._pki = d
        return self._pki

    def cert(self, name):
        return os.path.join(self.pki(), name)

    def tls_client_args(self, name=TLS_CLIENT, server_name=None):
        """The --tls-* flags of a source (or ferry points --to); [] when TLS is off."""
        if not self.tls:
            return []
        args = ["--tls-cert", self.cert(f"{name}.pem"), "--tls-key", self.cert(f"{name}.key"),
                "--tls-ca", self.cert("ca.pem")]
        if server_name:
            args += ["--tls-server-name", server_name]
        return args

    def agent_tls_toml(self, name=TLS_CLIENT):
        """The top-level tls_* keys of an agent config ("" when TLS is off)."""
        if not self.tls:
            return ""
        return (f'tls_cert = "{self.cert(name + ".pem")}"\n'
                f'tls_key = "{self.cert(name + ".key")}"\n'
                f'tls_ca = "{self.cert("ca.pem")}"\n')

    def access_toml(self, extra=""):
        """An access map that lets the test's client write and manage every group."""
        return (f"{extra.rstrip()}\n\n# ferrytest: the test's client (mutual TLS)\n"
                f"[[access]]\nidentity = \"uri:{TLS_CLIENT_URI}\"\n"
                f"write = [\"*\"]\nmanage = [\"*\"]\n")

    def tls_receiver_args(self, args, tag="receiver"):
        """args of `ferry receive` with TLS material and an access map added (a --config
        the test gives is copied with the map appended unless it has [[access]] of its own);
        unchanged when TLS is off or the test gives --tls-* itself."""
        if not self.tls or "--tls-cert" in args or "--insecure-plaintext" in args:
            return args
        args = list(args)
        extra = ""
        if "--config" in args:
            i = args.index("--config")
            with open(args[i + 1]) as f:
                extra = f.read()
            if "[[access]]" in extra:
                return args + self._tls_server_flags()
            del args[i:i + 2]
        cfg = os.path.join(self.dir, f"{tag}-receive.toml")
        with open(cfg, "w") as f:
            f.write(self.access_toml(extra))
        return args + ["--config", cfg] + self._tls_server_flags()

    def _tls_server_flags(self):
        return ["--tls-cert", self.cert("server.pem"), "--tls-key", self.cert("server.key"),
                "--tls-ca", self.cert("ca.pem")]

    def connect(self, port, timeout=30, host="127.0.0.1", client=TLS_CLIENT):
        """A client socket to a receiver: TLS 1.3 with the test's client certificate when TLS
        is on (Python's ssl), plain TCP otherwise. Used by tests that speak the protocol."""
        sock = socket.create_connection((host, port), timeout=timeout)
        if not self.tls:
            return sock
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(self.cert("ca.pem"))
        ctx.load_cert_chain(self.cert(f"{client}.pem"), self.cert(f"{client}.key"))
        return ctx.wrap_socket(sock, server_hostname=host)

    def server_wrap(self, sock):
        """The server side of an accepted connection, for tests that play a receiver by hand:
        TLS 1.3 with the test's server certificate, a client certificate required (the
        harness's CA); unchanged when TLS is off."""
        if not self.tls:
            return sock
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(self.cert("ca.pem"))
        ctx.load_cert_chain(self.cert("server.pem"), self.cert("server.key"))
        return ctx.wrap_socket(sock, server_side=True)

    # -- the CLI --

    def with_tls(self, args):
        """Adds the client TLS flags to a source command (replicate, protect, points --to)."""
        args = [str(a) for a in args]
        if not self.tls or not args or "--tls-cert" in args:
            return args
        if args[0] in ("replicate", "protect") or (args[0] == "points" and "--to" in args):
            return args + self.tls_client_args()
        return args

    def run(self, args, timeout=300, check_rc=None, extra_env=None, tls=True):
        """Runs `ferry ARGS`; returns a Result. check_rc: the exit status required. Source
        commands get the client TLS flags (with_tls) unless tls=False."""
        argv = [self.ferry] + (self.with_tls(args) if tls else [str(a) for a in args])
        penv = dict(os.environ)
        penv["TMPDIR"] = self.dir
        penv.update(extra_env or {})
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=timeout, env=penv, cwd=self.dir)
        except subprocess.TimeoutExpired as e:
            raise TestFailure(f"`{' '.join(argv)}` did not finish in {timeout}s\n"
                              f"stderr: {(e.stderr or b'').decode(errors='replace')[-4000:]}")
        r = Result(argv, p.returncode, p.stdout.decode(errors="replace"),
                   p.stderr.decode(errors="replace"), time.monotonic() - t0)
        if check_rc is not None and r.rc != check_rc:
            raise TestFailure(f"expected exit {check_rc}:\n{r}")
        return r

    def replicate_args(self, qsd, to, group, disks=None, state_dir=None):
        args = ["replicate", "--qmp", qsd.qmp_path]
        for spec in (disks if disks is not None else qsd.specs):
            args += ["--disk", spec]
        if state_dir is None:
            state_dir = os.path.join(self.dir, f"state-{group}")
            os.makedirs(state_dir, exist_ok=True)
        args += ["--to", to, "--group", group, "--once", "--state-dir", state_dir]
        return self.with_tls(args)

    def replicate_once(self, qsd, to, group, disks=None, timeout=300, state_dir=None):
        """`ferry replicate --once`; returns the new RP id (printed on stdout)."""
        r = self.run(self.replicate_args(qsd, to, group, disks, state_dir), timeout=timeout)
        self.last_replicate = r
        if r.rc != 0:
            raise TestFailure(f"replicate --once failed:\n{r}")
        lines = [l.strip() for l in r.out.strip().splitlines() if l.strip()]
        check(lines and lines[-1].isdigit(),
              f"replicate --once must print the RP id (a decimal integer) on stdout:\n{r}")
        rp = int(lines[-1])
        log(f"replicate --once -> RP {rp} in {r.seconds:.1f}s")
        return rp

    def replicate_popen(self, qsd, to, group, disks=None, state_dir=None, tag="replicate",
                        extra_env=None):
        """Starts `ferry replicate --once` in the background (stdout to a pipe)."""
        args = self.replicate_args(qsd, to, group, disks, state_dir)
        return Proc(self, tag, [self.ferry] + args, os.path.join(self.dir, f"{tag}.log"),
                    stdout=subprocess.PIPE, extra_env=extra_env)

    def points(self, store, group):
        r = self.run(["points", "--store", store, "--group", group, "--json"], timeout=60)
        if r.rc != 0:
            raise TestFailure(f"ferry points failed:\n{r}")
        try:
            pts = json.loads(r.out)
        except ValueError as e:
            raise TestFailure(f"ferry points --json is not JSON ({e}):\n{r}")
        check(isinstance(pts, list), f"ferry points --json must print an array:\n{r}")
        for p in pts:
            for key in ("rp_id", "base_rp", "created_unix_ns", "committed_unix_ns", "disks"):
                check(key in p, f"point lacks {key!r}: {p}")
            for d in p["disks"]:
                for key in ("name", "size_bytes", "full", "changed_bytes", "zero_bytes",
                            "stored_bytes"):
                    check(key in d, f"disk entry lacks {key!r}: {d}")
        return pts

    def restore(self, store, group, point, disk, out=None, timeout=300):
        out = out or self.path("restores", f"{group}-{disk}-rp{point}.img")
        if os.path.exists(out):
            os.unlink(out)
        r = self.run(["restore", "--store", store, "--group", group, "--point", point,
                      "--disk", disk, "--out", out], timeout=timeout)
        if r.rc != 0:
            raise TestFailure(f"restore of {group}/{disk} at RP {point} failed:\n{r}")
        check(os.path.isfile(out), f"restore exited 0 but wrote no {out}")
        return out

    def check_restore(self, store, group, point, disk, expected_image, what=""):
        out = self.restore(store, group, point, disk)
        diff = first_difference(expected_image, out)
        if diff:
            raise TestFailure(f"restore of {group}/{disk} at RP {point} {what}differs from the "
                              f"source: {diff}")
        log(f"RP {point} {disk}: restore equals the source {what.strip()}")
        os.unlink(out)

    def store_bytes(self, store):
        """Bytes allocated under `store` (sparse replicas count for their data only)."""
        total = 0
        for root, _, files in os.walk(store):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
                except OSError:
                    pass
        return total


def _raise_on_signal(signum, frame):
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------------------
# Wire protocol helpers (see transport/include/ferry/transport/wire.h)

FRAME_MAGIC = 0x31595246
FRAME_HEADER = struct.Struct("<IHHIIQ")  # magic, type, flags, payload_bytes, reserved, checksum
assert FRAME_HEADER.size == 24
MSG = {"hello": 1, "hello_reply": 2, "rp_begin": 3, "data": 4, "rp_end": 5, "rp_ack": 6,
       "error": 7}

_xxh = None


def xxh3_64(data):
    """XXH3-64 (seed 0) through libxxhash, the library Ferry links."""
    global _xxh
    if _xxh is None:
        name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
        try:
            _xxh = ctypes.CDLL(name)
        except OSError as e:
            raise Skip(f"libxxhash not loadable ({e})")
        _xxh.XXH3_64bits.restype = ctypes.c_uint64
        _xxh.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return _xxh.XXH3_64bits(bytes(data), len(data))


def encode_frame(msg_type, payload, flags=0, reserved=0, magic=FRAME_MAGIC, checksum=None):
    head16 = struct.pack("<IHHII", magic, msg_type, flags, len(payload), reserved)
    if checksum is None:
        checksum = xxh3_64(head16 + payload)
    return head16 + struct.pack("<Q", checksum) + payload


def write_result(name, figure, **fields):
    """Writes the test's figure as one JSON line under test/reliability/results/ (or
    $FERRY_RESULTS_DIR) and prints it."""
    rec = {"test": name, "figure": figure, "unix_time": int(time.time()), **fields}
    line = json.dumps(rec, sort_keys=True)
    if SANITIZE:
        print(f"RESULT (sanitizer build, not kept) {line}", flush=True)
        return
    d = os.environ.get("FERRY_RESULTS_DIR") or os.path.join(REPO, "test", "reliability",
                                                            "results")
    try:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f"{name}.json.tmp")
        with open(tmp, "w") as f:
            f.write(line + "\n")
        os.replace(tmp, os.path.join(d, f"{name}.json"))
    except OSError as e:
        log(f"cannot write result to {d}: {e}")
    print(f"RESULT {line}", flush=True)


class TlsLegs:
    """Mutual TLS 1.3 on both legs around a plaintext frame proxy on loopback, for the tests
    whose proxies parse and change Ferry frames (which TLS hides):

        source --TLS--> [front: socat, receiver's certificate] --> proxy
               --> [back: socat, client-a's certificate] --TLS--> receiver

    The source verifies the front as it verifies a receiver (IP SAN 127.0.0.1); the receiver
    sees client-a's verified identity (the test's access map lets it write). `back_port` is
    where the proxy connects; `front(proxy_port)` starts the front and returns its address."""

    def __init__(self, env, receiver_port):
        if shutil.which("socat") is None:
            raise TestFailure("socat is missing (scripts/install-deps installs it)")
        self.env = env
        self.back_port = free_port()
        self._back = None
        self._front = None
        self.retarget(receiver_port)

    def _tls_opts(self, cert, key):
        return (f"cert={self.env.cert(cert)},key={self.env.cert(key)},"
                f"cafile={self.env.cert('ca.pem')},verify=1,openssl-min-proto-version=TLS1.3")

    def _wait_listening(self, port, proc):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            check(proc.alive(), f"socat exited:\n{tail(proc.log_path)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TestFailure(f"socat not listening on {port}:\n{tail(proc.log_path)}")

    def retarget(self, receiver_port):
        """(Re)starts the back leg towards a receiver on `receiver_port` (after a restart)."""
        if self._back is not None:
            self._back.kill9()
        self._back = Proc(self.env, "tls-back", [
            "socat", f"TCP-LISTEN:{self.back_port},bind=127.0.0.1,reuseaddr,fork",
            f"OPENSSL:127.0.0.1:{receiver_port},{self._tls_opts(TLS_CLIENT + '.pem', TLS_CLIENT + '.key')},"
            "commonname=localhost"], self.env.path("tls-back.log"))
        self._wait_listening(self.back_port, self._back)

    def front(self, proxy_port):
        if self._front is not None:  # one front at a time: the previous proxy is gone
            self._front.kill9()
        port = free_port()
        self._front = Proc(self.env, "tls-front", [
            "socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,"
            f"{self._tls_opts('server.pem', 'server.key')}",
            f"TCP:127.0.0.1:{proxy_port}"], self.env.path("tls-front.log"))
        self._wait_listening(port, self._front)
        return f"127.0.0.1:{port}"


class CorruptingProxy:
    """A TCP proxy on loopback between `ferry replicate` and `ferry receive`. It parses the
    source's frames (24-byte header, wire.h) and, while `corrupt` is True, flips one byte in
    the payload of the first DATA frame of at least `min_payload` bytes on every connection
    (the byte `flip_from_end` bytes before the payload's end: block data, not the header).
    Replies flow back untouched. Counts what it saw and did."""

    def __init__(self, env, upstream_port, corrupt=True, min_payload=512, flip_from_end=1):
        import threading
        self.env, self.upstream_port = env, upstream_port
        self.corrupt, self.min_payload, self.flip_from_end = corrupt, min_payload, flip_from_end
        self.flipped = 0
        self.data_frames = 0
        self.connections = 0
        self.flips = []  # (connection, frame index, payload offset, old byte, new byte)
        self._lock = threading.Lock()
        self._stop = False
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        self._threads = []
        self._socks = []
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self._threads.append(t)
        env.on_cleanup(self.close)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def _accept_loop(self):
        import threading
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self._lock:
                self.connections += 1
                conn_no = self.connections
                self._socks += [c, u]
            for target, args in ((self._pump_frames, (c, u, conn_no)), (self._pump_raw, (u, c))):
                t = threading.Thread(target=target, args=args, daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _recv_exact(s, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                return bytes(buf)
            buf += chunk
        return bytes(buf)

    def _pump_raw(self, src, dst):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pump_frames(self, src, dst, conn_no):
        done_here = False
        frame_no = 0
        try:
            while True:
                head = self._recv_exact(src, FRAME_HEADER.size)
                if len(head) < FRAME_HEADER.size:
                    if head:
                        dst.sendall(head)
                    break
                magic, mtype, _flags, plen, _res, _ck = FRAME_HEADER.unpack(head)
                if magic != FRAME_MAGIC or plen > (64 << 20):
                    dst.sendall(head)  # not our framing: pass the rest through untouched
                    self._pump_raw(src, dst)
                    return
                payload = bytearray(self._recv_exact(src, plen))
                frame_no += 1
                if mtype == MSG["data"]:
                    with self._lock:
                        self.data_frames += 1
                    if (self.corrupt and not done_here and len(payload) >= self.min_payload):
                        i = len(payload) - self.flip_from_end
                        old = payload[i]
                        payload[i] ^= 0x5A
                        done_here = True
                        with self._lock:
                            self.flipped += 1
                            self.flips.append((conn_no, frame_no, i, old, payload[i]))
                dst.sendall(head + bytes(payload))
                if len(payload) < plen:
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._stop = True
        try:
            self.lsock.close()
        except OSError:
            pass
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


def str16(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<H", len(b)) + b


def encode_hello(group, disks, version=1, source_name="ferrytest", features=0):
    """HELLO payload (wire.cc): u16 version, u16 disk_count, u32 features, str16 group,
    str16 source_name, then per disk str16 name, u64 size_bytes, u32 block_bytes."""
    out = struct.pack("<HHI", version, len(disks), features) + str16(group) + str16(source_name)
    for name, size, block in disks:
        out += str16(name) + struct.pack("<QI", size, block)
    return out


def read_frames(sock, timeout=10):
    """Reads frames until the peer closes or `timeout` s pass; returns [(type, payload)] and
    whether the peer closed."""
    sock.settimeout(timeout)
    buf, frames, closed = b"", [], False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            closed = True  # over TLS, an abrupt close or an alert is a close too
            break
        if not chunk:
            closed = True
            break
        buf += chunk
        while len(buf) >= FRAME_HEADER.size:
            magic, mtype, _f, plen, _r, _c = FRAME_HEADER.unpack(buf[:FRAME_HEADER.size])
            if len(buf) < FRAME_HEADER.size + plen:
                break
            frames.append((mtype, buf[FRAME_HEADER.size:FRAME_HEADER.size + plen]))
            buf = buf[FRAME_HEADER.size + plen:]
    return frames, closed


def decode_status_message(mtype, payload):
    """(status, message) of a hello_reply or error payload."""
    if mtype == MSG["error"]:
        status, n = struct.unpack_from("<HH", payload, 0)
        return status, payload[4:4 + n].decode(errors="replace")
    if mtype == MSG["hello_reply"]:
        _v, status, _feat, _rp, _ns, _count, n = struct.unpack_from("<HHIQQHH", payload, 0)
        off = struct.calcsize("<HHIQQHH")
        return status, payload[off:off + n].decode(errors="replace")
    return None, ""
