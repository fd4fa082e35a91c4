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

#include "tls_internal.h"

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

namespace {

using tls_detail::take_openssl_errors;

constexpr const char* kNotTls = "not TLS (plaintext or garbage)";
constexpr const char* kClosedInHandshake = "the peer closed the connection during the handshake";

bool is_certificate_alert(int alert) {
  switch (alert) {
    case SSL_AD_BAD_CERTIFICATE: case SSL_AD_UNSUPPORTED_CERTIFICATE:
    case SSL_AD_CERTIFICATE_REVOKED: case SSL_AD_CERTIFICATE_EXPIRED:
    case SSL_AD_CERTIFICATE_UNKNOWN: case SSL_AD_UNKNOWN_CA: case SSL_AD_ACCESS_DENIED:
    case SSL_AD_CERTIFICATE_REQUIRED: case SSL_AD_DECRYPT_ERROR:
      return true;
    default:
      return false;
  }
}

// A TLS failure in plain words. `ssl` (when known) gives the verify result of the peer's
// certificate; `expected_name` (client) the name it was checked against.
std::string describe_tls_error(const boost::system::error_code& ec, SSL* ssl,
                               const std::string& expected_name = {}) {
  if (ec == asio::ssl::error::stream_truncated || ec == asio::error::eof)
    return kClosedInHandshake;
  if (ec.category() != asio::error::get_ssl_category()) return ec.message();
  const int reason = ERR_GET_REASON(static_cast<unsigned long>(ec.value()));
  if (reason >= SSL_AD_REASON_OFFSET && reason < SSL_AD_REASON_OFFSET + 256) {
    const int alert = reason - SSL_AD_REASON_OFFSET;
    const char* what = SSL_alert_desc_string_long(alert);
    if (is_certificate_alert(alert))
      return fmt::format("peer refused our certificate (alert: {})", what);
    if (alert == SSL_AD_PROTOCOL_VERSION)
      return fmt::format("the peer does not speak TLS 1.3 (alert: {})", what);
    return fmt::format("peer sent alert: {}", what);
  }
  switch (reason) {
    case SSL_R_CERTIFICATE_VERIFY_FAILED: {
      long verify = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;
      if (verify == X509_V_ERR_HOSTNAME_MISMATCH || verify == X509_V_ERR_IP_ADDRESS_MISMATCH) {
        X509* cert = ssl ? SSL_get0_peer_certificate(ssl) : nullptr;
        STACK_OF(X509)* chain = ssl ? SSL_get_peer_cert_chain(ssl) : nullptr;
        if (cert == nullptr && chain != nullptr && sk_X509_num(chain) > 0) cert = sk_X509_value(chain, 0);
        return fmt::format("server certificate name mismatch: expected '{}', certificate has {}",
                           expected_name, tls_detail::san_text(cert));
      }
      if (verify != X509_V_OK)
        return fmt::format("certificate verify failed: {}", X509_verify_cert_error_string(verify));
      return "certificate verify failed";
    }
    case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
      return "no certificate presented";
    case SSL_R_UNSUPPORTED_PROTOCOL:
    case SSL_R_NO_PROTOCOLS_AVAILABLE:
    case SSL_R_UNSUPPORTED_SSL_VERSION:
      return "unsupported protocol (the peer offers no TLS 1.3)";
    case SSL_R_WRONG_VERSION_NUMBER:
    case SSL_R_HTTP_REQUEST:
    case SSL_R_HTTPS_PROXY_REQUEST:
    case SSL_R_PACKET_LENGTH_TOO_LONG:
    case SSL_R_RECORD_LENGTH_MISMATCH:
    case SSL_R_UNEXPECTED_RECORD:
    case SSL_R_UNEXPECTED_MESSAGE:
    case SSL_R_LENGTH_MISMATCH:
    case SSL_R_BAD_PACKET_LENGTH:
    case SSL_R_UNEXPECTED_EOF_WHILE_READING:
      return kNotTls;
    default: {
      const char* text = ERR_reason_error_string(static_cast<unsigned long>(ec.value()));
      return text ? text : ec.message();
    }
  }
}

// The one place where Asio's error codes become Status.
Status status_from_asio(const boost::system::error_code& ec, const std::string& context) {
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

// TLS over a TCP socket through OpenSSL memory BIOs, on the I/O thread only.
//
// Why not asio::ssl::stream: it moves one TLS record (16 KiB) per system call through a
// 17 KiB BIO pair, both ways, and takes one buffer of a gathered write at a time (a record
// and a system call for each 24-byte frame header). Here a write encrypts up to
// kTlsWriteBatchBytes of frames into the write BIO and hands the records to the kernel in one
// send; a read takes up to kTlsReadChunkBytes from the kernel into a buffer that SSL reads in
// place, and decrypts as many records as the caller's buffer holds. The TLS itself (handshake, verification, records, alerts) is
// OpenSSL's; the SSL_CTX is the TlsConfig's Asio context.
// Rules: one read op and one write op may be in flight at once (as for a socket); the
// handshake and shutdown run alone. Output that SSL_read produces (an alert, a KeyUpdate
// answer) waits in the write BIO for the next write or shutdown. Buffers are bounded: before
// the handshake completes a read takes at most one record (kTlsRecordBytes), so an
// unauthenticated peer costs one SSL object and ~20 KiB.
constexpr std::size_t kTlsRecordBytes = 16u * 1024 + 512;
constexpr std::size_t kTlsReadChunkBytes = 128u << 10;
constexpr std::size_t kTlsWriteBatchBytes = 256u << 10;

// The write BIO of a TlsEngine: SSL appends its records to a std::string of the engine
// (no BIO buffer in between, and no copy out of one before the send).
BIO_METHOD* staging_bio_method() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "ferry-staging");
    FERRY_ASSERT(m != nullptr);
    BIO_meth_set_create(m, [](BIO* b) {
      BIO_set_init(b, 1);
      return 1;
    });
    BIO_meth_set_write(m, [](BIO* b, const char* data, int len) {
      auto* out = static_cast<std::string*>(BIO_get_data(b));
      FERRY_ASSERT(out != nullptr && len >= 0);
      out->append(data, static_cast<std::size_t>(len));
      return len;
    });
    BIO_meth_set_ctrl(m, [](BIO* b, int cmd, long, void*) -> long {
      if (cmd == BIO_CTRL_FLUSH) return 1;  // the engine sends on its own schedule
      if (cmd == BIO_CTRL_PENDING || cmd == BIO_CTRL_WPENDING)
        return static_cast<long>(static_cast<std::string*>(BIO_get_data(b))->size());
      return 0;  // no kTLS, no datagrams, nothing else
    });
    return m;
  }();
  return method;
}

