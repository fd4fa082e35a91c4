#!/usr/bin/env python3
"""The libvirt source against a real libvirtd and the tiny guest (test/guest), one RP per
run of libvirt_source_probe. Every extent list and every byte read through NBD is checked
against the guest's own write log: bitmap granularity is 4 KiB (qcow2 cluster_size=4096), so
the dirty blocks of an incremental RP must be exactly the blocks written since the previous
one. Exits 77 when libvirtd cannot start or the guest cannot be built."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "test", "guest"))
import guest as G  # noqa: E402

PROBE = os.environ.get("LIBVIRT_SOURCE_PROBE", "")
WORK = "/var/tmp/ferry-libvirt-source-test"
BS = G.BLOCK_BYTES
failures = []
figures = {}


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def probe(g, base, new, *extra, uri=None):
    args = [PROBE, g.name, f"{WORK}/src", str(base), str(new), "--out", f"{WORK}/out", *extra]
    if uri:
        args += ["--uri", uri]
    t0 = time.monotonic()
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    dt = time.monotonic() - t0
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"probe printed no JSON (rc {p.returncode}): {p.stderr[-2000:]}")
    r["stderr"], r["seconds"] = p.stderr, dt
    if r["ok"]:
        r["by_name"] = {d["name"]: d for d in r["disks"]}
    return r


def data_blocks(disk):
    out = set()
    for off, ln, zero in disk["extents"]:
        if not zero:
            out.update(range(off // BS, (off + ln + BS - 1) // BS))
    return out


def contents_ok(g, dev, blocks):
    with open(f"{WORK}/out/{dev}.img", "rb") as f:
        for b in sorted(blocks):
            f.seek(b * BS)
            data = f.read(BS)
            if data != g.expected(dev, b):
                print(f"     {dev} block {b}: read {G.parse_block(data) if len(data) == BS else data!r}")
                return False
    return True


def expect_rp(g, r, label, reasons, blocks):
    """reasons/blocks: {dev: full_reason}, {dev: exact set of data blocks}."""
    if not r["ok"]:
        check(False, f"{label}: capture failed: {r['errc']}: {r['message']}")
        return
    for dev, reason in reasons.items():
        d = r["by_name"][dev]
        check(d["full_reason"] == reason, f"{label}: {dev} is {reason} (got {d['full_reason']})")
    for dev, want in blocks.items():
        got = data_blocks(r["by_name"][dev])
        check(got == want, f"{label}: {dev} data blocks == guest writes {sorted(want)[:12]} "
                           f"(got {sorted(got)[:12]})")
        check(contents_ok(g, dev, want), f"{label}: {dev} contents == guest's write log")


def all_written(g, dev):
    return {b for (d, b) in g.model if d == dev}


def scenario_main(fx):
    g = G.Guest(f"{WORK}/a", "ferry-lvsrc-a",
                [G.Disk("vda"), G.Disk("vdb", size_mib=32), G.Disk("vdc", fmt="raw", size_mib=16)])
    cp = lambda n: f"ferry.{g.name}.{n}"  # noqa: E731
    try:
        g.start(fx)
        figures["boot_s"] = round(g.boot_s, 1)
        g.write("vda", [0, 1, 2, 500], gen=1, seed=11)
        g.write("vdb", [7, 4000], gen=1, seed=12)
        r = probe(g, 0, 1)
        figures["full_rp_s"] = round(r["seconds"], 2)
        expect_rp(g, r, "RP1 full", {"vda": "first_rp", "vdb": "first_rp", "vdc": "no_checkpoint"},
                  {"vda": {0, 1, 2, 500}, "vdb": {7, 4000}})

        g.write("vda", [2, 3, 9000], gen=2, seed=21)
        g.write("vdb", [7], gen=2, seed=22)
        r = probe(g, 1, 2)
        figures["incremental_rp_s"] = round(r["seconds"], 2)
        expect_rp(g, r, "RP2 incremental", {"vda": "incremental", "vdb": "incremental", "vdc": "no_checkpoint"},
                  {"vda": {2, 3, 9000}, "vdb": {7}})

        # No ack: the next RP from the same base still covers these writes.
        g.write("vda", [40], gen=3, seed=31)
        g.write("vdb", [41], gen=3, seed=32)
        r = probe(g, 2, 3, "--no-ack")
        expect_rp(g, r, "RP3 not acked", {"vda": "incremental"}, {"vda": {40}, "vdb": {41}})
        g.write("vda", [42], gen=4, seed=41)
        r = probe(g, 2, 3)
        expect_rp(g, r, "RP3 after no-ack", {"vda": "incremental", "vdb": "incremental"},
                  {"vda": {40, 42}, "vdb": {41}})
        cps = G.virsh("checkpoint-list", g.name, "--name").split()
        check(cps == [cp(3)], f"after ack of RP3 only {cp(3)} remains (got {cps})")

        # Checkpoint metadata lost behind Ferry's back: healed by redefine, still incremental.
        G.virsh("checkpoint-delete", g.name, cp(3), "--metadata")
        g.write("vdb", [100, 101], gen=5, seed=51)
        r = probe(g, 3, 4)
        expect_rp(g, r, "RP4 after metadata loss", {"vda": "incremental", "vdb": "incremental"},
                  {"vda": set(), "vdb": {100, 101}})
        check("redefined" in r["stderr"], "RP4: the redefine was logged")

        # Crash-consistent only without an agent: one warning, app_consistent false.
        g.write("vda", [60], gen=6, seed=61)
        r = probe(g, 4, 5, "--quiesce")
        expect_rp(g, r, "RP5 quiesce without agent", {"vda": "incremental"}, {"vda": {60}})
        check(r["ok"] and not r["app_consistent"], "RP5: not app-consistent without a guest agent")
        check("crash-consistent" in r["stderr"], "RP5: warning says crash-consistent")

        # Errors that name what is wrong.
        r = probe(g, 5, 6, uri="qemu:///system?socket=/nonexistent/libvirt-sock")
        check(not r["ok"] and r["errc"] == "disconnected" and "not reachable" in r["message"],
              f"libvirtd down: disconnected, 'not reachable' ({r.get('message')})")
        r = subprocess.run([PROBE, "no-such-domain-xyz", f"{WORK}/src2", "0", "1"], capture_output=True, text=True)
        r = json.loads(r.stdout)
        check(r["errc"] == "not-found" and "no-such-domain-xyz" in r["message"],
              f"unknown domain: not_found naming it ({r['message']})")
        bx = f"{WORK}/foreign-backup.xml"
        with open(bx, "w") as f:
            f.write(f"<domainbackup mode='pull'><server transport='unix' socket='{WORK}/foreign.sock'/>"
                    f"<disks><disk name='vda' backup='yes' type='file'><scratch file='{WORK}/foreign-vda.qcow2'/>"
                    "</disk><disk name='vdb' backup='no'/><disk name='vdc' backup='no'/></disks></domainbackup>")
        G.virsh("backup-begin", g.name, bx)
        r = probe(g, 5, 6)
        check(not r["ok"] and r["errc"] == "busy" and g.name in r["message"] and "foreign.sock" in r["message"],
              f"second backup job: busy naming domain and job ({r.get('message')})")
        G.virsh("domjobabort", g.name)
        r = probe(g, 5, 6)
        expect_rp(g, r, "RP6 after the foreign job ended", {"vda": "incremental"}, {"vda": set(), "vdb": set()})

        # virsh destroy + start: QEMU gets SIGTERM and stores its persistent bitmaps cleanly.
        g.write("vda", [70], gen=7, seed=71)
        g.destroy()
        g.start(fx, fresh_disks=False)
        g.write("vdb", [80], gen=8, seed=81)
        r = probe(g, 6, 7)
        reasons = {dev: r["by_name"][dev]["full_reason"] for dev in ("vda", "vdb")} if r["ok"] else {}
        figures["after_destroy_reason"] = reasons
        if reasons.get("vda") == "incremental":
            expect_rp(g, r, "RP7 after destroy+start (bitmap stored cleanly, redefined)",
                      {"vdb": "incremental"}, {"vda": {70}, "vdb": {80}})
        else:
            expect_rp(g, r, "RP7 after destroy+start", {"vda": reasons.get("vda")},
                      {"vda": all_written(g, "vda"), "vdb": all_written(g, "vdb")})
            check(reasons.get("vda") in ("no_bitmap", "bitmap_inconsistent"), "RP7: a named FullReason")

        # QEMU killed (SIGKILL): the bitmaps stay marked in use in the qcow2 -> never trusted.
        g.write("vda", [90], gen=9, seed=91)
        pid = int(open(f"/var/run/libvirt/qemu/{g.name}.pid").read())
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not g.running():
                break
            time.sleep(0.1)
        g.start(fx, fresh_disks=False)
        g.write("vdb", [95], gen=10, seed=95)
        r = probe(g, 7, 8)
        # A bitmap QEMU created in this instance was never stored (persistent bitmaps reach the
        # qcow2 at close): gone -> no_bitmap; one loaded at open stays flagged in use ->
        # bitmap_inconsistent. Either way a named full read, never an incremental.
        reasons = {dev: r["by_name"][dev]["full_reason"] for dev in ("vda", "vdb")} if r["ok"] else {}
        figures["after_kill_reason"] = reasons
        for dev in ("vda", "vdb"):
            check(reasons.get(dev) in ("no_bitmap", "bitmap_inconsistent"),
                  f"RP8 after QEMU was killed: {dev} full with a named reason ({reasons.get(dev)})")
        expect_rp(g, r, "RP8 after QEMU was killed", {"vdc": "no_checkpoint"},
                  {"vda": all_written(g, "vda"), "vdb": all_written(g, "vdb")})
        g.write("vda", [96], gen=11, seed=96)
        r = probe(g, 8, 9)
        expect_rp(g, r, "RP9 incremental again", {"vda": "incremental", "vdb": "incremental"},
                  {"vda": {96}, "vdb": set()})

        # The receiver committed RP10 but its acknowledgement was lost (--no-ack): the next RP,
        # from 10, continues from checkpoint 10 (L7) and carries only the writes since.
        g.write("vda", [97], gen=12, seed=97)
        r = probe(g, 9, 10, "--no-ack")
        expect_rp(g, r, "RP10 ack lost", {"vda": "incremental"}, {"vda": {97}, "vdb": set()})
        g.write("vdb", [98], gen=13, seed=98)
        r = probe(g, 10, 11)
        expect_rp(g, r, "RP11 after a lost ack", {"vda": "incremental", "vdb": "incremental"},
                  {"vda": set(), "vdb": {98}})
        check(r["ok"] and "committed but not acknowledged" in r["stderr"], "RP11: L7 was logged")
        cps = G.virsh("checkpoint-list", g.name, "--name").split()
        check(cps == [cp(11)], f"after ack of RP11 only {cp(11)} remains (got {cps})")
    finally:
        g.destroy()


def scenario_quiesce(fx):
    shutil.rmtree(f"{WORK}/src", ignore_errors=True)
    g = G.Guest(f"{WORK}/b", "ferry-lvsrc-b", [G.Disk("vda")], agent=True)
    try:
        g.start(fx)
        g.wait_agent()
        g.write("vda", [5], gen=1, seed=1)
        r = probe(g, 0, 1, "--quiesce")
        expect_rp(g, r, "quiesce RP1", {"vda": "first_rp"}, {"vda": {5}})
        events = [e[0] for e in g.freeze_events()]
        check(r["ok"] and r["app_consistent"], "quiesce with agent: app_consistent")
        check(events == ["freeze", "thaw"], f"guest saw freeze then thaw ({events})")
        st = G.virsh("qemu-agent-command", g.name, '{"execute":"guest-fsfreeze-status"}')
        check('"thawed"' in st, f"guest file systems thawed after the RP ({st.strip()})")
    finally:
        g.destroy()


def main():
    if not PROBE or not os.path.exists(PROBE):
        print("LIBVIRT_SOURCE_PROBE not set")
        return 1
    if os.geteuid() != 0 or not G.start_libvirtd():
        print("libvirtd cannot start here: skip")
        return G.SKIP
    fx = G.fixture_dir()
    if fx is None:
        print("the test guest cannot be built here: skip")
        return G.SKIP
    for name in ("ferry-lvsrc-a", "ferry-lvsrc-b"):
        G.virsh("destroy", name, check=False)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(f"{WORK}/out")
    t0 = time.monotonic()
    scenario_main(fx)
    scenario_quiesce(fx)
    figures["total_s"] = round(time.monotonic() - t0, 1)
    print("figures:", json.dumps(figures))
    if failures:
        print(f"{len(failures)} FAILED")
        return 1
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
