// Connections and Server over real loopback TCP: exchange, large frames, backpressure, bad
// bytes on the port, disconnects, stop() while a handler waits, connection limit, IPv6.
#include <catch2/catch.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "ferry/base/bytes.h"
#include "ferry/base/fd.h"
#include "ferry/transport/connection.h"

using namespace ferry;
using namespace ferry::transport;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

// Statuses the server's handlers ended with, for the test thread to wait on.
class Outcomes {
 public:
  void add(Status s) {
    std::lock_guard lock(mu_);
    all_.push_back(std::move(s));
    cv_.notify_all();
  }
  // Waits until `n` handlers reported; fails the test after 10 s.
  std::vector<Status> wait_for(std::size_t n) {
    std::unique_lock lock(mu_);
    bool got = cv_.wait_for(lock, 10s, [&] { return all_.size() >= n; });
    REQUIRE(got);
    return all_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Status> all_;
};

std::unique_ptr<Server> listen_local(Server::Handler handler, ServerOptions options = {}) {
  Result<std::unique_ptr<Server>> server =
      Server::listen(Endpoint{"127.0.0.1", 0}, options, std::move(handler));
  REQUIRE(server.is_ok());
  REQUIRE(server.value()->port() != 0);
  return std::move(server).value();
}

std::unique_ptr<Connection> connect_local(std::uint16_t port, ConnectionOptions options = {}) {
  Result<std::unique_ptr<Connection>> conn = Connection::connect(Endpoint{"127.0.0.1", port}, options);
  INFO(conn.status().to_string());
  REQUIRE(conn.is_ok());
  return std::move(conn).value();
}

// Reads frames until the connection ends; reports how it ended.
Status drain(Connection& conn) {
  for (;;) {
    Result<Frame> f = conn.receive(10s);
    if (!f.is_ok()) return f.status();
  }
}

// A plain POSIX socket, for bytes no Connection would send.
UniqueFd raw_connect(std::uint16_t port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM, 0));
  REQUIRE(fd.valid());
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}

// True when the peer closed `fd` within the timeout (read returns 0 or an error).
bool closed_by_peer(int fd, int timeout_ms) {
  char buf[4096];
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) return true;
  }
  return false;
}

std::string pattern(std::size_t size, std::uint64_t seed) {
  std::string s(size, '\0');
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (std::size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    s[i] = static_cast<char>(x);
  }
  return s;
}

}  // namespace

TEST_CASE("parse_endpoint accepts host:port and [v6]:port, names bad text") {
  Result<Endpoint> e = parse_endpoint("127.0.0.1:7000");
  REQUIRE(e.is_ok());
  CHECK(e->host == "127.0.0.1");
  CHECK(e->port == 7000);
  CHECK(e->to_string() == "127.0.0.1:7000");
  e = parse_endpoint("[::1]:65535");
  REQUIRE(e.is_ok());
  CHECK(e->host == "::1");
  CHECK(e->to_string() == "[::1]:65535");
  e = parse_endpoint("replica.example:1");
  REQUIRE(e.is_ok());
  CHECK(e->host == "replica.example");
  CHECK(parse_endpoint("0.0.0.0:0", true).is_ok());
  for (const char* bad : {"", "host", "host:", ":80", "host:0", "host:65536", "host:12x", "::1:80",
                          "[::1]", "[::1]80", "[nothost]:80", "[::1:80", "ho st:80",
                          "host:123456"}) {
    INFO(bad);
    Result<Endpoint> r = parse_endpoint(bad);
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == Errc::invalid_argument);
    CHECK_THAT(r.status().message(), Catch::Contains(std::string("\"") + bad + "\""));
  }
}

