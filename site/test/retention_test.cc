// Retention (retention.h): hand-computed cases for each rule K1..K7, ISO week edges checked
// against the C library's own UTC calendar (timegm/gmtime_r, %G-%V), and a seeded random
// comparison against a slow oracle that buckets with strftime.
#include <catch2/catch.hpp>
#include <algorithm>
#include <ctime>
#include <map>
#include <random>
#include <set>
#include <string>

#include "ferry/site/retention.h"

using namespace ferry::site;
using std::chrono::seconds;

namespace {

constexpr std::uint64_t kSec = 1'000'000'000ULL;
constexpr std::uint64_t kMin = 60 * kSec;
constexpr std::uint64_t kHour = 60 * kMin;
constexpr std::uint64_t kDay = 24 * kHour;

// UTC wall time to ns since the epoch, by the C library (independent of retention.cc).
std::uint64_t utc(int y, int mon, int d, int h = 0, int m = 0) {
  std::tm tm{};
  tm.tm_year = y - 1900;
  tm.tm_mon = mon - 1;
  tm.tm_mday = d;
  tm.tm_hour = h;
  tm.tm_min = m;
  return std::uint64_t(timegm(&tm)) * kSec;
}

std::string strftime_utc(std::uint64_t t_ns, const char* format) {
  const std::time_t t = std::time_t(t_ns / kSec);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[64];
  REQUIRE(std::strftime(buf, sizeof buf, format, &tm) > 0);
  return buf;
}

// Points 1..count, `step` apart from `start`.
std::vector<RetentionPoint> series(std::uint64_t start, std::uint64_t step, std::uint64_t count) {
  std::vector<RetentionPoint> v;
  for (std::uint64_t i = 0; i < count; ++i) v.push_back({i + 1, start + i * step, false});
  return v;
}

std::set<std::uint64_t> kept_ids(const std::vector<RetentionVerdict>& verdicts) {
  std::set<std::uint64_t> out;
  for (const auto& v : verdicts)
    if (v.keep) out.insert(v.rp_id);
  return out;
}

std::map<std::uint64_t, KeepRule> rules_of(const std::vector<RetentionVerdict>& verdicts) {
  std::map<std::uint64_t, KeepRule> out;
  for (const auto& v : verdicts) out[v.rp_id] = v.rule;
  return out;
}

RetentionPolicy policy(std::optional<std::uint32_t> last, std::optional<std::uint32_t> hourly,
                       std::optional<std::uint32_t> daily, std::optional<std::uint32_t> weekly,
                       std::optional<seconds> within = std::nullopt) {
  RetentionPolicy p;
  p.keep_last = last;
  p.keep_hourly = hourly;
  p.keep_daily = daily;
  p.keep_weekly = weekly;
  p.keep_within = within;
  return p;
}

// The rules of retention.h written the slow and obvious way, with buckets as strftime text.
std::map<std::uint64_t, KeepRule> oracle(const RetentionPolicy& p,
                                         const std::vector<RetentionPoint>& points,
                                         std::uint64_t now) {
  std::vector<RetentionPoint> v = points;
  std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.rp_id > b.rp_id; });
  std::map<std::uint64_t, KeepRule> rule;
  for (const auto& pt : v) rule[pt.rp_id] = KeepRule::none;
  auto kept = [&](const RetentionPoint& pt) { return rule[pt.rp_id] != KeepRule::none; };
  if (!v.empty()) rule[v[0].rp_id] = KeepRule::newest;
  for (const auto& pt : v)
    if (!kept(pt) && pt.pinned) rule[pt.rp_id] = KeepRule::pinned;
  if (p.keep_within)
    for (const auto& pt : v)
      if (!kept(pt) && (pt.time_unix_ns >= now ||
                        now - pt.time_unix_ns <= std::uint64_t(p.keep_within->count()) * kSec))
        rule[pt.rp_id] = KeepRule::within;
  if (p.keep_last)
    for (std::size_t i = 0; i < v.size() && i < *p.keep_last; ++i)
      if (!kept(v[i])) rule[v[i].rp_id] = KeepRule::last;
  const std::tuple<std::optional<std::uint32_t>, const char*, KeepRule> periodic[] = {
      {p.keep_hourly, "%Y-%m-%d %H", KeepRule::hourly},
      {p.keep_daily, "%Y-%m-%d", KeepRule::daily},
      {p.keep_weekly, "%G-W%V", KeepRule::weekly}};
  for (const auto& [count, format, r] : periodic) {
    if (!count) continue;
    std::set<std::string> covered;
    for (const auto& pt : v)
      if (kept(pt)) covered.insert(strftime_utc(pt.time_unix_ns, format));
    std::set<std::string> taken;
    for (const auto& pt : v) {
      if (taken.size() == *count) break;
      const std::string b = strftime_utc(pt.time_unix_ns, format);
      if (kept(pt) || covered.count(b) || taken.count(b)) continue;
      taken.insert(b);
      rule[pt.rp_id] = r;
    }
  }
  return rule;
}

}  // namespace

