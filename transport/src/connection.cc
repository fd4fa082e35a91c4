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
// TLS later: all reads and writes go through `stream_`; only socket() touches the TCP layer.
// Swapping Stream for ssl::stream<tcp::socket> adds a handshake after connect/accept.
#include <utility>  // before Asio: GCC 12 needs it for Asio's coroutine support headers

#include <boost/asio.hpp>

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
#include <list>
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

namespace {

// The one place where Asio's error codes become Status.
Status status_from_asio(const boost::system::error_code& ec, const std::string& context) {
  FERRY_ASSERT(ec);
  if (ec == asio::error::eof)
    return Status::error(Errc::disconnected, context + ": peer closed the connection")
        .set_retryable();
  if (ec == asio::error::operation_aborted)
    return Status::error(Errc::cancelled, context + ": operation cancelled");
  if (ec.category() == asio::error::get_netdb_category() ||
      ec.category() == asio::error::get_addrinfo_category())
    return Status::error(Errc::not_found, context + ": " + ec.message());
  if (ec.category() == boost::system::system_category()) return Status::from_errno(ec.value(), context);
  return Status::error(Errc::io, context + ": " + ec.message());
}

// Far enough to mean "no deadline" without overflowing time_point arithmetic.
Clock::time_point deadline_after(milliseconds timeout) {
  constexpr milliseconds kForever = std::chrono::hours(24 * 365 * 10);
  return Clock::now() + std::clamp(timeout, milliseconds(0), kForever);
}

std::string endpoint_text(const tcp::endpoint& ep) {
  Endpoint e{ep.address().to_string(), ep.port()};
  return e.to_string();
}

void set_int_option(tcp::socket& socket, int level, int name, int value, const char* what,
                    const std::string& peer) {
  if (::setsockopt(socket.native_handle(), level, name, &value, sizeof value) != 0)
    spdlog::warn("transport: {} on {}: {}", what, peer, std::strerror(errno));
}

// TCP_NODELAY: frames are whole messages, Nagle only adds latency to acks.
// SO_KEEPALIVE with short probes and TCP_USER_TIMEOUT: a peer that vanished without a FIN
// (half-open link, partition) fails the connection within dead_peer_timeout, idle or not,
// so the engine reconnects instead of waiting on a socket that will never move.
void tune_socket(tcp::socket& socket, const ConnectionOptions& options, const std::string& peer) {
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

OutFrame make_out_frame(MsgType type, std::string payload) {
  FERRY_ASSERT_MSG(payload.size() <= kMaxPayloadBytes, "frame payload over kMaxPayloadBytes");
  OutFrame f;
  encode_frame_header(type, payload, f.header.data());
  f.payload = std::move(payload);
  return f;
}

// Receive buffer of a connection; larger frames are read straight into their payload.
constexpr std::size_t kRxBufferBytes = 256u << 10;
static_assert(kRxBufferBytes > kFrameHeaderBytes);

// Most frames one gathered write takes; bounds the iovec list, not the bytes (the send
// queue bound does that).
constexpr std::size_t kMaxFramesPerWrite = 512;

using Stream = tcp::socket;

// One connection: the socket, its queues, and the blocking facade. Shared with the
// completion handlers in flight, which keep it alive.
class Core final : public Connection, public std::enable_shared_from_this<Core> {
 public:
  Core(Stream stream, const ConnectionOptions& options, std::string peer)
      : stream_(std::move(stream)), options_(options), peer_(std::move(peer)) {
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
  std::uint64_t bytes_sent() const override { return bytes_sent_.load(std::memory_order_relaxed); }
  std::uint64_t bytes_received() const override {
    return bytes_received_.load(std::memory_order_relaxed);
  }

  // Ends the connection: the first failure is what send/receive report from now on; the
  // socket is closed on the I/O thread.
  void fail(Status why);
  // Flushes for at most `timeout`, then closes (a Server handler returned).
  void finish(milliseconds timeout) {
    (void)wait_flushed(deadline_after(timeout));
    close();
  }
  // Closes the socket from the calling thread; only once the I/O thread is gone.
  void close_socket() {
    boost::system::error_code ignored;
    socket().shutdown(tcp::socket::shutdown_both, ignored);
    socket().close(ignored);
  }

 private:
  tcp::socket& socket() { return stream_; }
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

void Core::fail(Status why) {
  FERRY_ASSERT(!why.is_ok());
  {
    std::lock_guard lock(mu_);
    if (!failure_.is_ok()) return;
    failure_ = std::move(why);
  }
  send_cv_.notify_all();
  recv_cv_.notify_all();
  asio::post(stream_.get_executor(), [self = shared_from_this()] { self->close_socket(); });
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
  if (!write_active_ && send_queue_.empty()) {
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
  return failure_;
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
  asio::async_write(stream_, write_buffers_,
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
    asio::async_read(stream_,
                     asio::buffer(rx_frame_.payload.data() + rx_large_have_,
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
  fail(Status::error(Errc::disconnected,
                     fmt::format("connection to {} closed after sending error: {}", peer_,
                                 msg.message)));
}

// --- client ----------------------------------------------------------------------------

class ClientConnection final : public Connection {
 public:
  static Result<std::unique_ptr<Connection>> open(const Endpoint& to,
                                                  const ConnectionOptions& options);
  ~ClientConnection() override {
    if (core_) core_->close();
    work_.reset();
    io_.stop();
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
  std::uint64_t bytes_sent() const override { return core_->bytes_sent(); }
  std::uint64_t bytes_received() const override { return core_->bytes_received(); }

 private:
  ClientConnection() = default;
  Result<tcp::socket> dial(const Endpoint& to, milliseconds timeout);

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

Result<std::unique_ptr<Connection>> ClientConnection::open(const Endpoint& to,
                                                          const ConnectionOptions& options) {
  std::unique_ptr<ClientConnection> conn(new ClientConnection());
  FERRY_ASSIGN_OR_RETURN(tcp::socket socket, conn->dial(to, options.connect_timeout));
  boost::system::error_code ec;
  tcp::endpoint remote = socket.remote_endpoint(ec);
  if (ec) return status_from_asio(ec, "connect to " + to.to_string());
  std::string peer = endpoint_text(remote);
  tune_socket(socket, options, peer);
  conn->core_ = std::make_shared<Core>(std::move(socket), options, peer);
  conn->core_->start();
  conn->work_.emplace(asio::make_work_guard(conn->io_));
  conn->thread_ = std::thread([io = &conn->io_] { io->run(); });
  spdlog::debug("transport: connected to {}", peer);
  return std::unique_ptr<Connection>(std::move(conn));
}

// --- server ----------------------------------------------------------------------------

class TcpServer final : public Server {
 public:
  static Result<std::unique_ptr<Server>> open(const Endpoint& at, const ServerOptions& options,
                                              Handler handler);
  ~TcpServer() override { stop(); }
  std::uint16_t port() const override { return port_; }
  void set_tls(std::shared_ptr<const TlsConfig>) override { FERRY_ASSERT(false); }  // TODO(tls)
  void stop() override;

 private:
  struct Session {
    std::shared_ptr<Core> core;
    std::thread thread;
    std::atomic<bool> done{false};
  };

  TcpServer(const ServerOptions& options, Handler handler)
      : work_(asio::make_work_guard(io_)), acceptor_(io_), retry_timer_(io_),
        options_(options), handler_(std::move(handler)) {}
  Status bind(const Endpoint& at);
  void accept_next();
  void on_accept(const boost::system::error_code& ec, tcp::socket socket);
  void admit(tcp::socket socket);
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
  admit(std::move(socket));
  accept_next();
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
  auto session = std::make_unique<Session>();
  session->core = std::make_shared<Core>(std::move(socket), options_.connection, peer);
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

Result<std::unique_ptr<Connection>> Connection::connect(const Endpoint& to,
                                                        const ConnectionOptions& options) {
  try {
    return ClientConnection::open(to, options);
  } catch (const std::system_error& e) {  // std::thread creation: the module edge
    return Status::error(Errc::internal, fmt::format("connect to {}: {}", to.to_string(), e.what()));
  }
}

Result<std::unique_ptr<Server>> Server::listen(const Endpoint& at, const ServerOptions& options,
                                               Handler handler) {
  try {
    return TcpServer::open(at, options, std::move(handler));
  } catch (const std::system_error& e) {
    return Status::error(Errc::internal, fmt::format("listen on {}: {}", at.to_string(), e.what()));
  }
}

}  // namespace ferry::transport
