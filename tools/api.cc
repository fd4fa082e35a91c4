// The management API's shared parts (api.h): JSON errors and bodies, the caller's right, the
// server, and the job table that runs `ferry` subcommands as bounded children.
#include "api.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "ferry/base/fd.h"
#include "ferry/base/log.h"
#include "ferry/transport/connection.h"

namespace ferry::tools {

metrics::HttpResponse api_json(unsigned status, const nlohmann::json& doc) {
  return {status, "application/json", doc.dump() + "\n", ""};
}

metrics::HttpResponse api_error(unsigned status, const std::string& message) {
  return api_json(status, {{"error", message}, {"status", status}});
}

Result<nlohmann::json> api_body(const metrics::HttpRequest& req, const std::vector<std::string>& allowed) {
  if (req.body.find_first_not_of(" \t\r\n") == std::string::npos) return nlohmann::json::object();
  nlohmann::json doc = nlohmann::json::parse(req.body, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded())
    return Status::error(Errc::invalid_argument, "the request body is not valid JSON");
  if (!doc.is_object())
    return Status::error(Errc::invalid_argument, "the request body must be a JSON object");
  for (const auto& [key, value] : doc.items()) {
    bool known = false;
    for (const std::string& a : allowed) known = known || a == key;
    if (!known) {
      std::string list;
      for (const std::string& a : allowed) list += (list.empty() ? "" : ", ") + a;
      return Status::error(Errc::invalid_argument, "unknown key '" + key.substr(0, 64) +
                                                       "' in the request body (allowed: " +
                                                       (list.empty() ? "none" : list) + ")");
    }
    if (!value.is_string() && !value.is_number_unsigned())
      return Status::error(Errc::invalid_argument, "'" + key + "' must be a string or a number");
    // Values become arguments of a `ferry` child: one argv entry each, never an option.
    if (value.is_string()) {
      const std::string& v = value.get_ref<const std::string&>();
      if (v.empty() || v.front() == '-' || v.find('\0') != std::string::npos || v.size() > 1024)
        return Status::error(Errc::invalid_argument, "'" + key + "' must be 1 to 1024 bytes, "
                                                     "not start with '-' and hold no NUL");
    }
  }
  return doc;
}

std::optional<metrics::HttpResponse> api_authorize(const metrics::HttpRequest& req,
                                                   const AccessMap& map, const std::string& group) {
  if (!req.tls) return std::nullopt;  // A1: loopback or --insecure-plaintext
  if (!req.peer)
    return api_error(401, "a client certificate is required (mutual TLS; docs/security.md)");
  const auto ids = identities_of(*req.peer);
  if (!group.empty()) {
    AccessDecision d = decide(map, ids, group, Right::manage);
    if (d.allowed) return std::nullopt;
    return api_error(403, d.message);
  }
  for (const AccessEntry& e : map.entries)
    for (const std::string& id : ids)
      if (e.identity == id && !e.manage.empty()) return std::nullopt;
  return api_error(403, "identity " + (ids.empty() ? std::string("(none)") : ids.front()) +
                            " holds the manage right for no group");
}

Result<std::unique_ptr<metrics::HttpServer>> serve_api(const std::string& listen,
                                                       std::vector<metrics::Route> routes,
                                                       std::shared_ptr<const transport::TlsConfig> tls) {
  auto ep = transport::parse_endpoint(listen, /*allow_port_zero=*/true);
  if (!ep.is_ok()) return std::move(ep).status().with_context("--api " + listen);
  metrics::HttpLimits limits;
  limits.max_body_bytes = kApiMaxBodyBytes;
  limits.json_errors = true;
  auto server = metrics::HttpServer::start(ep->host, ep->port, std::move(routes), limits, std::move(tls));
  if (!server.is_ok()) return std::move(server).status().with_context("--api " + listen);
  return server;
}

// ---- jobs -------------------------------------------------------------------------------------
namespace {

std::uint64_t unix_ns() {
  return std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count());
}

void keep_tail(std::string& s, const char* data, std::size_t n) {
  s.append(data, n);
  if (s.size() > kApiMaxOutputBytes) s.erase(0, s.size() - kApiMaxOutputBytes);
}

}  // namespace

