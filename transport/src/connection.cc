// Connections and the server over Boost.Asio TCP, behind the blocking facade of connection.h.
//
// Threads: Asio runs on one I/O thread per client Connection and one per Server (shared by
// its connections). Every socket operation happens on that thread; callers' threads only
// touch the queues, under one mutex per connection (coarse on purpose: one lock per frame).
//
// Send: send() copies the payload once into a queue entry (header beside it, not in front of
// it) and wakes the writer only when it is idle; the writer takes everything queued and hands
// it to one gathered async_write, so a busy connection costs no thread hop per frame.
// Send, inline: when the writer is idle the caller writes the frame itself (sendmsg,
// MSG_DONTWAIT) and only what the socket does not take goes to the I/O thread.
// Receive: the I/O thread reads what the socket holds into a 256 KiB buffer, checks each
// header before copying its payload out, verifies the checksum, and queues all whole frames
// with one wake-up; a frame larger than the buffer is read straight into its payload. Past
// max_recv_queue_bytes it stops reading (the queue may exceed the bound by the frames of one
// buffer), so TCP's window pushes back on the peer.
//
// TLS: all reads and writes go through `stream_` (a Stream: plain TCP, or TlsEngine: OpenSSL
// over memory BIOs on that TCP socket); only socket() touches the TCP layer, so framing and
// queues are one code path. A TLS connection differs in three places only: a handshake after
// connect/accept (bounded by handshake_timeout), no inline writes (an SSL object is not
// thread-safe: every SSL call happens on the I/O thread), and a close that sends
// close_notify (bounded by close_timeout). The server handshakes on its I/O thread before
// admit(), with handshakes in flight and connections per address bounded, so an
// unauthenticated peer costs one SSL object and one record buffer, never the 256 KiB receive
// buffer or a thread.
#include <utility>  // before Asio: GCC 12 needs it for Asio's coroutine support headers

#include <boost/asio.hpp>

#include "core.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "ferry/base/log.h"
#include "ferry/transport/connection.h"

