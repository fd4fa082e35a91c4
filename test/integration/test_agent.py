#!/usr/bin/env python3
"""`ferry agent` end to end: a [[qmp]] target (qsd, two disks) at interval 2 s and a status
socket in the temp dir. Checks, in order: sd_notify READY/STATUS/WATCHDOG (a datagram socket
of the test's as NOTIFY_SOCKET); RPs on schedule (gaps between captures >= the interval);
`ferry status --json` shows the newest committed RP; socket mode 0600; a stopped receiver with
rpo_alert_seconds = 1 makes `ferry status` exit 3; SIGHUP with a changed interval and an added
target takes effect; a broken config on SIGHUP is rejected and the agent keeps going; SIGTERM
mid-RP exits 0 promptly and the next run loses no change; kill -9 mid-RP, restart: no dirty
block lost (restore of the newest RP equals the source)."""

import json
import os
import signal
import socket
import stat
import threading
import time

import ferrytest as ft

G1, G2 = "g1", "g2"


class Notify:
    """A NOTIFY_SOCKET: a thread collects the agent's sd_notify datagrams (drained at once, as
    systemd does: a unix datagram queue holds few messages and then blocks the sender)."""

    def __init__(self, env):
        self.path = env.path("notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []
        self.lock = threading.Lock()
        self.stop = False
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()
        env.on_cleanup(self.close)

    def _collect(self):
        while not self.stop:
            try:
                m = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append(m)

    def close(self):
        self.stop = True
        self.thread.join(2)
        self.sock.close()

    def wait_for(self, prefix, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                lines = [l for m in self.messages for l in m.split("\n")]
            if any(l.startswith(prefix) for l in lines):
                return
            time.sleep(0.1)
        raise ft.TestFailure(f"no {prefix!r} from sd_notify in {timeout}s; got {self.messages[-20:]}")


def qmp_target(qsd, rx, group, interval, rpo_alert=60):
    disks = ", ".join(f'"{s}"' for s in qsd.specs)
    return (f'[[qmp]]\nsocket = "{qsd.qmp_path}"\ndisks = [{disks}]\nto = "{rx.addr}"\n'
            f'group = "{group}"\ninterval_seconds = {interval}\n'
            f'rpo_alert_seconds = {rpo_alert}\n\n')


with ft.Env("agent") as env:
    wl = env.workload()
    qsd = env.qsd([ft.Disk("vda", 128 * ft.MiB, "qcow2", node="n-a"),
                   ft.Disk("vdb", 16 * ft.MiB, "qcow2", node="n-b")])
    vda, vdb = qsd.disks
    rx = env.receiver()
    status_sock = env.path("run", "agent.sock")
    state_dir = env.path("state", "x")[:-2]
    cfg_path = env.path("agent.toml")
    head = (f'state_dir = "{state_dir}"\nstatus_socket = "{status_sock}"\nlog_level = "info"\n'
            + env.agent_tls_toml() + "\n")

    def write_config(text):
        with open(cfg_path + ".tmp", "w") as f:
            f.write(text)
        os.rename(cfg_path + ".tmp", cfg_path)

    notify = Notify(env)

    def start_agent(tag):
        return ft.Proc(env, tag, [env.ferry, "agent", "--config", cfg_path],
                       env.path(f"{tag}.log"),
                       extra_env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000"})

    def status(expect_rc=None):
        r = env.run(["status", "--socket", status_sock, "--json"], timeout=30)
        if expect_rc is not None and r.rc != expect_rc:
            raise ft.TestFailure(f"ferry status: expected exit {expect_rc}:\n{r}")
        ft.check(r.rc in (0, 3), f"ferry status failed:\n{r}")
        return r.rc, {t["name"]: t for t in json.loads(r.out)["targets"]}

    def target_state(group):
        """The state of a target, straight from the socket (fast: to catch an RP in flight)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(status_sock)
        s.sendall(b"status\n")
        buf = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            buf += b
        s.close()
        return next(t for t in json.loads(buf)["targets"] if t["name"] == group)

    def wait_points(group, count, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            pts = env.points(rx.store, group)
            if len(pts) >= count:
                return pts
            ft.check(time.monotonic() < deadline,
                     f"{group}: {len(pts)} points after {timeout}s, expected {count}")
            time.sleep(0.5)

    def gaps(pts):
        c = [p["created_unix_ns"] / 1e9 for p in pts]
        return [b - a for a, b in zip(c, c[1:])]

    # -- start, schedule, sd_notify --
    write_config(head + qmp_target(qsd, rx, G1, 2))
    agent = start_agent("agent")
    notify.wait_for("READY=1")
    wl.random_writes(qsd, vda, 10)
    wl.random_writes(qsd, vdb, 10)
    pts = wait_points(G1, 4)
    g = gaps(pts[:4])
    ft.log(f"gaps between RPs at interval 2 s: {[round(x, 2) for x in g]}")
    ft.check(all(x >= 1.5 for x in g), f"RPs closer than the 2 s interval: {g}")
    notify.wait_for("STATUS=")
    notify.wait_for("WATCHDOG=1")
    ft.check_eq(stat.S_IMODE(os.stat(status_sock).st_mode), 0o600, "status socket mode")

    # -- status shows what the receiver holds --
    for attempt in range(20):
        _, s1 = status()
        newest = max(p["rp_id"] for p in env.points(rx.store, G1))
        _, s2 = status()
        if s1[G1]["last_rp_id"] == s2[G1]["last_rp_id"]:
            break
    ft.check_eq(s1[G1]["last_rp_id"], newest, "status last_rp_id vs the newest committed RP")
    t = s2[G1]
    for key in ("kind", "state", "last_rp_unix_ns", "rpo_seconds", "changed_bytes", "sent_bytes",
                "last_error", "rpo_alert_seconds"):
        ft.check(key in t, f"status lacks {key}: {t}")
    ft.check_eq(t["kind"], "qmp", "kind")
    ft.check(t["rpo_seconds"] is not None and t["rpo_seconds"] < 30, f"RPO of a healthy target: {t}")
    status(expect_rc=0)
    table = env.run(["status", "--socket", status_sock], timeout=30)
    ft.check(table.rc == 0 and G1 in table.out and "RPO" in table.out, f"status table:\n{table}")

    # -- RPO alert with the receiver stopped (a schedule-only change: no worker restart) --
    write_config(head + qmp_target(qsd, rx, G1, 2, rpo_alert=1))
    agent.p.send_signal(signal.SIGHUP)
    rx.stop()
    time.sleep(3)
    rc, s = status()
    ft.check_eq(rc, 3, f"ferry status exit with the receiver down and RPO alert 1 s ({s})")
    ft.check(s[G1]["rpo_exceeded"] and s[G1]["rpo_alert_seconds"] == 1, f"status: {s[G1]}")
    deadline = time.monotonic() + 20
    while not status()[1][G1]["last_error"]:
        ft.check(time.monotonic() < deadline, "no last_error while the receiver is down")
        time.sleep(0.5)
    ft.log(f"last_error with the receiver down: {status()[1][G1]['last_error']}")
    rx.restart()

    # -- SIGHUP: interval 2 -> 4 and a second target --
    qsd2 = env.qsd([ft.Disk("vdc", 8 * ft.MiB, "qcow2", node="n-c")], tag="qsd2")
    write_config(head + qmp_target(qsd, rx, G1, 4) + qmp_target(qsd2, rx, G2, 2))
    agent.p.send_signal(signal.SIGHUP)
    wl2 = env.workload(salt=2)
    wl2.random_writes(qsd2, qsd2.disks[0], 5)
    wait_points(G2, 2)
    before = len(env.points(rx.store, G1))
    pts = wait_points(G1, before + 3, timeout=90)
    g = gaps(pts[-3:])
    ft.log(f"gaps between RPs after the change to 4 s: {[round(x, 2) for x in g]}")
    ft.check(all(x >= 3.5 for x in g), f"RPs closer than the new 4 s interval: {g}")
    _, s = status()
    ft.check_eq(sorted(s), [G1, G2], "targets after the reload")
    ft.check_eq(s[G1]["interval_seconds"], 4, "interval of g1 after the reload")

    # -- a broken config on SIGHUP is rejected, the agent goes on --
    write_config(head + qmp_target(qsd, rx, G1, 4) + "interval_seconds = \"soon\"\n")
    agent.p.send_signal(signal.SIGHUP)
    n1 = len(env.points(rx.store, G1))
    time.sleep(1)
    ft.check(agent.alive(), "the agent died on a broken config")
    ft.check("config reload rejected" in agent.log_text() and "agent.toml:" in agent.log_text(),
             "the rejected reload is not logged with file:line")
    wait_points(G1, n1 + 1, timeout=30)
    _, s = status()
    ft.check_eq(sorted(s), [G1, G2], "targets kept after a rejected reload")
    write_config(head + qmp_target(qsd, rx, G1, 2))  # g2 removed
    agent.p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while sorted(status()[1]) != [G1]:
        ft.check(time.monotonic() < deadline, "g2 still listed after its removal")
        time.sleep(0.3)

    def catch_running(group, timeout=60):
        deadline = time.monotonic() + timeout
        while target_state(group)["state"] != "running":
            ft.check(time.monotonic() < deadline, f"{group} never seen running")
            time.sleep(0.01)

    def verify_newest_equals_source(what):
        snaps = {d.name: qsd.snapshot(d, env.path("snaps", f"{what}-{d.name}.img"))
                 for d in qsd.disks}
        t_written = time.time_ns()
        pts = env.points(rx.store, G1)
        deadline = time.monotonic() + 60
        while pts[-1]["created_unix_ns"] <= t_written:
            ft.check(time.monotonic() < deadline, "no RP captured after the writes")
            time.sleep(0.5)
            pts = env.points(rx.store, G1)
        for name, snap in snaps.items():
            env.check_restore(rx.store, G1, pts[-1]["rp_id"], name, snap, f"({what}) ")

    # -- SIGTERM mid-RP: exit 0 promptly; the next run loses nothing --
    wl.random_writes(qsd, vda, 40, min_len=1 * ft.MiB, max_len=2 * ft.MiB)
    catch_running(G1)
    t0 = time.monotonic()
    rc = agent.terminate(timeout=20)
    ft.log(f"SIGTERM mid-RP: exit {rc} after {time.monotonic() - t0:.1f}s")
    ft.check_eq(rc, 0, "agent exit status on SIGTERM")
    notify.wait_for("STOPPING=1")
    ft.check(not os.path.exists(status_sock), "status socket left behind after a clean stop")
    wl.random_writes(qsd, vdb, 10)
    agent = start_agent("agent2")
    verify_newest_equals_source("after SIGTERM")

    # -- kill -9 mid-RP, restart: no dirty block lost --
    wl.random_writes(qsd, vda, 40, min_len=1 * ft.MiB, max_len=2 * ft.MiB)
    catch_running(G1)
    agent.kill9()
    ft.log("agent killed -9 mid-RP")
    wl.random_writes(qsd, vda, 10)
    agent = start_agent("agent3")  # clears the dead agent's socket file
    verify_newest_equals_source("after kill -9")
    ft.check_eq(agent.terminate(timeout=20), 0, "agent exit status on SIGTERM")

    qsd2.stop()
    qsd.stop()
    rx.stop()
