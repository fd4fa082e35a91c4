#!/usr/bin/env python3
"""A lost acknowledgement costs no full read (issue 18, item 8).

A relay between `ferry replicate` and `ferry receive` forwards everything but cuts the
connection at one frame:
1. "ack": the receiver's rp_ack. The receiver committed the RP, the source never heard of it
   and fails. The next `--once`, straight to the receiver (which now says: last committed =
   that RP), must be an ordinary incremental on it: no "change tracking lost", no resync, and
   it reads no more than the blocks written since.
2. "end": the source's rp_end. The receiver never commits; the next `--once` is an
   incremental on the older RP and carries the writes of both intervals.
One qcow2 disk (persistent bitmap) and one raw disk (bitmap in QEMU's memory). Every RP is
restored and compared with the source; afterwards each disk holds one Ferry bitmap."""

import re
import socket
import threading

import ferrytest as ft

GROUP = "lostack"
BLOCK = 64 * ft.KiB


class CuttingRelay:
    """Loopback TCP relay that parses frames (24-byte headers, wire.h) in both directions and,
    on the first connection, closes both sides instead of forwarding the first frame of type
    `cut_type` travelling in direction `cut_dir` ("to_source" or "to_receiver")."""

    def __init__(self, env, upstream_port, cut_dir, cut_type):
        self.upstream_port, self.cut_dir, self.cut_type = upstream_port, cut_dir, cut_type
        self.cut = threading.Event()
        self._socks = []
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        env.on_cleanup(self.close)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def _accept(self):
        try:
            c, _ = self.lsock.accept()
            u = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            u.settimeout(None)
        except OSError:
            return
        self._socks += [c, u]
        threading.Thread(target=self._pump, args=(c, u, "to_receiver"), daemon=True).start()
        threading.Thread(target=self._pump, args=(u, c, "to_source"), daemon=True).start()

    @staticmethod
    def _recv_exact(s, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    def _pump(self, src, dst, direction):
        try:
            while not self.cut.is_set():
                head = self._recv_exact(src, ft.FRAME_HEADER.size)
                if len(head) < ft.FRAME_HEADER.size:
                    break
                magic, mtype, _flags, plen, _res, _ck = ft.FRAME_HEADER.unpack(head)
                ft.check(magic == ft.FRAME_MAGIC, f"relay: bad frame magic {magic:#x}")
                payload = self._recv_exact(src, plen)
                if direction == self.cut_dir and mtype == self.cut_type:
                    self.cut.set()
                    break
                dst.sendall(head + payload)
        except OSError:
            pass
        self.close()

    def close(self):
        for s in [self.lsock] + self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass


def read_bytes(result):
    m = re.findall(r"MB zero, (\d+) bytes read\)", result.err + result.out)
    ft.check(m, f"replicate did not report the bytes it read:\n{result}")
    return int(m[-1])


# Mutual TLS on both legs (ft.TlsLegs): the relay sits where the frames are visible and cuts
# the connection at one of them; the TLS legs carry the cut to both ends.
with ft.Env("lost-ack") as env:
    wl = env.workload()
    qsd = env.qsd([ft.Disk("vda", 64 * ft.MiB, "qcow2"), ft.Disk("vdb", 32 * ft.MiB, "raw")])
    rx = env.receiver()
    legs = ft.TlsLegs(env, rx.port)
    hist = ft.History(env, rx.store, GROUP)

    def writes(n):
        for d in qsd.disks:
            wl.random_writes(qsd, d, n, max_len=128 * ft.KiB)

    def touched():
        return sum(wl.take_touched(i) for i in range(len(qsd.disks)))

    def cut_rp(label, cut_dir, cut_type):
        """One --once through a relay that cuts at the given frame; it must fail."""
        relay = CuttingRelay(env, legs.back_port, cut_dir, cut_type)
        front = legs.front(relay.port)
        snaps = hist.snapshot_all(qsd, label)
        r = env.run(env.replicate_args(qsd, front, GROUP), timeout=120)
        ft.check(relay.cut.is_set(), f"{label}: the relay never saw the frame to cut:\n{r}")
        ft.check(r.rc != 0, f"{label}: replicate succeeded although its ack was cut:\n{r}")
        relay.close()
        return snaps

    def incremental_rp(label, base, max_read):
        snaps = hist.snapshot_all(qsd, label)
        rp = env.replicate_once(qsd, rx.addr, GROUP)
        hist.record(rp, snaps)
        p = hist.verify(rps=[rp], what=f"({label}) ")[rp]
        r = env.last_replicate
        ft.check_eq(p["base_rp"], base, f"base of RP {rp} ({label})")
        ft.check("change tracking lost" not in r.err and "resync of" not in r.err,
                 f"{label}: RP {rp} lost change tracking:\n{r}")
        for d in p["disks"]:
            ft.check(not d["full"], f"{label}: RP {rp} is full for {d}")
        ft.check(r.err.count("incremental [H6]") == len(qsd.disks),
                 f"{label}: not every disk was an incremental by H6:\n{r}")
        got = read_bytes(r)
        ft.check(got <= max_read, f"{label}: RP {rp} read {got} bytes, at most {max_read} "
                                  f"were written since its base")
        ft.log(f"{label}: RP {rp} on {base} read {got} bytes ({max_read} bytes written)")
        return rp

    writes(8)
    snaps = hist.snapshot_all(qsd, "first")
    hist.record(env.replicate_once(qsd, rx.addr, GROUP), snaps)
    touched()

    # 1. The receiver commits, the rp_ack never reaches the source.
    writes(6)
    snaps = cut_rp("ack-lost", "to_source", ft.MSG["rp_ack"])
    pts = {p["rp_id"]: p for p in env.points(rx.store, GROUP)}
    committed = max(pts)
    ft.check_eq(committed, hist.acked[-1] + 1, "RP committed behind the lost ack")
    hist.record(committed, snaps)
    hist.verify(rps=[committed], what="(committed, ack lost) ")
    touched()
    writes(5)
    rp = incremental_rp("after-lost-ack", committed, touched())

    # 2. The receiver never sees rp_end: nothing is committed, both intervals go next time.
    writes(4)
    cut_rp("end-lost", "to_receiver", ft.MSG["rp_end"])
    ft.check_eq(max(p["rp_id"] for p in env.points(rx.store, GROUP)), rp,
                "last committed RP after a cut rp_end")
    writes(4)
    incremental_rp("after-lost-end", rp, touched())

    # RP bitmaps; the identity tag ferry.G.id.<hex> names the disk and stays, one per disk.
    tags = {d.name: [b for b in qsd.qmp.bitmaps(d.node) if b.startswith(f"ferry.{GROUP}.id.")]
            for d in qsd.disks}
    ft.check(all(len(v) == 1 for v in tags.values()), f"identity tags: {tags}")
    left = {d.name: sorted(b for b in qsd.qmp.bitmaps(d.node)
                           if b.startswith(f"ferry.{GROUP}.") and b not in tags[d.name])
            for d in qsd.disks}
    ft.check(all(len(v) == 1 for v in left.values()), f"Ferry bitmaps left: {left}")
