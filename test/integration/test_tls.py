#!/usr/bin/env python3
"""Mutual TLS, authorisation, limits and quotas (issue 13; RELIABILITY.md C7).

Real processes, real TCP, real certificates (test/tls/make-certs, one throwaway PKI per run).
Each rejected case is checked the same way:
  - the peer is refused with a message that names the cause (the source's stderr, the client's
    TLS error, or the receiver's log);
  - a `ferry replicate --once` source exits 1;
  - 0 bytes reach the store: no directory of the refused group, no growth of the good group's
    journal while the case runs;
  - the receiver keeps serving the good source (client-a, group A) at the same time or right
    after.
The figure: "N cases as expected, 0 bytes written on rejected connections".
"""

import os
import re
import resource
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time

import ferrytest as ft

SIZE = 32 * ft.MiB
GOOD = "A"        # client-a may write it
QUOTA = "Q"       # client-a may write it, quota 40M (smaller than its disk's bound + usage)
B2 = "B2"         # client-b may write it
ACCESS = f"""
[[access]]
identity = "uri:spiffe://ferry/source-a"
write = ["{GOOD}", "{QUOTA}"]

[[access]]
identity = "uri:spiffe://ferry/source-b"
write = ["{B2}"]

[[access]]
identity = "uri:spiffe://ferry/admin"
manage = ["{GOOD}"]

[group.{QUOTA}]
quota = "40M"
"""

cases = []


def case(name):
    ft.log(f"--- case: {name}")
    cases.append(name)


