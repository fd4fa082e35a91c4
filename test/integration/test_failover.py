#!/usr/bin/env python3
"""`ferry failover` (failover proper) end to end: a real libvirt guest (test/guest: TCG, two
qcow2 disks) protected with `ferry protect --once` to a real `ferry receive`; the recovery
site fails the group over to an older RP k, killed with SIGKILL at every failover.* kill
point in turn (each run gets one step further), then run once more: it completes. The oracle
is the guest's own write log: the failed-over domain's guest digests its disks itself (`md5
DEV` on its control channel) and each digest must equal the source model's at RP k.

Checks, in order:
  (a) RPs while the guest writes known patterns;
  (b) errors before anything changes, each exit 1 naming the problem and leaving no marker:
      unknown group, libvirtd down, a domain name that exists, a test failover running, a
      pruned RP;
  (c) failover to RP k (older than the newest), SIGKILL at each failover.* point and run
      again; after the first kill the source's next RP is refused naming the state; after
      every kill RP k still restores as the source had it;
  (d) the final run: the domain runs at the recovery site, its guest's digests equal the
      source at RP k, it writes, and the writes land in the overlay (the replica image's
      digest is unchanged, RP k restores unchanged); newer RPs are reported given up;
  (e) failover again: refused, naming when and which RP; `ferry points` and `ferry status`
      show the state;
  (f) a second VM whose source keeps replicating (`protect --interval 1`) fails over at
      `latest` with the receiver holding its group: the command gets the group lock, the RP is
      the newest, the running source is refused naming the state, the failed-over guest's
      digest equals the source's.

Exits 77 only when libvirtd cannot start or the guest cannot be built. Figures:
ferrytest.write_result("failover")."""

import hashlib
import json
import os
import sys
import time

import ferrytest as ft

