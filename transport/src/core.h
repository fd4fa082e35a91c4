// Site-private to transport/: the connection core shared by the client (connection.cc) and
// the server (server.cc): the stream (plain TCP or TLS), the framed queues, and the error and
// socket helpers. connection.cc's header comment describes the threads, queues and TLS.
#pragma once

#include <utility>  // before Asio: GCC 12 needs it for Asio's coroutine support headers

#include <boost/asio.hpp>

#include "tls_engine.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "ferry/base/log.h"
#include "ferry/transport/connection.h"

namespace ferry::transport::conn_detail {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using tls_detail::describe_tls_error;
using tls_detail::kClosedInHandshake;
using tls_detail::kNotTls;
using tls_detail::take_openssl_errors;
using tls_detail::TlsEngine;
using tls_detail::TlsStream;

// The one place where Asio's error codes become Status.
inline Status status_from_asio(const boost::system::error_code& ec, const std::string& context) {
  FERRY_ASSERT(ec);
  if (ec == asio::error::eof)
    return Status::error(Errc::disconnected, context + ": peer closed the connection")
        .set_retryable();
  if (ec == asio::error::operation_aborted)
    return Status::error(Errc::cancelled, context + ": operation cancelled");
  if (ec == asio::ssl::error::stream_truncated)
    return Status::error(Errc::disconnected,
                         context + ": peer closed the connection (without TLS close_notify)")
        .set_retryable();
  if (ec.category() == asio::error::get_ssl_category())
    return Status::error(Errc::protocol, context + ": TLS: " + describe_tls_error(ec, nullptr));
  if (ec.category() == asio::error::get_netdb_category() ||
      ec.category() == asio::error::get_addrinfo_category())
    return Status::error(Errc::not_found, context + ": " + ec.message());
  if (ec.category() == boost::system::system_category()) return Status::from_errno(ec.value(), context);
  return Status::error(Errc::io, context + ": " + ec.message());
}

// Far enough to mean "no deadline" without overflowing time_point arithmetic.
inline Clock::time_point deadline_after(milliseconds timeout) {
  constexpr milliseconds kForever = std::chrono::hours(24 * 365 * 10);
  return Clock::now() + std::clamp(timeout, milliseconds(0), kForever);
}

inline std::string endpoint_text(const tcp::endpoint& ep) {
  Endpoint e{ep.address().to_string(), ep.port()};
  return e.to_string();
}

inline void set_int_option(tcp::socket& socket, int level, int name, int value, const char* what,
                    const std::string& peer) {
  if (::setsockopt(socket.native_handle(), level, name, &value, sizeof value) != 0)
    spdlog::warn("transport: {} on {}: {}", what, peer, std::strerror(errno));
}

// TCP_NODELAY: frames are whole messages, Nagle only adds latency to acks.
// SO_KEEPALIVE with short probes and TCP_USER_TIMEOUT: a peer that vanished without a FIN
// (half-open link, partition) fails the connection within dead_peer_timeout, idle or not,
// so the engine reconnects instead of waiting on a socket that will never move.
inline void tune_socket(tcp::socket& socket, const ConnectionOptions& options, const std::string& peer) {
  int dead_ms = static_cast<int>(std::clamp<std::int64_t>(options.dead_peer_timeout.count(),
                                                          1000, 3600 * 1000));
  int probe_s = std::max(1, dead_ms / 1000 / 4);
  set_int_option(socket, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY", peer);
  set_int_option(socket, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE", peer);
  set_int_option(socket, IPPROTO_TCP, TCP_KEEPIDLE, probe_s, "TCP_KEEPIDLE", peer);
  set_int_option(socket, IPPROTO_TCP, TCP_KEEPINTVL, probe_s, "TCP_KEEPINTVL", peer);
  set_int_option(socket, IPPROTO_TCP, TCP_KEEPCNT, 3, "TCP_KEEPCNT", peer);
  set_int_option(socket, IPPROTO_TCP, TCP_USER_TIMEOUT, dead_ms, "TCP_USER_TIMEOUT", peer);
}

struct OutFrame {
  std::array<unsigned char, kFrameHeaderBytes> header;
  std::string payload;
  std::size_t written = 0;  // bytes of header+payload already sent by an inline write
  std::size_t bytes() const { return header.size() + payload.size(); }
  std::size_t unsent() const { return bytes() - written; }
  // Appends the unsent parts to `out`.
  void buffers(std::vector<asio::const_buffer>& out) const {
    if (written < header.size())
      out.push_back(asio::buffer(header.data() + written, header.size() - written));
    std::size_t pw = written > header.size() ? written - header.size() : 0;
    if (pw < payload.size()) out.push_back(asio::buffer(payload.data() + pw, payload.size() - pw));
  }
};

inline OutFrame make_out_frame(MsgType type, std::string payload) {
  FERRY_ASSERT_MSG(payload.size() <= kMaxPayloadBytes, "frame payload over kMaxPayloadBytes");
  OutFrame f;
  encode_frame_header(type, payload, f.header.data());
  f.payload = std::move(payload);
  return f;
}

// Receive buffer of a connection; larger frames are read straight into their payload.
inline constexpr std::size_t kRxBufferBytes = 256u << 10;
static_assert(kRxBufferBytes > kFrameHeaderBytes);

// Most frames one gathered write takes; bounds the iovec list, not the bytes (the send
// queue bound does that).
inline constexpr std::size_t kMaxFramesPerWrite = 512;

// TLS over a TCP socket through OpenSSL memory BIOs, on the I/O thread only.
//
// The byte stream of a connection: plain TCP, or TLS over it. One branch per operation keeps
// a single code path for framing and queues; plaintext pays one predictable test.
class Stream {
 public:
  explicit Stream(tcp::socket socket) : plain_(std::move(socket)) {}
  Stream(std::unique_ptr<TlsStream> tls, std::shared_ptr<const TlsConfig> config)
      : tls_(std::move(tls)), config_(std::move(config)) {
    FERRY_ASSERT(tls_ && config_);
  }
  bool tls() const { return tls_ != nullptr; }
  TlsStream& tls_stream() { FERRY_ASSERT(tls_); return *tls_; }
  tcp::socket& socket() { return tls_ ? tls_->next_layer() : *plain_; }
  auto get_executor() { return socket().get_executor(); }

  template <class Buffers, class Handler>
  void async_read_some(const Buffers& buffers, Handler&& handler) {
    if (tls_) tls_->async_read_some(buffers, std::forward<Handler>(handler));
    else plain_->async_read_some(buffers, std::forward<Handler>(handler));
  }
  template <class Buffers, class Handler>
  void async_read(const Buffers& buffers, Handler&& handler) {
    if (tls_) tls_->async_read(buffers, std::forward<Handler>(handler));
    else asio::async_read(*plain_, buffers, std::forward<Handler>(handler));
  }
  template <class Buffers, class Handler>
  void async_write(const Buffers& buffers, Handler&& handler) {
    if (tls_) tls_->async_write(buffers, std::forward<Handler>(handler));
    else asio::async_write(*plain_, buffers, std::forward<Handler>(handler));
  }

 private:
  std::optional<tcp::socket> plain_;  // plaintext only
  std::unique_ptr<TlsStream> tls_;    // TLS only
  std::shared_ptr<const TlsConfig> config_;  // keeps the context of tls_ alive
};

// One connection: the socket, its queues, and the blocking facade. Shared with the
// completion handlers in flight, which keep it alive.
class Core final : public Connection, public std::enable_shared_from_this<Core> {
 public:
  Core(Stream stream, const ConnectionOptions& options, std::string peer,
       std::optional<PeerIdentity> identity = std::nullopt)
      : stream_(std::move(stream)), options_(options), peer_(std::move(peer)),
        identity_(std::move(identity)) {
    FERRY_ASSERT(options_.max_send_queue_bytes > 0 && options_.max_recv_queue_bytes > 0);
  }

  // Starts the read-ahead loop; the I/O thread may already run.
  void start() {
    asio::post(stream_.get_executor(), [self = shared_from_this()] { self->read_header(); });
  }

  Status send(MsgType type, std::string_view payload) override {
    return enqueue(make_out_frame(type, std::string(payload)), Clock::time_point::max());
  }
  Status send_owned(MsgType type, std::string payload) override {
    return enqueue(make_out_frame(type, std::move(payload)), Clock::time_point::max());
  }
  Status flush() override { return wait_flushed(Clock::time_point::max()); }
  Result<Frame> receive(milliseconds timeout) override;
  void close_with_error(WireStatus status, const std::string& message) override;
  void close() override {
    fail(Status::error(Errc::disconnected, fmt::format("connection to {} closed locally", peer_)));
  }
  std::string peer() const override { return peer_; }
  const PeerIdentity* peer_identity() const override { return identity_ ? &*identity_ : nullptr; }
  std::uint64_t bytes_sent() const override { return bytes_sent_.load(std::memory_order_relaxed); }
  std::uint64_t bytes_received() const override {
    return bytes_received_.load(std::memory_order_relaxed);
  }

  // Ends the connection: the first failure is what send/receive report from now on; the
  // socket is closed on the I/O thread.
  void fail(Status why);
  // Flushes for at most `timeout`, then closes (a Server handler returned), lingering first.
  void finish(milliseconds timeout) {
    const Clock::time_point deadline = deadline_after(timeout);
    if (wait_flushed(deadline).is_ok()) linger(deadline);
    close();
  }
  // A lingering close: reads and drops what the peer still sends until it closes (or the
  // deadline). Closing a socket with unread bytes sends a reset, and a reset can destroy our
  // last frame (an RP's refusal, an error) in the peer's receive buffer before the peer reads
  // it: a source streams an RP's data frames without waiting for the refusal of its rp_begin.
  void linger(Clock::time_point deadline) {
    while (Clock::now() < deadline) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
      if (left.count() <= 0 || !receive(left).is_ok()) return;  // closed, failed or timed out
    }
  }
  // On the I/O thread: TLS sends close_notify first (best effort, bounded by close_timeout:
  // it waits for the peer's close_notify or the timer); plaintext closes at once.
  void close_stream();
  // Closes the socket from the calling thread; only once the I/O thread is gone.
  void close_socket() {
    boost::system::error_code ignored;
    socket().shutdown(tcp::socket::shutdown_both, ignored);
    socket().close(ignored);
  }

 private:
  tcp::socket& socket() { return stream_.socket(); }
  Status enqueue(OutFrame frame, Clock::time_point deadline);
  int write_inline(OutFrame& frame);  // caller holds mu_; returns 0 or an errno
  Status wait_flushed(Clock::time_point deadline);
  void start_write();
  void on_written(const boost::system::error_code& ec, std::size_t bytes);
  void read_header();
  void read_more();
  void parse_buffered();
  bool deliver(std::vector<Frame>& frames);
  void on_payload(const boost::system::error_code& ec);

  Stream stream_;
  const ConnectionOptions options_;
  const std::string peer_;
  const std::optional<PeerIdentity> identity_;  // TLS: the verified peer
  bool closing_ = false;  // I/O thread only: close_stream() ran
  std::atomic<std::uint64_t> bytes_sent_{0};
  std::atomic<std::uint64_t> bytes_received_{0};

  std::mutex mu_;
  std::condition_variable send_cv_;  // room in the send queue, or everything written
  std::condition_variable recv_cv_;  // a frame arrived, or the connection failed
  // Guarded by mu_.
  std::deque<OutFrame> send_queue_;
  std::size_t unsent_bytes_ = 0;  // queued + being written
  bool write_active_ = false;
  std::deque<Frame> recv_queue_;
  std::size_t recv_queue_bytes_ = 0;
  bool read_paused_ = false;
  Status failure_;

  // I/O thread only.
  std::vector<OutFrame> writing_;
  std::vector<asio::const_buffer> write_buffers_;
  // Bytes read and not yet framed: [rx_begin_, rx_end_) of rx_buf_. One read takes as many
  // frames as the socket holds (one system call and one wake-up for many small frames).
  std::unique_ptr<char[]> rx_buf_{new char[kRxBufferBytes]};
  std::size_t rx_begin_ = 0, rx_end_ = 0;
  std::vector<Frame> rx_ready_;
  // A frame larger than rx_buf_: its header, and its payload filled to rx_large_have_.
  std::array<unsigned char, kFrameHeaderBytes> rx_header_{};
  Frame rx_frame_;
  std::size_t rx_large_have_ = 0;
};

}  // namespace ferry::transport::conn_detail
