// The HTTP server against real sockets (POSIX clients, loopback).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <string>
#include <thread>

#include "ferry/metrics/http_server.h"

using namespace ferry::metrics;

namespace {

int connect_to(std::uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  return fd;
}

std::string read_all(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, std::size_t(n));
  }
  return out;
}

std::string exchange(std::uint16_t port, const std::string& request) {
  int fd = connect_to(port);
  std::size_t at = 0;
  while (at < request.size()) {
    ssize_t n = ::send(fd, request.data() + at, request.size() - at, MSG_NOSIGNAL);
    if (n <= 0) break;
    at += std::size_t(n);
  }
  std::string reply = read_all(fd);
  ::close(fd);
  return reply;
}

std::unique_ptr<HttpServer> server(HttpLimits limits = {}) {
  std::vector<Route> routes;
  routes.push_back({"GET", "/metrics", [](const HttpRequest&) {
                      return HttpResponse{200, "text/plain; version=0.0.4", "ferry_up 1\n"};
                    }});
  auto s = HttpServer::start("127.0.0.1", 0, std::move(routes), limits);
  REQUIRE(s.is_ok());
  return std::move(s).value();
}

}  // namespace

TEST_CASE("GET /metrics: 200 with the body; unknown path 404; other method 405 with Allow") {
  auto s = server();
  std::string ok = exchange(s->port(), "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(ok.rfind("HTTP/1.1 200", 0) == 0);
  CHECK(ok.find("ferry_up 1\n") != std::string::npos);
  CHECK(exchange(s->port(), "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").rfind("HTTP/1.1 404", 0) == 0);
  std::string post = exchange(s->port(), "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
  CHECK(post.rfind("HTTP/1.1 405", 0) == 0);
  CHECK(post.find("Allow: GET") != std::string::npos);
  CHECK(exchange(s->port(), "garbage\r\n\r\n").rfind("HTTP/1.1 400", 0) == 0);
}

TEST_CASE("a huge header gets 431, a huge body 413") {
  auto s = server();
  std::string big = "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(64 << 10, 'a') + "\r\n\r\n";
  CHECK(exchange(s->port(), big).rfind("HTTP/1.1 431", 0) == 0);
  std::string body(128 << 10, 'b');
  std::string post = "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body.size()) +
                     "\r\n\r\n" + body;
  CHECK(exchange(s->port(), post).rfind("HTTP/1.1 413", 0) == 0);
}

TEST_CASE("slow clients time out and the connection cap answers 503; the server serves on") {
  HttpLimits l;
  l.max_connections = 2;
  l.read_timeout = std::chrono::milliseconds(500);
  auto s = server(l);
  int a = connect_to(s->port());
  int b = connect_to(s->port());
  (void)::send(a, "GET /met", 8, MSG_NOSIGNAL);  // and then nothing
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  CHECK(exchange(s->port(), "GET /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 503", 0) == 0);
  CHECK(read_all(a).rfind("HTTP/1.1 408", 0) == 0);  // after the read timeout
  ::close(a);
  ::close(b);
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  CHECK(exchange(s->port(), "GET /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 200", 0) == 0);
}

TEST_CASE("a bad address is refused with its reason") {
  auto s = HttpServer::start("not-an-ip", 0, {});
  REQUIRE_FALSE(s.is_ok());
  CHECK(s.status().message().find("not-an-ip") != std::string::npos);
}
