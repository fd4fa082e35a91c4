#!/usr/bin/env python3
"""Prometheus metrics and the explainable RPO (issue 14, parts 1, 2 and 4).

(a) `ferry receive --metrics` and `ferry replicate --interval --metrics` on loopback, scraped
    every second by a real Prometheus server (Debian's `prometheus`) during a replication run.
    Through Prometheus's own HTTP API the test finds, for the group: the RPO series on both
    ends (and below a bound), per-stage RP duration histograms on both ends (source: slot,
    capture, read, hash_compress, send, durable, finish; receiver: receive, durable, ack,
    apply), and byte counters with the right values: the source's changed bytes equal the
    receiver's stored bytes and the sum of the disks' changed_bytes that `ferry points --json`
    lists; the source's RP count and the receiver's equal the RPs listed; `ferry points --json`
    shows each RP's stages (source: slot..send; receiver: receive, durable, ack, apply).
(b) `promtool check metrics` accepts both endpoints' output.
(c) Bad HTTP input to both endpoints: unknown path 404, POST 405 naming GET, a 64 KiB header
    431, and 20 slow clients holding connections (half a request line, then nothing): the
    surplus gets 503, the held ones 408 after the read timeout, and meanwhile replication goes
    on (an RP commits while they hang), after which /metrics answers 200 again.
(d) An RP through a rate-limited link (test/netfault/relay.py with a byte rate) exceeds its
    RPO threshold (--rpo-alert 2): replicate logs the alert, and it names the send stage and
    the link ("send ... MB/s, link-bound").
(e) `ferry agent` (metrics = in agent.toml) with a target behind the same relay: `ferry
    status` prints the alert naming the send stage (exit 3), promtool accepts the agent's
    /metrics, and after an agent restart the RPO is known from the receiver's hello before the
    first new RP is acknowledged.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import ferrytest as ft

GROUP = "metrics"
RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "netfault", "relay.py")


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def raw_request(port, data, timeout=10):
    """Sends raw bytes, returns the status line's code (0: closed without a reply)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
    except OSError:
        pass
    reply = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    except OSError:
        pass
    s.close()
    m = re.match(rb"HTTP/1\.1 (\d{3})", reply)
    return int(m.group(1)) if m else 0


def replicate_interval(env, qsd, to, interval, extra, tag):
    args = env.replicate_args(qsd, to, GROUP)
    args[args.index("--once")] = "--interval"
    args.insert(args.index("--interval") + 1, str(interval))
    return ft.Proc(env, tag, [env.ferry] + args + extra, env.path(f"{tag}.log"))


def newest_committed(rx):
    ids = [int(m) for m in re.findall(r"RP (\d+) committed", rx.log_text())]
    return max(ids) if ids else 0


def wait_committed(rx, rp, timeout=60):
    deadline = time.monotonic() + timeout
    while newest_committed(rx) < rp:
        ft.check(rx.alive(), f"receiver exited:\n{ft.tail(rx.log_path)}")
        ft.check(time.monotonic() < deadline, f"RP {rp} not committed within {timeout}s")
        time.sleep(0.1)
    return newest_committed(rx)


class Prometheus:
    def __init__(self, env, targets):
        self.port = ft.free_port()
        cfg = env.path("prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n")
            for job, addr in targets.items():
                f.write(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n")
        self.proc = ft.Proc(env, "prometheus",
                            ["prometheus", f"--config.file={cfg}",
                             f"--storage.tsdb.path={env.path('prom-data')}",
                             f"--web.listen-address=127.0.0.1:{self.port}"],
                            env.path("prometheus.log"))
        deadline = time.monotonic() + 60
        while True:
            try:
                if http_get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            ft.check(self.proc.alive(), f"prometheus exited:\n{ft.tail(env.path('prometheus.log'))}")
            ft.check(time.monotonic() < deadline, "prometheus not ready in 60 s")
            time.sleep(0.2)

    def query(self, q):
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        _, body = http_get(url)
        doc = json.loads(body)
        ft.check(doc.get("status") == "success", f"query {q}: {body[:500]}")
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
                for r in doc["data"]["result"]}

    def value(self, q):
        r = self.query(q)
        return next(iter(r.values())) if len(r) == 1 else None

    def wait(self, q, pred, what, timeout=40):
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(q)
            if v is not None and pred(v):
                return v
            ft.check(time.monotonic() < deadline, f"{what}: {q} = {v} after {timeout}s")
            time.sleep(0.5)


