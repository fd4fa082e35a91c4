#!/usr/bin/env python3
"""`ferry doctor` finds each fault the test causes, in turn, names it and its fix, and reports
all well on a healthy setup. Real pieces throughout: a qemu-storage-daemon source, a real
receiver over mutual TLS (test/tls/make-certs), a store on a small tmpfs, the shared libvirtd
(never stopped: an unreachable libvirtd is a bogus socket URI), domains defined for the test.

Faults, each checked by `--json` (name, status, detail, fix) and the exit status:
  healthy             exit 0, every check that has its inputs is ok ("all well")
  libvirt             --uri naming a socket nobody listens on
  disk-format         a domain whose disk is raw
  receiver            the receiver stopped
  clock               the receiver restarted with FERRY_TEST_CLOCK_OFFSET_MS=5000 (test-only)
  tls                 test/tls/make-certs' expired client certificate; a certificate that
                      expires in 10 days (signed here by the test CA)
  store-space         the tmpfs filled until less than one full copy of the disk is free; a
                      group quota (--receive-config) the next full RP would pass
  store               a byte of a committed RP's journal record flipped (R2)
With a guest (test/guest, TCG) the checkpoints check is run too: ok after `ferry protect
--once`, then failing once the checkpoint metadata is deleted behind Ferry's back; skipped
(said in the log) when libvirtd or the guest fixture is not available."""

import json
import os
import subprocess
import sys

import ferrytest as ft

sys.path.insert(0, os.path.join(ft.REPO, "test", "guest"))
import guest as G  # noqa: E402

GROUP = "docg"
DOMAIN = f"ferry-doctor-{os.getpid()}"


def doctor(env, args, want_rc):
    r = env.run(["doctor", "--json"] + args, timeout=120, tls=False)
    ft.check(r.rc == want_rc, f"ferry doctor exited {r.rc}, expected {want_rc}:\n{r}")
    doc = json.loads(r.out)
    checks = {c["name"]: c for c in doc["checks"]}
    for c in doc["checks"]:
        ft.check(set(c) == {"name", "status", "detail", "fix"}, f"check fields: {c}")
        ft.check(c["status"] in ("ok", "fail", "skip"), f"check status: {c}")
        ft.check((c["status"] == "fail") == bool(c["fix"]), f"a failed check has a fix: {c}")
    ft.check_eq(doc["ok"], want_rc == 0, "doctor's ok")
    return checks


def expect(checks, name, status, *words):
    c = checks[name]
    ft.check(c["status"] == status, f"check {name}: expected {status}: {c}")
    text = c["detail"] + " " + c["fix"]
    for w in words:
        ft.check(w in text, f"check {name} must mention {w!r}: {c}")
    ft.log(f"doctor {name}: {c['status']}: {c['detail'][:150]}")


def failing(checks):
    return sorted(n for n, c in checks.items() if c["status"] == "fail")


