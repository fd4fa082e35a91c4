// disk-limit: io_uring O_DIRECT sequential write then read of a scratch file on the file system
// the store lives on, queue depth 16, 1 MiB requests (the journal writes sequentially with
// io_uring and O_DIRECT; the replica and restore read). The ceiling for any receiver that makes
// bytes durable on that disk. Prints one JSON object; the file is removed.
//
//   disk-limit DIR [--mib 1024] [--block-kib 1024] [--depth 16]
#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
using Clock = std::chrono::steady_clock;

double run(int fd, bool write, std::size_t total, std::size_t block, unsigned depth, char* bufs) {
  io_uring ring;
  if (io_uring_queue_init(depth, &ring, 0) < 0) { std::perror("io_uring_queue_init"); std::exit(1); }
  std::size_t next = 0, done = 0;
  unsigned inflight = 0;
  auto t0 = Clock::now();
  while (done < total) {
    while (inflight < depth && next < total) {
      io_uring_sqe* sqe = io_uring_get_sqe(&ring);
      char* b = bufs + (inflight % depth) * block;  // content does not matter for timing
      if (write) io_uring_prep_write(sqe, fd, b, block, next);
      else io_uring_prep_read(sqe, fd, b, block, next);
      next += block;
      ++inflight;
    }
    io_uring_submit(&ring);
    io_uring_cqe* cqe;
    if (io_uring_wait_cqe(&ring, &cqe) < 0) { std::perror("wait_cqe"); std::exit(1); }
    if (cqe->res != int(block)) { std::fprintf(stderr, "io error %d\n", cqe->res); std::exit(1); }
    io_uring_cqe_seen(&ring, cqe);
    --inflight;
    done += block;
  }
  if (write) fdatasync(fd);
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  io_uring_queue_exit(&ring);
  return double(total) / secs / 1e6;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: disk-limit DIR [--mib N] [--block-kib N] [--depth N]\n"); return 2; }
  std::size_t mib = 1024, block = 1 << 20;
  unsigned depth = 16;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--mib") mib = std::strtoul(argv[i + 1], nullptr, 10);
    else if (k == "--block-kib") block = std::strtoul(argv[i + 1], nullptr, 10) << 10;
    else if (k == "--depth") depth = unsigned(std::atoi(argv[i + 1]));
    else { std::fprintf(stderr, "unknown option %s\n", k.c_str()); return 2; }
  }
  std::string path = std::string(argv[1]) + "/disk-limit.scratch";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0600);
  if (fd < 0) { std::perror(path.c_str()); return 1; }
  std::size_t total = mib << 20;
  if (posix_fallocate(fd, 0, off_t(total))) { std::fprintf(stderr, "fallocate failed\n"); return 1; }
  char* bufs = nullptr;
  if (posix_memalign((void**)&bufs, 4096, block * depth)) return 1;
  for (std::size_t i = 0; i < block * depth; ++i) bufs[i] = char(i * 2654435761u >> 11);
  double w = run(fd, true, total, block, depth, bufs);
  double r = run(fd, false, total, block, depth, bufs);
  ::close(fd);
  ::unlink(path.c_str());
  std::printf("{\"disk_write_mb_s\": %.1f, \"disk_read_mb_s\": %.1f, \"bytes\": %zu, \"block_bytes\": %zu, "
              "\"depth\": %u, \"method\": \"io_uring O_DIRECT sequential, fallocated file, fdatasync\"}\n",
              w, r, total, block, depth);
  free(bufs);
  return 0;
}