namespace ferry::transport {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// --- endpoints -------------------------------------------------------------------------

std::string Endpoint::to_string() const {
  if (host.find(':') != std::string::npos) return fmt::format("[{}]:{}", host, port);
  return fmt::format("{}:{}", host, port);
}

namespace {

Status bad_endpoint(const std::string& text, const char* why) {
  return Status::error(Errc::invalid_argument,
                       fmt::format("endpoint \"{}\": {} (want HOST:PORT or [IPV6]:PORT)", text, why));
}

bool host_name_ok(std::string_view host) {
  if (host.empty() || host.size() > 253) return false;
  for (char c : host)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_'))
      return false;
  return true;
}

}  // namespace

Result<Endpoint> parse_endpoint(const std::string& text, bool allow_port_zero) {
  std::string host;
  std::string port_text;
  if (!text.empty() && text.front() == '[') {
    std::size_t close = text.find(']');
    if (close == std::string::npos) return bad_endpoint(text, "'[' without ']'");
    if (close + 1 >= text.size() || text[close + 1] != ':')
      return bad_endpoint(text, "no ':PORT' after ']'");
    host = text.substr(1, close - 1);
    port_text = text.substr(close + 2);
    boost::system::error_code ec;
    asio::ip::make_address_v6(host, ec);
    if (ec) return bad_endpoint(text, "not an IPv6 address inside []");
  } else {
    std::size_t colon = text.rfind(':');
    if (colon == std::string::npos) return bad_endpoint(text, "no ':PORT'");
    host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
    if (host.find(':') != std::string::npos) return bad_endpoint(text, "IPv6 address needs []");
    if (!host_name_ok(host)) return bad_endpoint(text, "bad host");
  }
  if (port_text.empty() || port_text.size() > 5 ||
      port_text.find_first_not_of("0123456789") != std::string::npos)
    return bad_endpoint(text, "port is not a number");
  unsigned long port = std::stoul(port_text);
  if (port > 65535) return bad_endpoint(text, "port above 65535");
  if (port == 0 && !allow_port_zero) return bad_endpoint(text, "port 0");
  return Endpoint{std::move(host), static_cast<std::uint16_t>(port)};
}

namespace conn_detail {

void Core::fail(Status why) {
  FERRY_ASSERT(!why.is_ok());
  {
    std::lock_guard lock(mu_);
    if (!failure_.is_ok()) return;
    failure_ = std::move(why);
  }
  send_cv_.notify_all();
  recv_cv_.notify_all();
  asio::post(stream_.get_executor(), [self = shared_from_this()] { self->close_stream(); });
}

void Core::close_stream() {
  if (!stream_.tls()) return close_socket();
  if (closing_) return;
  closing_ = true;
  auto timer = std::make_shared<asio::steady_timer>(stream_.get_executor());
  timer->expires_after(options_.close_timeout);
  timer->async_wait([self = shared_from_this(), timer](const boost::system::error_code&) {
    self->close_socket();  // the peer did not answer close_notify in time
  });
  stream_.tls_stream().async_shutdown(
      [self = shared_from_this(), timer](const boost::system::error_code&) {
        timer->cancel();
        self->close_socket();
      });
}

Status Core::enqueue(OutFrame frame, Clock::time_point deadline) {
  std::unique_lock lock(mu_);
  // Room means: the frame fits under the bound, or nothing is queued (a frame larger than
  // the bound still goes, alone).
  auto room = [&] {
    return !failure_.is_ok() || unsent_bytes_ == 0 ||
           unsent_bytes_ + frame.bytes() <= options_.max_send_queue_bytes;
  };
  if (!send_cv_.wait_until(lock, deadline, room))
    return Status::error(Errc::timeout, fmt::format("send queue to {} stayed full", peer_))
        .set_retryable();
  if (!failure_.is_ok()) return failure_;
  if (!write_active_ && send_queue_.empty() && !stream_.tls()) {
    // Inline write: the writer is idle, so this thread writes the frame itself (under mu_,
    // which keeps frames in order and keeps close_socket() away: it only runs after fail()
    // set failure_ under mu_). Saves the hop to the I/O thread for most frames; whatever the
    // socket does not take now goes to the I/O thread as usual. Plain TCP only: a TLS stream
    // must be written through its engine.
    int err = write_inline(frame);
    if (err != 0) {
      lock.unlock();
      fail(Status::from_errno(err, "send to " + peer_));
      return Status::error(Errc::disconnected, fmt::format("send to {}: {}", peer_, std::strerror(err)))
          .set_retryable();
    }
    if (frame.unsent() == 0) return Status::ok();
  }
  unsent_bytes_ += frame.unsent();
  send_queue_.push_back(std::move(frame));
  if (write_active_) return Status::ok();  // the writer picks it up when its write ends
  write_active_ = true;
  lock.unlock();
  asio::post(stream_.get_executor(), [self = shared_from_this()] { self->start_write(); });
  return Status::ok();
}

int Core::write_inline(OutFrame& frame) {
  FERRY_ASSERT(frame.written == 0);  // only a fresh frame is written inline
  iovec iov[2] = {{frame.header.data(), frame.header.size()},
                  {frame.payload.data(), frame.payload.size()}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = frame.payload.empty() ? 1 : 2;
  for (;;) {
    ssize_t n = ::sendmsg(socket().native_handle(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n >= 0) {
      frame.written += static_cast<std::size_t>(n);
      bytes_sent_.fetch_add(static_cast<std::size_t>(n), std::memory_order_relaxed);
      return 0;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;  // the I/O thread waits for room
    return errno;
  }
}

Status Core::wait_flushed(Clock::time_point deadline) {
  std::unique_lock lock(mu_);
  if (!send_cv_.wait_until(lock, deadline, [&] { return !failure_.is_ok() || unsent_bytes_ == 0; }))
    return Status::error(Errc::timeout,
                         fmt::format("flush to {}: {} bytes still unsent", peer_, unsent_bytes_))
        .set_retryable();
  // Every frame was handed to the kernel: the flush succeeded, even if the connection failed
  // after that (a peer that read its last frame and closed at once, as a --once source does
  // after the acknowledgement; over TLS its close can beat this wake-up).
  return unsent_bytes_ == 0 ? Status::ok() : failure_;
}

void Core::start_write() {
  FERRY_ASSERT(writing_.empty());
  {
    std::lock_guard lock(mu_);
    if (!failure_.is_ok() || send_queue_.empty()) {
      write_active_ = false;
      return;
    }
    while (!send_queue_.empty() && writing_.size() < kMaxFramesPerWrite) {
      writing_.push_back(std::move(send_queue_.front()));
      send_queue_.pop_front();
    }
  }
  write_buffers_.clear();
  for (const OutFrame& f : writing_) f.buffers(write_buffers_);
  stream_.async_write(write_buffers_,
                    [self = shared_from_this()](const boost::system::error_code& ec,
                                                std::size_t bytes) { self->on_written(ec, bytes); });
}

void Core::on_written(const boost::system::error_code& ec, std::size_t bytes) {
  if (ec) return fail(status_from_asio(ec, "send to " + peer_));
  bytes_sent_.fetch_add(bytes, std::memory_order_relaxed);
  std::size_t written = 0;
  for (const OutFrame& f : writing_) written += f.unsent();
  FERRY_ASSERT(written == bytes);
  writing_.clear();  // frees the payloads outside the lock
  {
    std::lock_guard lock(mu_);
    FERRY_ASSERT(unsent_bytes_ >= written);
    unsent_bytes_ -= written;
  }
  send_cv_.notify_all();
  start_write();
}

void Core::read_header() {
  // Called to start reading and to resume after a pause: frames already buffered go first.
  parse_buffered();
}

void Core::read_more() {
  if (rx_begin_ == rx_end_) {
    rx_begin_ = rx_end_ = 0;
  } else if (rx_begin_ > 0) {  // keep the partial frame at the front: room for the rest
    std::memmove(rx_buf_.get(), rx_buf_.get() + rx_begin_, rx_end_ - rx_begin_);
    rx_end_ -= rx_begin_;
    rx_begin_ = 0;
  }
  FERRY_ASSERT(rx_end_ < kRxBufferBytes);
  stream_.async_read_some(asio::buffer(rx_buf_.get() + rx_end_, kRxBufferBytes - rx_end_),
                          [self = shared_from_this()](const boost::system::error_code& ec,
                                                      std::size_t n) {
                            if (ec) return self->fail(status_from_asio(ec, "receive from " + self->peer_));
                            self->rx_end_ += n;
                            self->parse_buffered();
                          });
}

// Takes every whole frame out of the buffer (header checked before its payload is copied),
// queues them with one wake-up, and reads on unless the queue is full. A frame larger than
// the buffer is read straight into its payload (on_payload).
void Core::parse_buffered() {
  rx_ready_.clear();
  Status bad;
  bool large = false;
  while (rx_end_ - rx_begin_ >= kFrameHeaderBytes) {
    const char* at = rx_buf_.get() + rx_begin_;
    Result<FrameHeader> header = decode_frame_header(reinterpret_cast<const unsigned char*>(at));
    if (!header.is_ok()) {
      bad = header.status();
      break;
    }
    const std::size_t need = kFrameHeaderBytes + header->payload_bytes;
    const std::size_t have = rx_end_ - rx_begin_;
    if (have < need) {
      if (need > kRxBufferBytes) {  // larger than the buffer: read the rest into the payload
        std::memcpy(rx_header_.data(), at, kFrameHeaderBytes);
        rx_frame_.type = header->type;
        rx_frame_.payload.resize(header->payload_bytes);  // bounded by decode_frame_header
        std::memcpy(rx_frame_.payload.data(), at + kFrameHeaderBytes, have - kFrameHeaderBytes);
        rx_large_have_ = have - kFrameHeaderBytes;
        rx_begin_ = rx_end_ = 0;
        large = true;
      }
      break;
    }
    Frame f;
    f.type = header->type;
    f.payload.assign(at + kFrameHeaderBytes, header->payload_bytes);
    Status valid = verify_frame(reinterpret_cast<const unsigned char*>(at), f.payload);
    if (!valid.is_ok()) {
      bad = std::move(valid);
      break;
    }
    rx_begin_ += need;
    rx_ready_.push_back(std::move(f));
  }
  // Frames before a bad one are good and are delivered first.
  bool pause = deliver(rx_ready_);
  rx_ready_.clear();
  if (!bad.is_ok()) {
    spdlog::warn("transport: bad frame from {}: {}", peer_, bad.message());
    return fail(std::move(bad).with_context("bad frame from " + peer_));
  }
  if (large) {
    stream_.async_read(asio::buffer(rx_frame_.payload.data() + rx_large_have_,
                                  rx_frame_.payload.size() - rx_large_have_),
                     [self = shared_from_this()](const boost::system::error_code& ec, std::size_t) {
                       self->on_payload(ec);
                     });
    return;
  }
  if (!pause) read_more();
}

// Queues frames read by the I/O thread; returns whether reading must pause (queue full).
bool Core::deliver(std::vector<Frame>& frames) {
  std::size_t bytes = 0;
  for (const Frame& f : frames) bytes += kFrameHeaderBytes + f.payload.size();
  bytes_received_.fetch_add(bytes, std::memory_order_relaxed);
  bool pause = false;
  {
    std::lock_guard lock(mu_);
    if (!failure_.is_ok()) return true;
    for (Frame& f : frames) recv_queue_.push_back(std::move(f));
    recv_queue_bytes_ += bytes;
    pause = recv_queue_bytes_ >= options_.max_recv_queue_bytes;
    read_paused_ = pause;
  }
  if (!frames.empty()) recv_cv_.notify_one();
  return pause;
}

void Core::on_payload(const boost::system::error_code& ec) {
  if (ec) return fail(status_from_asio(ec, "receive from " + peer_));
  Status valid = verify_frame(rx_header_.data(), rx_frame_.payload);
  if (!valid.is_ok()) {
    spdlog::warn("transport: bad frame from {}: {}", peer_, valid.message());
    return fail(std::move(valid).with_context("bad frame from " + peer_));
  }
  rx_ready_.clear();
  rx_ready_.push_back(std::move(rx_frame_));
  rx_frame_ = Frame{};
  bool pause = deliver(rx_ready_);
  rx_ready_.clear();
  if (!pause) read_more();
}

Result<Frame> Core::receive(milliseconds timeout) {
  std::unique_lock lock(mu_);
  bool ready = recv_cv_.wait_until(lock, deadline_after(timeout), [&] {
    return !recv_queue_.empty() || !failure_.is_ok();
  });
  if (!ready)
    return Status::error(Errc::timeout, fmt::format("no frame from {} within {} ms", peer_,
                                                    timeout.count()))
        .set_retryable();
  // Frames read before a disconnect or a bad frame are good and are handed out first;
  // a cancel (stop(), local close) ends at once.
  if (recv_queue_.empty() || failure_.code() == Errc::cancelled) return failure_;
  Frame frame = std::move(recv_queue_.front());
  recv_queue_.pop_front();
  recv_queue_bytes_ -= kFrameHeaderBytes + frame.payload.size();
  bool resume = read_paused_ && failure_.is_ok() &&
                recv_queue_bytes_ < options_.max_recv_queue_bytes;
  if (resume) read_paused_ = false;
  lock.unlock();
  if (resume) asio::post(stream_.get_executor(), [self = shared_from_this()] { self->read_header(); });
  return frame;
}

void Core::close_with_error(WireStatus status, const std::string& message) {
  ErrorMsg msg{status, message.substr(0, kMaxMessageBytes)};
  Clock::time_point deadline = deadline_after(options_.close_timeout);
  Status queued = enqueue(make_out_frame(MsgType::error, encode(msg)), deadline);
  if (queued.is_ok()) queued = wait_flushed(deadline);
  if (!queued.is_ok())
    spdlog::info("transport: error frame to {} not delivered: {}", peer_, queued.to_string());
  else
    linger(deadline);  // so that a reset does not destroy the error frame before it is read
  fail(Status::error(Errc::disconnected,
                     fmt::format("connection to {} closed after sending error: {}", peer_,
                                 msg.message)));
}

}  // namespace conn_detail

using namespace conn_detail;

namespace {

// --- client ----------------------------------------------------------------------------

class ClientConnection final : public Connection {
 public:
  static Result<std::unique_ptr<Connection>> open(const Endpoint& to,
                                                  const ConnectionOptions& options);
  ~ClientConnection() override {
    if (core_) core_->close();
    work_.reset();
    // TLS: let the I/O thread send close_notify (close_stream() closes the socket within
    // close_timeout, after which nothing is pending and run() returns). Plaintext: at once.
    if (!tls_) io_.stop();
    if (thread_.joinable()) thread_.join();
    if (core_) core_->close_socket();  // the I/O thread is gone: safe from here
  }

  Status send(MsgType type, std::string_view payload) override { return core_->send(type, payload); }
  Status send_owned(MsgType type, std::string payload) override {
    return core_->send_owned(type, std::move(payload));
  }
  Status flush() override { return core_->flush(); }
  Result<Frame> receive(milliseconds timeout) override { return core_->receive(timeout); }
  void close_with_error(WireStatus status, const std::string& message) override {
    core_->close_with_error(status, message);
  }
  void close() override { core_->close(); }
  std::string peer() const override { return core_->peer(); }
  const PeerIdentity* peer_identity() const override { return core_->peer_identity(); }
  std::uint64_t bytes_sent() const override { return core_->bytes_sent(); }
  std::uint64_t bytes_received() const override { return core_->bytes_received(); }

 private:
  ClientConnection() = default;
  Result<tcp::socket> dial(const Endpoint& to, milliseconds timeout);
  Result<std::unique_ptr<TlsStream>> handshake(tcp::socket socket, const Endpoint& to,
                                               const ConnectionOptions& options);

  bool tls_ = false;
  asio::io_context io_;  // declared first: destroyed last, after the handlers it holds
  // Keeps the I/O thread's run() going while idle; made after dial(), whose run() must end.
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_;
  std::shared_ptr<Core> core_;
  std::thread thread_;
};

// Resolves and connects on the caller's thread (io_ runs here until both are done), so no
// handler outlives the locals it uses.
Result<tcp::socket> ClientConnection::dial(const Endpoint& to, milliseconds timeout) {
  tcp::resolver resolver(io_);
  tcp::socket socket(io_);
  asio::steady_timer timer(io_);
  boost::system::error_code result = asio::error::would_block;
  auto done = [&](const boost::system::error_code& ec) {
    if (result != asio::error::would_block) return;
    result = ec;
    timer.cancel();
  };
  timer.expires_after(timeout);
  timer.async_wait([&](const boost::system::error_code& ec) {
    if (ec || result != asio::error::would_block) return;
    result = asio::error::timed_out;
    resolver.cancel();
    boost::system::error_code ignored;
    socket.close(ignored);
  });
  resolver.async_resolve(to.host, std::to_string(to.port), tcp::resolver::numeric_service,
                         [&](const boost::system::error_code& ec, tcp::resolver::results_type eps) {
                           if (ec) return done(ec);
                           asio::async_connect(socket, eps,
                                               [&](const boost::system::error_code& ec2,
                                                   const tcp::endpoint&) { done(ec2); });
                         });
  io_.run();
  io_.restart();
  if (result) return status_from_asio(result, "connect to " + to.to_string());
  return socket;
}

// The client's TLS handshake, on the caller's thread like dial(): the server's certificate
// must chain to our CA and carry `name` (tls_server_name, else the endpoint's host) as a DNS
// SAN, or as an IP SAN when `name` is an address literal; never the subject CN.
Result<std::unique_ptr<TlsStream>> ClientConnection::handshake(tcp::socket socket,
                                                               const Endpoint& to,
                                                               const ConnectionOptions& options) {
  FERRY_ASSERT(options.tls && options.tls->role() == TlsConfig::Role::client);
  const std::string name = options.tls_server_name.empty() ? to.host : options.tls_server_name;
  const std::string what = "TLS handshake with " + to.to_string() + " failed";
  auto stream = std::make_unique<TlsStream>(std::move(socket), tls_detail::context_of(*options.tls));
  SSL* ssl = stream->native_handle();
  X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
  boost::system::error_code not_ip;
  asio::ip::make_address(name, not_ip);
  bool ok;
  if (!not_ip) {
    ok = X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str()) == 1;
  } else {
    X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS |
                                               X509_CHECK_FLAG_NEVER_CHECK_SUBJECT);
    ok = X509_VERIFY_PARAM_set1_host(param, name.c_str(), name.size()) == 1 &&
         SSL_set_tlsext_host_name(ssl, name.c_str()) == 1;
  }
  if (!ok)
    return Status::error(Errc::invalid_argument,
                         fmt::format("{}: bad server name '{}': {}", what, name, take_openssl_errors()));

  asio::steady_timer timer(io_);
  boost::system::error_code result = asio::error::would_block;
  timer.expires_after(options.handshake_timeout);
  timer.async_wait([&](const boost::system::error_code& ec) {
    if (ec || result != asio::error::would_block) return;
    result = asio::error::timed_out;
    boost::system::error_code ignored;
    stream->next_layer().close(ignored);
  });
  // The handshake, then the server's verdict on our certificate (see async_confirm).
  bool handshake_done = false;
  stream->async_handshake(asio::ssl::stream_base::client, [&](const boost::system::error_code& ec) {
    if (result != asio::error::would_block) return;
    if (ec) {
      result = ec;
      timer.cancel();
      return;
    }
    handshake_done = true;
    stream->async_confirm([&](const boost::system::error_code& ec2) {
      if (result != asio::error::would_block) return;
      result = ec2;
      timer.cancel();
    });
  });
  io_.run();
  io_.restart();
  if (result == asio::error::timed_out)
    return Status::error(Errc::timeout,
                         fmt::format("{}: {} within {} ms", what,
                                     handshake_done ? "the server did not confirm our certificate"
                                                    : "no answer",
                                     options.handshake_timeout.count()))
        .set_retryable();
  if (result) {
    std::string cause = describe_tls_error(result, ssl, name);
    ERR_clear_error();
    // A plaintext Ferry receiver takes the ClientHello for a bad frame and hangs up.
    if (cause == kNotTls || cause == kClosedInHandshake)
      cause = "the peer does not speak TLS (plaintext receiver?): " + cause;
    Errc code = result.category() == asio::error::get_ssl_category() ? Errc::protocol
                                                                     : Errc::disconnected;
    Status st = Status::error(code, fmt::format("{}: {}", what, cause));
    if (code == Errc::disconnected) st.set_retryable();
    return st;
  }
  return stream;
}

Result<std::unique_ptr<Connection>> ClientConnection::open(const Endpoint& to,
                                                          const ConnectionOptions& options) {
  std::unique_ptr<ClientConnection> conn(new ClientConnection());
  FERRY_ASSIGN_OR_RETURN(tcp::socket socket, conn->dial(to, options.connect_timeout));
  boost::system::error_code ec;
  tcp::endpoint remote = socket.remote_endpoint(ec);
  if (ec) return status_from_asio(ec, "connect to " + to.to_string());
  std::string peer = endpoint_text(remote);
  tune_socket(socket, options, peer);
  if (options.tls) {
    conn->tls_ = true;
    FERRY_ASSIGN_OR_RETURN(std::unique_ptr<TlsStream> tls,
                           conn->handshake(std::move(socket), to, options));
    X509* cert = SSL_get0_peer_certificate(tls->native_handle());
    FERRY_ASSERT(cert != nullptr);  // SSL_VERIFY_PEER: a verified handshake has one
    PeerIdentity identity = tls_detail::identity_of(cert);
    conn->core_ = std::make_shared<Core>(Stream(std::move(tls), options.tls), options, peer,
                                         std::move(identity));
  } else {
    conn->core_ = std::make_shared<Core>(Stream(std::move(socket)), options, peer);
  }
  conn->core_->start();
  conn->work_.emplace(asio::make_work_guard(conn->io_));
  conn->thread_ = std::thread([io = &conn->io_] { io->run(); });
  spdlog::debug("transport: connected to {}", peer);
  return std::unique_ptr<Connection>(std::move(conn));
}

}  // namespace

Result<std::unique_ptr<Connection>> Connection::connect(const Endpoint& to,
                                                        const ConnectionOptions& options) {
  try {
    return ClientConnection::open(to, options);
  } catch (const std::system_error& e) {  // std::thread creation: the module edge
    return Status::error(Errc::internal, fmt::format("connect to {}: {}", to.to_string(), e.what()));
  }
}

}  // namespace ferry::transport
