#!/usr/bin/env python3
"""A protection group of two VMs (`ferry protect --domain A --domain B --group G`) end to end:
two real libvirt guests (test/guest: TCG, one qcow2 disk each) captured at one instant per RP
by pausing both, starting each domain's backup job, resuming both; a real `ferry receive`.

The oracle is a cross-VM write order kept by the guests themselves: a writer thread has VM a
write sequence number n into its block 0, and only once a's guest acknowledged it, VM b
writes n into its block 0. At any single instant b's number is a's or a's minus one. In every
RP, restored with `ferry restore` and parsed as the fixture's self-validating blocks, b's
number never exceeds a's (and is never more than one behind): an RP that captured the VMs at
two instants shows b ahead of a (b captured later) or two behind.

Checks, in order:
  (a) RPs (`protect --once`, 3 by default, 10 with FERRY_LONG=1) while the writer runs; the
      pause each RP caused is printed (the RP line's "VMs paused N ms" and the per-RP log
      line) and stays under the bound; disks are named "<domain>.vda";
  (b) every RP: cross-VM order as above; the final quiet RP equals both guests' models;
      then an RP with `--quiesce`: both guests' fsfreeze hooks log freeze then thaw, the RP is
      app_consistent;
  (c) the RP carries the group's definition: `ferry points --json` lists both VMs with their
      disks and boot order (set with --boot-order b,a), `ferry vm-config` prints the group
      document, `ferry vm-config --vm A` one domain's XML, `--vm nope` fails naming the VMs;
  (d) errors: several domains without --group, a domain listed twice, an unknown domain, a
      boot order that does not name every domain; neither guest is left paused;
  (d2) control: with the writer running, A and B protected one after the other as two groups
      of one VM each: B's number is ahead of A's in some pair, so the oracle of (b) does tell
      one instant from two;
  (e) `ferry failover test` of the group at RP 1: both VMs start (`<vm>-test`) in the stored
      boot order, each guest's own md5 of its disk equals the source's at that RP; `--stop`
      removes both domains, the exports and the record; all or nothing: with a definition
      whose second VM needs a missing kernel (`--domain-xml`), the first VM, started, is torn
      down with every export and the record;
  (f) `ferry failover` at an older RP with `--boot-order a,b --boot-delay 1`, killed (kill
      point failover.after_start) once VM a runs: b is not there; the same command again
      completes without restarting a; both VMs (`<vm>-dr`) run on their own disks, in that
      order, their digests equal the sources' at the RP; a second failover is refused.

Exits 77 only when libvirtd cannot start or the guest cannot be built. Figures:
ferrytest.write_result("protection-group")."""

import hashlib
import json
import os
import re
import sys
import threading
import time

import ferrytest as ft

