// The --keep-* flags (retention_flags.h): what they give, and that a bad value is a usage
// error naming the flag and the value.
#include <catch2/catch.hpp>
#include <algorithm>
#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "retention_flags.h"

using ferry::tools::RetentionFlags;

namespace {

// Parses `args` after "prune"; returns CLI11's error text, or "" on success.
std::string parse(std::vector<std::string> args, RetentionFlags& flags) {
  CLI::App app{"test"};
  ferry::tools::add_retention_flags(&app, flags);
  std::reverse(args.begin(), args.end());  // CLI11 takes a vector in reverse order
  try {
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("no flag gives an empty policy", "[retention-flags]") {
  RetentionFlags f;
  REQUIRE(parse({}, f).empty());
  auto p = f.policy();
  REQUIRE(p.is_ok());
  CHECK(p->empty());
}

TEST_CASE("every flag lands in the policy", "[retention-flags]") {
  RetentionFlags f;
  REQUIRE(parse({"--keep-last", "48", "--keep-hourly", "24", "--keep-daily=7", "--keep-weekly",
                 "4", "--keep-within", "1h30m"},
                f) == "");
  auto p = f.policy();
  REQUIRE(p.is_ok());
  CHECK(p->describe() ==
        "keep-last 48, keep-hourly 24, keep-daily 7, keep-weekly 4, keep-within 1h30m");
}

TEST_CASE("bad values are usage errors naming the flag and the value", "[retention-flags]") {
  const std::vector<std::pair<std::vector<std::string>, std::string>> bad = {
      {{"--keep-last", "0"}, "--keep-last"},
      {{"--keep-hourly", "1000001"}, "--keep-hourly"},
      {{"--keep-daily", "-3"}, "--keep-daily"},
      {{"--keep-weekly", "many"}, "--keep-weekly"},
      {{"--keep-within", "5y"}, "--keep-within"},
      {{"--keep-within", "0s"}, "--keep-within"},
  };
  for (const auto& [args, flag] : bad) {
    RetentionFlags f;
    const std::string m = parse(args, f);
    INFO(args[0] << " " << args[1] << ": " << m);
    CHECK(m.find(flag) != std::string::npos);
    CHECK(m.find(args[1]) != std::string::npos);
  }
}

TEST_CASE("policy() checks a value set without CLI11", "[retention-flags]") {
  RetentionFlags f;
  f.keep_within = "6x";
  auto p = f.policy();
  REQUIRE_FALSE(p.is_ok());
  CHECK(p.status().message().find("--keep-within: '6x' is not a duration") == 0);
}
