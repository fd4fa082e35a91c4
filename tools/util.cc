#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>

#include "tools.h"

namespace ferry::tools {

std::string default_state_dir() {
  if (const char* e = std::getenv("FERRY_STATE_DIR"); e && *e) return e;
  return "/var/lib/ferry";
}

std::string host_name() {
  char buf[256] = {};
  if (gethostname(buf, sizeof buf - 1) != 0) return "unknown-host";
  return buf;
}

std::string format_time_ns(std::uint64_t ns) {
  std::time_t t = static_cast<std::time_t>(ns / 1000000000ull);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::function<void(std::uint64_t, std::uint64_t)> progress_printer() {
  auto start = std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now());
  return [start](std::uint64_t done, std::uint64_t total) {
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - *start).count();
    double rate = secs > 0 ? double(done) / secs : 0;
    if (total > 0 && rate > 0)
      std::fprintf(stderr, "\r%s / %s  %.1f MB/s  ETA %.0f s   ", human_bytes(done).c_str(),
                   human_bytes(total).c_str(), rate / 1e6, double(total - done) / rate);
    else
      std::fprintf(stderr, "\r%s  %.1f MB/s   ", human_bytes(done).c_str(), rate / 1e6);
    std::fflush(stderr);
  };
}

}  // namespace ferry::tools
