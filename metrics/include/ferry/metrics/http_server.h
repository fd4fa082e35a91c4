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
//
// With a TlsConfig (server role) every connection is TLS 1.3 first (the handshake within
// read_timeout) and the request carries the client's verified identity; a client without a
// certificate is admitted with none, so that the handler answers it (the management API: 401)
// rather than the handshake failing without a word.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/transport/tls.h"

namespace ferry::metrics {

struct HttpLimits {
  std::size_t max_connections = 16;
  std::size_t max_header_bytes = 8192;
  std::size_t max_body_bytes = 64u << 10;
  std::chrono::milliseconds read_timeout{5000};
  std::chrono::milliseconds write_timeout{10000};
  // The server's own errors (404, 405, 408, 413, ...) as {"error": "...", "status": N}
  // (application/json, the management API) rather than one line of text.
  bool json_errors = false;
};

struct HttpRequest {
  std::string method;  // "GET"
  std::string path;    // the target without its query
  std::string query;   // after '?', may be empty
  std::string body;
  std::map<std::string, std::string> params;  // the route's {name} segments, by name
  bool tls = false;                            // the connection is TLS
  std::optional<transport::PeerIdentity> peer; // TLS: the client's verified identity, if any
};

struct HttpResponse {
  unsigned status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  std::string allow;  // the Allow header (a 405), empty: none
};

struct Route {
  std::string method;  // "GET", "POST", ...
  // Exact match, or a template whose "{name}" segments each match one non-empty segment
  // ("/v1/groups/{group}/points"); at most one route may match a path per method.
  std::string path;
  std::function<HttpResponse(const HttpRequest&)> handler;
};

// Whether `path` matches the route template `pattern`; fills `params` when it does. Pure.
bool match_route(const std::string& pattern, const std::string& path,
                 std::map<std::string, std::string>* params);

class HttpServer {
 public:
  // Listens on host:port (an IP address or "localhost"; port 0 picks one) and serves until
  // destroyed. Fails (Errc::invalid_argument or io) naming the address when it cannot bind.
  static Result<std::unique_ptr<HttpServer>> start(const std::string& host, std::uint16_t port,
                                                   std::vector<Route> routes, HttpLimits limits = {},
                                                   std::shared_ptr<const transport::TlsConfig> tls = nullptr);
  ~HttpServer();
  std::uint16_t port() const;

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::metrics
