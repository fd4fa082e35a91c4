// dirty-copy: the bare dirty-extent copy, the floor for any incremental: asks QEMU's NBD
// export for the extents of a dirty bitmap (what `nbdinfo --map=qemu:dirty-bitmap:NAME` prints),
// reads exactly those (libnbd aio, 1 MiB requests, 16 in flight) and pwrites them at the same
// offsets into a local file, then fdatasync. No hashing, no compression, no framing, no journal.
// With an NBD URI as the destination (a qemu-nbd replica across a link, bench/run --links), it
// writes them there instead (libnbd aio, 16 writes in flight) and ends with an NBD flush.
//
//   dirty-copy NBD_URI BITMAP DEST_FILE|DEST_NBD_URI
#include <fcntl.h>
#include <libnbd.h>
#include <poll.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <utility>
#include <vector>

namespace {
std::vector<std::pair<std::uint64_t, std::uint64_t>> g_extents;  // offset, length
std::uint64_t g_pos = 0;

int extent_cb(void*, const char*, uint64_t offset, uint32_t* entries, size_t n, int*) {
  std::uint64_t off = offset;
  for (size_t i = 0; i + 1 < n; i += 2) {
    std::uint64_t len = entries[i];
    if (entries[i + 1] & 1) {
      if (!g_extents.empty() && g_extents.back().first + g_extents.back().second == off)
        g_extents.back().second += len;
      else
        g_extents.emplace_back(off, len);
    }
    off += len;
  }
  g_pos = off;
  return 0;
}

// One step of both handles' state machines: poll their sockets in the directions they want
// (blocking) and tell each what became ready.
bool pump(nbd_handle* a, nbd_handle* b) {
  nbd_handle* hs[2] = {a, b};
  pollfd fds[2];
  int n = 0;
  for (nbd_handle* x : hs) {
    if (!x) continue;
    unsigned dir = nbd_aio_get_direction(x);
    fds[n] = {nbd_aio_get_fd(x), short(((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                                       ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0)), 0};
    ++n;
  }
  if (::poll(fds, nfds_t(n), -1) < 0) return false;
  for (int i = 0, j = 0; i < 2; ++i) {
    if (!hs[i]) continue;
    const short ev = fds[j++].revents;
    if ((ev & (POLLIN | POLLHUP | POLLERR)) && nbd_aio_notify_read(hs[i]) == -1) return false;
    if ((ev & POLLOUT) && nbd_aio_notify_write(hs[i]) == -1) return false;
  }
  return true;
}

// Waits until `cookie` of `h` completed; false when it failed or a handle broke.
bool wait_cookie(nbd_handle* h, std::int64_t cookie, nbd_handle* other) {
  for (;;) {
    int c = nbd_aio_command_completed(h, cookie);
    if (c == 1) return true;
    if (c == -1) return false;
    if (!pump(h, other)) return false;
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: dirty-copy NBD_URI BITMAP DEST_FILE|DEST_NBD_URI\n");
    return 2;
  }
  nbd_handle* h = nbd_create();
  std::string ctx = std::string("qemu:dirty-bitmap:") + argv[2];
  if (!h || nbd_add_meta_context(h, ctx.c_str()) == -1 || nbd_connect_uri(h, argv[1]) == -1) {
    std::fprintf(stderr, "%s\n", nbd_get_error());
    return 1;
  }
  const std::int64_t size = nbd_get_size(h);
  while (g_pos < std::uint64_t(size)) {
    std::uint64_t len = std::min<std::uint64_t>(std::uint64_t(size) - g_pos, 1ull << 30);
    std::uint64_t before = g_pos;
    if (nbd_block_status(h, len, g_pos, (nbd_extent_callback){.callback = extent_cb}, 0) == -1) {
      std::fprintf(stderr, "%s\n", nbd_get_error());
      return 1;
    }
    if (g_pos == before) { std::fprintf(stderr, "block status made no progress\n"); return 1; }
  }
  const bool to_nbd = std::string(argv[3]).find("://") != std::string::npos;
  nbd_handle* d = nullptr;
  int out = -1;
  if (to_nbd) {
    d = nbd_create();
    if (!d || nbd_connect_uri(d, argv[3]) == -1) { std::fprintf(stderr, "%s\n", nbd_get_error()); return 1; }
    if (nbd_get_size(d) < size) { std::fprintf(stderr, "%s is smaller than the source\n", argv[3]); return 1; }
  } else {
    out = ::open(argv[3], O_WRONLY | O_CREAT, 0644);
    if (out < 0 || ::ftruncate(out, size)) { std::perror(argv[3]); return 1; }
  }
  constexpr std::uint64_t kReq = 1 << 20;
  constexpr unsigned kDepth = 16;  // reads in flight, and writes in flight to an NBD destination
  struct Req { std::int64_t cookie; std::uint64_t off, len; std::vector<char> buf; };
  std::deque<Req> q;
  std::deque<Req> wq;  // writes to the NBD destination, each owning its buffer until done
  std::uint64_t bytes = 0;
  auto retire_write = [&]() -> bool {
    if (!wait_cookie(d, wq.front().cookie, h)) return false;
    wq.pop_front();
    return true;
  };
  auto drain_one = [&]() -> bool {
    Req& r = q.front();
    const std::uint64_t len = r.len;
    if (!wait_cookie(h, r.cookie, d)) return false;
    if (to_nbd) {
      while (wq.size() >= kDepth)
        if (!retire_write()) return false;
      r.cookie = nbd_aio_pwrite(d, r.buf.data(), r.len, r.off, NBD_NULL_COMPLETION, 0);
      if (r.cookie == -1) return false;
      wq.push_back(std::move(r));
    } else if (::pwrite(out, r.buf.data(), r.len, off_t(r.off)) != ssize_t(r.len)) {
      return false;
    }
    bytes += len;
    q.pop_front();
    return true;
  };
  for (auto [off, len] : g_extents) {
    for (std::uint64_t o = off; o < off + len; o += kReq) {
      if (q.size() == kDepth && !drain_one()) { std::fprintf(stderr, "copy failed: %s\n", nbd_get_error()); return 1; }
      Req r{0, o, std::min(kReq, off + len - o), {}};
      r.buf.resize(r.len);
      r.cookie = nbd_aio_pread(h, r.buf.data(), r.len, o, NBD_NULL_COMPLETION, 0);
      if (r.cookie == -1) { std::fprintf(stderr, "%s\n", nbd_get_error()); return 1; }
      q.push_back(std::move(r));
    }
  }
  while (!q.empty())
    if (!drain_one()) { std::fprintf(stderr, "copy failed: %s\n", nbd_get_error()); return 1; }
  if (to_nbd) {
    while (!wq.empty())
      if (!retire_write()) { std::fprintf(stderr, "write failed: %s\n", nbd_get_error()); return 1; }
    if (nbd_flush(d, 0) == -1) { std::fprintf(stderr, "flush: %s\n", nbd_get_error()); return 1; }
    nbd_shutdown(d, 0);
    nbd_close(d);
  } else {
    if (::fdatasync(out)) { std::perror("fdatasync"); return 1; }
    ::close(out);
  }
  nbd_shutdown(h, 0);
  nbd_close(h);
  std::printf("{\"extents\": %zu, \"bytes\": %llu}\n", g_extents.size(), (unsigned long long)bytes);
  return 0;
}
