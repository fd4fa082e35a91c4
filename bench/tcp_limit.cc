// tcp-limit: loopback TCP throughput between two threads of one process (one sender, one
// receiver, one core each at best), with the buffer size Ferry's frames use. The ceiling for any
// tool that moves bytes over a TCP socket on this machine. Prints one JSON object.
//
//   tcp-limit [--seconds 3] [--buffer-kib 256]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
  double seconds = 3;
  std::size_t buf_bytes = 256 << 10;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i];
    if (k == "--seconds") seconds = std::atof(argv[i + 1]);
    else if (k == "--buffer-kib") buf_bytes = std::strtoul(argv[i + 1], nullptr, 10) << 10;
    else { std::fprintf(stderr, "unknown option %s\n", k.c_str()); return 2; }
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
  using Clock = std::chrono::steady_clock;
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