TEST_CASE("client and server exchange messages both ways") {
  Outcomes outcomes;
  auto server = listen_local([&](Connection& conn) {
    Result<Frame> f = conn.receive(10s);
    if (!f.is_ok()) return outcomes.add(f.status());
    Result<Hello> hello = decode_hello(f->payload);
    if (!hello.is_ok()) return outcomes.add(hello.status());
    HelloReply reply;
    reply.message = "hello " + hello->group;
    reply.last_committed_rp = 41;
    Status s = conn.send(MsgType::hello_reply, encode(reply));
    if (!s.is_ok()) return outcomes.add(s);
    outcomes.add(drain(conn));
  });
  auto client = connect_local(server->port());
  CHECK_THAT(client->peer(), Catch::StartsWith("127.0.0.1:"));
  Hello hello;
  hello.group = "vm1";
  hello.disks = {{"vda", 1 << 20, 65536}};
  REQUIRE(client->send(MsgType::hello, encode(hello)).is_ok());
  Result<Frame> f = client->receive(10s);
  REQUIRE(f.is_ok());
  CHECK(f->type == MsgType::hello_reply);
  Result<HelloReply> reply = decode_hello_reply(f->payload);
  REQUIRE(reply.is_ok());
  CHECK(reply->message == "hello vm1");
  CHECK(reply->last_committed_rp == 41);
  CHECK(client->bytes_sent() == kFrameHeaderBytes + encode(hello).size());
  CHECK(client->bytes_received() == kFrameHeaderBytes + f->payload.size());
  CHECK(client->receive(50ms).status().code() == Errc::timeout);
  client.reset();  // the server's handler sees the disconnect
  auto done = outcomes.wait_for(1);
  CHECK(done[0].code() == Errc::disconnected);
}

TEST_CASE("large frames arrive intact and in order") {
  constexpr int kFrames = 24;
  Outcomes outcomes;
  auto server = listen_local([&](Connection& conn) {
    for (int i = 0; i < kFrames; ++i) {  // echo each frame back
      Result<Frame> f = conn.receive(10s);
      if (!f.is_ok()) return outcomes.add(f.status());
      Status s = conn.send_owned(f->type, std::move(f->payload));
      if (!s.is_ok()) return outcomes.add(s);
    }
    outcomes.add(conn.flush());
  });
  auto client = connect_local(server->port());
  Status send_status;  // Catch's assertions are for the test thread only
  std::thread sender([&] {
    for (int i = 0; i < kFrames && send_status.is_ok(); ++i) {
      std::size_t size = i % 3 == 0 ? kMaxPayloadBytes : (i * 77777) % kMaxPayloadBytes;
      send_status = client->send(MsgType::data, pattern(size, i));
    }
  });
  for (int i = 0; i < kFrames; ++i) {
    Result<Frame> f = client->receive(20s);
    REQUIRE(f.is_ok());
    std::size_t size = i % 3 == 0 ? kMaxPayloadBytes : (i * 77777) % kMaxPayloadBytes;
    CHECK(f->payload == pattern(size, i));
  }
  sender.join();
  CHECK(send_status.is_ok());
  CHECK(outcomes.wait_for(1)[0].is_ok());
}

TEST_CASE("many small frames, sizes around the receive buffer's, arrive intact and in order") {
  // Frames of 0 B .. 300 KiB: several per read, frames cut across reads, and frames larger
  // than the connection's 256 KiB receive buffer between them.
  constexpr int kFrames = 3000;
  auto size_of = [](int i) -> std::size_t {
    std::uint64_t x = std::uint64_t(i) * 2654435761u;
    switch (i % 4) {
      case 0: return x % 64;
      case 1: return x % 4096;
      case 2: return 60000 + x % 8000;
      default: return (i % 40 == 3) ? 250000 + x % 60000 : x % 20000;
    }
  };
  Outcomes outcomes;
  auto server = listen_local([&](Connection& conn) {
    for (int i = 0; i < kFrames; ++i) {
      Result<Frame> f = conn.receive(10s);
      if (!f.is_ok()) return outcomes.add(f.status());
      if (f->payload != pattern(size_of(i), i))
        return outcomes.add(Status::error(Errc::corrupt, "frame " + std::to_string(i) + " differs"));
    }
    outcomes.add(Status::ok());
  });
  auto client = connect_local(server->port());
  for (int i = 0; i < kFrames; ++i) REQUIRE(client->send(MsgType::data, pattern(size_of(i), i)).is_ok());
  REQUIRE(client->flush().is_ok());
  Status got = outcomes.wait_for(1)[0];
  INFO(got.to_string());
  CHECK(got.is_ok());
}