TEST_CASE("the default policy and how given options replace it", "[retention]") {
  const RetentionPolicy d = default_retention();
  CHECK(d.describe() == "keep-last 48, keep-within 1d");
  CHECK_FALSE(d.empty());
  CHECK(RetentionPolicy{}.empty());
  CHECK(RetentionPolicy{}.describe() == "(none)");
  CHECK(effective_retention(RetentionPolicy{}) == d);
  const RetentionPolicy daily = policy(std::nullopt, std::nullopt, 7, std::nullopt);
  CHECK(effective_retention(daily) == daily);  // no keep-last 48 added
  CHECK(policy(48, std::nullopt, std::nullopt, std::nullopt, seconds(6 * 3600)).describe() ==
        "keep-last 48, keep-within 6h");
}

TEST_CASE("rule names", "[retention]") {
  CHECK(std::string(keep_rule_name(KeepRule::none)) == "none");
  CHECK(std::string(keep_rule_name(KeepRule::newest)) == "newest");
  CHECK(std::string(keep_rule_name(KeepRule::pinned)) == "pinned");
  CHECK(std::string(keep_rule_name(KeepRule::last)) == "keep-last");
  CHECK(std::string(keep_rule_name(KeepRule::hourly)) == "keep-hourly");
  CHECK(std::string(keep_rule_name(KeepRule::daily)) == "keep-daily");
  CHECK(std::string(keep_rule_name(KeepRule::weekly)) == "keep-weekly");
  CHECK(std::string(keep_rule_name(KeepRule::within)) == "keep-within");
}

TEST_CASE("durations parse and format", "[retention]") {
  const std::pair<const char*, std::int64_t> good[] = {
      {"90s", 90}, {"30m", 1800}, {"6h", 21600}, {"7d", 604800}, {"2w", 1209600},
      {"1h30m", 5400}, {"1w2d3h4m5s", 788645}, {"0h1s", 1}, {"3653d", 3653 * 86400}};
  for (const auto& [text, secs] : good) {
    INFO(text);
    auto r = parse_retention_duration(text);
    REQUIRE(r.is_ok());
    CHECK(r->count() == secs);
    CHECK(parse_retention_duration(format_retention_duration(*r)).value() == *r);
  }
  CHECK(format_retention_duration(seconds(5400)) == "1h30m");
  CHECK(format_retention_duration(seconds(604800)) == "7d");
  const std::pair<const char*, const char*> bad[] = {
      {"", "empty"}, {"6", "has no unit"}, {"6y", "unknown unit 'y'"}, {"h", "expected a number"},
      {"30m1h", "largest down"}, {"1h1h", "largest down"}, {"0s", "longer than 0"},
      {"3654d", "more than 10 years"}, {"99999999999s", "too long"}, {" 6h", "expected a number"},
      {"6h ", "expected a number at ' '"}, {"-6h", "expected a number"}, {"6H", "unknown unit 'H'"},
      {"1.5h", "unknown unit '.'"}};
  for (const auto& [text, what] : bad) {
    INFO(text);
    auto r = parse_retention_duration(text);
    REQUIRE_FALSE(r.is_ok());
    const std::string m = r.status().message();
    INFO(m);
    CHECK(m.find("'" + std::string(text) + "' is not a duration") == 0);
    CHECK(m.find(what) != std::string::npos);
  }
}

