// Helpers shared by the ferry subcommands (private to tools/).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <nlohmann/json_fwd.hpp>

#include "ferry/base/fd.h"
#include "ferry/base/status.h"
#include "ferry/base/units.h"
#include "ferry/site/retention.h"
#include "ferry/transport/tls.h"

namespace ferry::tools {

struct DemoArgs {
  int rps = 6;
  int disk_mib = 256;
  std::string keep_dir;  // empty: a temporary directory, removed at the end
};
int run_demo(const DemoArgs& args, const char* argv0);

// ferry agent --config FILE (agent.cc): runs until SIGTERM; 0 on a clean stop, 1 when the
// config or the status socket is unusable at start.
int cmd_agent(const std::string& config_path);
// ferry status (status.cc): 0 all RPOs within their thresholds, 3 one is over (on a
// receiver's socket: a group failing, or its apply failed and pending), 1 unreachable.
// rpo_alert_seconds > 0 (--rpo-alert): the threshold for every target and group instead of
// their own; a receiver's group over it exits 3 too.
int cmd_status(const std::string& socket_path, bool json, double rpo_alert_seconds = 0);
// The status document `j` (an agent's or a receiver's, from its socket or the API) printed
// and judged as cmd_status does; `where` names its origin in errors.
int print_status_doc(nlohmann::json& j, bool json, double rpo_alert_seconds, const std::string& where);

// The status socket of `ferry agent` and `ferry receive` (status.cc): the agent's protocol
// (agent.h: one line "status\n", one JSON document back), served from a thread of its own;
// socket mode 0600. A stale socket file is replaced; one that answers is refused.
class StatusSocket {
 public:
  using Render = std::function<std::string()>;
  static Result<std::unique_ptr<StatusSocket>> create(const std::string& path, Render render);
  ~StatusSocket();

 private:
  StatusSocket(std::string path, UniqueFd fd, Render render);
  void loop();
  const std::string path_;
  UniqueFd fd_;
  const Render render_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

// ferry export (export.cc): serves disk `disk` of `group` at RP `point` (0: the newest, fixed
// at start) over NBD through nbdkit and Ferry's plugin, until SIGINT/SIGTERM: 0 on a clean
// stop, 1 on bad arguments (before serving) or when nbdkit fails.
// Mutual TLS material of a command (--tls-* flags) or an agent target (tls_* keys).
struct TlsArgs {
  std::string cert, key, ca, crl;  // crl: receivers and exports only
  std::string server_name;         // sources only; empty: the host in --to
  bool given() const { return !cert.empty() || !key.empty() || !ca.empty(); }
  transport::TlsFiles files() const { return {cert, key, ca, crl}; }
};

struct ExportArgs {
  std::string store, group, disk;
  std::uint64_t point = 0;
  std::string socket;  // --socket PATH (nbdkit -U)
  std::string listen;  // --listen ADDR:PORT; off loopback only with TLS; default 127.0.0.1:10809
  bool overlay = false;  // nbdkit's cow filter: writable, writes never reach the store
  TlsArgs tls;           // nbdkit --tls=require --tls-verify-peer (docs/security.md)
};
int cmd_export(const ExportArgs& args);
// The usage rule: --tls-cert, --tls-key and --tls-ca all three or none; --tls-crl and
// --tls-server-name only with them. The message names the missing or stray flags.
Status check_tls_args(const TlsArgs& a);
// Loads and checks the files (TlsConfig::load); null when none is given (plaintext).
Result<std::shared_ptr<const transport::TlsConfig>> load_tls(const TlsArgs& a,
                                                             transport::TlsConfig::Role role);
// 127.0.0.0/8, ::1 (and ::ffff:127.x) or "localhost": where a plaintext receiver may listen.
bool loopback_host(const std::string& host);

// "ferry: WHAT: STATUS" on stderr; returns 1 (the exit status of a failure).
int fail(const std::string& what, const Status& s);

// ferry points / prune / restore (points_cmds.cc).
int cmd_points(const std::string& store, const std::string& group, bool json);
// What `ferry points --json` prints (the management API serves the same).
Result<nlohmann::json> points_json(const std::string& store, const std::string& group);
int cmd_points_remote(const std::string& to, const std::string& group, const TlsArgs& tls, bool json);
int cmd_prune(const std::string& store, const std::string& group, const site::RetentionPolicy& policy,
              bool dry_run, bool json);
int cmd_restore(const std::string& store, const std::string& group, const std::string& point,
                const std::string& disk, const std::string& out);
// --point N or latest (0 for the read view); CLI11 has already refused anything else.
std::uint64_t parse_point(const std::string& point);

std::string default_state_dir();  // $FERRY_STATE_DIR or /var/lib/ferry
std::string host_name();
std::string format_time_ns(std::uint64_t unix_ns);
// A progress line on stderr: bytes done, rate, and (when total is known) ETA.
std::function<void(std::uint64_t, std::uint64_t)> progress_printer();

}  // namespace ferry::tools
