// ferry status: asks the agent over its status socket and prints a table or the JSON.
//
// Exit status: 0 every target's RPO is within its rpo_alert_seconds; 3 at least one target is
// over it (or has no acknowledged RP after running longer than it); 1 the agent is not
// reachable or answered garbage; 2 usage error (from the CLI parser).
#include <sys/socket.h>
#include <sys/un.h>

#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>

#include "agent.h"
#include "ferry/base/fd.h"
#include "tools.h"

namespace ferry::tools {
namespace {

constexpr int kExitRpoExceeded = 3;

Result<std::string> ask_agent(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return Status::error(Errc::invalid_argument, "socket path too long");
  std::memcpy(addr.sun_path, path.data(), path.size());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::from_errno(errno, "socket");
  const timeval tv{10, 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
    return Status::from_errno(errno, "connect");
  const std::string req = kStatusRequest;
  if (::send(fd.get(), req.data(), req.size(), MSG_NOSIGNAL) != ssize_t(req.size()))
    return Status::from_errno(errno, "send");
  std::string reply;
  char buf[16384];
  for (;;) {
    ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
    if (n < 0) return Status::from_errno(errno, "recv");
    if (n == 0) break;
    reply.append(buf, static_cast<std::size_t>(n));
    if (reply.size() > kMaxStatusReplyBytes)
      return Status::error(Errc::protocol, "reply larger than " +
                                               std::to_string(kMaxStatusReplyBytes) + " bytes");
  }
  return reply;
}

std::string age(const nlohmann::json& seconds) {
  if (!seconds.is_number()) return "-";
  const double s = seconds.get<double>();
  char buf[32];
  if (s < 120)
    std::snprintf(buf, sizeof buf, "%.0fs", s);
  else if (s < 7200)
    std::snprintf(buf, sizeof buf, "%.0fm", s / 60);
  else
    std::snprintf(buf, sizeof buf, "%.1fh", s / 3600);
  return buf;
}

void print_table(const nlohmann::json& targets) {
  std::printf("%-20s %-6s %-8s %8s %8s %8s %10s %10s  %s\n", "TARGET", "KIND", "STATE",
              "LAST RP", "RPO", "ALERT", "CHANGED", "SENT", "LAST ERROR");
  for (const auto& t : targets) {
    const bool over = t.value("rpo_exceeded", false);
    std::printf("%-20s %-6s %-8s %8llu %8s %8s %10s %10s  %s\n",
                t.value("name", "?").c_str(), t.value("kind", "?").c_str(),
                t.value("state", "?").c_str(),
                static_cast<unsigned long long>(t.value("last_rp_id", 0ull)),
                (age(t["rpo_seconds"]) + (over ? "!" : "")).c_str(),
                age(t.value("rpo_alert_seconds", 0)).c_str(),
                human_bytes(t.value("changed_bytes", 0ull)).c_str(),
                human_bytes(t.value("sent_bytes", 0ull)).c_str(),
                t.value("last_error", "").c_str());
  }
}

}  // namespace

int cmd_status(const std::string& socket_path, bool json) {
  auto reply = ask_agent(socket_path);
  if (!reply.is_ok()) {
    std::fprintf(stderr, "ferry status: agent not reachable on %s: %s\n", socket_path.c_str(),
                 reply.status().to_string().c_str());
    return 1;
  }
  nlohmann::json j = nlohmann::json::parse(*reply, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("targets") || !j["targets"].is_array()) {
    std::fprintf(stderr, "ferry status: the agent on %s sent no status document\n",
                 socket_path.c_str());
    return 1;
  }
  bool exceeded = false;
  for (const auto& t : j["targets"])
    exceeded = exceeded || (t.is_object() && t.value("rpo_exceeded", false));
  if (json)
    std::cout << j.dump(2) << "\n";
  else
    print_table(j["targets"]);
  return exceeded ? kExitRpoExceeded : 0;
}

}  // namespace ferry::tools