TEST_CASE("check_retention bounds counts and the window", "[retention]") {
  CHECK(check_retention(default_retention()).is_ok());
  CHECK(check_retention(policy(0, std::nullopt, std::nullopt, std::nullopt)).message() ==
        "keep-last: must be from 1 to 1000000, not 0");
  CHECK(check_retention(policy(std::nullopt, std::nullopt, std::nullopt, kMaxRetentionCount + 1))
            .message()
            .find("keep-weekly") == 0);
  CHECK(check_retention(policy(1, 1, 1, kMaxRetentionCount)).is_ok());
  CHECK(check_retention(policy(1, 1, 1, 1, seconds(0))).message().find("keep-within") == 0);
  CHECK_FALSE(check_retention(policy(1, 1, 1, 1, kMaxRetentionDuration + seconds(1))).is_ok());
}

TEST_CASE("keep-last 20 of 300 RPs a minute apart keeps exactly the 20 newest", "[retention]") {
  const auto v = decide_retention(policy(20, std::nullopt, std::nullopt, std::nullopt),
                                  series(utc(2026, 12, 7), kMin, 300), utc(2026, 12, 7, 5));
  REQUIRE(v.size() == 300);
  for (std::size_t i = 0; i < v.size(); ++i) CHECK(v[i].rp_id == i + 1);  // ascending ids
  std::set<std::uint64_t> want;
  for (std::uint64_t id = 281; id <= 300; ++id) want.insert(id);
  CHECK(kept_ids(v) == want);
  CHECK(v[299].rule == KeepRule::newest);
  CHECK(v[280].rule == KeepRule::last);
  CHECK(v[279].rule == KeepRule::none);
}

TEST_CASE("points in any order give the same verdicts", "[retention]") {
  auto pts = series(utc(2026, 1, 1), 7 * kMin, 500);
  const RetentionPolicy p = default_retention();
  const auto sorted = decide_retention(p, pts, utc(2026, 1, 3));
  std::mt19937_64 rng(7);
  std::shuffle(pts.begin(), pts.end(), rng);
  CHECK(decide_retention(p, pts, utc(2026, 1, 3)) == sorted);
}

TEST_CASE("an RP every 10 minutes over 10 days: hourly 24, daily 7, weekly 4", "[retention]") {
  // 2021-01-01 00:05 (a Friday) to 2021-01-10 23:55 (a Sunday): 1440 RPs, RP k at
  // start + (k-1) * 10 min, so the :55 RP of day D (January), hour h is id (D-1)*144 + 6h + 6.
  const auto v = decide_retention(policy(std::nullopt, 24, 7, 4),
                                  series(utc(2021, 1, 1, 0, 5), 10 * kMin, 1440),
                                  utc(2021, 1, 11));
  auto id = [](int day, int hour) { return std::uint64_t((day - 1) * 144 + 6 * hour + 6); };
  std::map<std::uint64_t, KeepRule> want;
  want[id(10, 23)] = KeepRule::newest;  // 1440; covers hour Jan 10 23
  for (int h = 22; h >= 0; --h) want[id(10, h)] = KeepRule::hourly;  // 23 hours of Jan 10
  want[id(9, 23)] = KeepRule::hourly;                                 // the 24th hour
  // Jan 10 and Jan 9 are covered; daily takes the next seven days' newest RP.
  for (int d = 8; d >= 2; --d) want[id(d, 23)] = KeepRule::daily;
  // Weekly: 2021-W01 (Jan 4..10) is covered by the newest, 2020-W53 (Dec 28..Jan 3) by Jan 2's
  // daily RP; Jan 1 lies in 2020-W53 too, so no week is left to take.
  std::map<std::uint64_t, KeepRule> got;
  for (const auto& [rp, rule] : rules_of(v))
    if (rule != KeepRule::none) got[rp] = rule;
  CHECK(got == want);
  CHECK(got.size() == 32);
}

