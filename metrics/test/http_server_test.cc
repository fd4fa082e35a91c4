// The HTTP server against real sockets (POSIX clients, loopback).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <map>
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

TEST_CASE("route templates match one non-empty segment per {name}", "[http]") {
  std::map<std::string, std::string> p;
  CHECK(match_route("/v1/status", "/v1/status", &p));
  CHECK(p.empty());
  CHECK_FALSE(match_route("/v1/status", "/v1/status/", &p));
  CHECK(match_route("/v1/groups/{group}/points", "/v1/groups/vm1/points", &p));
  CHECK(p.at("group") == "vm1");
  CHECK_FALSE(match_route("/v1/groups/{group}/points", "/v1/groups//points", &p));
  CHECK_FALSE(match_route("/v1/groups/{group}", "/v1/groups/a/b", &p));
  CHECK_FALSE(match_route("/v1/groups/{group}", "/v1/groups/", &p));
  CHECK_FALSE(match_route("/v1/groups/{group}/points", "/v1/groups/vm1/pointsx", &p));
  CHECK(match_route("/v1/jobs/{id}", "/v1/jobs/j1-2", &p));
  CHECK(p.at("id") == "j1-2");
}

TEST_CASE("templates route by method; JSON errors for 404 and 405", "[http]") {
  std::vector<Route> routes;
  routes.push_back({"GET", "/v1/groups/{group}", [](const HttpRequest& r) {
                      return HttpResponse{200, "application/json", "{\"g\":\"" + r.params.at("group") + "\"}"};
                    }});
  routes.push_back({"POST", "/v1/groups/{group}", [](const HttpRequest& r) {
                      return HttpResponse{202, "application/json", r.body};
                    }});
  HttpLimits limits;
  limits.json_errors = true;
  limits.max_body_bytes = 64;
  auto s = HttpServer::start("127.0.0.1", 0, std::move(routes), limits);
  REQUIRE(s.is_ok());
  const auto port = (*s)->port();
  const std::string got = exchange(port, "GET /v1/groups/web1 HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(got.find("200 OK") != std::string::npos);
  CHECK(got.find("{\"g\":\"web1\"}") != std::string::npos);
  const std::string posted = exchange(port, "POST /v1/groups/web1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}");
  CHECK(posted.find("202 Accepted") != std::string::npos);
  const std::string nf = exchange(port, "GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(nf.find("404 Not Found") != std::string::npos);
  CHECK(nf.find("application/json") != std::string::npos);
  CHECK(nf.find("{\"error\": \"no such path: /v1/nothing\", \"status\": 404}") != std::string::npos);
  const std::string bad = exchange(port, "PUT /v1/groups/web1 HTTP/1.1\r\nHost: x\r\n\r\n");
  CHECK(bad.find("405 Method Not Allowed") != std::string::npos);
  CHECK(bad.find("Allow: GET, POST") != std::string::npos);
  CHECK(bad.find("\"status\": 405") != std::string::npos);
  const std::string big_request =
      "POST /v1/groups/web1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + std::string(1000, 'x');
  const std::string big = ::exchange(port, big_request);
  CHECK(big.find("413 Payload Too Large") != std::string::npos);
  CHECK(big.find("\"status\": 413") != std::string::npos);
}
