#!/usr/bin/env python3
"""`ferry protect` / `ferry agent` end to end on a real libvirt domain (test/guest: TCG, two
qcow2 virtio disks vda/vdb, one raw disk vdc, qemu-guest-agent on), a real `ferry receive` on
loopback, and the guest's own write log as the oracle (never Ferry's view of what changed).

The check used after every RP (`check_rp`): each disk of the RP is restored with
`ferry restore`, every 4 KiB block is parsed (self-validating blocks, test/guest/guest.py), and
the three disks together must equal the guest's model after exactly one prefix of its write
log, with that prefix containing every write acknowledged before `ferry protect` started and
nothing issued after it ended. Unwritten blocks must read as zeros. So a lost dirty block, a
stale block, a torn RP across disks or a block from the future all fail.

Scenarios, in order:
  (a) N RPs with `protect --once` while a writer thread writes into all three disks; vda/vdb
      incremental after RP 1, vdc (raw: no checkpoint) by hash-compare resync every RP after
      the first (checked in the RP's log line);
  (b) kill -9 of `protect --interval 2` while an RP is in flight (its backup job exists), then
      `--once`: no dirty block lost, and the points form a chain (each base = previous RP);
  (c) `virsh destroy` + fresh start of the guest: the next RP is exact; wire bytes vs bytes
      really changed recorded;
  (d) checkpoint metadata deleted behind Ferry's back: healed, next RP exact and incremental
      (changed bytes of vda/vdb = 4 KiB x the blocks the guest wrote);
  (e) `--quiesce`: app_consistent in `ferry points --json`, the guest logs freeze then thaw;
  (f) `ferry agent` with a [[domain]] target: `ferry status --json` reports as last_rp_id the
      newest RP the receiver holds;
  (g) errors naming the problem: unknown domain, libvirtd not reachable (bogus --uri), a
      foreign backup job running (busy), a domain without disks.

Exits 77 only when libvirtd cannot start or the guest cannot be built. Figures are written
as one JSON line (ferrytest.write_result, test "protect-libvirt")."""

import json
import os
import random
import re
import sys
import threading
import time

import ferrytest as ft

sys.path.insert(0, os.path.join(ft.REPO, "test", "guest"))
import guest as G  # noqa: E402

DOMAIN = "ferry-e2e-protect"
BS = G.BLOCK_BYTES
N_RPS_A = int(os.environ.get("FERRY_PROTECT_RPS", "2" if ft.SANITIZE else "4"))

RP_LINE = re.compile(
    r"RP (\d+) \(base (\d+)\): (\d+) disk\(s\), ([\d.]+) MB changed .*?([\d.]+) MB on the wire, "
    r"([\d.]+) s \(.*?capture ([\d.]+) s, transfer ([\d.]+) s, commit ([\d.]+) s(?:, then finish [\d.]+ s)?\)(.*?); "
    r"(\d+) wire bytes")


def parse_rp_lines(text):
    out = []
    for m in RP_LINE.finditer(text):
        out.append({"rp": int(m.group(1)), "base": int(m.group(2)),
                    "wire_bytes": int(m.group(11)), "resync": m.group(10),
                    "capture_s": float(m.group(7)), "transfer_s": float(m.group(8)),
                    "commit_s": float(m.group(9)), "total_s": float(m.group(6))})
    return out


class Writer:
    """Writes one self-validating block per guest command (unique generation each), into
    random blocks of the given disks, until stopped. One block per command keeps every write
    atomic with respect to a capture, so the prefix check is exact."""

    def __init__(self, g, rng, disks, gen, pause_s=0.05):
        self.g, self.rng, self.disks, self.pause_s = g, rng, disks, pause_s
        self.gen = gen
        self.stop_ev = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop_ev.is_set():
                dev, nblocks = self.rng.choice(self.disks)
                self.gen[0] += 1
                self.g.write(dev, [self.rng.randrange(nblocks)], gen=self.gen[0],
                             seed=self.gen[0] % 1000)
                time.sleep(self.pause_s)
        except Exception as e:  # reported by stop()
            self.error = e

    def stop(self):
        self.stop_ev.set()
        self.thread.join(120)
        ft.check(not self.thread.is_alive(), "guest writer thread hung")
        if self.error:
            raise ft.TestFailure(f"guest writer failed: {self.error}")


