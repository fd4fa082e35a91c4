#!/usr/bin/env python3
"""A resized disk never keeps stale or missing bytes (issue 18, item 9).

QEMU marks nothing dirty when a disk grows, so an incremental RP of a grown disk must send the
grown area from the point-in-time view itself.
1. A raw disk on a loop device (the `lvextend` + `virsh blockresize` flow): RP 1; then data is
   written into the backing file beyond the device's end, the file is grown, `losetup -c`
   and QMP `block_resize` make the device and the node larger (to a size that is not a
   multiple of 64 KiB); RP 2 must restore equal to the device byte for byte (before issue 18
   the new area restored as zeros), and so must RP 3 after a shrink with writes.
2. A qcow2 disk of an unaligned size: grown without writes, grown with writes in the new area
   and across the old end, shrunk with writes; every RP restores equal to the source.
Every RP after the first must stay an incremental (no full copy, no resync)."""

import os
import shutil
import subprocess
import time

import ferrytest as ft

BLOCK = 64 * ft.KiB


class LoopQsd:
    """qemu-storage-daemon on a raw block device (driver host_device), with a FUSE export so
    the test's writes go through QEMU (and its dirty bitmap) like a guest's."""

    def __init__(self, env, device, name="vda", tag="qsdloop"):
        self.env = env
        disk = ft.Disk(name, 0, "raw")
        disk.image = device
        disk.mount = os.path.join(env.dir, f"{tag}-{name}.fuse")
        open(disk.mount, "w").close()
        self.disks = [disk]
        self.qmp_path = os.path.join(env.dir, f"{tag}.qmp")
        self.test_qmp_path = os.path.join(env.dir, f"{tag}-test.qmp")
        argv = ["qemu-storage-daemon",
                "--blockdev", f"driver=host_device,filename={device},node-name=file0",
                "--blockdev", f"driver=raw,file=file0,node-name={disk.node}",
                "--export", f"type=fuse,id=e0,node-name={disk.node},mountpoint={disk.mount},"
                            "writable=on",
                "--chardev", f"socket,id=m0,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=m0",
                "--chardev", f"socket,id=m1,path={self.test_qmp_path},server=on,wait=off",
                "--monitor", "chardev=m1"]
        self.proc = ft.Proc(env, tag, argv, os.path.join(env.dir, f"{tag}.log"))
        env._mounts.append(disk.mount)
        deadline = time.monotonic() + 30
        while not (os.path.exists(self.qmp_path) and os.path.exists(self.test_qmp_path)
                   and ft.is_mounted(disk.mount)):
            ft.check(self.proc.alive(), f"qemu-storage-daemon exited:\n{ft.tail(self.proc.log_path)}")
            ft.check(time.monotonic() < deadline, "qemu-storage-daemon not ready in 30 s")
            time.sleep(0.05)
        disk.fd = os.open(disk.mount, os.O_RDWR)
        self.qmp = ft.Qmp(self.test_qmp_path)

    @property
    def specs(self):
        return [d.spec for d in self.disks]

    def write(self, disk, offset, data):
        ft.check(os.pwrite(disk.fd, data, offset) == len(data), "short write through FUSE")

    def sync(self):
        for d in self.disks:
            os.fsync(d.fd)

    def stop(self):
        for d in self.disks:
            if d.fd >= 0:
                os.close(d.fd)
                d.fd = -1
        self.qmp.close()
        self.proc.terminate(timeout=20)
        for d in self.disks:
            ft.unmount(d.mount)


def resize(qsd, disk, size):
    qsd.qmp.execute("block_resize", **{"node-name": disk.node, "size": size})
    disk.size_bytes = size
    # The FUSE export's size reaches the kernel when its attribute cache (1 s) expires.
    deadline = time.monotonic() + 5
    while os.fstat(disk.fd).st_size != size:
        ft.check(time.monotonic() < deadline,
                 f"FUSE mount of {disk.name} still {os.fstat(disk.fd).st_size} bytes, not {size}")
        time.sleep(0.2)


def copy_of(path, size, dest):
    """The first `size` bytes of `path` (a device or a FUSE mount) as a sparse file."""
    with open(path, "rb") as f, open(dest, "wb") as out:
        out.truncate(size)
        off = 0
        while off < size:
            buf = os.pread(f.fileno(), min(4 * ft.MiB, size - off), off)
            ft.check(buf, f"{path} ends at {off}, expected {size} bytes")
            if buf.count(0) != len(buf):
                os.pwrite(out.fileno(), buf, off)
            off += len(buf)
    return dest


def rp_equal(env, qsd, rx, group, disk, label, source, base=None):
    """One --once; the RP must be incremental (when base is given) and restore equal to the
    first disk.size_bytes bytes of `source` (the device, or the FUSE mount)."""
    qsd.sync()
    snap = copy_of(source, disk.size_bytes, env.path("snaps", f"{group}-{label}.img"))
    rp = env.replicate_once(qsd, rx.addr, group)
    p = {x["rp_id"]: x for x in env.points(rx.store, group)}[rp]
    d = p["disks"][0]
    ft.check_eq(d["size_bytes"], disk.size_bytes, f"{label}: size of RP {rp}")
    if base is not None:
        ft.check_eq(p["base_rp"], base, f"{label}: base of RP {rp}")
        ft.check(not d["full"] and "resync of" not in env.last_replicate.err,
                 f"{label}: RP {rp} is not an incremental:\n{env.last_replicate}")
    env.check_restore(rx.store, group, rp, disk.name, snap, f"({label}) ")
    os.unlink(snap)
    return rp