TEST_CASE("a receiver that does not read makes send() block with bounded queues") {
  constexpr std::size_t kFrameBytes = 256 << 10;
  ConnectionOptions small;
  small.max_send_queue_bytes = 2 << 20;
  small.max_recv_queue_bytes = 2 << 20;
  ServerOptions server_options;
  server_options.connection = small;
  std::atomic<bool> start_reading{false};
  std::atomic<std::uint64_t> server_bytes{0};
  Outcomes outcomes;
  auto server = listen_local(
      [&](Connection& conn) {
        while (!start_reading.load()) {
          server_bytes = conn.bytes_received();
          std::this_thread::sleep_for(10ms);
        }
        std::uint64_t n = 0;
        for (;;) {
          Result<Frame> f = conn.receive(10s);
          if (!f.is_ok()) return outcomes.add(f.status());
          if (f->payload != pattern(kFrameBytes, n++)) return outcomes.add(Status::error(Errc::corrupt, "payload"));
          if (n == 400) return outcomes.add(Status::ok());
        }
      },
      server_options);
  auto client = connect_local(server->port(), small);
  std::atomic<std::uint64_t> frames_sent{0};
  Status send_status;
  std::thread sender([&] {
    for (std::uint64_t i = 0; i < 400 && send_status.is_ok(); ++i) {
      send_status = client->send(MsgType::data, pattern(kFrameBytes, i));
      frames_sent = i + 1;
    }
  });
  std::this_thread::sleep_for(1500ms);
  std::uint64_t stalled_at = frames_sent.load();
  std::this_thread::sleep_for(500ms);
  INFO("frames sent " << stalled_at << ", client wrote " << client->bytes_sent()
                      << ", server read " << server_bytes.load());
  CHECK(frames_sent.load() == stalled_at);  // send() is blocked
  CHECK(stalled_at < 400);
  // What send() accepted and the socket has not taken stays within the send bound.
  std::uint64_t accepted = stalled_at * (kFrameBytes + kFrameHeaderBytes);
  CHECK(accepted - client->bytes_sent() <= small.max_send_queue_bytes);
  // The server stopped reading once its queue passed the bound (plus the frame in flight).
  CHECK(server_bytes.load() <= small.max_recv_queue_bytes + kFrameBytes + kFrameHeaderBytes);
  start_reading = true;
  sender.join();
  CHECK(send_status.is_ok());
  CHECK(outcomes.wait_for(1)[0].is_ok());
}

