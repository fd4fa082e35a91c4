#!/usr/bin/env python3
"""The receiver's management API (tools/api.h, docs/api.yaml) with real clients over real TLS.

A `ferry receive --api` with the test PKI (test/tls/make-certs) and an access map; `ferry
replicate --once` writes RPs before, during and after. Checked with Debian's curl and Python's
http.client:
  - every endpoint: status (with each group's RPO), groups, one group, its points (the same
    list as `ferry points --json`), export start/stop as a job (real nbdkit), a test failover
    and a failover of an RP that does not exist (the CLI's own refusal, in the job), jobs;
  - bad input: a failed-over group (409), unknown group (404), unknown path (404), wrong method (405 + Allow), malformed
    JSON and unknown keys (400), a huge body (413), a slow client (408), a certificate without
    the manage right (403), no client certificate (401), a certificate of another CA (the
    handshake fails), nothing stopped by a refused call (409);
  - the service unharmed: a replication after all of that commits its RP.
"""
import http.client
import json
import os
import socket
import ssl
import subprocess
import time

import ferrytest as ft

SIZE = 16 * ft.MiB
ACCESS = """
[[access]]
identity = "uri:spiffe://ferry/source-a"
write = ["*"]
manage = ["*"]

[[access]]
identity = "uri:spiffe://ferry/source-b"
write = ["B"]

[[access]]
identity = "uri:spiffe://ferry/admin"
manage = ["A"]
"""

