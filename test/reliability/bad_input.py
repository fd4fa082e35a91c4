#!/usr/bin/env python3
"""Bad input never reaches the replica (C3).

Part 1, the wire: a proxy between `ferry replicate` and `ferry receive` damages one frame per
connection: flips a bit in its header, flips a bit in its payload, truncates it (the stream
goes on), makes its length field larger than the payload (the stream goes on with as many
more bytes), larger than the 8 MiB bound, or smaller than the payload (each must be rejected
by the frame decoder, before anything reaches the journal), splices in a DATA frame of another group's stream, replays a DATA frame of an older
RP, cuts the connection mid-frame, duplicates a frame, swaps two frames. Every case: replicate
fails, `ferry points` is unchanged, the replica still equals the last committed RP (oracle),
the receiver stays up; then a clean run through the same proxy commits and equals the source.

Part 2, the journal on disk (receiver stopped): bytes flipped in a committed block record
(header and payload), in one copy of an older commit record, in one copy of the last commit
record, in both copies of the last commit record, in the segment header, in the state file,
and garbage appended to the tail. At restart the receiver either refuses the group with an
error naming the segment and offset (both commit copies: R15), or recovers per the table (R1
cut a torn tail, R6 rebuild from the journal, R14 the other commit copy) with every
acknowledged RP still committed and restorable; `points`/`restore` either fail loudly (only
when refused) or give exactly a committed RP of the catalog, and the replica equals a
committed RP.
Figure: "frames corrupted C, detected 100%; journal corruptions J, detected 100%"."""

import os
import re
import shutil
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oracle  # noqa: E402
from oracle import ft  # noqa: E402

TEST = "bad-input"
GROUP, OTHER = "bi", "bi2"
SIZE = 16 * ft.MiB
WIRE_CASES = ["header-bit", "payload-bit", "truncate", "length-longer", "length-over-max",
              "length-shorter", "splice-other-group", "replay-old-rp", "cut-mid-frame",
              "duplicate", "reorder"]
# Frame length field cases: the frame decoder (transport) must reject them, so the receiver's
# log must say "bad frame" (nothing of that frame reached the engine or the journal).
LENGTH_CASES = ("length-longer", "length-over-max", "length-shorter")
MAX_FRAME_PAYLOAD = 8 << 20  # kMaxPayloadBytes, docs/wire-protocol.md


