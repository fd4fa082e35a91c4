#include "catalog.h"

#include <algorithm>

#include "ferry/base/bytes.h"
#include "ferry/base/hash.h"
#include "journal.h"

namespace ferry::site {

bool Catalog::is_pruned(std::uint64_t rp_id) const {
  return std::binary_search(pruned.begin(), pruned.end(), rp_id);
}

RetentionPolicy catalog_policy(const Catalog& c) {
  auto count = [](std::uint64_t v) {
    return v == 0 ? std::optional<std::uint32_t>() : std::optional<std::uint32_t>(std::uint32_t(v));
  };
  RetentionPolicy p;
  p.keep_last = count(c.keep_last);
  p.keep_hourly = count(c.keep_hourly);
  p.keep_daily = count(c.keep_daily);
  p.keep_weekly = count(c.keep_weekly);
  if (c.keep_within_s != 0) p.keep_within = std::chrono::seconds(c.keep_within_s);
  return p;
}

void set_catalog_policy(Catalog& c, const RetentionPolicy& p) {
  c.keep_last = p.keep_last.value_or(0);
  c.keep_hourly = p.keep_hourly.value_or(0);
  c.keep_daily = p.keep_daily.value_or(0);
  c.keep_weekly = p.keep_weekly.value_or(0);
  c.keep_within_s = p.keep_within ? static_cast<std::uint64_t>(p.keep_within->count()) : 0;
}

std::string encode_catalog(std::uint64_t group_id, const Catalog& c) {
  std::string s;
  ByteWriter w(s);
  w.u32(kStateMagic);
  w.u16(kCatalogVersion);
  w.u16(0);
  w.u64(group_id);
  w.u64(c.base_rp);
  w.u64(c.target_rp);
  const std::string begin = c.base_rp != 0 ? journal::encode_begin(c.base_begin) : std::string();
  const std::string info = c.base_rp != 0 ? journal::encode_commit(c.base_info) : std::string();
  w.u32(static_cast<std::uint32_t>(begin.size()));
  w.bytes(begin.data(), begin.size());
  w.u32(static_cast<std::uint32_t>(info.size()));
  w.bytes(info.data(), info.size());
  FERRY_ASSERT(c.pruned.size() <= kMaxPrunedIds);
  w.u32(static_cast<std::uint32_t>(c.pruned.size()));
  for (auto id : c.pruned) w.u64(id);
  for (auto v : {c.keep_last, c.keep_hourly, c.keep_daily, c.keep_weekly, c.keep_within_s})
    w.u64(v);
  FERRY_ASSERT(c.journal_gen <= kMaxJournalGen);
  w.u64(c.journal_gen);
  w.u64(xxh3_64(s.data(), s.size()));
  FERRY_ASSERT(s.size() <= kMaxCatalogBytes);
  return s;
}

Result<Catalog> decode_catalog(std::string_view s, std::uint64_t group_id) {
  auto bad = [](const std::string& what) {
    return Status::error(Errc::corrupt, "state file: " + what);
  };
  if (s.size() < 16) return bad("too short (" + std::to_string(s.size()) + " bytes)");
  ByteReader r(s);
  if (r.u32() != kStateMagic) return bad("bad magic");
  const std::uint16_t version = r.u16();
  if (version == kLegacyStateVersion && s.size() == 40)  // its own layout and checksum
    return Status::error(Errc::unsupported, "state file: version 1 (before retention)");
  // Every version from 2 on ends in an xxh3-64 of the bytes before it, checked before the
  // version is believed: a damaged version field is damage (R6), not a newer release.
  if (s.size() > kMaxCatalogBytes || s.size() < 8 ||
      load_le64(s.data() + s.size() - 8) != xxh3_64(s.data(), s.size() - 8))
    return bad("checksum mismatch");
  if (version != kCatalogVersion)
    return Status::error(Errc::unsupported, "state file: version " + std::to_string(version) +
                                                " is newer than this build reads (" +
                                                std::to_string(kCatalogVersion) + ")");
  r.u16();
  if (r.u64() != group_id) return bad("written for another group");
  Catalog c;
  c.base_rp = r.u64();
  c.target_rp = r.u64();
  auto piece = [&r](std::string& out) {
    const std::uint32_t n = r.u32();
    if (!r.ok() || n > r.remaining()) return false;
    out.resize(n);
    return r.bytes(out.data(), n);
  };
  std::string begin, info;
  if (!piece(begin) || !piece(info)) return bad("cut short");
  if (c.base_rp != 0) {
    auto b = journal::decode_begin(begin);
    auto i = journal::decode_commit(info);
    if (!b.is_ok() || !i.is_ok() || b->rp_id != c.base_rp || i->rp_id != c.base_rp)
      return bad("the base RP's description does not decode");
    c.base_begin = std::move(*b);
    c.base_info = std::move(*i);
  } else if (!begin.empty() || !info.empty()) {
    return bad("a description without a base RP");
  }
  if (c.target_rp != 0 && c.target_rp <= c.base_rp) return bad("target at or below the base");
  const std::uint32_t n = r.u32();
  if (!r.ok() || n > kMaxPrunedIds || std::uint64_t(n) * 8 + 56 != r.remaining())
    return bad("bad pruned list");
  c.pruned.reserve(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::uint64_t id = r.u64();
    if (id <= c.base_rp || (!c.pruned.empty() && id <= c.pruned.back()))
      return bad("pruned list out of order");
    c.pruned.push_back(id);
  }
  for (auto* v : {&c.keep_last, &c.keep_hourly, &c.keep_daily, &c.keep_weekly, &c.keep_within_s})
    *v = r.u64();
  c.journal_gen = r.u64();
  if (c.journal_gen > kMaxJournalGen) return bad("journal generation out of range");
  return c;
}

}  // namespace ferry::site