def define_domain(name, disk_path, fmt):
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>
      <source file='{disk_path}'/><target dev='vda' bus='virtio'/></disk>
  </devices></domain>"""
    path = disk_path + ".xml"
    with open(path, "w") as f:
        f.write(xml)
    G.virsh("define", path)


with ft.Env("doctor") as env:
    # --- a healthy setup: a store on a small tmpfs, one group with two RPs ---
    store = env.path("store", "x")[:-2]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", store], check=True)
    env.on_cleanup(lambda: subprocess.run(["umount", "-l", store]))
    wl = env.workload()
    qsd = env.qsd([ft.Disk("vda", 32 * ft.MiB, "qcow2")])
    rx = env.receiver(store=store)
    state = os.path.join(env.dir, "state")
    os.makedirs(state)
    for _ in range(2):
        wl.random_writes(qsd, qsd.disks[0], 4, max_len=64 * ft.KiB)
        qsd.sync()
        env.replicate_once(qsd, rx.addr, GROUP, state_dir=state)

    tls = env.tls_client_args()
    base = ["--to", rx.addr, "--store", store, "--group", GROUP] + tls

    have_libvirt = G.start_libvirtd()
    if have_libvirt:
        images = env.path("images", "x")[:-2]
        for fmt in ("qcow2", "raw"):
            img = os.path.join(images, f"{fmt}.img")
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, img, "16M"], check=True)
            define_domain(f"{DOMAIN}-{fmt}", img, fmt)
            env.on_cleanup(lambda n=f"{DOMAIN}-{fmt}": G.virsh("undefine", n, check=False))
        healthy = doctor(env, base + ["--domain", f"{DOMAIN}-qcow2"], 0)
        expect(healthy, "libvirt", "ok", "libvirtd")
        expect(healthy, "disk-format", "ok", "vda qcow2")
        expect(healthy, "checkpoints", "skip", "not running")
    else:
        ft.log("libvirtd not available: the libvirt checks are skipped")
        healthy = doctor(env, base, 0)
    for name in ("receiver", "clock", "tls", "store", "store-space"):
        expect(healthy, name, "ok")
    expect(healthy, "receiver", "ok", "mutual TLS" if env.tls else "plaintext")
    r = env.run(["doctor"] + base, timeout=120, tls=False)
    ft.check(r.rc == 0 and "all well" in r.out, f"text output of a healthy setup:\n{r}")
    r = env.run(["doctor", "--group", GROUP], timeout=60, tls=False)
    ft.check(r.rc == 2 and "nothing to check" in r.err, f"nothing given is a usage error:\n{r}")

    # --- a running guest: Ferry's checkpoints and the disks' bitmaps, then metadata deleted ---
    fixture = G.fixture_dir() if have_libvirt else None
    if fixture is None:
        ft.log("no libvirtd or guest fixture: the checkpoints check is not exercised")
    else:
        ggroup = "docvm"
        g = G.Guest(env.path("guest", "x")[:-2], f"{DOMAIN}-vm", [G.Disk("vda", size_mib=16)])
        env.on_cleanup(g.destroy)
        g.start(fixture)
        ft.log(f"guest {g.name} up in {g.boot_s:.1f}s")
        g.write("vda", [0, 5, 9], gen=1)
        r = env.run(["protect", "--domain", g.name, "--to", rx.addr, "--group", ggroup,
                     "--once", "--state-dir", state], timeout=300)
        ft.check(r.rc == 0, f"protect --once:\n{r}")
        gbase = ["--to", rx.addr, "--store", store, "--group", ggroup, "--domain", g.name] + tls
        checks = doctor(env, gbase, 0)
        expect(checks, "checkpoints", "ok", f"group '{ggroup}'")
        expect(checks, "nbd", "ok", "nbd-server-start")
        G.virsh("checkpoint-delete", g.name, f"ferry.{ggroup}.1", "--metadata")
        checks = doctor(env, gbase, 1)
        expect(checks, "checkpoints", "fail", f"ferry.{ggroup}.1", "no checkpoint metadata", "L4")
        ft.check_eq(failing(checks), ["checkpoints"], "only checkpoints fails")
        g.destroy()

    # --- libvirtd unreachable: a socket nobody listens on (the shared libvirtd keeps running) ---
    bogus = f"qemu+unix:///system?socket={env.dir}/no-libvirtd.sock"
    checks = doctor(env, base + ["--domain", "whatever", "--uri", bogus], 1)
    expect(checks, "libvirt", "fail", "not reachable", "start libvirtd")
    ft.check_eq(failing(checks), ["libvirt"], "only libvirt fails")

    # --- a raw disk cannot carry a checkpoint ---
    if have_libvirt:
        checks = doctor(env, base + ["--domain", f"{DOMAIN}-raw"], 1)
        expect(checks, "disk-format", "fail", "raw", "qcow2", "qemu-img convert")
        ft.check_eq(failing(checks), ["disk-format"], "only disk-format fails")

    # --- TLS: expired, and expiring within 30 days ---
    if env.tls:
        expired = ["--tls-cert", env.cert("client-expired.pem"), "--tls-key",
                   env.cert("client-expired.key"), "--tls-ca", env.cert("ca.pem")]
        checks = doctor(env, ["--to", rx.addr, "--store", store] + expired, 1)
        expect(checks, "tls", "fail", "expired", "renew")
        soon_key, soon_pem = env.path("soon.key"), env.path("soon.pem")
        subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-out", soon_key], check=True,
                       capture_output=True)
        os.chmod(soon_key, 0o600)
        csr = subprocess.run(["openssl", "req", "-new", "-key", soon_key, "-subj", "/CN=soon"],
                             check=True, capture_output=True).stdout
        subprocess.run(["openssl", "x509", "-req", "-days", "10", "-CA", env.cert("ca.pem"),
                        "-CAkey", env.cert("ca.key"), "-CAcreateserial", "-out", soon_pem], input=csr, check=True,
                       capture_output=True)
        checks = doctor(env, ["--to", rx.addr, "--store", store, "--tls-cert", soon_pem,
                              "--tls-key", soon_key, "--tls-ca", env.cert("ca.pem")], 1)
        expect(checks, "tls", "fail", "expires within 30 days", "CN=soon", "renew")
        expect(checks, "receiver", "ok")
        ft.check_eq(failing(checks), ["tls"], "only tls fails for a certificate expiring soon")

    # --- the receiver down ---
    rx.stop()
    checks = doctor(env, base, 1)
    expect(checks, "receiver", "fail", rx.addr, "ferry receive")
    expect(checks, "clock", "skip")
    ft.check_eq(failing(checks), ["receiver"], "only receiver fails")

    # --- clocks apart: the receiver's clock shifted by the test-only knob ---
    rx.restart(extra_env={"FERRY_TEST_CLOCK_OFFSET_MS": "5000"})
    checks = doctor(env, base, 1)
    expect(checks, "clock", "fail", "ahead of", "NTP")
    ft.check_eq(failing(checks), ["clock"], "only clock fails")
    rx.stop()
    rx.restart(extra_env={"FERRY_TEST_CLOCK_OFFSET_MS": "-3000"})
    expect(doctor(env, base, 1), "clock", "fail", "behind")
    rx.stop()
    rx.restart()
    doctor(env, base, 0)

    # --- the store nearly full ---
    st = os.statvfs(store)
    filler = os.path.join(store, "filler")
    with open(filler, "wb") as f:
        left = st.f_bavail * st.f_frsize - 16 * ft.MiB
        chunk = b"\xff" * ft.MiB
        while left > 0:
            f.write(chunk[:min(len(chunk), left)])
            left -= len(chunk)
    checks = doctor(env, base, 1)
    expect(checks, "store-space", "fail", "free", "MiB", "keep")
    ft.check_eq(failing(checks), ["store-space"], "only store-space fails")
    os.unlink(filler)
    doctor(env, base, 0)

    # --- a group's quota (receive.toml) that the next full RP would pass ---
    rcfg = env.path("doctor-receive.toml")
    with open(rcfg, "w") as f:
        f.write(f'[group.{GROUP}]\nquota = "20M"\n')
    checks = doctor(env, base + ["--receive-config", rcfg], 1)
    expect(checks, "store-space", "fail", "quota", GROUP, "receive.toml")
    ft.check_eq(failing(checks), ["store-space"], "only store-space fails over the quota")
    with open(rcfg, "w") as f:
        f.write(f'[group.{GROUP}]\nquota = "1G"\n')
    doctor(env, base + ["--receive-config", rcfg], 0)

    # --- a corrupt journal: one byte of RP 1's records flipped, RP 2's commit after it ---
    rx.stop()
    seg = os.path.join(store, GROUP, "journal", "0000000000000001.seg")
    with open(seg, "r+b") as f:
        f.seek(20000)
        b = f.read(1)
        f.seek(20000)
        f.write(bytes([b[0] ^ 0x5A]))
    checks = doctor(env, ["--store", store], 1)
    expect(checks, "store", "fail", GROUP, "corrupt")
    ft.check_eq(failing(checks), ["store"], "only store fails")
