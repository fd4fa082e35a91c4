// ferry agent: the long-running host service. One worker thread per target, each on its own
// schedule; a status socket; sd_notify (READY, STATUS, WATCHDOG, STOPPING); SIGHUP reloads the
// config, SIGTERM/SIGINT stop.
//
// Schedule: an RP starts every interval_seconds, measured from the start of the previous one
// (an RP longer than the interval is followed at once by the next). A failed RP is retried at
// the next tick; its error stays visible in status until an RP succeeds.
//
// RPO: the age of the newest RP this agent got acknowledged, dated at the start of its capture
// (acknowledgement time minus RpStats::total_seconds). The point-in-time is taken during the
// capture, so this overstates the RPO by at most the capture time: never understates it.
// Before the first acknowledged RP of a target the RPO is unknown (null in status) and the
// target counts as over its threshold once it has run longer than rpo_alert_seconds.
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "agent.h"
#include "ferry/base/fd.h"
#include "ferry/base/log.h"
#include "ferry/source/sender.h"
#include "metrics.h"
#include "ferry/source/sender_events.h"
#include "tools.h"

namespace ferry::tools {
namespace {

using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

std::uint64_t unix_now_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}
std::int64_t steady_now_ms() {
  return std::chrono::duration_cast<milliseconds>(SteadyClock::now().time_since_epoch()).count();
}

// A worker that shows no sign of life for this long is stuck: the watchdog stops petting
// systemd. Longer than the sender's ack timeout (10 min) plus the QMP timeout.
constexpr std::int64_t kStuckAfterMs = 11 * 60 * 1000;

// What status shows about one target. Guarded by Worker::mu_.
struct TargetStatus {
  const char* state = "idle";  // idle | running | failed
  std::uint64_t last_rp_id = 0;
  std::uint64_t last_rp_unix_ns = 0;   // capture start of the newest acknowledged RP
  std::uint64_t last_ack_unix_ns = 0;  // when its acknowledgement arrived
  std::uint64_t changed_bytes = 0;     // of the last acknowledged RP
  std::uint64_t sent_bytes = 0;
  double last_rp_seconds = 0;
  std::string last_error;              // empty after a success
  std::uint64_t last_error_unix_ns = 0;
  std::uint64_t rps_ok = 0;
  std::uint64_t rps_failed = 0;
  std::uint64_t started_unix_ns = 0;
  std::vector<Stage> last_stages;      // of the last acknowledged RP (explainable RPO)
  std::uint64_t progress_done_bytes = 0, progress_total_bytes = 0;  // the RP running
};

class Worker {
 public:
  using OnRp = std::function<void(const std::string& line)>;
  Worker(TargetConfig cfg, std::string state_dir, std::int64_t event_log_bytes, OnRp on_rp,
         SourceMetrics& sm)
      : cfg_(std::move(cfg)),
        state_dir_(std::move(state_dir)),
        event_log_bytes_(event_log_bytes),
        on_rp_(std::move(on_rp)),
        sm_(sm) {
    st_.started_unix_ns = unix_now_ns();
    sm_.target(cfg_.group, double(cfg_.rpo_alert_seconds));
    heartbeat_ms_.store(steady_now_ms());
    thread_ = std::thread([this] { run(); });
  }
  ~Worker() {
    request_stop();
    if (thread_.joinable()) thread_.join();
  }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void request_stop() {
    std::lock_guard lk(mu_);
    stop_.store(true);
    cv_.notify_all();
  }
  void join() {
    if (thread_.joinable()) thread_.join();
  }
  TargetConfig config() const {
    std::lock_guard lk(mu_);
    return cfg_;
  }
  // Interval and RPO threshold changes apply to the running worker; the wait in progress is
  // re-evaluated against the new interval at once.
  void update_schedule(const TargetConfig& c) {
    std::lock_guard lk(mu_);
    cfg_.interval_seconds = c.interval_seconds;
    cfg_.rpo_alert_seconds = c.rpo_alert_seconds;
    cfg_.line = c.line;
    sm_.target(cfg_.group, double(cfg_.rpo_alert_seconds));
    cv_.notify_all();
  }
  bool live(std::int64_t now_ms) const { return now_ms - heartbeat_ms_.load() < kStuckAfterMs; }
  bool failing() const {
    std::lock_guard lk(mu_);
    return !st_.last_error.empty();
  }
  nlohmann::json status_json(std::uint64_t now_ns) const;

