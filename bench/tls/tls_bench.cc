// tls-bench: what mutual TLS 1.3 costs Ferry's transport, on loopback, in one run
// (bench/tls/run drives it and keeps the figures under bench/results/).
//
//  1. a "10% change set": --mib of 64 KiB DATA frames (default 410 MiB, 10% of a 4 GiB disk)
//     sent over the real Connection to a real Server in another process, plaintext and TLS
//     alternately (--repeats each, median), timed from the first send to the receiver's ack
//     of the last frame; the figure is the ratio TLS/plaintext (target <= 1.10);
//  2. --handshakes Connection::connect() calls with TLS (TCP connect + handshake + one echo,
//     so the server's check of our certificate is in it): median and p99;
//  3. the receiver's RSS (VmRSS of the server process) before and with --idle TLS
//     connections open and idle.
// The server runs in a child process (this binary with --serve), so its RSS and CPU are its
// own. The payloads are zstd-compressed-like: mostly high-entropy with some repeated runs
// (TLS does not compress, so only the size matters to it; the mix keeps it honest).
//
// Usage: tls-bench --pki DIR [--mib 410] [--repeats 3] [--handshakes 200] [--idle 500]
//        (DIR as written by test/tls/make-certs). Prints a table and one JSON line.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "ferry/transport/connection.h"

using namespace ferry;
using namespace ferry::transport;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::size_t kFrameBytes = 64u << 10;

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "tls-bench: %s\n", what.c_str());
  std::exit(1);
}

TlsFiles files(const std::string& pki, const std::string& who) {
  return TlsFiles{pki + "/" + who + ".pem", pki + "/" + who + ".key", pki + "/ca.pem", ""};
}

std::shared_ptr<const TlsConfig> load(TlsConfig::Role role, const TlsFiles& f) {
  auto c = TlsConfig::load(role, f);
  if (!c.is_ok()) die(c.status().to_string());
  return std::move(c).value();
}

// The receiver: counts DATA bytes, acks rp_end with the count, echoes hello.
void handle(Connection& conn) {
  std::uint64_t data_bytes = 0;
  for (;;) {
    Result<Frame> f = conn.receive(3600s);
    if (!f.is_ok()) return;
    if (f->type == MsgType::data) {
      data_bytes += f->payload.size();
    } else if (f->type == MsgType::rp_end) {
      if (!conn.send(MsgType::rp_ack, std::to_string(data_bytes)).is_ok()) return;
      data_bytes = 0;
    } else if (!conn.send(f->type, f->payload).is_ok()) {
      return;
    }
  }
}

int serve(const std::string& pki) {
  ServerOptions options;
  options.max_connections = 2048;
  options.max_connections_per_address = 2048;
  auto plain = Server::listen(Endpoint{"127.0.0.1", 0}, options, handle);
  if (!plain.is_ok()) die(plain.status().to_string());
  options.connection.tls = load(TlsConfig::Role::server, files(pki, "server"));
  auto tls = Server::listen(Endpoint{"127.0.0.1", 0}, options, handle);
  if (!tls.is_ok()) die(tls.status().to_string());
  std::printf("READY %d %u %u\n", static_cast<int>(::getpid()), plain.value()->port(),
              tls.value()->port());
  std::fflush(stdout);
  // Until the parent closes our stdin.
  char buf[64];
  while (::read(0, buf, sizeof buf) > 0) {
  }
  plain.value()->stop();
  tls.value()->stop();
  return 0;
}

std::size_t rss_kib(int pid) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6));
  return 0;
}

