// `ferry points`, `ferry prune`, `ferry restore` (tools/points.cc).
#pragma once

#include <cstdint>
#include <string>

#include "ferry/site/retention.h"
#include "tools.h"

namespace ferry::tools {

int cmd_points(const std::string& store, const std::string& group, bool json);
// The same list from a running receiver, over the wire (points_request).
int cmd_points_remote(const std::string& to, const std::string& group, const TlsArgs& tls,
                      bool json);
int cmd_prune(const std::string& store, const std::string& group,
              const site::RetentionPolicy& policy, bool dry_run, bool json);
// --point N or latest (0 for the read view); CLI11 has already refused anything else.
std::uint64_t parse_point(const std::string& point);
int cmd_restore(const std::string& store, const std::string& group, const std::string& point,
                const std::string& disk, const std::string& out);

}  // namespace ferry::tools
