// ferry status: asks the agent (or a receiver) over its status socket and prints a table or
// the JSON. Also the receiver's side of it: the status socket of `ferry receive`.
//
// Exit status: 0 every target's RPO is within its rpo_alert_seconds (receiver: every group is
// ok or applying); 3 at least one target is over it (or has no acknowledged RP after running
// longer than it) (receiver: at least one group is failing, or with --rpo-alert over it);
// --rpo-alert SECONDS replaces every target's own threshold; 1 the agent is not reachable or
// answered garbage; 2 usage error (from the CLI parser).
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

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
  // Explainable RPO: for each target over its threshold, the stage that made it late; and
  // a running first (full) RP's progress.
  for (const auto& t : targets) {
    if (const std::string alert = t.value("rpo_alert", ""); !alert.empty())
      std::printf("%s: %s\n", t.value("name", "?").c_str(), alert.c_str());
    const auto& p = t.contains("progress") ? t["progress"] : nlohmann::json();
    if (p.is_object() && p.value("total_bytes", 0ull) > 0)
      std::printf("%s: RP in progress: %s of %s\n", t.value("name", "?").c_str(),
                  human_bytes(p.value("done_bytes", 0ull)).c_str(),
                  human_bytes(p.value("total_bytes", 0ull)).c_str());
  }
}

// A receiver's groups (ferry receive --status-socket).
void print_groups(const nlohmann::json& groups) {
  std::printf("%-20s %-13s %-13s %9s %9s %6s %-22s %11s %8s %8s  %s\n", "GROUP", "STATE", "ROLE",
              "COMMITTED", "APPLIED", "RPO", "SOURCE", "FAILING FOR", "ATTEMPTS", "RE-OPEN", "CAUSE");
  for (const auto& g : groups) {
    if (!g.is_object()) continue;
    // A failure episode, or an apply episode (apply_pending with a cause, R19).
    const bool failing = g.value("failing_since_unix_ns", 0ull) > 0;
    const std::string source = g.value("source", "");
    const std::string rpo = g.contains("rpo_seconds") ? age(g["rpo_seconds"]) : "-";
    std::printf("%-20s %-13s %-13s %9llu %9llu %6s %-22s %11s %8s %8s  %s\n",
                g.value("group", "?").c_str(), g.value("state", "?").c_str(),
                g.value("role", "-").c_str(),
                static_cast<unsigned long long>(g.value("last_committed_rp", 0ull)),
                static_cast<unsigned long long>(g.value("last_applied_rp", 0ull)),
                (rpo + (g.value("rpo_exceeded", false) ? "!" : "")).c_str(),
                source.empty() ? "-" : source.c_str(),
                failing ? age(g["failing_seconds"]).c_str() : "-",
                failing ? std::to_string(g.value("failed_attempts", 0ull)).c_str() : "-",
                failing && g.value("next_reopen_seconds", 0.0) > 0
                    ? age(g["next_reopen_seconds"]).c_str() : "-",
                g.value("cause", "").c_str());
  }
}

// Whether a receiver's group calls for an operator (exit 3): a failure episode, or an apply
// that failed and is being retried (the replica is behind the journal, R19). An apply that is
// merely queued after a commit is normal and does not.
bool group_needs_operator(const nlohmann::json& g) {
  if (!g.is_object()) return false;
  const std::string state = g.value("state", "");
  if (state == "failing") return true;
  return state == "apply_pending" &&
         (g.value("failed_attempts", 0ull) > 0 || !g.value("cause", "").empty());
}

}  // namespace

// ---- the receiver's status socket -------------------------------------------------------------

StatusSocket::~StatusSocket() {
  stopping_.store(true);
  if (thread_.joinable()) thread_.join();
  ::unlink(path_.c_str());
}

Result<std::unique_ptr<StatusSocket>> StatusSocket::create(const std::string& path,
                                                           Render render) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return Status::error(Errc::invalid_argument, "status socket path '" + path +
                                                     "' is empty or longer than 107 bytes");
  std::memcpy(addr.sun_path, path.data(), path.size());
  auto slash = path.rfind('/');
  if (slash != std::string::npos && slash > 0) FERRY_TRY(make_dirs(path.substr(0, slash)));
  // A socket file left by a dead process is removed; one that answers belongs to a live one.
  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return Status::error(Errc::busy, path + " exists and is not a socket");
    UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!probe.valid()) return Status::from_errno(errno, "socket");
    if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0)
      return Status::error(Errc::busy, "another process answers on " + path);
    if (::unlink(path.c_str()) != 0) return Status::from_errno(errno, "unlink " + path);
  }
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::from_errno(errno, "socket");
  const mode_t old = ::umask(0177);  // born 0600: status is for root only
  const int rc = ::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  const int err = errno;
  ::umask(old);
  if (rc != 0) return Status::from_errno(err, "bind " + path);
  // Belt and braces after the umask: the mode must not hang on one process-wide setting.
  if (::chmod(path.c_str(), 0600) != 0) return Status::from_errno(errno, "chmod " + path);
  if (::listen(fd.get(), 16) != 0) return Status::from_errno(errno, "listen " + path);
  auto s = std::unique_ptr<StatusSocket>(new StatusSocket(path, std::move(fd), std::move(render)));
  StatusSocket* raw = s.get();
  s->thread_ = std::thread([raw] { raw->loop(); });
  return s;
}