class MutatingProxy:
    """Frame-aware proxy (source -> receiver direction); replies pass untouched. Per
    connection it records the source's frames and applies `case` once, at the `target`-th DATA
    frame."""

    def __init__(self, env, upstream_port, rng):
        self.upstream_port, self.rng = upstream_port, rng
        self.case, self.target = None, 1
        self.inject = None  # a raw frame for splice / replay
        self.mutated = []   # (case, detail)
        self.last_capture = []  # raw frames of the last connection
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()
        env.on_cleanup(self.close)

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def close(self):
        self._stop = True
        self.lsock.close()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
                u = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
                u.settimeout(None)
            except OSError:
                continue
            threading.Thread(target=self._down, args=(u, c), daemon=True).start()
            threading.Thread(target=self._up, args=(c, u, self.case, self.target),
                             daemon=True).start()

    @staticmethod
    def _shut(*socks):
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _down(self, src, dst):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                dst.sendall(b)
        except OSError:
            pass
        self._shut(src, dst)

    def _frames(self, src):
        while True:
            head = ft.CorruptingProxy._recv_exact(src, ft.FRAME_HEADER.size)
            if len(head) < ft.FRAME_HEADER.size:
                return
            plen = ft.FRAME_HEADER.unpack(head)[3]
            yield head, ft.CorruptingProxy._recv_exact(src, plen)

    def _up(self, src, dst, case, target):
        capture, ndata, done, held = [], 0, False, None
        try:
            for head, payload in self._frames(src):
                frame = head + payload
                capture.append(frame)
                mtype = ft.FRAME_HEADER.unpack(head)[1]
                if mtype == ft.MSG["data"]:
                    ndata += 1
                if held is not None:  # reorder: the held frame goes after this one
                    dst.sendall(frame + held)
                    held = None
                    continue
                if case is None or done or mtype != ft.MSG["data"] or ndata != target:
                    dst.sendall(frame)
                    continue
                done = True
                out = self._mutate(case, head, payload)
                if out is None:  # cut: half the frame, then close both ways
                    dst.sendall(frame[:len(frame) // 2])
                    self.mutated.append((case, f"cut at byte {len(frame) // 2}"))
                    break
                if out == "hold":
                    held = frame
                    self.mutated.append((case, f"data frame {ndata} swapped with the next"))
                    continue
                dst.sendall(out)
        except OSError:
            pass
        if case is None:
            self.last_capture = capture
        self._shut(src, dst)

    def _mutate(self, case, head, payload):
        rng = self.rng
        if case == "header-bit":
            # magic, type, flags, reserved or checksum (a flipped length desyncs the stream:
            # a bit that shrinks it is chosen when the length field is hit)
            field = rng.choice(["magic", "type", "flags", "len", "reserved", "checksum"])
            lo, hi = {"magic": (0, 4), "type": (4, 6), "flags": (6, 8), "len": (8, 12),
                      "reserved": (12, 16), "checksum": (16, 24)}[field]
            h = bytearray(head)
            if field == "len":
                plen = struct.unpack_from("<I", h, 8)[0]
                bits = [b for b in range(32) if plen >> b & 1]
                struct.pack_into("<I", h, 8, plen ^ (1 << rng.choice(bits)))
            else:
                i = rng.randrange(lo, hi)
                h[i] ^= 1 << rng.randrange(8)
            self.mutated.append((case, f"{field} bit"))
            return bytes(h) + payload
        if case == "payload-bit":
            p = bytearray(payload)
            i = rng.randrange(len(p))
            p[i] ^= 1 << rng.randrange(8)
            self.mutated.append((case, f"payload byte {i} of {len(p)}"))
            return head + bytes(p)
        if case == "truncate":
            n = rng.randrange(0, len(payload))
            self.mutated.append((case, f"payload cut to {n} of {len(payload)} bytes"))
            return head + payload[:n]
        if case in LENGTH_CASES:
            h = bytearray(head)
            plen = struct.unpack_from("<I", h, 8)[0]
            if case == "length-longer":
                # the bytes after the frame follow, as the rest of a live stream would
                more = rng.choice([1, rng.randint(2, 4096), rng.randint(4097, 1 << 20)])
                struct.pack_into("<I", h, 8, plen + more)
                self.mutated.append((case, f"length {plen} -> {plen + more}, {more} more "
                                           f"bytes follow"))
                return bytes(h) + payload + rng.randbytes(more)
            if case == "length-over-max":
                big = rng.randint(MAX_FRAME_PAYLOAD + 1, (1 << 32) - 1)
                struct.pack_into("<I", h, 8, big)
                self.mutated.append((case, f"length {plen} -> {big}"))
                return bytes(h) + payload
            less = rng.randint(1, plen)
            struct.pack_into("<I", h, 8, plen - less)
            self.mutated.append((case, f"length {plen} -> {plen - less}"))
            return bytes(h) + payload
        if case in ("splice-other-group", "replay-old-rp"):
            self.mutated.append((case, f"replaced by a {len(self.inject)}-byte frame"))
            return self.inject
        if case == "duplicate":
            self.mutated.append((case, "sent twice"))
            return head + payload + head + payload
        if case == "reorder":
            return "hold"
        if case == "cut-mid-frame":
            return None
        raise AssertionError(case)


def data_frames(capture):
    return [f for f in capture if ft.FRAME_HEADER.unpack(f[:24])[1] == ft.MSG["data"]]


# -- journal layout (docs/journal-format.md) --
SEG_MAGIC = 0x4745534a59525246
REC_MAGIC = 0x524a5946
REC_HEADER = 96
TYPES = {1: "rp_begin", 2: "block", 3: "rp_commit", 4: "rp_abort", 5: "padding",
         6: "rp_commit_mirror"}


def records(seg):
    """[(offset, type name, total bytes)] of a segment's records, in file order."""
    with open(seg, "rb") as f:
        data = f.read()
    out, pos = [], 4096
    while pos + REC_HEADER <= len(data):
        magic, rtype, _k, _c, _z, total = struct.unpack_from("<IBBBBI", data, pos)
        if magic != REC_MAGIC or total < REC_HEADER:
            if pos % 4096:
                pos += -pos % 4096
                continue
            break
        out.append((pos, TYPES.get(rtype, str(rtype)), total))
        pos += total
        if rtype in (3, 6):  # each copy of a commit record is zero-filled to its block end
            pos += -pos % 4096
    return out


def flip(path, offset, rng):
    with open(path, "r+b") as f:
        b = os.pread(f.fileno(), 1, offset)
        os.pwrite(f.fileno(), bytes([b[0] ^ (1 << rng.randrange(8))]), offset)


# The proxy parses Ferry frames (bit flips, truncation, splices, replays), which TLS hides by
# design (its record MAC would reject a flip on the wire before Ferry's checks): so it sits
# between two TLS legs (below), as a bug or a bad disk inside either end would.
with ft.Env(TEST) as env:
    rng = env.rng
    t_start = time.monotonic()
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2")])
    disks = {"vda": (0, SIZE)}
    wr, cat = oracle.Writer(env.seed, disks), oracle.Catalog(env.seed, disks)
    rx = env.receiver()
    # Mutual TLS on both legs (ft.TlsLegs): the proxy mutates frames where they are visible,
    # between a TLS terminator and a TLS originator; the receiver sees a verified identity.
    legs = ft.TlsLegs(env, rx.port)
    proxy = MutatingProxy(env, legs.back_port, rng)
    front = legs.front(proxy.port)
    replica = {"vda": os.path.join(rx.store, GROUP, "replica", "vda.img")}
    acked = []
    stats = {"frames_corrupted": 0, "frames_detected": 0, "frames_committed": 0,
             "journal_corruptions": 0, "journal_detected": 0, "journal_refused": 0,
             "journal_recovered_per_table": 0, "violations": 0, "clean_runs": 0,
             "points_listed_fewer_silently": 0, "restores_failed_loudly": 0}
    per_case = {}

    def write_spread():
        # runs in different 64 KiB blocks: several DATA frames per RP
        for _ in range(rng.randint(6, 12)):
            first = rng.randrange(0, SIZE // 4096 - 16)
            wr.write_blocks(qsd, "vda", first, rng.randint(1, 16))
        qsd.sync()

    def replica_settled(k, what):
        """The newest RP reads back as committed RP k, and the replica images hold the oldest
        kept RP (layout 2: the base; compaction runs just after the ack: wait for it)."""
        deadline = time.monotonic() + 10
        while True:
            latest = env.restore(rx.store, GROUP, "latest", "vda")
            v = cat.check({"vda": latest})
            os.unlink(latest)
            base = env.points(rx.store, GROUP)[0]["rp_id"]
            b = cat.check(replica)
            if k in v.equals_rps and base in b.equals_rps:
                return
            if time.monotonic() > deadline:
                stats["violations"] += 1
                raise ft.TestFailure(f"{what}: the newest RP should equal RP {k}: {v.describe()}; "
                                     f"the replica images should hold RP {base}: {b.describe()}")
            time.sleep(0.2)

    def clean_run(what):
        write_spread()
        state = cat.mark(wr, what)
        proxy.case = None
        rp = env.replicate_once(qsd, front, GROUP, timeout=120)
        cat.bind(state, rp)
        acked.append(rp)
        outs = env.restore(rx.store, GROUP, rp, "vda")
        v = cat.check({"vda": outs})
        os.unlink(outs)
        ft.check(rp in v.equals_rps, f"{what}: restore of RP {rp} {v.describe()}")
        replica_settled(rp, what)
        stats["clean_runs"] += 1
        return rp

    # Another group's stream, for splicing (its frames name group bi2).
    write_spread()
    proxy.case = None
    env.replicate_once(qsd, front, OTHER, timeout=120)
    other_frames = data_frames(proxy.last_capture)
    ft.check(other_frames, "no DATA frame captured from the other group")
    clean_run("base")
    old_frames = data_frames(proxy.last_capture)

    # ---- Part 1: the wire ----
    rounds = 1 if not ft.LONG else 12
    for rnd in range(rounds):
        for case in WIRE_CASES:
            write_spread()
            cat.mark(wr, f"{case} (not to be committed)")
            before = env.points(rx.store, GROUP)
            log_at = len(rx.log_text())
            proxy.case = case
            proxy.target = rng.randint(1, 2)
            proxy.inject = rng.choice(other_frames if case.startswith("splice") else old_frames)
            n0 = len(proxy.mutated)
            r = env.run(env.replicate_args(qsd, front, GROUP), timeout=180)
            ft.check(len(proxy.mutated) > n0, f"{case}: the proxy did not get to damage a frame")
            detail = proxy.mutated[-1][1]
            stats["frames_corrupted"] += 1
            pc = per_case.setdefault(case, {"corrupted": 0, "detected": 0})
            pc["corrupted"] += 1
            after = env.points(rx.store, GROUP)
            committed = r.rc == 0 or after != before
            if committed:
                stats["frames_committed"] += 1
                stats["violations"] += 1
                raise ft.TestFailure(f"{case} ({detail}): committed anyway (replicate exit "
                                     f"{r.rc}, points {[p['rp_id'] for p in after]}):\n{r}")
            ft.check(rx.alive(), f"{case}: the receiver died:\n{ft.tail(rx.log_path)}")
            replica_settled(acked[-1], case)
            time.sleep(0.2)
            new_log = rx.log_text()[log_at:]
            ft.log(f"{case} ({detail}): replicate exit {r.rc}; receiver said: "
                   f"{' | '.join(l[24:140] for l in new_log.splitlines() if ' error' in l or ' warn' in l)[:400]}")
            if case in LENGTH_CASES:
                ft.check("bad frame" in new_log,
                         f"{case} ({detail}): not rejected by the frame decoder (before the "
                         f"journal); the receiver said:\n{new_log[-2000:]}")
            stats["frames_detected"] += 1
            pc["detected"] += 1
            clean_run(f"after {case}")
            old_frames = old_frames if rng.random() < 0.5 else data_frames(proxy.last_capture)

    # ---- Part 2: the journal on disk ----
    rx.stop()
    gdir = os.path.join(rx.store, GROUP)
    pristine = env.path("pristine-store")
    shutil.copytree(gdir, pristine)
    segs = sorted(os.listdir(os.path.join(gdir, "journal")))
    ft.check(segs, "no journal segment")
    seg_name = segs[-1]
    recs = records(os.path.join(gdir, "journal", seg_name))
    commits = [r_ for r_ in recs if r_[1] == "rp_commit"]
    mirrors = [r_ for r_ in recs if r_[1] == "rp_commit_mirror"]
    blocks = [r_ for r_ in recs if r_[1] == "block"]
    ft.check(len(commits) >= 2 and blocks and len(mirrors) == len(commits),
             f"journal parse found {len(commits)} commits, {len(mirrors)} mirrors, "
             f"{len(blocks)} blocks")
    # A commit record is stored twice (journal v2): one damaged copy (either one) must be
    # recovered from the other (R14) with every acknowledged RP committed and restorable; both
    # copies damaged must be refused loudly (R15).
    jcases = ["block-header", "block-payload", "commit-record", "last-commit-record",
              "last-commit-both-copies", "segment-header", "state", "tail-garbage"]
    recover_cases = ("tail-garbage", "state", "commit-record", "last-commit-record")
    jrounds = 1 if not ft.LONG else 10
    for rnd in range(jrounds):
        for jc in jcases:
            shutil.rmtree(gdir)
            shutil.copytree(pristine, gdir)
            seg = os.path.join(gdir, "journal", seg_name)
            if jc == "block-header":
                off, _t, _n = rng.choice(blocks)
                where = off + rng.randrange(REC_HEADER)
            elif jc == "block-payload":
                cands = [b for b in blocks if b[2] > REC_HEADER]
                off, _t, n = rng.choice(cands)
                where = off + REC_HEADER + rng.randrange(n - REC_HEADER)
            elif jc == "commit-record":
                i = rng.randrange(len(commits) - 1)
                off, _t, n = rng.choice([commits[i], mirrors[i]])
                where = off + rng.randrange(n)
            elif jc == "last-commit-record":
                off, _t, n = rng.choice([commits[-1], mirrors[-1]])
                where = off + rng.randrange(n)
            elif jc == "last-commit-both-copies":
                # past magic and type (bytes 0..4): both copies still show they were commits
                off, _t, n = mirrors[-1]
                flip(seg, off + 5 + rng.randrange(n - 5), rng)
                off, _t, n = commits[-1]
                where = off + 5 + rng.randrange(n - 5)
            elif jc == "segment-header":
                where = rng.randrange(40)
            if jc == "state":
                where = rng.randrange(40)
                flip(os.path.join(gdir, "state"), where, rng)
            elif jc == "tail-garbage":
                where = os.path.getsize(seg)
                with open(seg, "ab") as f:
                    f.write(rng.randbytes(rng.randrange(1, 9000)))
            else:
                flip(seg, where, rng)
            stats["journal_corruptions"] += 1
            label = f"journal {jc} at {seg_name}+{where}"
            log_at = os.path.getsize(rx.log_path)
            rx.restart()
            time.sleep(0.3)
            rx.stop()
            with open(rx.log_path, "rb") as f:
                f.seek(log_at)
                new_log = f.read().decode(errors="replace")
            refused = re.search(r"group 'bi': recovery at start-up failed: (.*)", new_log)
            recovered = re.search(r"group 'bi': recovered", new_log)
            ft.check(bool(refused) != bool(recovered),
                     f"{label}: the receiver neither recovered nor refused the group:\n{new_log}")
            pc = per_case.setdefault(f"journal:{jc}", {"corrupted": 0, "detected": 0})
            pc["corrupted"] += 1
            if refused:
                msg = refused.group(1)
                # R2/R8/R11 name the segment and offset; R7 names the state file
                ft.check(re.search(r"corrupt|unsupported", msg, re.I) and
                         re.search(r"segment \S+ offset \d+|state file", msg, re.I),
                         f"{label}: refusal does not name the segment and offset: {msg}")
                ft.check(jc not in recover_cases,
                         f"{label}: refused, but the table recovers it (R14/R1/R6): {msg}")
                if jc == "last-commit-both-copies":
                    ft.check("(R15)" in msg, f"{label}: refused without naming R15: {msg}")
                stats["journal_refused"] += 1
                ft.log(f"{label}: refused: {msg[:200]}")
            else:
                ft.check(jc in recover_cases,
                         f"{label}: corrupt committed bytes were accepted at start-up "
                         f"(expected R2/R7/R8 refusal):\n{new_log[-2000:]}")
                stats["journal_recovered_per_table"] += 1
                ft.log(f"{label}: recovered per the table (R1 cut / R6 rebuild / R14 other "
                       f"commit copy)")
            # points and restores: a committed RP of the catalog, or a loud failure
            r = env.run(["points", "--store", rx.store, "--group", GROUP, "--json"], timeout=60)
            listed = []
            if r.rc == 0:
                import json
                listed = [p["rp_id"] for p in json.loads(r.out)]
                if not refused:
                    lost = [a for a in acked if a not in listed]
                    if lost:
                        stats["violations"] += 1
                        raise ft.TestFailure(f"{label}: recovered, but acknowledged RPs {lost} "
                                             f"are gone")
                elif listed != acked:
                    stats["points_listed_fewer_silently"] += 1
            for rp in sorted(set(listed + [acked[0], acked[-1]])):
                out = env.path("restores", f"j-{rp}.img")
                rr = env.run(["restore", "--store", rx.store, "--group", GROUP, "--point", rp,
                              "--disk", "vda", "--out", out], timeout=120)
                if rr.rc != 0:
                    ft.check(rr.err.strip(), f"{label}: restore of RP {rp} failed silently")
                    if not refused:
                        stats["violations"] += 1
                        raise ft.TestFailure(f"{label}: recovered, but restore of committed "
                                             f"RP {rp} fails: {rr.err.strip()[:300]}")
                    stats["restores_failed_loudly"] += 1
                    continue
                v = cat.check({"vda": out})
                os.unlink(out)
                if rp not in v.equals_rps:
                    stats["violations"] += 1
                    raise ft.TestFailure(f"{label}: restore of RP {rp} exited 0 but "
                                         f"{v.describe()}")
            # Layout 2: the images hold the oldest kept RP, and none exist while nothing was
            # compacted (base 0: a journal that starts at RP 0, e.g. after R6 rewrote the
            # state); where they exist they equal a committed RP.
            if os.path.exists(replica["vda"]):
                v = cat.check(replica)
                if not v.equals_rps:
                    stats["violations"] += 1
                    raise ft.TestFailure(f"{label}: the replica {v.describe()}")
            stats["journal_detected"] += 1
            pc["detected"] += 1

    # Pristine again: the receiver serves, a clean run commits and equals the source.
    shutil.rmtree(gdir)
    shutil.copytree(pristine, gdir)
    rx.restart()
    legs.retarget(rx.port)
    clean_run("after the journal cases")
    qsd.stop()
    rx.stop()
    C, J = stats["frames_corrupted"], stats["journal_corruptions"]
    figure = (f"frames corrupted {C}, detected {100 * stats['frames_detected'] // max(C, 1)}%; "
              f"journal corruptions {J}, detected {100 * stats['journal_detected'] // max(J, 1)}%")
    oracle.write_figure(TEST, figure, seed=env.seed, iterations=rounds * len(WIRE_CASES) +
                        jrounds * len(jcases), faults_injected=C + J,
                        duration_s=round(time.monotonic() - t_start, 1), cases=per_case, **stats)
    ft.check(stats["violations"] == 0, "violations")
