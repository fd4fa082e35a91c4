// The server of connection.h: accepts, bounds handshakes and connections per address and in
// total, runs a thread per admitted connection (connection.cc's header comment says how
// connections work; core.h holds what both share).
#include "core.h"

#include <list>
#include <map>
#include <thread>

namespace ferry::transport {

using namespace conn_detail;

namespace {

// --- server ----------------------------------------------------------------------------

// At most kBurst lines per window, then one line saying how many were suppressed: a flood of
// bad peers must not flood the log. I/O thread only.
class RateLimitedLog {
 public:
  template <class... Args>
  void warn(fmt::format_string<Args...> format, Args&&... args) {
    Clock::time_point now = Clock::now();
    if (now - window_start_ >= kWindow) {
      if (suppressed_ > 0)
        spdlog::warn("transport: {} similar warnings suppressed in the last {} s", suppressed_,
                     std::chrono::duration_cast<std::chrono::seconds>(kWindow).count());
      window_start_ = now;
      lines_ = 0;
      suppressed_ = 0;
    }
    if (lines_ >= kBurst) {
      ++suppressed_;
      return;
    }
    ++lines_;
    spdlog::warn(format, std::forward<Args>(args)...);
  }

 private:
  static constexpr std::chrono::seconds kWindow{10};
  static constexpr int kBurst = 20;
  Clock::time_point window_start_{};
  int lines_ = 0;
  std::uint64_t suppressed_ = 0;
};

class TcpServer final : public Server {
 public:
  static Result<std::unique_ptr<Server>> open(const Endpoint& at, const ServerOptions& options,
                                              Handler handler);
  ~TcpServer() override { stop(); }
  std::uint16_t port() const override { return port_; }
  void set_tls(std::shared_ptr<const TlsConfig> tls) override {
    FERRY_ASSERT(tls && tls->role() == TlsConfig::Role::server);
    FERRY_ASSERT_MSG(options_.connection.tls, "set_tls on a plaintext server");
    std::lock_guard lock(tls_mu_);
    tls_ = std::move(tls);
  }
  void stop() override;

 private:
  struct Session {
    std::shared_ptr<Core> core;
    std::thread thread;
    std::atomic<bool> done{false};
    std::optional<asio::ip::address> counted;  // TLS: its place in per_address_
  };
  // A TLS handshake in flight (I/O thread only).
  struct Handshake {
    std::unique_ptr<TlsStream> stream;
    std::shared_ptr<const TlsConfig> config;
    asio::steady_timer timer;
    std::string peer;
    asio::ip::address address;
    bool timed_out = false;
  };

  TcpServer(const ServerOptions& options, Handler handler)
      : work_(asio::make_work_guard(io_)), acceptor_(io_), retry_timer_(io_),
        options_(options), handler_(std::move(handler)), tls_(options.connection.tls) {}
  Status bind(const Endpoint& at);
  void accept_next();
  void on_accept(const boost::system::error_code& ec, tcp::socket socket);
  void admit(tcp::socket socket);
  void start_handshake(tcp::socket socket);
  void on_handshake(const std::shared_ptr<Handshake>& hs, const boost::system::error_code& ec);
  void start_session_locked(Stream stream, std::string peer, std::optional<PeerIdentity> identity,
                            std::optional<asio::ip::address> counted);
  void release_address_locked(const asio::ip::address& address);
  void reap_finished_locked();
  void run_handler(Session& session);

  asio::io_context io_;  // declared first: destroyed last
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  tcp::acceptor acceptor_;
  asio::steady_timer retry_timer_;
  const ServerOptions options_;
  const Handler handler_;
  std::uint16_t port_ = 0;
  std::string name_;  // the bound address, for logs
  std::thread io_thread_;

  std::mutex mu_;
  bool stopping_ = false;                         // guarded by mu_
  std::list<std::unique_ptr<Session>> sessions_;  // guarded by mu_
  // TLS: handshakes in flight and connections (handshaking or admitted) per address.
  std::size_t handshaking_ = 0;                            // guarded by mu_
  std::map<asio::ip::address, std::size_t> per_address_;  // guarded by mu_
  bool accept_paused_ = false;  // I/O thread only: max_handshakes in flight
  RateLimitedLog refusals_;     // I/O thread only