with ft.Env("tls", tls=True) as env:
    pki = env.pki()
    for name in ("ca.pem", "server.pem", "client-a.pem", "crl.pem", "crl-revoke-a.pem",
                 "mismatch.key"):
        ft.check(os.path.exists(os.path.join(pki, name)), f"make-certs wrote no {name}")
    ft.check_eq(stat.S_IMODE(os.stat(env.cert("client-a.key")).st_mode), 0o600,
                "mode of a key make-certs wrote")

    qsd = env.qsd([ft.Disk("vda", SIZE), ft.Disk("vdb", SIZE), ft.Disk("vdc", SIZE),
                   ft.Disk("vdd", SIZE)])
    vda, vdb, vdc, vdd = qsd.disk("vda"), qsd.disk("vdb"), qsd.disk("vdc"), qsd.disk("vdd")
    wl = env.workload()
    cfg = env.path("receive.toml")
    with open(cfg, "w") as f:
        f.write(ACCESS)
    # The CRL the receiver reads; replaced by a later one and SIGHUP in the rotation case.
    crl = env.path("live-crl.pem")
    shutil.copy(env.cert("crl.pem"), crl)
    status_sock = env.path("rx-status.sock")
    rx = env.receiver(args=["--config", cfg, "--tls-cert", env.cert("server.pem"),
                            "--tls-key", env.cert("server.key"), "--tls-ca", env.cert("ca.pem"),
                            "--tls-crl", crl, "--status-socket", status_sock])
    store = rx.store

    def rx_log_since(mark):
        return rx.log_text()[mark:]

    def groups():
        return sorted(n for n in os.listdir(store) if os.path.isdir(os.path.join(store, n)))

    def journal_bytes(group):
        return env.store_bytes(os.path.join(store, group, "journal")) if os.path.isdir(
            os.path.join(store, group)) else 0

    def good_rp(what):
        wl.random_writes(qsd, vda, 4, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
        rp = env.replicate_once(qsd, rx.addr, GOOD, disks=[vda.spec])
        ft.log(f"good source served {what}: RP {rp}")
        return rp

    def refused(args_or_result, cause, group=None, tls=True, extra_env=None):
        """Runs a source that must be refused: exit 1, `cause` (a regex) in its stderr or in
        the receiver's log, nothing of `group` in the store, no growth of A's journal."""
        before_groups, before_journal, mark = groups(), journal_bytes(GOOD), len(rx.log_text())
        r = env.run(args_or_result, timeout=120, tls=tls, extra_env=extra_env)
        ft.check_eq(r.rc, 1, f"exit status of a refused source:\n{r}")
        seen = r.err + "\n" + rx_log_since(mark)
        ft.check(re.search(cause, seen, re.I), f"the refusal must name the cause /{cause}/:\n"
                 f"{r}\nreceiver log:\n{rx_log_since(mark)[-3000:]}")
        if group:
            ft.check(group not in groups(), f"a refused peer created group {group}: {groups()}")
        ft.check_eq(groups(), before_groups, "groups after a refused source")
        ft.check_eq(journal_bytes(GOOD), before_journal, "A's journal after a refused source")
        ft.log(f"refused as expected: {r.err.strip().splitlines()[-1] if r.err.strip() else ''}")
        return r

    def rep_args(group, disk=None, client="client-a", key=None, server_name=None, to=None):
        a = env.replicate_args(qsd, to or rx.addr, group, disks=[(disk or vda).spec])
        a = a[:a.index("--tls-cert")] if "--tls-cert" in a else a
        return a + ["--tls-cert", env.cert(f"{client}.pem"),
                    "--tls-key", key or env.cert(f"{client}.key"), "--tls-ca", env.cert("ca.pem")] + (
                        ["--tls-server-name", server_name] if server_name else [])

    def tls_client(cert=None, key=None, ca="ca.pem", version=ssl.TLSVersion.TLSv1_3):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = version
        ctx.maximum_version = version
        ctx.load_verify_locations(env.cert(ca))
        if cert:
            ctx.load_cert_chain(env.cert(cert), env.cert(key))
        return ctx

    def python_refused(cert, key, cause):
        """A TLS client the receiver must refuse (its certificate): the receiver closes the
        connection before any frame, and its alert or log names the cause."""
        mark = len(rx.log_text())
        before_groups, before_journal = groups(), journal_bytes(GOOD)
        err = ""
        try:
            with socket.create_connection(("127.0.0.1", rx.port), timeout=15) as raw:
                with tls_client(cert, key).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(ft.encode_frame(ft.MSG["hello"],
                                              ft.encode_hello("bad-python", [("vda", SIZE, 65536)])))
                    data = s.recv(1024)
                    ft.check(not data, f"the receiver answered a refused client: {data[:64]!r}")
                    err = "closed"
        except (ssl.SSLError, ConnectionError, socket.timeout, OSError) as e:
            err = str(e)
        time.sleep(0.3)
        seen = err + "\n" + rx_log_since(mark)
        ft.check(re.search(cause, seen, re.I),
                 f"the refusal must name /{cause}/: client: {err}\nlog: {rx_log_since(mark)[-2000:]}")
        ft.check("bad-python" not in groups(), "a refused TLS client created its group")
        ft.check_eq(groups(), before_groups, "groups after a refused TLS client")
        ft.check_eq(journal_bytes(GOOD), before_journal, "A's journal after a refused TLS client")
        ft.log(f"TLS client refused as expected: {err}")

    # --- the positive path ------------------------------------------------------------
    wl.random_writes(qsd, vda, 8, min_len=4 * ft.KiB, max_len=256 * ft.KiB)
    good_rp("at start")
    mode = stat.S_IMODE(os.stat(status_sock).st_mode)
    ft.check_eq(oct(mode), oct(0o600), "mode of the receiver's status socket")

    # --- certificates -----------------------------------------------------------------
    case("no client certificate")
    python_refused(None, None, r"certificate required|no certificate|peer did not return|"
                               r"did not return a certificate|alert")

    case("certificate from another CA")
    refused(rep_args("bad-otherca", client="client-other"),
            r"unknown ca|unable to get local issuer|verify|certificate", "bad-otherca")
    # The source refuses its own certificate before connecting; the receiver must refuse it
    # too when a client sends it anyway.
    python_refused("client-other.pem", "client-other.key", r"unknown ca|unable to get local issuer")

    case("expired certificate")
    refused(rep_args("bad-expired", client="client-expired"), r"expired", "bad-expired")
    python_refused("client-expired.pem", "client-expired.key", r"expired")

    case("certificate not yet valid")
    refused(rep_args("bad-notyet", client="client-notyet"), r"not yet valid|not valid yet|notyet|"
            r"not before", "bad-notyet")
    python_refused("client-notyet.pem", "client-notyet.key",
                   r"not yet valid|not valid yet|bad certificate|notyet")

    case("revoked certificate (CRL)")
    refused(rep_args("bad-revoked", client="client-revoked"), r"revoked", "bad-revoked")

    case("client key not matching its certificate")
    refused(rep_args("bad-mismatch", key=env.cert("mismatch.key")),
            r"mismatch\.key.*(match|does not)|(match|does not).*mismatch\.key", "bad-mismatch")

    case("key file readable by others")
    loose = env.path("loose.key")
    shutil.copy(env.cert("client-a.key"), loose)
    os.chmod(loose, 0o644)
    refused(rep_args("bad-mode", key=loose), r"loose\.key.*(mode|permission|readable)|"
            r"(mode|permission|readable).*loose\.key", "bad-mode")
    r = env.run(["receive", "--listen", "127.0.0.1:0", "--store", env.path("s-mode"),
                 "--tls-cert", env.cert("server.pem"), "--tls-key", loose,
                 "--tls-ca", env.cert("ca.pem")], timeout=30)
    ft.check(r.rc == 1 and "loose.key" in r.err, f"a receiver with a 0644 key must refuse to "
             f"start naming it:\n{r}")

    case("receiver certificate with the wrong name (the source refuses)")
    rx_wrong = env.receiver(store=env.path("store-wrong"), tag="rx-wrongname",
                            args=["--config", cfg, "--tls-cert", env.cert("server-wrongname.pem"),
                                  "--tls-key", env.cert("server-wrongname.key"),
                                  "--tls-ca", env.cert("ca.pem")])
    r = env.run(rep_args("bad-wrongname", to=rx_wrong.addr), timeout=120)
    ft.check_eq(r.rc, 1, f"a source must refuse a receiver whose certificate has another name:\n{r}")
    ft.check(re.search(r"name|hostname|mismatch|127\.0\.0\.1|verify", r.err, re.I),
             f"the source must say the name is wrong:\n{r}")
    ft.check_eq(os.listdir(rx_wrong.store), [], "store of the wrongly named receiver")
    r = env.run(rep_args("bad-wrongname2", server_name="elsewhere.invalid"), timeout=120)
    ft.check_eq(r.rc, 1, f"--tls-server-name that the receiver's certificate lacks:\n{r}")
    ft.check("bad-wrongname2" not in groups(), "group of a source that refused the receiver")
    rx_wrong.stop()

    case("TLS 1.2-only client (openssl s_client -tls1_2)")
    p = subprocess.run(["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{rx.port}",
                        "-cert", env.cert("client-a.pem"), "-key", env.cert("client-a.key"),
                        "-CAfile", env.cert("ca.pem")], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    out = (p.stdout + p.stderr).decode(errors="replace")
    ft.check(p.returncode != 0 or "Cipher is (NONE)" in out,
             f"a TLS 1.2 handshake must fail:\n{out[-2000:]}")
    ft.check(not re.search(r"New, TLSv1\.2, Cipher is [A-Z]", out), f"TLS 1.2 was negotiated:\n{out}")
    ft.check(re.search(r"protocol version|alert|handshake failure|no protocols", out, re.I),
             f"s_client must show why:\n{out[-2000:]}")

    case("plaintext client on the TLS port")
    plain = env.replicate_args(qsd, rx.addr, "bad-plain", disks=[vda.spec])
    plain = plain[:plain.index("--tls-cert")] if "--tls-cert" in plain else plain
    refused(plain, r"closed|reset|disconnect|protocol|eof|handshake|wrong version|http|tls",
            "bad-plain", tls=False)

    case("garbage before the handshake")
    mark = len(rx.log_text())
    with socket.create_connection(("127.0.0.1", rx.port), timeout=15) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(4096))
        t0 = time.monotonic()
        try:
            data = s.recv(4096)
            while data and time.monotonic() - t0 < 15:
                ft.check(b"FRY1" not in data, "the receiver answered garbage with a frame")
                data = s.recv(4096)
        except (ConnectionError, socket.timeout):
            pass
    good_rp("after garbage")

    case("a handshake that never finishes (deadline)")
    stalled = socket.create_connection(("127.0.0.1", rx.port), timeout=40)
    t0 = time.monotonic()
    good_rp("while a handshake stalls")
    try:
        while stalled.recv(1024):
            pass
    except (ConnectionError, socket.timeout):
        pass
    waited = time.monotonic() - t0
    stalled.close()
    ft.check(waited < 35, f"a stalled handshake was kept {waited:.1f}s (deadline 10 s)")
    ft.log(f"stalled handshake closed after {waited:.1f}s")

    case("500 connections at once from one address")
    rss_before = int(open(f"/proc/{rx.proc.pid}/status").read().split("VmRSS:")[1].split()[0])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    flood = []
    for _ in range(500):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))  # one address, not the good source's (127.0.0.1)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", rx.port))
        except BlockingIOError:
            pass
        flood.append(s)
    time.sleep(1.0)
    good_rp("during the flood")
    rss_during = int(open(f"/proc/{rx.proc.pid}/status").read().split("VmRSS:")[1].split()[0])
    threads = len(os.listdir(f"/proc/{rx.proc.pid}/task"))
    for s in flood:
        s.close()
    ft.log(f"flood: receiver RSS {rss_before} -> {rss_during} KiB, {threads} threads")
    ft.check(rss_during - rss_before < 128 * 1024, f"500 connections grew the receiver by "
             f"{rss_during - rss_before} KiB")
    ft.check(threads < 200, f"500 connections made {threads} receiver threads")

    # --- authorisation ----------------------------------------------------------------
    case("client allowed group A writing group B")
    r = refused(rep_args("B"), r"identity uri:spiffe://ferry/source-a may not write group 'B'", "B")
    ft.check("identity uri:spiffe://ferry/source-a may not write group 'B'" in r.err,
             f"the source must print the refusal:\n{r}")
    ft.check(re.search(r"warn.*may not write group 'B'.*spiffe://ferry/source-a|"
                       r"warn.*spiffe://ferry/source-a.*may not write group 'B'",
                       rx.log_text(), re.I), "the receiver must log the identity and the group "
             "at warning")

    case("client allowed to write asking for a management action")
    r = env.run(["points", "--to", rx.addr, "--group", GOOD], timeout=60)
    ft.check_eq(r.rc, 1, f"ferry points --to by a writer:\n{r}")
    ft.check("identity uri:spiffe://ferry/source-a may not manage group 'A'" in r.err,
             f"the refusal must name identity and group:\n{r}")
    r = env.run(["points", "--to", rx.addr, "--group", GOOD, "--json"] +
                env.tls_client_args("client-admin"), timeout=60)
    ft.check_eq(r.rc, 0, f"ferry points --to by the admin:\n{r}")
    remote = [p["rp_id"] for p in __import__("json").loads(r.out)]
    local = [p["rp_id"] for p in env.points(store, GOOD)]
    ft.check_eq(remote, local, "RPs over the wire vs ferry points --store")
    r = env.run(["points", "--to", rx.addr, "--group", "B2"] + env.tls_client_args("client-admin"),
                timeout=60)
    ft.check(r.rc == 1 and "may not manage group 'B2'" in r.err, f"admin of A only:\n{r}")

    case("the access map reloaded by SIGHUP (and a bad file keeps it)")
    def sighup_and_wait(word):
        mark = len(rx.log_text())
        rx.proc.p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while word not in rx_log_since(mark) and time.monotonic() < deadline:
            time.sleep(0.1)
        ft.check(word in rx_log_since(mark), f"no {word!r} after SIGHUP:\n{rx_log_since(mark)}")
    with open(cfg, "w") as f:
        f.write(ACCESS.replace(f'write = ["{GOOD}", "{QUOTA}"]', f'write = ["{GOOD}", "{QUOTA}", "B"]'))
    sighup_and_wait("access map reloaded")
    r = env.run(rep_args("B", disk=vdd), timeout=120)
    ft.check_eq(r.rc, 0, f"group B after the access map allowed it:\n{r}")
    with open(cfg, "w") as f:
        f.write(ACCESS + "\n[[access]]\nidentity = \"bogus\"\n")
    sighup_and_wait("not reloaded")
    wl.random_writes(qsd, vdd, 2, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
    r = env.run(rep_args("B", disk=vdd), timeout=120)
    ft.check_eq(r.rc, 0, f"group B after a failed reload (the map in force stays):\n{r}")
    with open(cfg, "w") as f:
        f.write(ACCESS)
    sighup_and_wait("access map reloaded")
    refused(rep_args("B", disk=vdd), r"may not write group 'B'")

    case("quota exceeded")
    wl.random_writes(qsd, vdb, 12, min_len=1 * ft.MiB, max_len=1 * ft.MiB)
    env.replicate_once(qsd, rx.addr, QUOTA, disks=[vdb.spec])  # 0 + 32M <= 40M
    wl.random_writes(qsd, vdb, 2, min_len=64 * ft.KiB, max_len=64 * ft.KiB)
    q_journal = journal_bytes(QUOTA)
    q_points = [p["rp_id"] for p in env.points(store, QUOTA)]
    mark = len(rx.log_text())
    r = env.run(env.replicate_args(qsd, rx.addr, QUOTA, disks=[vdb.spec]), timeout=120)
    ft.check_eq(r.rc, 1, f"an RP over the quota:\n{r}")
    for what in ("'Q'", "quota", "41943040"):
        ft.check(what in r.err, f"the refusal must name {what!r}:\n{r}")
    ft.check_eq(journal_bytes(QUOTA), q_journal, "Q's journal after the refused RP")
    ft.check_eq([p["rp_id"] for p in env.points(store, QUOTA)], q_points, "Q's RPs")
    good_rp("after the quota refusal")

    # --- rotation ---------------------------------------------------------------------
    case("certificate revoked by a SIGHUP reload while connected")
    wl.random_writes(qsd, vdc, 8, min_len=256 * ft.KiB, max_len=1 * ft.MiB)
    # client-a holds a verified connection (its hello accepted) while the CRL changes.
    held = tls_client("client-a.pem", "client-a.key").wrap_socket(
        socket.create_connection(("127.0.0.1", rx.port), timeout=30), server_hostname="127.0.0.1")
    held.sendall(ft.encode_frame(ft.MSG["hello"], ft.encode_hello(GOOD, [("vda", SIZE, 65536)])))
    head = ft.CorruptingProxy._recv_exact(held, ft.FRAME_HEADER.size)
    ft.check(len(head) == ft.FRAME_HEADER.size, "no hello_reply on the held connection")
    shutil.copy(env.cert("crl-revoke-a.pem"), crl + ".new")
    os.replace(crl + ".new", crl)
    mark = len(rx.log_text())
    rx.proc.p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in rx_log_since(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    ft.check("TLS material reloaded" in rx_log_since(mark), f"SIGHUP must reload the TLS "
             f"material:\n{rx_log_since(mark)}")
    # The connection in flight is still served (it keeps its TLS session): a clean close.
    held.close()
    refused(rep_args("A"), r"revoked")
    # Another client keeps working.
    r = env.run(rep_args(B2, disk=vdc, client="client-b"), timeout=120)
    ft.check_eq(r.rc, 0, f"client-b after client-a was revoked:\n{r}")
    # A reload that fails keeps what is in force.
    with open(crl, "w") as f:
        f.write("not a CRL\n")
    mark = len(rx.log_text())
    rx.proc.p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "not reloaded" not in rx_log_since(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    ft.check("TLS material not reloaded" in rx_log_since(mark), f"a bad CRL must be reported:\n"
             f"{rx_log_since(mark)}")
    r = env.run(rep_args(B2, disk=vdc, client="client-b"), timeout=120)
    ft.check_eq(r.rc, 0, f"client-b after a failed reload:\n{r}")

    # --- secure by default ------------------------------------------------------------
    case("non-loopback plaintext refused without --insecure-plaintext")
    r = env.run(["receive", "--listen", "0.0.0.0:0", "--store", env.path("s-plain")], timeout=30)
    ft.check_eq(r.rc, 2, f"plaintext on 0.0.0.0:\n{r}")
    for what in ("--listen", "--insecure-plaintext", "--tls-cert"):
        ft.check(what in r.err, f"the refusal must name {what}:\n{r}")
    ft.check(not os.path.exists(env.path("s-plain")) or not os.listdir(env.path("s-plain")),
             "a refused receiver touched its store")
    insecure = ft.Proc(env, "rx-insecure", [env.ferry, "receive", "--listen", "0.0.0.0:0",
                                            "--store", env.path("s-insecure"),
                                            "--insecure-plaintext"],
                       env.path("rx-insecure.log"))
    deadline = time.monotonic() + 10
    while "insecure-plaintext" not in insecure.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    ft.check(re.search(r"warn.*--insecure-plaintext", insecure.log_text(), re.I),
             f"--insecure-plaintext must log a warning:\n{insecure.log_text()}")
    insecure.terminate()
    r = env.run(["receive", "--listen", "127.0.0.1:0", "--store", env.path("s-x"),
                 "--tls-cert", env.cert("server.pem")], timeout=30)
    ft.check(r.rc == 2 and "--tls-key" in r.err and "--tls-ca" in r.err,
             f"--tls-cert alone must be a usage error naming the missing flags:\n{r}")

    rx.stop()
    ft.write_result("tls", f"{len(cases)} cases as expected, 0 bytes written on rejected "
                    "connections", cases=len(cases))
    ft.log(f"{len(cases)} TLS/authorisation cases as expected")
