#!/usr/bin/env python3
"""docs/security.md's "A small CA for a disconnected site", run exactly as written (its first
```bash block, in a temp dir, with bash), then one real replication over mutual TLS with the
certificates it made: the receiver with receiver.pem/.key, the CA and the CRL, an access map
naming the source's URI; the source with web-host-1.pem/.key. Also: the revocation the page
describes (openssl ca -revoke, -gencrl, reload) refuses the source's next connection."""

import os
import re
import shutil
import signal
import stat
import subprocess
import time

import ferrytest as ft

DOC = os.path.join(ft.REPO, "docs", "security.md")
SIZE = 16 * ft.MiB

with ft.Env("security-doc", tls=True) as env:
    with open(DOC) as f:
        text = f.read()
    section = text[text.index("## A small CA for a disconnected site"):]
    m = re.search(r"```bash\n(.*?)```", section, re.S)
    ft.check(m is not None, "docs/security.md has no ```bash block in its CA section")
    ca = env.path("ca", "x")[:-2]
    script = os.path.join(ca, "commands.sh")
    with open(script, "w") as f:
        f.write(m.group(1))
    r = subprocess.run(["bash", script], cwd=ca, capture_output=True, timeout=120)
    ft.check(r.returncode == 0, f"the documented commands failed ({r.returncode}):\n"
             f"{r.stdout.decode(errors='replace')}\n{r.stderr.decode(errors='replace')}")
    for name in ("ca.pem", "receiver.pem", "receiver.key", "web-host-1.pem", "web-host-1.key",
                 "crl.pem"):
        ft.check(os.path.exists(os.path.join(ca, name)), f"the documented commands made no {name}")
    for key in ("ca.key", "receiver.key", "web-host-1.key"):
        mode = stat.S_IMODE(os.stat(os.path.join(ca, key)).st_mode)
        ft.check(mode & 0o077 == 0, f"{key} is mode {oct(mode)}: readable by others")
    ft.log("documented CA commands ran; certificates made")

    def c(name):
        return os.path.join(ca, name)

    cfg = env.path("receive.toml")
    with open(cfg, "w") as f:
        f.write('[[access]]\nidentity = "uri:spiffe://ferry/web-host-1"\nwrite = ["web01"]\n')
    crl = env.path("crl.pem")
    shutil.copy(c("crl.pem"), crl)
    rx = env.receiver(args=["--config", cfg, "--tls-cert", c("receiver.pem"),
                            "--tls-key", c("receiver.key"), "--tls-ca", c("ca.pem"),
                            "--tls-crl", crl])
    qsd = env.qsd([ft.Disk("vda", SIZE)])
    wl = env.workload()
    wl.random_writes(qsd, qsd.disks[0], 8, min_len=4 * ft.KiB, max_len=256 * ft.KiB)
    hist = ft.History(env, rx.store, "web01")
    snaps = hist.snapshot_all(qsd, "doc")
    args = env.replicate_args(qsd, rx.addr, "web01")
    args = args[:args.index("--tls-cert")] if "--tls-cert" in args else args
    args += ["--tls-cert", c("web-host-1.pem"), "--tls-key", c("web-host-1.key"),
             "--tls-ca", c("ca.pem")]
    r = env.run(args, timeout=120)
    ft.check(r.rc == 0, f"replication with the documented certificates failed:\n{r}")
    rp = int(r.out.strip().splitlines()[-1])
    hist.record(rp, snaps)
    hist.verify()

    # Revocation as the page describes it.
    for cmd in (["openssl", "ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem",
                 "-revoke", "web-host-1.pem"],
                ["openssl", "ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.pem",
                 "-gencrl", "-out", "crl.pem"]):
        p = subprocess.run(cmd, cwd=ca, capture_output=True, timeout=60)
        ft.check(p.returncode == 0, f"{' '.join(cmd)}: {p.stderr.decode(errors='replace')}")
    shutil.copy(c("crl.pem"), crl + ".new")
    os.replace(crl + ".new", crl)
    mark = len(rx.log_text())
    rx.proc.p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS material reloaded" not in rx.log_text()[mark:] and time.monotonic() < deadline:
        time.sleep(0.1)
    ft.check("TLS material reloaded" in rx.log_text()[mark:], "SIGHUP did not reload the CRL")
    r = env.run(args, timeout=120)
    ft.check(r.rc == 1, f"a revoked source must be refused:\n{r}")
    ft.check(re.search(r"revoked", r.err + rx.log_text()[mark:], re.I),
             f"the refusal must say revoked:\n{r}")
    rx.stop()
