// The state file of a group, version 2: what the replica images hold and which recovery
// points (RPs) the store still offers. Site-private; docs/journal-format.md gives the bytes.
//
//   base_rp    the RP the replica images hold (0: none yet; the images are not read). Every
//              RP at or below it has been compacted into the images and its segments may be
//              gone; base_rp itself stays a kept RP, described by base_begin/base_info.
//   target_rp  != 0: a compaction to this RP is under way (redone at open, idempotently:
//              it writes only ranges the RPs (base_rp, target_rp] cover). The RPs below it
//              are already removed for readers.
//   pruned     RPs above base_rp removed from the catalog by retention: not listed, not
//              readable, but their records stay in the chain of the RPs after them until
//              the base passes them or the journal is rewritten.
//   journal_gen  which journal directory holds the RPs above the base: 0 `journal/`, n
//              `journal.<n>/`. A rewrite (tiered retention dropped RPs between kept ones)
//              copies the kept RPs, as deltas on one another, into generation n + 1 and
//              then names it here: one rename switches; the other generations are garbage.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/site/store.h"

namespace ferry::site {

inline constexpr std::uint32_t kStateMagic = 0x41545346;  // "FSTA"
inline constexpr std::uint16_t kLegacyStateVersion = 1;     // 40 bytes: applied, applying
inline constexpr std::uint16_t kCatalogVersion = 2;
inline constexpr std::size_t kMaxPrunedIds = 1u << 20;
inline constexpr std::size_t kMaxCatalogBytes = 72 + 2 * (256u << 10) + 8 * kMaxPrunedIds;
// Generations are numbered from 0; this bound keeps the directory name short and the
// counter far from overflow (a rewrite a minute for 10^4 years).
inline constexpr std::uint64_t kMaxJournalGen = 1ull << 40;

struct Catalog {
  std::uint64_t base_rp = 0;
  std::uint64_t target_rp = 0;
  RpBeginInfo base_begin;  // meaningful when base_rp != 0
  RpInfo base_info;
  std::vector<std::uint64_t> pruned;  // ascending, unique, each > base_rp
  std::uint64_t journal_gen = 0;
  // The retention policy the last pruning applied (what `ferry points` explains the kept RPs
  // by): counts, 0 = not given; keep-within in seconds, 0 = not given. All 0: none yet.
  std::uint64_t keep_last = 0, keep_hourly = 0, keep_daily = 0, keep_weekly = 0,
                keep_within_s = 0;

  bool is_pruned(std::uint64_t rp_id) const;
};

std::string encode_catalog(std::uint64_t group_id, const Catalog& c);
// The policy fields as a RetentionPolicy and back (0: the option not given).
RetentionPolicy catalog_policy(const Catalog& c);
void set_catalog_policy(Catalog& c, const RetentionPolicy& p);

// Checks magic, version, group, lengths, order and the checksum; the error says which.
// A version 1 file is refused with Errc::unsupported (the store migrates it first).
Result<Catalog> decode_catalog(std::string_view bytes, std::uint64_t group_id);

}  // namespace ferry::site