// CPU seconds (user + system) of this process, and of process `pid`.
double cpu_self() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  auto tv = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  return tv(ru.ru_utime) + tv(ru.ru_stime);
}
double cpu_of(int pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::size_t close = stat.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(stat.substr(close + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i)
    if (i == 14 || i == 15) ticks += std::stod(field);  // utime, stime
  return ticks / static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// Payloads like compressed blocks: random bytes with a run of repeats every few KiB.
std::vector<std::string> make_payloads() {
  std::vector<std::string> out(32);
  std::uint64_t x = 0x9e3779b97f4a7c15ull;
  for (auto& p : out) {
    p.resize(kFrameBytes);
    for (std::size_t i = 0; i < p.size(); ++i) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      p[i] = (i % 4096) < 512 ? static_cast<char>(i & 7) : static_cast<char>(x);
    }
  }
  return out;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

double send_change_set(std::uint16_t port, const ConnectionOptions& options, std::size_t mib,
                       const std::vector<std::string>& payloads) {
  auto conn = Connection::connect(Endpoint{"127.0.0.1", port}, options);
  if (!conn.is_ok()) die(conn.status().to_string());
  const std::size_t frames = mib * (1u << 20) / kFrameBytes;
  auto t0 = Clock::now();
  for (std::size_t i = 0; i < frames; ++i) {
    Status s = conn.value()->send(MsgType::data, payloads[i % payloads.size()]);
    if (!s.is_ok()) die(s.to_string());
  }
  if (Status s = conn.value()->send(MsgType::rp_end, ""); !s.is_ok()) die(s.to_string());
  Result<Frame> ack = conn.value()->receive(600s);
  double secs = seconds_since(t0);
  if (!ack.is_ok()) die(ack.status().to_string());
  if (ack->type != MsgType::rp_ack || std::stoull(ack->payload) != frames * kFrameBytes)
    die("the receiver counted " + ack->payload + " bytes");
  return secs;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  std::size_t i = std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

}  // namespace

int main(int argc, char** argv) {
  std::string pki, serve_pki;
  std::size_t mib = 410, repeats = 3, handshakes = 200, idle = 500;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--pki") pki = next();
    else if (a == "--serve") serve_pki = next();
    else if (a == "--mib") mib = std::stoul(next());
    else if (a == "--repeats") repeats = std::stoul(next());
    else if (a == "--handshakes") handshakes = std::stoul(next());
    else if (a == "--idle") idle = std::stoul(next());
    else die("unknown argument " + a);
  }
  spdlog::set_level(spdlog::level::warn);
  if (!serve_pki.empty()) return serve(serve_pki);
  if (pki.empty()) die("usage: tls-bench --pki DIR [--mib N] [--repeats N] [--handshakes N] [--idle N]");

  // The receiver process, talking over a pipe pair: its stdout gives READY, its stdin
  // closing stops it.
  int to_child[2], from_child[2];
  if (::pipe(to_child) != 0 || ::pipe(from_child) != 0) die("pipe");
  pid_t child = ::fork();
  if (child < 0) die("fork");
  if (child == 0) {
    ::dup2(to_child[0], 0);
    ::dup2(from_child[1], 1);
    ::close(to_child[1]);
    ::close(from_child[0]);
    ::execl("/proc/self/exe", argv[0], "--serve", pki.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  ::close(to_child[0]);
  ::close(from_child[1]);
  FILE* in = ::fdopen(from_child[0], "r");
  int pid = 0;
  unsigned plain_port = 0, tls_port = 0;
  if (std::fscanf(in, "READY %d %u %u", &pid, &plain_port, &tls_port) != 3) die("the receiver did not start");

  ConnectionOptions plain_opts;
  ConnectionOptions tls_opts;
  tls_opts.tls = load(TlsConfig::Role::client, files(pki, "client-a"));

  // 1. throughput, alternating so drift hits both alike.
  auto payloads = make_payloads();
  std::vector<double> plain_s, tls_s, plain_cpu, tls_cpu;  // cpu: both processes, seconds
  (void)send_change_set(static_cast<std::uint16_t>(plain_port), plain_opts, 32, payloads);  // warm-up
  (void)send_change_set(static_cast<std::uint16_t>(tls_port), tls_opts, 32, payloads);
  for (std::size_t r = 0; r < repeats; ++r) {
    double c0 = cpu_self() + cpu_of(pid);
    plain_s.push_back(send_change_set(static_cast<std::uint16_t>(plain_port), plain_opts, mib, payloads));
    double c1 = cpu_self() + cpu_of(pid);
    tls_s.push_back(send_change_set(static_cast<std::uint16_t>(tls_port), tls_opts, mib, payloads));
    double c2 = cpu_self() + cpu_of(pid);
    plain_cpu.push_back(c1 - c0);
    tls_cpu.push_back(c2 - c1);
  }
  double plain_med = median(plain_s), tls_med = median(tls_s);
  double ratio = tls_med / plain_med;

  // 2. handshakes: connect + one echo (the server has then verified us).
  std::vector<double> hs_ms;
  for (std::size_t i = 0; i < handshakes; ++i) {
    auto t0 = Clock::now();
    auto conn = Connection::connect(Endpoint{"127.0.0.1", static_cast<std::uint16_t>(tls_port)}, tls_opts);
    if (!conn.is_ok()) die(conn.status().to_string());
    if (!conn.value()->send(MsgType::hello, "x").is_ok()) die("send");
    if (!conn.value()->receive(10s).is_ok()) die("echo");
    hs_ms.push_back(seconds_since(t0) * 1000);
  }

  // 3. receiver RSS with `idle` TLS connections open.
  std::this_thread::sleep_for(200ms);  // the handshake connections' handlers end
  std::size_t rss_before = rss_kib(pid);
  std::vector<std::unique_ptr<Connection>> idle_conns;
  for (std::size_t i = 0; i < idle; ++i) {
    auto conn = Connection::connect(Endpoint{"127.0.0.1", static_cast<std::uint16_t>(tls_port)}, tls_opts);
    if (!conn.is_ok()) die(conn.status().to_string());
    if (!conn.value()->send(MsgType::hello, "x").is_ok() || !conn.value()->receive(10s).is_ok())
      die("idle connection " + std::to_string(i));
    idle_conns.push_back(std::move(conn).value());
  }
  std::this_thread::sleep_for(300ms);
  std::size_t rss_idle = rss_kib(pid);
  idle_conns.clear();

  ::close(to_child[1]);
  int status = 0;
  ::waitpid(child, &status, 0);

  double mib_f = static_cast<double>(mib);
  std::printf("change set %zu MiB in 64 KiB frames, loopback, median of %zu\n", mib, repeats);
  std::printf("  plaintext   %.3f s  %.0f MiB/s   CPU (both ends) %.3f s\n", plain_med,
              mib_f / plain_med, median(plain_cpu));
  std::printf("  mutual TLS  %.3f s  %.0f MiB/s   CPU (both ends) %.3f s\n", tls_med, mib_f / tls_med,
              median(tls_cpu));
  std::printf("  ratio TLS/plaintext %.3f   target <= 1.10\n", ratio);
  std::printf("handshake (connect + TLS 1.3 + one echo), %zu: median %.2f ms, p99 %.2f ms\n",
              handshakes, median(hs_ms), percentile(hs_ms, 0.99));
  std::printf("receiver RSS: %zu KiB before, %zu KiB with %zu idle TLS connections (%.1f KiB each)\n",
              rss_before, rss_idle, idle,
              static_cast<double>(rss_idle - std::min(rss_idle, rss_before)) / static_cast<double>(std::max<std::size_t>(idle, 1)));
  std::printf(
      "JSON {\"bench\":\"tls\",\"change_set_mib\":%zu,\"repeats\":%zu,\"plain_s\":%.4f,\"tls_s\":%.4f,"
      "\"ratio\":%.4f,\"plain_cpu_s\":%.4f,\"tls_cpu_s\":%.4f,\"handshakes\":%zu,\"handshake_median_ms\":%.3f,\"handshake_p99_ms\":%.3f,"
      "\"idle_connections\":%zu,\"receiver_rss_before_kib\":%zu,\"receiver_rss_idle_kib\":%zu}\n",
      mib, repeats, plain_med, tls_med, ratio, median(plain_cpu), median(tls_cpu), handshakes, median(hs_ms), percentile(hs_ms, 0.99),
      idle, rss_before, rss_idle);
  return 0;
}
