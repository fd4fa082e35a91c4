// A group's store checked without its lock and without writing (`ferry doctor`): the state
// file and the catalog load as `ferry points` loads them, then the journal is scanned the
// way recovery scans it (the exclusive mode, which tells a torn tail from corruption: R1 vs
// R2, R8, R9, R11, R15, R20), read-only. Safe while a receiver serves the group (a torn
// tail may then be an RP being written, and is reported as a note, not a problem).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/site/retention.h"

namespace ferry::site {

struct StoreCheck {
  std::string group;
  Status problem;  // ok, or what is wrong (Errc::corrupt naming the file and the rule)
  std::vector<std::string> notes;
  std::uint64_t points = 0;         // RPs offered
  std::uint64_t store_bytes = 0;    // journal bytes of the offered RPs above the base
  std::uint64_t newest_disk_bytes = 0;  // sum of the newest RP's disk sizes (one full RP)
  std::uint64_t mean_rp_bytes = 0;  // journal bytes per RP, the oldest (often full) left out
  RetentionPolicy policy;           // the effective policy of the last pruning
};

StoreCheck check_group_store(const std::string& root, const std::string& group);
// The groups in a store (directories holding a journal), sorted.
Result<std::vector<std::string>> store_groups(const std::string& root);

}  // namespace ferry::site
