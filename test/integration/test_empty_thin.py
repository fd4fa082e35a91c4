#!/usr/bin/env python3
"""An empty thin disk (qcow2, 1 TiB, nothing allocated): its first RP sends the whole disk as a
few zero ranges (feature zero_ranges), not one zero frame per 4 MiB. So the RP takes seconds,
a few KB on the wire and a few KB of journal, the receiver re-opens the store at once, and the
restore is a 1 TiB file that is all holes. Then a few MiB written at the far end of the disk
travel as an incremental RP whose restore holds exactly those bytes.

Also: a hand-written source shows the feature bit decides (a zero frame over 4 MiB without
zero_ranges is a bad frame; with it, ranges up to 4 GiB - 4 MiB are one record each), and a
resync (change tracking lost) sends 12 MiB of zeroed data as one zero range; an older receiver
(no zero_ranges accepted) gets zero frames of 4 MiB at most.

Before zero ranges: 262,144 zero frames, ~21 MB on the wire and ~24 MiB of journal for this
disk (5.2 million frames for 20 TiB)."""

import os
import re
import socket
import struct
import time

import ferrytest as ft

GROUP = "thin"
SIZE = 1024 * ft.GiB
WIRE_MAX = 2 * 1000 * 1000      # bytes on the wire for the first RP
JOURNAL_MAX = 4 * ft.MiB        # journal bytes allocated after it
FIRST_RP_TIMEOUT = 60           # the old code took ~10 s here; the new one ~1 s
STARTUP_MAX_S = 10


def wire_bytes(r):
    m = re.findall(r"(\d+) wire bytes", r.out + r.err)
    ft.check(m, f"replicate printed no 'N wire bytes' summary:\n{r}")
    return int(m[-1])


def journal_bytes(store):
    total = 0
    for root, _, files in os.walk(os.path.join(store, GROUP, "journal")):
        total += sum(os.lstat(os.path.join(root, f)).st_blocks * 512 for f in files)
    return total


FEATURE_ZERO_RANGES = 1 << 2
MAX_ZERO_RANGE = 0xFFC00000  # kMaxZeroRangeBytes: 4 GiB - 4 MiB


def raw_source(rx, group, size, features, zero_frames):
    """A hand-written source: hello (offering `features`), a full rp_begin of one disk of `size`
    bytes, zero frames [(offset, length)], rp_end. Returns (accepted features, rp_ack status,
    its message, the frames the receiver sent)."""
    sock = env.connect(rx.port, timeout=30)
    sock.sendall(ft.encode_frame(ft.MSG["hello"], ft.encode_hello(group, [("vda", size, 65536)],
                                                                  features=features)))
    head = ft.CorruptingProxy._recv_exact(sock, ft.FRAME_HEADER.size)
    _m, mtype, _f, plen, _r, _c = ft.FRAME_HEADER.unpack(head)
    reply = ft.CorruptingProxy._recv_exact(sock, plen)
    ft.check_eq(mtype, ft.MSG["hello_reply"], "reply to hello")
    _v, status, accepted = struct.unpack_from("<HHI", reply, 0)
    ft.check_eq(status, 0, "hello status")
    begin = struct.pack("<QQQIHH", 1, 0, time.time_ns(), 0, 1, 0) + struct.pack("<HBBQ", 0, 0, 0, size)
    sock.sendall(ft.encode_frame(ft.MSG["rp_begin"], begin))
    gid = ft.xxh3_64(group.encode())
    for seq, (off, length) in enumerate(zero_frames):
        sock.sendall(ft.encode_frame(ft.MSG["data"], struct.pack(
            "<QQQQIHBBQQ", gid, 1, seq, off, length, 0, 1, 0, 0, 0)))
    sock.sendall(ft.encode_frame(ft.MSG["rp_end"], struct.pack(
        "<QQQ", 1, len(zero_frames), sum(n for _, n in zero_frames))))
    frames = []
    while not any(t == ft.MSG["rp_ack"] for t, _ in frames):
        head = ft.CorruptingProxy._recv_exact(sock, ft.FRAME_HEADER.size)
        ft.check(len(head) == ft.FRAME_HEADER.size, f"receiver closed without rp_ack: {frames}")
        _m, mtype, _f, plen, _r, _c = ft.FRAME_HEADER.unpack(head)
        frames.append((mtype, ft.CorruptingProxy._recv_exact(sock, plen)))
    sock.close()
    ack = frames[-1][1]
    _rp, ack_status, n = struct.unpack_from("<QHH", ack, 0)
    return accepted, ack_status, ack[12:12 + n].decode(errors="replace"), frames