struct JobTable::Impl {
  struct Job {
    std::string id, group, kind;
    std::vector<std::string> argv;
    pid_t pid = -1;
    bool done = false;
    int exit_code = -1;
    std::string out, err;
    std::uint64_t started_unix_ns = 0, finished_unix_ns = 0;
  };
  std::string ferry;
  mutable std::mutex mu;
  std::map<std::uint64_t, Job> jobs;  // by sequence: the oldest first
  std::uint64_t next = 1;
  std::vector<std::thread> threads;
  bool stopping = false;

  void run(std::uint64_t seq, UniqueFd out, UniqueFd err);
  std::size_t running_locked() const {
    std::size_t n = 0;
    for (const auto& [seq, j] : jobs) n += j.done ? 0 : 1;
    return n;
  }
};

JobTable::JobTable(std::string ferry_binary) : impl_(std::make_unique<Impl>()) {
  impl_->ferry = std::move(ferry_binary);
}

JobTable::~JobTable() {
  std::vector<std::thread> threads;
  {
    std::lock_guard lock(impl_->mu);
    impl_->stopping = true;
    for (auto& [seq, j] : impl_->jobs)
      if (!j.done && j.pid > 0) ::kill(j.pid, SIGTERM);
    threads.swap(impl_->threads);
  }
  for (std::thread& t : threads) t.join();
}

void JobTable::Impl::run(std::uint64_t seq, UniqueFd out, UniqueFd err) {
  pollfd fds[2] = {{out.get(), POLLIN, 0}, {err.get(), POLLIN, 0}};
  char buf[4096];
  int open = 2;
  while (open > 0) {
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      const ssize_t n = ::read(fds[i].fd, buf, sizeof buf);
      if (n <= 0) {
        fds[i].fd = -1;
        --open;
        continue;
      }
      std::lock_guard lock(mu);
      Job& j = jobs.at(seq);
      keep_tail(i == 0 ? j.out : j.err, buf, std::size_t(n));
    }
  }
  pid_t pid;
  {
    std::lock_guard lock(mu);
    pid = jobs.at(seq).pid;
  }
  // Wait without reaping, then reap under the lock: stop() never signals a pid that was
  // reaped (and perhaps reused) meanwhile.
  siginfo_t info{};
  while (::waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) < 0 && errno == EINTR) {
  }
  std::lock_guard lock(mu);
  int wstatus = 0;
  while (::waitpid(pid, &wstatus, 0) < 0 && errno == EINTR) {
  }
  Job& j = jobs.at(seq);
  j.done = true;
  j.exit_code = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
  j.finished_unix_ns = unix_ns();
  spdlog::info("api: job {} ({} of group {}) ended with exit code {}", j.id, j.kind, j.group, j.exit_code);
}