def loop_device_grow(env, rx, wl):
    if os.geteuid() != 0 or not shutil.which("losetup"):
        raise ft.Skip("loop devices need root and losetup")
    group = "resize-loop"
    backing = env.path("loop-backing.img")
    size1 = 24 * ft.MiB
    with open(backing, "wb") as f:
        f.truncate(size1)
        f.write(os.urandom(2 * ft.MiB))  # data the first RP must carry
    r = subprocess.run(["losetup", "-f", "--show", backing], capture_output=True, text=True)
    if r.returncode != 0:
        raise ft.Skip(f"losetup -f failed: {r.stderr.strip()}")
    device = r.stdout.strip()
    qsd = None

    def detach():
        if qsd is not None and qsd.proc.alive():
            qsd.proc.kill9()
        subprocess.run(["losetup", "-d", device], capture_output=True)
    env.on_cleanup(detach)
    qsd = LoopQsd(env, device)
    vda = qsd.disks[0]
    vda.size_bytes = size1
    ft.log(f"loop device {device} on {backing}")

    rp1 = rp_equal(env, qsd, rx, group, vda, "loop-first", device)

    # Guest writes in the old area (tracked; more than the sender's 16 MiB of read buffers, so
    # reads of the dirty extents are still in flight when the grown area's turn comes), then
    # the device grows with data already in the new area (untracked: written to the backing
    # file, as an extended LV holds old data).
    for off in range(2 * ft.MiB, 22 * ft.MiB, ft.MiB):
        qsd.write(vda, off, os.urandom(ft.MiB))
    qsd.write(vda, 5 * BLOCK + 100, os.urandom(3000))
    qsd.write(vda, size1 - 7000, os.urandom(7000))  # up to the old end
    size2 = 40 * ft.MiB + 12 * ft.KiB  # not a multiple of 64 KiB
    with open(backing, "r+b") as f:
        os.pwrite(f.fileno(), os.urandom(3 * ft.MiB), size1)           # right at the old end
        os.pwrite(f.fileno(), os.urandom(100 * ft.KiB), 33 * ft.MiB + 5)
        os.pwrite(f.fileno(), os.urandom(12 * ft.KiB), size2 - 12 * ft.KiB)  # the last bytes
        f.truncate(size2)
    subprocess.run(["losetup", "-c", device], check=True)
    resize(qsd, vda, size2)
    rp2 = rp_equal(env, qsd, rx, group, vda, "loop-grown", device, base=rp1)
    ft.check("grew since RP" in env.last_replicate.err,
             f"replicate did not report the grown disk:\n{env.last_replicate}")

    # Shrink (`lvreduce` then `blockresize`; QEMU takes a block device's size from the
    # device), with writes.
    size3 = 30 * ft.MiB + 512
    os.truncate(backing, size3)
    subprocess.run(["losetup", "-c", device], check=True)
    resize(qsd, vda, size3)
    qsd.write(vda, size3 - 300, os.urandom(300))
    qsd.write(vda, 9 * ft.MiB, os.urandom(70000))
    rp_equal(env, qsd, rx, group, vda, "loop-shrunk", device, base=rp2)
    qsd.stop()


def qcow2_resizes(env, rx, wl):
    group = "resize-qcow2"
    size1 = 16 * ft.MiB + 12 * ft.KiB
    qsd = env.qsd([ft.Disk("vdb", size1, "qcow2")], tag="qsdq")
    vdb = qsd.disks[0]
    wl.random_writes(qsd, vdb, 10, max_len=128 * ft.KiB)
    wl.write(qsd, vdb, size1 - 5000, 5000)  # up to the last byte
    rp = rp_equal(env, qsd, rx, group, vdb, "q-first", vdb.mount)

    size2 = 24 * ft.MiB + 20 * ft.KiB
    resize(qsd, vdb, size2)  # grown, nothing written: the new area reads zeros
    rp = rp_equal(env, qsd, rx, group, vdb, "q-grown-empty", vdb.mount, base=rp)

    size3 = 33 * ft.MiB + 4 * ft.KiB
    resize(qsd, vdb, size3)
    wl.write(qsd, vdb, size2 - 3000, 9000)  # across the previous end
    wl.write(qsd, vdb, 30 * ft.MiB + 7, 200 * ft.KiB)
    rp = rp_equal(env, qsd, rx, group, vdb, "q-grown-written", vdb.mount, base=rp)

    size4 = 20 * ft.MiB + 36 * ft.KiB
    resize(qsd, vdb, size4)
    wl.write(qsd, vdb, size4 - 1000, 1000)
    wl.write(qsd, vdb, 2 * ft.MiB, 64 * ft.KiB)
    rp_equal(env, qsd, rx, group, vdb, "q-shrunk", vdb.mount, base=rp)
    qsd.stop()


with ft.Env("resize") as env:
    wl = env.workload()
    rx = env.receiver()
    qcow2_resizes(env, rx, wl)
    loop_device_grow(env, rx, wl)