def scrape_and_check(env, prom, rx, qsd, wl, vda):
    """(a): the series through Prometheus's API, with their values."""
    g = f'group="{GROUP}"'
    for job in ("source", "receiver"):
        prom.wait(f'ferry_rpo_seconds{{job="{job}",{g}}}', lambda v: 0 <= v < 60, f"{job} RPO")
        prom.wait(f'sum(ferry_rp_stage_duration_seconds_count{{job="{job}",{g}}})',
                  lambda v: v > 0, f"{job} stage histograms")
    src_stages = prom.query(f'ferry_rp_stage_duration_seconds_count{{job="source",{g}}}')
    stages = sorted(json.loads(k)["stage"] for k in src_stages)
    ft.check_eq(stages, sorted(["slot", "capture", "read", "hash_compress", "send", "durable", "finish"]),
                "source stages")
    rx_stages = prom.query(f'ferry_rp_stage_duration_seconds_count{{job="receiver",{g}}}')
    ft.check_eq(sorted(json.loads(k)["stage"] for k in rx_stages),
                sorted(["receive", "durable", "ack", "apply"]), "receiver stages")
    # Quiet source: once an RP after the last write is committed, the counters stand still.
    qsd.sync()
    last = wait_committed(rx, newest_committed(rx) + 2, timeout=30)
    pts = env.points(rx.store, GROUP)
    # Explainable RPO, kept with each RP at the receiver: the source's stages (rp_end) and its own.
    for p in pts:
        st = p.get("stages")
        ft.check(st is not None and sorted(st.get("source", {})) ==
                 sorted(["slot", "capture", "read", "hash_compress", "send"]) and
                 sorted(st.get("receiver", {})) == sorted(["receive", "durable", "ack", "apply"]),
                 f"ferry points --json: RP {p['rp_id']} stages {st}")
    changed = sum(d["changed_bytes"] for p in pts for d in p["disks"])
    ft.check(changed > 8 * ft.MiB, f"the run changed {changed} bytes: too few to judge")
    prom.wait(f'sum(ferry_changed_bytes_total{{job="source",{g}}})', lambda v: v == changed,
              "source changed bytes = points' changed_bytes")
    prom.wait(f'ferry_stored_bytes_total{{job="receiver",{g}}}', lambda v: v == changed,
              "receiver stored bytes = points' changed_bytes")
    prom.wait(f'ferry_last_committed_rp{{job="receiver",{g}}}', lambda v: v >= last,
              "receiver's last committed RP")
    rps = prom.value(f'ferry_receiver_rps_total{{job="receiver",{g}}}')
    src_rps = prom.value(f'ferry_rps_total{{job="source",{g}}}')
    ft.check(rps is not None and src_rps is not None and abs(rps - src_rps) <= 1,
             f"RPs: receiver {rps}, source {src_rps}")
    sent = prom.value(f'ferry_sent_bytes_total{{job="source",{g}}}')
    received = prom.value(f'ferry_received_bytes_total{{job="receiver",{g}}}')
    ft.check(sent is not None and received is not None and sent > 0 and received > 0,
             f"sent {sent}, received {received}")
    kept = prom.value(f'ferry_kept_rps{{job="receiver",{g}}}')
    ft.check(kept is not None and kept >= 1, f"kept RPs {kept}")
    ratio = prom.value(f'ferry_compression_ratio{{job="source",{g}}}')
    ft.check(ratio is not None and ratio >= 1, f"compression ratio {ratio}")
    ft.log(f"(a) Prometheus: {len(pts)} RPs, {changed} changed bytes on both ends, "
           f"sent {sent:.0f} / received {received:.0f} wire bytes, RPs {src_rps:.0f}/{rps:.0f}")


def promtool_check(env, endpoints):
    """(b)"""
    for name, port in endpoints.items():
        status, text = http_get(f"http://127.0.0.1:{port}/metrics")
        ft.check_eq(status, 200, f"{name} /metrics status")
        r = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=60)
        ft.check(r.returncode == 0, f"promtool check metrics on {name}: exit {r.returncode}\n"
                 f"{r.stdout.decode()}{r.stderr.decode()}\n--- output ---\n{text[:3000]}")
        ft.log(f"(b) promtool accepts {name}'s {len(text.splitlines())} lines")