TEST_CASE("garbage and a wrong magic give a protocol error; the server keeps serving") {
  Outcomes outcomes;
  auto server = listen_local([&](Connection& conn) {
    Result<Frame> f = conn.receive(10s);
    if (!f.is_ok()) return outcomes.add(f.status());
    Status s = conn.send(f->type, f->payload);  // echo
    outcomes.add(s.is_ok() ? drain(conn) : s);
  });
  {
    UniqueFd fd = raw_connect(server->port());
    std::string garbage = pattern(100, 7);
    REQUIRE(::write(fd.get(), garbage.data(), garbage.size()) == 100);
    CHECK(closed_by_peer(fd.get(), 5000));
  }
  auto done = outcomes.wait_for(1);
  CHECK(done[0].code() == Errc::protocol);
  CHECK_THAT(done[0].message(), Catch::Contains("frame.magic"));
  CHECK_THAT(done[0].message(), Catch::Contains("127.0.0.1:"));
  {
    UniqueFd fd = raw_connect(server->port());
    std::string frame = encode_frame(MsgType::rp_end, encode(RpEnd{}));
    store_le32(frame.data(), 0x31595246 ^ 0x100);
    REQUIRE(::write(fd.get(), frame.data(), frame.size()) == static_cast<ssize_t>(frame.size()));
    CHECK(closed_by_peer(fd.get(), 5000));
  }
  done = outcomes.wait_for(2);
  CHECK(done[1].code() == Errc::protocol);
  CHECK_THAT(done[1].message(), Catch::Contains("frame.magic"));
  {
    UniqueFd fd = raw_connect(server->port());
    std::string frame = encode_frame(MsgType::rp_end, encode(RpEnd{1, 2, 3}));
    frame.back() ^= 1;  // payload bit flip: only the checksum can tell
    REQUIRE(::write(fd.get(), frame.data(), frame.size()) == static_cast<ssize_t>(frame.size()));
    CHECK(closed_by_peer(fd.get(), 5000));
  }
  done = outcomes.wait_for(3);
  CHECK(done[2].code() == Errc::protocol);
  CHECK_THAT(done[2].message(), Catch::Contains("frame.checksum"));
  {
    UniqueFd fd = raw_connect(server->port());
    std::string header = encode_frame(MsgType::data, "").substr(0, kFrameHeaderBytes);
    store_le32(header.data() + 8, kMaxPayloadBytes + 1);
    REQUIRE(::write(fd.get(), header.data(), header.size()) == static_cast<ssize_t>(header.size()));
    CHECK(closed_by_peer(fd.get(), 5000));
  }
  done = outcomes.wait_for(4);
  CHECK(done[3].code() == Errc::protocol);
  CHECK_THAT(done[3].message(), Catch::Contains("frame.payload_bytes"));

  auto client = connect_local(server->port());
  REQUIRE(client->send(MsgType::rp_end, encode(RpEnd{9, 1, 1})).is_ok());
  Result<Frame> echo = client->receive(10s);
  REQUIRE(echo.is_ok());
  CHECK(decode_rp_end(echo->payload).value() == RpEnd{9, 1, 1});
}

TEST_CASE("frames sent before a disconnect are received, then Errc::disconnected") {
  Outcomes outcomes;
  auto server = listen_local([&](Connection& conn) {
    for (std::uint64_t i = 0; i < 3; ++i)
      if (Status s = conn.send(MsgType::rp_ack, encode(RpAck{i + 1, WireStatus::ok, ""})); !s.is_ok())
        return outcomes.add(s);
    outcomes.add(Status::ok());
    // Returning closes the connection after a bounded flush.
  });
  auto client = connect_local(server->port());
  for (std::uint64_t i = 0; i < 3; ++i) {
    Result<Frame> f = client->receive(10s);
    REQUIRE(f.is_ok());
    CHECK(decode_rp_ack(f->payload)->rp_id == i + 1);
  }
  Result<Frame> end = client->receive(10s);
  REQUIRE_FALSE(end.is_ok());
  CHECK(end.status().code() == Errc::disconnected);
  CHECK(client->send(MsgType::rp_end, encode(RpEnd{})).code() != Errc::ok);
  CHECK(outcomes.wait_for(1)[0].is_ok());
}

TEST_CASE("close_with_error delivers an error frame before closing") {
  auto server = listen_local([&](Connection& conn) {
    conn.close_with_error(WireStatus::busy, "another source sends to vm1");
  });
  auto client = connect_local(server->port());
  Result<Frame> f = client->receive(10s);
  REQUIRE(f.is_ok());
  REQUIRE(f->type == MsgType::error);
  Result<ErrorMsg> e = decode_error(f->payload);
  REQUIRE(e.is_ok());
  CHECK(e->status == WireStatus::busy);
  CHECK(e->message == "another source sends to vm1");
  CHECK(client->receive(10s).status().code() == Errc::disconnected);
}

