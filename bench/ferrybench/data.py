"""The seeded test data: a mix of what disks hold, the base image layout and the change sets
(files of (offset, length, data) records that nbd-apply writes through QEMU)."""
import os, random, struct
from .procs import BLOCK, REGION


class MixedData:
    """Seeded mix of what disks hold: zeros, text, binaries, compressible records, random."""
    KINDS = ("zeros", "text", "binary", "compressible", "random")

    def __init__(self, seed):
        self.rng = random.Random(seed)
        words = [b"replica ", b"journal ", b"bitmap ", b"the ", b"of ", b"recovery ", b"point\n",
                 b"disk ", b"block ", b"qemu ", b"ferry ", b"2026-11-29 ", b"INFO ", b"error ",
                 b"GET /index.html ", b"200 ", b"404 ", b"user=", b"id=", b"\n"]
        self.text = b"".join(self.rng.choice(words) + str(self.rng.randrange(100000)).encode()
                             + b" " for _ in range(300000))
        libs = []
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/bin"):
            for name in sorted(os.listdir(d)):
                p = os.path.join(d, name)
                if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 1 << 20:
                    libs.append(p)
        self.binary = b"".join(open(p, "rb").read() for p in libs[:24])[: 48 << 20]
        if len(self.binary) < (8 << 20):
            self.binary = self.rng.randbytes(8 << 20)
        rec = bytearray()
        for i in range(16384):  # database-like pages: small records, mostly padding
            rec += struct.pack("<QQ", i, i * 7) + b"row %08d " % i + bytes(28)
        self.records = bytes(rec)

    def chunk(self, n, kind):
        if kind == "zeros":
            return bytes(n)
        if kind == "random":
            return self.rng.randbytes(n)
        src = {"text": self.text, "binary": self.binary, "compressible": self.records}[kind]
        if len(src) < n:
            src = src * (n // len(src) + 1)
        off = self.rng.randrange(len(src) - n + 1)
        return src[off:off + n]

    def pick(self, weights):
        return self.rng.choices(self.KINDS, weights=weights)[0]


BASE_WEIGHTS = {"unallocated": 35, "zeros": 8, "text": 15, "binary": 15, "compressible": 12,
                "random": 15}
CHANGE_WEIGHTS = [8, 25, 25, 17, 25]  # zeros, text, binary, compressible, random


def write_record(f, off, data):
    f.write(struct.pack("<QQ", off, len(data)))
    f.write(data)


def make_base(path, disk_bytes, mix):
    """Change file that fills the base image region by region; returns the layout counts."""
    kinds = list(BASE_WEIGHTS)
    counts = {k: 0 for k in kinds}
    with open(path, "wb") as f:
        for off in range(0, disk_bytes, REGION):
            k = mix.rng.choices(kinds, weights=[BASE_WEIGHTS[x] for x in kinds])[0]
            if off == 0:
                k = "unallocated"  # no boot signature: the idle libvirt domain finds nothing
            counts[k] += REGION
            if k != "unallocated":
                write_record(f, off, mix.chunk(REGION, k))
    return {f"{k}_bytes": v for k, v in counts.items()}


def make_scattered(path, disk_bytes, fraction, mix, rng, sample=None, n_blocks=None):
    n = n_blocks or int(disk_bytes * fraction) // BLOCK
    slots = sorted(rng.sample(range(disk_bytes // BLOCK), n))
    with open(path, "wb") as f:
        for s in slots:
            data = mix.chunk(BLOCK, mix.pick(CHANGE_WEIGHTS))
            write_record(f, s * BLOCK, data)
            if sample is not None and sample.tell() < (128 << 20):
                sample.write(data)
    return n * BLOCK


def make_sequential(path, disk_bytes, fraction, run_bytes, mix, rng):
    n_runs = max(1, int(disk_bytes * fraction) // run_bytes)
    starts = sorted(rng.sample(range(disk_bytes // run_bytes), n_runs))
    with open(path, "wb") as f:
        for s in starts:
            for off in range(s * run_bytes, (s + 1) * run_bytes, REGION):
                write_record(f, off, mix.chunk(REGION, mix.pick(CHANGE_WEIGHTS)))
    return n_runs * run_bytes
