#!/usr/bin/env python3
"""Failback with only the differences (docs/failover.md, "Failback"), end to end: a real libvirt
guest (test/guest: TCG, two qcow2 disks), a recovery-site receiver (store DR) and a main-site
receiver (store MAIN) on this machine.

  (a) the main VM writes known 64 KiB groups of blocks; RPs to DR; RP k;
  (b) the main VM writes more after RP k (they must be overwritten), then the disaster
      (the VM is destroyed, its definition kept shut off);
  (c) failover at DR to RP k; the failed-over VM writes known groups (some where the main VM
      wrote after RP k, some elsewhere);
  (d) `ferry seed` of the main store from the main VM's disks; `ferry protect` of the DR VM to
      the main receiver: a resync whose data is the 64 KiB blocks that really differ (within
      5%; the hash traffic printed beside it), no --take-over;
  (e) errors, each exit 1 naming the problem, nothing changed: failback of a group not
      failed over, failback --complete of a store that was not seeded, libvirtd down, a VM
      that does not shut down in time (no --force);
  (f) the DR VM writes more; `ferry failback` with the main site down fails naming the final
      RP (run again later); `ferry failback --force` pauses it when it does not shut down in
      time (killed there, the VM resumed); it powers off; `ferry failback` at DR, SIGKILL at
      kill points in turn, then again: the DR store holds the final state as one new base RP;
  (g) `ferry failback --complete` at MAIN, SIGKILL at kill points in turn, then again: the
      original domain runs, its guest's own digests equal the DR VM's at the final RP;
  (h) protection in the original direction resumes as a resync that ships ~0 data blocks;
      failback twice is refused on both sides.

Kill points: a few of each half by default; every failback.* point with FERRY_LONG=1.
Exits 77 only when libvirtd cannot start or the guest cannot be built."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import ferrytest as ft

sys.path.insert(0, os.path.join(ft.REPO, "test", "guest"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guest as G  # noqa: E402
from test_failover_test import Ctl, guest_cache  # noqa: E402

DOMAIN = "ferry-e2e-fb"
DR = DOMAIN + "-dr"
BS = G.BLOCK_BYTES
GROUP_BLOCKS = (64 * 1024) // BS  # the sender's block: 16 guest blocks
LONG = os.environ.get("FERRY_LONG") == "1"
DR_POINTS_ALL = ["failback.after_record", "failback.after_shutdown", "failback.after_final_rp",
                 "failback.after_commit", "failback.before_reset_state",
                 "failback.after_reset_state", "failback.after_undefine",
                 "failback.after_marker_removed"]
DR_POINTS = DR_POINTS_ALL if LONG else ["failback.after_final_rp", "failback.after_commit",
                                        "failback.after_reset_state"]
MAIN_POINTS_ALL = ["failback.complete_after_record", "failback.complete_after_write",
                   "failback.complete_after_invalidate", "failback.complete_after_start"]
MAIN_POINTS = MAIN_POINTS_ALL if LONG else ["failback.complete_after_write",
                                            "failback.complete_after_start"]


def md5_file(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def groups(first, count):
    """Guest blocks of `count` whole 64 KiB groups starting at group `first`."""
    return [b for gi in range(first, first + count)
            for b in range(gi * GROUP_BLOCKS, (gi + 1) * GROUP_BLOCKS)]


def main():
    with ft.Env("failback", need_qsd=False) as env:
        if os.geteuid() != 0 or not G.start_libvirtd():
            raise ft.Skip("libvirtd cannot start here")
        fx = guest_cache()
        if fx is None:
            raise ft.Skip("the test guest cannot be built here")

        def remove_domains():
            for d in (DOMAIN, DR):
                G.virsh("destroy", d, check=False)
                G.virsh("undefine", d, "--nvram", "--checkpoints-metadata", check=False)
        remove_domains()
        env.on_cleanup(remove_domains)
        figures = {}
        disks = [G.Disk("vda", size_mib=16), G.Disk("vdb", size_mib=8)]
        nblocks = {d.dev: d.size_mib * ft.MiB // BS for d in disks}
        g = G.Guest(env.path("guest", "x")[:-2], DOMAIN, disks)
        env.on_cleanup(g.destroy)
        status_sock = env.path("dr-status.sock")
        rx_dr = env.receiver(store=env.path("dr"), tag="receiver-dr",
                             args=["--status-socket", status_sock])
        rx_main = env.receiver(store=env.path("main"), tag="receiver-main")
        dr, main_store = rx_dr.store, rx_main.store
        orig_state, dr_state = env.path("state-orig"), env.path("state-dr")

        def protect(domain, rx, state, what):
            r = env.run(["protect", "--domain", domain, "--to", rx.addr, "--group", DOMAIN,
                         "--state-dir", state, "--once"], timeout=600)
            ft.check(r.rc == 0, f"{what}: ferry protect failed:\n{r}")
            lines = [l for l in r.out.split() if l.strip()]
            ft.check(lines and lines[-1].isdigit(), f"{what}: no RP id printed:\n{r}")
            return int(lines[-1]), r

        def expect_error(what, r, *words):
            text = (r.err + r.out).lower()
            ft.check(r.rc == 1 and all(w.lower() in text for w in words),
                     f"{what}: expected exit 1 naming {words}:\n{r}")
            ft.log(f"{what}: {(r.err.strip() or r.out.strip()).splitlines()[-1]}")

        def resync_figures(r):
            m = re.search(r"(\d+) blocks compared, (\d+) differed and were sent, (\d+) hash bytes",
                          r.err + r.out)
            ft.check(m, f"no resync in the protect output:\n{r}")
            w = re.search(r"(\d+) wire bytes", r.err + r.out)
            return int(m.group(1)), int(m.group(2)), int(m.group(3)), int(w.group(1))

        def failback_dr(*extra, kill=None, uri=None):
            args = ["failback", "--store", dr, "--group", DOMAIN, "--to", rx_main.addr,
                    "--state-dir", dr_state, "--uri", uri or "qemu:///system", *extra]
            return env.run(args + (env.tls_client_args() if env.tls else []), timeout=600,
                           extra_env={"FERRY_KILL_AT": kill} if kill else None)

        def complete(*extra, store=None, kill=None):
            return env.run(["failback", "--complete", "--store", store or main_store, "--group",
                            DOMAIN, "--domain", DOMAIN, "--state-dir", orig_state, *extra],
                           timeout=600, extra_env={"FERRY_KILL_AT": kill} if kill else None)

        t0 = time.monotonic()
        g.start(fx)
        # ---- (a) RPs of known patterns to DR ------------------------------------------------
        g.write("vda", groups(0, 2) + groups(10, 1), gen=1, seed=1)
        g.write("vdb", groups(0, 1), gen=1, seed=1)
        protect(DOMAIN, rx_dr, orig_state, "(a)")
        g.write("vda", groups(20, 1), gen=2, seed=2)
        k, _ = protect(DOMAIN, rx_dr, orig_state, "(a)")
        at_k = dict(g.model)
        # ---- (b) writes after RP k, then the disaster ------------------------------------------
        after_k = {"vda": groups(30, 2), "vdb": groups(5, 1)}
        for dev, blocks in after_k.items():
            g.write(dev, blocks, gen=3, seed=3)
        g.destroy()
        G.virsh("define", os.path.join(g.workdir, "domain.xml"))  # the original, shut off
        # ---- (c) failover at DR to RP k; the DR VM writes ----------------------------------------
        r = env.run(["failover", "--store", dr, "--group", DOMAIN, "--point", str(k),
                     "--name-suffix", "-dr"], timeout=600)
        ft.check(r.rc == 0, f"(c) failover failed:\n{r}")
        with open(os.path.join(dr, DOMAIN, "failover", "record.json")) as f:
            rec = json.load(f)
        vm = Ctl(rec["chardevs"][g.ctl_path], rec["chardevs"][g.console_path])
        dr_model = dict(at_k)  # (dev, blk) -> (gen, seed) or Write

        def dr_write(dev, blocks, gen, seed):
            for i in range(0, len(blocks), 32):
                vm.command(f"w {dev} {gen} {seed} " + " ".join(map(str, blocks[i:i + 32])))
            for b in blocks:
                dr_model[(dev, b)] = (gen, seed)

        dr_write("vda", groups(30, 1) + groups(40, 2), 10, 10)  # group 30: both sides wrote
        dr_write("vdb", groups(7, 1), 10, 10)

        def dr_expected(dev, blk):
            w = dr_model.get((dev, blk))
            if w is None:
                return bytes(BS)
            gen, seed = (w.gen, w.seed) if isinstance(w, G.Write) else w
            return G.block_bytes(dev, blk, gen, seed)

        def dr_md5(dev):
            return hashlib.md5(b"".join(dr_expected(dev, b) for b in range(nblocks[dev]))).hexdigest()

        def role(store):
            return {p.get("group_role") for p in env.points(store, DOMAIN)}

        def status_role():
            r = env.run(["status", "--socket", status_sock, "--json"], timeout=30)
            groups = {x["group"]: x for x in json.loads(r.out).get("groups", [])}
            return groups.get(DOMAIN, {}).get("role")

        ft.check_eq(role(dr), {"failed over"}, "(c) role at DR")
        ft.check_eq(status_role(), "failed over", "(c) ferry status role at DR")
        expect_error("(c) test failover of a failed-over group",
                     env.run(["failover", "test", "--store", dr, "--group", DOMAIN]), "failed over")
        # ---- (d) seed MAIN from the main VM's disks, resync DR VM -> MAIN -------------------------
        seed_args = ["seed", "--store", main_store, "--group", DOMAIN,
                     "--disk", f"vda={g.disk_path('vda')}", "--disk", f"vdb={g.disk_path('vdb')}"]
        r = env.run(seed_args, extra_env={"FERRY_KILL_AT": "seed.before_publish"})
        ft.check(r.rc == -9, f"(d) seed: kill point did not fire:\n{r}")
        ft.check(not os.path.exists(os.path.join(main_store, DOMAIN)),
                 "(d) a seed killed before its rename published the group")
        r = env.run(seed_args)
        ft.check(r.rc == 0, f"(d) seed failed:\n{r}")
        ft.check(not os.path.exists(os.path.join(main_store, f".{DOMAIN}.seeding")),
                 "(d) the seed cut short was not cleaned up")
        ft.log(f"(d) {r.out.strip().splitlines()[0]}")
        expect_error("(d) seed twice", env.run(["seed", "--store", main_store, "--group", DOMAIN,
                     "--disk", f"vda={g.disk_path('vda')}"]), "exists")
        expect_error("(d) seed of a missing file", env.run(
            ["seed", "--store", main_store, "--group", "other",
             "--disk", f"vda={env.path('no-such.img')}"]), "cannot read")
        ft.check_eq(role(main_store), {"seeded"}, "(d) role at MAIN after the seed")
        tiny = env.path("tiny-store")
        os.makedirs(tiny)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", tiny], check=True)
        env.on_cleanup(lambda: ft.unmount(tiny))
        expect_error("(d) seed into a store without space", env.run(
            ["seed", "--store", tiny, "--group", DOMAIN, "--disk", f"vda={g.disk_path('vda')}"]),
            "no space")
        ft.check_eq(os.listdir(tiny), [], "(d) a seed refused for space left files")
        ft.unmount(tiny)
        rp1, r = protect(DR, rx_main, dr_state, "(d) resync DR -> MAIN")
        compared, sent_blocks, hash_bytes, wire = resync_figures(r)
        # The 64 KiB blocks that really differ between the seed and the DR VM.
        differ = {"vda": {30, 31, 40, 41}, "vdb": {5, 7}}
        differ_bytes = sum(len(v) for v in differ.values()) * 64 * 1024
        sent_bytes = sent_blocks * 64 * 1024
        ft.log(f"(d) resync RP {rp1}: {compared} blocks compared, {sent_blocks} sent "
               f"({sent_bytes} bytes) vs {differ_bytes} bytes that differ; {hash_bytes} hash "
               f"bytes; {wire} wire bytes")
        ft.check(differ_bytes <= sent_bytes <= differ_bytes * 1.05,
                 f"(d) the resync sent {sent_bytes} bytes, {differ_bytes} differ")
        figures.update(resync_sent_bytes=sent_bytes, differ_bytes=differ_bytes,
                       hash_bytes=hash_bytes, wire_bytes=wire)
        for dev in ("vda", "vdb"):
            ft.check_eq(md5_file(env.restore(main_store, DOMAIN, rp1, dev)), dr_md5(dev),
                        f"(d) MAIN's RP {rp1} {dev} vs the DR VM")

        # ---- (e) errors ---------------------------------------------------------------------------
        expect_error("(e) failback of a group not failed over",
                     env.run(["failback", "--store", main_store, "--group", DOMAIN, "--to",
                              rx_dr.addr]), "not failed over")
        expect_error("(e) --complete without a seed", complete(store=dr), "not seeded")
        bogus = f"qemu:///system?socket={env.path('no-libvirtd.sock')}"
        expect_error("(e) libvirtd down", failback_dr(uri=bogus), "not reachable")
        expect_error("(e) VM does not shut down", failback_dr("--shutdown-timeout", "2"),
                     "did not shut down", "--force")
        ft.check(not os.path.exists(os.path.join(dr, DOMAIN, "failback")),
                 "(e) a refused failback left its record")
        ft.check(os.path.exists(os.path.join(dr, DOMAIN, "failed-over")), "(e) marker gone")

        # ---- (f) the DR half, SIGKILL at kill points, then again -----------------------------------
        dr_write("vda", groups(50, 1), 11, 11)
        # --force pauses a VM that does not shut down in time (killed right after: the record
        # stays, the VM paused); resumed, it is then shut down from inside as planned.
        r = failback_dr("--force", "--shutdown-timeout", "2", kill="failback.after_shutdown")
        ft.check(r.rc == -9, f"(f) --force: kill point did not fire:\n{r}")
        ft.check_eq(role(dr), {"failing back"}, "(f) role at DR during failback")
        r = env.run(["points", "--store", dr, "--group", DOMAIN])
        ft.check("failing back" in r.out and "ferry failback" in r.out, f"(f) points:\n{r}")
        ft.check("paused" in G.virsh("domstate", DR), "(f) --force did not pause the VM")
        G.virsh("resume", DR)
        vm.sock.sendall(b"off\n")  # the planned shutdown: the guest powers off
        vm.close()
        deadline = time.monotonic() + 120
        while "shut off" not in G.virsh("domstate", DR, check=False).stdout:
            ft.check(time.monotonic() < deadline, "(f) the DR VM did not power off")
            time.sleep(0.5)
        # The main site unreachable: the final RP fails, named; the next run finishes the job.
        rx_main.stop()
        r = failback_dr()
        expect_error("(f) main site down", r, "final RP", "run the same command again")
        ft.check(os.path.exists(os.path.join(dr, DOMAIN, "failed-over")), "(f) marker gone")
        rx_main.restart()
        t_fb = time.monotonic()
        for point in DR_POINTS:
            r = failback_dr(kill=point)
            ft.check(r.rc == -9, f"(f) kill point {point} did not fire:\n{r}")
        r = failback_dr()
        ft.check(r.rc == 0, f"(f) failback failed:\n{r}")
        figures["failback_dr_s"] = round(time.monotonic() - t_fb, 1)
        ft.log(f"(f) {r.out.strip()}")
        m = re.search(r"final RP (\d+)", r.out)
        final_rp = int(m.group(1))
        ft.check(not os.path.exists(os.path.join(dr, DOMAIN, "failed-over")), "(f) marker left")
        ft.check(not os.path.exists(os.path.join(dr, DOMAIN, "failover")), "(f) failover dir left")
        ft.check(G.virsh("domstate", DR, check=False).returncode != 0, "(f) DR domain left")
        pts = env.points(dr, DOMAIN)
        ft.check(len(pts) == 1 and pts[0]["rp_id"] > k, f"(f) DR store: {pts}")
        new_base = pts[0]["rp_id"]
        for dev in ("vda", "vdb"):
            ft.check_eq(md5_file(env.restore(dr, DOMAIN, new_base, dev)), dr_md5(dev),
                        f"(f) DR's new base {dev} vs the DR VM's final state")
            ft.check_eq(md5_file(env.restore(main_store, DOMAIN, final_rp, dev)), dr_md5(dev),
                        f"(f) MAIN's final RP {final_rp} {dev}")

        ft.check_eq(role(dr), {"protecting"}, "(f) role at DR after failback")
        ft.check_eq(status_role(), "protecting", "(f) ferry status role at DR after failback")
        # ---- (g) the main half ----------------------------------------------------------------------
        t_c = time.monotonic()
        for point in MAIN_POINTS:
            r = complete("--point", str(final_rp), kill=point)
            ft.check(r.rc == -9, f"(g) kill point {point} did not fire:\n{r}")
        r = complete("--point", str(final_rp))
        ft.check(r.rc == 0, f"(g) failback --complete failed:\n{r}")
        figures["complete_s"] = round(time.monotonic() - t_c, 1)
        ft.log(f"(g) {r.out.strip()}")
        ft.check(f"ferry protect --domain {DOMAIN}" in r.out, "(g) no resume command printed")
        ft.check_eq(role(main_store), {"failed back"}, "(g) role at MAIN")
        g._connect(time.monotonic())
        for dev in ("vda", "vdb"):
            got = g.command(f"md5 {dev}").split()[-1]
            ft.check_eq(got, dr_md5(dev), f"(g) the original guest's digest of {dev}")

        # ---- (h) protection in the original direction: a resync of ~nothing -------------------------
        rp_back, r = protect(DOMAIN, rx_dr, orig_state, "(h) ORIG -> DR")
        compared, sent_blocks, hash_bytes, wire = resync_figures(r)
        ft.log(f"(h) RP {rp_back}: {compared} blocks compared, {sent_blocks} sent, "
               f"{hash_bytes} hash bytes")
        ft.check(sent_blocks == 0, f"(h) the resync in the original direction sent {sent_blocks}")
        figures["resume_sent_blocks"] = sent_blocks
        expect_error("(h) --complete twice", complete(), "completed already")
        expect_error("(h) failback twice", failback_dr(), "not failed over")

        figures["dr_kill_points"] = len(DR_POINTS)
        figures["main_kill_points"] = len(MAIN_POINTS)
        figures["total_s"] = round(time.monotonic() - t0, 1)
        ft.write_result("failback", "failback with only the differences: the resync shipped "
                        "the blocks that differ, both halves completed through SIGKILL, the "
                        "original guest's digests equal the DR VM's final state", **figures)


if __name__ == "__main__":
    main()
