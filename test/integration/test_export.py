#!/usr/bin/env python3
"""`ferry export`: any committed RP of a disk as an NBD export through nbdkit and Ferry's
plugin. A qcow2 disk is replicated for a few RPs (data, zeros written over data, holes); then:
- the export of RP 1 and of RP 2 equal `ferry restore` of those RPs (`qemu-img compare`);
- `nbdinfo --map` reports the zeroed range and the never-written ranges as hole,zero, and every
  range it calls zero reads as zeros;
- `nbdcopy` of the export to a file equals restore;
- the export of RP 1 stays byte-identical while 3 newer RPs arrive in the same group;
- `--point latest` serves the newest RP, and `--listen 127.0.0.1:PORT` serves over TCP;
- with `--tls-*` the export is mutual TLS 1.3 (`nbds://`): a client of the CA copies it equal to
  restore; no client certificate, another CA, a revoked certificate, plaintext and a TLS 1.2
  client are refused; a key readable by others is refused before serving;
- `--overlay`: a write through the export succeeds and reads back, yet the store's journal and
  the restore of that RP are unchanged;
- bad arguments (unknown group, uncommitted RP, unknown disk, busy socket, a non-loopback
  address) exit 1 with an error naming what is wrong, before serving;
- retention: with the receiver at `--keep-last 3`, an export of RP N pins it: while 20 newer
  RPs (more than a 64 MiB journal segment) arrive and retention compacts the replica forward,
  `ferry points` lists RP N pinned and the export stays equal to a restore of RP N made before;
  the pin holds for as long as the export runs, with or without a client connected; once the
  export stops, the next RP's retention prunes RP N and `ferry export --point N` exits 1 with
  "pruned by retention"."""

import filecmp
import hashlib
import os
import re
import shutil
import subprocess
import time

import ferrytest as ft

GROUP = "exp"
SIZE = 32 * ft.MiB
ZERO_AT, ZERO_LEN = 8 * ft.MiB, 1 * ft.MiB


def need(tool):
    if shutil.which(tool) is None:
        raise ft.Skip(f"{tool} not installed")


for tool in ("nbdkit", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io"):
    need(tool)


def start_export(env, tag, args):
    """Runs `ferry export ARGS`; returns (proc, seconds to the 'serving' line)."""
    t0 = time.monotonic()
    p = ft.Proc(env, tag, [env.ferry, "export"] + [str(a) for a in args],
                env.path(f"{tag}.log"))
    while "serving" not in p.log_text():
        ft.check(p.alive(), f"ferry export {tag} exited {p.p.returncode}:\n{p.log_text()}")
        ft.check(time.monotonic() - t0 < 10, f"export {tag} not ready in 10 s:\n{p.log_text()}")
        time.sleep(0.01)
    return p, time.monotonic() - t0


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def run(argv, timeout=120):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    ft.check(p.returncode == 0, f"{' '.join(map(str, argv))} exited {p.returncode}:\n"
                                f"{p.stdout}\n{p.stderr}")
    return p.stdout


def compare(env, sock, image, what):
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock), image])
    ft.log(f"{what}: qemu-img compare of the export and the restore: identical")


def copy_equals(env, sock, image, what):
    out = env.path("copy.img")
    if os.path.exists(out):
        os.unlink(out)
    run(["nbdcopy", uri(sock), out])
    diff = ft.first_difference(image, out)
    ft.check(not diff, f"{what}: nbdcopy of the export differs from restore: {diff}")


def journal_digest(store):
    h = hashlib.sha256()
    jdir = os.path.join(store, GROUP, "journal")
    for name in sorted(os.listdir(jdir)):
        with open(os.path.join(jdir, name), "rb") as f:
            h.update(name.encode())
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


