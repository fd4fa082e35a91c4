#!/usr/bin/env python3
"""`ferry failover test` end to end: a real libvirt guest (test/guest: TCG, two qcow2 disks)
protected with `ferry protect --once` to a real `ferry receive`, then the recovery site boots
RP k as a second libvirt domain on throwaway overlays over the RP's exports, while RPs k+1..
keep arriving. The oracle is the guest's own write log (test/guest/guest.py model), never
Ferry's view: the test domain's guest reads its whole disks itself (`md5 DEV` on its control
channel) and each digest must equal the digest of the source guest's model at RP k.

Checks, in order:
  (a) RPs while the guest writes known patterns; every RP carries the VM's definition
      (`ferry points --json` vm_config, `ferry vm-config`), RP 1 from its own begin record;
  (b) `failover test --point k`: the test domain boots, its guest's disk digests equal the
      source model at RP k; the test VM writes (to its overlay); RPs k+1, k+2 arrive meanwhile;
      RP k restored from the store is unchanged by the test VM's writes; a second start is
      refused (already running); `ferry points` shows the test running;
  (c) `--stop`: no domain, no overlay, no export process, no pin, no socket; `ferry points`
      shows RP k tested (when, how long); `--stop` again: a clear error;
  (d) a crash half-way through a stop (the domain removed by hand): `--stop` cleans the rest;
  (e) errors, each exit 1 naming the problem: unknown group, a domain name that exists,
      libvirtd not reachable, a group whose RPs have no VM config (qemu-storage-daemon source;
      skipped without qsd), `vm-config` of it, a pruned RP.

Exits 77 only when libvirtd cannot start or the guest cannot be built. Figures:
ferrytest.write_result("failover-test")."""

import hashlib
import json
import os
import shutil
import socket
import sys
import time

import ferrytest as ft

sys.path.insert(0, os.path.join(ft.REPO, "test", "guest"))
import guest as G  # noqa: E402

DOMAIN = "ferry-e2e-failover"
TEST_DOMAIN = DOMAIN + "-test"
BS = G.BLOCK_BYTES


def guest_cache():
    """A fixture cache of this test's own (its init has the `md5` command), seeded with the
    shared cache's downloads so that no download is needed."""
    shared = os.environ.get("FERRY_GUEST_DIR", "/var/tmp/ferry-guest")
    mine = "/var/tmp/ferry-guest-failover"
    if os.path.isdir(os.path.join(shared, "debs")) and not os.path.isdir(os.path.join(mine, "debs")):
        os.makedirs(mine, exist_ok=True)
        shutil.copytree(os.path.join(shared, "debs"), os.path.join(mine, "debs"))
    os.environ["FERRY_GUEST_DIR"] = mine
    return G.fixture_dir()


