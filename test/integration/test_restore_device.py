#!/usr/bin/env python3
"""Restore onto a block device (a loop device over a file) equals restore into a file, for an
RP with data, zeros written over data and holes: the device is not truncated, and every zero
range is zeroed on it (the device is filled with 0xff first, then restored over with an older
RP, so nothing stale may survive). `--point latest` equals the newest RP. A device smaller than
the disk is refused with both sizes named, before anything is written."""

import filecmp
import os
import subprocess

import ferrytest as ft

GROUP = "dev"
SIZE = 24 * ft.MiB


def losetup(env, path):
    p = subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True)
    if p.returncode != 0:
        raise ft.Skip(f"no loop device: {p.stderr.strip()}")
    dev = p.stdout.strip()
    env.on_cleanup(lambda: subprocess.run(["losetup", "-d", dev], capture_output=True))
    return dev


def read_device(dev, n, out):
    with open(dev, "rb") as f, open(out, "wb") as o:
        left = n
        while left:
            b = f.read(min(left, 4 * ft.MiB))
            ft.check(b, f"{dev} ended early")
            o.write(b)
            left -= len(b)
    return out


with ft.Env("restore-device") as env:
    wl = env.workload()
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2")])
    vda = qsd.disks[0]
    rx = env.receiver()
    wl.random_writes(qsd, vda, 20, min_len=4 * ft.KiB, max_len=512 * ft.KiB)
    wl.write(qsd, vda, 8 * ft.MiB, 2 * ft.MiB)
    rp1 = env.replicate_once(qsd, rx.addr, GROUP)
    wl.zero(qsd, vda, 8 * ft.MiB, 1 * ft.MiB, "zero_range")
    wl.zero(qsd, vda, 9 * ft.MiB + 4096, 8192, "pwrite")
    wl.random_writes(qsd, vda, 10, min_len=512, max_len=128 * ft.KiB)
    rp2 = env.replicate_once(qsd, rx.addr, GROUP)

    files = {rp: env.restore(rx.store, GROUP, rp, "vda") for rp in (rp1, rp2)}
    latest = env.restore(rx.store, GROUP, "latest", "vda",
                         out=env.path("restores", "latest.img"))
    ft.check(filecmp.cmp(latest, files[rp2], shallow=False),
             f"--point latest differs from RP {rp2}")

    backing = env.path("loop.img")
    with open(backing, "wb") as f:  # stale bytes everywhere, and one MiB past the disk's end
        for _ in range((SIZE + ft.MiB) // ft.MiB):
            f.write(b"\xff" * ft.MiB)
    dev = losetup(env, backing)
    for rp in (rp2, rp1):  # rp1 over rp2: the ranges rp2 zeroed hold data again, and back
        r = env.run(["restore", "--store", rx.store, "--group", GROUP, "--point", rp,
                     "--disk", "vda", "--out", dev], timeout=120)
        ft.check_eq(r.rc, 0, f"restore of RP {rp} to {dev}:\n{r}")
        got = read_device(dev, SIZE, env.path(f"dev-rp{rp}.img"))
        diff = ft.first_difference(files[rp], got)
        ft.check(not diff, f"restore of RP {rp} to a loop device differs from the file: {diff}")
        ft.log(f"RP {rp}: restore to {dev} equals restore to a file")
    with open(dev, "rb") as f:  # not truncated, nothing written past the disk
        f.seek(SIZE)
        ft.check_eq(f.read(ft.MiB), b"\xff" * ft.MiB, "the device's bytes past the disk")

    small = env.path("small.img")
    with open(small, "wb") as f:
        f.truncate(SIZE - ft.MiB)
    sdev = losetup(env, small)
    r = env.run(["restore", "--store", rx.store, "--group", GROUP, "--point", rp2,
                 "--disk", "vda", "--out", sdev], timeout=60)
    ft.check_eq(r.rc, 1, f"restore to a device smaller than the disk:\n{r}")
    for want in (sdev, str(SIZE - ft.MiB), str(SIZE)):
        ft.check(want in r.err, f"the error must name {want}:\n{r}")
    ft.log("a device smaller than the disk is refused naming both sizes")
