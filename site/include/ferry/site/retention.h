// Retention: which recovery points (RPs) of a group a recovery site keeps.
//
// Pure logic: no clock, no store, no I/O. The caller passes the points and "now"; the answer
// is one verdict per point, saying whether it is kept and by which rule. The options are
// those of Proxmox Backup Server's prune (keep-last, keep-hourly, keep-daily, keep-weekly)
// plus borg's keep-within; docs/operations.md, "Retention", is the user's version of this.
//
// The rules, applied in this order; a point kept by one rule is never looked at again:
//   K1 newest   The point with the highest rp_id: the next RP is sent against it, so removing
//               it would force a full copy.
//   K2 pinned   Every pinned point (an export or a restore is reading it).
//   K3 within   keep-within D: every point whose time is at most D before now. The boundary
//               is inclusive (a point exactly D old is kept); a time after now is "within".
//   K4 last     keep-last N: the N newest points. Those among them that K1..K3 kept already
//               count toward N and keep their first rule (keep-last 20 keeps exactly the 20
//               newest, not the newest plus 20).
//   K5 hourly   keep-hourly N, then
//   K6 daily    keep-daily N, then
//   K7 weekly   keep-weekly N: one point per time bucket, for N buckets. A rule first collects
//               the buckets of every point already kept (by any earlier rule, K1 to K6); those
//               buckets are already covered and are not counted. It then walks the points
//               newest first, skipping points already kept: a point whose bucket is neither
//               covered nor taken yet is kept and its bucket is taken; a point in a covered or
//               taken bucket is passed over. It stops once N buckets are taken.
//   none        Everything else is removed.
// "Newest" always means the highest rp_id, never the latest time: ids grow with every commit,
// while a source's clock can step backwards. Times only choose buckets and the K3 window.
//
// Buckets are UTC (no locale, no time zone database, plain arithmetic on days since the
// epoch): the hour (YYYY-MM-DD HH), the day (YYYY-MM-DD), the ISO 8601 week (ISO year and
// week number; weeks start on Monday, and week 1 is the one holding the year's first
// Thursday, so 2021-01-03, a Sunday, is in 2020-W53, and 2021-01-04 starts 2021-W01).
// Each hour lies in one day and each day in one ISO week, which is why the order hourly ->
// daily -> weekly never lets a coarser rule keep a second point of a bucket a finer rule took.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::site {

// Bounds. Counts are at least 1 (a count of 0 is refused where a policy is parsed: it would
// read as "keep none" while the rule keeps nothing anyway). 1,000,000 hours is 114 years.
inline constexpr std::uint32_t kMaxRetentionCount = 1'000'000;
inline constexpr std::chrono::seconds kMaxRetentionDuration{3653LL * 24 * 3600};  // 10 years
inline constexpr std::size_t kMaxRetentionPoints = 1'000'000;

struct RetentionPolicy {
  std::optional<std::uint32_t> keep_last, keep_hourly, keep_daily, keep_weekly;
  std::optional<std::chrono::seconds> keep_within;

  bool empty() const;  // no option given
  // The command-line spelling, in field order: "keep-last 48, keep-within 6h"; "(none)" when
  // empty.
  std::string describe() const;
  bool operator==(const RetentionPolicy&) const = default;
};

// The policy used when none is given: keep-last 48, keep-within 1d: every RP of the last day
// (1,440 with an RP a minute), and at least the 48 newest when RPs are rarer. Both rules keep
// a run of the newest RPs, so the store holds exactly the kept RPs' changes over the images
// (tiered rules, keep-hourly/daily/weekly, keep older RPs with gaps between them, whose
// bytes stay until the oldest kept RP passes them: docs/operations.md, "Retention"). Never
// "keep everything": a store without a policy would grow until its file system is full.
RetentionPolicy default_retention();

// Given options replace the default as a whole (as in PBS): keep-daily 7 alone keeps no
// keep-last 48. So: given.empty() ? default_retention() : given.
RetentionPolicy effective_retention(const RetentionPolicy& given);

// Counts in 1..kMaxRetentionCount, keep-within in 1 s..kMaxRetentionDuration. The message
// names the option ("keep-last: must be from 1 to 1000000, not 0").
Status check_retention(const RetentionPolicy& policy);

// "90s", "30m", "6h", "7d", "2w", "1h30m": numbers each followed by a unit (w, d, h, m, s),
// units from the largest down, each at most once. Total > 0 and <= kMaxRetentionDuration.
// The error names the text. format_retention_duration writes the inverse ("1h30m", "7d").
Result<std::chrono::seconds> parse_retention_duration(std::string_view text);
std::string format_retention_duration(std::chrono::seconds duration);

struct RetentionPoint {
  std::uint64_t rp_id = 0;         // unique within the call
  std::uint64_t time_unix_ns = 0;  // when the RP was taken, UTC
  bool pinned = false;
};

enum class KeepRule : std::uint8_t { none /*removed*/, newest, pinned, last, hourly, daily, weekly, within };
// "newest", "pinned", "keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-within",
// "none".
const char* keep_rule_name(KeepRule rule);

struct RetentionVerdict {
  std::uint64_t rp_id = 0;
  std::uint64_t time_unix_ns = 0;
  bool keep = false;
  KeepRule rule = KeepRule::none;  // the first rule (K1..K7) that keeps it
  bool operator==(const RetentionVerdict&) const = default;
};

// Applies `effective` (non-empty and valid per check_retention: asserted) to `points`, given
// in any order (at most kMaxRetentionPoints, ids unique: asserted). Returns one verdict per
// point in ascending rp_id. O(n log n).
std::vector<RetentionVerdict> decide_retention(const RetentionPolicy& effective,
                                               std::vector<RetentionPoint> points,
                                               std::uint64_t now_unix_ns);

// The UTC buckets of a time, exposed for tests and for messages.
struct IsoWeek {
  std::int32_t year = 0;  // the ISO year: the calendar year of the week's Thursday
  std::uint32_t week = 0;  // 1..53
  bool operator==(const IsoWeek&) const = default;
};
IsoWeek iso_week_of(std::uint64_t time_unix_ns);

}  // namespace ferry::site
