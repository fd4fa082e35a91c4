// The receiver's configuration: a TOML file (/etc/ferry/receive.toml by default): retention
// policies, the access map (who may write or manage which groups, access.h) and quotas. Same strictness as the agent's (config.h): an unknown key or table,
// a wrong type or a value out of bounds is one error naming "file:line: key: what is wrong";
// parse_receive_config never throws. See packaging/receive.toml.example.
//
//   [retention]                  # the default for every group
//   keep-last = 48
//   keep-within = "6h"
//   [group.web01.retention]      # one group's own policy
//   keep-daily = 7
//
// Which policy a group gets, first match wins (each replaces the ones below as a whole, never
// option by option, as in PBS):
//   1. its [group.NAME.retention] table, if that gives any option;
//   2. the file's [retention] table, if that gives any option;
//   3. the --keep-* flags of `ferry receive`, if any is given;
//   4. the built-in default, site::default_retention().
// So the flags are the default for the groups the file does not name, and only while the file
// has no [retention] of its own.
//
//   [[access]]                   # one per client identity (access.h has the rules A1-A4)
//   identity = "uri:spiffe://ferry/source-a"   # or dns:NAME, ip:ADDRESS, sha256:HEX (SPKI)
//   write = ["web01", "db-*"]    # groups it may send RPs to: names, prefixes with '*', "*"
//   manage = ["web01"]           # groups it may ask management actions of (ferry points --to)
//
//   [quota]
//   default = "1T"               # every group's quota unless its own says otherwise
//   [group.web01]
//   quota = "200G"               # images + journal; "0" or absent: no quota
// A group's quota: its [group.NAME] quota, else [quota] default, else none.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <string_view>

#include "access.h"
#include "ferry/base/status.h"
#include "ferry/site/retention.h"

namespace ferry::tools {

inline constexpr const char* kDefaultReceiveConfigPath = "/etc/ferry/receive.toml";
inline constexpr std::size_t kMaxReceiveConfigBytes = 1u << 20;
inline constexpr std::size_t kMaxReceiveConfigGroups = 4096;

struct ReceiveConfig {
  site::RetentionPolicy retention;  // [retention]; empty when it gives no option
  std::map<std::string, site::RetentionPolicy> groups;  // [group.NAME.retention]
  AccessMap access;                                     // [[access]]
  std::uint64_t default_quota_bytes = 0;                // [quota] default; 0: none
  std::map<std::string, std::uint64_t> quotas;          // [group.NAME] quota (0: none)
  std::string metrics;  // metrics = "ADDR:PORT": /metrics (Prometheus); --metrics wins; fixed at start
  std::string api;      // api = "ADDR:PORT": the management API (docs/api.yaml); --api wins; fixed at start

  // The effective policy of a group (rules 1, 2 and 4 above; 3 once with_flags ran): never
  // empty, ready for site::decide_retention.
  site::RetentionPolicy for_group(const std::string& group) const;
  // The group's quota in bytes (images + journal); 0: none.
  std::uint64_t quota_for(const std::string& group) const;
  bool operator==(const ReceiveConfig&) const = default;
};

// "16T", "16TiB", "500G", "1.5T", "4096": binary units (K = 1024). Error: what is wrong.
Result<std::uint64_t> parse_byte_size(const std::string& text);

// Parses and checks a whole file. file_name is only used in messages.
Result<ReceiveConfig> parse_receive_config(std::string_view text, std::string_view file_name);
// Reads the file (bounded by kMaxReceiveConfigBytes) and parses it.
Result<ReceiveConfig> load_receive_config(const std::string& path);

// Rule 3: the command line's policy becomes the file's default when [retention] gives none.
ReceiveConfig with_flags(ReceiveConfig config, const site::RetentionPolicy& flags);

}  // namespace ferry::tools
