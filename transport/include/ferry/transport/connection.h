// Framed, checksummed connections over TCP, built on Boost.Asio.
//
// Asio runs the sockets asynchronously on one I/O thread per Connection/Server; callers see a
// small thread-safe blocking facade so that the engine's logic reads top to bottom:
//  - send() queues a frame; it blocks while more than max_send_queue_bytes wait to go out
//    (backpressure toward the producer).
//  - receive() returns the next whole, checksum-verified frame. Inbound frames are read ahead
//    into a queue bounded by max_recv_queue_bytes; when it is full the socket is not read, so
//    TCP's window pushes back on the peer.
// A frame whose header or checksum is bad is never returned: receive() fails with
// Errc::protocol naming what was wrong, and the connection is closed.
// This header does not include Asio, so users do not compile it.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "ferry/base/status.h"
#include "ferry/transport/tls.h"
#include "ferry/transport/wire.h"

namespace ferry::transport {

struct Endpoint {
  std::string host;  // IPv4/IPv6 literal or name ("127.0.0.1", "::1", "localhost")
  std::uint16_t port = 0;
  std::string to_string() const;  // "host:port", "[v6]:port"
};
// Parses "HOST:PORT" or "[V6]:PORT"; a port of 0 is allowed only when allow_port_zero.
Result<Endpoint> parse_endpoint(const std::string& text, bool allow_port_zero = false);

struct Frame {
  MsgType type{};
  std::string payload;  // checksum already verified
};

struct ConnectionOptions {
  std::size_t max_send_queue_bytes = 32u << 20;
  std::size_t max_recv_queue_bytes = 32u << 20;
  std::chrono::milliseconds connect_timeout{10000};
  // Bounded wait of close_with_error(), and of the flush when a Server handler returns.
  std::chrono::milliseconds close_timeout{2000};
  // A peer that stops acknowledging (cable pulled, host gone, partition) fails the connection
  // after about this long instead of TCP's ~15 minutes (TCP_USER_TIMEOUT, plus keepalive
  // probes while idle). A peer that is alive but not reading is flow control, not death.
  std::chrono::milliseconds dead_peer_timeout{60000};
  // Mutual TLS 1.3 (null: plaintext). A client's config has Role::client, a server's
  // Role::server. A client checks the server's certificate against tls_server_name (DNS or IP
  // SAN); empty: the host of the endpoint it connects to.
  std::shared_ptr<const TlsConfig> tls;
  std::string tls_server_name;
  // The TLS handshake (client and server) fails after this long.
  std::chrono::milliseconds handshake_timeout{10000};
};

class Connection {
 public:
  virtual ~Connection() = default;
  static Result<std::unique_ptr<Connection>> connect(const Endpoint& to,
                                                     const ConnectionOptions& options = {});

  // Queues one frame. Blocks while the send queue is over its bound. Fails once the
  // connection is closed or broken (Errc::disconnected / Errc::io).
  virtual Status send(MsgType type, std::string_view payload) = 0;
  // As send(), but takes the payload by value, so a caller that moves it in saves the copy
  // (DATA frames: the engine encodes a payload once and hands it over).
  virtual Status send_owned(MsgType type, std::string payload) { return send(type, payload); }
  // Blocks until every queued frame was handed to the kernel (ok, even if the connection
  // failed after that) or the connection failed first.
  virtual Status flush() = 0;
  // Next frame; Errc::timeout after `timeout`, Errc::disconnected on orderly close,
  // Errc::protocol on a bad frame.
  virtual Result<Frame> receive(std::chrono::milliseconds timeout) = 0;
  // Sends an error frame (best effort, bounded by ConnectionOptions::close_timeout) and
  // closes, reading and dropping what the peer still sends until it closes or that time is
  // up (so that closing with unread bytes does not reset the connection before the peer read
  // the error). `message` is cut to kMaxMessageBytes.
  virtual void close_with_error(WireStatus status, const std::string& message) = 0;
  // Closes at once; frames still queued are dropped (call flush() first to keep them).
  // receive() then fails with Errc::disconnected once the frames already read are taken.
  virtual void close() = 0;
  virtual std::string peer() const = 0;
  // The verified identity of the peer (TLS connections), or null (plaintext).
  virtual const PeerIdentity* peer_identity() const { return nullptr; }
  // Byte counters, for figures: frame bytes handed to / read from the socket.
  virtual std::uint64_t bytes_sent() const = 0;
  virtual std::uint64_t bytes_received() const = 0;
};

struct ServerOptions {
  ConnectionOptions connection;
  std::size_t max_connections = 64;  // further connections are accepted and closed at once
  // Connections (handshaking or admitted) from one peer address at once; more are accepted
  // and closed at once, logged (rate-limited) with the address. TLS listeners only: a
  // plaintext listener keeps its behaviour (tests and loopback tools open many).
  std::size_t max_connections_per_address = 16;
  // Handshakes in progress at once (each costs bounded memory); more wait in the kernel's
  // accept backlog.
  std::size_t max_handshakes = 64;
};

// Accepts connections and runs `handler` for each on a thread of its own; when the handler
// returns, frames it queued are flushed and what the peer still sends is read and dropped
// until it closes (together bounded by close_timeout), then the connection is closed. A handler must return soon after stop() was called
// (receive() then fails with Errc::cancelled).
class Server {
 public:
  using Handler = std::function<void(Connection&)>;
  virtual ~Server() = default;
  static Result<std::unique_ptr<Server>> listen(const Endpoint& at, const ServerOptions& options,
                                                Handler handler);
  virtual std::uint16_t port() const = 0;  // the bound port (useful with port 0)
  // Replaces the TLS config for handshakes that start from now on (SIGHUP reload);
  // connections in flight keep theirs. Only for a server listening with TLS. Thread-safe.
  virtual void set_tls(std::shared_ptr<const TlsConfig> tls) = 0;
  // Stops accepting, cancels every connection, joins every handler thread.
  virtual void stop() = 0;
};

}  // namespace ferry::transport