sys.path.insert(0, os.path.join(ft.REPO, "test", "guest"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guest as G  # noqa: E402
from test_failover_test import Ctl, guest_cache  # noqa: E402  (the md5-capable guest)

A = "ferry-e2e-grp-a"
B = "ferry-e2e-grp-b"
GROUP = "ferry-e2e-grp"
N_RPS = 10 if os.environ.get("FERRY_LONG") == "1" else 3
N_CONTROL = 4 if os.environ.get("FERRY_LONG") == "1" else 2
PAUSE_RE = re.compile(r"VMs paused ([\d.]+) ms")


def gen_at(path, dev):
    """The generation in block 0 of a restored disk (0: never written)."""
    with open(path, "rb") as f:
        data = f.read(G.BLOCK_BYTES)
    parsed = G.parse_block(data)
    if parsed is None:
        return 0
    ft.check(parsed[0] == dev and parsed[1] == 0, f"block 0 of {path} is {parsed}")
    return parsed[2]


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Writer(threading.Thread):
    """a writes n, then b writes n, n = 1, 2, ... until stopped."""

    def __init__(self, ga, gb):
        super().__init__(daemon=True)
        self.ga, self.gb = ga, gb
        self.n = 0
        self.stop = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stop.is_set():
                n = self.n + 1
                self.ga.write("vda", [0], gen=n, seed=1)
                self.gb.write("vda", [0], gen=n, seed=2)
                self.n = n
        except Exception as e:  # reported by the main thread
            self.error = e


def main():
    with ft.Env("protection-group", need_qsd=False) as env:
        if os.geteuid() != 0 or not G.start_libvirtd():
            raise ft.Skip("libvirtd cannot start here")
        fx = guest_cache()
        if fx is None:
            raise ft.Skip("the test guest cannot be built here")

        def remove_domains():
            for d in (A, B, A + "-test", B + "-test", A + "-dr", B + "-dr"):
                G.virsh("destroy", d, check=False)
            for d in (A + "-test", B + "-test", A + "-dr", B + "-dr"):
                G.virsh("undefine", d, "--nvram", check=False)
        remove_domains()
        env.on_cleanup(remove_domains)
        ga = G.Guest(env.path("ga", "x")[:-2], A, [G.Disk("vda", size_mib=8)], agent=True)
        gb = G.Guest(env.path("gb", "x")[:-2], B, [G.Disk("vda", size_mib=8)], agent=True)
        env.on_cleanup(ga.destroy)
        env.on_cleanup(gb.destroy)
        rx = env.receiver()
        store = rx.store
        state = env.path("state", "x")[:-2]
        figures = {}

        t0 = time.monotonic()
        boots = [threading.Thread(target=g.start, args=(fx,)) for g in (ga, gb)]
        for t in boots:
            t.start()
        for t in boots:
            t.join()
        ft.check(ga.running() and gb.running(), "the guests did not boot")
        figures["boot_s"] = round(time.monotonic() - t0, 1)

        def protect(*extra, domains=(A, B), group=GROUP):
            args = ["protect", "--to", rx.addr, "--state-dir", state, "--once"]
            for d in domains:
                args += ["--domain", d]
            if group:
                args += ["--group", group]
            return env.run(args + list(extra), timeout=300)

        def expect_error(what, r, *words):
            text = (r.err + r.out).lower()
            ft.check(r.rc != 0 and all(w.lower() in text for w in words),
                     f"{what}: expected a failure naming {words}:\n{r}")
            ft.log(f"{what}: {(r.err.strip() or r.out.strip()).splitlines()[-1]}")

        def running_not_paused():
            for d in (A, B):
                ft.check_eq(G.virsh("domstate", d).strip(), "running", f"state of {d}")

        # ---- (a) RPs while the writer runs -----------------------------------------------------
        w = Writer(ga, gb)
        w.start()
        pauses = []
        rps = []
        for i in range(N_RPS):
            time.sleep(0.3)
            r = protect("--boot-order", f"{B},{A}")
            ft.check(r.rc == 0, f"(a) protect of the group failed:\n{r}")
            lines = [l for l in r.out.split() if l.strip()]
            ft.check(lines and lines[-1].isdigit(), f"(a) protect --once printed no RP id:\n{r}")
            rps.append(int(lines[-1]))
            m = PAUSE_RE.search(r.err + r.out)
            ft.check(m is not None, f"(a) the RP line does not report the pause:\n{r}")
            instant = [l for l in (r.err + r.out).splitlines() if "for the cross-VM instant" in l]
            ft.check(len(instant) == 1, f"(a) no per-RP pause log line:\n{r}")
            ft.log(f"(a) {instant[0].split(' info: ')[-1]}")
            pauses.append(float(m.group(1)))
            ft.log(f"(a) RP {rps[-1]}: VMs paused {pauses[-1]:.1f} ms (writer at {w.n})")
        w.stop.set()
        w.join(timeout=120)
        ft.check(w.error is None, f"(a) the writer failed: {w.error}")
        ft.check(w.n >= 2, f"(a) the writer wrote only {w.n} numbers")
        running_not_paused()
        ft.check(max(pauses) < 5000, f"(a) a pause over the 5 s bound: {pauses}")
        figures["pause_ms_max"] = max(pauses)
        figures["pause_ms_median"] = sorted(pauses)[len(pauses) // 2]
        print(f"pause per RP (ms): {', '.join(f'{p:.1f}' for p in pauses)}", flush=True)

        # ---- (b) cross-VM order in every RP; a quiet RP equals the models ----------------------
        r = protect("--boot-order", f"{B},{A}")
        ft.check(r.rc == 0, f"(b) the quiet RP failed:\n{r}")
        final = int([l for l in r.out.split() if l.strip()][-1])
        pts = env.points(store, GROUP)
        names = sorted(d["name"] for d in pts[-1]["disks"])
        ft.check_eq(names, sorted([f"{A}.vda", f"{B}.vda"]), "(a) disk names of the group")
        seen = []
        for rp in rps + [final]:
            na = gen_at(env.restore(store, GROUP, rp, f"{A}.vda"), "vda")
            nb = gen_at(env.restore(store, GROUP, rp, f"{B}.vda"), "vda")
            seen.append((rp, na, nb))
            ft.check(nb <= na, f"(b) RP {rp}: VM b's number {nb} exceeds VM a's {na}")
            ft.check(na - nb <= 1, f"(b) RP {rp}: VM b's number {nb} is {na - nb} behind a's {na}")
        ft.log(f"(b) (rp, a, b): {seen}")
        ft.check_eq((seen[-1][1], seen[-1][2]), (w.n, w.n), "(b) the quiet RP's numbers")
        figures["rps"] = len(seen)
        figures["rps_between_writes"] = sum(1 for _, a, b in seen if a != b)

        # ---- (b2) --quiesce: both guests frozen for the instant, the RP app-consistent -----
        for g in (ga, gb):
            g.wait_agent()
            ft.check_eq(g.freeze_events(), [], f"(b2) {g.name}: freeze events before --quiesce")
        r = protect("--boot-order", f"{B},{A}", "--quiesce")
        ft.check(r.rc == 0 and "(file systems frozen)" in r.err + r.out,
                 f"(b2) the quiesced RP failed or froze nothing:\n{r}")
        quiesced = int([l for l in r.out.split() if l.strip()][-1])
        pq = [p for p in env.points(store, GROUP) if p["rp_id"] == quiesced][0]
        ft.check(pq["app_consistent"] is True, f"(b2) RP {quiesced} not app_consistent: {pq}")
        for g in (ga, gb):
            ft.check_eq([e[0] for e in g.freeze_events()], ["freeze", "thaw"],
                        f"(b2) {g.name}: fsfreeze hook events")
        running_not_paused()
        ft.log(f"(b2) RP {quiesced}: both guests frozen and thawed, "
               f"{PAUSE_RE.search(r.err + r.out).group(0)}")
        pts = env.points(store, GROUP)
        final = quiesced

        # ---- (c) the group's definition travels with the RP -----------------------------------
        vms = pts[-1].get("vms")
        ft.check(isinstance(vms, list) and len(vms) == 2, f"(c) points --json vms: {vms}")
        by_name = {v["name"]: v for v in vms}
        ft.check_eq(sorted(by_name), sorted([A, B]), "(c) VMs of the RP")
        ft.check_eq(by_name[B]["boot"], 1, "(c) boot position of b")
        ft.check_eq(by_name[A]["boot"], 2, "(c) boot position of a")
        ft.check_eq([d["name"] for d in by_name[A]["disks"]], [f"{A}.vda"], "(c) disks of a")
        r = env.run(["vm-config", "--store", store, "--group", GROUP, "--point", str(final)])
        ft.check(r.rc == 0 and r.out.lstrip().startswith("<ferry-group"),
                 f"(c) vm-config does not print the group document:\n{r}")
        r = env.run(["vm-config", "--store", store, "--group", GROUP, "--vm", A])
        ft.check(r.rc == 0 and r.out.lstrip().startswith("<domain")
                 and f"<name>{A}</name>" in r.out and f"<name>{B}</name>" not in r.out,
                 f"(c) vm-config --vm {A}:\n{r}")
        expect_error("(c) vm-config --vm unknown",
                     env.run(["vm-config", "--store", store, "--group", GROUP, "--vm", "nope"]),
                     "nope", A, B)

        # ---- (d) errors ---------------------------------------------------------------------
        expect_error("(d) several domains without --group", protect(group=None), "--group")
        expect_error("(d) a domain twice", protect(domains=(A, A)), "twice")
        expect_error("(d) an unknown domain", protect(domains=(A, "ferry-e2e-grp-none")),
                     "ferry-e2e-grp-none")
        expect_error("(d) a bad boot order", protect("--boot-order", A), "boot order")
        running_not_paused()

        # ---- (d2) control: the oracle sees two single-VM captures taken one after the other --
        # The same writer, A and B protected as two groups of one VM each (A's RP, then B's):
        # B's disk is from a later instant, and its number is ahead of A's in some pair. So a
        # group RP that captured its VMs one after the other would fail (b).
        w2 = Writer(ga, gb)
        w2.start()
        ahead = []
        for i in range(N_CONTROL):
            time.sleep(0.2)
            pair = []
            for d, grp in ((A, GROUP + "-ctl-a"), (B, GROUP + "-ctl-b")):
                r = protect(domains=(d,), group=grp)
                ft.check(r.rc == 0, f"(d2) protect of {d} alone failed:\n{r}")
                pair.append((grp, int([l for l in r.out.split() if l.strip()][-1])))
            na = gen_at(env.restore(store, pair[0][0], pair[0][1], "vda"), "vda")
            nb = gen_at(env.restore(store, pair[1][0], pair[1][1], "vda"), "vda")
            ahead.append(nb - na)
        w2.stop.set()
        w2.join(timeout=120)
        ft.check(w2.error is None, f"(d2) the writer failed: {w2.error}")
        ft.check(any(x > 0 for x in ahead),
                 f"(d2) B was never ahead of A in separate captures ({ahead}): the oracle "
                 "cannot tell one instant from two")
        ft.log(f"(d2) control, separate captures: B ahead of A by {ahead}")
        figures["control_b_ahead"] = ahead

        # ---- (e) test failover of the group: both VMs, in boot order, digests at the RP ------
        size = 8 * ft.MiB

        def rp_md5(rp, vm):
            """md5 of the source VM's disk at RP rp: block 0 as restored (self-validated above),
            the rest zeros (checked on the restore)."""
            path = env.restore(store, GROUP, rp, f"{vm}.vda")
            n = gen_at(path, "vda")
            model = (G.block_bytes("vda", 0, n, 1 if vm == A else 2) if n else bytes(G.BLOCK_BYTES))
            want = hashlib.md5(model + bytes(size - G.BLOCK_BYTES)).hexdigest()
            with open(path, "rb") as f:
                got = hashlib.md5(f.read()).hexdigest()
            ft.check_eq(got, want, f"restore of {vm}.vda at RP {rp} vs the guest's model")
            return want, n

        def check_vms(rec, rp, what):
            for vm_rec in rec["vms"]:
                src = vm_rec["domain"].rsplit("-", 1)[0]
                g = ga if src == A else gb
                want, n = rp_md5(rp, src)
                vm = Ctl(vm_rec["chardevs"][g.ctl_path], vm_rec["chardevs"][g.console_path])
                got = vm.command("md5 vda").split()[-1]
                vm.close()
                ft.check_eq(got, want, f"{what}: {vm_rec['domain']}'s digest of vda vs RP {rp}")
                ft.log(f"{what}: {vm_rec['domain']} digest equals RP {rp} (number {n})")

        tests_dir = os.path.join(store, GROUP, "tests")
        r = env.run(["failover", "test", "--store", store, "--group", GROUP, "--point",
                     str(rps[0])], timeout=300)
        ft.check(r.rc == 0, f"(e) failover test of the group failed:\n{r}")
        ft.log(f"(e) {r.out.strip()}")
        started = [l for l in r.out.splitlines() if l.startswith("test failover of")]
        ft.check(len(started) == 2 and f"domain {B}-test" in started[0]
                 and f"domain {A}-test" in started[1],
                 f"(e) the VMs did not start in the boot order {B},{A}:\n{r}")
        with open(os.path.join(tests_dir, "running.json")) as f:
            rec = json.load(f)
        for d in (A, B):
            ft.check_eq(G.virsh("domstate", d + "-test").strip(), "running", f"(e) {d}-test")
        check_vms(rec, rps[0], "(e)")
        r = env.run(["failover", "test", "--stop", "--store", store, "--group", GROUP])
        ft.check(r.rc == 0, f"(e) failover test --stop failed:\n{r}")
        for d in (A, B):
            ft.check(G.virsh("domstate", d + "-test", check=False).returncode != 0,
                     f"(e) {d}-test is left after --stop")
        ft.check(not os.path.exists(os.path.join(tests_dir, "running.json")), "(e) record left")
        for e in rec["exports"]:
            ft.check(not os.path.exists(f"/proc/{e['pid']}") or
                     "export" not in open(f"/proc/{e['pid']}/cmdline").read(),
                     f"(e) export {e['disk']} left running")

        # ---- (e2) all or nothing: the second VM cannot start, the first is torn down --------
        r = env.run(["vm-config", "--store", store, "--group", GROUP, "--point", str(rps[0])])
        ft.check(r.rc == 0, f"(e2) vm-config:\n{r}")
        doc = r.out
        at = doc.index(f"<vm name='{A}'>")  # A boots second (boot order B, A)
        head, tail = doc[:at], doc[at:]
        tail = re.sub(r"<kernel>[^<]*</kernel>", "<kernel>/nonexistent/ferry-vmlinuz</kernel>",
                      tail, count=1)
        broken = env.path("broken-group.xml")
        with open(broken, "w") as f:
            f.write(head + tail)
        r = env.run(["failover", "test", "--store", store, "--group", GROUP, "--point",
                     str(rps[0]), "--domain-xml", broken], timeout=300)
        ft.check(r.rc == 1 and "/nonexistent/ferry-vmlinuz" in r.err,
                 f"(e2) a second VM that cannot start was not refused naming the file:\n{r}")
        for d in (A, B):
            ft.check(G.virsh("domstate", d + "-test", check=False).returncode != 0,
                     f"(e2) {d}-test is left after the failed start")
        ft.check(not os.path.exists(os.path.join(tests_dir, "running.json")),
                 "(e2) the record is left after the failed start")
        left = [p for p in os.listdir("/proc") if p.isdigit()
                and store in cmdline(p) and "export" in cmdline(p)]
        ft.check(not left, f"(e2) exports left running: {left}")
        ft.log(f"(e2) {r.err.strip().splitlines()[-1]}; nothing left")

        # ---- (f) failover of the group at an older RP, boot order overridden ----------------
        ga.destroy()
        gb.destroy()
        k = rps[1]
        t_fo = time.monotonic()
        fo_args = ["failover", "--store", store, "--group", GROUP, "--point", str(k),
                   "--name-suffix", "-dr", "--boot-order", f"{A},{B}", "--boot-delay", "1",
                   "--lock-timeout", "30"]
        # Killed once the first VM runs: the second is not there; the same command completes.
        r = env.run(fo_args, timeout=300, extra_env={"FERRY_KILL_AT": "failover.after_start"})
        ft.check(r.rc == -9, f"(f) the kill point failover.after_start did not fire:\n{r}")
        ft.check_eq(G.virsh("domstate", A + "-dr").strip(), "running", "(f) after the kill, A-dr")
        ft.check(G.virsh("domstate", B + "-dr", check=False).returncode != 0,
                 "(f) B-dr exists although the failover was killed after starting A-dr")
        id_a = G.virsh("domid", A + "-dr").strip()
        r = env.run(fo_args, timeout=300)
        ft.check(r.rc == 0, f"(f) failover of the group failed:\n{r}")
        ft.check("cut short, finished" in r.out, f"(f) the rerun does not say it finished:\n{r}")
        ft.check_eq(G.virsh("domid", A + "-dr").strip(), id_a, "(f) A-dr was restarted by the rerun")
        ft.log(f"(f) {r.out.strip()}")
        started = [l for l in r.out.splitlines() if l.startswith("failover of")]
        ft.check(len(started) == 2 and f"domain {A}-dr" in started[0]
                 and f"domain {B}-dr" in started[1],
                 f"(f) the VMs did not start in the order {A},{B}:\n{r}")
        with open(os.path.join(store, GROUP, "failover", "record.json")) as f:
            rec = json.load(f)
        ft.check_eq(rec["phase"], "running", "(f) phase")
        ft.check_eq([v["domain"] for v in rec["vms"]], [A + "-dr", B + "-dr"], "(f) VMs")
        for d in (A, B):
            ft.check_eq(G.virsh("domstate", d + "-dr").strip(), "running", f"(f) {d}-dr")
        check_vms(rec, k, "(f)")
        figures["failover_s"] = round(time.monotonic() - t_fo, 1)
        r = env.run(["failover", "--store", store, "--group", GROUP, "--name-suffix", "-dr"])
        ft.check(r.rc == 1 and "failed over already" in r.err,
                 f"(f) a second failover was not refused:\n{r}")
        ft.write_result("protection-group",
                        f"{len(seen)} RPs of a two-VM group, 0 with VM b ahead of VM a; "
                        f"pause max {max(pauses):.1f} ms", **figures)


if __name__ == "__main__":
    main()
