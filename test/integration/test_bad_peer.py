#!/usr/bin/env python3
"""Hostile or broken peers on the receiver's port: random garbage, a truncated header, a frame
that announces a payload above the limit, a HELLO with a bad checksum, a DATA frame before any
HELLO, and a well-formed HELLO of protocol version 2. For each: the receiver closes that
connection promptly, logs a clear error naming the problem, stays alive, and commits nothing;
a wrong version gets a reply with status bad_version. A peer that sends half a header and then
hangs must not block a real source: `ferry replicate --once` still works meanwhile."""

import json
import re
import socket
import struct
import time

import ferrytest as ft

GROUP = "bp"
BAD_VERSION, BAD_REQUEST = 1, 2

with ft.Env("bad-peer") as env:
    rng = env.rng
    qsd = env.qsd([ft.Disk("vda", 32 * ft.MiB, "qcow2")])
    rx = env.receiver()
    hello_v1 = ft.encode_hello(GROUP, [("vda", 32 * ft.MiB, 65536)])
    hello_v2 = ft.encode_hello(GROUP, [("vda", 32 * ft.MiB, 65536)], version=2)
    good_hello_frame = ft.encode_frame(ft.MSG["hello"], hello_v1)
    bad_ck = bytearray(good_hello_frame)
    bad_ck[-1] ^= 0x01  # payload byte: the checksum no longer matches

    cases = [
        # name, bytes, regex the new receiver log lines must match, expected reply status
        ("garbage", rng.randbytes(4096), r"magic", None),
        ("short-header-then-close", b"FRY1\x01\x00", r"closed|truncated|short|eof|before hello", None),
        ("oversized-payload", ft.FRAME_HEADER.pack(ft.FRAME_MAGIC, ft.MSG["hello"], 0,
                                                   0xFFFFFFF0, 0, 0), r"payload_bytes", None),
        ("unknown-type", ft.encode_frame(99, b"x" * 8), r"type", None),
        ("bad-checksum-hello", bytes(bad_ck), r"checksum", None),
        ("data-before-hello", ft.encode_frame(ft.MSG["data"], b"\0" * 64), r"expected hello",
         BAD_REQUEST),
        ("hello-version-2", ft.encode_frame(ft.MSG["hello"], hello_v2), r"version 2", BAD_VERSION),
    ]
    for name, data, pattern, want_status in cases:
        log_at = len(rx.log_text())
        t0 = time.monotonic()
        with env.connect(rx.port, timeout=10) as s:
            s.sendall(data)
            if name == "short-header-then-close" and env.tls:
                # TLS has no half-close a test can drive from Python's ssl: close both ways.
                s.close()
                frames, closed = [], True
            else:
                if name == "short-header-then-close":
                    s.shutdown(socket.SHUT_WR)
                frames, closed = ft.read_frames(s, timeout=15)
        took = time.monotonic() - t0
        ft.check(closed, f"{name}: the receiver kept the connection open for {took:.0f}s")
        replies = [ft.decode_status_message(t, p) for t, p in frames]
        ft.log(f"{name}: closed after {took:.2f}s, replies {replies}")
        if want_status is not None:
            ft.check(any(st == want_status for st, _ in replies),
                     f"{name}: expected a reply with status {want_status}, got {replies}")
        time.sleep(0.3)  # let the log line land
        new_log = rx.log_text()[log_at:]
        ft.check(re.search(pattern, new_log, re.I),
                 f"{name}: receiver log has no line matching /{pattern}/:\n{new_log[-2000:]}")
        ft.check(rx.alive(), f"{name}: the receiver died:\n{ft.tail(rx.log_path)}")

    r = env.run(["points", "--store", rx.store, "--group", GROUP, "--json"], timeout=30)
    ft.check(r.rc == 1 or (r.rc == 0 and json.loads(r.out) == []),
             f"bad peers committed something (or points failed oddly):\n{r}")

    # A peer stuck half-way through a header must not block a real source.
    stuck = env.connect(rx.port, timeout=10)
    stuck.sendall(good_hello_frame[:10])
    wl = env.workload()
    wl.random_writes(qsd, qsd.disks[0], 10)
    hist = ft.History(env, rx.store, GROUP)
    snaps = hist.snapshot_all(qsd, "good")
    rp = env.replicate_once(qsd, rx.addr, GROUP, timeout=120)
    hist.record(rp, snaps)
    hist.verify()
    stuck.close()
    ft.check(rx.alive(), "receiver alive at the end")
    qsd.stop()
    rx.stop()
