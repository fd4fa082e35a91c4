// The VM's definition (libvirt domain XML) kept with each recovery point: the one place that
// resolves "the definition in force at RP N" (`ferry vm-config`, `ferry points`, test
// failover, and the receiver when a source sends none with an RP).
//
// The source sends the XML with an RP when it changed (rp_begin flag vm_config); the
// receiver copies the previous RP's into every RP whose source sent none, so each stored RP
// carries its own begin record's copy and pruning or compaction never separates an RP from
// its definition. RPs written before this (or by a receiver that did not copy) inherit the
// newest definition of an older RP still in the store; failing that they have none.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::site {

struct VmConfigAt {
  std::uint64_t rp_id = 0;    // the RP asked for (resolved when 0 was asked: the newest)
  std::uint64_t from_rp = 0;  // the RP whose begin record holds it (0: none found)
  std::string xml;            // empty: the RP has no VM definition
};

// The definition in force at `rp_id` (0: the newest offered RP) of `group`. Errors:
// unknown group (not_found), RP pruned (not_found, says "pruned"), RP not committed
// (not_found). An RP without a definition is not an error: xml is empty.
Result<VmConfigAt> vm_config_at(const std::string& store_root, const std::string& group,
                                std::uint64_t rp_id);
// The same for every offered RP, oldest first, with one journal scan.
Result<std::vector<VmConfigAt>> vm_configs(const std::string& store_root,
                                           const std::string& group);

}  // namespace ferry::site