  std::mutex tls_mu_;
  std::shared_ptr<const TlsConfig> tls_;  // guarded by tls_mu_; the config of new handshakes
};

Status TcpServer::bind(const Endpoint& at) {
  boost::system::error_code ec;
  tcp::resolver resolver(io_);
  auto eps = resolver.resolve(at.host, std::to_string(at.port),
                              tcp::resolver::numeric_service | tcp::resolver::passive, ec);
  if (ec) return status_from_asio(ec, "listen on " + at.to_string());
  if (eps.empty()) return Status::error(Errc::not_found, "listen on " + at.to_string() + ": no address");
  tcp::endpoint ep = eps.begin()->endpoint();
  std::string what = "listen on " + at.to_string();
  if (acceptor_.open(ep.protocol(), ec)) return status_from_asio(ec, what);
  if (acceptor_.set_option(tcp::acceptor::reuse_address(true), ec)) return status_from_asio(ec, what);
  if (acceptor_.bind(ep, ec)) return status_from_asio(ec, what);
  if (acceptor_.listen(asio::socket_base::max_listen_connections, ec)) return status_from_asio(ec, what);
  tcp::endpoint bound = acceptor_.local_endpoint(ec);
  if (ec) return status_from_asio(ec, what);
  port_ = bound.port();
  name_ = endpoint_text(bound);
  return Status::ok();
}

Result<std::unique_ptr<Server>> TcpServer::open(const Endpoint& at, const ServerOptions& options,
                                                Handler handler) {
  FERRY_ASSERT(handler);
  FERRY_ASSERT(options.max_connections > 0);
  FERRY_ASSERT(options.max_connections_per_address > 0 && options.max_handshakes > 0);
  FERRY_ASSERT(!options.connection.tls || options.connection.tls->role() == TlsConfig::Role::server);
  std::unique_ptr<TcpServer> server(new TcpServer(options, std::move(handler)));
  FERRY_TRY(server->bind(at));
  server->accept_next();
  server->io_thread_ = std::thread([io = &server->io_] { io->run(); });
  spdlog::info("transport: listening on {}", server->name_);
  return std::unique_ptr<Server>(std::move(server));
}

void TcpServer::accept_next() {
  acceptor_.async_accept([this](const boost::system::error_code& ec, tcp::socket socket) {
    on_accept(ec, std::move(socket));
  });
}

void TcpServer::on_accept(const boost::system::error_code& ec, tcp::socket socket) {
  if (ec == asio::error::operation_aborted || !acceptor_.is_open()) return;  // stop()
  if (ec) {
    // EMFILE and friends: wait a little instead of spinning on a failing accept.
    spdlog::warn("transport: accept on {}: {}", name_, ec.message());
    retry_timer_.expires_after(milliseconds(100));
    retry_timer_.async_wait([this](const boost::system::error_code& tec) {
      if (!tec) accept_next();
    });
    return;
  }
  if (options_.connection.tls) {
    start_handshake(std::move(socket));
    std::lock_guard lock(mu_);
    // Full: leave further peers in the kernel's backlog until a handshake ends.
    if (handshaking_ >= options_.max_handshakes) {
      accept_paused_ = true;
      return;
    }
  } else {
    admit(std::move(socket));
  }
  accept_next();
}

void TcpServer::start_handshake(tcp::socket socket) {
  boost::system::error_code ec;
  tcp::endpoint remote = socket.remote_endpoint(ec);
  if (ec) return;  // already gone
  std::string peer = endpoint_text(remote);
  asio::ip::address address = remote.address();
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    reap_finished_locked();
    if (sessions_.size() + handshaking_ >= options_.max_connections) {
      refusals_.warn("transport: refusing {} on {}: {} connections open (max_connections)", peer,
                     name_, sessions_.size() + handshaking_);
      return;  // `socket` closes as it goes out of scope
    }
    std::size_t& from_address = per_address_[address];
    if (from_address >= options_.max_connections_per_address) {
      refusals_.warn("transport: refusing {} on {}: {} connections from {} "
                     "(max_connections_per_address)", peer, name_, from_address,
                     address.to_string());
      return;
    }
    ++from_address;
    ++handshaking_;
  }
  std::shared_ptr<const TlsConfig> config;
  {
    std::lock_guard lock(tls_mu_);
    config = tls_;
  }
  tune_socket(socket, options_.connection, peer);
  auto hs = std::make_shared<Handshake>(Handshake{
      std::make_unique<TlsStream>(std::move(socket), tls_detail::context_of(*config)), config,
      asio::steady_timer(io_), std::move(peer), address});
  // A peer that never finishes is dropped: closing the socket fails the handshake.
  hs->timer.expires_after(options_.connection.handshake_timeout);
  hs->timer.async_wait([hs](const boost::system::error_code& tec) {
    if (tec) return;
    hs->timed_out = true;
    boost::system::error_code ignored;
    hs->stream->next_layer().close(ignored);
  });
  hs->stream->async_handshake(asio::ssl::stream_base::server,
                              [this, hs](const boost::system::error_code& hec) {
                                hs->timer.cancel();
                                on_handshake(hs, hec);
                              });
}

void TcpServer::on_handshake(const std::shared_ptr<Handshake>& hs,
                             const boost::system::error_code& ec) {
  bool resume = false;
  std::lock_guard lock(mu_);
  FERRY_ASSERT(handshaking_ > 0);
  --handshaking_;
  if (accept_paused_ && handshaking_ < options_.max_handshakes && !stopping_) {
    accept_paused_ = false;
    resume = true;
  }
  if (resume) asio::post(io_, [this] { accept_next(); });
  if (ec || stopping_) {
    release_address_locked(hs->address);
    if (stopping_) return;
    std::string cause = hs->timed_out
                            ? fmt::format("no TLS handshake within {} ms",
                                          options_.connection.handshake_timeout.count())
                            : describe_tls_error(ec, hs->stream->native_handle());
    ERR_clear_error();
    refusals_.warn("transport: TLS handshake from {} on {} failed: {}", hs->peer, name_, cause);
    return;
  }
  X509* cert = SSL_get0_peer_certificate(hs->stream->native_handle());
  FERRY_ASSERT(cert != nullptr);  // SSL_VERIFY_FAIL_IF_NO_PEER_CERT
  PeerIdentity identity = tls_detail::identity_of(cert);
  spdlog::debug("transport: TLS peer {} is {}", hs->peer, identity.to_string());
  start_session_locked(Stream(std::move(hs->stream), hs->config), hs->peer, std::move(identity),
                       hs->address);
}

void TcpServer::release_address_locked(const asio::ip::address& address) {
  auto it = per_address_.find(address);
  FERRY_ASSERT(it != per_address_.end() && it->second > 0);
  if (--it->second == 0) per_address_.erase(it);
}

void TcpServer::admit(tcp::socket socket) {
  boost::system::error_code ec;
  tcp::endpoint remote = socket.remote_endpoint(ec);
  if (ec) return;  // already gone
  std::string peer = endpoint_text(remote);
  std::lock_guard lock(mu_);
  if (stopping_) return;
  reap_finished_locked();
  if (sessions_.size() >= options_.max_connections) {
    spdlog::warn("transport: refusing {} on {}: {} connections open (max_connections)", peer,
                 name_, sessions_.size());
    return;  // `socket` closes as it goes out of scope
  }
  tune_socket(socket, options_.connection, peer);
  start_session_locked(Stream(std::move(socket)), std::move(peer), std::nullopt, std::nullopt);
}

void TcpServer::start_session_locked(Stream stream, std::string peer,
                                     std::optional<PeerIdentity> identity,
                                     std::optional<asio::ip::address> counted) {
  auto session = std::make_unique<Session>();
  session->counted = std::move(counted);
  session->core = std::make_shared<Core>(std::move(stream), options_.connection, peer,
                                         std::move(identity));
  session->core->start();
  session->thread = std::thread([this, s = session.get()] { run_handler(*s); });
  sessions_.push_back(std::move(session));
  spdlog::debug("transport: accepted {} on {}", peer, name_);
}

void TcpServer::reap_finished_locked() {
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    if (!(*it)->done.load()) {
      ++it;
      continue;
    }
    (*it)->thread.join();  // done is its last step: the join is immediate
    it = sessions_.erase(it);
  }
}

