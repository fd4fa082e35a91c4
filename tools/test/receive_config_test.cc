// Unit tests of the receiver config parser (receive_config.h): the example file, one case per
// rule (each message names file:line: key), the precedence of the four policy sources, and
// 2,000 seeded random mutations of a good file that must never throw or crash.
#include <catch2/catch.hpp>
#include <iterator>
#include <fstream>
#include <random>
#include <string>

#include "ferry/site/store.h"
#include "receive_config.h"

using ferry::site::RetentionPolicy;
using ferry::tools::parse_receive_config;
using ferry::tools::ReceiveConfig;
using std::chrono::seconds;

namespace {

constexpr const char* kGood = R"(# default retention for every group
[retention]
keep-last = 48
keep-within = "6h"

# per group
[group.web01.retention]
keep-daily = 7
keep-weekly = 4

[group."db-1.prod"]
retention = { keep-hourly = 24, keep-within = "1h30m" }

[group.idle]
)";

std::string error_of(const std::string& text) {
  auto r = parse_receive_config(text, "receive.toml");
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == ferry::Errc::invalid_argument);
  return r.status().message();
}

void check_error(const std::string& text, const std::string& where_key,
                 const std::string& what) {
  const std::string m = error_of(text);
  INFO(m);
  CHECK(m.rfind(where_key, 0) == 0);  // starts with "receive.toml:LINE: key"
  CHECK(m.find(what) != std::string::npos);
}

RetentionPolicy last(std::uint32_t n) {
  RetentionPolicy p;
  p.keep_last = n;
  return p;
}

}  // namespace

TEST_CASE("the example file parses", "[receive-config]") {
  auto r = parse_receive_config(kGood, "receive.toml");
  REQUIRE(r.is_ok());
  const ReceiveConfig& c = *r;
  CHECK(c.retention.describe() == "keep-last 48, keep-within 6h");
  REQUIRE(c.groups.size() == 3);
  CHECK(c.groups.at("web01").describe() == "keep-daily 7, keep-weekly 4");
  CHECK(c.groups.at("db-1.prod").describe() == "keep-hourly 24, keep-within 1h30m");
  CHECK(c.groups.at("idle").empty());
  CHECK(c.for_group("web01") == c.groups.at("web01"));
  CHECK(c.for_group("idle") == c.retention);   // an empty group table gives no option
  CHECK(c.for_group("other") == c.retention);
}

TEST_CASE("an empty file gives the built-in default to every group", "[receive-config]") {
  auto r = parse_receive_config("# nothing\n", "receive.toml");
  REQUIRE(r.is_ok());
  CHECK(r->retention.empty());
  CHECK(r->groups.empty());
  CHECK(r->for_group("g") == ferry::site::default_retention());
}

TEST_CASE("the shipped example parses", "[receive-config]") {
  auto r = ferry::tools::load_receive_config(FERRY_SOURCE_DIR "/packaging/receive.toml.example");
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  CHECK_FALSE(r->retention.empty());
}

TEST_CASE("precedence: group table > [retention] > flags > built-in default",
          "[receive-config]") {
  const RetentionPolicy flags = last(5);
  // A file with both levels: the flags lose everywhere.
  auto both = parse_receive_config("[retention]\nkeep-last = 10\n[group.a.retention]\n"
                                   "keep-daily = 3\n",
                                   "receive.toml");
  REQUIRE(both.is_ok());
  const ReceiveConfig c1 = ferry::tools::with_flags(*both, flags);
  CHECK(c1.for_group("a").describe() == "keep-daily 3");  // replaces as a whole: no keep-last
  CHECK(c1.for_group("b") == last(10));
  // Only per-group tables: the flags are the default of the other groups.
  auto groups_only = parse_receive_config("[group.a.retention]\nkeep-daily = 3\n", "r.toml");
  REQUIRE(groups_only.is_ok());
  const ReceiveConfig c2 = ferry::tools::with_flags(*groups_only, flags);
  CHECK(c2.for_group("a").describe() == "keep-daily 3");
  CHECK(c2.for_group("b") == flags);
  // No flags either: the built-in default.
  const ReceiveConfig c3 = ferry::tools::with_flags(*groups_only, RetentionPolicy{});
  CHECK(c3.for_group("b") == ferry::site::default_retention());
  // No file at all (an empty config) with flags.
  CHECK(ferry::tools::with_flags(ReceiveConfig{}, flags).for_group("x") == flags);
}

