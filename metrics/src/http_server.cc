// The HTTP server (http_server.h): Boost.Beast on one io_context thread, callbacks, one
// request per connection. Every wait has a deadline (tcp_stream::expires_after), every read
// a byte bound (the parser's header and body limits), and the number of connections a cap.
#include <utility>  // before Asio (GCC 12)

#include "ferry/metrics/http_server.h"

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <optional>
#include <thread>

#include "ferry/base/log.h"

namespace ferry::metrics {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using boost::system::error_code;

// After the response, what the client still sends is read and dropped for this long (at most
// kLingerBytes), so that closing with unread bytes does not reset the connection before the
// client read the status (a refused huge header, say).
constexpr std::chrono::milliseconds kLinger{1000};
constexpr std::size_t kLingerBytes = 1u << 20;

HttpResponse text_error(unsigned status, std::string body) {
  return {status, "text/plain; charset=utf-8", std::move(body) + "\n"};
}

// {"error": "...", "status": N}; the message is ours, so escaping '"', '\\' and controls is all.
HttpResponse json_error(unsigned status, const std::string& message) {
  std::string out = "{\"error\": \"";
  for (const char c : message) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += ' ';
      continue;
    }
    out += c;
  }
  out += "\", \"status\": " + std::to_string(status) + "}\n";
  return {status, "application/json", std::move(out)};
}

}  // namespace

struct HttpServer::Impl {
  // Declared before io: sessions that io's destructor frees still count themselves out.
  std::vector<Route> routes;
  HttpLimits limits;
  std::shared_ptr<const transport::TlsConfig> tls;  // null: plaintext
  std::size_t active = 0;  // sessions alive; touched on the io thread only
  asio::io_context io;
  tcp::acceptor acceptor{io};
  asio::steady_timer retry{io};
  std::thread thread;

  void accept();
  HttpResponse dispatch(const HttpRequest& req) const;
  HttpResponse plain(unsigned status, std::string body) const {
    return limits.json_errors ? json_error(status, body) : text_error(status, std::move(body));
  }
};

namespace {

template <class Stream>
class Session : public std::enable_shared_from_this<Session<Stream>> {
 public:
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;

  template <class... A>
  Session(HttpServer::Impl& impl, A&&... stream_args)
      : impl_(impl), stream_(std::forward<A>(stream_args)...),
        read_deadline_(stream_.get_executor()) {
    ++impl_.active;
  }
  ~Session() { --impl_.active; }

  void start(bool over_limit) {
    // The deadline covers the handshake and the request; it cancels the socket's operations
    // rather than closing it (as tcp_stream's own timeout would), so the client gets its 408.
    read_deadline_.expires_after(impl_.limits.read_timeout);
    read_deadline_.async_wait([self = this->shared_from_this()](error_code ec) {
      if (ec) return;  // cancelled: the request arrived in time
      self->timed_out_ = true;
      error_code ignored;
      beast::get_lowest_layer(self->stream_).socket().cancel(ignored);
    });
    if constexpr (kTls) {
      // A client without a certificate completes the handshake with no identity; the
      // handler refuses it (401). A presented certificate must still verify.
      SSL* ssl = stream_.native_handle();
      SSL_set_verify(ssl, SSL_VERIFY_PEER, nullptr);
      stream_.async_handshake(asio::ssl::stream_base::server,
                              [self = this->shared_from_this(), over_limit](error_code ec) {
                                if (ec) {
                                  self->read_deadline_.cancel();
                                  return;  // nothing to answer over a failed handshake
                                }
                                self->read(over_limit);
                              });
    } else {
      read(over_limit);
    }
  }

 private:
  void read(bool over_limit) {
    if (over_limit) {
      read_deadline_.cancel();
      return respond(impl_.plain(503, "too many connections"));
    }
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(impl_.limits.max_header_bytes));
    parser_->body_limit(impl_.limits.max_body_bytes);
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](error_code ec, std::size_t) { self->on_read(ec); });
  }

  void on_read(error_code ec) {
    read_deadline_.cancel();
    if (timed_out_) return respond(impl_.plain(408, "request not complete in time"));
    if (ec == http::error::header_limit) return respond(impl_.plain(431, "request header fields too large"));
    if (ec == http::error::body_limit) return respond(impl_.plain(413, "request body too large"));
    if (ec == http::error::end_of_stream || ec == asio::error::connection_reset) return;
    if (ec) return respond(impl_.plain(400, "bad request: " + ec.message()));
    request_read_ = true;
    const auto& m = parser_->get();
    HttpRequest req;
    req.method = std::string(m.method_string());
    const std::string target(m.target());
    const auto q = target.find('?');
    req.path = target.substr(0, q);
    if (q != std::string::npos) req.query = target.substr(q + 1);
    req.body = m.body();
    if constexpr (kTls) {
      req.tls = true;
      req.peer = transport::verified_peer(stream_.native_handle());
    }
    respond(impl_.dispatch(req));
  }

  void respond(HttpResponse r) {
    res_.emplace(static_cast<http::status>(r.status), 11);
    res_->set(http::field::server, "ferry");
    res_->set(http::field::content_type, r.content_type);
    if (!r.allow.empty()) res_->set(http::field::allow, r.allow);
    res_->keep_alive(false);
    res_->body() = std::move(r.body);
    res_->prepare_payload();
    beast::get_lowest_layer(stream_).expires_after(impl_.limits.write_timeout);
    http::async_write(stream_, *res_, [self = this->shared_from_this()](error_code ec, std::size_t) {
      if (ec) return;
      if constexpr (kTls) {
        beast::get_lowest_layer(self->stream_).expires_after(kLinger);
        // A refused request (413, 431, 408) may still be arriving: drop it for a while, as
        // below, so that the client reads its status before the socket closes. Otherwise
        // close_notify, then the socket is closed when the session goes.
        if (self->request_read_) self->stream_.async_shutdown([self](error_code) {});
        else self->linger();
      } else {
        error_code ignored;
        self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
        self->stream_.expires_after(kLinger);
        self->linger();
      }
    });
  }

  void linger() {
    stream_.async_read_some(asio::buffer(drain_), [self = this->shared_from_this()](error_code ec, std::size_t n) {
      self->drained_ += n;
      if (!ec && self->drained_ < kLingerBytes) self->linger();
    });
  }

  HttpServer::Impl& impl_;
  Stream stream_;
  asio::steady_timer read_deadline_;
  bool timed_out_ = false;
  bool request_read_ = false;  // the whole request arrived (nothing left to drain)
  beast::flat_buffer buffer_{8192};
  std::optional<http::request_parser<http::string_body>> parser_;
  std::optional<http::response<http::string_body>> res_;
  char drain_[4096];
  std::size_t drained_ = 0;
};

}  // namespace

