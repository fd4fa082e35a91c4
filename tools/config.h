// The agent's configuration: a TOML file (/etc/ferry/agent.toml by default).
//
// This parser depends on nothing but toml++ and ferry/base/status.h (no Asio, no libvirt), so
// a fuzzer can build it on its own: parse_agent_config(text, file_name) never throws, never
// aborts on any input, and returns either a fully checked AgentConfig or one error naming
// "file:line: key: what is wrong". See packaging/agent.toml.example and docs/operations.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::tools {

// Bounds: a config is written by a person; anything past these is a mistake, not a fleet.
inline constexpr std::size_t kMaxConfigBytes = 1u << 20;
inline constexpr std::size_t kMaxTargets = 256;
inline constexpr std::size_t kMaxDisksPerTarget = 64;
inline constexpr std::size_t kMaxNameBytes = 64;     // group, domain and disk names
inline constexpr std::size_t kMaxPathBytes = 4096;   // state_dir
inline constexpr std::size_t kMaxSocketPathBytes = 107;  // sun_path minus the NUL
inline constexpr std::size_t kMaxUriBytes = 1024;
inline constexpr std::size_t kMaxServerNameBytes = 253;  // a DNS name or an IP address
inline constexpr std::int64_t kMaxIntervalSeconds = 7 * 24 * 3600;
inline constexpr std::int64_t kMaxRpoAlertSeconds = 30 * 24 * 3600;
// event_log_bytes: each of a group's two event log files (events/event_log.h).
inline constexpr std::int64_t kMinEventLogBytes = 4096, kMaxEventLogBytes = 1ll << 30;
inline constexpr std::int64_t kDefaultEventLogBytes = 4ll << 20;
inline constexpr std::size_t kMaxDomainsPerGroup = 32;  // cbt::kMaxGroupVms
inline constexpr std::int64_t kMaxPauseMs = 60000;
inline constexpr std::int64_t kDefaultMaxPauseMs = 5000;

enum class TargetKind : std::uint8_t { libvirt_domain, qmp };
const char* target_kind_name(TargetKind kind);  // "domain" / "qmp"

struct DiskSpec {
  std::string node;  // QEMU block node
  std::string name;  // name in the group
  bool operator==(const DiskSpec&) const = default;
};

struct TargetConfig {
  TargetKind kind = TargetKind::qmp;
  std::string group;  // unique across the file; the target's name in status
  std::string to;     // receiver HOST:PORT (syntax checked; resolved at connect time)
  std::int64_t interval_seconds = 0;
  std::int64_t rpo_alert_seconds = 0;  // default: 3 x interval_seconds
  // [[domain]]: `name` (one VM) or `names` (a protection group captured at one instant)
  std::string domain;                    // the name, or the names joined with ','
  std::vector<std::string> domains;      // every domain, in disk order (empty: {domain})
  std::vector<std::string> boot_order;   // empty: the order of domains
  std::vector<std::string> vm_names;     // the group's name of each domain (empty: theirs)
  std::int64_t max_pause_ms = kDefaultMaxPauseMs;  // the group's longest pause
  std::string uri;  // default qemu:///system
  bool quiesce = false;
  // [[qmp]]
  std::string qmp_socket;
  std::vector<DiskSpec> disks;
  // Mutual TLS (docs/security.md): the top level's tls_cert, tls_key and tls_ca (all or none;
  // none: plaintext, for a receiver on this host's loopback), and the name the receiver's
  // certificate must carry: the target's tls_server_name, else the top level's, else (empty)
  // the host in `to`.
  std::string tls_cert, tls_key, tls_ca, tls_server_name;
  std::uint32_t line = 0;  // where the target's table starts (for messages)

  // True when the two differ only in schedule fields (interval, RPO alert, line): the running
  // worker can take the new values without reopening its source.
  bool same_source(const TargetConfig& other) const;
};

struct AgentConfig {
  std::string state_dir = "/var/lib/ferry";
  std::string status_socket = "/run/ferry/agent.sock";
  std::string log_level = "info";  // debug | info | warn | error
  std::string metrics;             // ADDR:PORT of /metrics (Prometheus); empty: none
  std::string tls_cert, tls_key, tls_ca, tls_server_name;  // copied into every target
  std::int64_t event_log_bytes = kDefaultEventLogBytes;    // per group, per file
  std::vector<TargetConfig> targets;
};

inline constexpr const char* kDefaultConfigPath = "/etc/ferry/agent.toml";

// Parses and checks a whole config. file_name is only used in messages.
Result<AgentConfig> parse_agent_config(std::string_view text, const std::string& file_name);
// Reads the file (bounded by kMaxConfigBytes) and parses it.
Result<AgentConfig> load_agent_config(const std::string& path);

// "HOST:PORT" or "[V6]:PORT" with a port in 1..65535; the host is not resolved.
Status check_endpoint_syntax(std::string_view text);

}  // namespace ferry::tools
