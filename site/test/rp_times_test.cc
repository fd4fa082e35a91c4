#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <unistd.h>

#include "ferry/site/rp_times.h"

using namespace ferry::site;

TEST_CASE("rp-times lines round-trip, with and without the source's stages") {
  RpTimesRecord a;
  a.rp_id = 42;
  a.source = RpTimesRecord::Source{1, 2, 3, 4, 5};
  a.receive_us = 6;
  a.durable_us = 7;
  a.ack_us = 8;
  a.apply_us = 9;
  CHECK(decode_rp_times_line(encode_rp_times_line(a)).value() == a);
  RpTimesRecord b = a;
  b.source.reset();
  CHECK(encode_rp_times_line(b) == "42 - - - - - 6 7 8 9\n");
  CHECK(decode_rp_times_line(encode_rp_times_line(b)).value() == b);
  CHECK_FALSE(decode_rp_times_line("42 1 2").is_ok());
  CHECK_FALSE(decode_rp_times_line("42 - 2 3 4 5 6 7 8 9").is_ok());
  CHECK_FALSE(decode_rp_times_line("42 1 2 3 4 x 6 7 8 9").is_ok());
  CHECK_FALSE(decode_rp_times_line("99999999999999999999 1 2 3 4 5 6 7 8 9").is_ok());
}

TEST_CASE("the side file is appended, read back, and trimmed to its newest half at its bound") {
  const auto root = std::filesystem::temp_directory_path() / ("rp_times_test_" + std::to_string(::getpid()));
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root / "g");
  CHECK(read_rp_times(root, "g")->empty());
  RpTimesRecord r;
  r.source = RpTimesRecord::Source{1000000, 2, 3, 4, 5};
  std::uint64_t n = 0;
  while (n < 12000) {  // ~28 bytes a line: past the bound at least once
    r.rp_id = ++n;
    REQUIRE(append_rp_times(root, "g", r).is_ok());
    REQUIRE(std::filesystem::file_size(root / "g" / "rp-times") <= kMaxRpTimesFileBytes);
  }
  auto all = read_rp_times(root, "g");
  REQUIRE(all.is_ok());
  CHECK(all->count(n) == 1);             // the newest is kept
  CHECK(all->count(1) == 0);             // the oldest went
  CHECK(all->size() < n);
  CHECK(all->at(n).source->slot_us == 1000000);
  std::ofstream(root / "g" / "rp-times", std::ios::app) << "garbage line\n";
  CHECK(read_rp_times(root, "g")->count(n) == 1);  // a bad line is skipped
  std::filesystem::remove_all(root);
}
