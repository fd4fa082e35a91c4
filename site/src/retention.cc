// Retention decisions (retention.h): K1..K7 in order, each a pass over the points sorted
// newest first. Buckets are computed from days since the epoch; nothing here reads a clock.
#include "ferry/site/retention.h"

#include <algorithm>
#include <iterator>
#include <unordered_set>

namespace ferry::site {
namespace {

constexpr std::uint64_t kNsPerSecond = 1'000'000'000ULL;
constexpr std::uint64_t kNsPerHour = 3600 * kNsPerSecond;
constexpr std::uint64_t kNsPerDay = 24 * kNsPerHour;
constexpr std::int64_t kDaysPerEra = 146097;  // days in 400 Gregorian years

// Leap years in [1, y - 1].
std::int64_t leap_years_before(std::int64_t y) {
  const std::int64_t p = y - 1;
  return p / 4 - p / 100 + p / 400;
}

// Days since 1970-01-01 of January 1st of year y (y >= 1).
std::int64_t first_day_of_year(std::int64_t y) {
  return 365 * (y - 1970) + leap_years_before(y) - leap_years_before(1970);
}

// The calendar year holding `days` (days since 1970-01-01, not negative): a guess from the
// mean year length, then corrected by at most a step or two.
std::int64_t year_of_day(std::int64_t days) {
  FERRY_ASSERT(days >= 0);
  std::int64_t y = 1970 + days * 400 / kDaysPerEra;
  while (first_day_of_year(y) > days) --y;
  while (first_day_of_year(y + 1) <= days) ++y;
  return y;
}

std::uint64_t hour_bucket(std::uint64_t t) { return t / kNsPerHour; }
std::uint64_t day_bucket(std::uint64_t t) { return t / kNsPerDay; }
std::uint64_t week_bucket(std::uint64_t t) {
  const IsoWeek w = iso_week_of(t);
  return std::uint64_t(w.year) * 64 + w.week;
}

// K5..K7: one point per bucket not yet covered, newest first, until `count` buckets are
// taken. `rules` is parallel to `newest_first`; none means "not kept yet".
void keep_one_per_bucket(const std::vector<RetentionPoint>& newest_first,
                         std::vector<KeepRule>& rules, std::uint32_t count,
                         std::uint64_t (*bucket_of)(std::uint64_t), KeepRule rule) {
  FERRY_ASSERT(rules.size() == newest_first.size());
  std::unordered_set<std::uint64_t> seen;  // buckets covered by earlier rules, then taken
  seen.reserve(newest_first.size());
  for (std::size_t i = 0; i < rules.size(); ++i)
    if (rules[i] != KeepRule::none) seen.insert(bucket_of(newest_first[i].time_unix_ns));
  std::uint32_t taken = 0;
  for (std::size_t i = 0; i < rules.size() && taken < count; ++i) {
    if (rules[i] != KeepRule::none) continue;
    if (!seen.insert(bucket_of(newest_first[i].time_unix_ns)).second) continue;
    rules[i] = rule;
    ++taken;
  }
}

bool within(std::uint64_t time_unix_ns, std::uint64_t now_unix_ns, std::chrono::seconds d) {
  if (time_unix_ns >= now_unix_ns) return true;
  return now_unix_ns - time_unix_ns <= std::uint64_t(d.count()) * kNsPerSecond;
}

Status duration_error(std::string_view text, const std::string& what) {
  return Status::error(Errc::invalid_argument,
                       "'" + std::string(text) + "' is not a duration: " + what +
                           " (write e.g. 90s, 30m, 6h, 7d, 2w or 1h30m)");
}

// Seconds per unit; units in the order a duration must name them.
struct Unit {
  char name;
  std::int64_t seconds;
};
constexpr Unit kUnits[] = {{'w', 7 * 86400}, {'d', 86400}, {'h', 3600}, {'m', 60}, {'s', 1}};

}  // namespace

bool RetentionPolicy::empty() const {
  return !keep_last && !keep_hourly && !keep_daily && !keep_weekly && !keep_within;
}

std::string RetentionPolicy::describe() const {
  std::string out;
  auto add = [&out](const char* name, const std::string& value) {
    out += (out.empty() ? "" : ", ") + std::string(name) + " " + value;
  };
  if (keep_last) add("keep-last", std::to_string(*keep_last));
  if (keep_hourly) add("keep-hourly", std::to_string(*keep_hourly));
  if (keep_daily) add("keep-daily", std::to_string(*keep_daily));
  if (keep_weekly) add("keep-weekly", std::to_string(*keep_weekly));
  if (keep_within) add("keep-within", format_retention_duration(*keep_within));
  return out.empty() ? "(none)" : out;
}

RetentionPolicy default_retention() {
  RetentionPolicy p;
  p.keep_last = 48;
  p.keep_within = std::chrono::hours(24);
  return p;
}

RetentionPolicy effective_retention(const RetentionPolicy& given) {
  return given.empty() ? default_retention() : given;
}

Status check_retention(const RetentionPolicy& p) {
  const std::pair<const char*, const std::optional<std::uint32_t>*> counts[] = {
      {"keep-last", &p.keep_last}, {"keep-hourly", &p.keep_hourly},
      {"keep-daily", &p.keep_daily}, {"keep-weekly", &p.keep_weekly}};
  for (const auto& [name, value] : counts)
    if (*value && (**value < 1 || **value > kMaxRetentionCount))
      return Status::error(Errc::invalid_argument,
                           std::string(name) + ": must be from 1 to " +
                               std::to_string(kMaxRetentionCount) + ", not " +
                               std::to_string(**value));
  if (p.keep_within && (p.keep_within->count() < 1 || *p.keep_within > kMaxRetentionDuration))
    return Status::error(Errc::invalid_argument,
                         "keep-within: must be from 1s to " +
                             format_retention_duration(kMaxRetentionDuration) + ", not " +
                             std::to_string(p.keep_within->count()) + "s");
  return Status::ok();
}

Result<std::chrono::seconds> parse_retention_duration(std::string_view text) {
  if (text.empty()) return duration_error(text, "it is empty");
  std::int64_t total = 0;
  std::size_t next_unit = 0;  // index into kUnits: units must come in that order
  std::size_t i = 0;
  while (i < text.size()) {
    std::int64_t number = 0;
    std::size_t digits = 0;
    for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i, ++digits) {
      if (digits == 10) return duration_error(text, "a number is too long");
      number = number * 10 + (text[i] - '0');
    }
    if (digits == 0)
      return duration_error(text, "expected a number at '" + std::string(text.substr(i)) + "'");
    if (i == text.size())
      return duration_error(text, "the number " + std::to_string(number) +
                                      " has no unit (w, d, h, m or s)");
    const char u = text[i++];
    std::size_t k = 0;
    while (k < std::size(kUnits) && kUnits[k].name != u) ++k;
    if (k == std::size(kUnits))
      return duration_error(text, "unknown unit '" + std::string(1, u) + "'");
    if (k < next_unit)
      return duration_error(text, "units go from the largest down (w, d, h, m, s), each once");
    next_unit = k + 1;
    total += number * kUnits[k].seconds;  // at most 10 digits times a week: no overflow
    if (total > kMaxRetentionDuration.count())
      return duration_error(text, "more than 10 years (" +
                                      format_retention_duration(kMaxRetentionDuration) + ")");
  }
  if (total == 0) return duration_error(text, "it must be longer than 0 seconds");
  return std::chrono::seconds(total);
}