class TlsEngine {
 public:
  using Handler = std::function<void(const boost::system::error_code&, std::size_t)>;
  using DoneHandler = std::function<void(const boost::system::error_code&)>;

  TlsEngine(tcp::socket socket, asio::ssl::context& ctx) : socket_(std::move(socket)) {
    ssl_ = SSL_new(ctx.native_handle());
    if (ssl_ == nullptr) throw boost::system::system_error(boost::system::error_code(
        static_cast<int>(ERR_get_error()), asio::error::get_ssl_category()), "SSL_new");
    BIO* rbio = BIO_new(BIO_s_mem());
    BIO* wbio = BIO_new(staging_bio_method());
    FERRY_ASSERT(rbio != nullptr && wbio != nullptr);
    BIO_set_data(wbio, &staging_);
    BIO_set_mem_eof_return(rbio, -1);  // empty means "want more", not end of stream
    SSL_set_bio(ssl_, rbio, wbio);     // ssl_ owns both
    SSL_set_mode(ssl_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                           SSL_MODE_RELEASE_BUFFERS);
    SSL_set_ex_data(ssl_, tls_detail::ticket_seen_index(), &ticket_seen_);
  }
  ~TlsEngine() { SSL_free(ssl_); }
  TlsEngine(const TlsEngine&) = delete;
  TlsEngine& operator=(const TlsEngine&) = delete;

  SSL* native_handle() { return ssl_; }
  tcp::socket& next_layer() { return socket_; }
  auto get_executor() { return socket_.get_executor(); }

  void async_handshake(asio::ssl::stream_base::handshake_type type, DoneHandler handler) {
    if (type == asio::ssl::stream_base::client) SSL_set_connect_state(ssl_);
    else SSL_set_accept_state(ssl_);
    handshake_step(std::move(handler));
  }

  // Client, after the handshake: waits until the server has accepted our certificate (its
  // ticket arrived, or data) or refused it (its alert). Application data stays unread.
  void async_confirm(DoneHandler handler) {
    ERR_clear_error();
    char byte;
    std::size_t n = 0;
    int r = SSL_peek_ex(ssl_, &byte, 1, &n);
    if (r == 1 || ticket_seen_) return handler({});
    if (SSL_get_error(ssl_, r) == SSL_ERROR_WANT_READ) {
      return fill(kTlsRecordBytes, [this, handler = std::move(handler)](const boost::system::error_code& ec) mutable {
        if (ec) return handler(ec);
        async_confirm(std::move(handler));
      });
    }
    boost::system::error_code failure = ssl_error(r);
    flush([failure, handler = std::move(handler)](const boost::system::error_code&) { handler(failure); });
  }