class Ctl:
    """The control channel of the test domain's guest (its second UART, moved by the rewrite
    into the test's socket directory)."""

    def __init__(self, path, console, timeout_s=180):
        self.path, self.console = path, console
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                ft.check(time.monotonic() < deadline, f"test domain: no ctl socket {path}")
                time.sleep(0.05)
        self.sock.settimeout(1.0)
        self.buf = b""
        while True:  # the UART drops what the guest sent before we connected: ping
            ft.check(time.monotonic() < deadline,
                     f"test domain not ready after {timeout_s}s; console:\n{self.console_text()}")
            try:
                self.sock.sendall(b"ping\n")
                if self.readline(time.monotonic() + 1.0) == "ok ping":
                    return
            except (OSError, TimeoutError):
                continue

    def console_text(self):
        try:
            with open(self.console, "rb") as f:
                return f.read().decode(errors="replace")[-3000:]
        except OSError:
            return "(no console)"

    def readline(self, deadline):
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply")
            try:
                chunk = self.sock.recv(4096)
            except socket.timeout:
                continue
            ft.check(chunk, "test domain: ctl channel closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip()

    def command(self, line, timeout_s=300):
        self.sock.sendall((line + "\n").encode())
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = self.readline(deadline)
            except TimeoutError:
                raise ft.TestFailure(f"test domain: no reply to '{line}'; console:\n"
                                     f"{self.console_text()}")
            if reply in ("READY", "ok ping"):
                continue
            ft.check(reply.startswith("ok"), f"test domain: '{line}' -> '{reply}'")
            return reply

    def close(self):
        self.sock.close()


def main():
    with ft.Env("failover-test", need_qsd=False) as env:
        if os.geteuid() != 0 or not G.start_libvirtd():
            raise ft.Skip("libvirtd cannot start here")
        fx = guest_cache()
        if fx is None:
            raise ft.Skip("the test guest cannot be built here")
        for d in (DOMAIN, TEST_DOMAIN):
            G.virsh("destroy", d, check=False)
        G.virsh("undefine", TEST_DOMAIN, "--nvram", check=False)
        figures = {}
        disks = [G.Disk("vda", size_mib=16), G.Disk("vdb", size_mib=8)]
        nblocks = {d.dev: d.size_mib * ft.MiB // BS for d in disks}
        g = G.Guest(env.path("guest", "x")[:-2], DOMAIN, disks)
        env.on_cleanup(g.destroy)
        rx = env.receiver()
        store = rx.store
        state = env.path("state", "x")[:-2]
        tests_dir = os.path.join(store, DOMAIN, "tests")

        def failover(*extra, group=DOMAIN):
            return env.run(["failover", "test", "--store", store, "--group", group, *extra],
                           timeout=300)

        def stop_quietly():
            if os.path.exists(os.path.join(tests_dir, "running.json")):
                failover("--stop")
            G.virsh("destroy", TEST_DOMAIN, check=False)
            G.virsh("undefine", TEST_DOMAIN, "--nvram", check=False)
        env.on_cleanup(stop_quietly)

        def protect():
            r = env.run(["protect", "--domain", DOMAIN, "--to", rx.addr, "--state-dir", state,
                         "--once"], timeout=300)
            ft.check(r.rc == 0, f"ferry protect failed:\n{r}")
            lines = [l for l in r.out.split() if l.strip()]
            ft.check(lines and lines[-1].isdigit(), f"protect --once printed no RP id:\n{r}")
            return int(lines[-1])

        def model_md5(dev):
            h = hashlib.md5()
            for b in range(nblocks[dev]):
                h.update(g.expected(dev, b))
            return h.hexdigest()

        def restored_md5(rp, dev):
            out = env.restore(store, DOMAIN, rp, dev)
            with open(out, "rb") as f:
                digest = hashlib.md5(f.read()).hexdigest()
            os.unlink(out)
            return digest

        def expect_error(what, r, *words):
            text = (r.err + r.out).lower()
            ft.check(r.rc == 1 and all(w.lower() in text for w in words),
                     f"{what}: expected exit 1 naming {words}:\n{r}")
            ft.log(f"{what}: {(r.err.strip() or r.out.strip()).splitlines()[-1]}")

        t0 = time.monotonic()
        g.start(fx)
        figures["source_boot_s"] = round(g.boot_s, 1)

        # ---- (a) RPs of known patterns ---------------------------------------------------------
        at_rp = {}  # rp -> {dev: md5 of the guest's model}
        gen = 0
        for i in range(3):
            gen += 1
            g.write("vda", [i, 100 + i, nblocks["vda"] - 1 - i], gen=gen, seed=i)
            g.write("vdb", [2 * i, nblocks["vdb"] - 1], gen=gen, seed=i)
            rp = protect()  # the writer waits: the model is exact at every RP
            at_rp[rp] = {d.dev: model_md5(d.dev) for d in disks}
        rps = sorted(at_rp)
        k = rps[1]
        for dev in ("vda", "vdb"):
            ft.check_eq(restored_md5(k, dev), at_rp[k][dev], f"(a) RP {k} {dev} restored")
        pts = {p["rp_id"]: p for p in env.points(store, DOMAIN)}
        for rp in rps:
            vc = pts[rp].get("vm_config")
            ft.check(vc and vc["bytes"] > 0 and len(vc["sha256"]) == 64,
                     f"(a) RP {rp} has no VM config in ferry points --json: {pts[rp]}")
            ft.check_eq(vc["from_rp"], rp, f"(a) RP {rp}'s VM config is in its own begin record")
        ft.check_eq(len({pts[rp]["vm_config"]["sha256"] for rp in rps}), 1,
                    "(a) one definition for all RPs (unchanged)")
        r = env.run(["vm-config", "--store", store, "--group", DOMAIN, "--point", str(k)])
        ft.check(r.rc == 0 and f"<name>{DOMAIN}</name>" in r.out,
                 f"(a) ferry vm-config printed no definition of {DOMAIN}:\n{r}")
        # vm-config prints the bytes as stored (plus a newline if they end without one).
        ft.check(pts[k]["vm_config"]["sha256"] in (hashlib.sha256(r.out.encode()).hexdigest(),
                                                   hashlib.sha256(r.out[:-1].encode()).hexdigest()),
                 "(a) vm-config bytes vs the sha256 in ferry points")

        # One protect process over several RPs sends the definition once; the receiver copies
        # it into the others, also across its own restart (it reads the newest from the store).
        before = max(pts)
        p = ft.Proc(env, "protect-interval", [env.ferry, "protect", "--domain", DOMAIN, "--to",
                    rx.addr, "--state-dir", state, "--interval", "1"] + env.tls_client_args(),
                    env.path("protect-interval.log"))

        def wait_rps(n, what):
            deadline = time.monotonic() + 120
            while True:
                ft.check(p.alive(), f"{what}: protect --interval exited:\n{p.log_text()[-3000:]}")
                got = [q["rp_id"] for q in env.points(store, DOMAIN) if q["rp_id"] > before]
                if len(got) >= n:
                    return got
                ft.check(time.monotonic() < deadline, f"{what}: {len(got)} of {n} RPs in 120 s")
                time.sleep(0.3)
        wait_rps(2, "(a) interval")
        rx.stop()
        rx.restart()
        interval_rps = wait_rps(4, "(a) interval after a receiver restart")
        ft.check_eq(p.terminate(), 0, "(a) protect --interval exit status on SIGTERM")
        sent = p.log_text().count("sending the VM definition")
        ft.check_eq(sent, 1, "(a) VM definitions sent by one protect process")
        pts = {q["rp_id"]: q for q in env.points(store, DOMAIN)}
        for rp in interval_rps:
            vc = pts[rp].get("vm_config")
            ft.check(vc and vc["from_rp"] == rp and vc["sha256"] == pts[k]["vm_config"]["sha256"],
                     f"(a) RP {rp} (source sent none) does not carry the definition: {pts[rp]}")
        figures["interval_rps"] = len(interval_rps)

        # ---- (b) test failover of RP k while replication goes on ------------------------------
        t_start = time.monotonic()
        r = failover("--point", str(k))
        ft.check(r.rc == 0, f"(b) failover test failed:\n{r}")
        figures["start_s"] = round(time.monotonic() - t_start, 1)
        ft.log(f"(b) {r.out.strip()}")
        with open(os.path.join(tests_dir, "running.json")) as f:
            rec = json.load(f)
        ft.check_eq(rec["rp_id"], k, "(b) RP of the running test")
        ft.check_eq(rec["domain"], TEST_DOMAIN, "(b) test domain name")
        ft.check(G.virsh("domstate", TEST_DOMAIN).strip() == "running",
                 "(b) the test domain is not running")
        ctl_path = rec["chardevs"][g.ctl_path]
        console = rec["chardevs"][g.console_path]
        ft.check(ctl_path != g.ctl_path and console != g.console_path,
                 "(b) the test domain must not use the source's host paths")
        vm = Ctl(ctl_path, console)
        figures["test_boot_s"] = round(time.monotonic() - t_start, 1)
        # RPs k+1.. arrive while the test domain runs (its exports pin RP k only).
        gen += 1
        g.write("vda", [7, 8, 9], gen=gen, seed=50)
        later = [protect(), None]
        gen += 1
        g.write("vdb", [5], gen=gen, seed=51)
        later[1] = protect()
        ft.check(later[0] > rps[-1] and later[1] > later[0], f"(b) RPs during the test: {later}")
        for dev in ("vda", "vdb"):
            t_md5 = time.monotonic()
            reply = vm.command(f"md5 {dev}")
            got = reply.split()[-1]
            ft.check_eq(got, at_rp[k][dev],
                        f"(b) the test VM's own digest of {dev} vs the source at RP {k}")
            figures[f"guest_md5_{dev}_s"] = round(time.monotonic() - t_md5, 1)
        vm.command("w vda 999 999 0 1 2")  # the test VM writes: only its overlay changes
        ft.check_eq(restored_md5(k, "vda"), at_rp[k]["vda"],
                    "(b) RP k in the store after the test VM wrote")
        expect_error("(b) second start while one runs", failover("--point", str(k)),
                     "already running", DOMAIN)
        pts = {p["rp_id"]: p for p in env.points(store, DOMAIN)}
        ft.check(pts[k]["test_running"] is True, f"(b) points: RP {k} not shown as under test")
        pins_dir = os.path.join(store, DOMAIN, "pins")
        ft.check(os.path.isdir(pins_dir) and os.listdir(pins_dir),
                 "(b) the exports hold no pin on RP k")
        vm.close()
        time.sleep(1.0)

        # ---- (c) stop: nothing left -------------------------------------------------------------
        r = failover("--stop", "--boot-result", "ok")
        ft.check(r.rc == 0, f"(c) failover test --stop failed:\n{r}")
        ft.log(f"(c) {r.out.strip()}")
        ft.check(G.virsh("dominfo", TEST_DOMAIN, check=False).returncode != 0,
                 "(c) the test domain still exists after --stop")
        for e in rec["exports"]:
            ft.check(not os.path.exists(f"/proc/{e['pid']}"),
                     f"(c) export of {e['disk']} (pid {e['pid']}) still running")
            ft.check(not os.path.exists(e["socket"]), f"(c) socket {e['socket']} left")
        for o in rec["overlays"]:
            ft.check(not os.path.exists(o), f"(c) overlay {o} left")
        ft.check(not os.path.exists(rec["run_dir"]), "(c) run dir left")
        ft.check(not os.path.exists(rec["socket_dir"]), "(c) socket dir left")
        ft.check(not os.path.exists(os.path.join(tests_dir, "running.json")), "(c) record left")
        ft.check(not os.path.isdir(pins_dir) or not os.listdir(pins_dir),
                 f"(c) pins left: {os.listdir(pins_dir)}")
        pts = {p["rp_id"]: p for p in env.points(store, DOMAIN)}
        tests = pts[k]["tests"]
        ft.check(len(tests) == 1 and tests[0]["duration_s"] > 0 and tests[0]["domain_running"]
                 and tests[0]["boot_result"] == "ok" and pts[k]["test_running"] is False,
                 f"(c) points: RP {k} not shown as tested: {pts[k]}")
        r = env.run(["points", "--store", store, "--group", DOMAIN])
        ft.check(f"RP {k} tested" in r.out, f"(c) ferry points text shows no test:\n{r}")
        expect_error("(c) --stop with nothing running", failover("--stop"),
                     "no test failover is running", DOMAIN)
        figures["test_s"] = round(tests[0]["duration_s"], 1)

        # ---- (d) a stop that crashed half-way: --stop again cleans the rest ------------------
        r = failover("--point", "latest")
        ft.check(r.rc == 0, f"(d) failover test failed:\n{r}")
        with open(os.path.join(tests_dir, "running.json")) as f:
            rec = json.load(f)
        ft.check_eq(rec["rp_id"], later[1], "(d) latest is the newest RP")
        G.virsh("destroy", TEST_DOMAIN)
        G.virsh("undefine", TEST_DOMAIN)
        r = failover("--stop")
        ft.check(r.rc == 0 and "already gone" in r.out, f"(d) --stop after a partial stop:\n{r}")
        for e in rec["exports"]:
            ft.check(not os.path.exists(f"/proc/{e['pid']}"), f"(d) export {e['pid']} left")
        ft.check(not os.path.exists(rec["run_dir"]), "(d) run dir left")

        # ---- (e) errors -------------------------------------------------------------------------
        # A start killed right after creating its record (the lock) left it empty: --stop
        # removes it, and a new start is not blocked by it afterwards.
        os.makedirs(tests_dir, exist_ok=True)
        open(os.path.join(tests_dir, "running.json"), "w").close()
        expect_error("(e) start over an interrupted start's record", failover(), "already running")
        r = failover("--stop")
        ft.check(r.rc == 0 and "interrupted" in r.out, f"(e) --stop of an empty record:\n{r}")
        expect_error("(e) unknown group", failover(group="no-such-group"), "no-such-group",
                     "not found")
        expect_error("(e) domain name exists", failover("--name-suffix", ""), "already exists",
                     DOMAIN)
        bogus = f"qemu:///system?socket={env.path('no-libvirtd.sock')}"
        expect_error("(e) libvirtd down", failover("--uri", bogus), "not reachable")
        ft.check(not os.path.exists(os.path.join(tests_dir, "running.json")),
                 "(e) a refused start left a record")
        try:
            ft.require_qsd()
            have_qsd = True
        except ft.Skip as e:
            ft.log(f"(e) no VM config: skipped ({e})")
            have_qsd = False
        if have_qsd:
            qsd = env.qsd([ft.Disk("d0", 16 * ft.MiB)])
            qsd.write(qsd.disk("d0"), 0, b"x" * 65536)
            env.replicate_once(qsd, rx.addr, "noconfig")
            expect_error("(e) RP without VM config", failover(group="noconfig"),
                         "no VM config", "--domain-xml")
            xml = env.path("other.xml")
            with open(xml, "w") as f:  # a definition given, but without the RP's disk d0
                f.write("<domain type='qemu'><name>other</name><memory>65536</memory>"
                        "<os><type>hvm</type></os><devices/></domain>")
            expect_error("(e) --domain-xml without the RP's disk",
                         failover("--domain-xml", xml, group="noconfig"), "d0", "<disk>")
            ft.check(not os.path.exists(os.path.join(store, "noconfig", "tests", "running.json")),
                     "(e) a refused start left a record")
            expect_error("(e) vm-config without one",
                         env.run(["vm-config", "--store", store, "--group", "noconfig"]),
                         "no VM config")
            qsd.stop()
        rx.stop()  # ferry prune needs the group's lock
        r = env.run(["prune", "--store", store, "--group", DOMAIN, "--keep-last", "2"])
        ft.check(r.rc == 0, f"(e) prune failed:\n{r}")
        expect_error("(e) pruned RP", failover("--point", str(rps[0])), "pruned",
                     str(rps[0]))
        expect_error("(e) vm-config of a pruned RP",
                     env.run(["vm-config", "--store", store, "--group", DOMAIN, "--point",
                              str(rps[0])]), "pruned")
        # The kept RPs still carry their definition after the pruning compacted the base.
        r = env.run(["vm-config", "--store", store, "--group", DOMAIN, "--point", "latest"])
        ft.check(r.rc == 0 and f"<name>{DOMAIN}</name>" in r.out,
                 f"(e) vm-config after pruning:\n{r}")

        figures["total_s"] = round(time.monotonic() - t0, 1)
        ft.write_result("failover-test", f"RP {k} booted as {TEST_DOMAIN}: the guest's own "
                        "digests equal the source's at that RP; nothing left after --stop",
                        **figures)


if __name__ == "__main__":
    main()
