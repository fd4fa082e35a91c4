// Mutual TLS 1.3 over real loopback TCP with the real Server and Connection, against the
// throwaway PKI of test/tls/make-certs: a round trip with both identities checked, every
// refusal (checked on the client AND by the server never running its handler, with the
// cause in the server's log), file checks of TlsConfig::load, hostile peers (plaintext,
// garbage, silent, 500 at once) and a CRL reload through set_tls.
#include <utility>  // before Asio: GCC 12 needs it for Asio's coroutine support headers

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>

#include <catch2/catch.hpp>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "ferry/base/fd.h"
#include "ferry/transport/connection.h"

using namespace ferry;
using namespace ferry::transport;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

// Keeps every log line, so tests can check what the server said about a refused peer.
class CaptureSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  bool contains(const std::string& text) {
    std::lock_guard lock(mutex_);
    for (const auto& l : lines_)
      if (l.find(text) != std::string::npos) return true;
    return false;
  }
  // Waits up to 5 s for a line containing all of `parts`.
  bool wait_for(std::initializer_list<std::string> parts) {
    auto deadline = Clock::now() + 5s;
    while (Clock::now() < deadline) {
      {
        std::lock_guard lock(mutex_);
        for (const auto& l : lines_) {
          bool all = true;
          for (const auto& p : parts) all = all && l.find(p) != std::string::npos;
          if (all) return true;
        }
      }
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
  std::string all() {
    std::lock_guard lock(mutex_);
    std::string out;
    for (const auto& l : lines_) out += l + "\n";
    return out;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    if (lines_.size() < 100000) lines_.emplace_back(msg.payload.data(), msg.payload.size());
  }
  void flush_() override {}

 private:
  std::vector<std::string> lines_;
};

CaptureSink& log_sink() {
  static std::shared_ptr<CaptureSink> sink = [] {
    auto s = std::make_shared<CaptureSink>();
    auto logger = std::make_shared<spdlog::logger>("capture", s);
    logger->set_level(spdlog::level::info);
    spdlog::set_default_logger(logger);
    return s;
  }();
  return *sink;
}

// The PKI, made once per test process in a temporary directory, removed at exit.
struct PkiDir {
  std::string path;
  ~PkiDir() {
    std::error_code ignored;
    if (!path.empty()) std::filesystem::remove_all(path, ignored);
  }
};
const std::string& pki() {
  static PkiDir dir{[] {
    char tmpl[] = "/tmp/ferry-tls-test.XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    const char* script = std::getenv("FERRY_MAKE_CERTS");
    std::string cmd = std::string(script ? script : "test/tls/make-certs") + " " + tmpl;
    REQUIRE(std::system(cmd.c_str()) == 0);
    return std::string(tmpl);
  }()};
  return dir.path;
}
std::string pki_file(const std::string& name) { return pki() + "/" + name; }

TlsFiles files_of(const std::string& who, const std::string& crl = "") {
  TlsFiles f;
  f.cert = pki_file(who + ".pem");
  f.key = pki_file(who + ".key");
  f.ca = pki_file("ca.pem");
  if (!crl.empty()) f.crl = pki_file(crl);
  return f;
}

std::shared_ptr<const TlsConfig> load(TlsConfig::Role role, const TlsFiles& files) {
  auto config = TlsConfig::load(role, files);
  INFO(config.status().to_string());
  REQUIRE(config.is_ok());
  return std::move(config).value();
}
std::shared_ptr<const TlsConfig> client_config(const std::string& who) {
  return load(TlsConfig::Role::client, files_of(who));
}

// A TLS echo server: each handler echoes frames until the peer goes; counts handlers and
// keeps the identity of the last peer.
struct EchoServer {
  std::atomic<int> handled{0};
  std::mutex mu;
  std::optional<PeerIdentity> last_peer;
  std::unique_ptr<Server> server;

  explicit EchoServer(const std::string& crl = "", ServerOptions options = {},
                      const std::string& who = "server") {
    log_sink();
    options.connection.tls = load(TlsConfig::Role::server, files_of(who, crl));
    if (options.connection.handshake_timeout == std::chrono::milliseconds(10000))
      options.connection.handshake_timeout = 500ms;
    auto s = Server::listen(Endpoint{"127.0.0.1", 0}, options, [this](Connection& conn) {
      ++handled;
      if (conn.peer_identity()) {
        std::lock_guard lock(mu);
        last_peer = *conn.peer_identity();
      }
      for (;;) {
        Result<Frame> f = conn.receive(10s);
        if (!f.is_ok()) return;
        if (f->type == MsgType::error) {
          conn.close_with_error(WireStatus::bad_request, "closing as asked");
          return;
        }
        if (!conn.send(f->type, f->payload).is_ok()) return;
      }
    });
    INFO(s.status().to_string());
    REQUIRE(s.is_ok());
    server = std::move(s).value();
  }
  std::uint16_t port() const { return server->port(); }
};

Result<std::unique_ptr<Connection>> tls_connect(std::uint16_t port, const std::string& who,
                                                const std::string& server_name = "",
                                                const std::string& host = "127.0.0.1") {
  ConnectionOptions options;
  options.tls = client_config(who);
  options.tls_server_name = server_name;
  options.handshake_timeout = 5s;
  return Connection::connect(Endpoint{host, port}, options);
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

UniqueFd raw_connect(std::uint16_t port, const char* from = nullptr) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM, 0));
  REQUIRE(fd.valid());
  if (from != nullptr) {
    sockaddr_in src{};
    src.sin_family = AF_INET;
    REQUIRE(::inet_pton(AF_INET, from, &src.sin_addr) == 1);
    REQUIRE(::bind(fd.get(), reinterpret_cast<sockaddr*>(&src), sizeof src) == 0);
  }
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
    if (::poll(&p, 1, 20) <= 0) continue;
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) return true;
  }
  return false;
}