 private:
  void run();
  Status take_one(std::unique_ptr<cbt::ChangeSource>& source);
  void record(const Result<source::RpStats>& rp, std::uint64_t start_ns);
  void instrument_worker(source::SenderOptions& so);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  TargetConfig cfg_;
  const std::string state_dir_;
  const std::int64_t event_log_bytes_;
  const OnRp on_rp_;
  SourceMetrics& sm_;
  std::atomic<bool> stop_{false};
  std::atomic<std::int64_t> heartbeat_ms_{0};
  TargetStatus st_;
  std::unique_ptr<events::EventLog> events_;  // the group's event log; the worker's thread only
  std::thread thread_;  // last: starts after everything above is built
};

void Worker::run() {
  std::unique_ptr<cbt::ChangeSource> source;
  while (!stop_.load()) {
    const auto t0 = SteadyClock::now();
    heartbeat_ms_.store(steady_now_ms());
    {
      std::lock_guard lk(mu_);
      st_.state = "running";
    }
    Status s = take_one(source);
    if (!s.is_ok() && s.code() != Errc::cancelled) source.reset();  // reopen at the next tick
    std::unique_lock lk(mu_);
    for (;;) {  // re-read the interval each time: SIGHUP may change it
      heartbeat_ms_.store(steady_now_ms());
      const auto due = t0 + std::chrono::seconds(cfg_.interval_seconds);
      if (stop_.load() || SteadyClock::now() >= due) break;
      cv_.wait_until(lk, std::min(due, SteadyClock::now() + std::chrono::seconds(1)));
    }
  }
  // The source (and its QMP connection) is closed here, by this thread, before join returns.
  source.reset();
}

Status Worker::take_one(std::unique_ptr<cbt::ChangeSource>& source) {
  const TargetConfig cfg = config();
  const std::uint64_t start_ns = unix_now_ns();
  if (!source) {
    auto opened = open_target_source(cfg, state_dir_);
    if (!opened.is_ok()) {
      Status s = opened.status().with_context("opening the source");
      record(s, start_ns);
      return s;
    }
    source = std::move(*opened);
  }
  auto ep = transport::parse_endpoint(cfg.to);
  if (!ep.is_ok()) {
    record(ep.status(), start_ns);
    return ep.status();
  }
  source::SenderOptions so;
  so.to = *ep;
  so.group = cfg.group;
  so.source_name = target_source_name(cfg);
  so.disk_names = source->disk_names();
  so.stop = &stop_;
  so.progress = [this](std::uint64_t done, std::uint64_t total) {
    heartbeat_ms_.store(steady_now_ms());
    std::lock_guard lk(mu_);
    st_.progress_done_bytes = done;
    st_.progress_total_bytes = total;
  };
  instrument_worker(so);
  // Loaded for every RP: certificates rotated in place are picked up without a restart.
  if (!cfg.tls_cert.empty()) {
    auto tls = transport::TlsConfig::load(transport::TlsConfig::Role::client,
                                          {cfg.tls_cert, cfg.tls_key, cfg.tls_ca, ""});
    if (!tls.is_ok()) {
      Status s = tls.status().with_context("TLS material");
      record(s, start_ns);
      return s;
    }
    so.connection.tls = std::move(tls).value();
    so.connection.tls_server_name = cfg.tls_server_name;
  }
  if (!events_)
    events_ = source::open_source_events(state_dir_, so.group, std::uint64_t(event_log_bytes_));
  auto rp = source::take_recovery_point_with_events(*source, so, events_.get());
  record(rp, start_ns);
  return rp.status();
}

// Metrics and the RPO across restarts: the receiver's last committed RP (from the hello)
// dates the RPO until this agent's first RP is acknowledged.
void Worker::instrument_worker(source::SenderOptions& so) {
  instrument(sm_, so);
  so.on_receiver_state = [this, inner = so.on_receiver_state](std::uint64_t rp, std::uint64_t ns) {
    inner(rp, ns);
    std::lock_guard lk(mu_);
    if (st_.last_rp_id == 0 && rp != 0) {
      st_.last_rp_id = rp;
      st_.last_rp_unix_ns = ns;
    }
  };
}

void Worker::record(const Result<source::RpStats>& rp, std::uint64_t start_ns) {
  const std::uint64_t now_ns = unix_now_ns();
  std::string line;
  if (rp.is_ok())
    sm_.rp_done(cfg_.group, *rp, rp->created_unix_ns);
  else
    sm_.rp_failed(cfg_.group, rp.status());
  {
    std::lock_guard lk(mu_);
    st_.progress_done_bytes = st_.progress_total_bytes = 0;
    if (rp.is_ok()) {
      st_.last_stages = rp_stages(*rp);
      st_.state = "idle";
      st_.last_rp_id = rp->rp_id;
      const auto total_ns = static_cast<std::uint64_t>(rp->total_seconds * 1e9);
      st_.last_rp_unix_ns = std::max(start_ns, now_ns - std::min(now_ns, total_ns));
      st_.last_ack_unix_ns = now_ns;
      st_.changed_bytes = 0;
      for (const auto& d : rp->disks) st_.changed_bytes += d.extent_bytes;
      st_.sent_bytes = rp->wire_bytes;
      st_.last_rp_seconds = rp->total_seconds;
      st_.last_error.clear();
      ++st_.rps_ok;
      line = cfg_.group + ": " + source::describe(*rp);
    } else {
      st_.state = rp.status().code() == Errc::cancelled ? "idle" : "failed";
      st_.last_error = rp.status().to_string();
      st_.last_error_unix_ns = now_ns;
      ++st_.rps_failed;
      line = cfg_.group + ": RP failed: " + st_.last_error;
    }
  }
  if (rp.is_ok())
    spdlog::info("{}", line);
  else if (!stop_.load())
    spdlog::error("{} (retrying at the next tick)", line);
  on_rp_(line);
}

nlohmann::json Worker::status_json(std::uint64_t now_ns) const {
  std::lock_guard lk(mu_);
  nlohmann::json j;
  j["name"] = cfg_.group;
  j["kind"] = target_kind_name(cfg_.kind);
  j["source"] = cfg_.kind == TargetKind::qmp ? cfg_.qmp_socket : cfg_.uri + "/" + cfg_.domain;
  j["to"] = cfg_.to;
  j["state"] = st_.state;
  j["interval_seconds"] = cfg_.interval_seconds;
  j["rpo_alert_seconds"] = cfg_.rpo_alert_seconds;
  j["last_rp_id"] = st_.last_rp_id;
  j["last_rp_unix_ns"] = st_.last_rp_unix_ns;
  j["last_ack_unix_ns"] = st_.last_ack_unix_ns;
  j["last_rp_seconds"] = st_.last_rp_seconds;
  j["changed_bytes"] = st_.changed_bytes;
  j["sent_bytes"] = st_.sent_bytes;
  j["last_error"] = st_.last_error;
  j["last_error_unix_ns"] = st_.last_error_unix_ns;
  j["rps_ok"] = st_.rps_ok;
  j["rps_failed"] = st_.rps_failed;
  j["rpo_source"] = "agent: capture start of the newest RP acknowledged to this agent";
  const double alert = double(cfg_.rpo_alert_seconds);
  if (st_.last_rp_id != 0) {
    const double rpo = double(now_ns - std::min(now_ns, st_.last_rp_unix_ns)) / 1e9;
    j["rpo_seconds"] = rpo;
    j["rpo_exceeded"] = rpo > alert;
  } else {
    j["rpo_seconds"] = nullptr;
    j["rpo_exceeded"] = double(now_ns - std::min(now_ns, st_.started_unix_ns)) / 1e9 > alert;
  }
  // Explainable RPO: the last RP's stages, and when over the threshold the line naming the
  // stage that made it late.
  nlohmann::json stages = nlohmann::json::object();
  for (const Stage& s : st_.last_stages) stages[s.name] = s.seconds;
  j["last_rp_stages"] = std::move(stages);
  j["rpo_alert"] = sm_.alert(cfg_.group);
  j["progress"] = {{"done_bytes", st_.progress_done_bytes}, {"total_bytes", st_.progress_total_bytes}};
  return j;
}

// ---- the agent -----------------------------------------------------------------------------------

class Agent {
 public:
  Agent(std::string config_path, AgentConfig cfg)
      : config_path_(std::move(config_path)), cfg_(std::move(cfg)) {}
  Status start();
  void reload();
  void stop_all();
  std::string render_status() const;
  // Liveness of every worker and of the main loop, for the watchdog.
  bool live() const;
  void beat() { main_beat_ms_.store(steady_now_ms()); }