def bad_http(env, rx, endpoints):
    """(c)"""
    for name, port in endpoints.items():
        ft.check_eq(raw_request(port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"), 404, f"{name} wrong path")
        ft.check_eq(raw_request(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
                    405, f"{name} wrong method")
        big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n"
        ft.check_eq(raw_request(port, big), 431, f"{name} huge header")
    # Slow clients: hold every slot (16) and more on the receiver's endpoint.
    port = endpoints["receiver"]
    held = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /met")
        held.append(s)
    before = newest_committed(rx)
    wait_committed(rx, before + 1, timeout=30)  # replication goes on meanwhile
    codes = []
    for s in held:
        data = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        s.close()
        m = re.match(rb"HTTP/1\.1 (\d{3})", data)
        codes.append(int(m.group(1)) if m else 0)
    ft.check(codes.count(503) >= 4 and codes.count(408) >= 1 and set(codes) <= {503, 408},
             f"held connections got {codes}")
    status, _ = http_get(f"http://127.0.0.1:{port}/metrics")
    ft.check_eq(status, 200, "/metrics after the slow clients")
    ft.log(f"(c) 404/405/431 on both ends; slow clients: {codes.count(503)} x 503, "
           f"{codes.count(408)} x 408; RPs committed meanwhile")


def rate_limited_rpo(env, rx, qsd, wl, vda):
    """(d)"""
    rate = 1_000_000
    relay_port = ft.free_port()
    relay = ft.Proc(env, "relay", [sys.executable, RELAY, f"127.0.0.1:{relay_port}", rx.addr,
                                    "0", "0", "1", "300", str(rate)], env.path("relay.log"),
                    stdout=subprocess.PIPE)
    ft.check(relay.p.stdout.readline().strip() == b"ready", "relay not ready")
    wl.random_writes(qsd, vda, 96, min_len=64 * ft.KiB, max_len=128 * ft.KiB)  # ~9 MiB
    qsd.sync()
    rep = replicate_interval(env, qsd, f"127.0.0.1:{relay_port}", 1, ["--rpo-alert", "2"], "replicate-slow")
    deadline = time.monotonic() + 60
    alert = None
    while alert is None:
        text = open(rep.log_path, errors="replace").read()
        m = re.search(r"RPO [0-9.]+ s > 2\.0 s: .*", text)
        if m:
            alert = m.group(0)
        ft.check(rep.alive(), f"replicate exited:\n{ft.tail(rep.log_path)}")
        ft.check(time.monotonic() < deadline, f"no RPO alert in 60 s:\n{ft.tail(rep.log_path)}")
        time.sleep(0.5)
    rep.terminate(timeout=30)
    relay.terminate(timeout=10)
    ft.check(re.search(r": send [0-9.]+ s at [0-9.]+ MB/s, link-bound", alert) is not None,
             f"the alert must name the send stage: {alert}")
    ft.log(f"(d) rate-limited link ({rate / 1e6:.1f} MB/s): {alert}")


def agent_alert_and_restart(env, rx, qsd, wl, vda):
    """(e) `ferry agent` with `metrics =` and a target behind the 1 MB/s relay: `ferry status`
    prints the alert naming the send stage; promtool accepts the agent's /metrics; after a
    restart the RPO is known (from the hello) before the first new RP is acknowledged."""
    relay_port = ft.free_port()
    relay = ft.Proc(env, "relay-agent", [sys.executable, RELAY, f"127.0.0.1:{relay_port}", rx.addr,
                                          "0", "0", "2", "300", "1000000"], env.path("relay-agent.log"),
                    stdout=subprocess.PIPE)
    ft.check(relay.p.stdout.readline().strip() == b"ready", "relay not ready")
    metrics_port = ft.free_port()
    sock = env.path("run", "agent.sock")
    os.makedirs(os.path.dirname(sock), exist_ok=True)
    cfg = env.path("agent.toml")
    disks = ", ".join(f'"{d}"' for d in qsd.specs)
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{env.path("agent-state")}"\nstatus_socket = "{sock}"\n'
                f'metrics = "127.0.0.1:{metrics_port}"\n' + env.agent_tls_toml() + "\n"
                f'[[qmp]]\nsocket = "{qsd.qmp_path}"\ndisks = [{disks}]\nto = "127.0.0.1:{relay_port}"\n'
                f'group = "{GROUP}"\ninterval_seconds = 1\nrpo_alert_seconds = 2\n')
    wl.random_writes(qsd, vda, 64, min_len=64 * ft.KiB, max_len=128 * ft.KiB)
    qsd.sync()

    def start():
        return ft.Proc(env, "agent", [env.ferry, "agent", "--config", cfg], env.path("agent.log"))

    # A writer keeps every RP at a few MiB, so every RP takes seconds on the 1 MB/s link and
    # the RPO stays over 2 s.
    stop_writer = threading.Event()

    def writer():
        while not stop_writer.is_set():
            wl.random_writes(qsd, vda, 8, min_len=64 * ft.KiB, max_len=128 * ft.KiB)
            qsd.sync()
            stop_writer.wait(0.5)

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    agent = start()
    deadline = time.monotonic() + 60
    while True:
        r = env.run(["status", "--socket", sock], timeout=30)
        m = re.search(rf"{GROUP}: (RPO [0-9.]+ s > 2\.0 s: (slot|capture|read|hash_compress|send|durable|finish) .*)", r.out)
        if m:
            alert = m.group(1)
            break
        ft.check(agent.alive(), f"agent exited:\n{ft.tail(agent.log_path)}")
        ft.check(time.monotonic() < deadline, f"no RPO alert from ferry status in 60 s:\n{r}")
        time.sleep(0.5)
    ft.check(re.search(r"^RPO [0-9.]+ s > 2\.0 s: send [0-9.]+ s at [0-9.]+ MB/s, link-bound$", alert)
             is not None, f"ferry status's alert must name the send stage: {alert}")
    ft.check_eq(r.rc, 3, "ferry status exit with the RPO over its threshold")
    status, text = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    p = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True,
                       timeout=60)
    ft.check(p.returncode == 0, f"promtool on the agent: {p.stdout.decode()}{p.stderr.decode()}")
    ft.check(re.search(rf'^ferry_rpo_exceeded{{group="{GROUP}"}} 1$', text, re.M) is not None,
             "ferry_rpo_exceeded on the agent")
    stop_writer.set()
    w.join()
    ft.check_eq(agent.terminate(timeout=60), 0, "agent exit on SIGTERM")
    # Restart with changes to send: the RPO comes from the receiver before the first new ack.
    wl.random_writes(qsd, vda, 48, min_len=64 * ft.KiB, max_len=128 * ft.KiB)
    qsd.sync()
    agent = start()
    deadline = time.monotonic() + 30
    while True:
        r = env.run(["status", "--socket", sock, "--json"], timeout=30)
        targets = json.loads(r.out).get("targets", []) if r.rc in (0, 3) and r.out.strip() else []
        t = targets[0] if targets else {}  # the socket may answer before the worker exists
        if t.get("rpo_seconds") is not None:
            ft.check_eq(t.get("rps_ok"), 0, "an RP acknowledged before the RPO was known")
            break
        ft.check(agent.alive(), f"agent exited:\n{ft.tail(agent.log_path)}")
        ft.check(time.monotonic() < deadline, f"no RPO after a restart in 30 s: {t}")
        time.sleep(0.2)
    agent.terminate(timeout=60)
    relay.terminate(timeout=10)
    ft.log(f"(e) agent: ferry status says '{alert}'; promtool accepts its /metrics; after a "
           f"restart RPO {t['rpo_seconds']:.1f} s before its first RP (from the receiver)")


def main():
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            print(f"SKIP metrics: {tool} not installed (scripts/install-deps)", flush=True)
            sys.exit(77)
    with ft.Env("metrics") as env:
        wl = env.workload()
        qsd = env.qsd([ft.Disk("vda", 64 * ft.MiB)])
        vda = qsd.disk("vda")
        rx_port = ft.free_port()
        rx = env.receiver(args=["--metrics", f"127.0.0.1:{rx_port}"])
        src_port = ft.free_port()
        wl.random_writes(qsd, vda, 64, min_len=64 * ft.KiB, max_len=256 * ft.KiB)
        qsd.sync()
        rep = replicate_interval(env, qsd, rx.addr, 1, ["--metrics", f"127.0.0.1:{src_port}"],
                                 "replicate")
        endpoints = {"source": src_port, "receiver": rx_port}
        prom = Prometheus(env, {"source": f"127.0.0.1:{src_port}", "receiver": f"127.0.0.1:{rx_port}"})
        wait_committed(rx, 1, timeout=60)
        wl.random_writes(qsd, vda, 32, min_len=4 * ft.KiB, max_len=128 * ft.KiB)
        scrape_and_check(env, prom, rx, qsd, wl, vda)
        promtool_check(env, endpoints)
        bad_http(env, rx, endpoints)
        ft.check(rep.alive(), f"replicate exited:\n{ft.tail(rep.log_path)}")
        rc = rep.terminate(timeout=30)
        ft.check(rc == 0, f"replicate --interval exited {rc} on SIGTERM")
        prom.proc.terminate(timeout=20)
        rate_limited_rpo(env, rx, qsd, wl, vda)
        agent_alert_and_restart(env, rx, qsd, wl, vda)
        rx.stop()


if __name__ == "__main__":
    main()