std::string format_retention_duration(std::chrono::seconds duration) {
  std::int64_t left = duration.count();
  if (left <= 0) return std::to_string(left) + "s";
  std::string out;
  for (const Unit& u : kUnits) {
    if (u.name == 'w') continue;  // "7d" reads better than "1w" and parses to the same
    if (left >= u.seconds) {
      out += std::to_string(left / u.seconds) + u.name;
      left %= u.seconds;
    }
  }
  return out;
}

const char* keep_rule_name(KeepRule rule) {
  switch (rule) {
    case KeepRule::none: return "none";
    case KeepRule::newest: return "newest";
    case KeepRule::pinned: return "pinned";
    case KeepRule::last: return "keep-last";
    case KeepRule::hourly: return "keep-hourly";
    case KeepRule::daily: return "keep-daily";
    case KeepRule::weekly: return "keep-weekly";
    case KeepRule::within: return "keep-within";
  }
  return "unknown";
}

IsoWeek iso_week_of(std::uint64_t time_unix_ns) {
  const auto days = std::int64_t(time_unix_ns / kNsPerDay);
  const std::int64_t weekday = (days + 3) % 7;  // Monday = 0; 1970-01-01 was a Thursday
  const std::int64_t thursday = days - weekday + 3;
  FERRY_ASSERT(thursday >= 0);  // days 0..3 (Thursday to Sunday) have 1970-01-01 as Thursday
  const std::int64_t y = year_of_day(thursday);
  IsoWeek w;
  w.year = std::int32_t(y);
  w.week = std::uint32_t((thursday - first_day_of_year(y)) / 7 + 1);
  FERRY_ASSERT(w.week >= 1 && w.week <= 53);
  return w;
}

