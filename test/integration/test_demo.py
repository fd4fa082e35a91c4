#!/usr/bin/env python3
"""`ferry demo` runs its self-contained live replication (qemu-storage-daemon, receiver,
writer, 5 RPs, restores, checks), prints a summary and exits 0; it leaves no process or FUSE
mount behind."""

import os
import re

import ferrytest as ft


def processes_in(paths):
    """Processes whose cwd or args point into one of `paths`."""
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
        if any(p in args or cwd.startswith(p) for p in paths):
            left.append(f"{pid}: {args[:200]}")
    return left


with ft.Env("demo") as env:
    r = env.run(["demo"], timeout=280)
    print(r.out)
    ft.check_eq(r.rc, 0, f"exit status of ferry demo\n{r}")
    lines = [l for l in r.out.splitlines() if l.strip()]
    ft.check(len(lines) >= 3, f"ferry demo printed no summary:\n{r}")
    m = re.search(r"working in (\S+)", r.out + r.err)
    paths = [env.dir] + ([m.group(1)] if m else [])
    ft.check(not any(mp.startswith(p + os.sep) for mp, _ in ft._mounts() for p in paths),
             "ferry demo left FUSE mounts behind")
    if m:
        ft.check(not os.path.exists(m.group(1)), f"ferry demo left {m.group(1)} behind")
    left = processes_in(paths)
    ft.check(not left, "ferry demo left processes behind:\n" + "\n".join(left))
    # --rps below the minimum is a usage error.
    r = env.run(["demo", "--rps", "2"], timeout=30)
    ft.check_eq(r.rc, 2, f"ferry demo --rps 2\n{r}")
