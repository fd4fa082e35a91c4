// tcp-limit: loopback TCP throughput between two threads of one process (one sender, one
// receiver, one core each at best), with the buffer size Ferry's frames use. The ceiling for any
// tool that moves bytes over a TCP socket on this machine. Prints one JSON object.
//
// Across a link (bench/run --links: two network namespaces and a shaped veth pair) it runs as
// two processes: `--listen ADDR:PORT` accepts one connection, reads to EOF and prints what it
// received (bytes, seconds from the first byte to EOF, Gbit/s); `--connect ADDR:PORT` sends for
// --seconds and prints what it sent.
//
//   tcp-limit [--seconds 3] [--buffer-kib 256] [--listen ADDR:PORT | --connect ADDR:PORT]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {
using Clock = std::chrono::steady_clock;

bool parse_endpoint(const std::string& s, sockaddr_in& a) {
  auto colon = s.rfind(':');
  if (colon == std::string::npos) return false;
  a = {};
  a.sin_family = AF_INET;
  a.sin_port = htons(std::uint16_t(std::strtoul(s.c_str() + colon + 1, nullptr, 10)));
  return ::inet_pton(AF_INET, s.substr(0, colon).c_str(), &a.sin_addr) == 1 && a.sin_port != 0;
}

int listen_side(const sockaddr_in& a, std::size_t buf_bytes) {
  int ls = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(ls, (const sockaddr*)&a, sizeof a) || ::listen(ls, 1)) { std::perror("listen"); return 1; }
  std::printf("{\"listening\": true}\n");
  std::fflush(stdout);
  int c = ::accept(ls, nullptr, nullptr);
  if (c < 0) { std::perror("accept"); return 1; }
  std::vector<char> buf(buf_bytes);
  unsigned long long received = 0;
  Clock::time_point t0{};
  ssize_t r;
  while ((r = ::read(c, buf.data(), buf.size())) > 0) {
    if (received == 0) t0 = Clock::now();
    received += std::size_t(r);
  }
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  ::close(c);
  ::close(ls);
  std::printf("{\"received_bytes\": %llu, \"seconds\": %.3f, \"gbit_s\": %.4f}\n", received, secs,
              secs > 0 ? double(received) * 8 / secs / 1e9 : 0.0);
  return 0;
}

int connect_side(const sockaddr_in& a, std::size_t buf_bytes, double seconds) {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  if (::connect(s, (const sockaddr*)&a, sizeof a)) { std::perror("connect"); return 1; }
  std::vector<char> buf(buf_bytes);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = char(i * 2654435761u >> 13);
  auto t0 = Clock::now();
  unsigned long long sent = 0;
  double secs = 0;
  while (secs < seconds) {
    ssize_t w = ::write(s, buf.data(), buf.size());
    if (w <= 0) { std::perror("write"); return 1; }
    sent += std::size_t(w);
    secs = std::chrono::duration<double>(Clock::now() - t0).count();
  }
  ::close(s);
  std::printf("{\"sent_bytes\": %llu, \"seconds\": %.3f}\n", sent, secs);
  return 0;
}
}  // namespace

int main(int argc, char** argv) {
  double seconds = 3;
  std::size_t buf_bytes = 256 << 10;
  std::string listen_at, connect_to;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--seconds") seconds = std::atof(argv[i + 1]);
    else if (k == "--buffer-kib") buf_bytes = std::strtoul(argv[i + 1], nullptr, 10) << 10;
    else if (k == "--listen") listen_at = argv[i + 1];
    else if (k == "--connect") connect_to = argv[i + 1];
    else { std::fprintf(stderr, "unknown option %s\n", k.c_str()); return 2; }
  }
  if (!listen_at.empty() || !connect_to.empty()) {
    sockaddr_in ep;
    const std::string& s = listen_at.empty() ? connect_to : listen_at;
    if (!parse_endpoint(s, ep)) { std::fprintf(stderr, "bad endpoint %s (want IPv4:PORT)\n", s.c_str()); return 2; }
    return listen_at.empty() ? connect_side(ep, buf_bytes, seconds) : listen_side(ep, buf_bytes);
  }
  int ls = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  if (::bind(ls, (sockaddr*)&a, sizeof a) || ::listen(ls, 1) || ::getsockname(ls, (sockaddr*)&a, &alen)) {
    std::perror("listen");
    return 1;
  }
  std::atomic<unsigned long long> received{0};
  std::thread rx([&] {
    int c = ::accept(ls, nullptr, nullptr);
    std::vector<char> buf(buf_bytes);
    ssize_t r;
    while ((r = ::read(c, buf.data(), buf.size())) > 0) received += r;
    ::close(c);
  });
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  ::setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (::connect(s, (sockaddr*)&a, sizeof a)) { std::perror("connect"); return 1; }
  std::vector<char> buf(buf_bytes);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = char(i * 2654435761u >> 13);
  auto t0 = Clock::now();
  unsigned long long sent = 0;
  double secs = 0;
  while (secs < seconds) {
    std::size_t off = 0;
    while (off < buf.size()) {
      ssize_t w = ::write(s, buf.data() + off, buf.size() - off);
      if (w <= 0) { std::perror("write"); return 1; }
      off += std::size_t(w);
    }
    sent += buf.size();
    secs = std::chrono::duration<double>(Clock::now() - t0).count();
  }
  ::shutdown(s, SHUT_WR);
  rx.join();
  secs = std::chrono::duration<double>(Clock::now() - t0).count();
  ::close(s);
  std::printf("{\"tcp_loopback_gb_s\": %.3f, \"bytes\": %llu, \"seconds\": %.3f, \"buffer_bytes\": %zu}\n",
              double(received.load()) / secs / 1e9, received.load(), secs, buf_bytes);
  return 0;
}