StatusSocket::StatusSocket(std::string path, UniqueFd fd, Render render)
    : path_(std::move(path)), fd_(std::move(fd)), render_(std::move(render)) {}

void StatusSocket::loop() {
  while (!stopping_.load()) {
    pollfd p{fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, 200) <= 0) continue;
    UniqueFd client(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!client.valid()) continue;
    // One request line, bounded in bytes and time; one JSON document back; close.
    const timeval tv{2, 0};
    ::setsockopt(client.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(client.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    std::string req;
    char buf[256];
    while (req.find('\n') == std::string::npos && req.size() < 1024) {
      ssize_t n = ::recv(client.get(), buf, sizeof buf, 0);
      if (n <= 0) break;
      req.append(buf, static_cast<std::size_t>(n));
    }
    std::string reply = req == kStatusRequest
                            ? render_()
                            : nlohmann::json{{"error", "unknown request; send \"status\\n\""}}.dump();
    reply += "\n";
    for (std::size_t off = 0; off < reply.size();) {
      ssize_t n = ::send(client.get(), reply.data() + off, reply.size() - off, MSG_NOSIGNAL);
      if (n <= 0) break;
      off += static_cast<std::size_t>(n);
    }
  }
}

// --rpo-alert SECONDS: the threshold the caller gives wins over each target's own, and a
// receiver's group whose RPO is over it calls for an operator too.
void apply_rpo_alert(nlohmann::json& items, double rpo_alert_seconds) {
  for (auto& t : items) {
    if (!t.is_object()) continue;
    const bool has_rpo = t.contains("rpo_seconds") && t["rpo_seconds"].is_number();
    const bool over = has_rpo && t["rpo_seconds"].get<double>() > rpo_alert_seconds;
    t["rpo_alert_seconds"] = rpo_alert_seconds;
    t["rpo_exceeded"] = has_rpo ? over : t.value("rpo_exceeded", false);  // no RP yet: its own say
  }
}

int print_status_doc(nlohmann::json& j, bool json, double rpo_alert_seconds, const std::string& where) {
  if (j.is_object() && j.contains("groups") && j["groups"].is_array()) {
    if (rpo_alert_seconds > 0) apply_rpo_alert(j["groups"], rpo_alert_seconds);
    bool failing = false;
    for (const auto& g : j["groups"])
      failing = failing || group_needs_operator(g) || (g.is_object() && g.value("rpo_exceeded", false));
    if (json)
      std::cout << j.dump(2) << "\n";
    else
      print_groups(j["groups"]);
    return failing ? kExitRpoExceeded : 0;
  }
  if (j.is_discarded() || !j.is_object() || !j.contains("targets") || !j["targets"].is_array()) {
    std::fprintf(stderr, "ferry status: %s sent no status document\n", where.c_str());
    return 1;
  }
  if (rpo_alert_seconds > 0) apply_rpo_alert(j["targets"], rpo_alert_seconds);
  bool exceeded = false;
  for (const auto& t : j["targets"])
    exceeded = exceeded || (t.is_object() && t.value("rpo_exceeded", false));
  if (json)
    std::cout << j.dump(2) << "\n";
  else
    print_table(j["targets"]);
  return exceeded ? kExitRpoExceeded : 0;
}

int cmd_status(const std::string& socket_path, bool json, double rpo_alert_seconds) {
  auto reply = ask_agent(socket_path);
  if (!reply.is_ok()) {
    std::fprintf(stderr, "ferry status: agent not reachable on %s: %s\n", socket_path.c_str(),
                 reply.status().to_string().c_str());
    return 1;
  }
  nlohmann::json j = nlohmann::json::parse(*reply, nullptr, /*allow_exceptions=*/false);
  return print_status_doc(j, json, rpo_alert_seconds, "the agent on " + socket_path);
}

}  // namespace ferry::tools
