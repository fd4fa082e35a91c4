#include "healing.h"

#include <cstring>

namespace ferry::cbt {

std::string bitmap_name(std::string_view group, std::uint64_t rp) {
  return "ferry." + std::string(group) + "." + std::to_string(rp);
}

std::optional<std::uint64_t> bitmap_rp(std::string_view group, std::string_view name) {
  std::string prefix = "ferry." + std::string(group) + ".";
  if (name.size() <= prefix.size() || name.substr(0, prefix.size()) != prefix) return {};
  std::string_view digits = name.substr(prefix.size());
  if (digits.size() > 19) return {};  // would overflow: not one of ours
  std::uint64_t rp = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return {};
    rp = rp * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return rp;
}

std::string identity_tag_name(std::string_view group, const Hash128& id) {
  return "ferry." + std::string(group) + ".id." + id.hex();
}

std::optional<Hash128> identity_tag(std::string_view group, std::string_view name) {
  std::string prefix = "ferry." + std::string(group) + ".id.";
  if (name.size() != prefix.size() + 32 || name.substr(0, prefix.size()) != prefix) return {};
  Hash128 id;
  for (std::size_t i = 0; i < 32; ++i) {
    char c = name[prefix.size() + i];
    int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (v < 0) return {};
    std::uint64_t& half = i < 16 ? id.hi : id.lo;  // hex() prints the high half first
    half = half << 4 | static_cast<std::uint64_t>(v);
  }
  if (id == Hash128{}) return {};
  return id;
}

namespace {

HealPlan full(FullReason reason, const char* rule) {
  HealPlan p;
  p.full_reason = reason;
  std::memcpy(p.rule, rule, 3);
  return p;
}

}  // namespace

HealPlan plan_healing(std::string_view group, std::uint64_t base_rp, bool receiver_has_disk,
                      const std::vector<BitmapState>& bitmaps) {
  bool base_found = false, needed_inconsistent = false, needed_busy = false;
  const BitmapState* newest = nullptr;  // the one recording writes since the last capture
  std::uint64_t newest_rp = 0;
  for (const BitmapState& b : bitmaps) {
    auto rp = bitmap_rp(group, b.name);
    if (!rp || *rp < base_rp) continue;
    if (*rp == base_rp && !b.inconsistent) base_found = true;
    if (b.inconsistent) needed_inconsistent = true;
    else if (b.busy) needed_busy = true;
    if (!newest || *rp > newest_rp) {
      newest = &b;
      newest_rp = *rp;
    }
  }
  HealPlan plan;
  if (base_rp == 0) plan = full(FullReason::first_rp, "H1");
  else if (!receiver_has_disk) plan = full(FullReason::new_disk, "H2");
  else if (needed_inconsistent) plan = full(FullReason::bitmap_inconsistent, "H3");
  else if (needed_busy) plan = full(FullReason::bitmap_busy, "H4");
  else if (!base_found) plan = full(FullReason::no_bitmap, "H5");
  // Every capture leaves its new bitmap recording, so a frozen newest one means the bitmap
  // that recorded the writes after it was frozen is gone (removed by hand): a gap.
  else if (!newest->recording) plan = full(FullReason::no_bitmap, "H8");

  const bool incremental = plan.full_reason == FullReason::none;
  for (const BitmapState& b : bitmaps) {
    auto rp = bitmap_rp(group, b.name);
    if (!rp) continue;                 // not Ferry's (or another group's): never touched
    if (b.inconsistent) {              // unusable in any case
      plan.remove.push_back(b.name);
      continue;
    }
    if (b.busy) continue;              // in use by someone else: not ours to fix
    if (incremental && *rp == base_rp) continue;
    if (incremental && *rp > base_rp) plan.merge_into_base.push_back(b.name);
    plan.remove.push_back(b.name);     // H7 stale, merged leftovers, or useless for a full read
  }
  plan.enable_base = incremental;
  return plan;
}

}  // namespace ferry::cbt