bool closed_now(int fd) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  char buf[256];
  return ::read(fd, buf, sizeof buf) <= 0;
}

std::size_t rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

std::string spki_of(const std::string& pem) {
  std::string cmd = "openssl x509 -in " + pem +
                    " -pubkey -noout | openssl pkey -pubin -outform DER | sha256sum";
  FILE* p = ::popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[128] = {};
  REQUIRE(std::fgets(buf, sizeof buf, p) != nullptr);
  ::pclose(p);
  return "sha256:" + std::string(buf, 64);
}

// A client outside Ferry (Asio + OpenSSL directly): for what Ferry's client never does.
// Returns the handshake's error text, or "" when it succeeded.
std::string foreign_client(std::uint16_t port, int max_version, const std::string& who) {
  namespace asio = boost::asio;
  asio::io_context io;
  asio::ssl::context ctx(asio::ssl::context::tls_client);
  SSL_CTX_set_max_proto_version(ctx.native_handle(), max_version);
  ctx.load_verify_file(pki_file("ca.pem"));
  if (!who.empty()) {
    ctx.use_certificate_chain_file(pki_file(who + ".pem"));
    ctx.use_private_key_file(pki_file(who + ".key"), asio::ssl::context::pem);
  }
  asio::ssl::stream<asio::ip::tcp::socket> s(io, ctx);
  s.next_layer().connect({asio::ip::make_address("127.0.0.1"), port});
  boost::system::error_code ec;
  s.handshake(asio::ssl::stream_base::client, ec);
  if (ec) return ec.message();
  char byte;
  s.read_some(asio::buffer(&byte, 1), ec);  // a TLS 1.3 refusal arrives as an alert
  return ec ? ec.message() : "";
}

}  // namespace