std::vector<RetentionVerdict> decide_retention(const RetentionPolicy& effective,
                                               std::vector<RetentionPoint> points,
                                               std::uint64_t now_unix_ns) {
  FERRY_ASSERT_MSG(!effective.empty(), "decide_retention needs effective_retention(...)");
  FERRY_ASSERT(check_retention(effective).is_ok());
  FERRY_ASSERT(points.size() <= kMaxRetentionPoints);
  std::sort(points.begin(), points.end(),
            [](const RetentionPoint& a, const RetentionPoint& b) { return a.rp_id > b.rp_id; });
  for (std::size_t i = 1; i < points.size(); ++i)
    FERRY_ASSERT_MSG(points[i - 1].rp_id != points[i].rp_id, "duplicate rp_id");

  std::vector<KeepRule> rules(points.size(), KeepRule::none);
  if (!rules.empty()) rules[0] = KeepRule::newest;  // K1
  for (std::size_t i = 0; i < points.size(); ++i)   // K2
    if (rules[i] == KeepRule::none && points[i].pinned) rules[i] = KeepRule::pinned;
  if (effective.keep_within)  // K3
    for (std::size_t i = 0; i < points.size(); ++i)
      if (rules[i] == KeepRule::none &&
          within(points[i].time_unix_ns, now_unix_ns, *effective.keep_within))
        rules[i] = KeepRule::within;
  if (effective.keep_last)  // K4: the N newest, whatever kept them first
    for (std::size_t i = 0; i < points.size() && i < *effective.keep_last; ++i)
      if (rules[i] == KeepRule::none) rules[i] = KeepRule::last;
  if (effective.keep_hourly)  // K5
    keep_one_per_bucket(points, rules, *effective.keep_hourly, hour_bucket, KeepRule::hourly);
  if (effective.keep_daily)  // K6
    keep_one_per_bucket(points, rules, *effective.keep_daily, day_bucket, KeepRule::daily);
  if (effective.keep_weekly)  // K7
    keep_one_per_bucket(points, rules, *effective.keep_weekly, week_bucket, KeepRule::weekly);

  std::vector<RetentionVerdict> out;
  out.reserve(points.size());
  for (std::size_t i = points.size(); i-- > 0;)
    out.push_back({points[i].rp_id, points[i].time_unix_ns, rules[i] != KeepRule::none, rules[i]});
  return out;
}

}  // namespace ferry::site