void TcpServer::run_handler(Session& session) {
  try {
    handler_(*session.core);
  } catch (const std::exception& e) {
    // Handlers should return Status; this is the module edge, so log and close.
    spdlog::error("transport: handler for {} threw: {}", session.core->peer(), e.what());
  }
  session.core->finish(options_.connection.close_timeout);
  if (session.counted) {
    std::lock_guard lock(mu_);
    release_address_locked(*session.counted);
  }
  session.done.store(true);
}

void TcpServer::stop() {
  std::list<std::unique_ptr<Session>> sessions;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    sessions.swap(sessions_);
  }
  asio::post(io_, [this] {
    boost::system::error_code ignored;
    acceptor_.close(ignored);
    retry_timer_.cancel();
  });
  for (auto& s : sessions)
    s->core->fail(Status::error(Errc::cancelled, fmt::format("server on {} stopping", name_)));
  for (auto& s : sessions) s->thread.join();
  work_.reset();
  io_.stop();
  if (io_thread_.joinable()) io_thread_.join();
  boost::system::error_code ignored;
  acceptor_.close(ignored);
  for (auto& s : sessions) s->core->close_socket();  // the I/O thread is gone
  spdlog::info("transport: stopped listening on {}", name_);
}

}  // namespace

Result<std::unique_ptr<Server>> Server::listen(const Endpoint& at, const ServerOptions& options,
                                               Handler handler) {
  try {
    return TcpServer::open(at, options, std::move(handler));
  } catch (const std::system_error& e) {
    return Status::error(Errc::internal, fmt::format("listen on {}: {}", at.to_string(), e.what()));
  }
}

}  // namespace ferry::transport