Result<std::string> JobTable::start(const std::string& group, const std::string& kind,
                                    std::vector<std::string> args) {
  std::lock_guard lock(impl_->mu);
  if (impl_->stopping) return Status::error(Errc::cancelled, "the service is stopping");
  if (impl_->running_locked() >= kApiMaxRunningJobs)
    return Status::error(Errc::busy, std::to_string(kApiMaxRunningJobs) + " jobs run already; try again later");
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return Status::from_errno(errno, "pipe");
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(out[0]);
    ::close(out[1]);
    return Status::from_errno(errno, "pipe");
  }
  UniqueFd out_r(out[0]), out_w(out[1]), err_r(err[0]), err_w(err[1]);
  std::vector<std::string> argv{impl_->ferry};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> cargv;
  for (std::string& a : argv) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  // posix_spawn, not fork: the receiver has many threads (and runs under ASan in the tests),
  // and a forked child of a threaded process may block on a lock another thread held at the
  // fork. glibc's posix_spawn runs no user code between clone and exec.
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  if (int e = posix_spawn_file_actions_init(&fa); e != 0) return Status::from_errno(e, "posix_spawn");
  if (int e = posix_spawnattr_init(&attr); e != 0) {
    posix_spawn_file_actions_destroy(&fa);
    return Status::from_errno(e, "posix_spawn");
  }
  sigset_t none, all;
  sigemptyset(&none);  // the receiver blocks SIGTERM for its watcher: the job must not
  sigfillset(&all);
  int rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  if (rc == 0) rc = posix_spawnattr_setsigmask(&attr, &none);
  if (rc == 0) rc = posix_spawnattr_setsigdefault(&attr, &all);
  if (rc == 0) rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  if (rc == 0) rc = posix_spawn_file_actions_adddup2(&fa, out_w.get(), 1);
  if (rc == 0) rc = posix_spawn_file_actions_adddup2(&fa, err_w.get(), 2);
  if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&fa, 3);
  pid_t pid = -1;
  if (rc == 0) rc = posix_spawn(&pid, cargv[0], &fa, &attr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) return Status::from_errno(rc, "posix_spawn " + argv[0]);
  out_w.reset();
  err_w.reset();
  // Reap old finished jobs first: the table stays within kApiMaxKeptJobs.
  while (impl_->jobs.size() >= kApiMaxKeptJobs) {
    auto it = impl_->jobs.begin();
    while (it != impl_->jobs.end() && !it->second.done) ++it;
    if (it == impl_->jobs.end()) break;
    impl_->jobs.erase(it);
  }
  const std::uint64_t seq = impl_->next++;
  Impl::Job& j = impl_->jobs[seq];
  j.id = "j" + std::to_string(seq) + "-" + std::to_string(unix_ns() % 1000000);
  j.group = group;
  j.kind = kind;
  j.argv = std::move(argv);
  j.pid = pid;
  j.started_unix_ns = unix_ns();
  impl_->threads.emplace_back([p = impl_.get(), seq, o = std::move(out_r), e = std::move(err_r)]() mutable {
    p->run(seq, std::move(o), std::move(e));
  });
  spdlog::info("api: job {} started: {} of group {} (pid {})", j.id, kind, group, pid);
  return j.id;
}

nlohmann::json JobTable::get(const std::string& id, std::string* group) const {
  std::lock_guard lock(impl_->mu);
  for (const auto& [seq, j] : impl_->jobs) {
    if (j.id != id) continue;
    if (group) *group = j.group;
    nlohmann::json doc{{"id", j.id}, {"group", j.group}, {"kind", j.kind}, {"argv", j.argv},
                       {"state", !j.done ? "running" : j.exit_code == 0 ? "succeeded" : "failed"},
                       {"stdout", j.out}, {"stderr", j.err},
                       {"started_unix_ns", j.started_unix_ns}};
    doc["exit_code"] = j.done ? nlohmann::json(j.exit_code) : nlohmann::json(nullptr);
    doc["finished_unix_ns"] = j.done ? nlohmann::json(j.finished_unix_ns) : nlohmann::json(nullptr);
    return doc;
  }
  return nullptr;
}

std::size_t JobTable::stop(const std::string& group, const std::string& kind) {
  std::lock_guard lock(impl_->mu);
  std::size_t n = 0;
  for (auto& [seq, j] : impl_->jobs)
    if (!j.done && j.group == group && j.kind == kind && j.pid > 0) {
      ::kill(j.pid, SIGTERM);
      ++n;
    }
  return n;
}

bool JobTable::running(const std::string& group, const std::string& kind) const {
  std::lock_guard lock(impl_->mu);
  for (const auto& [seq, j] : impl_->jobs)
    if (!j.done && j.group == group && j.kind == kind) return true;
  return false;
}

}  // namespace ferry::tools