TEST_CASE("syntax errors name the line and column", "[receive-config]") {
  const std::string m = error_of("[retention]\nkeep-last = = 3\n");
  INFO(m);
  CHECK(m.rfind("receive.toml:2:", 0) == 0);
  // TOML itself refuses a group defined twice.
  CHECK(error_of("[group.a.retention]\nkeep-last = 1\n[group.a.retention]\nkeep-last = 2\n")
            .rfind("receive.toml:3:", 0) == 0);
}

TEST_CASE("unknown keys and tables are refused", "[receive-config]") {
  check_error("keep-last = 3\n", "receive.toml:1: keep-last", "unknown key in the top level");
  check_error("[retention]\nkeep-lats = 3\n", "receive.toml:2: keep-lats",
              "unknown key in [retention] (allowed: keep-last, keep-hourly");
  check_error("[retention]\nkeep-monthly = 3\n", "receive.toml:2: keep-monthly", "unknown key");
  check_error("[groups.a.retention]\nkeep-last = 3\n", "receive.toml:1: groups", "unknown key");
  check_error("[group.a]\nkeep-last = 3\n", "receive.toml:2: keep-last",
              "unknown key in [group.a] (allowed: retention, quota)");
  check_error("[group.a.retention]\nkeep-last = 3\nkeep_daily = 1\n",
              "receive.toml:3: keep_daily", "unknown key in [group.a.retention]");
  check_error("[group.a.retention.x]\n", "receive.toml:1: x", "unknown key");
}

TEST_CASE("counts are integers from 1 to 1000000", "[receive-config]") {
  check_error("[retention]\nkeep-last = 0\n", "receive.toml:2: keep-last", "from 1 to 1000000");
  check_error("[retention]\nkeep-hourly = -1\n", "receive.toml:2: keep-hourly", "from 1 to");
  check_error("[retention]\nkeep-daily = 1000001\n", "receive.toml:2: keep-daily", "from 1 to");
  check_error("[retention]\nkeep-weekly = 99999999999999\n", "receive.toml:2: keep-weekly",
              "from 1 to");
  check_error("\n[group.g.retention]\nkeep-last = 0\n", "receive.toml:3: keep-last", "from 1");
}

TEST_CASE("keep-within must be a valid duration", "[receive-config]") {
  check_error("[retention]\nkeep-within = \"5y\"\n", "receive.toml:2: keep-within",
              "'5y' is not a duration: unknown unit 'y'");
  check_error("[retention]\nkeep-within = \"0s\"\n", "receive.toml:2: keep-within",
              "longer than 0");
  check_error("[retention]\nkeep-within = \"3654d\"\n", "receive.toml:2: keep-within",
              "more than 10 years");
  check_error("[retention]\nkeep-within = \"\"\n", "receive.toml:2: keep-within", "empty");
  check_error("[retention]\nkeep-within = \"6\"\n", "receive.toml:2: keep-within", "no unit");
}

TEST_CASE("wrong types are refused", "[receive-config]") {
  check_error("[retention]\nkeep-last = \"48\"\n", "receive.toml:2: keep-last",
              "must be an integer");
  check_error("[retention]\nkeep-last = 4.8\n", "receive.toml:2: keep-last",
              "must be an integer");
  check_error("[retention]\nkeep-within = 6\n", "receive.toml:2: keep-within",
              "must be a string such as \"6h\"");
  check_error("retention = 48\n", "receive.toml:1: retention", "must be a table");
  check_error("[[retention]]\nkeep-last = 1\n", "receive.toml:1: retention", "must be a table");
  check_error("group = \"web01\"\n", "receive.toml:1: group", "must be tables");
  check_error("[group]\nweb01 = 3\n", "receive.toml:2: group.web01", "must be a table");
  check_error("[group.web01]\nretention = \"daily\"\n", "receive.toml:2: retention",
              "must be a table, written as [group.web01.retention]");
}