TEST_CASE("weekly buckets are ISO weeks: Sunday ends one, Monday starts the next",
          "[retention]") {
  // One RP a day at noon, 2020-12-01 (id 1) to 2021-01-10 (id 41), a Sunday.
  const auto pts = series(utc(2020, 12, 1, 12), kDay, 41);
  const auto v = decide_retention(policy(std::nullopt, std::nullopt, 3, 4), pts,
                                  utc(2021, 1, 11));
  // newest Jan 10 (41); daily Jan 9, 8, 7 (40, 39, 38); weekly, 2021-W01 being covered:
  // Jan 3 (34, 2020-W53), Dec 27 (27, W52), Dec 20 (20, W51), Dec 13 (13, W50).
  CHECK(kept_ids(v) == std::set<std::uint64_t>{13, 20, 27, 34, 38, 39, 40, 41});
  CHECK(rules_of(v)[34] == KeepRule::weekly);

  // Sunday 23:00 and Monday 01:00 of the same night are two weeks.
  const std::vector<RetentionPoint> night = {{1, utc(2021, 1, 3, 10), false},
                                             {2, utc(2021, 1, 10, 23), false},
                                             {3, utc(2021, 1, 11, 1), false}};
  const auto w1 = decide_retention(policy(std::nullopt, std::nullopt, std::nullopt, 1), night,
                                   utc(2021, 1, 12));
  CHECK(kept_ids(w1) == std::set<std::uint64_t>{2, 3});
  const auto w2 = decide_retention(policy(std::nullopt, std::nullopt, std::nullopt, 2), night,
                                   utc(2021, 1, 12));
  CHECK(kept_ids(w2) == std::set<std::uint64_t>{1, 2, 3});
}

TEST_CASE("ISO weeks at year boundaries, and every day 1970..2100 against strftime %G-%V",
          "[retention]") {
  CHECK(iso_week_of(utc(2020, 12, 31)) == IsoWeek{2020, 53});
  CHECK(iso_week_of(utc(2021, 1, 3, 23, 59)) == IsoWeek{2020, 53});
  CHECK(iso_week_of(utc(2021, 1, 4)) == IsoWeek{2021, 1});
  CHECK(iso_week_of(utc(2019, 12, 30)) == IsoWeek{2020, 1});
  CHECK(iso_week_of(utc(2024, 12, 30)) == IsoWeek{2025, 1});
  CHECK(iso_week_of(0) == IsoWeek{1970, 1});
  CHECK(iso_week_of(utc(2026, 12, 7)) == IsoWeek{2026, 50});
  for (std::uint64_t t = 0; t < utc(2100, 1, 1); t += kDay) {
    const IsoWeek w = iso_week_of(t + 13 * kHour);
    const std::string want = strftime_utc(t, "%G-%V");
    char got[32];
    std::snprintf(got, sizeof got, "%d-%02u", w.year, w.week);
    if (want != got) FAIL("day " << t / kDay << ": " << got << " != " << want);
  }
}

TEST_CASE("keep-within keeps the window, boundary included, future times too", "[retention]") {
  const std::uint64_t now = utc(2026, 12, 7, 12);
  // Ids 1..48 every 30 minutes, id k at now - 24h + (k-1) * 30 min: id 37 is exactly 6 h old.
  auto pts = series(now - 24 * kHour, 30 * kMin, 48);
  pts[35].time_unix_ns = now - 6 * kHour - 1;       // id 36: 6 h + 1 ns old
  pts.push_back({49, now + kHour, false});          // a source clock ahead of ours
  pts.push_back({50, now - 6 * kHour - 1, false});  // the newest id, outside the window
  const auto v = decide_retention(policy(std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                         seconds(6 * 3600)),
                                  pts, now);
  const auto rules = rules_of(v);
  CHECK(rules.at(50) == KeepRule::newest);
  CHECK(rules.at(49) == KeepRule::within);
  for (std::uint64_t id = 1; id <= 48; ++id) {
    INFO(id);
    CHECK(rules.at(id) == (id >= 37 ? KeepRule::within : KeepRule::none));
  }
}