bool match_route(const std::string& pattern, const std::string& path,
                 std::map<std::string, std::string>* params) {
  std::size_t i = 0, j = 0;
  std::map<std::string, std::string> found;
  while (i < pattern.size() && j < path.size()) {
    if (pattern[i] == '{') {
      const auto close = pattern.find('}', i);
      FERRY_ASSERT(close != std::string::npos);
      const auto end = path.find('/', j);
      const std::string value = path.substr(j, end == std::string::npos ? std::string::npos : end - j);
      if (value.empty()) return false;
      found[pattern.substr(i + 1, close - i - 1)] = value;
      i = close + 1;
      j += value.size();
      continue;
    }
    if (pattern[i] != path[j]) return false;
    ++i;
    ++j;
  }
  if (i != pattern.size() || j != path.size()) return false;
  if (params) *params = std::move(found);
  return true;
}

HttpResponse HttpServer::Impl::dispatch(const HttpRequest& in) const {
  std::string allow;
  for (const Route& r : routes) {
    HttpRequest req = in;
    if (!match_route(r.path, in.path, &req.params)) continue;
    if (r.method == req.method) {
      try {
        return r.handler(req);
      } catch (const std::exception& e) {  // bad_alloc and the like: the service goes on
        spdlog::error("http: {} {} failed: {}", req.method, req.path, e.what());
        return plain(500, "internal error");
      }
    }
    allow += allow.empty() ? r.method : ", " + r.method;
  }
  const HttpRequest& req = in;
  if (!allow.empty()) {
    HttpResponse r = plain(405, "method " + req.method.substr(0, 32) + " not allowed on " +
                                    req.path + "; allowed: " + allow);
    r.allow = allow;
    return r;
  }
  return plain(404, "no such path: " + req.path.substr(0, 200));
}

void HttpServer::Impl::accept() {
  acceptor.async_accept([this](error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;
    if (ec) {  // EMFILE and the like: try again a little later rather than spin
      spdlog::warn("http: accept failed: {}", ec.message());
      retry.expires_after(std::chrono::milliseconds(100));
      retry.async_wait([this](error_code e) {
        if (!e) accept();
      });
      return;
    }
    const bool over = active >= limits.max_connections;
    if (tls) {
      auto& ctx = *static_cast<asio::ssl::context*>(tls->native());
      auto s = std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(*this, std::move(socket), ctx);
      s->start(over);
    } else {
      auto s = std::make_shared<Session<beast::tcp_stream>>(*this, std::move(socket));
      s->start(over);
    }
    accept();
  });
}

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() {
  impl_->io.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
}

std::uint16_t HttpServer::port() const {
  error_code ec;
  return impl_->acceptor.local_endpoint(ec).port();
}

Result<std::unique_ptr<HttpServer>> HttpServer::start(const std::string& host, std::uint16_t port,
                                                      std::vector<Route> routes, HttpLimits limits,
                                                      std::shared_ptr<const transport::TlsConfig> tls) {
  FERRY_ASSERT(limits.max_connections > 0 && limits.max_header_bytes > 0);
  error_code ec;
  const auto addr = asio::ip::make_address(host == "localhost" ? "127.0.0.1" : host, ec);
  if (ec)
    return Status::error(Errc::invalid_argument,
                         "'" + host + "' is not an IP address (or localhost): " + ec.message());
  auto impl = std::make_unique<Impl>();
  impl->routes = std::move(routes);
  impl->limits = limits;
  impl->tls = std::move(tls);
  FERRY_ASSERT(!impl->tls || impl->tls->role() == transport::TlsConfig::Role::server);
  const tcp::endpoint ep(addr, port);
  const std::string where = host + ":" + std::to_string(port);
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) impl->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Status::error(Errc::io, "cannot listen on " + where + ": " + ec.message());
  impl->accept();
  Impl* p = impl.get();
  impl->thread = std::thread([p] {
    for (;;) {
      try {
        p->io.run();
        return;
      } catch (const std::exception& e) {  // a handler threw outside dispatch: keep serving
        spdlog::error("http: {}", e.what());
      }
    }
  });
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

}  // namespace ferry::metrics
