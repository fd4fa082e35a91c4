#include <arpa/inet.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>

#include "tools.h"

namespace ferry::tools {

Status check_tls_args(const TlsArgs& a) {
  std::string missing;
  if (a.given()) {
    if (a.cert.empty()) missing += " --tls-cert";
    if (a.key.empty()) missing += " --tls-key";
    if (a.ca.empty()) missing += " --tls-ca";
    if (!missing.empty())
      return Status::error(Errc::invalid_argument,
                           "--tls-cert, --tls-key and --tls-ca go together; missing:" + missing);
    return Status::ok();
  }
  if (!a.crl.empty())
    return Status::error(Errc::invalid_argument, "--tls-crl needs --tls-cert, --tls-key and --tls-ca");
  if (!a.server_name.empty())
    return Status::error(Errc::invalid_argument,
                         "--tls-server-name needs --tls-cert, --tls-key and --tls-ca");
  return Status::ok();
}

Result<std::shared_ptr<const transport::TlsConfig>> load_tls(const TlsArgs& a,
                                                             transport::TlsConfig::Role role) {
  FERRY_ASSERT(check_tls_args(a).is_ok());
  if (!a.given()) return std::shared_ptr<const transport::TlsConfig>();
  return transport::TlsConfig::load(role, a.files());
}

bool loopback_host(const std::string& host) {
  if (host == "localhost") return true;
  unsigned char b[16];
  if (inet_pton(AF_INET, host.c_str(), b) == 1) return b[0] == 127;
  if (inet_pton(AF_INET6, host.c_str(), b) != 1) return false;
  static const unsigned char kLoop6[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  static const unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::equal(b, b + 16, kLoop6)) return true;
  return std::equal(b, b + 12, kMapped) && b[12] == 127;
}

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

int fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "ferry: %s: %s\n", what.c_str(), s.to_string().c_str());
  return 1;
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
