#!/usr/bin/env python3
"""Failback of a protection group of two VMs (docs/failover.md, "Failback of a protection
group"), end to end: two real libvirt guests (test/guest: TCG, one 8 MiB qcow2 disk each), a
recovery-site receiver (store DR) and a main-site receiver (store MAIN) on this machine.

  (a) both VMs write known 64 KiB groups; two RPs of the group to DR; RP k;
  (b) both write more after RP k (must be overwritten), then the disaster (both destroyed,
      their definitions kept shut off);
  (c) failover of the group at DR to RP k (`<vm>-dr`); both DR VMs write;
  (d) `ferry seed` of MAIN with `A.vda=FILE --disk B.vda=FILE`; `ferry protect --domain A-dr
      --domain B-dr --vm-name A-dr=A --vm-name B-dr=B` to MAIN: a resync whose data is the
      64 KiB blocks that differ (within 5%; hash traffic beside it), disks named A.vda, B.vda;
  (e) the DR VMs write more and power off; `ferry failback` at DR, SIGKILL at
      failback.after_final_rp, then again: both DR domains gone, the DR store one new base;
  (f) `ferry failback --complete` at MAIN (no --domain: the group's VMs), SIGKILL at
      failback.complete_after_write, then again: both original domains run, each guest's own
      digest equals its DR VM's at the final RP;
  (g) protection of the group in the original direction: a resync that ships 0 data blocks.

Exits 77 only when libvirtd cannot start or the guest cannot be built."""

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
from test_failover_test import Ctl, guest_cache  # noqa: E402

A = "ferry-e2e-fbg-a"
B = "ferry-e2e-fbg-b"
GROUP = "ferry-e2e-fbg"
BS = G.BLOCK_BYTES
GROUP_BLOCKS = (64 * 1024) // BS
SIZE_MIB = 8


def groups(first, count):
    return [b for gi in range(first, first + count)
            for b in range(gi * GROUP_BLOCKS, (gi + 1) * GROUP_BLOCKS)]