  template <class Buffer>
  void async_read_some(const Buffer& buffer, Handler handler) {
    read_step(static_cast<char*>(buffer.data()), buffer.size(), std::move(handler));
  }

  // Reads exactly buffer.size() bytes.
  template <class Buffer>
  void async_read(const Buffer& buffer, Handler handler) {
    read_exact(static_cast<char*>(buffer.data()), buffer.size(), 0, std::move(handler));
  }

  template <class Buffers>
  void async_write(const Buffers& buffers, Handler handler) {
    FERRY_ASSERT(!writing_);
    write_buffers_.assign(asio::buffer_sequence_begin(buffers), asio::buffer_sequence_end(buffers));
    write_index_ = 0;
    write_offset_ = 0;
    write_total_ = 0;
    writing_ = true;
    write_step(std::move(handler));
  }

  // Sends close_notify (not waiting for the peer's); fails at once while a write is in
  // flight, whose records must not be cut.
  void async_shutdown(DoneHandler handler) {
    if (writing_) return asio::post(get_executor(), [h = std::move(handler)] { h(asio::error::in_progress); });
    SSL_shutdown(ssl_);
    ERR_clear_error();
    writing_ = true;
    flush([this, h = std::move(handler)](const boost::system::error_code& ec) {
      writing_ = false;
      h(ec);
    });
  }

 private:
  // The error of a failed SSL call, as Asio's SSL streams report it.
  boost::system::error_code ssl_error(int ret) {
    int err = SSL_get_error(ssl_, ret);
    if (err == SSL_ERROR_ZERO_RETURN) return asio::error::eof;
    unsigned long e = ERR_get_error();
    ERR_clear_error();
    if (e == 0) return asio::ssl::error::stream_truncated;
    return boost::system::error_code(static_cast<int>(e), asio::error::get_ssl_category());
  }

  std::size_t pending_output() const { return staging_.size(); }

  // Sends every record SSL has written (swapped into out_ first: SSL may append to staging_
  // while the socket write runs, e.g. an alert from a read).
  void flush(DoneHandler done) {
    if (staging_.empty()) return done({});
    out_.swap(staging_);
    staging_.clear();
    asio::async_write(socket_, asio::buffer(out_),
                      [this, done = std::move(done)](const boost::system::error_code& ec, std::size_t) {
                        if (ec) return done(ec);
                        flush(std::move(done));
                      });
  }

  // Reads what the kernel holds (at most `limit` bytes) and lets SSL read it in place: the
  // read BIO is a read-only memory BIO over raw_ (no copy into a BIO). Bytes SSL has not
  // taken yet (at most a partial record) move to the front of raw_ first.
  void fill(std::size_t limit, DoneHandler done) {
    char* unread = nullptr;
    long left_long = BIO_get_mem_data(SSL_get_rbio(ssl_), &unread);
    const std::size_t left = left_long > 0 ? static_cast<std::size_t>(left_long) : 0;
    FERRY_ASSERT(left <= kTlsRecordBytes);  // SSL takes whole records as they come
    if (raw_size_ < left + limit) {
      std::unique_ptr<char[]> bigger(new char[left + limit]);
      if (left > 0) std::memcpy(bigger.get(), unread, left);
      raw_ = std::move(bigger);
      raw_size_ = left + limit;
    } else if (left > 0 && unread != raw_.get()) {
      std::memmove(raw_.get(), unread, left);
    }
    set_read_bio(left);  // the old BIO pointed at bytes that just moved
    socket_.async_read_some(
        asio::buffer(raw_.get() + left, limit),
        [this, left, done = std::move(done)](const boost::system::error_code& ec, std::size_t n) {
          if (ec == asio::error::eof) {
            bool closed = SSL_get_shutdown(ssl_) & SSL_RECEIVED_SHUTDOWN;
            return done(closed ? asio::error::eof
                               : boost::system::error_code(asio::ssl::error::stream_truncated));
          }
          if (ec) return done(ec);
          set_read_bio(left + n);
          done({});
        });
  }

  void set_read_bio(std::size_t bytes) {
    BIO* bio = bytes > 0 ? BIO_new_mem_buf(raw_.get(), static_cast<int>(bytes)) : BIO_new(BIO_s_mem());
    FERRY_ASSERT(bio != nullptr);
    BIO_set_mem_eof_return(bio, -1);  // empty means "want more", not end of stream
    SSL_set0_rbio(ssl_, bio);         // frees the previous one
  }

