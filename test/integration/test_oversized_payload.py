#!/usr/bin/env python3
"""A zstd DATA frame whose payload is larger than the journal's record limit (4 MiB + 64 KiB)
but within the wire's 8 MiB frame bound is a bad frame from the peer (issue 18, item 7).

A hand-written client sends hello, rp_begin and one such frame: a valid zstd frame of a
4 MiB block followed by a 1 MiB skippable frame (it decodes to the right bytes, so only the
size check can catch it). The receiver must refuse the RP as a bad frame in its own frame
checks, before the store sees it: its log says "bad frame", and it does not report a storage
failure or re-open the group's store (a re-open re-scans the whole journal: a cheap lever for
a hostile peer). Then a real source commits an RP to the same group."""

import ctypes
import os
import socket
import struct
import time

import ferrytest as ft

GROUP = "oversized"
SIZE = 8 * ft.MiB
BLOCK = 4 * ft.MiB
JOURNAL_LIMIT = 4 * ft.MiB + 64 * ft.KiB


class Xxh128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


def xxh3_128(data):
    ft.xxh3_64(b"")  # loads libxxhash (or skips)
    lib = ft._xxh
    lib.XXH3_128bits.restype = Xxh128
    lib.XXH3_128bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    h = lib.XXH3_128bits(bytes(data), len(data))
    return h.low64, h.high64


def zstd_raw_frame(data):
    """A zstd frame of raw (stored) blocks with its content size: RFC 8878, no library."""
    out = struct.pack("<I", 0xFD2FB528) + bytes([0xA0]) + struct.pack("<I", len(data))
    step = 128 * 1024
    for off in range(0, len(data), step):
        chunk = data[off:off + step]
        last = 1 if off + step >= len(data) else 0
        hdr = last | (0 << 1) | (len(chunk) << 3)
        out += struct.pack("<I", hdr)[:3] + chunk
    return out


def skippable_frame(n):
    return struct.pack("<II", 0x184D2A50, n) + bytes(n)


def recv_frame(sock):
    head = ft.CorruptingProxy._recv_exact(sock, ft.FRAME_HEADER.size)
    ft.check(len(head) == ft.FRAME_HEADER.size, "receiver closed before replying")
    _magic, mtype, _f, plen, _r, _c = ft.FRAME_HEADER.unpack(head)
    return mtype, ft.CorruptingProxy._recv_exact(sock, plen)


with ft.Env("oversized-payload") as env:
    t0 = time.monotonic()
    rx = env.receiver()
    sock = env.connect(rx.port, timeout=30)
    sock.sendall(ft.encode_frame(ft.MSG["hello"],
                                 ft.encode_hello(GROUP, [("vda", SIZE, 64 * ft.KiB)])))
    mtype, payload = recv_frame(sock)
    ft.check_eq(mtype, ft.MSG["hello_reply"], "reply to hello")
    status, msg = ft.decode_status_message(mtype, payload)
    ft.check_eq(status, 0, f"hello status ({msg})")
    rp_begin = struct.pack("<QQQIHH", 1, 0, time.time_ns(), 0, 1, 0)
    rp_begin += struct.pack("<HBBQ", 0, 0, 0, SIZE)  # disk 0, full
    sock.sendall(ft.encode_frame(ft.MSG["rp_begin"], rp_begin))

    block = os.urandom(BLOCK)
    zpayload = zstd_raw_frame(block) + skippable_frame(1 * ft.MiB)
    ft.check(JOURNAL_LIMIT < len(zpayload) < 8 * ft.MiB - 64,
             f"payload of {len(zpayload)} bytes must lie between the two limits")
    lo, hi = xxh3_128(block)
    group_id = ft.xxh3_64(GROUP.encode())
    data = struct.pack("<QQQQIHBBQQ", group_id, 1, 0, 0, BLOCK, 0, 0, 1, lo, hi) + zpayload
    log_before = len(rx.log_text())
    sock.sendall(ft.encode_frame(ft.MSG["data"], data))
    frames, closed = ft.read_frames(sock, timeout=15)
    sock.close()
    ft.log(f"receiver answered {[t for t, _ in frames]}, closed={closed}")
    acks = [p for t, p in frames if t == ft.MSG["rp_ack"]]
    ft.check(acks, f"the receiver must refuse the RP with an rp_ack: {frames}")
    rp_id, status = struct.unpack_from("<QH", acks[0], 0)
    n = struct.unpack_from("<H", acks[0], 10)[0]
    why = acks[0][12:12 + n].decode(errors="replace")
    ft.log(f"rp_ack: RP {rp_id}, status {status}: {why}")
    ft.check(status != 0, "the RP must not be acknowledged")
    ft.check(status != 4, f"must not be reported as a receiver I/O error: {why}")

    deadline = time.monotonic() + 5
    while "refused" not in rx.log_text()[log_before:] and time.monotonic() < deadline:
        time.sleep(0.1)
    new_log = rx.log_text()[log_before:]
    ft.check("bad frame" in new_log, f"the receiver must log a bad frame:\n{new_log}")
    for wrong in ("store failed", "the store failed", "re-open"):
        ft.check(wrong not in new_log,
                 f"a bad frame must not be handled as a storage failure ({wrong!r}):\n{new_log}")
    ft.check_eq(env.points(rx.store, GROUP), [], "committed points")

    # The group is not stuck: a real source commits to it at once.
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2")])
    env.workload().random_writes(qsd, qsd.disk("vda"), 10)
    rp = env.replicate_once(qsd, rx.addr, GROUP)
    env.check_restore(rx.store, GROUP, rp, "vda",
                      qsd.snapshot(qsd.disk("vda"), env.path("snaps", "vda.img")))
    new_log = rx.log_text()[log_before:]
    ft.check("recovery" not in new_log and "recovered" not in new_log,
             f"the group's store must not have been re-opened:\n{new_log}")
    rx.stop()
    ft.log(f"done in {time.monotonic() - t0:.1f} s")
