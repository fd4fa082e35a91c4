// bench-limits: single-core speed of the pipeline's CPU stages on a sample of real data, so
// end-to-end figures can be given as ratios to the machine's own limits measured in the same
// run. Prints one JSON object.
//
//   bench-limits SAMPLE_FILE [--block-kib 64] [--zstd-level 1] [--seconds 2]
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/transport/codec.h"

using Clock = std::chrono::steady_clock;

namespace {

std::vector<char> read_sample(const char* path) {
  std::vector<char> out;
  int fd = ::open(path, O_RDONLY);
  if (fd < 0) {
    std::perror(path);
    std::exit(1);
  }
  char buf[1 << 16];
  ssize_t r;
  while ((r = ::read(fd, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + r);
  ::close(fd);
  return out;
}

template <class F>
double rate_bytes_per_s(std::size_t bytes_per_pass, double min_seconds, F&& pass) {
  std::size_t passes = 0;
  auto t0 = Clock::now();
  double secs = 0;
  do {
    pass();
    ++passes;
    secs = std::chrono::duration<double>(Clock::now() - t0).count();
  } while (secs < min_seconds);
  return double(bytes_per_pass) * double(passes) / secs;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench-limits SAMPLE_FILE [--block-kib N] [--zstd-level L] [--seconds S]\n");
    return 2;
  }
  std::size_t block = 64 << 10;
  int level = ferry::transport::kDefaultZstdLevel;
  double seconds = 2;
  for (int i = 2; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--block-kib") block = std::strtoul(argv[i + 1], nullptr, 10) << 10;
    else if (k == "--zstd-level") level = std::atoi(argv[i + 1]);
    else if (k == "--seconds") seconds = std::atof(argv[i + 1]);
    else { std::fprintf(stderr, "unknown option %s\n", k.c_str()); return 2; }
  }
  std::vector<char> data = read_sample(argv[1]);
  data.resize(data.size() / block * block);
  if (data.empty()) { std::fprintf(stderr, "sample smaller than one block\n"); return 1; }
  const std::size_t n = data.size() / block;

  volatile std::uint64_t sink = 0;
  double xxh = rate_bytes_per_s(data.size(), seconds, [&] {
    for (std::size_t i = 0; i < n; ++i) sink = sink + ferry::xxh3_128(&data[i * block], block).lo;
  });

  auto c = ferry::transport::Compressor::create(level);
  auto d = ferry::transport::Decompressor::create();
  if (!c.is_ok() || !d.is_ok()) { std::fprintf(stderr, "zstd init failed\n"); return 1; }
  std::vector<std::vector<char>> packed(n);
  std::vector<char> out(ferry::transport::Compressor::bound(block));
  std::size_t packed_bytes = 0;
  double comp = rate_bytes_per_s(data.size(), seconds, [&] {
    packed_bytes = 0;
    for (std::size_t i = 0; i < n; ++i) {
      auto r = c->compress(&data[i * block], block, out.data(), out.size());
      if (!r.is_ok()) std::abort();
      packed[i].assign(out.data(), out.data() + *r);
      packed_bytes += *r;
    }
  });
  std::vector<char> back(block);
  double decomp = rate_bytes_per_s(data.size(), seconds, [&] {
    for (std::size_t i = 0; i < n; ++i)
      if (!d->decompress(packed[i].data(), packed[i].size(), back.data(), block).is_ok()) std::abort();
  });
  double zero = rate_bytes_per_s(data.size(), seconds, [&] {
    for (std::size_t i = 0; i < n; ++i) sink = sink + ferry::is_all_zero(&data[i * block], block);
  });
  std::printf("{\"sample_bytes\": %zu, \"block_bytes\": %zu, \"zstd_level\": %d, "
              "\"xxh3_128_mb_s\": %.1f, \"zero_check_mb_s\": %.1f, \"zstd_compress_mb_s\": %.1f, "
              "\"zstd_decompress_mb_s\": %.1f, \"zstd_ratio\": %.3f}\n",
              data.size(), block, level, xxh / 1e6, zero / 1e6, comp / 1e6, decomp / 1e6,
              double(packed_bytes) / double(data.size()));
  return 0;
}
