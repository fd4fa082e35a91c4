#!/usr/bin/env python3
"""A disk keeps its identity across RPs (issue 18, item 5): two disks of one size, RP 1 and 2
with `--disk drive0=root --disk drive1=data`, distinct writes to both, then RP 3 with the
names swapped (`--disk drive0=data --disk drive1=root`). Before disk identities, RP 3 was an
incremental of drive1's changes into root's replica: acknowledged and restorable with wrong
bytes. Now each disk carries an identity (a tag bitmap on its node), the receiver holds the
identity of each disk, and RP 3 is a resync of both disks: every RP restores equal to the
source, and the log names both identities. RP 4 (names kept) is incremental again. A raw
peer then finds the receiver refusing an incremental across identities on its own
(C5.identity), and an older source's hello answered as before. Last, qemu-storage-daemon is
restarted with the node names given to the other files (same command line): resyncs again,
then incrementals."""

import os
import socket
import struct
import subprocess

import ferrytest as ft

GROUP = "swap"
SIZE = 16 * ft.MiB

with ft.Env("disk-swap") as env:
    wl = env.workload()
    qsd = env.qsd([ft.Disk("d0", SIZE, "qcow2", node="drive0"),
                   ft.Disk("d1", SIZE, "qcow2", node="drive1")])
    d0, d1 = qsd.disks
    rx = env.receiver()
    straight = ["drive0=root", "drive1=data"]
    swapped = ["drive0=data", "drive1=root"]

    def snap(label, mapping):
        """{group disk name: snapshot of the node it maps to}."""
        qsd.sync()
        out = {}
        for spec in mapping:
            node, name = spec.split("=")
            disk = next(d for d in qsd.disks if d.node == node)
            out[name] = qsd.snapshot(disk, env.path("snaps", f"{label}-{name}.img"))
        return out

    def verify(rp, snaps, what):
        for name, img in sorted(snaps.items()):
            env.check_restore(rx.store, GROUP, rp, name, img, what)

    def modes(rp):
        p = next(p for p in env.points(rx.store, GROUP) if p["rp_id"] == rp)
        return {d["name"]: d for d in p["disks"]}

    kept = {}
    wl.random_writes(qsd, d0, 12, min_len=4 * ft.KiB, max_len=200 * ft.KiB)
    wl.random_writes(qsd, d1, 12, min_len=4 * ft.KiB, max_len=200 * ft.KiB)
    s = snap("rp1", straight)
    rp1 = env.replicate_once(qsd, rx.addr, GROUP, disks=straight)
    verify(rp1, s, "(RP 1) ")
    kept[rp1] = s

    wl.random_writes(qsd, d0, 8, min_len=4 * ft.KiB, max_len=100 * ft.KiB)
    wl.random_writes(qsd, d1, 8, min_len=4 * ft.KiB, max_len=100 * ft.KiB)
    s = snap("rp2", straight)
    rp2 = env.replicate_once(qsd, rx.addr, GROUP, disks=straight)
    verify(rp2, s, "(RP 2) ")
    kept[rp2] = s

    # Distinct data on both, then the names swapped on the command line.
    wl.random_writes(qsd, d0, 8, min_len=4 * ft.KiB, max_len=100 * ft.KiB)
    wl.random_writes(qsd, d1, 8, min_len=4 * ft.KiB, max_len=100 * ft.KiB)
    s = snap("rp3", swapped)
    r = env.run(env.replicate_args(qsd, rx.addr, GROUP, disks=swapped), timeout=300)
    ft.log(f"swapped run: exit {r.rc}")
    if r.rc == 0:
        rp3 = int(r.out.strip().splitlines()[-1])
        # Whatever the engine did, what it acknowledged must restore equal to the source.
        verify(rp3, s, "(RP 3, names swapped) ")
        kept[rp3] = s
        ft.check("swapped or replaced" in r.err,
                 f"the swapped run must warn that the disks were swapped or replaced:\n{r}")
        for name, d in modes(rp3).items():
            ft.check(d["mode"] in ("resync", "full"),
                     f"disk {name} of RP {rp3} (identity changed) is {d['mode']}, "
                     "never an incremental")
        # With the new names kept, the next RP is an incremental again.
        wl.random_writes(qsd, d0, 4, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
        wl.random_writes(qsd, d1, 4, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
        s = snap("rp4", swapped)
        rp4 = env.replicate_once(qsd, rx.addr, GROUP, disks=swapped)
        verify(rp4, s, "(RP 4, after the swap) ")
        kept[rp4] = s
        for name, d in modes(rp4).items():
            ft.check_eq(d["mode"], "incremental", f"mode of {name} in RP {rp4}")
    else:
        # Refused: it must say why, naming both identities, and commit nothing.
        ft.check("identity" in r.err, f"the refusal must name the identities:\n{r}")
        ft.check_eq(max(p["rp_id"] for p in env.points(rx.store, GROUP)), rp2,
                    "last RP after the refused swap")

    # The receiver enforces the rule on its own (a source that ignored the identities): an
    # incremental with the held identities swapped is refused by C5.identity; a source
    # without the feature (an older release) gets the hello_reply of before, byte for byte.
    def one_frame(sock):
        hdr = b""
        while len(hdr) < ft.FRAME_HEADER.size:
            chunk = sock.recv(ft.FRAME_HEADER.size - len(hdr))
            ft.check(chunk, "the receiver closed the connection")
            hdr += chunk
        _m, mtype, _f, plen, _r, _c = ft.FRAME_HEADER.unpack(hdr)
        body = b""
        while len(body) < plen:
            chunk = sock.recv(plen - len(body))
            ft.check(chunk, "the receiver closed the connection mid-frame")
            body += chunk
        return mtype, body

    def hello_reply(features):
        sock = env.connect(rx.port, timeout=20)
        hello = ft.encode_hello(GROUP, [("root", SIZE, 65536), ("data", SIZE, 65536)],
                                features=features)
        sock.sendall(ft.encode_frame(ft.MSG["hello"], hello))
        mtype, body = one_frame(sock)
        ft.check_eq(mtype, ft.MSG["hello_reply"], "reply to hello")
        _v, status, feat, last, _ns, count, n = struct.unpack_from("<HHIQQHH", body, 0)
        ft.check_eq(status, 0, "hello_reply status")
        off = struct.calcsize("<HHIQQHH") + n
        names = []
        for _ in range(count):
            ln, = struct.unpack_from("<H", body, off)
            names.append(body[off + 2:off + 2 + ln].decode())
            off += 2 + ln + 8
        return sock, feat, last, names, body, off

    sock, feat, last, names, body, off = hello_reply(0)
    ft.check_eq(feat, 0, "features accepted for a source that offers none")
    ft.check_eq(len(body), off, "hello_reply length for an older source (no identity bytes)")
    sock.close()

    sock, feat, last, names, body, off = hello_reply(2 | 8)
    ft.check_eq(feat, 2 | 8, "features accepted (hash_list, disk_identity)")
    ln, = struct.unpack_from("<H", body, off)
    held_source = body[off + 2:off + 2 + ln].decode()
    off += 2 + ln
    ids = {}
    for name in names:
        flags, lo, hi = struct.unpack_from("<BQQ", body, off)
        off += 17
        ids[name] = (lo, hi)
        ft.check(flags == 0 and (lo or hi), f"identity of {name} in hello_reply: {flags} {lo} {hi}")
    ft.check_eq(len(body), off, "hello_reply length with identities")
    ft.check(held_source.endswith(qsd.qmp_path), f"held source {held_source!r}")
    begin = struct.pack("<QQQIHH", last + 1, last, 1, 2, 2, 0)
    for i in range(2):
        begin += struct.pack("<HBBQ", i, 1, 0, SIZE)  # incremental
    for name in ("data", "root"):  # root's slot gets data's identity and the reverse
        begin += struct.pack("<BQQ", 0, *ids[name])
    sock.sendall(ft.encode_frame(ft.MSG["rp_begin"], begin))
    mtype, body = one_frame(sock)
    ft.check_eq(mtype, ft.MSG["rp_ack"], "answer to an incremental across identities")
    _rp, status, n = struct.unpack_from("<QHH", body, 0)
    msg = body[12:12 + n].decode(errors="replace")
    ft.check(status == 3 and "C5.identity" in msg, f"rp_ack {status}: {msg}")
    ft.log(f"receiver refused: {msg}")
    sock.close()
    ft.check_eq(max(p["rp_id"] for p in env.points(rx.store, GROUP)), last,
                "last RP after the refused incremental")

    # The same command line, but qemu-storage-daemon restarted with the node names given to
    # the other files: each image brings its own identity tag (stored at the clean stop) and
    # its own ferry.G.<k> bitmap, so both disks are resyncs, never incrementals.
    qsd.stop()
    for p in (qsd.qmp_path, qsd.test_qmp_path):
        if os.path.exists(p):
            os.unlink(p)
    real_run = subprocess.run

    def keep_images(argv, *args, **kwargs):
        if list(argv[:2]) == ["qemu-img", "create"]:
            return subprocess.CompletedProcess(argv, 0)
        return real_run(argv, *args, **kwargs)

    subprocess.run = keep_images
    try:  # an image is named after the Disk's name: d0's file now sits under node drive1
        qsd = env.qsd([ft.Disk("d0", SIZE, "qcow2", node="drive1"),
                       ft.Disk("d1", SIZE, "qcow2", node="drive0")])
    finally:
        subprocess.run = real_run
    d0, d1 = qsd.disks[1], qsd.disks[0]  # by node: drive0, drive1
    wl.random_writes(qsd, d0, 6, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
    wl.random_writes(qsd, d1, 6, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
    for mapping, label in ((swapped, "files moved"), (swapped, "after the move")):
        s = snap(label.replace(" ", "-"), mapping)
        r = env.run(env.replicate_args(qsd, rx.addr, GROUP, disks=mapping), timeout=300)
        ft.check(r.rc == 0, f"replicate ({label}) failed:\n{r}")
        rp = int(r.out.strip().splitlines()[-1])
        verify(rp, s, f"(RP {rp}, {label}) ")
        kept[rp] = s
        want = ("resync", "full") if label == "files moved" else ("incremental",)
        for name, d in modes(rp).items():
            ft.check(d["mode"] in want, f"disk {name} of RP {rp} ({label}) is {d['mode']}")
        wl.random_writes(qsd, d0, 3, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
        wl.random_writes(qsd, d1, 3, min_len=4 * ft.KiB, max_len=64 * ft.KiB)

    # Nothing acknowledged restores wrong, in the end either.
    for rp, s in sorted(kept.items()):
        verify(rp, s, "(at the end) ")
    qsd.stop()
    rx.stop()