class OldReceiver:
    """A receiver from before zero ranges, by hand: accepts no feature, takes one RP and
    acknowledges it; records the length of every zero frame."""

    def __init__(self, env):
        self.env = env
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.zero_lengths, self.error = [], None
        import threading
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, conn):
        head = ft.CorruptingProxy._recv_exact(conn, ft.FRAME_HEADER.size)
        _m, mtype, _f, plen, _r, _c = ft.FRAME_HEADER.unpack(head)
        return mtype, ft.CorruptingProxy._recv_exact(conn, plen)

    def _serve(self):
        try:
            conn, _ = self.srv.accept()
            conn.settimeout(60)
            conn = self.env.server_wrap(conn)  # mutual TLS, as a real receiver
            mtype, _hello = self._read(conn)
            assert mtype == ft.MSG["hello"], mtype
            reply = struct.pack("<HHIQQH", 1, 0, 0, 0, 0, 0) + ft.str16("")
            conn.sendall(ft.encode_frame(ft.MSG["hello_reply"], reply))
            while True:
                mtype, payload = self._read(conn)
                if mtype == ft.MSG["data"]:
                    length, _disk, kind = struct.unpack_from("<IHB", payload, 32)
                    if kind == 1:
                        self.zero_lengths.append(length)
                elif mtype == ft.MSG["rp_end"]:
                    rp_id = struct.unpack_from("<Q", payload, 0)[0]
                    ack = struct.pack("<QH", rp_id, 0) + ft.str16("")
                    conn.sendall(ft.encode_frame(ft.MSG["rp_ack"], ack))
                    conn.close()
                    return
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


def reopen_qsd(env, old, tag):
    """qemu-storage-daemon again on the images of `old` (as test_resync.py does: Qsd() runs
    `qemu-img create`, skipped here so that the existing image is opened)."""
    import subprocess
    disks = [ft.Disk(d.name, d.size_bytes, d.fmt, d.node) for d in old.disks]
    for p in (old.qmp_path, old.test_qmp_path):
        if os.path.exists(p):
            os.unlink(p)
    real_run = subprocess.run

    def run(argv, *args, **kwargs):
        if list(argv[:2]) == ["qemu-img", "create"]:
            return subprocess.CompletedProcess(argv, 0)
        return real_run(argv, *args, **kwargs)

    subprocess.run = run
    try:
        return env.qsd(disks, tag=tag)
    finally:
        subprocess.run = real_run


def check_all_holes(path, size, allowed=()):
    """The file has `size` bytes and no data outside the `allowed` (offset, length) ranges."""
    ft.check_eq(os.path.getsize(path), size, f"size of {path}")
    with open(path, "rb") as f:
        for off, length in ft.data_extents(f.fileno(), size):
            inside = any(a <= off and off + length <= a + n for a, n in allowed)
            ft.check(inside, f"{path} holds data at {off}+{length}, outside {list(allowed)}")


