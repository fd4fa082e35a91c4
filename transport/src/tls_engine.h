// Site of the TLS record engine of connection.cc: OpenSSL over memory BIOs on a TCP socket,
// driven by the connection's I/O thread, and the plain-words description of TLS failures.
// Internal to transport/ (includes Asio and OpenSSL). The handshake, verification, records and
// alerts are OpenSSL's; only the plumbing between SSL and the socket is ours, for the reasons
// given above TlsEngine.
#pragma once

#include <utility>  // before Asio: GCC 12 needs it for Asio's coroutine support headers

#include <boost/asio.hpp>

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "ferry/base/status.h"
#include "tls_internal.h"

namespace ferry::transport::tls_detail {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;

inline constexpr const char* kNotTls = "not TLS (plaintext or garbage)";
inline constexpr const char* kClosedInHandshake = "the peer closed the connection during the handshake";

inline bool is_certificate_alert(int alert) {
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
inline std::string describe_tls_error(const boost::system::error_code& ec, SSL* ssl,
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
inline constexpr std::size_t kTlsRecordBytes = 16u * 1024 + 512;
inline constexpr std::size_t kTlsReadChunkBytes = 128u << 10;
inline constexpr std::size_t kTlsWriteBatchBytes = 256u << 10;

// The write BIO of a TlsEngine: SSL appends its records to a std::string of the engine
// (no BIO buffer in between, and no copy out of one before the send).
inline BIO_METHOD* staging_bio_method() {
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


}  // namespace ferry::transport::tls_detail
