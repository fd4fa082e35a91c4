#include "retention_flags.h"

#include <CLI/CLI.hpp>

namespace ferry::tools {
namespace {

// CLI11 prefixes the returned text with the flag: "--keep-within: '5y' is not a duration...".
std::string check_duration(std::string& text) {
  auto d = site::parse_retention_duration(text);
  return d.is_ok() ? std::string() : d.status().message();
}

}  // namespace

void add_retention_flags(CLI::App* cmd, RetentionFlags& out) {
  const auto count = CLI::Range(std::uint32_t{1}, site::kMaxRetentionCount);
  cmd->add_option("--keep-last", out.keep_last, "Keep the N newest recovery points")
      ->check(count);
  cmd->add_option("--keep-hourly", out.keep_hourly,
                  "Keep the newest recovery point of each of the last N hours (UTC) that have one")
      ->check(count);
  cmd->add_option("--keep-daily", out.keep_daily,
                  "Keep the newest recovery point of each of the last N days (UTC) that have one")
      ->check(count);
  cmd->add_option("--keep-weekly", out.keep_weekly,
                  "Keep the newest recovery point of each of the last N ISO weeks that have one")
      ->check(count);
  cmd->add_option("--keep-within", out.keep_within,
                  "Keep every recovery point at most DURATION old (90s, 30m, 6h, 7d, 2w, 1h30m)")
      ->check(CLI::Validator(check_duration, "DURATION"));
}

Result<site::RetentionPolicy> RetentionFlags::policy() const {
  site::RetentionPolicy p;
  auto set = [](std::uint32_t v, std::optional<std::uint32_t>* o) {
    if (v != 0) *o = v;
  };
  set(keep_last, &p.keep_last);
  set(keep_hourly, &p.keep_hourly);
  set(keep_daily, &p.keep_daily);
  set(keep_weekly, &p.keep_weekly);
  if (!keep_within.empty()) {
    auto d = site::parse_retention_duration(keep_within);
    if (!d.is_ok()) return d.status().with_context("--keep-within");
    p.keep_within = *d;
  }
  Status s = site::check_retention(p);
  if (!s.is_ok()) return s.with_context("retention flags");
  return p;
}

}  // namespace ferry::tools
