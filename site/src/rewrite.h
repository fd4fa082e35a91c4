// Site-private: the journal rewrite of tiered retention (store.cc calls it; docs/journal-format.md,
// "Journal generations", gives the contract and the recovery cases).
//
// Pruning an RP between two kept ones removes it from the catalog at once, but its records
// stay in the journal: the kept RP after it is a delta on it. The base compaction drops only
// the oldest RPs, so with keep-hourly/daily/weekly the journal would hold every change since
// the oldest kept RP. A rewrite copies the kept RPs into a new journal directory as a chain of
// deltas, each on the kept RP before it (the first on the base), holding exactly what changed
// between the two; the store then names the new directory in its state file and removes the
// old one. Records are read back through the read view of each kept RP, so a copy is what a
// reader of that RP saw, byte for byte.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "chain.h"
#include "ferry/base/status.h"
#include "journal.h"

namespace ferry::site {

struct RewriteStats {
  std::uint64_t rps = 0;           // RPs written
  std::uint64_t records = 0;       // block records written
  std::uint64_t logical_bytes = 0; // bytes of disk they cover
  std::uint64_t stored_bytes = 0;  // bytes their records take
};

// Longest data record a rewrite writes: small enough that a 4 KiB read of an export decodes
// little, large enough that the index stays small.
inline constexpr std::uint32_t kRewriteRecordBytes = 256u << 10;

// Appends to `out` the RPs `kept` of `chain` (ascending, each an RP of chain.rps, the newest
// among them), each as a delta on the one before it in `kept` (the first on the chain's base):
// per disk, the ranges any RP since that one wrote (since its last full copy, which makes the
// copy full too), and the range above the smallest size the disk had in between. Each RP is
// closed by its commit record; nothing is synced (the caller syncs once at the end). The
// chain's records are read through `st`; a failure of either side is returned as is.
Status write_kept_rps(const std::shared_ptr<Storage>& st, const Paths& paths, const Chain& chain,
                      const std::vector<std::uint64_t>& kept, journal::Writer& out,
                      RewriteStats& stats);

// What write_kept_rps would write, estimated from the index alone (record headers, no data):
// per kept RP, the stored bytes of the RPs since the one before, in the proportion of their
// bytes the copy covers. Costs a read of the record headers of the RPs above the base.
Result<std::uint64_t> estimate_rewrite_bytes(const std::shared_ptr<Storage>& st,
                                             const Paths& paths, const Chain& chain,
                                             const std::vector<std::uint64_t>& kept);

}  // namespace ferry::site