TEST_CASE("mutual TLS: frames both ways, both identities verified") {
  EchoServer srv;
  auto c = tls_connect(srv.port(), "client-a");
  INFO(c.status().to_string());
  REQUIRE(c.is_ok());
  Connection& conn = *c.value();

  const PeerIdentity* server_id = conn.peer_identity();
  REQUIRE(server_id != nullptr);
  CHECK(server_id->subject == "CN=ferry-receiver");
  CHECK(server_id->dns_names == std::vector<std::string>{"localhost"});
  CHECK(server_id->ips == std::vector<std::string>{"127.0.0.1", "::1"});
  CHECK(server_id->uris.empty());
  CHECK(server_id->spki_sha256 == spki_of(pki_file("server.pem")));
  CHECK_THAT(server_id->to_string(), Catch::Contains("ip:127.0.0.1"));

  // Small, mid and large frames (a large one is read straight into its payload).
  std::vector<std::string> sent;
  for (std::size_t i = 0; i < 40; ++i) sent.push_back(pattern(i % 3 == 0 ? (3u << 20) + i : 100 + i * 997, i));
  std::thread writer([&] {
    for (const auto& p : sent) REQUIRE(conn.send(MsgType::data, p).is_ok());
  });
  for (const auto& p : sent) {
    Result<Frame> f = conn.receive(10s);
    REQUIRE(f.is_ok());
    CHECK(f->type == MsgType::data);
    CHECK(f->payload == p);
  }
  writer.join();
  REQUIRE(srv.handled.load() == 1);
  {
    std::lock_guard lock(srv.mu);
    REQUIRE(srv.last_peer);
    CHECK(srv.last_peer->subject == "CN=source-a");
    CHECK(srv.last_peer->uris == std::vector<std::string>{"spiffe://ferry/source-a"});
    CHECK(srv.last_peer->dns_names == std::vector<std::string>{"source-a"});
    CHECK(srv.last_peer->spki_sha256 == spki_of(pki_file("client-a.pem")));
  }
  // close_with_error over TLS: the error frame arrives, then an orderly end.
  REQUIRE(conn.send(MsgType::error, "").is_ok());
  Result<Frame> err = conn.receive(10s);
  REQUIRE(err.is_ok());
  CHECK(err->type == MsgType::error);
  Result<Frame> end = conn.receive(10s);
  REQUIRE_FALSE(end.is_ok());
  CHECK(end.status().code() == Errc::disconnected);
}

TEST_CASE("mutual TLS: full duplex bulk with backpressure keeps order") {
  // Both ends send 48 MiB at once through small queues while the receiver starts late:
  // SSL reads and writes interleave on each I/O thread, and the queues' bounds hold.
  constexpr int kFrames = 768;
  constexpr std::size_t kSize = 64u << 10;
  ServerOptions options;
  options.connection.max_send_queue_bytes = 1u << 20;
  options.connection.max_recv_queue_bytes = 1u << 20;
  std::atomic<bool> server_ok{false};
  options.connection.tls = load(TlsConfig::Role::server, files_of("server"));
  auto s = Server::listen(Endpoint{"127.0.0.1", 0}, options, [&](Connection& conn) {
    std::thread sender([&] {
      for (int i = 0; i < kFrames; ++i)
        if (!conn.send(MsgType::data, pattern(kSize, 1000 + i)).is_ok()) return;
    });
    std::this_thread::sleep_for(300ms);  // let the client's frames pile up against the bounds
    bool ok = true;
    for (int i = 0; i < kFrames && ok; ++i) {
      Result<Frame> f = conn.receive(10s);
      ok = f.is_ok() && f->payload == pattern(kSize, i);
    }
    sender.join();
    ok = ok && conn.flush().is_ok();
    server_ok = ok;
  });
  REQUIRE(s.is_ok());
  ConnectionOptions copts;
  copts.tls = client_config("client-b");
  copts.max_send_queue_bytes = 1u << 20;
  copts.max_recv_queue_bytes = 1u << 20;
  auto c = Connection::connect(Endpoint{"127.0.0.1", s.value()->port()}, copts);
  REQUIRE(c.is_ok());
  Connection& conn = *c.value();
  std::thread sender([&] {
    for (int i = 0; i < kFrames; ++i) REQUIRE(conn.send(MsgType::data, pattern(kSize, i)).is_ok());
  });
  for (int i = 0; i < kFrames; ++i) {
    Result<Frame> f = conn.receive(10s);
    REQUIRE(f.is_ok());
    REQUIRE(f->payload == pattern(kSize, 1000 + i));
  }
  sender.join();
  Result<Frame> end = conn.receive(10s);  // the handler returned: close_notify, then the end
  REQUIRE_FALSE(end.is_ok());
  CHECK(end.status().code() == Errc::disconnected);
  CHECK(server_ok.load());
  CHECK(conn.bytes_sent() == kFrames * (kSize + 24));
}

TEST_CASE("mutual TLS over IPv6 with the name checked against an IP SAN") {
  ServerOptions options;
  options.connection.tls = load(TlsConfig::Role::server, files_of("server"));
  auto s = Server::listen(Endpoint{"::1", 0}, options, [](Connection& conn) {
    Result<Frame> f = conn.receive(5s);
    if (f.is_ok()) (void)conn.send(f->type, f->payload);
  });
  if (!s.is_ok()) {
    WARN("no IPv6 loopback, skipped: " << s.status().to_string());
    return;
  }
  auto c = tls_connect(s.value()->port(), "client-b", "", "::1");
  INFO(c.status().to_string());
  REQUIRE(c.is_ok());
  REQUIRE(c.value()->send(MsgType::hello, "hi").is_ok());
  Result<Frame> f = c.value()->receive(5s);
  REQUIRE(f.is_ok());
  CHECK(f->payload == "hi");
}