with ft.Env("api", tls=True) as env:
    env.pki()
    qsd = env.qsd([ft.Disk("vda", SIZE), ft.Disk("vdb", SIZE)])
    vda, vdb = qsd.disk("vda"), qsd.disk("vdb")
    wl = env.workload()
    cfg = env.path("receive.toml")
    with open(cfg, "w") as f:
        f.write(ACCESS)
    api_port = ft.free_port()
    rx = env.receiver(args=["--config", cfg, "--tls-cert", env.cert("server.pem"),
                            "--tls-key", env.cert("server.key"), "--tls-ca", env.cert("ca.pem"),
                            "--api", f"127.0.0.1:{api_port}",
                            "--status-socket", env.path("rx.sock")])
    store = rx.store

    def rp(group="A"):
        wl.random_writes(qsd, vda, 4, min_len=4 * ft.KiB, max_len=64 * ft.KiB)
        return env.replicate_once(qsd, rx.addr, group, disks=[vda.spec])

    rp1, rp2 = rp(), rp()

    def ctx(client="client-a", ca="ca.pem"):
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.load_verify_locations(env.cert(ca))
        if client:
            c.load_cert_chain(env.cert(f"{client}.pem"), env.cert(f"{client}.key"))
        return c

    def call(method, path, body=None, client="client-a", raw=None):
        """http.client over TLS; returns (status, headers, JSON document)."""
        conn = http.client.HTTPSConnection("127.0.0.1", api_port, context=ctx(client), timeout=30)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data is not None else {})
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        ft.check(r.getheader("Content-Type", "").startswith("application/json"),
                 f"{method} {path}: not JSON ({r.getheader('Content-Type')}): {text[:300]}")
        return r.status, r, json.loads(text)

    def expect(status, method, path, body=None, client="client-a", raw=None, word=None):
        got, resp, doc = call(method, path, body, client, raw)
        ft.check_eq(got, status, f"{method} {path} as {client}: {doc}")
        if status >= 400:
            ft.check("error" in doc and doc.get("status") == status, f"error document: {doc}")
            if word:
                ft.check(word in doc["error"], f"{method} {path}: error must name '{word}': {doc}")
        return doc, resp

    def curl(method, path, client="client-a", data=None):
        argv = ["curl", "-sS", "--max-time", "20", "-X", method, "--cacert", env.cert("ca.pem"),
                "-w", "\n%{http_code}", f"https://127.0.0.1:{api_port}{path}"]
        if client:
            argv += ["--cert", env.cert(f"{client}.pem"), "--key", env.cert(f"{client}.key")]
        if data is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", data]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        body, _, code = p.stdout.rpartition("\n")
        return int(code or 0), body, p

    ft.log("--- every read endpoint, with curl")
    code, body, _ = curl("GET", "/v1/status")
    ft.check_eq(code, 200, f"curl /v1/status: {body}")
    st = json.loads(body)
    a = [g for g in st["groups"] if g["group"] == "A"]
    ft.check(len(a) == 1 and a[0]["last_committed_rp"] == rp2, f"status groups: {st}")
    ft.check(isinstance(a[0]["rpo_seconds"], (int, float)) and 0 <= a[0]["rpo_seconds"] < 300,
             f"the status shows the group's RPO: {a[0]}")
    ft.check_eq(a[0]["role"], "protecting", "role of A")
    code, body, _ = curl("GET", "/v1/groups")
    ft.check(code == 200 and [g["group"] for g in json.loads(body)["groups"]] == ["A"],
             f"curl /v1/groups: {code} {body}")
    code, body, _ = curl("GET", "/v1/groups/A")
    ft.check(code == 200 and json.loads(body)["state"] == "ok", f"curl /v1/groups/A: {code} {body}")
    points, _ = expect(200, "GET", "/v1/groups/A/points")
    cli = json.loads(env.run(["points", "--store", store, "--group", "A", "--json"], tls=False,
                             check_rc=0).out)
    ft.check_eq([p["rp_id"] for p in points], [p["rp_id"] for p in cli],
                "the API's points and `ferry points --json`")
    ft.check_eq(points[-1]["rp_id"], rp2, "newest RP")

    ft.log("--- who may call")
    expect(403, "GET", "/v1/groups/A/points", client="client-b", word="may not manage group 'A'")
    expect(403, "GET", "/v1/status", client="client-b", word="manage")
    doc, _ = expect(200, "GET", "/v1/groups", client="client-admin")
    ft.check_eq([g["group"] for g in doc["groups"]], ["A"], "an admin of A sees A only")
    code, body, _ = curl("GET", "/v1/status", client=None)
    ft.check(code == 401 and "client certificate" in json.loads(body)["error"],
             f"no client certificate: {code} {body}")
    p = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", env.cert("ca.pem"),
                        "--cert", env.cert("client-other.pem"), "--key", env.cert("client-other.key"),
                        f"https://127.0.0.1:{api_port}/v1/status"],
                       capture_output=True, text=True, timeout=20)
    ft.check(p.returncode != 0 and p.stdout == "", f"a certificate of another CA is refused: {p}")

    ft.log("--- bad input")
    expect(404, "GET", "/v1/groups/nope", word="nope")
    expect(404, "GET", "/v1/groups/nope/points", word="nope")
    expect(404, "GET", "/v1/groups/..%2F..%2Fetc", word="group")
    expect(404, "GET", "/v1/nothing", word="/v1/nothing")
    expect(404, "GET", "/v1/jobs/j999-0", word="j999-0")
    _, resp = expect(405, "DELETE", "/v1/status", word="DELETE")
    ft.check_eq(resp.getheader("Allow"), "GET", "Allow of /v1/status")
    _, resp = expect(405, "PUT", "/v1/groups/A/failover-test")
    ft.check_eq(resp.getheader("Allow"), "POST, DELETE", "Allow of failover-test")
    expect(400, "POST", "/v1/groups/A/failover-test", raw=b'{"point": ', word="not valid JSON")
    expect(400, "POST", "/v1/groups/A/failover-test", raw=b'[1, 2]', word="JSON object")
    expect(400, "POST", "/v1/groups/A/failover-test", body={"pointt": 1}, word="pointt")
    expect(400, "POST", "/v1/groups/A/export", body={"point": "latest"}, word="disk")
    expect(400, "POST", "/v1/groups/A/export", body={"disk": "--overlay", "socket": "/tmp/x"},
           word="not start with '-'")
    expect(409, "DELETE", "/v1/groups/A/export", word="no export")
    huge = env.path("huge.json")
    with open(huge, "w") as f:
        f.write("x" * (1 << 20))
    code, body, _ = curl("POST", "/v1/groups/A/failover-test", data="@" + huge)
    ft.check(code == 413 and json.loads(body)["status"] == 413, f"huge body: {code} {body[:200]}")
    # A slow client: half a request line, then nothing; the server answers 408 within its
    # read timeout (5 s) and frees the slot.
    t0 = time.monotonic()
    raw = socket.create_connection(("127.0.0.1", api_port), timeout=30)
    s = ctx().wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(b"GET /v1/sta")
    reply = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    s.close()
    took = time.monotonic() - t0
    ft.check(reply.startswith(b"HTTP/1.1 408") and 4 < took < 15,
             f"a slow client gets 408 after the read timeout ({took:.1f} s): {reply[:200]}")

    ft.log("--- jobs: export start/stop (real nbdkit), failover test and failover of a missing RP")
    sock = env.path("exp.sock")
    doc, _ = expect(202, "POST", "/v1/groups/A/export",
                    body={"point": rp1, "disk": "vda", "socket": sock})
    job = doc["job"]
    deadline = time.monotonic() + 30
    while not os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.1)
    jd, _ = expect(200, "GET", f"/v1/jobs/{job}")
    ft.check(os.path.exists(sock) and jd["state"] == "running", f"export serving: {jd}")
    ft.check_eq(jd["argv"][1:4], ["export", "--store", store], "the export job runs the CLI")
    expect(404, "GET", f"/v1/jobs/{job}", client="client-b")  # not theirs
    rp3 = rp()  # replication goes on while the export serves
    doc, _ = expect(200, "DELETE", "/v1/groups/A/export")
    ft.check_eq(doc["stopped"], 1, "exports stopped")
    deadline = time.monotonic() + 30
    while jd["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        jd, _ = expect(200, "GET", f"/v1/jobs/{job}")
    ft.check(jd["state"] == "succeeded" and jd["exit_code"] == 0, f"export stopped cleanly: {jd}")

    for path in ("/v1/groups/A/failover-test", "/v1/groups/A/failover"):
        doc, _ = expect(202, "POST", path, body={"point": 999999})
        deadline = time.monotonic() + 60
        jd = {"state": "running"}
        while jd["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            jd, _ = expect(200, "GET", doc["href"])
        ft.check(jd["state"] == "failed" and jd["exit_code"] != 0 and "999999" in jd["stderr"],
                 f"{path} of a missing RP: the CLI's refusal in the job: {jd}")
    doc, _ = expect(202, "DELETE", "/v1/groups/A/failover-test", body={"boot_result": "ok"})

    ft.log("--- ferry --site against the receiver; ferry status --rpo-alert")
    site = ["--site", f"https://127.0.0.1:{api_port}", "--tls-cert", env.cert("client-a.pem"),
            "--tls-key", env.cert("client-a.key"), "--tls-ca", env.cert("ca.pem")]
    r = env.run(site + ["points", "--group", "A", "--json"], tls=False, check_rc=0)
    local = env.run(["points", "--store", store, "--group", "A", "--json"], tls=False, check_rc=0)
    ft.check_eq([p["rp_id"] for p in json.loads(r.out)], [p["rp_id"] for p in json.loads(local.out)],
                "ferry --site points and ferry points --store")
    r = env.run(site + ["points", "--group", "A"], tls=False, check_rc=0)
    ft.check(f"{rp3}" in r.out and "recovery point(s)" in r.out, f"site points table:\n{r}")
    r = env.run(site + ["points", "--group", "nope"], tls=False)
    ft.check(r.rc == 1 and "404" in r.err and "nope" in r.err, f"site points of an unknown group:\n{r}")
    r = env.run(site + ["status", "--json"], tls=False, check_rc=0)
    ft.check("A" in [g["group"] for g in json.loads(r.out)["groups"]], f"site status groups: {r.out}")
    r = env.run(site + ["status", "--rpo-alert", "0.001"], tls=False)
    ft.check(r.rc == 3 and "!" in r.out, f"site status over --rpo-alert exits 3:\n{r}")
    r = env.run(["status", "--socket", env.path("rx.sock"), "--rpo-alert", "0.001", "--json"], tls=False)
    ft.check(r.rc == 3 and json.loads(r.out)["groups"][0]["rpo_exceeded"] is True,
             f"local status --rpo-alert exits 3:\n{r}")
    r = env.run(["status", "--socket", env.path("rx.sock"), "--rpo-alert", "86400"], tls=False)
    ft.check(r.rc == 0 and "RPO" in r.out, f"local status within --rpo-alert:\n{r}")
    r = env.run(site + ["failover", "test", "--group", "A", "--point", "999999"], tls=False)
    ft.check(r.rc != 0 and "999999" in r.err, f"site failover test of a missing RP:\n{r}")
    r = env.run(site + ["prune", "--store", store, "--group", "A"], tls=False)
    ft.check(r.rc == 2 and "not available with --site" in r.err, f"prune refuses --site:\n{r}")
    bad = ["--site", f"https://127.0.0.1:{api_port}", "--tls-cert", env.cert("client-b.pem"),
           "--tls-key", env.cert("client-b.key"), "--tls-ca", env.cert("ca.pem")]
    r = env.run(bad + ["points", "--group", "A"], tls=False)
    ft.check(r.rc == 1 and "403" in r.err and "may not manage" in r.err, f"site without the right:\n{r}")

    ft.log("--- 409: a failed-over group refuses a test failover, an export and a failover")
    env.replicate_once(qsd, rx.addr, "F", disks=[vdb.spec])
    with open(os.path.join(store, "F", "failed-over"), "w") as f:  # site/failover_state.h
        f.write("ferry-failover=1\nrp=1\nsince_unix_ns=1\ndomain=f\n")
    expect(409, "POST", "/v1/groups/F/failover-test", word="fail back first")
    expect(409, "POST", "/v1/groups/F/failover", word="fail")
    expect(409, "POST", "/v1/groups/F/export", body={"disk": "vdb", "socket": env.path("f.sock")})

    ft.log("--- the service unharmed")
    rp4 = rp()
    doc, _ = expect(200, "GET", "/v1/groups/A")
    ft.check_eq(doc["last_committed_rp"], rp4, "the receiver keeps replicating")
    ft.check(rp1 < rp2 < rp3 < rp4, "RP order")
    ft.check(rx.alive(), "receiver alive")
    ft.log("api: every endpoint and every bad input as expected")
