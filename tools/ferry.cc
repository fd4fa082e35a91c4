// ferry: the command line. One binary, one subcommand per role.
//
// Exit status: 0 success, 1 failure (message on stderr naming what failed), 2 usage error.
#include <signal.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <future>
#include <mutex>
#include <sstream>
#include <thread>

#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "ferry/base/memory.h"
#include "ferry/cbt/qmp_source.h"
#include "ferry/site/receiver.h"
#include "ferry/site/store.h"
#include "ferry/source/sender.h"
#include "ferry/source/sender_events.h"
#include "ferry/transport/connection.h"
#include "ferry/transport/rules.h"
#include "access.h"
#include "api.h"
#include "api_client.h"
#include "agent.h"
#include "events_cmd.h"
#include "failback.h"
#include "failover.h"
#include "metrics.h"
#include "receive_config.h"
#include "retention_flags.h"
#include "tools.h"

namespace ferry::tools {
namespace {

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

// Blocks SIGTERM/SIGINT/SIGHUP in every thread and turns them into a flag set by a thread of
// its own, so that workers never run signal handlers. Must be created before other threads.
// `on_stop` is fixed before the thread starts: a signal that arrives during start-up is never
// lost.
class SignalWatcher {
 public:
  // on_reload runs on the watcher's thread at each SIGHUP (none: SIGHUP is ignored).
  explicit SignalWatcher(std::function<void()> on_stop = {}, std::function<void()> on_reload = {})
      : on_stop_(std::move(on_stop)), on_reload_(std::move(on_reload)) {
    sigemptyset(&set_);
    sigaddset(&set_, SIGTERM);
    sigaddset(&set_, SIGINT);
    sigaddset(&set_, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
    thread_ = std::thread([this] {
      int sig = 0;
      while (sigwait(&set_, &sig) == 0) {
        if (quitting_.load()) return;
        if (sig == SIGHUP) {
          if (on_reload_) on_reload_();
          continue;
        }
        spdlog::info("signal {} received: stopping", sig);
        stop.store(true);
        if (on_stop_) on_stop_();
        return;
      }
    });
  }
  ~SignalWatcher() {
    quitting_.store(true);
    if (!stop.load()) pthread_kill(thread_.native_handle(), SIGTERM);
    thread_.join();
  }
  std::atomic<bool> stop{false};

 private:
  const std::function<void()> on_stop_;
  const std::function<void()> on_reload_;
  sigset_t set_{};
  std::atomic<bool> quitting_{false};
  std::thread thread_;
};

// ---- receive ---------------------------------------------------------------------------------
struct ReceiveArgs {
  std::string listen;
  std::string store;
  std::string max_disk_bytes;  // a size: 16T, 500G, 1073741824
  std::string status_socket;
  site::RetentionPolicy retention;  // the --keep-* flags; empty when none is given
  std::string config = kDefaultReceiveConfigPath;
  bool config_given = false;  // --config on the command line: the file must exist
  TlsArgs tls;                // --tls-*: mutual TLS 1.3 and the access map
  bool insecure_plaintext = false;
  std::string metrics;        // --metrics ADDR:PORT (over receive.toml's metrics)
  std::string api;            // --api ADDR:PORT (over receive.toml's api; tools/api.h)
  std::uint64_t event_log_bytes = events::kDefaultMaxFileBytes;
};

// What a SIGHUP replaces: the config (retention, access map, quotas). Read by the
// connections' threads (authorize, quota) and swapped whole by the reload.
class ConfigHolder {
 public:
  explicit ConfigHolder(ReceiveConfig c) : config_(std::make_shared<const ReceiveConfig>(std::move(c))) {}
  std::shared_ptr<const ReceiveConfig> get() const {
    std::lock_guard lock(mu_);
    return config_;
  }
  void set(ReceiveConfig c) {
    auto next = std::make_shared<const ReceiveConfig>(std::move(c));
    std::lock_guard lock(mu_);
    config_ = std::move(next);
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const ReceiveConfig> config_;
};

// The receiver's authorisation (docs/security.md): the access map of the config in force.
Status authorize_peer(const ReceiveConfig& c, const transport::PeerIdentity* peer,
                      const std::string& group, site::AccessRight right) {
  if (peer == nullptr)  // a TLS server never admits one; refuse rather than assume
    return Status::error(Errc::invalid_argument, "a peer without a verified identity may not " +
                                                     std::string(site::access_right_name(right)) +
                                                     " group '" + group + "'");
  AccessDecision d = decide(c.access, identities_of(*peer), group,
                            right == site::AccessRight::write ? Right::write : Right::manage);
  if (d.allowed) return Status::ok();
  return Status::error(Errc::invalid_argument, d.message);
}

void log_access(const ReceiveConfig& c, bool tls, const char* what) {
  if (!tls) {
    if (!c.access.empty())
      spdlog::warn("access map {}: {} [[access]] entr{} not applied: plaintext connections carry "
                   "no identity (rule A1; docs/security.md)", what, c.access.entries.size(),
                   c.access.entries.size() == 1 ? "y" : "ies");
    return;
  }
  if (c.access.empty())
    spdlog::warn("access map {}: receive.toml has no [[access]] entry, so every peer is refused "
                 "(rule A2; docs/security.md)", what);
  else
    spdlog::info("access map {}: {} identit{}", what, c.access.entries.size(),
                 c.access.entries.size() == 1 ? "y" : "ies");
}

// The receiver's config file merged with the flags (receive_config.h has the precedence).
// The default path is read only when it exists; a --config that names no file is an error.
Result<ReceiveConfig> receive_config(const ReceiveArgs& a) {
  ReceiveConfig file;
  if (a.config_given || ::access(a.config.c_str(), F_OK) == 0) {
    FERRY_ASSIGN_OR_RETURN(file, load_receive_config(a.config));
  }
  return with_flags(std::move(file), a.retention);
}

Result<std::uint64_t> parse_size(const std::string& text) { return parse_byte_size(text); }

// The receiver's status document (ferry status --socket PATH; docs/operations.md): the same
// as GET /v1/status of the management API (api_receiver.cc).
std::string receiver_status_json(const site::Receiver& r, const ReceiveArgs& a,
                                 std::uint64_t max_disk_bytes) {
  return receiver_status_doc(r, a.listen, a.store, max_disk_bytes).dump();
}

int cmd_receive(const ReceiveArgs& a, std::uint64_t max_disk_bytes) {
  init_logging("receive");
  auto ep = transport::parse_endpoint(a.listen, /*allow_port_zero=*/true);
  if (!ep.is_ok()) return fail("--listen", ep.status());
  // Secure by default (docs/security.md): without TLS material only loopback, unless the
  // operator says --insecure-plaintext, which is logged at every start.
  const bool tls_on = a.tls.given();
  if (!tls_on && !loopback_host(ep->host) && !a.insecure_plaintext) {
    std::fprintf(stderr,
                 "ferry receive: --listen %s is not a loopback address and no TLS material is "
                 "given: give --tls-cert, --tls-key and --tls-ca (docs/security.md), or "
                 "--insecure-plaintext to serve plaintext on the network\n",
                 a.listen.c_str());
    return kExitUsage;
  }
  if (tls_on && a.insecure_plaintext)
    spdlog::warn("--insecure-plaintext is ignored: TLS material is given, every connection is "
                 "mutual TLS");
  if (!tls_on && a.insecure_plaintext)
    spdlog::warn("--insecure-plaintext: listening on {} without TLS: any peer that reaches it may "
                 "write or read any group, and the traffic is not encrypted", a.listen);
  else if (!tls_on)
    spdlog::info("no TLS material given: plaintext, on the loopback address {} only "
                 "(docs/security.md)", ep->host);
  auto tls = load_tls(a.tls, transport::TlsConfig::Role::server);
  if (!tls.is_ok()) return fail("TLS material", tls.status());
  // Retention, access map and quotas: receive.toml (over the --keep-* flags for retention);
  // SIGHUP reloads the file and the TLS files (a bad one is reported and what is in force
  // stays).
  auto config = receive_config(a);
  if (!config.is_ok()) return fail("config " + a.config, config.status());
  auto policies = [](std::shared_ptr<const ReceiveConfig> c) {
    return [c](const std::string& group) { return c->for_group(group); };
  };
  auto log_policy = [](const ReceiveConfig& c, const char* what) {
    spdlog::info("retention {}: {} by default, {} group(s) with their own", what,
                 site::effective_retention(c.retention).describe(), c.groups.size());
  };
  log_policy(*config, "policy");
  log_access(*config, tls_on, "loaded");
  auto holder = std::make_shared<ConfigHolder>(*config);
  site::ReceiverOptions ro;
  ro.store.root = a.store;
  ro.max_disk_bytes = max_disk_bytes;
  ro.event_log_bytes = a.event_log_bytes;
  // Test-only (docs/operations.md, `ferry doctor`): the clock the probe reports is shifted.
  if (const char* off = std::getenv("FERRY_TEST_CLOCK_OFFSET_MS"); off && *off) {
    ro.test_clock_offset_ms = std::strtoll(off, nullptr, 10);
    spdlog::warn("FERRY_TEST_CLOCK_OFFSET_MS={}: the probe reports a shifted clock (test-only)",
                 ro.test_clock_offset_ms);
  }
  ro.retention_for = policies(std::make_shared<const ReceiveConfig>(*config));
  if (tls_on)  // A1: plaintext mode has no identities and no access map
    ro.authorize = [holder](const transport::PeerIdentity* peer, const std::string& group,
                            site::AccessRight right) {
      return authorize_peer(*holder->get(), peer, group, right);
    };
  ro.quota_for = [holder](const std::string& group) { return holder->get()->quota_for(group); };
  // Metrics: the hooks count into the registry; the gauges read the receiver at each scrape.
  const std::string metrics_at = a.metrics.empty() ? config->metrics : a.metrics;
  metrics::Registry registry;
  ReceiverMetrics receiver_metrics(registry, a.store);
  if (!metrics_at.empty()) {
    ro.on_rp_committed = [&receiver_metrics](const site::RpReceived& r) { receiver_metrics.rp_committed(r); };
    ro.on_rp_refused = [&receiver_metrics](const std::string& g, const Status& why) {
      receiver_metrics.rp_refused(g, why);
    };
  }
  // Before the receiver starts its threads: they must inherit the blocked signals.
  std::promise<void> stopped;
  std::atomic<site::Receiver*> running{nullptr};
  std::atomic<transport::Server*> serving{nullptr};
  SignalWatcher signals([&stopped] { stopped.set_value(); }, [&] {
    auto next = receive_config(a);
    if (!next.is_ok()) {
      spdlog::error("SIGHUP: config {} not reloaded: {}; the retention policy, access map and "
                    "quotas in force stay", a.config, next.status().to_string());
    } else {
      // The access map and quotas are read through the holder, so they apply even to a
      // reload that comes before the receiver is up; retention goes to the receiver.
      if (site::Receiver* rr = running.load()) {
        rr->set_retention(policies(std::make_shared<const ReceiveConfig>(*next)));
        log_policy(*next, "reloaded (SIGHUP)");
      }
      log_access(*next, tls_on, "reloaded (SIGHUP)");
      holder->set(std::move(next).value());
    }
    if (!tls_on) return;
    // New handshakes use the new certificates and CRL; connections in flight keep theirs.
    auto next_tls = load_tls(a.tls, transport::TlsConfig::Role::server);
    if (!next_tls.is_ok()) {
      spdlog::error("SIGHUP: TLS material not reloaded: {}; the certificates in force stay",
                    next_tls.status().to_string());
    } else if (transport::Server* srv = serving.load()) {
      srv->set_tls(std::move(next_tls).value());
      spdlog::info("TLS material reloaded (SIGHUP): certificate {}, CA {}{}{}", a.tls.cert, a.tls.ca,
                   a.tls.crl.empty() ? "" : ", CRL ", a.tls.crl);
    }
  });
  auto receiver = site::Receiver::create(ro);
  if (!receiver.is_ok()) return fail("receiver", receiver.status());
  running.store(receiver->get());
  struct Unset {  // before the receiver goes: a late SIGHUP must not reach it
    std::atomic<site::Receiver*>& p;
    ~Unset() { p.store(nullptr); }
  } unset{running};
  site::Receiver* r = receiver->get();
  receiver_metrics.attach(r);
  std::unique_ptr<metrics::HttpServer> metrics_server;  // stopped before the receiver goes
  if (!metrics_at.empty()) {
    auto m = serve_metrics(metrics_at, registry);
    if (!m.is_ok()) return fail("metrics", m.status());
    metrics_server = std::move(m).value();
    spdlog::info("metrics on http://{}/metrics (port {})", metrics_at, metrics_server->port());
  }
  // The management API (api.h): the same TLS material and access map as the wire.
  auto api = start_receiver_api(a.api.empty() ? config->api : a.api, tls_on, a.insecure_plaintext, *tls,
                                ReceiverApi{a.store, a.listen, max_disk_bytes, r,
                                            [holder] { return holder->get()->access; }, nullptr});
  if (!api.is_ok()) return fail("--api", api.status());
  std::unique_ptr<StatusSocket> status;
  if (!a.status_socket.empty()) {
    auto s = StatusSocket::create(a.status_socket, [r, &a, max_disk_bytes] {
      return receiver_status_json(*r, a, max_disk_bytes);
    });
    if (!s.is_ok()) return fail("--status-socket", s.status());
    status = std::move(s).value();
  }
  transport::ServerOptions so;
  so.connection.tls = *tls;
  auto server = transport::Server::listen(*ep, so, [r](transport::Connection& c) { r->serve(c); });
  if (!server.is_ok()) return fail("listen on " + a.listen, server.status());
  serving.store(server->get());
  struct UnsetServer {  // before the server goes: a late SIGHUP must not reach it
    std::atomic<transport::Server*>& p;
    ~UnsetServer() { p.store(nullptr); }
  } unset_server{serving};
  spdlog::info("listening on {}:{} with store {} ({}){}{}", ep->host, (*server)->port(), a.store,
               tls_on ? "mutual TLS 1.3" : "plaintext",
               a.status_socket.empty() ? "" : ", status on ", a.status_socket);
  // systemd (Type=notify): ready once the listen socket is bound; a no-op without NOTIFY_SOCKET.
  sd_notifyf(0, "READY=1\nSTATUS=listening on %s:%u, store %s", ep->host.c_str(),
             unsigned((*server)->port()), a.store.c_str());
  // STATUS= follows the groups' health, so `systemctl status` shows a failing group.
  std::future<void> done = stopped.get_future();
  std::string last_line;
  while (done.wait_for(std::chrono::seconds(2)) != std::future_status::ready) {
    std::size_t total = 0, failing = 0, apply_failing = 0;
    std::string first;  // a failing group's cause first, else a failed apply's (R19)
    for (const site::GroupStatus& g : r->status()) {
      ++total;
      if (g.state == site::GroupState::failing) {
        if (failing++ == 0) first = g.group + ": " + g.cause;
      } else if (g.state == site::GroupState::apply_pending && !g.cause.empty()) {
        if (apply_failing++ == 0 && failing == 0) first = g.group + ": " + g.cause;
      }
    }
    std::string line = fmt::format(
        "listening on {}:{}, store {}: {} group(s), {} failing{}{}{}", ep->host,
        (*server)->port(), a.store, total, failing,
        apply_failing ? fmt::format(", {} apply failing", apply_failing) : std::string(),
        first.empty() ? "" : "; ", first.substr(0, 200));
    if (line != last_line) sd_notifyf(0, "STATUS=%s", line.c_str());
    last_line = std::move(line);
  }
  sd_notify(0, "STOPPING=1");
  (*server)->stop();
  spdlog::info("stopped");
  return 0;
}

// ---- replicate -------------------------------------------------------------------------------
struct ReplicateArgs {
  std::string qmp;
  std::vector<std::string> disks;  // NODE[=NAME]
  std::string to;
  std::string group;
  bool once = false;
  double interval_seconds = 0;
  std::string nbd_socket;
  std::string state_dir;
  std::uint32_t block_kib = 64;
  int zstd_level = transport::kDefaultZstdLevel;
  bool take_over = false;
  TlsArgs tls;
  std::string metrics;       // --metrics ADDR:PORT (with --interval)
  double rpo_alert_seconds = 0;  // --rpo-alert; 0: 3 x interval
  std::uint64_t event_log_bytes = events::kDefaultMaxFileBytes;
};

// The sender's connection: mutual TLS when --tls-* are given (the receiver's certificate
// must name --tls-server-name, default the host in --to), else plaintext.
Status set_client_tls(const TlsArgs& a, source::SenderOptions* so) {
  FERRY_ASSIGN_OR_RETURN(so->connection.tls, load_tls(a, transport::TlsConfig::Role::client));
  so->connection.tls_server_name = a.server_name;
  return Status::ok();
}

Result<std::vector<cbt::QmpDisk>> parse_disks(const std::vector<std::string>& specs) {
  std::vector<cbt::QmpDisk> out;
  for (const auto& s : specs) {
    auto eq = s.find('=');
    cbt::QmpDisk d;
    d.node = s.substr(0, eq);
    d.name = eq == std::string::npos ? d.node : s.substr(eq + 1);
    if (d.node.empty() || d.name.empty())
      return Status::error(Errc::invalid_argument, "--disk '" + s + "' is not NODE[=NAME]");
    for (const auto& o : out)
      if (o.name == d.name || o.node == d.node)
        return Status::error(Errc::invalid_argument, "--disk '" + s + "' names a disk twice");
    out.push_back(d);
  }
  return out;
}

// --once: one RP, its id on stdout. Otherwise an RP every interval (from the start of the
// previous one) until SIGTERM; a failed RP is logged and retried at the next tick.
// With --metrics each RP is recorded into the registry served there, and an RPO over
// --rpo-alert is logged with the stage that made it late.
// The event log of the group (under the state dir) records each RP on the source's side.
struct Watch {
  std::string metrics;
  double rpo_alert_seconds = 0;
  std::string state_dir;
  std::uint64_t event_log_bytes = events::kDefaultMaxFileBytes;
};
int run_recovery_points(cbt::ChangeSource& source, source::SenderOptions& so, bool once,
                        double interval_seconds, SignalWatcher& signals, const Watch& watch) {
  const auto events = source::open_source_events(watch.state_dir, so.group, watch.event_log_bytes);
  if (once) {
    auto rp = source::take_recovery_point_with_events(source, so, events.get());
    if (so.progress) std::fprintf(stderr, "\n");
    if (!rp.is_ok()) return fail("recovery point of group '" + so.group + "'", rp.status());
    spdlog::info("{}", source::describe(*rp));
    std::printf("%llu\n", static_cast<unsigned long long>(rp->rp_id));
    return 0;
  }
  using namespace std::chrono;
  const auto period = duration_cast<milliseconds>(duration<double>(interval_seconds));
  metrics::Registry registry;
  SourceMetrics sm(registry);
  sm.target(so.group, watch.rpo_alert_seconds > 0 ? watch.rpo_alert_seconds : 3 * interval_seconds);
  std::unique_ptr<metrics::HttpServer> metrics_server;
  if (!watch.metrics.empty()) {
    auto m = serve_metrics(watch.metrics, registry);
    if (!m.is_ok()) return fail("metrics", m.status());
    metrics_server = std::move(m).value();
    spdlog::info("metrics on http://{}/metrics", watch.metrics);
  }
  std::string last_refusal;
  while (!signals.stop.load()) {
    auto t0 = steady_clock::now();
    source::SenderOptions rso = so;
    instrument(sm, rso);
    auto rp = source::take_recovery_point_with_events(source, rso, events.get());
    if (so.progress) std::fprintf(stderr, "\n");
    // A failed-over group refuses every attempt until failback: logged once per change of
    // state, while the attempts go on (docs/failover.md, "Roles").
    const std::string why = rp.is_ok() ? std::string() : rp.status().to_string();
    const bool state_refusal = why.find("accepts no RPs until failback") != std::string::npos;
    if (rp.is_ok()) {
      sm.rp_done(so.group, *rp, rp->created_unix_ns);
      spdlog::info("{}", source::describe(*rp));
    } else {
      sm.rp_failed(so.group, rp.status());
      if (!state_refusal || why != last_refusal)
        spdlog::error("recovery point of group '{}' failed (retrying in {:.1f} s{}): {}", so.group,
                      interval_seconds,
                      state_refusal ? "; logged again when the group's state changes" : "", why);
    }
    last_refusal = state_refusal ? why : std::string();
    if (std::string alert = sm.alert(so.group); !alert.empty()) spdlog::warn("group '{}': {}", so.group, alert);
    while (!signals.stop.load() && steady_clock::now() - t0 < period)
      std::this_thread::sleep_for(milliseconds(50));
  }
  return 0;
}

int cmd_replicate(const ReplicateArgs& a) {
  init_logging("replicate");
  auto ep = transport::parse_endpoint(a.to);
  if (!ep.is_ok()) return fail("--to", ep.status());
  auto disks = parse_disks(a.disks);
  if (!disks.is_ok()) return fail("--disk", disks.status());
  const std::uint64_t block_bytes = std::uint64_t(a.block_kib) * 1024;
  if (block_bytes < source::kMinSendBlockBytes || !transport::block_bytes_valid(block_bytes))
    return fail("--block-size", Status::error(Errc::invalid_argument,
                                              "must be a power of two from 4 to 4096 KiB"));
  SignalWatcher signals;
  cbt::QmpSourceOptions qo;
  qo.qmp_socket = a.qmp;
  qo.group = a.group;
  qo.disks = *disks;
  qo.nbd_socket = a.nbd_socket;
  qo.work_dir = (a.state_dir.empty() ? default_state_dir() : a.state_dir) + "/" + a.group;
  auto source = cbt::open_qmp_source(qo);
  if (!source.is_ok()) return fail("QEMU at " + a.qmp, source.status());

  source::SenderOptions so;
  so.to = *ep;
  so.group = a.group;
  so.source_name = host_name() + ":" + a.qmp;
  for (const auto& d : *disks) so.disk_names.push_back(d.name);
  so.block_bytes = a.block_kib * 1024;
  so.zstd_level = a.zstd_level;
  so.take_over = a.take_over;
  so.stop = &signals.stop;
  if (isatty(STDERR_FILENO)) so.progress = progress_printer();
  if (Status s = set_client_tls(a.tls, &so); !s.is_ok()) return fail("TLS material", s);

  return run_recovery_points(**source, so, a.once, a.interval_seconds, signals,
                             {a.metrics, a.rpo_alert_seconds,
                              a.state_dir.empty() ? default_state_dir() : a.state_dir,
                              a.event_log_bytes});
}

// ---- protect -----------------------------------------------------------------------------------
struct ProtectArgs {
  std::vector<std::string> domains;  // several: a protection group, one instant per RP
  std::string to;
  std::string group;  // default: the domain name (required with several domains)
  std::string boot_order;  // "a,b": default the order of --domain
  std::vector<std::string> vm_names;  // DOMAIN=VM: the group's name of a domain
  std::int64_t max_pause_ms = kDefaultMaxPauseMs;
  bool once = false;
  double interval_seconds = 0;
  bool quiesce = false;
  std::string uri = "qemu:///system";
  std::string state_dir;
  bool take_over = false;
  TlsArgs tls;
  std::string metrics;
  double rpo_alert_seconds = 0;
  std::uint64_t event_log_bytes = events::kDefaultMaxFileBytes;
};

int cmd_protect(const ProtectArgs& a) {
  init_logging("protect");
  auto ep = transport::parse_endpoint(a.to);
  if (!ep.is_ok()) return fail("--to", ep.status());
  TargetConfig t;
  t.kind = TargetKind::libvirt_domain;
  t.domains = a.domains;
  t.domain = a.domains.front();
  for (std::size_t i = 1; i < a.domains.size(); ++i) t.domain += "," + a.domains[i];
  t.uri = a.uri;
  if (a.domains.size() > 1 && a.group.empty())
    return fail("--group", Status::error(Errc::invalid_argument,
                                         "a protection group of several domains needs --group NAME"));
  t.group = a.group.empty() ? a.domains.front() : a.group;
  t.quiesce = a.quiesce;
  t.max_pause_ms = a.max_pause_ms;
  if (!a.boot_order.empty()) {
    std::stringstream in(a.boot_order);
    for (std::string name; std::getline(in, name, ',');) t.boot_order.push_back(name);
  }
  for (const std::string& m : a.vm_names) {
    const auto eq = m.find('=');
    const std::string dom = m.substr(0, eq);
    if (eq == std::string::npos || eq == 0 || eq + 1 == m.size() ||
        std::find(a.domains.begin(), a.domains.end(), dom) == a.domains.end())
      return fail("--vm-name", Status::error(Errc::invalid_argument,
                                             "'" + m + "': give DOMAIN=VM for a --domain"));
  }
  if (!a.vm_names.empty()) {
    if (a.domains.size() < 2)
      return fail("--vm-name", Status::error(Errc::invalid_argument,
                                             "names the VMs of a group of several domains"));
    for (const std::string& d : a.domains) {
      std::string vm = d;
      for (const std::string& m : a.vm_names)
        if (m.compare(0, d.size() + 1, d + "=") == 0) vm = m.substr(d.size() + 1);
      t.vm_names.push_back(vm);
    }
  }
  SignalWatcher signals;
  auto source = open_target_source(t, a.state_dir.empty() ? default_state_dir() : a.state_dir);
  const std::string what = a.domains.size() > 1 ? "domains '" + t.domain + "'" : "domain '" + t.domain + "'";
  if (!source.is_ok()) return fail(what + " at " + a.uri, source.status());
  source::SenderOptions so;
  so.to = *ep;
  so.group = t.group;
  so.source_name = target_source_name(t);
  so.disk_names = (*source)->disk_names();
  so.take_over = a.take_over;
  so.stop = &signals.stop;
  if (isatty(STDERR_FILENO)) so.progress = progress_printer();
  if (Status s = set_client_tls(a.tls, &so); !s.is_ok()) return fail("TLS material", s);
  return run_recovery_points(**source, so, a.once, a.interval_seconds, signals,
                             {a.metrics, a.rpo_alert_seconds,
                              a.state_dir.empty() ? default_state_dir() : a.state_dir,
                              a.event_log_bytes});
}

}  // namespace
}  // namespace ferry::tools

int main(int argc, char** argv) {
  using namespace ferry::tools;
  ferry::tune_allocator();
  CLI::App app{"Ferry: block-level replication of running VM disks to a journaled receiver"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "ferry 0.1.0");

  ReceiveArgs ra;
  auto* receive = app.add_subcommand("receive", "Run the receiver in the foreground");
  receive->add_option("--listen", ra.listen, "ADDR:PORT to listen on")->required();
  receive->add_option("--store", ra.store, "Store directory")->required();
  receive->add_option("--max-disk-bytes", ra.max_disk_bytes,
                      "Refuse disks larger than SIZE (16T, 500G, bytes; binary units); "
                      "default: whatever the store's file system can hold");
  receive->add_option("--status-socket", ra.status_socket,
                      "Serve each group's state on this unix socket (ferry status --socket)");
  receive->add_option("--api", ra.api,
                      "Management API (REST/JSON, docs/api.yaml) on ADDR:PORT; mutual TLS with "
                      "the --tls-* material (over receive.toml's api)");
  receive->add_option("--metrics", ra.metrics,
                      "Serve Prometheus metrics at http://ADDR:PORT/metrics (over receive.toml's metrics)");
  RetentionFlags receive_retention;
  add_retention_flags(receive, receive_retention);
  receive->add_option("--tls-cert", ra.tls.cert, "PEM certificate chain of this receiver (mutual TLS 1.3)");
  receive->add_option("--tls-key", ra.tls.key, "PEM private key of --tls-cert (mode 0600 or stricter)");
  receive->add_option("--tls-ca", ra.tls.ca, "PEM CA bundle that signs the sources' certificates");
  receive->add_option("--tls-crl", ra.tls.crl, "PEM CRL(s) of that CA (reloaded on SIGHUP)");
  receive->add_flag("--insecure-plaintext", ra.insecure_plaintext,
                    "Allow --listen on a non-loopback address without TLS (logged at every start)");
  const auto event_log_range = CLI::Range(ferry::events::kMinMaxFileBytes, std::uint64_t(1) << 30);
  const std::string event_log_help =
      "Bytes per event log file (two per group: docs/operations.md; default 4 MiB)";
  receive->add_option("--event-log-bytes", ra.event_log_bytes, event_log_help)->check(event_log_range);
  auto* receive_config_opt = receive->add_option(
      "--config", ra.config,
      "Receiver config (TOML: retention per group); the default path is read if it exists");
  receive_config_opt->capture_default_str();

  ReplicateArgs pa;
  auto* rep = app.add_subcommand("replicate", "Replicate disks of a QEMU process (over QMP)");
  rep->add_option("--qmp", pa.qmp, "QMP unix socket of QEMU or qemu-storage-daemon")->required();
  rep->add_option("--disk", pa.disks, "NODE[=NAME]: a block node and its name in the group")
      ->required();
  rep->add_option("--to", pa.to, "Receiver ADDR:PORT")->required();
  rep->add_option("--group", pa.group, "Group name")->required();
  auto* once = rep->add_flag("--once", pa.once, "Take one recovery point and exit");
  auto* interval = rep->add_option("--interval", pa.interval_seconds,
                                   "Take a recovery point every SECONDS")
                       ->check(CLI::PositiveNumber);
  once->excludes(interval);
  rep->add_option("--metrics", pa.metrics, "With --interval: Prometheus metrics at http://ADDR:PORT/metrics")
      ->needs(interval);
  rep->add_option("--rpo-alert", pa.rpo_alert_seconds,
                  "With --interval: warn naming the late stage when the RPO passes SECONDS (default 3 x interval)")
      ->check(CLI::PositiveNumber)->needs(interval);
  rep->add_option("--nbd-socket", pa.nbd_socket,
                  "Unix socket of an NBD server already running in QEMU");
  rep->add_option("--state-dir", pa.state_dir, "Scratch and state directory")
      ->capture_default_str();
  rep->add_option("--block-size", pa.block_kib, "Block size in KiB (default 64)");
  rep->add_option("--zstd-level", pa.zstd_level,
                  "zstd level (default " + std::to_string(ferry::transport::kDefaultZstdLevel) + ")")
      ->check(CLI::Range(-7, 19));
  rep->add_option("--tls-cert", pa.tls.cert, "PEM certificate chain of this source (mutual TLS 1.3)");
  rep->add_option("--tls-key", pa.tls.key, "PEM private key of --tls-cert (mode 0600 or stricter)");
  rep->add_option("--tls-ca", pa.tls.ca, "PEM CA bundle that signs the receiver's certificate");
  rep->add_option("--tls-server-name", pa.tls.server_name,
                  "Name the receiver's certificate must carry (DNS or IP; default: the host in --to)");
  rep->add_option("--event-log-bytes", pa.event_log_bytes, event_log_help)->check(event_log_range);
  rep->add_flag("--take-over", pa.take_over,
                "Take the group over from the source that wrote it (another host, other "
                "images): the next RP is a resync or full copy of every disk");

  ProtectArgs pr;
  auto* protect = app.add_subcommand("protect", "Replicate every disk of a running libvirt domain, or of several "
                                           "at one instant per RP (a protection group)");
  protect->add_option("--domain", pr.domains,
                      "Domain name or UUID; repeat for a protection group of several VMs "
                      "(one crash-consistent instant per RP, needs --group)")
      ->required()->take_all();
  protect->add_option("--to", pr.to, "Receiver ADDR:PORT")->required();
  protect->add_option("--group", pr.group, "Group name (default: the domain name)");
  protect->add_option("--boot-order", pr.boot_order,
                      "A group's VMs in the order failover starts them: NAME,NAME,... "
                      "(default: the order of --domain)");
  protect->add_option("--vm-name", pr.vm_names,
                      "DOMAIN=VM: the group's name of a domain (its disks are VM.<target>): a "
                      "failed-over domain db-dr replicating home as the group's db");
  protect->add_option("--max-pause-ms", pr.max_pause_ms,
                      "A group's longest pause for the cross-VM instant; then the VMs are "
                      "resumed and the RP fails (pause timeout)")
      ->check(CLI::Range(std::int64_t{1}, kMaxPauseMs))->capture_default_str();
  auto* p_once = protect->add_flag("--once", pr.once, "Take one recovery point and exit");
  auto* p_interval = protect->add_option("--interval", pr.interval_seconds,
                                         "Take a recovery point every SECONDS")
                         ->check(CLI::PositiveNumber);
  p_once->excludes(p_interval);
  protect->add_option("--metrics", pr.metrics, "With --interval: Prometheus metrics at http://ADDR:PORT/metrics")
      ->needs(p_interval);
  protect->add_option("--rpo-alert", pr.rpo_alert_seconds,
                      "With --interval: warn naming the late stage when the RPO passes SECONDS (default 3 x interval)")
      ->check(CLI::PositiveNumber)->needs(p_interval);
  protect->add_option("--tls-cert", pr.tls.cert, "PEM certificate chain of this source (mutual TLS 1.3)");
  protect->add_option("--tls-key", pr.tls.key, "PEM private key of --tls-cert (mode 0600 or stricter)");
  protect->add_option("--tls-ca", pr.tls.ca, "PEM CA bundle that signs the receiver's certificate");
  protect->add_option("--tls-server-name", pr.tls.server_name,
                  "Name the receiver's certificate must carry (DNS or IP; default: the host in --to)");
  protect->add_option("--event-log-bytes", pr.event_log_bytes, event_log_help)->check(event_log_range);
  protect->add_flag("--take-over", pr.take_over,
                    "Take the group over from the source that wrote it (another host, other "
                    "images): the next RP is a resync or full copy of every disk");
  protect->add_flag("--quiesce", pr.quiesce,
                    "Freeze the guest's file systems (qemu-guest-agent) at each capture");
  protect->add_option("--uri", pr.uri, "libvirt connection URI")->capture_default_str();
  protect->add_option("--state-dir", pr.state_dir, "State directory (default /var/lib/ferry)");

  // ferry --site URL: the commands the management API covers, at a remote site (api_client.h).
  SiteArgs site;
  app.add_option("--site", site.url, "https://HOST:PORT of a site's management API: run points, "
                 "status or failover test there (with --tls-cert, --tls-key, --tls-ca)");
  app.add_option("--tls-cert", site.tls.cert, "With --site: PEM client certificate chain");
  app.add_option("--tls-key", site.tls.key, "With --site: PEM private key of --tls-cert");
  app.add_option("--tls-ca", site.tls.ca, "With --site: PEM CA bundle that signs the site's certificate");
  app.add_option("--tls-server-name", site.tls.server_name,
                 "With --site: the name the site's certificate must carry (default: the URL's host)");

  std::string config_path = kDefaultConfigPath;
  auto* agent = app.add_subcommand("agent", "Run the host service: every target of a config");
  agent->add_option("--config", config_path, "Config file (TOML)")->capture_default_str();

  std::string status_socket = kDefaultStatusSocket;
  bool status_json = false;
  double status_rpo_alert = 0;
  auto* status = app.add_subcommand(
      "status", "Ask the agent how its targets are doing (exit 3: an RPO over its threshold)");
  status->add_option("--socket", status_socket, "The agent's status socket")->capture_default_str();
  status->add_flag("--json", status_json, "JSON output");
  status->add_option("--rpo-alert", status_rpo_alert,
                     "SECONDS: judge every target's (and a receiver's group's) RPO against this "
                     "threshold instead of its own; over it: exit 3")->check(CLI::PositiveNumber);

  std::string store, group, disk, out;
  bool json = false;
  std::string point;
  std::string points_to;
  TlsArgs points_tls;
  auto* points = app.add_subcommand("points", "List the committed recovery points of a group");
  auto* points_store = points->add_option("--store", store, "Store directory (local)");
  auto* points_remote = points->add_option(
      "--to", points_to, "Receiver ADDR:PORT: ask a running receiver (needs the manage right)");
  points_store->excludes(points_remote);
  points->add_option("--group", group, "Group name")->required();
  points->add_flag("--json", json, "JSON output");
  points->add_option("--tls-cert", points_tls.cert, "PEM certificate chain (with --to)");
  points->add_option("--tls-key", points_tls.key, "PEM private key of --tls-cert");
  points->add_option("--tls-ca", points_tls.ca, "PEM CA bundle that signs the receiver's certificate");
  points->add_option("--tls-server-name", points_tls.server_name,
                     "Name the receiver's certificate must carry (default: the host in --to)");

  bool dry_run = false;
  auto* prune = app.add_subcommand(
      "prune", "Apply a retention policy to a group by hand (not while a receiver holds it)");
  prune->add_option("--store", store, "Store directory")->required();
  prune->add_option("--group", group, "Group name")->required();
  prune->add_flag("--dry-run", dry_run, "Show what would be kept and removed, remove nothing");
  prune->add_flag("--json", json, "JSON output");
  RetentionFlags prune_retention;
  add_retention_flags(prune, prune_retention);

  auto* restore = app.add_subcommand("restore", "Write the image of a disk at a recovery point");
  restore->add_option("--store", store, "Store directory")->required();
  restore->add_option("--group", group, "Group name")->required();
  // A validator, not a type: "latest" or a positive RP id.
  const auto point_rule = CLI::Validator(
      [](std::string& v) -> std::string {
        if (v == "latest") return "";
        if (v.empty() || v.size() > 19 || v.find_first_not_of("0123456789") != std::string::npos ||
            std::stoull(v) == 0)
          return "--point must be a recovery point id (1, 2, ...) or 'latest', not '" + v + "'";
        return "";
      },
      "N|latest");
  restore->add_option("--point", point, "Recovery point id, or latest")->required()
      ->check(point_rule);
  restore->add_option("--disk", disk, "Disk name")->required();
  restore->add_option("--out", out, "Output file (raw, sparse) or block device (not truncated; must be at least the disk's size)")->required();

  ExportArgs xa;
  std::string export_point;
  auto* exp = app.add_subcommand(
      "export", "Serve a disk at a recovery point over NBD (nbdkit), read-only, until SIGTERM");
  exp->add_option("--store", xa.store, "Store directory")->required();
  exp->add_option("--group", xa.group, "Group name")->required();
  exp->add_option("--point", export_point, "Recovery point id, or latest")->required()
      ->check(point_rule);
  exp->add_option("--disk", xa.disk, "Disk name")->required();
  exp->add_option("--socket", xa.socket, "Serve on this unix socket (nbd+unix:///?socket=PATH)");
  exp->add_option("--listen", xa.listen,
                  "Serve on ADDR:PORT (default 127.0.0.1:10809); off loopback only with --tls-*");
  exp->add_option("--tls-cert", xa.tls.cert, "PEM certificate chain of this export (mutual TLS 1.3, nbds://)");
  exp->add_option("--tls-key", xa.tls.key, "PEM private key of --tls-cert (mode 0600 or stricter)");
  exp->add_option("--tls-ca", xa.tls.ca, "PEM CA bundle that signs the clients allowed to read");
  exp->add_option("--tls-crl", xa.tls.crl, "PEM CRL of that CA (optional)");
  exp->add_flag("--overlay", xa.overlay,
                "Writable: writes go to a throwaway overlay (nbdkit cow filter), never the store");

  auto run_failover = add_failover_commands(app, point_rule, &site);  // vm-config, failover test
  auto run_events = add_events_commands(app);  // events, doctor
  auto run_failback = add_failback_commands(app);               // seed, failback

  DemoArgs da;
  auto* demo = app.add_subcommand("demo", "Live replication demo on this machine (qemu-storage-daemon)");
  demo->add_option("--rps", da.rps, "Recovery points to take (at least 5)")->check(CLI::Range(5, 1000));
  demo->add_option("--disk-mib", da.disk_mib, "Disk size in MiB")->check(CLI::Range(16, 65536));
  demo->add_option("--keep", da.keep_dir, "Keep the demo's files in this directory");

  auto* debug = app.add_subcommand("debug", "Developer helpers");
  auto* kp = debug->add_subcommand("kill-points", "List the named kill points");
  auto* api_routes = debug->add_subcommand(
      "api-routes", "List the management API's routes, METHOD PATH (docs/api.yaml has the same)");
  debug->require_subcommand(1);

  auto names_subcommand = [&app](const std::string& word) {
    return !app.get_subcommands([&word](CLI::App* sub) { return sub->check_name(word); }).empty();
  };
  if (argc > 1 && argv[1][0] != '-' && !names_subcommand(argv[1])) {
    std::fprintf(stderr, "ferry: unknown subcommand '%s' (try ferry --help)\n", argv[1]);
    return kExitUsage;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  if (rep->parsed() && !pa.once && pa.interval_seconds <= 0) {
    std::fprintf(stderr, "ferry replicate: one of --once or --interval SECONDS is required\n");
    return kExitUsage;
  }
  if (protect->parsed() && !pr.once && pr.interval_seconds <= 0) {
    std::fprintf(stderr, "ferry protect: one of --once or --interval SECONDS is required\n");
    return kExitUsage;
  }
  // --tls-cert/--tls-key/--tls-ca: all three or none (exit 2 naming the missing ones).
  for (auto [sub, tls] : {std::pair<CLI::App*, TlsArgs*>{receive, &ra.tls}, {rep, &pa.tls},
                          {protect, &pr.tls}, {points, &points_tls}, {exp, &xa.tls}}) {
    if (!sub->parsed()) continue;
    if (ferry::Status s = check_tls_args(*tls); !s.is_ok()) {
      std::fprintf(stderr, "ferry %s: %s\n", sub->get_name().c_str(), s.message().c_str());
      return kExitUsage;
    }
  }
  if (!site.url.empty()) {  // ferry --site URL (api_client.h)
    SitePoints sp{points->parsed(), points_store->count() > 0 || points_remote->count() > 0,
                  points_tls, group, json};
    return run_site_command(app, site, sp, status->parsed(), status_json, status_rpo_alert,
                            [&](int& rc) { return run_failover(rc); });
  }
  if (points->parsed() && points_store->count() == 0 && points_remote->count() == 0) {
    std::fprintf(stderr, "ferry points: one of --store DIR or --to ADDR:PORT is required\n");
    return kExitUsage;
  }
  if (points->parsed() && points_store->count() > 0 && points_tls.given()) {
    std::fprintf(stderr, "ferry points: --tls-* go with --to, not --store\n");
    return kExitUsage;
  }
  if (receive->parsed()) {
    auto policy = receive_retention.policy();
    if (!policy.is_ok()) {
      std::fprintf(stderr, "ferry receive: %s\n", policy.status().message().c_str());
      return kExitUsage;
    }
    ra.retention = *policy;
    ra.config_given = receive_config_opt->count() > 0;
  }
  std::uint64_t max_disk_bytes = 0;
  if (receive->parsed() && !ra.max_disk_bytes.empty()) {
    auto size = parse_size(ra.max_disk_bytes);
    if (!size.is_ok()) {
      std::fprintf(stderr, "ferry receive: --max-disk-bytes: %s\n", size.status().message().c_str());
      return kExitUsage;
    }
    max_disk_bytes = *size;
  }
  try {
    if (receive->parsed()) return cmd_receive(ra, max_disk_bytes);
    if (protect->parsed()) return cmd_protect(pr);
    if (agent->parsed()) return cmd_agent(config_path);
    if (status->parsed()) return cmd_status(status_socket, status_json, status_rpo_alert);
    if (rep->parsed()) return cmd_replicate(pa);
    if (points->parsed())
      return points_remote->count() > 0 ? cmd_points_remote(points_to, group, points_tls, json)
                                        : cmd_points(store, group, json);
    if (prune->parsed()) {
      auto policy = prune_retention.policy();
      if (!policy.is_ok()) {
        std::fprintf(stderr, "ferry prune: %s\n", policy.status().message().c_str());
        return kExitUsage;
      }
      return cmd_prune(store, group, *policy, dry_run, json);
    }
    if (restore->parsed()) return cmd_restore(store, group, point, disk, out);
    if (exp->parsed()) {
      xa.point = parse_point(export_point);
      return cmd_export(xa);
    }
    if (demo->parsed()) return run_demo(da, argv[0]);
    if (int rc = 0; run_failover(rc)) return rc;
    if (int rc = 0; run_events(rc)) return rc;
    if (int rc = 0; run_failback(rc)) return rc;
    if (api_routes->parsed()) {
      const ReceiverApi none{};
      for (const auto& r : receiver_api_routes(none)) std::printf("%s %s\n", r.method.c_str(), r.path.c_str());
      return 0;
    }
    if (kp->parsed()) {
      for (auto k : ferry::kKillPoints) std::printf("%.*s\n", int(k.size()), k.data());
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry: unexpected error: %s\n", e.what());
    return kExitFailure;
  }
  return kExitUsage;
}