TEST_CASE("refused client certificates never reach the handler") {
  // Ferry's own client refuses to load an expired, not yet valid or foreign certificate, so
  // a client outside Ferry presents them; the revoked one loads (clients have no CRL here).
  struct Case {
    const char* client;
    const char* crl;
    const char* client_says;  // in the client's error
    const char* server_says;  // in the server's log line
  };
  const Case cases[] = {
      {"client-other", "", "unknown ca", "unable to get local issuer certificate"},
      {"client-expired", "", "certificate expired", "certificate has expired"},
      {"client-notyet", "", "bad certificate", "certificate is not yet valid"},
      {"client-revoked", "crl.pem", "certificate revoked", "certificate revoked"},
  };
  for (const Case& c : cases) {
    SECTION(c.client) {
      EchoServer srv(c.crl);
      std::string why = foreign_client(srv.port(), TLS1_3_VERSION, c.client);
      CHECK_THAT(why, Catch::Contains(c.client_says));
      CHECK(log_sink().wait_for({"TLS handshake from 127.0.0.1:", c.server_says}));
      if (std::string(c.client) == "client-revoked") {
        auto conn = tls_connect(srv.port(), c.client);
        REQUIRE_FALSE(conn.is_ok());  // connect() waits for the server's verdict
        CHECK(conn.status().message() ==
              "TLS handshake with 127.0.0.1:" + std::to_string(srv.port()) +
                  " failed: peer refused our certificate (alert: certificate revoked)");
      } else {
        auto r = TlsConfig::load(TlsConfig::Role::client, files_of(c.client));
        REQUIRE_FALSE(r.is_ok());
        CHECK_THAT(r.status().message(), Catch::Contains(std::string(c.client) + ".pem"));
      }
      std::this_thread::sleep_for(50ms);
      CHECK(srv.handled.load() == 0);
    }
  }
}

TEST_CASE("a client with the CRL's good peers passes while the CRL is loaded") {
  EchoServer srv("crl.pem");
  auto c = tls_connect(srv.port(), "client-b");
  REQUIRE(c.is_ok());
  REQUIRE(c.value()->send(MsgType::hello, "x").is_ok());
  CHECK(c.value()->receive(5s).is_ok());
}

TEST_CASE("a client without a certificate is refused") {
  EchoServer srv;
  std::string why = foreign_client(srv.port(), TLS1_3_VERSION, "");
  CHECK_FALSE(why.empty());
  CHECK_THAT(why, Catch::Contains("certificate required"));
  CHECK(log_sink().wait_for({"TLS handshake from", "no certificate presented"}));
  CHECK(srv.handled.load() == 0);
}

TEST_CASE("a TLS 1.2 client is refused") {
  EchoServer srv;
  std::string why = foreign_client(srv.port(), TLS1_2_VERSION, "client-a");
  CHECK_FALSE(why.empty());
  CHECK(log_sink().wait_for({"TLS handshake from", "unsupported protocol"}));
  CHECK(srv.handled.load() == 0);
}

