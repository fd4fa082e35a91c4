#!/usr/bin/env python3
"""A disk the store's file system cannot hold is refused at rp_begin, before anything is
journalled or acknowledged (issue 18, item 2).

The store lives on a small ext4 file system (loop mount), whose largest file is 16 TiB. A
20 TiB thin qcow2 (qemu-storage-daemon) is replicated with `ferry replicate --once`:
  * the RP is refused quickly (long before its 5 million zero frames could be sent), the
    source exits 1 with a message naming the disk, its size, the limit and the fix (XFS);
  * the receiver logs the same refusal;
  * nothing reaches the store: no committed point, no replica image, the journal does not grow;
  * a small disk in another group on the same receiver still replicates and restores equal.
Then `ferry receive --max-disk-bytes 8M` refuses the small disk (16 MiB), naming the flag.
"""

import os
import shutil
import subprocess
import time

import ferrytest as ft

BIG = 20 * 1024 ** 4       # 20 TiB: above ext4's 16 TiB file size limit (4 KiB blocks)
SMALL = 16 * ft.MiB


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def images(store, group):
    d = os.path.join(store, group, "replica")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def start_receiver(env, store, extra_args, tag):
    """`ferry receive` with extra flags (ferrytest's Receiver takes none)."""
    port = ft.free_port()
    log_path = env.path(f"{tag}.log")
    proc = ft.Proc(env, tag, [env.ferry, "receive", "--listen", f"127.0.0.1:{port}",
                              "--store", store] + env.tls_receiver_args(extra_args, tag),
                   log_path)
    deadline = time.monotonic() + 20
    while not ft.pid_listens_on(proc.pid, port):
        ft.check(proc.alive(), f"{tag} exited at start:\n{ft.tail(log_path)}")
        ft.check(time.monotonic() < deadline, f"{tag} not listening after 20 s")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


with ft.Env("disk-too-big") as env:
    for tool in ("mkfs.ext4", "mount", "umount"):
        if not shutil.which(tool):
            raise ft.Skip(f"{tool} not installed")
    if os.geteuid() != 0:
        raise ft.Skip("mounting an ext4 loop file system needs root")
    t0 = time.monotonic()
    img = env.path("ext4.img")
    mnt = env.path("mnt", ".")[:-2]
    with open(img, "wb") as f:
        f.truncate(1 * ft.GiB)  # sparse; room for the journal of 5 million zero records
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True, capture_output=True)
    env.on_cleanup(lambda: subprocess.run(["umount", "-l", mnt], capture_output=True))
    r = subprocess.run(["mount", "-o", "loop", img, mnt], capture_output=True, text=True)
    if r.returncode != 0:
        raise ft.Skip(f"cannot loop-mount an ext4 image: {r.stderr.strip()}")
    store = os.path.join(mnt, "store")
    os.makedirs(store)

    big = env.qsd([ft.Disk("vda", BIG, "qcow2")], tag="big")
    small = env.qsd([ft.Disk("vdb", SMALL, "qcow2")], tag="small")
    wl = env.workload()
    wl.random_writes(small, small.disk("vdb"), 20)
    small.sync()

    rx = env.receiver(store=store)
    journal = os.path.join(store, "big", "journal")
    for attempt in (1, 2):
        r = env.run(env.replicate_args(big, rx.addr, "big"), timeout=120)
        ft.log(f"big disk, attempt {attempt}: exit {r.rc} after {r.seconds:.1f} s: "
               f"{(r.err.strip().splitlines() or [''])[-1]}")
        ft.check(r.rc == 1, f"a 20 TiB disk on ext4 must be refused (exit 1):\n{r}")
        ft.check(r.seconds < 20, f"the refusal must come at rp_begin, not after the data "
                                 f"({r.seconds:.1f} s):\n{r}")
        for word in ("'vda'", "20.0 TiB", "16.0 TiB", "XFS", "ext4"):
            ft.check(word in r.err, f"the source's error must name {word}:\n{r}")
        ft.check_eq(env.points(store, "big"), [], "committed points of the refused group")
        ft.check_eq(images(store, "big"), [], "replica images of the refused group")
        if attempt == 1:
            journal_bytes = dir_bytes(journal)
        else:
            ft.check_eq(dir_bytes(journal), journal_bytes, "journal bytes after a second refusal")
    text = rx.log_text()
    ft.check("20.0 TiB" in text and "XFS" in text and "refused" in text,
             f"the receiver must log the refusal:\n{ft.tail(rx.log_path)}")

    rp = env.replicate_once(small, rx.addr, "small")
    snap = small.snapshot(small.disk("vdb"), env.path("snaps", "vdb.img"))
    env.check_restore(store, "small", rp, "vdb", snap)
    ft.check_eq(images(store, "small"), ["vdb.img"], "replica images of the small group")
    rx.stop()

    # A configured maximum, below the small disk.
    proc, addr = start_receiver(env, store, ["--max-disk-bytes", "8M"], "receiver-max")
    r = env.run(env.replicate_args(small, addr, "small2"), timeout=60)
    ft.check(r.rc == 1, f"a 16 MiB disk over --max-disk-bytes 8M must be refused:\n{r}")
    for word in ("'vdb'", "--max-disk-bytes", "8.0 MiB"):
        ft.check(word in r.err, f"the source's error must name {word}:\n{r}")
    ft.check_eq(env.points(store, "small2"), [], "committed points over --max-disk-bytes")
    ft.check_eq(proc.terminate(), 0, "receiver exit status on SIGTERM")
    r = env.run(["receive", "--listen", "127.0.0.1:0", "--store", store,
                 "--max-disk-bytes", "12X"], timeout=20)
    ft.check(r.rc == 2 and "--max-disk-bytes" in r.err, f"a bad size must be a usage error:\n{r}")
    ft.log(f"done in {time.monotonic() - t0:.1f} s")