sys.path.insert(0, os.path.join(ft.REPO, "test", "guest"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import guest as G  # noqa: E402
from test_failover_test import Ctl, guest_cache  # noqa: E402  (the same guest and channel)

DOMAIN = "ferry-e2e-fo"
DR = DOMAIN + "-dr"
DOMAIN2 = "ferry-e2e-fo2"
BS = G.BLOCK_BYTES
KILL_POINTS = ["failover.after_marker", "failover.after_intent", "failover.after_compact",
               "failover.after_overlay", "failover.before_define", "failover.after_define",
               "failover.after_start"]


def md5_file(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    with ft.Env("failover", need_qsd=False) as env:
        if os.geteuid() != 0 or not G.start_libvirtd():
            raise ft.Skip("libvirtd cannot start here")
        fx = guest_cache()
        if fx is None:
            raise ft.Skip("the test guest cannot be built here")

        def remove_domains():
            for d in (DOMAIN, DR, DOMAIN + "-test", DOMAIN2, DOMAIN2 + "-dr"):
                G.virsh("destroy", d, check=False)
            for d in (DR, DOMAIN + "-test", DOMAIN2 + "-dr"):
                G.virsh("undefine", d, "--nvram", check=False)
        remove_domains()
        env.on_cleanup(remove_domains)
        figures = {}
        disks = [G.Disk("vda", size_mib=16), G.Disk("vdb", size_mib=8)]
        nblocks = {d.dev: d.size_mib * ft.MiB // BS for d in disks}
        g = G.Guest(env.path("guest", "x")[:-2], DOMAIN, disks)
        env.on_cleanup(g.destroy)
        status_sock = env.path("receive-status.sock")
        rx = env.receiver(args=["--status-socket", status_sock])
        store = rx.store
        gdir = os.path.join(store, DOMAIN)
        marker = os.path.join(gdir, "failed-over")
        state = env.path("state", "x")[:-2]

        def failover(*extra, group=DOMAIN, kill=None):
            return env.run(["failover", "--store", store, "--group", group, "--name-suffix",
                            "-dr", "--lock-timeout", "30", *extra], timeout=300,
                           extra_env={"FERRY_KILL_AT": kill} if kill else None)

        def protect(expect_ok=True):
            r = env.run(["protect", "--domain", DOMAIN, "--to", rx.addr, "--state-dir", state,
                         "--once"], timeout=300)
            if not expect_ok:
                return r
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
            digest = md5_file(out)
            os.unlink(out)
            return digest

        def expect_error(what, r, *words):
            text = (r.err + r.out).lower()
            ft.check(r.rc == 1 and all(w.lower() in text for w in words),
                     f"{what}: expected exit 1 naming {words}:\n{r}")
            ft.log(f"{what}: {(r.err.strip() or r.out.strip()).splitlines()[-1]}")

        t0 = time.monotonic()
        g.start(fx)

        # ---- (a) RPs of known patterns -------------------------------------------------------
        at_rp = {}
        gen = 0
        for i in range(4):
            gen += 1
            g.write("vda", [i, 100 + i, nblocks["vda"] - 1 - i], gen=gen, seed=i)
            g.write("vdb", [2 * i, nblocks["vdb"] - 1], gen=gen, seed=i)
            rp = protect()
            at_rp[rp] = {d.dev: model_md5(d.dev) for d in disks}
        rps = sorted(at_rp)
        k = rps[2]  # older than the newest: rps[3] is given up

        # ---- (b) errors before anything changes ------------------------------------------------
        expect_error("(b) unknown group", failover(group="no-such-group"), "unknown group",
                     "no-such-group")
        bogus = f"qemu:///system?socket={env.path('no-libvirtd.sock')}"
        expect_error("(b) libvirtd down", failover("--uri", bogus), "not reachable")
        expect_error("(b) domain name exists",
                     env.run(["failover", "--store", store, "--group", DOMAIN]),
                     "already exists", DOMAIN)
        r = env.run(["failover", "test", "--store", store, "--group", DOMAIN], timeout=300)
        ft.check(r.rc == 0, f"(b) failover test failed:\n{r}")
        expect_error("(b) a test failover running", failover(), "test failover", "running")
        r = env.run(["failover", "test", "--stop", "--store", store, "--group", DOMAIN])
        ft.check(r.rc == 0, f"(b) failover test --stop failed:\n{r}")
        rx.stop()  # ferry prune needs the group's lock
        r = env.run(["prune", "--store", store, "--group", DOMAIN, "--keep-last", "3"])
        ft.check(r.rc == 0, f"(b) prune failed:\n{r}")
        rx.restart()
        expect_error("(b) pruned RP", failover("--point", str(rps[0])), "pruned", str(rps[0]))
        ft.check(not os.path.exists(marker), "(b) a refused failover left the marker")

        # ---- (c) SIGKILL at every failover.* point, each run one step further ---------------------
        t_fo = time.monotonic()
        fired = []
        for i, point in enumerate(KILL_POINTS):
            r = failover("--point", str(k), kill=point)
            ft.check(r.rc == -9, f"(c) kill point {point} did not fire:\n{r}")
            fired.append(point)
            if i == 0:
                ft.check(os.path.exists(marker), "(c) no marker after failover.after_marker")
                gen += 1
                g.write("vda", [50], gen=gen, seed=77)
                r = protect(expect_ok=False)
                ft.check(r.rc != 0 and f"was failed over at rp" in (r.err + r.out).lower()
                         and "until failback" in (r.err + r.out).lower(),
                         f"(c) the source's RP was not refused naming the failover:\n{r}")
                ft.log(f"(c) source refused: {(r.err.strip() or r.out.strip()).splitlines()[-1]}")
            for dev in ("vda", "vdb"):
                ft.check_eq(restored_md5(k, dev), at_rp[k][dev],
                            f"(c) RP {k} {dev} after a kill at {point}")
        figures["kill_points"] = len(fired)

        # ---- (d) the run that completes ------------------------------------------------------------
        r = failover("--point", str(k))
        ft.check(r.rc == 0, f"(d) failover failed:\n{r}")
        ft.log(f"(d) {r.out.strip()}")
        ft.check(f"RP {rps[3]}" in r.out and "given up" in r.out,
                 f"(d) the newer RP {rps[3]} is not reported given up:\n{r}")
        with open(os.path.join(gdir, "failover", "record.json")) as f:
            rec = json.load(f)
        ft.check_eq(rec["rp_id"], k, "(d) RP of the failover")
        ft.check_eq(rec["phase"], "running", "(d) phase")
        ft.check(G.virsh("domstate", DR).strip() == "running", "(d) the domain is not running")
        images = {dev: os.path.join(gdir, "replica", dev + ".img") for dev in ("vda", "vdb")}
        image_md5 = {dev: md5_file(p) for dev, p in images.items()}
        for dev in ("vda", "vdb"):  # the overlays' backing images hold exactly RP k
            ft.check_eq(image_md5[dev], at_rp[k][dev], f"(d) replica image {dev} vs RP {k}")
        vm = Ctl(rec["chardevs"][g.ctl_path], rec["chardevs"][g.console_path])
        figures["boot_s"] = round(time.monotonic() - t_fo, 1)
        for dev in ("vda", "vdb"):
            got = vm.command(f"md5 {dev}").split()[-1]
            ft.check_eq(got, at_rp[k][dev], f"(d) the failed-over VM's digest of {dev} vs RP {k}")
        vm.command("w vda 999 999 0 1 2")  # writes land in the overlay
        vm.command("w vdb 999 999 3 4")
        vm.close()
        for dev in ("vda", "vdb"):
            ft.check_eq(md5_file(images[dev]), image_md5[dev],
                        f"(d) replica image {dev} changed under the running VM")
            ft.check_eq(restored_md5(k, dev), at_rp[k][dev], f"(d) RP {k} {dev} after VM writes")
        ft.check(os.path.getsize(rec["overlays"]["vda"]["overlay"]) > 0, "(d) no overlay")

        # ---- (e) twice; ferry points shows it -------------------------------------------------------
        expect_error("(e) failover twice", failover(), "already", f"RP {k}")
        r = env.run(["points", "--store", store, "--group", DOMAIN])
        ft.check(f"failed over at RP {k}" in r.out, f"(e) ferry points shows no failover:\n{r}")
        pts = {p["rp_id"]: p for p in env.points(store, DOMAIN)}
        ft.check(pts[k].get("failed_over") is True, f"(e) points --json: {pts[k]}")

        r = env.run(["status", "--socket", status_sock])
        ft.check("failed_over" in r.out and f"was failed over at RP {k}" in r.out,
                 f"(e) ferry status shows no failover:\n{r}")

        # ---- (f) latest, while the source keeps replicating ----------------------------------------
        g.destroy()
        g2 = G.Guest(env.path("guest2", "x")[:-2], DOMAIN2, [G.Disk("vda", size_mib=8)])
        env.on_cleanup(g2.destroy)
        g2.start(fx)
        n2 = 8 * ft.MiB // BS
        g2.write("vda", [0, 1, n2 - 1], gen=1, seed=5)
        md5_2 = hashlib.md5(b"".join(g2.expected("vda", b) for b in range(n2))).hexdigest()
        p = ft.Proc(env, "protect2", [env.ferry, "protect", "--domain", DOMAIN2, "--to",
                    rx.addr, "--state-dir", env.path("state2", "x")[:-2], "--interval", "1"]
                    + env.tls_client_args(),
                    env.path("protect2.log"))
        deadline = time.monotonic() + 120
        def count2():
            r = env.run(["points", "--store", store, "--group", DOMAIN2, "--json"], timeout=60)
            return len(json.loads(r.out)) if r.rc == 0 else 0
        while count2() < 2:
            ft.check(p.alive() and time.monotonic() < deadline,
                     f"(f) protect --interval: no 2 RPs:\n{p.log_text()[-3000:]}")
            time.sleep(0.3)
        t_f = time.monotonic()
        r = failover(group=DOMAIN2)
        ft.check(r.rc == 0, f"(f) failover at latest while replicating failed:\n{r}")
        figures["latest_cmd_s"] = round(time.monotonic() - t_f, 2)
        ft.log(f"(f) {r.out.strip().splitlines()[0]}")
        with open(os.path.join(store, DOMAIN2, "failover", "record.json")) as f:
            rec2 = json.load(f)
        newest = max(q["rp_id"] for q in env.points(store, DOMAIN2))
        ft.check_eq(rec2["rp_id"], newest, "(f) latest is the newest committed RP")
        deadline = time.monotonic() + 30
        while "until failback" not in p.log_text():
            ft.check(time.monotonic() < deadline,
                     f"(f) the running source was not refused:\n{p.log_text()[-3000:]}")
            time.sleep(0.3)
        ft.log(f"(f) protect --interval {'exited ' + str(p.p.returncode) if not p.alive() else 'still retrying'}"
               " after the refusal")
        if p.alive():
            p.terminate()
        vm2 = Ctl(rec2["chardevs"][g2.ctl_path], rec2["chardevs"][g2.console_path])
        ft.check_eq(vm2.command("md5 vda").split()[-1], md5_2,
                    "(f) the failed-over VM's digest vs the source at the newest RP")
        vm2.close()

        figures["total_s"] = round(time.monotonic() - t0, 1)
        ft.write_result("failover", f"failed over to RP {k} through SIGKILL at {len(fired)} kill "
                        "points: the VM's own digests equal the source's at that RP, its writes "
                        "land in the overlays, the replica images unchanged", **figures)


if __name__ == "__main__":
    main()