def main():
    with ft.Env("failback-group", need_qsd=False) as env:
        if os.geteuid() != 0 or not G.start_libvirtd():
            raise ft.Skip("libvirtd cannot start here")
        fx = guest_cache()
        if fx is None:
            raise ft.Skip("the test guest cannot be built here")

        def remove_domains():
            for d in (A, B, A + "-dr", B + "-dr"):
                G.virsh("destroy", d, check=False)
                G.virsh("undefine", d, "--nvram", "--checkpoints-metadata", check=False)
        remove_domains()
        env.on_cleanup(remove_domains)
        figures = {}
        nblocks = SIZE_MIB * ft.MiB // BS
        gs = {n: G.Guest(env.path(f"g{n[-1]}", "x")[:-2], n, [G.Disk("vda", size_mib=SIZE_MIB)])
              for n in (A, B)}
        for g in gs.values():
            env.on_cleanup(g.destroy)
        rx_dr = env.receiver(store=env.path("dr"), tag="receiver-dr")
        rx_main = env.receiver(store=env.path("main"), tag="receiver-main")
        dr, main_store = rx_dr.store, rx_main.store
        orig_state, dr_state = env.path("state-orig"), env.path("state-dr")

        def protect(domains, rx, state, what, extra=()):
            args = ["protect", "--to", rx.addr, "--group", GROUP, "--state-dir", state, "--once"]
            for d in domains:
                args += ["--domain", d]
            r = env.run(args + list(extra), timeout=600)
            ft.check(r.rc == 0, f"{what}: ferry protect failed:\n{r}")
            lines = [l for l in r.out.split() if l.strip()]
            ft.check(lines and lines[-1].isdigit(), f"{what}: no RP id printed:\n{r}")
            return int(lines[-1]), r

        def resync_figures(r):
            m = re.search(r"(\d+) blocks compared, (\d+) differed and were sent, (\d+) hash bytes",
                          r.err + r.out)
            ft.check(m, f"no resync in the protect output:\n{r}")
            return int(m.group(1)), int(m.group(2)), int(m.group(3))

        t0 = time.monotonic()
        boots = [threading.Thread(target=g.start, args=(fx,)) for g in gs.values()]
        for t in boots:
            t.start()
        for t in boots:
            t.join()
        ft.check(all(g.running() for g in gs.values()), "the guests did not boot")
        # ---- (a) RPs of the group to DR ---------------------------------------------------------
        gs[A].write("vda", groups(0, 2), gen=1, seed=1)
        gs[B].write("vda", groups(3, 1), gen=1, seed=2)
        protect((A, B), rx_dr, orig_state, "(a)")
        gs[A].write("vda", groups(10, 1), gen=2, seed=1)
        k, _ = protect((A, B), rx_dr, orig_state, "(a)")
        at_k = {n: dict(g.model) for n, g in gs.items()}
        # ---- (b) writes after RP k, the disaster ---------------------------------------------
        gs[A].write("vda", groups(20, 1), gen=3, seed=1)
        gs[B].write("vda", groups(21, 1), gen=3, seed=2)
        for g in gs.values():
            g.destroy()
            G.virsh("define", os.path.join(g.workdir, "domain.xml"))
        # ---- (c) failover of the group at DR; both DR VMs write -----------------------------
        r = env.run(["failover", "--store", dr, "--group", GROUP, "--point", str(k),
                     "--name-suffix", "-dr"], timeout=600)
        ft.check(r.rc == 0, f"(c) failover failed:\n{r}")
        with open(os.path.join(dr, GROUP, "failover", "record.json")) as f:
            rec = json.load(f)
        ctl, dr_model = {}, {}
        for v in rec["vms"]:
            src = v["domain"][:-len("-dr")]
            g = gs[src]
            ctl[src] = Ctl(v["chardevs"][g.ctl_path], v["chardevs"][g.console_path])
            dr_model[src] = dict(at_k[src])

        def dr_write(src, blocks, gen, seed):
            for i in range(0, len(blocks), 32):
                ctl[src].command(f"w vda {gen} {seed} " + " ".join(map(str, blocks[i:i + 32])))
            for b in blocks:
                dr_model[src][("vda", b)] = (gen, seed)

        def dr_md5(src):
            out = []
            for b in range(nblocks):
                w = dr_model[src].get(("vda", b))
                if w is None:
                    out.append(bytes(BS))
                    continue
                gen, seed = (w.gen, w.seed) if isinstance(w, G.Write) else w
                out.append(G.block_bytes("vda", b, gen, seed))
            return hashlib.md5(b"".join(out)).hexdigest()

        dr_write(A, groups(20, 1) + groups(30, 1), 10, 10)  # group 20: both sides wrote
        dr_write(B, groups(31, 2), 10, 11)
        # ---- (d) seed MAIN, resync the DR VMs home under the group's VM names --------------------
        r = env.run(["seed", "--store", main_store, "--group", GROUP,
                     "--disk", f"{A}.vda={gs[A].disk_path('vda')}",
                     "--disk", f"{B}.vda={gs[B].disk_path('vda')}"])
        ft.check(r.rc == 0, f"(d) seed failed:\n{r}")
        names = ["--vm-name", f"{A}-dr={A}", "--vm-name", f"{B}-dr={B}"]
        r0 = env.run(["protect", "--to", rx_main.addr, "--group", GROUP, "--once",
                      "--domain", A + "-dr", "--domain", B + "-dr", "--vm-name", f"{A}-dr"])
        ft.check(r0.rc != 0 and "--vm-name" in r0.err, f"(d) a bad --vm-name was accepted:\n{r0}")
        rp1, r = protect((A + "-dr", B + "-dr"), rx_main, dr_state, "(d) resync DR -> MAIN", names)
        compared, sent_blocks, hash_bytes = resync_figures(r)
        # 64 KiB groups seed vs DR VM: A 20 (both sides wrote) and 30; B 21 (main only), 31, 32
        differ = {A: {20, 30}, B: {21, 31, 32}}
        differ_bytes = sum(len(v) for v in differ.values()) * 64 * 1024
        sent_bytes = sent_blocks * 64 * 1024
        ft.log(f"(d) resync RP {rp1}: {compared} blocks compared, {sent_blocks} sent "
               f"({sent_bytes} bytes) vs {differ_bytes} bytes that differ; {hash_bytes} hash bytes")
        ft.check(differ_bytes <= sent_bytes <= differ_bytes * 1.05,
                 f"(d) the resync sent {sent_bytes} bytes, {differ_bytes} differ")
        figures.update(resync_sent_bytes=sent_bytes, differ_bytes=differ_bytes,
                       hash_bytes=hash_bytes)
        disk_names = {d["name"] for p in env.points(main_store, GROUP) if p["rp_id"] == rp1
                      for d in p.get("disks", [])}
        ft.check(not disk_names or disk_names == {f"{A}.vda", f"{B}.vda"},
                 f"(d) MAIN's disks are {disk_names}")
        for src in (A, B):
            ft.check_eq(hashlib.md5(open(env.restore(main_store, GROUP, rp1, f"{src}.vda"),
                                         "rb").read()).hexdigest(), dr_md5(src),
                        f"(d) MAIN's RP {rp1} {src}.vda vs the DR VM")
        # ---- (e) the DR half: SIGKILL once, then again ---------------------------------------
        dr_write(A, groups(40, 1), 11, 12)
        dr_write(B, groups(41, 1), 11, 13)
        for src in (A, B):
            ctl[src].sock.sendall(b"off\n")
            ctl[src].close()
        deadline = time.monotonic() + 120
        for src in (A, B):
            while "shut off" not in G.virsh("domstate", src + "-dr", check=False).stdout:
                ft.check(time.monotonic() < deadline, f"(e) {src}-dr did not power off")
                time.sleep(0.5)

        def failback_dr(kill=None):
            args = ["failback", "--store", dr, "--group", GROUP, "--to", rx_main.addr,
                    "--state-dir", dr_state]
            return env.run(args + (env.tls_client_args() if env.tls else []), timeout=600,
                           extra_env={"FERRY_KILL_AT": kill} if kill else None)
        t_fb = time.monotonic()
        r = failback_dr(kill="failback.after_final_rp")
        ft.check(r.rc == -9, f"(e) kill point did not fire:\n{r}")
        r = failback_dr()
        ft.check(r.rc == 0, f"(e) failback failed:\n{r}")
        figures["failback_dr_s"] = round(time.monotonic() - t_fb, 1)
        ft.log(f"(e) {r.out.strip()}")
        final_rp = int(re.search(r"final RP (\d+)", r.out).group(1))
        ft.check(f"--domain {A} --domain {B}" in r.out, f"(e) the --complete command:\n{r}")
        for src in (A, B):
            ft.check(G.virsh("domstate", src + "-dr", check=False).returncode != 0,
                     f"(e) {src}-dr left")
        ft.check(not os.path.exists(os.path.join(dr, GROUP, "failed-over")), "(e) marker left")
        pts = env.points(dr, GROUP)
        ft.check(len(pts) == 1 and pts[0]["rp_id"] > k, f"(e) DR store: {pts}")
        for src in (A, B):
            for store, rp in ((dr, pts[0]["rp_id"]), (main_store, final_rp)):
                with open(env.restore(store, GROUP, rp, f"{src}.vda"), "rb") as f:
                    ft.check_eq(hashlib.md5(f.read()).hexdigest(), dr_md5(src),
                                f"(e) {store} RP {rp} {src}.vda vs the DR VM's final state")
        # ---- (f) the main half: SIGKILL once, then again -------------------------------------
        def complete(kill=None):
            return env.run(["failback", "--complete", "--store", main_store, "--group", GROUP,
                            "--point", str(final_rp), "--state-dir", orig_state,
                            "--boot-delay", "1"], timeout=600,
                           extra_env={"FERRY_KILL_AT": kill} if kill else None)
        r = env.run(["failback", "--complete", "--store", main_store, "--group", GROUP,
                     "--domain", A, "--state-dir", orig_state])
        ft.check(r.rc == 1 and "holds the VMs" in r.err and "nothing was changed" in r.err,
                 f"(f) --complete naming one VM of two was not refused:\n{r}")
        ft.log(f"(f) one --domain of two: {r.err.strip()}")
        t_c = time.monotonic()
        r = complete(kill="failback.complete_after_write")
        ft.check(r.rc == -9, f"(f) kill point did not fire:\n{r}")
        r = complete()
        ft.check(r.rc == 0, f"(f) failback --complete failed:\n{r}")
        figures["complete_s"] = round(time.monotonic() - t_c, 1)
        ft.log(f"(f) {r.out.strip()}")
        started = [l for l in r.out.splitlines() if "started (boot" in l]
        ft.check(len(started) == 2 and A in started[0] and B in started[1],
                 f"(f) not started in boot order:\n{r}")
        ft.check(f"ferry protect --domain {A} --domain {B}" in r.out, "(f) no resume command")
        for src, g in gs.items():
            g._connect(time.monotonic())
            got = g.command("md5 vda").split()[-1]
            ft.check_eq(got, dr_md5(src), f"(f) {src}'s own digest vs its DR VM's final state")
        # ---- (g) protection in the original direction: ~nothing shipped --------------------------
        rp_back, r = protect((A, B), rx_dr, orig_state, "(g) ORIG -> DR")
        compared, sent_blocks, hash_bytes = resync_figures(r)
        ft.log(f"(g) RP {rp_back}: {compared} blocks compared, {sent_blocks} sent")
        ft.check(sent_blocks == 0, f"(g) the resync in the original direction sent {sent_blocks}")
        figures["resume_sent_blocks"] = sent_blocks
        figures["total_s"] = round(time.monotonic() - t0, 1)
        ft.write_result("failback-group", "failback of a two-VM protection group: the resync "
                        "shipped the blocks that differ, both halves completed through SIGKILL, "
                        "each original guest's digest equals its DR VM's final state", **figures)


if __name__ == "__main__":
    main()
