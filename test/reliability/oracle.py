#!/usr/bin/env python3
"""oracle: self-validating blocks, a per-RP catalog of the source, and a checker of replicas.

Library (imported by the reliability harnesses):

    wr = oracle.Writer(seed, {"vda": (0, size_bytes), ...})    # disk name -> (disk id, size)
    wr.write_blocks(qsd, disk, first_block, count)             # through qsd's FUSE export
    wr.zero_blocks(qsd, disk, first_block, count)
    state = cat.mark(wr, label)        # the source as it is now (writes stopped)
    cat.bind(state, rp_id)             # that state is committed RP rp_id
    verdict = cat.check({"vda": "replica/vda.img", ...})   # which state(s)/RP(s) it equals

Every block written is BLOCK_BYTES (4 KiB) at a block-aligned offset and starts with a header:

    off size field
      0    8  magic b"FERRYORC"
      8    4  disk id
     12    4  0
     16    8  block index (of the block on its disk)
     24    8  write generation (global, +1 per block written, never 0)
     32    8  xxh3-64 (seed 0) of bytes 40..4095
     40 4056  bytes derived from (seed, disk id, block index, generation)

so any image can be checked on its own: a block whose digest fails is torn, a block whose
header names another block index or disk is misdirected, a block of a valid generation other
than the catalog's is stale (or from the future). A block never written is zero (holes).

The catalog is a chronological list of states; a state is the set of blocks changed since the
previous state (block -> generation, 0 = zero). Some states are bound to a committed RP id.
check() walks the states once, keeping the set of blocks where the image differs, so it costs
O(blocks in the image + all deltas) however many RPs there are.

CLI:
    python3 oracle.py check --catalog CAT.json --image vda=PATH [--image vdb=PATH] [--rp N]
prints one JSON line {"equals_rps": [...], "equals_states": [...], "nearest": ..., "bad": [...]}
and exits 0 when the images equal a committed RP (or RP N), 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import ferrytest as ft  # noqa: E402

BLOCK_BYTES = 4096
MAGIC = b"FERRYORC"
HEADER = struct.Struct("<8sIIQQQ")
assert HEADER.size == 40
ZERO_BLOCK = bytes(BLOCK_BYTES)


def body(seed, disk_id, block_index, gen):
    """The 4056 bytes after the header: a pure function of its identity."""
    h = hashlib.blake2b(f"{seed}/{disk_id}/{block_index}/{gen}".encode(), digest_size=32).digest()
    return random.Random(h).randbytes(BLOCK_BYTES - HEADER.size)


def make_block(seed, disk_id, block_index, gen):
    rest = body(seed, disk_id, block_index, gen)
    return HEADER.pack(MAGIC, disk_id, 0, block_index, gen, ft.xxh3_64(rest)) + rest


def parse_block(data):
    """(kind, disk id, block index, gen) of 4 KiB read from an image. kind: "zero", "ok",
    "torn" (magic but the digest fails), "foreign" (neither zero nor one of ours)."""
    if data == ZERO_BLOCK:
        return ("zero", None, None, 0)
    if len(data) != BLOCK_BYTES or data[:8] != MAGIC:
        return ("foreign", None, None, None)
    _m, disk_id, _z, index, gen, digest = HEADER.unpack_from(data, 0)
    if ft.xxh3_64(data[HEADER.size:]) != digest or gen == 0:
        return ("torn", disk_id, index, gen)
    return ("ok", disk_id, index, gen)


class Writer:
    """Writes self-validating blocks through qsd's FUSE exports and keeps the model of what
    the source holds: {disk: {block index: gen}} (absent = zero)."""

    def __init__(self, seed, disks):
        self.seed = seed
        self.disks = dict(disks)  # name -> (disk id, size bytes)
        self.gen = 0
        self.model = {d: {} for d in self.disks}
        self.changed = {d: {} for d in self.disks}  # since the last mark
        self.rng = random.Random(seed)
        self.blocks_written = 0

    def block_count(self, disk):
        return self.disks[disk][1] // BLOCK_BYTES

    def _record(self, disk, index, gen):
        if gen:
            self.model[disk][index] = gen
        else:
            self.model[disk].pop(index, None)
        self.changed[disk][index] = gen

    def write_blocks(self, qsd, disk, first, count):
        disk_id = self.disks[disk][0]
        buf = bytearray()
        for i in range(first, first + count):
            self.gen += 1
            buf += make_block(self.seed, disk_id, i, self.gen)
            self._record(disk, i, self.gen)
        qsd.write(qsd.disk(disk), first * BLOCK_BYTES, bytes(buf))
        self.blocks_written += count

    def zero_blocks(self, qsd, disk, first, count):
        qsd.zero_range(qsd.disk(disk), first * BLOCK_BYTES, count * BLOCK_BYTES)
        for i in range(first, first + count):
            self._record(disk, i, 0)

    def random_writes(self, qsd, writes, max_run=16, zero_share=0.1, disks=None):
        """`writes` runs of 1..max_run blocks at random places; some are zeroed instead."""
        names = list(disks or self.disks)
        for _ in range(writes):
            disk = self.rng.choice(names)
            run = self.rng.randint(1, max_run)
            first = self.rng.randrange(0, self.block_count(disk) - run + 1)
            if self.rng.random() < zero_share:
                self.zero_blocks(qsd, disk, first, run)
            else:
                self.write_blocks(qsd, disk, first, run)

    def take_changes(self):
        out = {d: c for d, c in self.changed.items() if c}
        self.changed = {d: {} for d in self.disks}
        return out


class Verdict:
    def __init__(self):
        self.equals_states = []
        self.equals_rps = []
        self.nearest = None  # (state index, rp or None, differing block count)
        self.bad = []  # [{"disk", "block", "kind", ...}] against the nearest state
        self.errors = []

    def to_json(self):
        return {"equals_rps": self.equals_rps, "equals_states": self.equals_states,
                "nearest": self.nearest, "bad": self.bad[:50], "bad_count": len(self.bad),
                "errors": self.errors}

    def describe(self, limit=8):
        if self.equals_rps:
            return f"equals RP(s) {self.equals_rps}"
        s = "equals no committed RP"
        if self.equals_states:
            s += f" (equals uncommitted state(s) {self.equals_states})"
        if self.errors:
            s += f"; {self.errors}"
        if self.nearest:
            st, rp, n = self.nearest
            s += f"; nearest state {st} (RP {rp}) differs in {n} blocks: " + ", ".join(
                f"{b['disk']}#{b['block']} {b['kind']}" + (
                    f" (header says {b['says']})" if b.get("says") else "") +
                f" want gen {b['want']} got {b['got']}" for b in self.bad[:limit])
        return s


class Catalog:
    """Chronological states of the source; some bound to committed RP ids."""

    def __init__(self, seed, disks):
        self.seed = seed
        self.disks = dict(disks)
        self.deltas = []  # [{disk: {block: gen}}]
        self.labels = []
        self.rp_of = {}  # state index -> rp id
        self.state_of = {}  # rp id -> state index
        self._gen_state = {}  # (disk, gen) -> first state index holding it

    def mark(self, writer, label=""):
        """A new state: the source as the writer left it (writes stopped). Returns its index."""
        delta = writer.take_changes()
        idx = len(self.deltas)
        self.deltas.append(delta)
        self.labels.append(label)
        for d, blocks in delta.items():
            for g in blocks.values():
                if g:
                    self._gen_state[(d, g)] = idx
        return idx

    def bind(self, state, rp_id):
        ft.check(rp_id not in self.state_of or self.state_of[rp_id] == state,
                 f"oracle: RP {rp_id} bound to states {self.state_of.get(rp_id)} and {state}")
        self.rp_of[state] = rp_id
        self.state_of[rp_id] = state

    def model_at(self, state):
        m = {d: {} for d in self.disks}
        for delta in self.deltas[:state + 1]:
            for d, blocks in delta.items():
                for i, g in blocks.items():
                    if g:
                        m[d][i] = g
                    else:
                        m[d].pop(i, None)
        return m

    # -- reading images --

    def read_image(self, disk, path, v):
        """{block index: gen} of the image (0 = zero is left out); bad blocks appended to v."""
        disk_id, size = self.disks[disk]
        out = {}
        try:
            st_size = os.path.getsize(path)
        except OSError as e:
            v.errors.append(f"{disk}: cannot read {path}: {e}")
            return None
        if st_size != size:
            v.errors.append(f"{disk}: image is {st_size} bytes, the source {size}")
        with open(path, "rb") as f:
            fd = f.fileno()
            for start, length in ft.data_extents(fd, st_size):
                end = start + length
                start -= start % BLOCK_BYTES
                pos = start
                while pos < end:
                    n = min(end - pos, 4 * ft.MiB)
                    n += (-n) % BLOCK_BYTES
                    chunk = os.pread(fd, n, pos)
                    for o in range(0, len(chunk), BLOCK_BYTES):
                        data = chunk[o:o + BLOCK_BYTES]
                        if len(data) < BLOCK_BYTES:
                            data += bytes(BLOCK_BYTES - len(data))
                        index = (pos + o) // BLOCK_BYTES
                        kind, did, hidx, gen = parse_block(data)
                        if kind == "zero":
                            continue
                        if kind == "ok" and (did != disk_id or hidx != index):
                            v.bad.append({"disk": disk, "block": index, "kind": "misdirected",
                                          "says": f"disk id {did} block {hidx} gen {gen}",
                                          "want": None, "got": gen})
                            out[index] = -1
                        elif kind == "ok":
                            out[index] = gen
                        else:
                            v.bad.append({"disk": disk, "block": index, "kind": kind,
                                          "says": (f"disk id {did} block {hidx} gen {gen}"
                                                   if kind == "torn" else None),
                                          "want": None, "got": None})
                            out[index] = -1
                    pos += len(chunk)
        return out

    def check(self, images):
        """images: {disk: path}. Which states (and RPs) the images equal together."""
        v = Verdict()
        img = {}
        for disk in self.disks:
            if disk not in images:
                v.errors.append(f"no image for disk {disk}")
                return v
            img[disk] = self.read_image(disk, images[disk], v)
            if img[disk] is None:
                return v
        structural = list(v.bad)
        if v.errors:
            return v
        # diff: blocks where the current state differs from the image
        diff = set()
        cur = {d: {} for d in self.disks}
        for d, blocks in img.items():
            for i in blocks:
                diff.add((d, i))
        best = None
        for idx, delta in enumerate(self.deltas):
            for d, blocks in delta.items():
                for i, g in blocks.items():
                    if g:
                        cur[d][i] = g
                    else:
                        cur[d].pop(i, None)
                    if cur[d].get(i, 0) == img[d].get(i, 0):
                        diff.discard((d, i))
                    else:
                        diff.add((d, i))
            if not diff:
                v.equals_states.append(idx)
                if idx in self.rp_of:
                    v.equals_rps.append(self.rp_of[idx])
            if best is None or len(diff) <= best[2]:
                best = (idx, self.rp_of.get(idx), len(diff), set(diff))
        if best and best[2]:
            v.nearest = best[:3]
            m = self.model_at(best[0])
            bad_idx = {(b["disk"], b["block"]) for b in structural}
            v.bad = structural
            for d, i in sorted(best[3]):
                if (d, i) in bad_idx:
                    continue
                want, got = m[d].get(i, 0), img[d].get(i, 0)
                if got == 0:
                    kind = "zero-where-data"
                elif want == 0:
                    kind = "data-where-zero"
                elif self._gen_state.get((d, got), 1 << 62) > best[0]:
                    kind = "from-a-later-state"
                else:
                    kind = "stale"
                v.bad.append({"disk": d, "block": i, "kind": kind, "want": want, "got": got,
                              "got_state": self._gen_state.get((d, got))})
        return v

    # -- persistence (for the CLI) --

    def save(self, path):
        data = {"block_bytes": BLOCK_BYTES, "seed": self.seed,
                "disks": {d: list(v) for d, v in self.disks.items()},
                "states": [{"label": self.labels[i], "rp": self.rp_of.get(i),
                            "delta": {d: {str(b): g for b, g in blocks.items()}
                                      for d, blocks in delta.items()}}
                           for i, delta in enumerate(self.deltas)]}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            data = json.load(f)
        cat = cls(data["seed"], {d: tuple(v) for d, v in data["disks"].items()})
        for i, s in enumerate(data["states"]):
            cat.deltas.append({d: {int(b): g for b, g in blocks.items()}
                               for d, blocks in s["delta"].items()})
            cat.labels.append(s["label"])
            for d, blocks in cat.deltas[-1].items():
                for g in blocks.values():
                    if g:
                        cat._gen_state[(d, g)] = i
            if s["rp"] is not None:
                cat.bind(i, s["rp"])
        return cat


def image_digests(path, size):
    """Per-block digests (blake2b-64 hex, None for zero) of an image: for reports."""
    out = []
    with open(path, "rb") as f:
        for pos in range(0, size, BLOCK_BYTES):
            b = os.pread(f.fileno(), BLOCK_BYTES, pos)
            out.append(None if b.count(0) == len(b) else hashlib.blake2b(b, digest_size=8).hexdigest())
    return out


def write_figure(test, figure, **fields):
    """Prints one JSON line with the figure and appends it to <results>/<test>.jsonl."""
    rec = {"test": test, "figure": figure, "unix_time": int(__import__("time").time()),
           "long": ft.LONG, **fields}
    line = json.dumps(rec, sort_keys=True)
    d = os.environ.get("FERRY_RESULTS_DIR") or os.path.join(HERE, "results")
    try:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{test}.jsonl"), "a") as f:
            f.write(line + "\n")
    except OSError as e:
        ft.log(f"cannot append the figure to {d}: {e}")
    print(line, flush=True)


class _FileQsd:
    """Stands in for ft.Qsd in the self-test: disks are plain files."""

    class _D:
        def __init__(self, name, path):
            self.name, self.path = name, path

    def __init__(self, paths):
        self.ds = {n: self._D(n, p) for n, p in paths.items()}

    def disk(self, name):
        return self.ds[name]

    def write(self, d, off, data):
        with open(d.path, "r+b") as f:
            os.pwrite(f.fileno(), data, off)

    def zero_range(self, d, off, length):
        self.write(d, off, bytes(length))


def selftest(tmp):
    """The checker must name each kind of damage; returns the number of checks made."""
    import shutil
    size = 1 * ft.MiB
    disks = {"a": (0, size), "b": (1, size)}
    paths = {n: os.path.join(tmp, f"{n}.img") for n in disks}
    for p in paths.values():
        with open(p, "wb") as f:
            f.truncate(size)
    q = _FileQsd(paths)
    wr, cat = Writer(7, disks), Catalog(7, disks)
    snaps = []
    for rp in (1, 2, 3):
        wr.random_writes(q, 20)
        st = cat.mark(wr, f"rp{rp}")
        cat.bind(st, rp)
        snap = {n: os.path.join(tmp, f"{n}-{rp}.img") for n in disks}
        for n in disks:
            ft.sparse_copy(paths[n], snap[n])  # holes: the extent reader is exercised
        snaps.append(snap)
    checks = 0
    for rp, snap in enumerate(snaps, 1):
        v = cat.check(snap)
        ft.check(v.equals_rps == [rp], f"selftest: RP {rp} snapshot: {v.describe()}")
        checks += 1
    mixed = {"a": snaps[0]["a"], "b": snaps[2]["b"]}
    v = cat.check(mixed)
    ft.check(not v.equals_rps and v.bad, f"selftest: a mix of RPs 1 and 3 passed: {v.describe()}")
    checks += 1
    cat.save(os.path.join(tmp, "cat.json"))
    cat2 = Catalog.load(os.path.join(tmp, "cat.json"))
    ft.check(cat2.check(snaps[1]).equals_rps == [2], "selftest: the saved catalog differs")
    checks += 1
    m = cat.model_at(2)["a"]
    victim = sorted(m)[len(m) // 2]
    other = next(i for i in sorted(m) if i != victim)
    for kind in ("torn", "misdirected", "stale", "zero-where-data", "foreign"):
        bad = os.path.join(tmp, f"bad-{kind}.img")
        shutil.copyfile(snaps[2]["a"], bad)
        with open(bad, "r+b") as f:
            fd = f.fileno()
            if kind == "torn":
                os.pwrite(fd, b"\xff" * 512, victim * BLOCK_BYTES + 1024)
            elif kind == "misdirected":
                os.pwrite(fd, os.pread(fd, BLOCK_BYTES, other * BLOCK_BYTES), victim * BLOCK_BYTES)
            elif kind == "stale":
                g = max(cat.model_at(2)["a"].values()) + 1000
                os.pwrite(fd, make_block(7, 0, victim, g), victim * BLOCK_BYTES)
            elif kind == "zero-where-data":
                os.pwrite(fd, ZERO_BLOCK, victim * BLOCK_BYTES)
            else:
                os.pwrite(fd, b"\x01" * BLOCK_BYTES, victim * BLOCK_BYTES)
        v = cat.check({"a": bad, "b": snaps[2]["b"]})
        kinds = {(b["block"], b["kind"]) for b in v.bad}
        want = "from-a-later-state" if kind == "stale" else kind
        ft.check(not v.equals_rps and (victim, want) in kinds,
                 f"selftest: {kind} block {victim} not named: {v.describe()}")
        checks += 1
    return checks


def main(argv):
    ap = argparse.ArgumentParser(prog="oracle.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("selftest", help="the checker names torn, misdirected, stale blocks")
    c = sub.add_parser("check", help="which committed RP do these images equal?")
    c.add_argument("--catalog", required=True)
    c.add_argument("--image", action="append", required=True, metavar="DISK=PATH")
    c.add_argument("--rp", type=int, help="require equality with this RP")
    a = ap.parse_args(argv)
    if a.cmd == "selftest":
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            n = selftest(tmp)
        print(json.dumps({"test": "oracle-selftest", "checks": n, "violations": 0}))
        return 0
    cat = Catalog.load(a.catalog)
    images = dict(s.split("=", 1) for s in a.image)
    v = cat.check(images)
    print(json.dumps(v.to_json(), sort_keys=True))
    print(v.describe(), file=sys.stderr)
    ok = (a.rp in v.equals_rps) if a.rp is not None else bool(v.equals_rps)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
