#include "qmp_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "ferry/base/log.h"

namespace ferry::cbt {
namespace {

int remaining_ms(std::chrono::steady_clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  return left.count() < 0 ? 0 : static_cast<int>(std::min<long long>(left.count(), 1 << 30));
}

Result<UniqueFd> connect_unix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path))
    return Status::error(Errc::invalid_argument,
                         fmt::format("QMP socket path too long ({} bytes): {}", path.size(), path));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd.valid()) return Status::from_errno(errno, "socket(AF_UNIX)");
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return Status::from_errno(errno, "connect to QMP socket " + path);
  return fd;
}

// Parses one QMP line; nlohmann throws, and this is the one place its exceptions are mapped.
Result<json> parse_line(std::string_view line, const std::string& socket_path) {
  try {
    return json::parse(line);
  } catch (const json::exception& e) {
    return Status::error(Errc::protocol,
                         fmt::format("QMP {}: unparsable message: {}", socket_path, e.what()));
  }
}

}  // namespace

Result<std::unique_ptr<QmpClient>> QmpClient::connect(const std::string& socket_path,
                                                       std::chrono::milliseconds timeout) {
  FERRY_ASSIGN_OR_RETURN(UniqueFd fd, connect_unix(socket_path));
  std::unique_ptr<QmpClient> c(new QmpClient(std::move(fd), socket_path));
  auto deadline = Clock::now() + timeout;
  FERRY_ASSIGN_OR_RETURN(json greeting, c->read_message(deadline));
  if (!greeting.contains("QMP"))
    return Status::error(Errc::protocol,
                         fmt::format("QMP {}: expected a greeting, got {}", socket_path,
                                     greeting.dump().substr(0, 200)));
  const json& v = greeting["QMP"].value("version", json::object()).value("qemu", json::object());
  c->version_ = {v.value("major", 0), v.value("minor", 0), v.value("micro", 0)};
  FERRY_ASSIGN_OR_RETURN(json ignored, c->execute("qmp_capabilities", timeout));
  (void)ignored;
  return c;
}

Result<json> QmpClient::execute(std::string_view command, const json& arguments,
                                std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  const std::uint64_t id = next_id_++;
  json msg = {{"execute", command}, {"id", id}};
  if (!arguments.empty()) msg["arguments"] = arguments;
  FERRY_TRY(write_all(msg.dump() + "\n", deadline));
  for (;;) {
    auto m = read_message(deadline);
    if (!m) return m.status().with_context(fmt::format("QMP {}", command));
    json& reply = *m;
    if (reply.contains("event")) {
      queue_event(std::move(reply));
      continue;
    }
    // A reply to an earlier command that timed out: not ours, drop it.
    if (!reply.contains("id") || reply["id"] != id) continue;
    if (reply.contains("error")) {
      const json& e = reply["error"];
      return Status::error(Errc::external,
                           fmt::format("QMP {} failed: {} ({})", command,
                                       e.value("desc", std::string("no description")),
                                       e.value("class", std::string("?"))));
    }
    return reply.contains("return") ? std::move(reply["return"]) : json::object();
  }
}

Result<json> QmpClient::wait_event(std::string_view name, const EventMatch& match,
                                   std::chrono::milliseconds timeout) {
  auto matches = [&](const json& ev) {
    if (ev.value("event", std::string()) != name) return false;
    return !match || match(ev.contains("data") ? ev["data"] : json::object());
  };
  for (auto it = events_.begin(); it != events_.end(); ++it) {
    if (matches(*it)) {
      json ev = std::move(*it);
      events_.erase(it);
      return ev;
    }
  }
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto m = read_message(deadline);
    if (!m) return m.status().with_context(fmt::format("waiting for QMP event {}", name));
    if (!m->contains("event")) continue;  // a late reply to a timed-out command
    if (matches(*m)) return std::move(*m);
    queue_event(std::move(*m));
  }
}

void QmpClient::queue_event(json event) {
  if (events_.size() >= kMaxQueuedEvents) {
    // Nobody waits for the oldest: dropping it is safer than unbounded memory.
    if (events_dropped_++ % 100 == 0)
      spdlog::warn("QMP {}: event queue full, dropping {}", socket_path_,
                   events_.front().value("event", std::string("?")));
    events_.pop_front();
  }
  events_.push_back(std::move(event));
}

Result<json> QmpClient::read_message(Clock::time_point deadline) {
  for (;;) {
    auto nl = rbuf_.find('\n');
    if (nl != std::string::npos) {
      std::string line = rbuf_.substr(0, nl);
      rbuf_.erase(0, nl + 1);
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      return parse_line(line, socket_path_);
    }
    if (rbuf_.size() > kMaxLineBytes)
      return Status::error(Errc::protocol, fmt::format("QMP {}: line longer than {} bytes",
                                                       socket_path_, kMaxLineBytes));
    FERRY_TRY(fill(deadline));
  }
}

Status QmpClient::fill(Clock::time_point deadline) {
  char buf[65536];
  for (;;) {
    ssize_t n = ::recv(fd_.get(), buf, sizeof buf, 0);
    if (n > 0) {
      rbuf_.append(buf, static_cast<std::size_t>(n));
      return Status::ok();
    }
    if (n == 0)
      return Status::error(Errc::disconnected, fmt::format("QMP {}: QEMU closed the connection",
                                                           socket_path_));
    if (errno == EINTR) continue;
    if (errno != EAGAIN) return Status::from_errno(errno, "read from QMP " + socket_path_);
    pollfd p{fd_.get(), POLLIN, 0};
    int r = ::poll(&p, 1, remaining_ms(deadline));
    if (r < 0 && errno != EINTR) return Status::from_errno(errno, "poll QMP " + socket_path_);
    if (r == 0)
      return Status::error(Errc::timeout, fmt::format("QMP {}: no answer in time", socket_path_))
          .set_retryable();
  }
}

Status QmpClient::write_all(const std::string& data, Clock::time_point deadline) {
  std::size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd_.get(), data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n > 0) {
      off += static_cast<std::size_t>(n);
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN) return Status::from_errno(errno, "write to QMP " + socket_path_);
    pollfd p{fd_.get(), POLLOUT, 0};
    int r = ::poll(&p, 1, remaining_ms(deadline));
    if (r < 0 && errno != EINTR) return Status::from_errno(errno, "poll QMP " + socket_path_);
    if (r == 0)
      return Status::error(Errc::timeout, fmt::format("QMP {}: write timed out", socket_path_));
  }
  return Status::ok();
}

}  // namespace ferry::cbt