with ft.Env("empty-thin") as env:
    qsd = env.qsd([ft.Disk("thin", SIZE, "qcow2")])
    thin = qsd.disks[0]
    rx = env.receiver()

    # The feature decides: an old source (no zero_ranges) sending a zero frame over 4 MiB sends
    # a bad frame; a source that offered it may send ranges up to 4 GiB - 4 MiB.
    size = 2 * MAX_ZERO_RANGE
    accepted, status, why, _ = raw_source(rx, "raw-old", size, 0, [(0, 8 * ft.MiB)])
    ft.log(f"long zero frame without the feature: rp_ack status {status}: {why}")
    ft.check_eq(accepted & FEATURE_ZERO_RANGES, 0, "zero_ranges accepted though not offered")
    ft.check(status != 0 and "zero_ranges" in why, f"refused as a bad frame naming the feature: {why}")
    ft.check_eq(env.points(rx.store, "raw-old"), [], "points after the refused RP")
    accepted, status, why, _ = raw_source(rx, "raw-new", size, FEATURE_ZERO_RANGES,
                                          [(0, MAX_ZERO_RANGE), (MAX_ZERO_RANGE, MAX_ZERO_RANGE)])
    ft.check(accepted & FEATURE_ZERO_RANGES, "the receiver accepts zero_ranges")
    ft.check_eq(status, 0, f"RP of two zero ranges acknowledged ({why})")
    d = env.points(rx.store, "raw-new")[0]["disks"][0]
    ft.check_eq((d["zero_bytes"], d["stored_bytes"]), (size, 2 * 96), "zero bytes, stored bytes")
    accepted, status, why, _ = raw_source(rx, "raw-over", size, FEATURE_ZERO_RANGES,
                                          [(0, 0xFFFFFFFF)])
    ft.check(status != 0 and "length_bytes" in why, f"a range past the bound is refused: {why}")

    t0 = time.monotonic()
    r = env.run(env.replicate_args(qsd, rx.addr, GROUP), timeout=FIRST_RP_TIMEOUT)
    took = time.monotonic() - t0
    ft.check(r.rc == 0, f"first RP of the empty disk failed:\n{r}")
    rp1 = int(r.out.split()[-1])
    wire = wire_bytes(r)
    p = {q["rp_id"]: q for q in env.points(rx.store, GROUP)}[rp1]
    d = p["disks"][0]
    jbytes = journal_bytes(rx.store)
    ft.log(f"first RP {rp1} of an empty {SIZE >> 30} GiB disk: {took:.1f} s, {wire} wire bytes, "
           f"journal {jbytes} bytes, {d}")
    ft.check(d["full"], "the first RP is a full copy")
    ft.check_eq(d["size_bytes"], SIZE, "size_bytes")
    ft.check_eq(d["zero_bytes"], SIZE, "zero_bytes (the whole disk is one zero range)")
    ft.check(wire < WIRE_MAX, f"first RP of an empty disk sent {wire} bytes (limit {WIRE_MAX}): "
                              f"zero frames of 4 MiB each?")
    ft.check(d["stored_bytes"] < 64 * 1024,
             f"the journal stores {d['stored_bytes']} bytes of records for an empty disk")
    ft.check(jbytes < JOURNAL_MAX, f"journal holds {jbytes} bytes (limit {JOURNAL_MAX})")

    # A fresh receiver scans that journal at start-up: at once.
    rx.stop()
    t0 = time.monotonic()
    rx.start()
    startup = time.monotonic() - t0
    ft.log(f"receiver start-up on that store: {startup:.2f} s")
    ft.check(startup < STARTUP_MAX_S, f"receiver took {startup:.1f} s to start")
    ft.check(f"group '{GROUP}': recovered" in rx.log_text(), "receiver logs the group recovered")

    out = env.restore(rx.store, GROUP, rp1, "thin", timeout=60)
    check_all_holes(out, SIZE)
    os.unlink(out)

    # A few MiB at the far end: an incremental of just those bytes.
    tail_off, tail_len = SIZE - 3 * ft.MiB - 8192, 3 * ft.MiB
    data = env.rng.randbytes(tail_len)
    qsd.write(thin, tail_off, data)
    qsd.write(thin, 5 * ft.GiB + 512, b"\x01" * 4096)  # one block in the middle, unaligned
    qsd.sync()
    t0 = time.monotonic()
    r = env.run(env.replicate_args(qsd, rx.addr, GROUP), timeout=120)
    ft.check(r.rc == 0, f"second RP failed:\n{r}")
    rp2 = int(r.out.split()[-1])
    p = {q["rp_id"]: q for q in env.points(rx.store, GROUP)}[rp2]
    d = p["disks"][0]
    ft.log(f"second RP {rp2}: {time.monotonic() - t0:.1f} s, {wire_bytes(r)} wire bytes, {d}")
    ft.check(not d["full"], "the second RP is incremental")
    ft.check_eq(p["base_rp"], rp1, "base of the second RP")
    ft.check(d["changed_bytes"] <= tail_len + 2 * 64 * ft.KiB + 2 * 64 * ft.KiB,
             f"second RP carried {d['changed_bytes']} bytes for {tail_len + 4096} written")

    out = env.restore(rx.store, GROUP, rp2, "thin", timeout=60)
    block = 64 * ft.KiB
    mid = (5 * ft.GiB, 2 * block)
    far = (tail_off // block * block, SIZE - tail_off // block * block)
    check_all_holes(out, SIZE, allowed=[mid, far])
    with open(out, "rb") as f:
        ft.check(os.pread(f.fileno(), tail_len, tail_off) == data, "far end restored equal")
        ft.check(os.pread(f.fileno(), 4096, 5 * ft.GiB + 512) == b"\x01" * 4096,
                 "middle block restored equal")
        ft.check(os.pread(f.fileno(), 8192, SIZE - 8192) == bytes(8192), "zeros after it")
        ft.check(os.pread(f.fileno(), 512, 5 * ft.GiB) == bytes(512), "zeros before it")
    os.unlink(out)
    qsd.stop()

    # An older receiver (no zero_ranges) never gets a zero frame longer than 4 MiB.
    q3 = env.qsd([ft.Disk("mid", 64 * ft.GiB, "qcow2")], tag="qsdold")
    old_rx = OldReceiver(env)
    env.run(env.replicate_args(q3, f"127.0.0.1:{old_rx.port}", "old-rx"), timeout=120, check_rc=0)
    old_rx.thread.join(10)
    ft.check(old_rx.error is None, f"the hand-written old receiver failed: {old_rx.error!r}")
    ft.log(f"to an old receiver: {len(old_rx.zero_lengths)} zero frames, longest "
           f"{max(old_rx.zero_lengths)} bytes")
    ft.check_eq(sum(old_rx.zero_lengths), 64 * ft.GiB, "zero bytes sent to the old receiver")
    ft.check(max(old_rx.zero_lengths) <= 4 * ft.MiB, "a zero frame over 4 MiB to an old receiver")
    q3.stop()

    # Resync (change tracking lost): blocks whose replica digest is not that of zeros and that
    # are zero on the source now travel as merged zero ranges too: 12 MiB of data zeroed while
    # tracking was lost is one zero frame, not three of 4 MiB.
    rsize, at, length = 2 * ft.GiB, ft.GiB, 12 * ft.MiB
    q2 = env.qsd([ft.Disk("vdr", rsize, "raw")], tag="qsdraw")
    qsd_write_data = env.rng.randbytes(length)
    q2.write(q2.disks[0], at, qsd_write_data)
    q2.sync()
    env.run(env.replicate_args(q2, rx.addr, "resync-zero"), timeout=120, check_rc=0)
    q2.stop()
    q2 = reopen_qsd(env, q2, "qsdraw")  # a raw disk's bitmap lived in QEMU's memory: lost
    how = q2.zero_range(q2.disks[0], at, length)
    q2.sync()
    log_before = len(rx.log_text())
    r = env.run(env.replicate_args(q2, rx.addr, "resync-zero"), timeout=120, check_rc=0)
    ft.check("resync of 1 disk(s)" in r.err + r.out, f"the RP is not a resync:\n{r}")
    rp = int(r.out.split()[-1])
    m = re.search(rf"RP {rp} committed and acknowledged \((\d+) frames", rx.log_text()[log_before:])
    ft.check(m, f"no commit line for RP {rp}:\n{rx.log_text()[log_before:]}")
    d = {q["rp_id"]: q for q in env.points(rx.store, "resync-zero")}[rp]["disks"][0]
    ft.log(f"resync RP {rp} after zeroing {length} bytes ({how}): {m[1]} frames, {d}")
    if how == "zero_range":  # a zero extent for QEMU's block status; pwrite'd zeros are data
        ft.check_eq(int(m[1]), 1, "frames of the resync RP (one zero range)")
        ft.check_eq(d["zero_bytes"], length, "zero bytes of the resync RP")
    out = env.restore(rx.store, "resync-zero", rp, "vdr", timeout=60)
    check_all_holes(out, rsize)
    os.unlink(out)
    q2.stop()
    rx.stop()