with ft.Env("export") as env:
    wl = env.workload()
    qsd = env.qsd([ft.Disk("vda", SIZE, "qcow2")])
    vda = qsd.disks[0]
    rx = env.receiver()
    wl.random_writes(qsd, vda, 20, min_len=4 * ft.KiB, max_len=512 * ft.KiB,
                     region=(0, 24 * ft.MiB))
    wl.write(qsd, vda, ZERO_AT, ZERO_LEN)
    rp1 = env.replicate_once(qsd, rx.addr, GROUP)
    # Random writes first: one landing in the zeroed range would make it data again.
    wl.random_writes(qsd, vda, 10, min_len=512, max_len=128 * ft.KiB, region=(0, 24 * ft.MiB))
    wl.zero(qsd, vda, ZERO_AT, ZERO_LEN, "zero_range")
    rp2 = env.replicate_once(qsd, rx.addr, GROUP)
    img = {rp: env.restore(rx.store, GROUP, rp, "vda") for rp in (rp1, rp2)}

    s1, s2 = env.path("rp1.sock"), env.path("rp2.sock")
    base = ["--store", rx.store, "--group", GROUP, "--disk", "vda"]
    e1, t1 = start_export(env, "export-rp1", base + ["--point", rp1, "--socket", s1])
    e2, t2 = start_export(env, "export-rp2", base + ["--point", rp2, "--socket", s2])
    ft.log(f"exports ready in {t1:.2f} s and {t2:.2f} s")
    ft.check(uri(s1) in e1.log_text(), f"the serving line names {uri(s1)}:\n{e1.log_text()}")
    compare(env, s1, img[rp1], f"RP {rp1}")
    compare(env, s2, img[rp2], f"RP {rp2}")
    copy_equals(env, s2, img[rp2], f"RP {rp2}")

    # Block status: the zeroed MiB and the never-written tail are holes that read as zeros.
    out = run(["nbdinfo", "--map", uri(s2)])
    ranges = []
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)\s+(\S+)", line)
        if m:
            ranges.append((int(m[1]), int(m[2]), m[4]))
    ft.check(ranges and ranges[0][0] == 0 and sum(r[1] for r in ranges) == SIZE,
             f"nbdinfo --map must tile the disk:\n{out}")

    def kind_at(off):
        return next(k for o, n, k in ranges if o <= off < o + n)

    ft.check_eq(kind_at(SIZE - 1), "hole,zero", "map of the never-written end of the disk")
    ft.check(any(o <= ZERO_AT and ZERO_AT + ZERO_LEN // 2 < o + n and k == "hole,zero"
                 for o, n, k in ranges) or kind_at(ZERO_AT + ZERO_LEN // 2) == "hole,zero",
             f"the zeroed range at {ZERO_AT} must map as hole,zero:\n{out}")
    with open(img[rp2], "rb") as f:
        for o, n, k in ranges:
            if k == "hole,zero":
                f.seek(o)
                ft.check(f.read(n) == bytes(n), f"map says zero at {o}+{n} but data is there")
    ft.log(f"nbdinfo --map: {len(ranges)} ranges, holes and the zeroed range reported as zero")

    # RP 1 stays byte-stable while replication goes on into the same group.
    for i in range(3):
        wl.random_writes(qsd, vda, 8, min_len=512, max_len=256 * ft.KiB)
        wl.zero(qsd, vda, 2 * ft.MiB * (i + 1), 256 * ft.KiB, "zero_range")
        rp = env.replicate_once(qsd, rx.addr, GROUP)
        copy_equals(env, s1, img[rp1], f"RP {rp1} after RP {rp}")
    ft.log(f"export of RP {rp1} unchanged while 3 newer RPs arrived")
    newest = rp
    img[newest] = env.restore(rx.store, GROUP, newest, "vda")

    # Busy socket, while e1 serves on it.
    r = env.run(["export"] + base + ["--point", rp1, "--socket", s1], timeout=30)
    ft.check(r.rc == 1 and "busy" in r.err and s1 in r.err, f"busy socket:\n{r}")
    ft.check_eq(e1.terminate(), 0, "ferry export exit status on SIGTERM")
    ft.check_eq(e2.terminate(), 0, "ferry export exit status on SIGTERM")

    # latest, over TCP on loopback.
    port = ft.free_port()
    e3, _ = start_export(env, "export-latest", base + ["--point", "latest", "--listen",
                                                       f"127.0.0.1:{port}"])
    ft.check(f"RP {newest}" in e3.log_text(), f"latest must be RP {newest}:\n{e3.log_text()}")
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", f"nbd://127.0.0.1:{port}/",
         img[newest]])
    ft.check_eq(e3.terminate(), 0, "ferry export exit status on SIGTERM")
    ft.log(f"--point latest over TCP serves RP {newest}")

    # Mutual TLS (nbds://): nbdkit (GnuTLS) with the export's certificate, TLS 1.3 only,
    # clients holding a certificate of --tls-ca only.
    def nbd_tls_dir(name, client=None, ca="ca.pem"):
        """A libnbd tls-certificates directory: the CA, and a client's certificate and key."""
        d = env.path("nbd-tls-" + name)
        os.makedirs(d, mode=0o700, exist_ok=True)
        shutil.copy(env.cert(ca), os.path.join(d, "ca-cert.pem"))
        if client:
            shutil.copy(env.cert(f"{client}.pem"), os.path.join(d, "client-cert.pem"))
            shutil.copy(env.cert(f"{client}.key"), os.path.join(d, "client-key.pem"))
            os.chmod(os.path.join(d, "client-key.pem"), 0o600)
        return d

    tls_port = ft.free_port()
    tls_args = ["--tls-cert", env.cert("server.pem"), "--tls-key", env.cert("server.key"),
                "--tls-ca", env.cert("ca.pem"), "--tls-crl", env.cert("crl.pem")]
    e5, _ = start_export(env, "export-tls", base + ["--point", newest, "--listen",
                                                    f"127.0.0.1:{tls_port}"] + tls_args)
    ft.check(f"nbds://127.0.0.1:{tls_port}/" in e5.log_text(),
             f"the serving line names nbds://:\n{e5.log_text()}")

    def tls_uri(d):
        return f"nbds://127.0.0.1:{tls_port}/?tls-certificates={d}&tls-hostname=localhost"

    good = nbd_tls_dir("admin", "client-admin")
    out = env.path("tls-copy.img")
    run(["nbdcopy", tls_uri(good), out])
    diff = ft.first_difference(img[newest], out)
    ft.check(not diff, f"nbdcopy over TLS differs from restore: {diff}")
    refused = {
        "no client certificate": tls_uri(nbd_tls_dir("nocert")),
        "a certificate of another CA": tls_uri(nbd_tls_dir("other", "client-other")),
        "a revoked certificate": tls_uri(nbd_tls_dir("revoked", "client-revoked")),
        "plaintext": f"nbd://127.0.0.1:{tls_port}/",
    }
    for what, u in refused.items():
        p = subprocess.run(["nbdinfo", "--size", u], capture_output=True, text=True, timeout=60)
        ft.check(p.returncode != 0, f"{what}: the TLS export must refuse, got\n{p.stdout}{p.stderr}")
    # A client offering TLS 1.2 at most (GnuTLS told so by a priority file of its own).
    prio = env.path("gnutls-tls12-only.conf")
    with open(prio, "w") as f:
        f.write("[overrides]\ndisabled-version = tls1.3\n")
    p = subprocess.run(["nbdinfo", "--size", tls_uri(good)], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, GNUTLS_SYSTEM_PRIORITY_FILE=prio))
    ft.check(p.returncode != 0, f"a TLS 1.2 client must be refused:\n{p.stdout}{p.stderr}")
    ft.check_eq(e5.terminate(), 0, "ferry export --tls-* exit status on SIGTERM")
    # A key readable by others is refused before anything serves, naming the file.
    loose = env.path("loose.key")
    shutil.copy(env.cert("server.key"), loose)
    os.chmod(loose, 0o644)
    r = env.run(["export"] + base + ["--point", newest, "--listen", f"127.0.0.1:{tls_port}",
                                     "--tls-cert", env.cert("server.pem"), "--tls-key", loose,
                                     "--tls-ca", env.cert("ca.pem")], timeout=30)
    ft.check(r.rc == 1 and "loose.key" in r.err and "serving" not in r.out,
             f"a key readable by others must be refused, naming it:\n{r}")
    r = env.run(["export"] + base + ["--point", newest, "--socket", env.path("t.sock"),
                                     "--tls-cert", env.cert("server.pem")], timeout=30)
    ft.check(r.rc == 2 and "--tls-key" in r.err, f"half the TLS flags is a usage error:\n{r}")
    ft.log("TLS export: a client of the CA reads it equal to restore; no certificate, another "
           "CA, a revoked one, plaintext and TLS 1.2 refused; a loose key refused")

    # --overlay: writable, but nothing reaches the store.
    before = journal_digest(rx.store)
    s3 = env.path("overlay.sock")
    e4, _ = start_export(env, "export-overlay", base + ["--point", rp2, "--socket", s3,
                                                        "--overlay"])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", uri(s3)])
    run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 0 64k", uri(s3)])
    ft.check_eq(e4.terminate(), 0, "ferry export --overlay exit status on SIGTERM")
    ft.check_eq(journal_digest(rx.store), before, "the journal after writes to an overlay")
    again = env.restore(rx.store, GROUP, rp2, "vda", out=env.path("restores", "again.img"))
    ft.check(filecmp.cmp(again, img[rp2], shallow=False),
             f"restore of RP {rp2} changed after writes to its overlay export")
    ft.log("--overlay: writes read back from the overlay; journal and restore unchanged")

    # Bad arguments: exit 1 before serving, the error names what is wrong.
    bad = [(["--store", rx.store, "--group", "nope", "--disk", "vda", "--point", 1,
             "--socket", env.path("b.sock")], "group nope"),
           (base + ["--point", 999, "--socket", env.path("b.sock")], "RP 999"),
           (["--store", rx.store, "--group", GROUP, "--disk", "vdz", "--point", rp1,
             "--socket", env.path("b.sock")], "disk vdz"),
           (base + ["--point", rp1, "--listen", "10.11.12.13:10809"], "loopback")]
    for args, want in bad:
        r = env.run(["export"] + args, timeout=30)
        ft.check(r.rc == 1 and want in r.err, f"expected exit 1 naming '{want}':\n{r}")
        ft.check("serving" not in r.out, f"a refused export must not serve:\n{r}")
    ft.check(not os.path.exists(env.path("b.sock")), "a refused export left a socket behind")
    ft.log("bad arguments refused with exit 1, naming group, RP, disk and the address")

    # Retention and the pin of an export: RP N is the newest; the receiver keeps 3.
    rx.stop()
    rx.restart(args=["--keep-last", 3])
    n = newest
    sn = env.path("pinned.sock")
    e5, _ = start_export(env, "export-pinned", base + ["--point", n, "--socket", sn])

    def listed():
        return {p["rp_id"]: p for p in env.points(rx.store, GROUP)}

    def settled(newest_rp, want):
        """`ferry points` once the receiver's retention pass after `newest_rp` is done."""
        deadline = time.monotonic() + 30
        while True:
            pts = listed()
            if sorted(pts) == want:
                return pts
            ft.check(time.monotonic() < deadline,
                     f"after RP {newest_rp}: expected RPs {want} listed, got {sorted(pts)}")
            time.sleep(0.2)

    # A client that stays connected (as a VM booted from the export would) ...
    held = subprocess.Popen(["qemu-io", "-r", "-f", "raw", uri(sn)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env.on_cleanup(lambda: held.poll() is None and held.kill())
    held.stdin.write(b"read 0 64k\n")
    held.stdin.flush()
    deadline = time.monotonic() + 10
    while not listed()[n]["pinned"]:
        ft.check(held.poll() is None, f"qemu-io could not connect to {uri(sn)}")
        ft.check(time.monotonic() < deadline, f"RP {n} not pinned with a client connected: "
                                              f"{listed()[n]}")
        time.sleep(0.1)
    journal_bytes = 0
    for i in range(20):
        journal_bytes += wl.random_writes(qsd, vda, 6, min_len=256 * ft.KiB, max_len=1 * ft.MiB)
        rp = env.replicate_once(qsd, rx.addr, GROUP)
        pts = settled(rp, sorted({n} | set(range(rp - 2, rp + 1))))
        ft.check(pts[n]["pinned"] and pts[n]["keep"] and pts[n]["rule"] == "pinned",
                 f"RP {n} while exported, after RP {rp}: {pts[n]}")
        if i % 5 == 4:
            copy_equals(env, sn, img[n], f"exported RP {n} after RP {rp}")
    ft.check(held.poll() is None, "the client held on the export exited")
    compare(env, sn, img[n], f"RP {n} after 20 newer RPs ({journal_bytes / ft.MiB:.0f} MiB) with "
                             f"--keep-last 3")
    ft.log(f"export of RP {n} pinned and byte-stable while RPs {n + 1}..{rp} arrived and "
           f"retention kept {sorted(pts)}")
    # ... and without one: the export pins RP N as long as it runs, not only while a client
    # is connected (a client may connect at any time and must get the RP announced).
    held.stdin.write(b"quit\n")
    held.stdin.close()
    held.wait(10)
    wl.random_writes(qsd, vda, 2, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
    rp = env.replicate_once(qsd, rx.addr, GROUP)
    time.sleep(0.5)  # the retention pass after the ack
    pts = listed()
    ft.check(n in pts and pts[n]["pinned"],
             f"RP {n} must stay pinned while its export runs (no client connected); after "
             f"RP {rp}: {sorted(pts)}, RP {n}: {pts.get(n)}")
    compare(env, sn, img[n], f"RP {n}, a new client after RP {rp}")
    ft.check_eq(e5.terminate(), 0, "ferry export exit status on SIGTERM")

    # The export stopped: the next RP's retention prunes RP N.
    wl.random_writes(qsd, vda, 2, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
    rp = env.replicate_once(qsd, rx.addr, GROUP)
    pts = settled(rp, [rp - 2, rp - 1, rp])
    r = env.run(["export"] + base + ["--point", n, "--socket", env.path("gone.sock")], timeout=30)
    ft.check(r.rc == 1 and "pruned by retention" in r.err and f"RP {n}" in r.err,
             f"export of RP {n} after it was pruned must exit 1 with 'pruned by retention':\n{r}")
    ft.check("serving" not in r.out, f"a refused export must not serve:\n{r}")
    ft.log(f"after the export stopped, RP {rp} pruned RP {n}; export of it refused: "
           f"{r.err.strip()}")
