// A small HTTP/1.1 server (Boost.Beast) with a route table, for /metrics and, later, the
// management API. One thread of its own runs every connection; handlers run on it and must
// be quick (render a document, never wait for an RP).
//
// Bounded so that a slow or bad client cannot hurt the service: at most max_connections at
// once (more get 503 and are closed), a request's header at most max_header_bytes (431) and
// its body at most max_body_bytes (413), the whole request read within read_timeout (else
// the connection is closed: a client trickling bytes holds a slot for that long at most), and
// the response written within write_timeout. Unknown path: 404; a known path with another
// method: 405 with Allow. One request per connection (Connection: close).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::metrics {

struct HttpLimits {
  std::size_t max_connections = 16;
  std::size_t max_header_bytes = 8192;
  std::size_t max_body_bytes = 64u << 10;
  std::chrono::milliseconds read_timeout{5000};
  std::chrono::milliseconds write_timeout{10000};
};

struct HttpRequest {
  std::string method;  // "GET"
  std::string path;    // the target without its query
  std::string query;   // after '?', may be empty
  std::string body;
};

struct HttpResponse {
  unsigned status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  std::string allow;  // the Allow header (a 405), empty: none
};

struct Route {
  std::string method;  // "GET", "POST", ...
  std::string path;    // exact match
  std::function<HttpResponse(const HttpRequest&)> handler;
};

class HttpServer {
 public:
  // Listens on host:port (an IP address or "localhost"; port 0 picks one) and serves until
  // destroyed. Fails (Errc::invalid_argument or io) naming the address when it cannot bind.
  static Result<std::unique_ptr<HttpServer>> start(const std::string& host, std::uint16_t port,
                                                   std::vector<Route> routes, HttpLimits limits = {});
  ~HttpServer();
  std::uint16_t port() const;

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::metrics