TEST_CASE("stop() while a handler is blocked in receive() returns promptly") {
  Outcomes outcomes;
  std::atomic<bool> in_handler{false};
  auto server = listen_local([&](Connection& conn) {
    in_handler = true;
    outcomes.add(conn.receive(60s).status());
  });
  auto client = connect_local(server->port());
  auto deadline = Clock::now() + 10s;
  while (!in_handler.load() && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
  REQUIRE(in_handler.load());
  auto t0 = Clock::now();
  server->stop();
  CHECK(Clock::now() - t0 < 2s);
  auto done = outcomes.wait_for(1);
  CHECK(done[0].code() == Errc::cancelled);
  CHECK(client->receive(10s).status().code() == Errc::disconnected);
  // The port no longer accepts.
  CHECK_FALSE(Connection::connect(Endpoint{"127.0.0.1", server->port()}).is_ok());
}

TEST_CASE("stop() while a handler is blocked in send() returns promptly") {
  ConnectionOptions small;
  small.max_send_queue_bytes = 1 << 20;
  small.max_recv_queue_bytes = 1 << 20;
  ServerOptions options;
  options.connection = small;
  Outcomes outcomes;
  std::atomic<int> frames_queued{0};
  auto server = listen_local(
      [&](Connection& conn) {
        std::string block(1 << 20, 'b');
        for (;;) {  // the client never reads: this blocks once every buffer is full
          Status s = conn.send(MsgType::data, block);
          if (!s.is_ok()) return outcomes.add(s);
          ++frames_queued;
        }
      },
      options);
  auto client = connect_local(server->port(), small);
  std::this_thread::sleep_for(1s);
  int stalled_at = frames_queued.load();
  std::this_thread::sleep_for(300ms);
  REQUIRE(frames_queued.load() == stalled_at);  // the handler is blocked in send()
  auto t0 = Clock::now();
  server->stop();
  CHECK(Clock::now() - t0 < 2s);
  CHECK(outcomes.wait_for(1)[0].code() == Errc::cancelled);
}

TEST_CASE("connections beyond max_connections are closed at once") {
  ServerOptions options;
  options.max_connections = 1;
  std::atomic<bool> release{false};
  std::atomic<int> handlers{0};
  auto server = listen_local(
      [&](Connection&) {
        ++handlers;
        while (!release.load()) std::this_thread::sleep_for(5ms);
      },
      options);
  auto first = connect_local(server->port());
  auto deadline = Clock::now() + 10s;  // the server must have admitted the first one
  while (handlers.load() == 0 && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
  REQUIRE(handlers.load() == 1);
  auto second = connect_local(server->port());
  auto t0 = Clock::now();
  CHECK(second->receive(10s).status().code() == Errc::disconnected);
  CHECK(Clock::now() - t0 < 2s);
  CHECK(first->receive(100ms).status().code() == Errc::timeout);  // still open
  release = true;
  CHECK(first->receive(10s).status().code() == Errc::disconnected);
  CHECK(handlers.load() == 1);
}

TEST_CASE("connect failures are values") {
  // A port nobody listens on: bind one, learn its number, close it.
  auto server = listen_local([](Connection&) {});
  std::uint16_t port = server->port();
  server->stop();
  Result<std::unique_ptr<Connection>> c = Connection::connect(Endpoint{"127.0.0.1", port});
  REQUIRE_FALSE(c.is_ok());
  CHECK(c.status().code() == Errc::disconnected);
  CHECK_THAT(c.status().message(), Catch::Contains("127.0.0.1:" + std::to_string(port)));
  Result<std::unique_ptr<Connection>> n = Connection::connect(Endpoint{"no-such-host.invalid", 1});
  REQUIRE_FALSE(n.is_ok());
  CHECK(n.status().code() == Errc::not_found);
}

TEST_CASE("IPv6 loopback works") {
  Result<std::unique_ptr<Server>> server = Server::listen(
      Endpoint{"::1", 0}, {}, [](Connection& conn) {
        Result<Frame> f = conn.receive(10s);
        if (f.is_ok()) (void)conn.send(f->type, f->payload);
      });
  if (!server.is_ok()) {
    WARN("no IPv6 loopback here: " << server.status().to_string());
    return;
  }
  Result<Endpoint> at = parse_endpoint("[::1]:" + std::to_string(server.value()->port()));
  REQUIRE(at.is_ok());
  Result<std::unique_ptr<Connection>> c = Connection::connect(*at);
  REQUIRE(c.is_ok());
  CHECK_THAT(c.value()->peer(), Catch::StartsWith("[::1]:"));
  REQUIRE(c.value()->send(MsgType::rp_end, encode(RpEnd{1, 0, 0})).is_ok());
  Result<Frame> f = c.value()->receive(10s);
  REQUIRE(f.is_ok());
  CHECK(decode_rp_end(f->payload).value() == RpEnd{1, 0, 0});
}

// A figure, not a check (the machine may be shared): run with "[.perf]".
TEST_CASE("throughput of one connection on loopback", "[.perf]") {
  // The engine's default block is 64 KiB; a DATA frame carries one block.
  std::size_t kFrameBytes = GENERATE(std::size_t(64) << 10, std::size_t(1) << 20);
  int kFrames = static_cast<int>((std::size_t(2) << 30) / kFrameBytes);
  std::atomic<std::uint64_t> received{0};
  auto server = listen_local([&](Connection& conn) {
    for (;;) {
      Result<Frame> f = conn.receive(10s);
      if (!f.is_ok()) return;
      received += f->payload.size();
    }
  });
  auto client = connect_local(server->port());
  std::string block = pattern(kFrameBytes, 1);
  auto t0 = Clock::now();
  for (int i = 0; i < kFrames; ++i) REQUIRE(client->send_owned(MsgType::data, block).is_ok());
  REQUIRE(client->flush().is_ok());
  while (received.load() < kFrames * kFrameBytes) std::this_thread::sleep_for(1ms);
  double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  WARN("throughput with " << kFrameBytes / 1024 << " KiB frames: "
                          << (kFrames * kFrameBytes / seconds / 1e6) << " MB/s");
}

// flush() answers "did my frames reach the kernel": yes, even when the peer read them and
// closed before flush() looked (a --once source closes right after reading its ack).
TEST_CASE("flush succeeds once its frames were sent, even if the peer closed since",
          "[connection]") {
  Outcomes out;
  auto server = listen_local([&](Connection& c) {
    if (!c.send(MsgType::rp_ack, "the last frame").is_ok()) return out.add(Status::error(Errc::internal, "send"));
    Result<Frame> f = c.receive(10s);  // the peer's close
    if (f.is_ok()) return out.add(Status::error(Errc::internal, "unexpected frame"));
    out.add(c.flush());
  });
  auto client = connect_local(server->port());
  Result<Frame> f = client->receive(10s);
  REQUIRE(f.is_ok());
  client->close();
  std::vector<Status> got = out.wait_for(1);
  INFO(got[0].to_string());
  CHECK(got[0].is_ok());
}

// A handler's last frame (a refusal) reaches a peer that is still streaming frames when the
// handler returns: the server reads and drops them until the peer closes (a lingering
// close), instead of closing with unread bytes, whose reset would end the peer's connection
// before it read the refusal.
TEST_CASE("a handler's last frame reaches a peer still sending when the handler returns",
          "[connection]") {
  int delivered = 0;
  const int rounds = 20;
  for (int round = 0; round < rounds; ++round) {
    auto server = listen_local([&](Connection& c) {
      (void)c.receive(10s);
      (void)c.send(MsgType::error, "refused");
    });
    auto client = connect_local(server->port());
    std::atomic<bool> stop{false};
    const std::string big(256u << 10, 'x');
    std::thread sender([&] {
      while (!stop.load() && client->send(MsgType::data, big).is_ok()) {
      }
    });
    Result<Frame> f = client->receive(10s);
    stop.store(true);
    client->close();
    sender.join();
    if (f.is_ok() && f->type == MsgType::error && f->payload == "refused") ++delivered;
  }
  CHECK(delivered == rounds);
}
