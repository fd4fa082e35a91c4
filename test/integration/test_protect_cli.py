#!/usr/bin/env python3
"""CLI errors of `ferry protect`, `ferry agent` and `ferry status`: each exits with the
documented status and a message naming what is wrong. libvirtd is not running here, so
qemu:///system must be reported "not reachable" (the test points the URI at a socket
that does not exist, so a libvirtd started by someone else does not change it); an unknown domain is tried on libvirt's
built-in test driver (test:///default), which needs no daemon."""

import os

import ferrytest as ft

with ft.Env("protect-cli", need_qsd=False) as env:
    state = env.path("state", "x")[:-2]
    bad = []

    def expect(args, rc, *words):
        r = env.run(args, timeout=120)
        text = r.err + r.out
        if r.rc != rc or not all(w.lower() in text.lower() for w in words):
            bad.append(f"expected exit {rc} and {words}:\n{r}")
        return r

    # Usage errors: exit 2.
    expect(["protect", "--to", "127.0.0.1:7000", "--once"], 2, "--domain")
    expect(["protect", "--domain", "d", "--to", "127.0.0.1:7000"], 2, "--once or --interval")
    expect(["protect", "--domain", "d", "--to", "127.0.0.1:7000", "--once", "--interval", "5"], 2)
    expect(["status", "--bogus"], 2)
    # Failures: exit 1, named.
    expect(["protect", "--domain", "d", "--to", "nohost", "--once", "--state-dir", state], 1,
           "--to")
    cfg = env.path("agent.toml")
    with open(cfg, "w") as f:
        f.write('state_dir = "/tmp"\n[[qmp]]\nsocket = "/x.sock"\ndisks = ["n"]\n'
                'to = "h:1"\ngroup = "g"\ninterval_seconds = "often"\n')
    expect(["agent", "--config", cfg], 1, f"{cfg}:7: interval_seconds", "integer")
    expect(["agent", "--config", env.path("missing.toml")], 1, "missing.toml")
    sock = env.path("none.sock")
    expect(["status", "--socket", sock], 1, "not reachable", sock)

    # libvirtd down: a URI whose daemon socket does not exist (whether or not a libvirtd runs
    # on this machine's default socket).
    uri = f"qemu:///system?socket={env.path('no-libvirtd.sock')}"
    r = env.run(["protect", "--domain", "vm1", "--uri", uri, "--to", "127.0.0.1:7000", "--once",
                 "--state-dir", state], timeout=120)
    if r.rc != 1 or "not reachable" not in r.err or "vm1" not in r.err:
        bad.append(f"libvirtd down: expected exit 1 naming vm1 and 'not reachable':\n{r}")
    expect(["protect", "--domain", "no-such-vm", "--uri", "test:///default", "--to",
            "127.0.0.1:7000", "--once", "--state-dir", state], 1, "no-such-vm")

    if bad:
        raise ft.TestFailure("\n\n".join(bad))
