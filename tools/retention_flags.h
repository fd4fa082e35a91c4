// The retention flags shared by `ferry receive` and `ferry prune`: --keep-last N,
// --keep-hourly N, --keep-daily N, --keep-weekly N (N from 1 to 1,000,000) and
// --keep-within DURATION ("6h", "7d", "1h30m"). CLI11 refuses a bad value as a usage error
// naming the flag and the value; policy() then cannot fail for values CLI11 accepted.
#pragma once

#include <cstdint>
#include <string>

#include "ferry/base/status.h"
#include "ferry/site/retention.h"

namespace CLI {
class App;
}

namespace ferry::tools {

struct RetentionFlags {
  // 0: not given (CLI11's range check refuses an explicit 0).
  std::uint32_t keep_last = 0, keep_hourly = 0, keep_daily = 0, keep_weekly = 0;
  std::string keep_within;  // empty: not given

  // The options given, as a policy; empty when no flag was given (the caller then decides
  // what applies: receive_config.h, site::effective_retention).
  Result<site::RetentionPolicy> policy() const;
};

void add_retention_flags(CLI::App* cmd, RetentionFlags& out);

}  // namespace ferry::tools