  void handshake_step(DoneHandler handler) {
    ERR_clear_error();
    int r = SSL_do_handshake(ssl_);
    if (r == 1) return flush(std::move(handler));  // the client's Finished goes out first
    int err = SSL_get_error(ssl_, r);
    if (err == SSL_ERROR_WANT_READ) {
      return flush([this, handler = std::move(handler)](const boost::system::error_code& ec) mutable {
        if (ec) return handler(ec);
        fill(kTlsRecordBytes, [this, handler = std::move(handler)](const boost::system::error_code& ec2) mutable {
          if (ec2) return handler(ec2);
          handshake_step(std::move(handler));
        });
      });
    }
    boost::system::error_code failure = ssl_error(r);
    // The alert that says why goes to the peer (best effort), then the failure is reported.
    flush([failure, handler = std::move(handler)](const boost::system::error_code&) { handler(failure); });
  }

  void read_step(char* data, std::size_t size, Handler handler) {
    std::size_t filled = 0;
    int last = 1;
    while (filled < size) {
      std::size_t n = 0;
      ERR_clear_error();
      last = SSL_read_ex(ssl_, data + filled, size - filled, &n);
      if (last != 1) break;
      filled += n;
    }
    if (filled > 0 || size == 0)
      return asio::post(get_executor(), [handler = std::move(handler), filled] { handler({}, filled); });
    int err = SSL_get_error(ssl_, last);
    if (err == SSL_ERROR_WANT_READ) {
      return fill(kTlsReadChunkBytes, [this, data, size, handler = std::move(handler)](
                                          const boost::system::error_code& ec) mutable {
        if (ec) return handler(ec, 0);
        read_step(data, size, std::move(handler));
      });
    }
    boost::system::error_code failure = ssl_error(last);
    asio::post(get_executor(), [handler = std::move(handler), failure] { handler(failure, 0); });
  }

  void read_exact(char* data, std::size_t size, std::size_t have, Handler handler) {
    if (have == size) return handler({}, size);
    read_step(data + have, size - have,
              [this, data, size, have, handler = std::move(handler)](const boost::system::error_code& ec,
                                                                    std::size_t n) mutable {
                if (ec) return handler(ec, have + n);
                read_exact(data, size, have + n, std::move(handler));
              });
  }

  // Encrypts up to kTlsWriteBatchBytes of the caller's buffers, sends the records, repeats.
  void write_step(Handler handler) {
    while (write_index_ < write_buffers_.size() && pending_output() < kTlsWriteBatchBytes) {
      const asio::const_buffer& b = write_buffers_[write_index_];
      std::size_t left = b.size() - write_offset_;
      if (left == 0) {
        ++write_index_;
        write_offset_ = 0;
        continue;
      }
      std::size_t n = 0;
      ERR_clear_error();
      int r = SSL_write_ex(ssl_, static_cast<const char*>(b.data()) + write_offset_,
                           std::min(left, kTlsWriteBatchBytes), &n);
      if (r != 1) {
        boost::system::error_code failure = ssl_error(r);
        writing_ = false;
        return asio::post(get_executor(), [handler = std::move(handler), failure, t = write_total_] {
          handler(failure, t);
        });
      }
      write_offset_ += n;
      write_total_ += n;
    }
    bool last = write_index_ >= write_buffers_.size();
    flush([this, last, handler = std::move(handler)](const boost::system::error_code& ec) mutable {
      if (ec || last) {
        writing_ = false;
        // An idle connection keeps no batch-sized buffer (500 idle peers, 500 x 256 KiB).
        if (out_.capacity() > 2 * kTlsRecordBytes) std::string().swap(out_);
        if (staging_.capacity() > 2 * kTlsRecordBytes) std::string().swap(staging_);
        return handler(ec, write_total_);
      }
      write_step(std::move(handler));
    });
  }

  tcp::socket socket_;
  SSL* ssl_ = nullptr;
  std::unique_ptr<char[]> raw_;  // kernel -> SSL (the read BIO reads it in place); grows from
                                 // about two records to kTlsReadChunkBytes after the handshake
  std::size_t raw_size_ = 0;
  std::string staging_;          // SSL's records, not yet handed to a send (the write BIO's)
  std::string out_;              // records being sent
  bool writing_ = false;         // a write (or shutdown) is in flight
  bool ticket_seen_ = false;     // client: the server's NewSessionTicket arrived
  std::vector<asio::const_buffer> write_buffers_;
  std::size_t write_index_ = 0, write_offset_ = 0, write_total_ = 0;
};
using TlsStream = TlsEngine;

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
  // Flushes for at most `timeout`, then closes (a Server handler returned).
  void finish(milliseconds timeout) {
    (void)wait_flushed(deadline_after(timeout));
    close();
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
