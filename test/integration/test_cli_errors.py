#!/usr/bin/env python3
"""The CLI contract for errors: usage errors exit 2 with a message naming the offending flag;
failures exit 1 with a message naming what is wrong - an unknown RP, disk or group in restore,
an unknown QMP node, a missing QMP socket, an unreachable receiver, a port already in use.
A failed replicate must not lose dirty blocks: the next good RP equals the source."""

import os
import re
import socket

import ferrytest as ft

GROUP = "cli"


problems = []  # every broken case is reported, not only the first


def expect(env, args, rc, *names, timeout=120):
    r = env.run(args, timeout=timeout)
    msg = r.err + r.out
    bad = []
    if r.rc != rc:
        bad.append(f"expected exit {rc}")
    bad += [f"the message does not name {n!r}" for n in names
            if not re.search(re.escape(str(n)), msg, re.I)]
    if not msg.strip():
        bad.append("no message at all")
    if bad:
        problems.append(f"{'; '.join(bad)}:\n{r}")
        ft.log(f"BAD: ferry {' '.join(map(str, args))[:100]}: {'; '.join(bad)}")
    else:
        ft.log(f"ok: ferry {' '.join(map(str, args))[:80]} -> {rc}: "
               f"{msg.strip().splitlines()[-1][:120]}")
    return r


with ft.Env("cli-errors") as env:
    qsd = env.qsd([ft.Disk("vda", 32 * ft.MiB, "qcow2")])
    vda = qsd.disks[0]
    rx = env.receiver()
    hist = ft.History(env, rx.store, GROUP)
    wl = env.workload()
    wl.random_writes(qsd, vda, 10)
    snaps = hist.snapshot_all(qsd, "rp1")
    rp = env.replicate_once(qsd, rx.addr, GROUP)
    hist.record(rp, snaps)

    rep = ["replicate", "--qmp", qsd.qmp_path, "--disk", vda.spec, "--to", rx.addr,
           "--group", GROUP]
    # --- usage errors: exit 2 ---
    expect(env, [], 2)
    expect(env, ["frobnicate"], 2, "frobnicate")
    expect(env, ["points", "--store", rx.store, "--group", GROUP, "--bogus"], 2, "--bogus")
    expect(env, ["replicate", "--disk", vda.spec, "--to", rx.addr, "--group", GROUP, "--once"],
           2, "--qmp")
    expect(env, rep, 2, "--once")  # neither --once nor --interval
    expect(env, rep + ["--once", "--interval", "5"], 2, "--interval")
    expect(env, ["restore", "--store", rx.store, "--group", GROUP, "--point", "abc",
                 "--disk", "vda", "--out", env.path("x.img")], 2, "--point")
    expect(env, ["receive", "--store", rx.store], 2, "--listen")

    # --- failures: exit 1, naming what is wrong ---
    out = env.path("r.img")
    expect(env, ["restore", "--store", rx.store, "--group", GROUP, "--point", rp + 1000,
                 "--disk", "vda", "--out", out], 1, rp + 1000)
    expect(env, ["restore", "--store", rx.store, "--group", GROUP, "--point", rp,
                 "--disk", "nosuchdisk", "--out", out], 1, "nosuchdisk")
    expect(env, ["restore", "--store", rx.store, "--group", "nosuchgroup", "--point", rp,
                 "--disk", "vda", "--out", out], 1, "nosuchgroup")
    expect(env, ["restore", "--store", env.path("nostore"), "--group", GROUP, "--point", rp,
                 "--disk", "vda", "--out", out], 1)
    ft.check(not os.path.exists(out) or os.path.getsize(out) == 0,
             "a failed restore left an image behind")

    # Dirty blocks written now must survive the failed replicates below.
    wl.random_writes(qsd, vda, 10)
    expect(env, ["replicate", "--qmp", qsd.qmp_path, "--disk", "nonode=vda", "--to", rx.addr,
                 "--group", GROUP, "--once"], 1, "nonode")
    expect(env, ["replicate", "--qmp", env.path("no.qmp"), "--disk", vda.spec, "--to", rx.addr,
                 "--group", GROUP, "--once"], 1, "no.qmp")
    dead_port = ft.free_port()  # bound and closed: nothing listens there
    r = expect(env, ["replicate", "--qmp", qsd.qmp_path, "--disk", vda.spec, "--to",
                     f"127.0.0.1:{dead_port}", "--group", GROUP, "--once"], 1, dead_port,
               timeout=180)
    if r.seconds >= 120:
        problems.append(f"unreachable receiver took {r.seconds:.0f}s to report")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        expect(env, ["receive", "--listen", f"127.0.0.1:{port}", "--store", env.path("s2")],
               1, port, timeout=30)
    r = env.run(["receive", "--listen", "not-an-address", "--store", env.path("s3")], timeout=30)
    if not (r.rc in (1, 2) and "not-an-address" in r.err + r.out):
        problems.append(f"a malformed --listen must fail (1 or 2) naming it:\n{r}")

    ft.check(not problems, f"{len(problems)} CLI error case(s) wrong:\n\n" + "\n\n".join(problems))
    ft.check_eq([p["rp_id"] for p in env.points(rx.store, GROUP)], [rp],
                "points after the failed commands")
    snaps = hist.snapshot_all(qsd, "rp2")
    rp2 = env.replicate_once(qsd, rx.addr, GROUP)
    hist.record(rp2, snaps)
    hist.verify(what="(after failed replicates) ")
    qsd.stop()
    rx.stop()