def main():
    with ft.Env("protect-libvirt", need_qsd=False) as env:
        if os.geteuid() != 0 or not G.start_libvirtd():
            raise ft.Skip("libvirtd cannot start here")
        fx = G.fixture_dir()
        if fx is None:
            raise ft.Skip("the test guest cannot be built here")
        G.virsh("destroy", DOMAIN, check=False)
        rng = random.Random(env.seed)
        figures = {}
        disks = [G.Disk("vda", size_mib=64), G.Disk("vdb", size_mib=32),
                 G.Disk("vdc", fmt="raw", size_mib=16)]
        sizes = {d.dev: d.size_mib * ft.MiB for d in disks}
        nblocks = {dev: s // BS for dev, s in sizes.items()}
        g = G.Guest(env.path("guest", "x")[:-2], DOMAIN, disks, agent=True)
        env.on_cleanup(g.destroy)
        rx = env.receiver()
        state = env.path("state", "x")[:-2]
        gen = [0]
        all_devs = [(dev, nblocks[dev]) for dev in ("vda", "vdb", "vdc")]

        def protect(*extra, timeout=300, rc=0, uri=None, domain=DOMAIN):
            args = ["protect", "--domain", domain, "--to", rx.addr, "--state-dir", state,
                    "--once", *extra]
            if uri:
                args += ["--uri", uri]
            r = env.run(args, timeout=timeout)
            if rc is not None and r.rc != rc:
                raise ft.TestFailure(f"ferry protect: expected exit {rc}:\n{r}")
            return r

        def points():
            return env.points(rx.store, DOMAIN)

        def check_chain(pts, what):
            ids = [p["rp_id"] for p in pts]
            ft.check(ids == sorted(set(ids)), f"{what}: RP ids not strictly increasing: {ids}")
            for prev, cur in zip(pts, pts[1:]):
                ft.check(cur["base_rp"] == prev["rp_id"],
                         f"{what}: RP {cur['rp_id']} has base {cur['base_rp']}, but the "
                         f"previous committed RP is {prev['rp_id']}: {ids}")

        def check_rp(rp, lo, hi, what):
            """The restored RP equals the model after writes[:k] for one k in [lo, hi]."""
            writes = list(g.writes)
            hi = min(hi, len(writes))
            idx = {}  # (dev, blk) -> [(gen, seed, i)] in log order
            for i, w in enumerate(writes):
                idx.setdefault((w.dev, w.block), []).append((w.gen, w.seed, i))
            k_lo, k_hi = lo, hi
            for dev in ("vda", "vdb", "vdc"):
                out = env.restore(rx.store, DOMAIN, rp, dev)
                ft.check_eq(os.path.getsize(out), sizes[dev], f"RP {rp} {dev} restored size")
                with open(out, "rb") as f:
                    for b in range(nblocks[dev]):
                        data = f.read(BS)
                        try:
                            got = G.parse_block(data)
                        except G.GuestError as e:
                            raise ft.TestFailure(f"{what}: RP {rp} {dev} block {b}: {e}")
                        hist = idx.get((dev, b), [])
                        if got is None:
                            if hist:
                                k_hi = min(k_hi, hist[0][2])
                            continue
                        ft.check(got[0] == dev and got[1] == b,
                                 f"{what}: RP {rp} {dev} block {b} holds a misdirected block {got}")
                        pos = [j for j, h in enumerate(hist) if (h[0], h[1]) == (got[2], got[3])]
                        ft.check(pos, f"{what}: RP {rp} {dev} block {b} holds gen {got[2]}, "
                                      f"which the guest never wrote there")
                        j = pos[0]
                        k_lo = max(k_lo, hist[j][2] + 1)
                        if j + 1 < len(hist):
                            k_hi = min(k_hi, hist[j + 1][2])
                os.unlink(out)
                if k_lo > k_hi:
                    break
            if k_lo > k_hi:
                raise ft.TestFailure(
                    f"{what}: RP {rp} equals no state of the guest between the start and the end "
                    f"of the RP (writes {lo}..{hi} of {len(writes)}; the blocks need a prefix "
                    f">= {k_lo} and <= {k_hi}): a dirty block lost or a block from later")
            ft.log(f"{what}: RP {rp} == guest log prefix in [{k_lo}, {k_hi}] (window {lo}..{hi})")

        def protect_checked(what, *extra):
            lo = len(g.writes)
            r = protect(*extra)
            hi = len(g.writes) + 1  # at most one write in flight when protect returned
            lines = [l for l in r.out.split() if l.strip()]
            ft.check(lines and lines[-1].isdigit(), f"protect --once printed no RP id:\n{r}")
            rp = int(lines[-1])
            info = parse_rp_lines(r.err)
            ft.check(info and info[-1]["rp"] == rp, f"no describe line for RP {rp}:\n{r}")
            check_rp(rp, lo, hi, what)
            return rp, info[-1], r

        def check_changed(dev, blocks, got, what):
            # The store counts the engine blocks (64 KiB) the changed 4 KiB granules fall in:
            # at least the 4 KiB granules, at most their 64 KiB blocks; a full read is far more.
            exact = len(set(blocks)) * BS
            rounded = len({b * BS // (64 * ft.KiB) for b in blocks}) * 64 * ft.KiB
            ft.check(exact <= got <= rounded,
                     f"{what}: {dev} changed_bytes {got}, expected {exact}..{rounded} for the "
                     f"guest's writes to blocks {sorted(set(blocks))}")

        def blocks_written_since(n):
            out = {}
            for w in g.writes[n:]:
                out.setdefault(w.dev, set()).add(w.block)
            return out

        t_start = time.monotonic()
        g.start(fx)
        figures["boot_s"] = round(g.boot_s, 1)
        g.wait_agent()
        ft.log(f"guest {DOMAIN} up in {g.boot_s:.1f}s, agent connected")

        # ---- (a) N RPs while the guest writes -------------------------------------------------
        for dev, _ in all_devs:  # something on every disk before the first (full) RP
            gen[0] += 1
            g.write(dev, [0, 1, nblocks[dev] - 1], gen=gen[0], seed=1)
        wr = Writer(g, rng, all_devs, gen)
        rp_times = []
        for i in range(N_RPS_A):
            time.sleep(1.0)
            rp, info, r = protect_checked(f"(a) RP #{i + 1} under writes")
            rp_times.append(info["total_s"])
            ft.check_eq(info["base"], 0 if i == 0 else rp - 1, f"(a) base of RP {rp}")
            if i > 0:
                ft.check("resync of 1 disk(s)" in info["resync"],
                         f"(a) RP {rp}: the raw disk vdc must go by hash-compare resync:\n{r.err}")
        wr.stop()
        pts = points()
        check_chain(pts, "(a)")
        for p in pts[1:]:
            for d in p["disks"]:
                if d["name"] in ("vda", "vdb"):
                    ft.check(not d["full"], f"(a) RP {p['rp_id']} {d['name']} is full, not incremental")
        figures["a_rps"] = N_RPS_A
        figures["a_rp_seconds"] = rp_times

        # ---- (b) kill -9 of protect --interval 2 mid-RP ---------------------------------------
        wr = Writer(g, rng, all_devs, gen)
        before = len(points())
        nbd_sock = os.path.join(state, DOMAIN, "nbd.sock")
        kills_mid_rp = 0
        # Two kills, and more (up to 6) until one lands while the backup job runs: an RP of
        # this guest takes well under a second.
        attempt = -1
        while attempt < 1 or (kills_mid_rp == 0 and attempt < 5):
            attempt += 1
            p = ft.Proc(env, f"protect-interval-{attempt}",
                        [env.ferry, "protect", "--domain", DOMAIN, "--to", rx.addr, "--state-dir",
                         state, "--interval", "2"] + env.tls_client_args(), env.path(f"protect-interval-{attempt}.log"))
            deadline = time.monotonic() + 120
            # This run's capture (a leftover job of the previous kill may still hold the socket).
            while not (os.path.exists(nbd_sock) and "incremental from checkpoint" in p.log_text()):
                ft.check(p.alive(), f"protect --interval exited:\n{p.log_text()[-3000:]}")
                ft.check(time.monotonic() < deadline, "(b) no backup job seen within 120 s")
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.05))
            p.kill9()
            # The job outlives a killed client (it is healed by the next run): still there after
            # the kill means the kill landed before protect ended it.
            job = G.virsh("domjobinfo", DOMAIN, check=False).stdout
            mid = "None" not in job.split("\n")[0] if job.strip() else False
            kills_mid_rp += mid
            ft.log(f"(b) kill -9 of protect --interval (pid {p.pid}), backup job in flight: {mid}")
        ft.check(kills_mid_rp >= 1, "(b) never killed protect while its backup job was running")
        time.sleep(1.0)
        rp, info, r = protect_checked("(b) --once after kill -9")
        wr.stop()
        protect_checked("(b) RP after the writer stopped")
        pts = points()
        check_chain(pts, "(b)")
        ft.check(len(pts) > before, "(b) no new RP")
        # And once more with the guest idle: exactly the blocks written since, on vda/vdb.
        n0 = len(g.writes)
        gen[0] += 1
        g.write("vda", [3, 4, 100, 2000], gen=gen[0], seed=7)
        rp, info, r = protect_checked("(b) idle RP after the kill")
        changed = {d["name"]: d for d in points()[-1]["disks"]}
        check_changed("vda", [3, 4, 100, 2000], changed["vda"]["changed_bytes"], "(b) idle RP")
        check_changed("vdb", [], changed["vdb"]["changed_bytes"], "(b) idle RP")
        figures["b_kills_mid_rp"] = kills_mid_rp

        # ---- (c) virsh destroy + fresh start ---------------------------------------------------
        n0 = len(g.writes)
        gen[0] += 1
        g.write("vda", [10, 11, 2000], gen=gen[0], seed=3)
        gen[0] += 1
        g.write("vdc", [20, 21], gen=gen[0], seed=3)
        g.destroy()
        g.start(fx, fresh_disks=False)
        g.wait_agent()
        gen[0] += 1
        g.write("vdb", [30, 31, 32, 33], gen=gen[0], seed=4)
        gen[0] += 1
        g.write("vdc", [22], gen=gen[0], seed=4)
        rp, info, r = protect_checked("(c) RP after destroy + start")
        changed_blocks = sum(len(s) for s in blocks_written_since(n0).values())
        figures["c_after_restart"] = {
            "changed_bytes": changed_blocks * BS, "wire_bytes": info["wire_bytes"],
            "resync": info["resync"].strip("; "), "seconds": info["total_s"],
            "full": {d["name"]: d["full"] for d in points()[-1]["disks"]}}
        ft.log(f"(c) after destroy+start: {changed_blocks * BS} bytes changed, "
               f"{info['wire_bytes']} wire bytes ({info['resync'].strip('; ')})")
        check_chain(points(), "(c)")

        # ---- (d) checkpoint metadata deleted behind Ferry's back ------------------------------
        cps = G.virsh("checkpoint-list", DOMAIN, "--name").split()
        ft.check_eq(cps, [f"ferry.{DOMAIN}.{rp}"], "(d) checkpoints after the last ack")
        G.virsh("checkpoint-delete", DOMAIN, cps[0], "--metadata")
        ft.check_eq(G.virsh("checkpoint-list", DOMAIN, "--name").split(), [],
                    "(d) checkpoints after checkpoint-delete --metadata")
        n0 = len(g.writes)
        gen[0] += 1
        g.write("vda", [40, 41], gen=gen[0], seed=5)
        gen[0] += 1
        g.write("vdb", [42], gen=gen[0], seed=5)
        rp, info, r = protect_checked("(d) RP after metadata loss")
        last = {d["name"]: d for d in points()[-1]["disks"]}
        for dev, blocks in (("vda", [40, 41]), ("vdb", [42])):
            ft.check(not last[dev]["full"], f"(d) {dev} not incremental after metadata loss")
            check_changed(dev, blocks, last[dev]["changed_bytes"], "(d) after metadata loss")
        ft.check("redefine" in r.err.lower(), f"(d) the heal (redefine) is not logged:\n{r.err}")

        # ---- (e) --quiesce ---------------------------------------------------------------------
        ft.check_eq(g.freeze_events(), [], "(e) freeze events before the quiesced RP")
        gen[0] += 1
        g.write("vdb", [50], gen=gen[0], seed=6)
        rp, info, r = protect_checked("(e) quiesced RP", "--quiesce")
        pts = points()
        ft.check(pts[-1]["app_consistent"] is True, f"(e) RP {rp} not app_consistent: {pts[-1]}")
        ft.check(not any(p["app_consistent"] for p in pts[:-1]),
                 "(e) an RP taken without --quiesce is marked app_consistent")
        events = [e[0] for e in g.freeze_events()]
        ft.check_eq(events, ["freeze", "thaw"], "(e) guest fsfreeze hook events")
        st = G.virsh("qemu-agent-command", DOMAIN, '{"execute":"guest-fsfreeze-status"}')
        ft.check('"thawed"' in st, f"(e) guest not thawed after the RP: {st}")

        # ---- (f) agent + ferry status ----------------------------------------------------------
        gen[0] += 1
        g.write("vda", [60], gen=gen[0], seed=8)
        sock = env.path("run", "agent.sock")
        cfg = env.path("agent.toml")
        with open(cfg, "w") as f:
            f.write(f'state_dir = "{state}"\nstatus_socket = "{sock}"\nlog_level = "info"\n'
                    + env.agent_tls_toml() + '\n'
                    f'[[domain]]\nname = "{DOMAIN}"\nto = "{rx.addr}"\n'
                    f'interval_seconds = 3600\n')
        lo = len(g.writes)
        agent = ft.Proc(env, "agent", [env.ferry, "agent", "--config", cfg], env.path("agent.log"))
        deadline = time.monotonic() + 180
        tgt = None
        while time.monotonic() < deadline:
            ft.check(agent.alive(), f"(f) agent exited:\n{agent.log_text()[-3000:]}")
            r = env.run(["status", "--socket", sock, "--json"], timeout=30)
            last_status = r
            if r.rc in (0, 3) and r.out.strip():
                tgt = next((t for t in json.loads(r.out)["targets"] if t["name"] == DOMAIN), None)
                if tgt is None:
                    time.sleep(0.5)
                    continue
                if tgt["rps_ok"] >= 1 and tgt["state"] == "idle":
                    break
                ft.check(tgt["rps_failed"] == 0, f"(f) agent RP failed: {tgt}")
            time.sleep(0.5)
        else:
            raise ft.TestFailure(f"(f) agent took no RP in 180 s: {tgt}\n{last_status}\n"
                                 f"{agent.log_text()[-3000:]}")
        pts = points()
        ft.check_eq(tgt["last_rp_id"], pts[-1]["rp_id"],
                    "(f) ferry status last_rp_id vs the receiver's newest RP")
        ft.check(tgt["rpo_seconds"] is not None and tgt["rpo_seconds"] < 180,
                 f"(f) rpo_seconds {tgt['rpo_seconds']}")
        check_rp(tgt["last_rp_id"], lo, len(g.writes), "(f) the agent's RP")
        check_chain(pts, "(f)")
        ft.check_eq(agent.terminate(), 0, "(f) agent exit status on SIGTERM")

        # ---- (g) errors --------------------------------------------------------------------------
        def expect_error(what, r, *words):
            text = (r.err + r.out).lower()
            ft.check(r.rc == 1 and all(w.lower() in text for w in words),
                     f"(g) {what}: expected exit 1 naming {words}:\n{r}")
            ft.log(f"(g) {what}: {r.err.strip().splitlines()[-1]}")

        expect_error("unknown domain", protect(domain="no-such-domain-e2e", rc=None),
                     "no-such-domain-e2e")
        bogus = f"qemu:///system?socket={env.path('no-libvirtd.sock')}"
        expect_error("libvirtd down", protect(uri=bogus, rc=None), "not reachable", DOMAIN)
        bx = env.path("foreign-backup.xml")
        fsock = env.path("foreign.sock")
        with open(bx, "w") as f:
            f.write(f"<domainbackup mode='pull'><server transport='unix' socket='{fsock}'/>"
                    f"<disks><disk name='vda' backup='yes' type='file'><scratch file='"
                    f"{env.path('foreign-vda.qcow2')}'/></disk><disk name='vdb' backup='no'/>"
                    f"<disk name='vdc' backup='no'/></disks></domainbackup>")
        G.virsh("backup-begin", DOMAIN, bx)
        try:
            expect_error("foreign backup job", protect(rc=None), DOMAIN, "foreign.sock")
        finally:
            G.virsh("domjobabort", DOMAIN, check=False)
        gen[0] += 1
        g.write("vdc", [70], gen=gen[0], seed=9)
        protect_checked("(g) RP after the foreign job ended")
        check_chain(points(), "(g)")
        g.destroy()
        # A domain without disks (the same kernel; nothing else runs meanwhile).
        nd = "ferry-e2e-nodisk"
        xml = env.path("nodisk.xml")
        with open(xml, "w") as f:
            f.write(f"<domain type='{G.accel_domain_type()}'><name>{nd}</name>"
                    f"<memory unit='MiB'>128</memory><vcpu>1</vcpu><os><type arch='x86_64' "
                    f"machine='pc'>hvm</type><kernel>{fx}/vmlinuz</kernel><initrd>{fx}/initrd.gz"
                    f"</initrd><cmdline>console=ttyS0 panic=-1 quiet</cmdline></os>"
                    f"<devices><controller type='usb' model='none'/><memballoon model='none'/>"
                    f"</devices></domain>")
        G.virsh("destroy", nd, check=False)
        G.virsh("create", xml)
        try:
            expect_error("domain without disks", protect(domain=nd, rc=None), nd, "disk")
        finally:
            G.virsh("destroy", nd, check=False)

        figures["total_s"] = round(time.monotonic() - t_start, 1)
        figures["rps"] = len(points())
        ft.write_result("protect-libvirt", f"{figures['rps']} RPs restored and equal to the guest's "
                        "own write log, 0 dirty blocks lost", **figures)


if __name__ == "__main__":
    main()