TEST_CASE("TlsConfig::load names the files it refuses") {
  SECTION("key not matching the certificate") {
    TlsFiles f = files_of("client-a");
    f.key = pki_file("mismatch.key");
    auto r = TlsConfig::load(TlsConfig::Role::client, f);
    REQUIRE_FALSE(r.is_ok());
    CHECK_THAT(r.status().message(), Catch::Contains("mismatch.key") && Catch::Contains("client-a.pem") &&
                                         Catch::Contains("does not match"));
  }
  SECTION("key readable by others") {
    std::string key = pki_file("open-client-a.key");
    REQUIRE(std::system(("cp " + pki_file("client-a.key") + " " + key).c_str()) == 0);
    REQUIRE(::chmod(key.c_str(), 0644) == 0);
    TlsFiles f = files_of("client-a");
    f.key = key;
    auto r = TlsConfig::load(TlsConfig::Role::client, f);
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().message() ==
          "key file " + key + " is readable by others (mode 0644); chmod 600 " + key);
  }
  SECTION("own certificate expired or not yet valid") {
    auto r = TlsConfig::load(TlsConfig::Role::client, files_of("client-expired"));
    REQUIRE_FALSE(r.is_ok());
    CHECK_THAT(r.status().message(), Catch::Contains("client-expired.pem") && Catch::Contains("expired"));
    r = TlsConfig::load(TlsConfig::Role::client, files_of("client-notyet"));
    REQUIRE_FALSE(r.is_ok());
    CHECK_THAT(r.status().message(), Catch::Contains("client-notyet.pem") && Catch::Contains("not valid yet"));
  }
  SECTION("certificate of another CA, missing files, bad CRL") {
    auto r = TlsConfig::load(TlsConfig::Role::client, files_of("client-other"));
    REQUIRE_FALSE(r.is_ok());
    CHECK_THAT(r.status().message(), Catch::Contains("does not chain to the CA bundle"));
    TlsFiles f = files_of("client-a");
    f.ca = pki_file("nope.pem");
    r = TlsConfig::load(TlsConfig::Role::client, f);
    REQUIRE_FALSE(r.is_ok());
    CHECK_THAT(r.status().message(), Catch::Contains("nope.pem"));
    f = files_of("client-a");
    f.crl = pki_file("ca.pem");  // a certificate, not a CRL
    r = TlsConfig::load(TlsConfig::Role::client, f);
    REQUIRE_FALSE(r.is_ok());
    CHECK_THAT(r.status().message(), Catch::Contains("CRL") && Catch::Contains("ca.pem"));
  }
}

TEST_CASE("the client checks the server's name") {
  EchoServer srv("", {}, "server-wrongname");
  auto c = tls_connect(srv.port(), "client-a");
  REQUIRE_FALSE(c.is_ok());
  CHECK(c.status().message() ==
        "TLS handshake with 127.0.0.1:" + std::to_string(srv.port()) +
            " failed: server certificate name mismatch: expected '127.0.0.1', certificate has "
            "DNS:elsewhere.example");
  std::this_thread::sleep_for(50ms);
  CHECK(srv.handled.load() == 0);

  auto ok = tls_connect(srv.port(), "client-a", "elsewhere.example");
  INFO(ok.status().to_string());
  REQUIRE(ok.is_ok());
  REQUIRE(ok.value()->send(MsgType::hello, "x").is_ok());
  CHECK(ok.value()->receive(5s).is_ok());

  EchoServer good;  // "localhost" is a DNS SAN of server.pem
  auto by_name = tls_connect(good.port(), "client-a", "localhost");
  INFO(by_name.status().to_string());
  CHECK(by_name.is_ok());
  auto wrong = tls_connect(good.port(), "client-a", "recv.example");
  REQUIRE_FALSE(wrong.is_ok());
  CHECK_THAT(wrong.status().message(),
             Catch::Contains("expected 'recv.example', certificate has DNS:localhost, IP:127.0.0.1"));
}

TEST_CASE("plaintext on a TLS port and TLS on a plaintext port") {
  EchoServer srv;
  auto plain = Connection::connect(Endpoint{"127.0.0.1", srv.port()});
  REQUIRE(plain.is_ok());
  (void)plain.value()->send(MsgType::hello, "hello in the clear");
  CHECK_FALSE(plain.value()->receive(5s).is_ok());
  CHECK(log_sink().wait_for({"TLS handshake from", "not TLS (plaintext or garbage)"}));
  CHECK(srv.handled.load() == 0);

  std::atomic<int> plain_handled{0};
  auto ps = Server::listen(Endpoint{"127.0.0.1", 0}, {}, [&](Connection& conn) {
    ++plain_handled;
    (void)conn.receive(5s);
  });
  REQUIRE(ps.is_ok());
  auto c = tls_connect(ps.value()->port(), "client-a");
  REQUIRE_FALSE(c.is_ok());
  CHECK_THAT(c.status().message(), Catch::Contains("the peer does not speak TLS (plaintext receiver?)"));
}

TEST_CASE("garbage and silence before the handshake are dropped") {
  EchoServer srv;  // handshake_timeout 500 ms
  UniqueFd garbage = raw_connect(srv.port());
  std::string junk = pattern(3000, 7);
  REQUIRE(::write(garbage.get(), junk.data(), junk.size()) == static_cast<ssize_t>(junk.size()));
  CHECK(closed_by_peer(garbage.get(), 2000));

  UniqueFd silent = raw_connect(srv.port());
  auto t0 = Clock::now();
  CHECK(closed_by_peer(silent.get(), 5000));
  auto waited = Clock::now() - t0;
  CHECK(waited >= 400ms);
  CHECK(waited < 3s);
  CHECK(log_sink().wait_for({"TLS handshake from", "no TLS handshake within 500 ms"}));
  CHECK(srv.handled.load() == 0);
}

