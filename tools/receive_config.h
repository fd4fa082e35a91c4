// The receiver's configuration: a TOML file (/etc/ferry/receive.toml by default), today only
// its retention policies. Same strictness as the agent's (config.h): an unknown key or table,
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
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <string_view>

#include "ferry/base/status.h"
#include "ferry/site/retention.h"

namespace ferry::tools {

inline constexpr const char* kDefaultReceiveConfigPath = "/etc/ferry/receive.toml";
inline constexpr std::size_t kMaxReceiveConfigBytes = 1u << 20;
inline constexpr std::size_t kMaxReceiveConfigGroups = 4096;

struct ReceiveConfig {
  site::RetentionPolicy retention;  // [retention]; empty when it gives no option
  std::map<std::string, site::RetentionPolicy> groups;  // [group.NAME.retention]

  // The effective policy of a group (rules 1, 2 and 4 above; 3 once with_flags ran): never
  // empty, ready for site::decide_retention.
  site::RetentionPolicy for_group(const std::string& group) const;
  bool operator==(const ReceiveConfig&) const = default;
};

// Parses and checks a whole file. file_name is only used in messages.
Result<ReceiveConfig> parse_receive_config(std::string_view text, std::string_view file_name);
// Reads the file (bounded by kMaxReceiveConfigBytes) and parses it.
Result<ReceiveConfig> load_receive_config(const std::string& path);

// Rule 3: the command line's policy becomes the file's default when [retention] gives none.
ReceiveConfig with_flags(ReceiveConfig config, const site::RetentionPolicy& flags);

}  // namespace ferry::tools