 private:
  void start_worker(const TargetConfig& t);
  void notify_status(const std::string& line);

  const std::string config_path_;
  AgentConfig cfg_;  // state_dir and status_socket are fixed for the agent's life
  metrics::Registry registry_;      // outlives the workers that record into it
  SourceMetrics source_metrics_{registry_};
  mutable std::mutex mu_;  // guards workers_
  std::map<std::string, std::unique_ptr<Worker>> workers_;  // by group
  std::unique_ptr<metrics::HttpServer> metrics_server_;  // goes first: it reads the above
  std::unique_ptr<StatusSocket> status_;
  std::atomic<std::int64_t> main_beat_ms_{steady_now_ms()};
  const std::uint64_t started_unix_ns_ = unix_now_ns();
};

void Agent::start_worker(const TargetConfig& t) {
  spdlog::info("target {} ({} {}): every {} s to {}", t.group, target_kind_name(t.kind),
               t.kind == TargetKind::qmp ? t.qmp_socket : t.domain, t.interval_seconds, t.to);
  workers_[t.group] = std::make_unique<Worker>(
      t, cfg_.state_dir, cfg_.event_log_bytes, [this](const std::string& l) { notify_status(l); },
      source_metrics_);
}

Status Agent::start() {
  FERRY_TRY(make_dirs(cfg_.state_dir));
  auto server = StatusSocket::create(cfg_.status_socket, [this] { return render_status(); });
  if (!server.is_ok()) return server.status().with_context("status socket");
  status_ = std::move(*server);
  if (!cfg_.metrics.empty()) {  // fixed for the agent's life, like the status socket
    auto m = serve_metrics(cfg_.metrics, registry_);
    if (!m.is_ok()) return m.status();
    metrics_server_ = std::move(m).value();
    spdlog::info("metrics on http://{}/metrics", cfg_.metrics);
  }
  std::lock_guard lk(mu_);
  for (const auto& t : cfg_.targets) start_worker(t);
  return Status::ok();
}

void Agent::notify_status(const std::string& line) {
  std::size_t failing = 0, total = 0;
  {
    std::lock_guard lk(mu_);
    for (const auto& [g, w] : workers_) {
      ++total;
      failing += w->failing() ? 1 : 0;
    }
  }
  std::string s = "STATUS=" + std::to_string(total) + " targets, " + std::to_string(failing) +
                  " failing; last: " + line;
  if (s.size() > 400) s.resize(400);
  sd_notify(0, s.c_str());
}

void Agent::reload() {
  auto next = load_agent_config(config_path_);
  if (!next.is_ok()) {
    spdlog::error("config reload rejected, keeping the running config: {}",
                  next.status().to_string());
    return;
  }
  if (next->state_dir != cfg_.state_dir || next->status_socket != cfg_.status_socket ||
      next->metrics != cfg_.metrics)
    spdlog::warn("state_dir, status_socket and metrics changes take effect at the next start");
  spdlog::set_level(spdlog::level::from_str(next->log_level));
  std::map<std::string, const TargetConfig*> wanted;
  for (const auto& t : next->targets) wanted[t.group] = &t;
  // Stop first, all at once (each abandons its RP in flight), then start: a new target may
  // use the QMP socket a removed one held. Workers are joined without mu_ held, since a worker
  // finishing its RP takes mu_ to publish STATUS=.
  std::vector<std::unique_ptr<Worker>> retired;
  std::vector<std::string> removed;  // groups no longer protected: their gauges go
  {
    std::lock_guard lk(mu_);
    for (auto it = workers_.begin(); it != workers_.end();) {
      auto w = wanted.find(it->first);
      if (w != wanted.end() && it->second->config().same_source(*w->second)) {
        it->second->update_schedule(*w->second);
        ++it;
        continue;
      }
      spdlog::info("target {}: {}", it->first,
                   w == wanted.end() ? "removed" : "changed: restarting");
      it->second->request_stop();
      retired.push_back(std::move(it->second));
      if (w == wanted.end()) removed.push_back(it->first);
      it = workers_.erase(it);
    }
  }
  for (auto& w : retired) w->join();
  retired.clear();
  for (const std::string& g : removed) source_metrics_.forget(g);  // after the joins: no late RP
  std::lock_guard lk(mu_);
  for (const auto& t : next->targets)
    if (!workers_.count(t.group)) start_worker(t);
  cfg_.targets = next->targets;
  cfg_.log_level = next->log_level;
  spdlog::info("config reloaded from {}: {} targets", config_path_, workers_.size());
}

void Agent::stop_all() {
  std::map<std::string, std::unique_ptr<Worker>> all;
  {
    std::lock_guard lk(mu_);
    for (auto& [g, w] : workers_) w->request_stop();
    all.swap(workers_);
  }
  for (auto& [g, w] : all) w->join();  // without mu_: see reload()
  all.clear();
  status_.reset();
}

std::string Agent::render_status() const {
  const std::uint64_t now = unix_now_ns();
  nlohmann::json targets = nlohmann::json::array();
  {
    std::lock_guard lk(mu_);
    for (const auto& [g, w] : workers_) targets.push_back(w->status_json(now));
  }
  nlohmann::json j{{"agent", {{"pid", ::getpid()}, {"config", config_path_},
                              {"started_unix_ns", started_unix_ns_}, {"now_unix_ns", now}}},
                   {"targets", targets}};
  return j.dump();
}

bool Agent::live() const {
  const std::int64_t now = steady_now_ms();
  if (now - main_beat_ms_.load() > kStuckAfterMs) return false;
  std::lock_guard lk(mu_);
  for (const auto& [g, w] : workers_)
    if (!w->live(now)) return false;
  return true;
}

// Pets systemd's watchdog (WATCHDOG_USEC) at half its period while the agent is live; a stuck
// worker or main loop stops the petting so systemd restarts the service.
class Watchdog {
 public:
  explicit Watchdog(const Agent& agent) : agent_(agent) {
    std::uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) return;
    const auto period = std::chrono::microseconds(usec / 2);
    spdlog::info("systemd watchdog every {} ms", usec / 2000);
    thread_ = std::thread([this, period] {
      std::unique_lock lk(mu_);
      while (!cv_.wait_for(lk, period, [this] { return stop_; })) {
        if (agent_.live())
          sd_notify(0, "WATCHDOG=1");
        else
          spdlog::error("a worker is stuck: not petting the watchdog");
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  const Agent& agent_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace

int cmd_agent(const std::string& config_path) {
  init_logging("agent");
  auto cfg = load_agent_config(config_path);
  if (!cfg.is_ok()) {
    std::fprintf(stderr, "ferry agent: %s\n", cfg.status().message().c_str());
    return 1;
  }
  if (!std::getenv("FERRY_LOG")) spdlog::set_level(spdlog::level::from_str(cfg->log_level));
  // Signals are taken synchronously by this thread only; workers never see them.
  sigset_t set;
  sigemptyset(&set);
  for (int s : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&set, s);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);

  Agent agent(config_path, *cfg);
  if (Status s = agent.start(); !s.is_ok()) {
    std::fprintf(stderr, "ferry agent: %s\n", s.to_string().c_str());
    agent.stop_all();
    return 1;
  }
  spdlog::info("agent ready: {} targets, status on {}", cfg->targets.size(), cfg->status_socket);
  sd_notifyf(0, "READY=1\nSTATUS=%zu targets loaded", cfg->targets.size());
  Watchdog watchdog(agent);
  for (;;) {
    const timespec tick{1, 0};
    const int sig = sigtimedwait(&set, nullptr, &tick);
    agent.beat();
    if (sig == SIGHUP) {
      spdlog::info("SIGHUP: reloading {}", config_path);
      sd_notify(0, "RELOADING=1");
      agent.reload();
      sd_notify(0, "READY=1");
    } else if (sig == SIGTERM || sig == SIGINT) {
      spdlog::info("signal {}: stopping (RPs in flight are abandoned safely)", sig);
      sd_notify(0, "STOPPING=1");
      break;
    }
  }
  agent.stop_all();
  spdlog::info("stopped");
  return 0;
}

}  // namespace ferry::tools