TEST_CASE("pinned and newest are kept whatever the rest says", "[retention]") {
  // Id k at 2026-01-01 + (k-1) h; now is 100 h after the start.
  auto pts = series(utc(2026, 1, 1), kHour, 100);
  pts[4].pinned = true;                     // id 5, 95 hours old
  pts[99].time_unix_ns = utc(2020, 1, 1);   // the newest id with an ancient time
  const auto v = decide_retention(policy(3, std::nullopt, std::nullopt, std::nullopt,
                                         seconds(2 * 3600)),
                                  pts, utc(2026, 1, 5, 4));
  const auto rules = rules_of(v);
  CHECK(rules.at(100) == KeepRule::newest);
  CHECK(rules.at(5) == KeepRule::pinned);
  CHECK(rules.at(99) == KeepRule::within);  // exactly 2 h old
  CHECK(rules.at(98) == KeepRule::last);    // keep-last 3 = ids 100, 99, 98
  CHECK(kept_ids(v) == std::set<std::uint64_t>{5, 98, 99, 100});
}

TEST_CASE("no points, one point", "[retention]") {
  CHECK(decide_retention(default_retention(), {}, 0).empty());
  const auto v = decide_retention(default_retention(), {{7, 0, false}}, utc(2030, 1, 1));
  REQUIRE(v.size() == 1);
  CHECK(v[0] == RetentionVerdict{7, 0, true, KeepRule::newest});
}

TEST_CASE("random histories agree with the slow oracle", "[retention]") {
  const std::uint64_t seed = Catch::rngSeed() ? Catch::rngSeed() : 20261207;
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  for (int round = 0; round < 60; ++round) {
    const std::size_t n = std::size_t(rng() % 1500);
    std::vector<RetentionPoint> pts;
    std::uint64_t t = utc(2019, 12, 20) + rng() % (400 * kDay);
    for (std::size_t i = 0; i < n; ++i) {
      t += rng() % (3 * kHour);
      if (rng() % 50 == 0) t -= std::min(t, rng() % (2 * kDay));  // a clock step back
      pts.push_back({i * 3 + 1 + rng() % 3, t, rng() % 40 == 0});
    }
    std::shuffle(pts.begin(), pts.end(), rng);
    auto count = [&rng]() -> std::optional<std::uint32_t> {
      if (rng() % 3 == 0) return std::nullopt;
      return std::uint32_t(1 + rng() % 30);
    };
    RetentionPolicy p = policy(count(), count(), count(), count());
    if (rng() % 3 == 0) p.keep_within = seconds(1 + rng() % (3 * 86400));
    p = effective_retention(p);
    const std::uint64_t now = t + rng() % kDay - kHour / 2;
    INFO("round " << round << " " << p.describe() << " n " << n);
    const auto v = decide_retention(p, pts, now);
    REQUIRE(v.size() == n);
    std::map<std::uint64_t, KeepRule> got;
    for (const auto& x : v) {
      CHECK(x.keep == (x.rule != KeepRule::none));
      got[x.rp_id] = x.rule;
    }
    CHECK(got == oracle(p, pts, now));
  }
}

TEST_CASE("a million points (the bound) are decided in well under a second", "[retention]") {
  auto pts = series(utc(2000, 1, 1), 5 * kMin, kMaxRetentionPoints);
  for (std::size_t i = 0; i < pts.size(); i += 100'000) pts[i].pinned = true;  // 347 days apart
  const std::uint64_t now = pts.back().time_unix_ns;
  const auto t0 = std::chrono::steady_clock::now();
  const auto v = decide_retention(policy(48, 24, 7, 4, seconds(3600)), std::move(pts), now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - t0).count();
  INFO(ms << " ms");
  CHECK(ms < 5000);  // generous for sanitizer builds; O(n log n) takes ~0.2 s
  // newest 1 + within (12 more, 5 min apart) + keep-last (35 more) + 10 pinned, then one RP
  // for each of 24 hours, 7 days and 4 weeks not yet covered (the pins lie far behind).
  std::size_t kept = 0;
  for (const auto& x : v) kept += x.keep;
  CHECK(kept == 1 + 12 + 35 + 10 + 24 + 7 + 4);
}
