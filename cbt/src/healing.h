// The healing decision for one disk at capture time (private to cbt/; pure, unit-tested).
//
// Input: the receiver's base RP, whether the receiver holds the disk, and the bitmaps QEMU
// reports on the disk's node. Output: why the disk must be read in full (or none), and which
// of Ferry's bitmaps to merge into "ferry.G.<base>" and which to remove. Labelled cases, as
// referred to by the tests and docs/change-tracking.md:
//
//   H1 base == 0                                   -> full first_rp, remove every ferry.G.*
//   H2 receiver lacks the disk                     -> full new_disk, remove every ferry.G.*
//   H3 a ferry.G.x with x >= base is inconsistent  -> full bitmap_inconsistent
//   H4 a ferry.G.x with x >= base is busy          -> full bitmap_busy (busy ones untouched)
//   H5 ferry.G.<base> missing                      -> full no_bitmap
//   H8 the newest ferry.G.x with x >= base is not recording -> full no_bitmap (writes after
//      it was frozen went to a bitmap that no longer exists)
//   H6 otherwise incremental: merge every x > base into base, enable base, remove them
//   H7 always: x < base is stale (a later RP was committed): remove it
//   An unacknowledged RP x (finish(acknowledged=false)) leaves ferry.G.<base> frozen and
//   ferry.G.x recording, so the next capture is incremental whichever RP the receiver holds:
//   base -> H6 (x merged into base); x -> H6 on x with base removed by H7.
//   Inconsistent bitmaps are always removed (QEMU allows nothing else on them); busy ones
//   are never touched (someone else uses them).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/cbt/source.h"

namespace ferry::cbt {

struct BitmapState {
  std::string name;
  bool recording = false;
  bool busy = false;
  bool inconsistent = false;
  std::uint32_t granularity_bytes = 0;
};

struct HealPlan {
  FullReason full_reason = FullReason::none;
  char rule[3] = "H6";                   // which labelled case decided
  std::vector<std::string> merge_into_base;  // incremental only
  bool enable_base = false;                  // incremental only
  std::vector<std::string> remove;
};

std::string bitmap_name(std::string_view group, std::uint64_t rp);
// The RP of a Ferry bitmap of `group` ("ferry.<group>.<digits>"), or nullopt.
std::optional<std::uint64_t> bitmap_rp(std::string_view group, std::string_view name);

// A disk's identity tag: "ferry.<group>.id.<32 hex digits>" (disabled, never an RP bitmap:
// bitmap_rp() does not parse it, so the healing table leaves it alone).
std::string identity_tag_name(std::string_view group, const Hash128& id);
std::optional<Hash128> identity_tag(std::string_view group, std::string_view name);

HealPlan plan_healing(std::string_view group, std::uint64_t base_rp, bool receiver_has_disk,
                      const std::vector<BitmapState>& bitmaps);

}  // namespace ferry::cbt