TEST_CASE("500 idle raw connections from one address: bounded, a good client still served") {
  ServerOptions options;
  options.max_connections = 1024;
  options.connection.handshake_timeout = 10s;  // the admitted 16 stay while we look
  EchoServer srv("", options);
  std::size_t rss0 = rss_bytes();
  std::vector<UniqueFd> flood;
  for (int i = 0; i < 500; ++i) flood.push_back(raw_connect(srv.port(), "127.0.0.2"));
  // Beyond max_connections_per_address (16) they are closed at once.
  std::size_t closed = 0;
  auto deadline = Clock::now() + 8s;  // ends as soon as the 484 are seen
  std::vector<bool> seen(flood.size(), false);
  while (Clock::now() < deadline && closed < flood.size() - 16) {
    for (std::size_t i = 0; i < flood.size(); ++i)
      if (!seen[i] && closed_now(flood[i].get())) seen[i] = true, ++closed;
  }
  CHECK(closed == flood.size() - 16);
  auto t0 = Clock::now();
  auto c = tls_connect(srv.port(), "client-a");
  INFO(c.status().to_string());
  REQUIRE(c.is_ok());
  REQUIRE(c.value()->send(MsgType::hello, "still here").is_ok());
  Result<Frame> f = c.value()->receive(5s);
  REQUIRE(f.is_ok());
  CHECK(Clock::now() - t0 < 1s);
  std::size_t grown = rss_bytes() - std::min(rss_bytes(), rss0);
  INFO("RSS growth " << grown / 1024 << " KiB");
  CHECK(grown < (64u << 20));
  CHECK(log_sink().wait_for({"max_connections_per_address"}));
}

TEST_CASE("max_handshakes: silent peers wait in the backlog, accepting resumes") {
  ServerOptions options;
  options.max_handshakes = 4;
  options.max_connections_per_address = 1000;
  options.connection.handshake_timeout = 300ms;
  EchoServer srv("", options);
  std::vector<UniqueFd> silent;
  for (int i = 0; i < 12; ++i) silent.push_back(raw_connect(srv.port(), "127.0.0.2"));
  // Four handshake at a time, each dropped after 300 ms: twelve take three rounds.
  auto t0 = Clock::now();
  for (auto& fd : silent) CHECK(closed_by_peer(fd.get(), 5000));
  auto waited = Clock::now() - t0;
  CHECK(waited >= 800ms);
  CHECK(waited < 4s);
  // Then a good client is served.
  auto c = tls_connect(srv.port(), "client-a");
  INFO(c.status().to_string());
  REQUIRE(c.is_ok());
  REQUIRE(c.value()->send(MsgType::hello, "after").is_ok());
  CHECK(c.value()->receive(5s).is_ok());
}

TEST_CASE("set_tls: a reloaded CRL refuses the next connection, not the open one") {
  EchoServer srv("crl-empty.pem");
  auto before = tls_connect(srv.port(), "client-a");
  REQUIRE(before.is_ok());
  REQUIRE(before.value()->send(MsgType::hello, "1").is_ok());
  REQUIRE(before.value()->receive(5s).is_ok());

  srv.server->set_tls(load(TlsConfig::Role::server, files_of("server", "crl-revoke-a.pem")));

  auto refused = tls_connect(srv.port(), "client-a");
  REQUIRE_FALSE(refused.is_ok());
  CHECK_THAT(refused.status().message(), Catch::Contains("peer refused our certificate (alert: certificate revoked)"));
  CHECK(log_sink().wait_for({"TLS handshake from", "certificate revoked"}));
  CHECK(srv.handled.load() == 1);

  REQUIRE(before.value()->send(MsgType::hello, "2").is_ok());
  Result<Frame> f = before.value()->receive(5s);
  REQUIRE(f.is_ok());
  CHECK(f->payload == "2");

  auto other = tls_connect(srv.port(), "client-b");
  REQUIRE(other.is_ok());
  REQUIRE(other.value()->send(MsgType::hello, "3").is_ok());
  CHECK(other.value()->receive(5s).is_ok());
}
