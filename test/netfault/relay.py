#!/usr/bin/env python3
"""A userspace TCP relay that adds delay with jitter (this kernel has no netem).

    relay.py LISTEN_ADDR:PORT UPSTREAM_ADDR:PORT DELAY_MS JITTER_MS SEED [MAX_SECONDS [RATE]]

Each chunk read from one side is delivered to the other side DELAY_MS +- JITTER_MS later
(uniform, seeded), never before an earlier chunk of the same direction: order is kept, as
TCP would. Bytes in flight per direction are bounded (MAX_QUEUED_BYTES: reading stops, so
the sender sees backpressure). One thread pair per connection; closes both sides when
either ends. It exits by itself after MAX_SECONDS (default 3600) so it cannot outlive a
test. Prints 'ready' once listening.

RATE (bytes per second, optional) limits each direction to that rate, a link of that speed:
chunks are smaller, at most RATE_QUEUED_BYTES wait in the relay and its sockets' buffers are
small, so the sender feels the limit as backpressure soon (the explainable RPO's send stage,
test/integration/test_metrics.py).
"""
import collections
import random
import socket
import sys
import threading
import time

MAX_QUEUED_BYTES = 64 << 20  # long fat pipe: 100 ms x 100 MB/s fits
CHUNK = 256 << 10
RATE_CHUNK = 16 << 10
RATE_QUEUED_BYTES = 64 << 10
RATE_SOCKET_BUFFER = 64 << 10


def parse(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


class Pipe:
    def __init__(self, src, dst, delay_s, jitter_s, rng, rate=0):
        self.src, self.dst = src, dst
        self.delay_s, self.jitter_s, self.rng = delay_s, jitter_s, rng
        self.rate = rate
        self.max_queued = RATE_QUEUED_BYTES if rate else MAX_QUEUED_BYTES
        self.chunk = RATE_CHUNK if rate else CHUNK
        self.q = collections.deque()
        self.queued = 0
        self.cv = threading.Condition()
        self.eof = False

    def reader(self):
        last_due = 0.0
        try:
            while True:
                with self.cv:
                    while self.queued > self.max_queued and not self.eof:
                        self.cv.wait(0.5)
                data = self.src.recv(self.chunk)
                if not data:
                    break
                due = time.monotonic() + max(0.0, self.delay_s + self.rng.uniform(
                    -self.jitter_s, self.jitter_s))
                due = max(due, last_due)  # keep order
                last_due = due
                with self.cv:
                    self.q.append((due, data))
                    self.queued += len(data)
                    self.cv.notify_all()
        except OSError:
            pass
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    def writer(self):
        sent, t0 = 0, time.monotonic()
        try:
            while True:
                with self.cv:
                    while not self.q and not self.eof:
                        self.cv.wait(0.5)
                    if not self.q:
                        break
                    due, data = self.q[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if self.rate:  # no faster than the link
                    ahead = t0 + sent / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                    elif ahead < -1:  # idle link: no burst credit beyond a second
                        sent, t0 = 0, time.monotonic()
                    sent += len(data)
                self.dst.sendall(data)
                with self.cv:
                    self.q.popleft()
                    self.queued -= len(data)
                    self.cv.notify_all()
        except OSError:
            pass
        for s in (self.src, self.dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(conn, upstream, delay_s, jitter_s, seed, rate=0):
    try:
        up = socket.socket()
        if rate:
            up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RATE_SOCKET_BUFFER)
        up.settimeout(10)
        up.connect(upstream)
        up.settimeout(None)
    except OSError:
        conn.close()
        return
    for s in (conn, up):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pipes = [Pipe(conn, up, delay_s, jitter_s, random.Random(seed), rate),
             Pipe(up, conn, delay_s, jitter_s, random.Random(seed + 1), rate)]
    threads = [threading.Thread(target=f, daemon=True) for p in pipes for f in (p.reader, p.writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conn.close()
    up.close()


def main():
    listen, upstream = parse(sys.argv[1]), parse(sys.argv[2])
    delay_s, jitter_s = float(sys.argv[3]) / 1000, float(sys.argv[4]) / 1000
    seed = int(sys.argv[5])
    max_seconds = float(sys.argv[6]) if len(sys.argv) > 6 else 3600
    rate = float(sys.argv[7]) if len(sys.argv) > 7 else 0
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rate:  # inherited by accepted sockets: a small receive window towards the sender
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RATE_SOCKET_BUFFER)
    srv.bind(listen)
    srv.listen(16)
    srv.settimeout(1)
    print("ready", flush=True)
    deadline = time.monotonic() + max_seconds
    n = 0
    while time.monotonic() < deadline:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        n += 1
        threading.Thread(target=serve, args=(conn, upstream, delay_s, jitter_s, seed * 1000 + n, rate),
                         daemon=True).start()


if __name__ == "__main__":
    main()
