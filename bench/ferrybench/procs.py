"""Processes and their accounting: building the tools, running a child with its own CPU, RSS and
I/O, watching a long-running process across one step, the load average during a run."""
import os, signal, socket, statistics, subprocess, sys, tempfile, threading, time


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1 << 20
GIB = 1 << 30
BLOCK = 64 << 10          # change blocks (Ferry's block size)
REGION = 1 << 20          # layout granularity of the base image
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]
BINARIES = ["ferry", "bench-limits", "tcp-limit", "disk-limit", "nbd-apply", "dirty-copy",
            "retention-layout", "retention-store"]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def out(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def build(build_dir):
    if not os.path.exists(os.path.join(build_dir, "build.ninja")):
        sh("meson", "setup", build_dir, ROOT, "--buildtype=release", "-Dtests=false",
           stdout=subprocess.DEVNULL)
    targets = ["tools/ferry"] + [f"bench/{b}" for b in BINARIES[1:]]
    sh("ninja", "-C", build_dir, *targets, stdout=subprocess.DEVNULL)
    return {b: os.path.join(build_dir, "tools" if b == "ferry" else "bench", b) for b in BINARIES}


# ---- process accounting -------------------------------------------------------------------------
def proc_io(pid="self"):
    d = {}
    for line in open(f"/proc/{pid}/io"):
        k, v = line.split(":")
        d[k] = int(v)
    return d


def proc_cpu(pid, children=True):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    t = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return t / os.sysconf("SC_CLK_TCK")


def proc_hwm_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def reset_hwm(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def run_child(cmd, env=None, stdin_path=None):
    """fork/exec with pipes; wait4 for the child's own rusage; /proc/self/io delta for its I/O."""
    import selectors
    # Peak RSS through GNU time: a child forked from this (large) Python process would report
    # our RSS as its own ru_maxrss (exec keeps the old mm's high-water mark); GNU time's child
    # is forked from a tiny process, so its maxrss is the tool's own.
    rss_file = tempfile.NamedTemporaryFile(prefix="ferry-bench-rss-", delete=False)
    rss_file.close()
    cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name] + list(cmd)
    io0 = proc_io()
    r, w = os.pipe()
    re_, we = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)  # its own group: killed as a whole if the harness is interrupted
            if stdin_path:
                fd = os.open(stdin_path, os.O_RDONLY)
                os.dup2(fd, 0)
            os.dup2(w, 1)
            os.dup2(we, 2)
            for fd in (r, re_, w, we):
                os.close(fd)
            if env is not None:
                os.execvpe(cmd[0], cmd, env)
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    os.close(w)
    os.close(we)
    bufs = {r: b"", re_: b""}
    sel = selectors.DefaultSelector()
    sel.register(r, selectors.EVENT_READ)
    sel.register(re_, selectors.EVENT_READ)
    open_fds = 2
    try:
        while open_fds:
            for key, _ in sel.select():
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    open_fds -= 1
                else:
                    bufs[key.fd] += data
    except BaseException:  # Ctrl-C, SIGTERM (bench/run --links): the tool goes too
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        raise
    _, status, ru = os.wait4(pid, 0)
    wall = time.monotonic() - t0
    io1 = proc_io()
    code = os.waitstatus_to_exitcode(status)
    try:
        peak_kib = int(open(rss_file.name).read().split()[-1])
    except (ValueError, IndexError):
        peak_kib = -1024
    os.unlink(rss_file.name)
    res = {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": peak_kib / 1024,
           "read_bytes": io1["read_bytes"] - io0["read_bytes"],
           "write_bytes": io1["write_bytes"] - io0["write_bytes"],
           "rchar": io1["rchar"] - io0["rchar"], "wchar": io1["wchar"] - io0["wchar"],
           "stdout": bufs[r].decode(errors="replace"), "stderr": bufs[re_].decode(errors="replace"),
           "exit": code}
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[5:8])} exited {code}: {res['stderr'][-3000:]}")
    return res


class Watch:
    """Counters of a long-running process (QEMU, receiver, rsync daemon) across one step."""
    def __init__(self, pid):
        self.pid = pid
        self.io0 = proc_io(pid)
        self.cpu0 = proc_cpu(pid)

    def delta(self):
        io = proc_io(self.pid)
        return {"cpu_s": proc_cpu(self.pid) - self.cpu0,
                "rchar": io["rchar"] - self.io0["rchar"], "wchar": io["wchar"] - self.io0["wchar"],
                "read_bytes": io["read_bytes"] - self.io0["read_bytes"],
                "write_bytes": io["write_bytes"] - self.io0["write_bytes"]}


class LoadSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.samples = []
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            self.samples.append(os.getloadavg()[0])
            self.stop_ev.wait(5)

    def summary(self):
        s = self.samples or [os.getloadavg()[0]]
        return {"min": round(min(s), 2), "mean": round(statistics.mean(s), 2), "max": round(max(s), 2),
                "samples": len(s), "interval_s": 5}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