TEST_CASE("group names follow the store's rule", "[receive-config]") {
  check_error("[group.\"a b\".retention]\nkeep-last = 1\n", "receive.toml:1: group.a b",
              "'a b' is not a valid group name ([A-Za-z0-9._-]");
  check_error("[group.\"..\".retention]\nkeep-last = 1\n", "receive.toml:1: group..",
              "not a valid group name");
  check_error("[group.\"a/b\"]\n", "receive.toml:1: group.a/b", "not a valid group name");
  check_error("[group.\"a\\u0001\"]\n", "receive.toml:1: group.a?", "not a valid group name");
  check_error("[group.\"" + std::string(256, 'n') + "\"]\n", "receive.toml:1: group.nnn",
              "not a valid group name");
  CHECK(parse_receive_config("[group." + std::string(255, 'n') + "]\n", "r.toml").is_ok());
}

TEST_CASE("sizes and group counts are bounded", "[receive-config]") {
  std::string many;
  for (std::size_t i = 0; i <= ferry::tools::kMaxReceiveConfigGroups; ++i)
    many += "[group.g" + std::to_string(100000 + i) + "]\n";
  check_error(many, "receive.toml:4097: group.g104096", "more than 4096 groups");
  const std::string m = error_of(std::string(ferry::tools::kMaxReceiveConfigBytes + 1, '#'));
  CHECK(m.find("larger than") != std::string::npos);
}

TEST_CASE("load_receive_config names a missing file", "[receive-config]") {
  auto r = ferry::tools::load_receive_config("/nonexistent/ferry/receive.toml");
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().message().find("/nonexistent/ferry/receive.toml") != std::string::npos);
}

TEST_CASE("2000 random mutations of a good file never throw", "[receive-config]") {
  const std::uint64_t seed = Catch::rngSeed() ? Catch::rngSeed() : 20261207;
  INFO("seed " << seed << " (rerun with --rng-seed " << seed << ")");
  std::mt19937_64 rng(seed);
  const std::string good = kGood;
  const char* const pieces[] = {"[", "]", "[[", "=", "\"", "'", "\n", ".", "{", "}", ",",
                                "keep-last", "keep-within", "group", "retention", "0", "-1",
                                "99999999999999999999", "\"6h\"", "\"5y\"", "\\u0000", "\xff",
                                "#", "[group.x.retention]\n", "true", "1e9", "\"\"\"", " "};
  std::size_t accepted = 0;
  for (int round = 0; round < 2000; ++round) {
    std::string text = good;
    const int edits = 1 + int(rng() % 8);
    for (int e = 0; e < edits && !text.empty(); ++e) {
      const std::size_t at = rng() % text.size();
      switch (rng() % 5) {
        case 0: text[at] = char(rng() % 256); break;  // replace a byte
        case 1: text.erase(at, 1 + rng() % 12); break;
        case 2: text.insert(at, pieces[rng() % std::size(pieces)]); break;
        case 3: text.insert(at, text.substr(rng() % text.size(), rng() % 40)); break;  // repeat
        default: text.insert(at, 1, char(rng() % 128)); break;
      }
    }
    INFO("round " << round);
    ferry::Result<ReceiveConfig> r = ReceiveConfig{};
    REQUIRE_NOTHROW(r = parse_receive_config(text, "fuzz.toml"));
    if (!r.is_ok()) {
      CHECK(r.status().message().rfind("fuzz.toml", 0) == 0);
      continue;
    }
    ++accepted;
    // Whatever it accepts holds every bound.
    CHECK(ferry::site::check_retention(r->retention).is_ok());
    CHECK(r->groups.size() <= ferry::tools::kMaxReceiveConfigGroups);
    for (const auto& [name, p] : r->groups) {
      CHECK(ferry::site::valid_store_name(name));
      CHECK(ferry::site::check_retention(p).is_ok());
      CHECK_FALSE(r->for_group(name).empty());
    }
  }
  CHECK(accepted > 0);  // some mutations stay valid (60 of 2000 with the default seed)
}

TEST_CASE("metrics: a string at the top level, absent by default", "[receive-config]") {
  auto r = parse_receive_config("metrics = \"127.0.0.1:9465\"\n", "receive.toml");
  REQUIRE(r.is_ok());
  CHECK(r->metrics == "127.0.0.1:9465");
  CHECK(parse_receive_config("", "receive.toml")->metrics.empty());
  CHECK_FALSE(parse_receive_config("metrics = 1\n", "receive.toml").is_ok());
}
