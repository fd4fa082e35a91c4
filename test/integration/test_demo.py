#!/usr/bin/env python3
"""`ferry demo` runs its self-contained live replication (qemu-storage-daemon, receiver,
writer, 5 RPs, restores, checks), prints a summary and exits 0; it leaves no process or FUSE
mount behind."""

import os
import subprocess

import ferrytest as ft


def descendants_of_nothing_left(env):
    """qemu-storage-daemon or ferry processes whose cwd or args point into our temp dir."""
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if env.dir in args or cwd.startswith(env.dir):
            left.append(f"{pid}: {args[:200]}")
    return left


with ft.Env("demo") as env:
    r = env.run(["demo"], timeout=280)
    print(r.out)
    ft.check_eq(r.rc, 0, f"exit status of ferry demo\n{r}")
    lines = [l for l in r.out.splitlines() if l.strip()]
    ft.check(len(lines) >= 3, f"ferry demo printed no summary:\n{r}")
    ft.check(not any(m.startswith(env.dir + os.sep) for m, _ in ft._mounts()),
             "ferry demo left FUSE mounts behind")
    left = descendants_of_nothing_left(env)
    ft.check(not left, "ferry demo left processes behind:\n" + "\n".join(left))
    # --rps below the minimum is a usage error.
    r = env.run(["demo", "--rps", "2"], timeout=30)
    ft.check_eq(r.rc, 2, f"ferry demo --rps 2\n{r}")
