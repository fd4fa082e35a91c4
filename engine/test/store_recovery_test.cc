// Recovery decision table (docs/journal-format.md): one test per labelled case, on real files.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>

#include "ferry/engine/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::engine;
using namespace ferry::engine::test;
namespace fs = std::filesystem;

namespace {

// Figures for docs/reliability.md: one JSON line on stdout and appended to
// $FERRY_RESULTS_DIR/<test>.jsonl (test/reliability/meson.build and test/run set it).
// FERRY_LONG=1 scales the runs up.
bool long_mode() {
  const char* v = std::getenv("FERRY_LONG");
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

void write_figure(const std::string& test, const std::string& figure,
                  const std::string& fields_json) {
  std::string line = "{\"test\": \"" + test + "\", \"figure\": \"" + figure +
                     "\", \"long\": " + (long_mode() ? "true" : "false") + ", \"unix_time\": " +
                     std::to_string(static_cast<long long>(::time(nullptr))) + ", " +
                     fields_json + "}";
  std::printf("%s\n", line.c_str());
  const char* dir = std::getenv("FERRY_RESULTS_DIR");
  if (dir == nullptr || *dir == '\0') return;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (FILE* f = std::fopen((std::string(dir) + "/" + test + ".jsonl").c_str(), "a")) {
    std::fprintf(f, "%s\n", line.c_str());
    std::fclose(f);
  }
}

struct Fixture {
  TempDir dir;
  StoreOptions opt;
  std::vector<TestRp> rps = small_run();
  Model model = model_of(rps);
  Fixture() { opt.root = dir.path() + "/store"; }
  std::string gdir() const { return opt.root + "/g"; }
  std::string seg(int n) const {
    char b[64];
    std::snprintf(b, sizeof b, "/journal/%016x.seg", n);
    return gdir() + b;
  }
  // Commits (and applies) the first n RPs of the small run, then closes the store.
  void run(std::size_t n, bool apply = true) {
    auto store = GroupStore::open(opt, "g", true);
    REQUIRE(store.is_ok());
    for (std::size_t i = (*store)->last_committed_rp(); i < n; ++i) {
      REQUIRE(feed_rp(**store, rps[i]).is_ok());
      if (apply) REQUIRE((*store)->apply_committed().is_ok());
    }
  }
  Result<std::unique_ptr<GroupStore>> reopen() { return GroupStore::open(opt, "g", false); }
  void expect_all(GroupStore& s, std::uint64_t last) {
    REQUIRE(s.last_committed_rp() == last);
    REQUIRE(s.last_applied_rp() == last);
    for (std::uint64_t r = 1; r <= last; ++r)
      CHECK(check_rp(s, model, r, opt.root, dir.path(), r == last) == "");
  }
};

void flip_byte(const std::string& path, std::uint64_t offset) {
  std::string data = slurp(path);
  REQUIRE(offset < data.size());
  data[offset] = static_cast<char>(data[offset] ^ 0x5a);
  spit(path, data);
}

}  // namespace

TEST_CASE("recovery R1: a torn record at the tail is cut", "[store][recovery]") {
  Fixture f;
  f.run(2);
  std::uint64_t good_size = fs::file_size(f.seg(1));
  std::string seg = slurp(f.seg(1));
  // Half of a real record header, then garbage, as a crash mid-append leaves it.
  std::string tail = seg.substr(4096, 60) + block_bytes(9, 3000);
  spit(f.seg(1), seg + tail);
  {
    auto s = f.reopen();
    REQUIRE(s.is_ok());
    f.expect_all(**s, 2);
    CHECK(fs::file_size(f.seg(1)) == good_size);
    REQUIRE(feed_rp(**s, f.rps[2]).is_ok());  // appends resume where the cut was
    REQUIRE((*s)->apply_committed().is_ok());
  }
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 3);
}

TEST_CASE("recovery R2: a bad checksum inside committed data refuses to open", "[store][recovery]") {
  Fixture f;
  f.run(2);
  flip_byte(f.seg(1), 4096 + 300);  // inside RP 1's records; commits follow
  auto s = f.reopen();
  REQUIRE(!s.is_ok());
  CHECK(s.status().code() == Errc::corrupt);
  CHECK(s.status().message().find("0000000000000001.seg offset") != std::string::npos);
  CHECK(s.status().message().find("(R2)") != std::string::npos);
}

TEST_CASE("recovery R3: records of an RP without commit are ignored and cut", "[store][recovery]") {
  Fixture f;
  f.opt.max_inflight_write_bytes = 1u << 20;  // smallest buffers: the RP reaches the file
  f.run(1);
  std::uint64_t good_size = fs::file_size(f.seg(1));
  {
    auto s = f.reopen();
    REQUIRE(s.is_ok());
    RpBeginInfo b = {2, 1, 2, 0, {disk("a", 8u << 20, true)}};
    REQUIRE((*s)->begin_rp(b).is_ok());
    std::string raw = block_bytes(3, 65536);
    for (std::uint64_t i = 0; i < 100; ++i) {
      BlockRecord r{2, i, 0, RecordKind::data, RecordCodec::none, i * 65536, 65536,
                    xxh3_128(raw.data(), raw.size()), raw};
      REQUIRE((*s)->append_block(r).is_ok());
    }
  }  // closed without commit: as after a dropped connection and a crash
  CHECK(fs::file_size(f.seg(1)) > good_size);
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 1);
  CHECK(fs::file_size(f.seg(1)) == good_size);
}

TEST_CASE("recovery R3: an aborted RP in the middle is skipped", "[store][recovery]") {
  Fixture f;
  f.run(1);
  {
    auto s = f.reopen();
    REQUIRE(s.is_ok());
    REQUIRE((*s)->begin_rp(f.rps[1].begin).is_ok());
    (*s)->abort_rp();
    REQUIRE(feed_rp(**s, f.rps[1]).is_ok());
    REQUIRE((*s)->apply_committed().is_ok());
  }
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 2);
}

TEST_CASE("recovery R4: a new segment without a valid header is removed", "[store][recovery]") {
  Fixture f;
  f.run(2);
  SECTION("empty") { spit(f.seg(2), ""); }
  SECTION("garbage") { spit(f.seg(2), block_bytes(4, 5000)); }
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 2);
  CHECK(!fs::exists(f.seg(2)));
}

TEST_CASE("recovery R5: committed but unapplied RPs are re-applied", "[store][recovery]") {
  Fixture f;
  f.run(3, /*apply=*/false);
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 3);
}

TEST_CASE("recovery R6: a missing or corrupt state file is rebuilt from the journal",
          "[store][recovery]") {
  Fixture f;
  f.run(3);
  SECTION("missing") { fs::remove(f.gdir() + "/state"); }
  SECTION("corrupt") { flip_byte(f.gdir() + "/state", 17); }
  spit(f.gdir() + "/replica/a.img", block_bytes(1, 1000));  // the images are not trusted
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 3);
}

TEST_CASE("recovery R13: a missing or mis-sized image of the applied RP is rebuilt",
          "[store][recovery]") {
  Fixture f;
  f.run(3);
  SECTION("missing") { fs::remove(f.gdir() + "/replica/a.img"); }
  SECTION("truncated") { fs::resize_file(f.gdir() + "/replica/a.img", 4096); }
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 3);
}

TEST_CASE("recovery R7: a state file ahead of the journal refuses to open", "[store][recovery]") {
  Fixture ahead;
  ahead.run(3);
  Fixture f;
  f.run(1);
  fs::copy_file(ahead.gdir() + "/state", f.gdir() + "/state",
                fs::copy_options::overwrite_existing);
  auto s = f.reopen();
  REQUIRE(!s.is_ok());
  CHECK(s.status().code() == Errc::corrupt);
  CHECK(s.status().message().find("(R7)") != std::string::npos);
}

TEST_CASE("recovery R8: a segment of another group refuses to open", "[store][recovery]") {
  Fixture f;
  f.run(1);
  fs::rename(f.gdir(), f.opt.root + "/other");
  auto s = GroupStore::open(f.opt, "other", false);
  REQUIRE(!s.is_ok());
  CHECK(s.status().code() == Errc::corrupt);
  CHECK(s.status().message().find("(R8)") != std::string::npos);
}

TEST_CASE("recovery R9: a missing segment in the middle refuses to open", "[store][recovery]") {
  Fixture f;
  f.opt.segment_bytes = 5u << 20;
  {
    auto s = GroupStore::open(f.opt, "g", true);
    REQUIRE(s.is_ok());
    TestRp rp;
    rp.begin = {1, 0, 1, 0, {disk("d", 16u << 20, true)}};
    for (std::uint64_t i = 0; i < 160; ++i)
      rp.blocks.push_back({0, i * 65536, 65536, RecordKind::data, RecordCodec::none, i});
    REQUIRE(feed_rp(**s, rp).is_ok());
  }
  REQUIRE(fs::exists(f.seg(3)));
  fs::remove(f.seg(2));
  auto s = f.reopen();
  REQUIRE(!s.is_ok());
  CHECK(s.status().code() == Errc::corrupt);
  CHECK(s.status().message().find("(R9)") != std::string::npos);
}

TEST_CASE("recovery R10: a left-over state.tmp is removed", "[store][recovery]") {
  Fixture f;
  f.run(2);
  spit(f.gdir() + "/state.tmp", "half a state");
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 2);
  CHECK(!fs::exists(f.gdir() + "/state.tmp"));
}

TEST_CASE("recovery R12: a fresh group starts empty", "[store][recovery]") {
  Fixture f;
  auto s = GroupStore::open(f.opt, "g", true);
  REQUIRE(s.is_ok());
  CHECK((*s)->last_committed_rp() == 0);
  CHECK((*s)->points().empty());
  CHECK(fs::exists(f.gdir() + "/state"));
}

TEST_CASE("corrupted bytes anywhere in a segment are detected, never applied",
          "[store][recovery]") {
  Fixture f;
  f.run(3);
  std::string pristine = slurp(f.seg(1));
  std::string state = slurp(f.gdir() + "/state");
  int tried = 0, refused = 0, harmless = 0;
  auto t0 = std::time(nullptr);
  const std::uint64_t step = long_mode() ? 7 : 97;  // a long run flips many more bytes
  for (std::uint64_t off = 0; off < pristine.size(); off += step) {
    std::string bad = pristine;
    bad[off] = static_cast<char>(bad[off] ^ 0x01);
    spit(f.seg(1), bad);
    spit(f.gdir() + "/state", state);
    ++tried;
    auto s = f.reopen();
    if (!s.is_ok()) {
      CHECK(s.status().code() == Errc::corrupt);
      ++refused;
      continue;
    }
    // Opened: the flip hit bytes no check covers (padding after a commit). All data intact.
    REQUIRE((*s)->last_committed_rp() == 3);
    for (std::uint64_t r = 1; r <= 3; ++r)
      REQUIRE(check_rp(**s, f.model, r, f.opt.root, f.dir.path(), r == 3) == "");
    ++harmless;
  }
  std::printf("store corruption sweep: %d flips, %d refused as corrupt, %d in unchecked "
              "padding, 0 applied\n", tried, refused, harmless);
  write_figure("store-corruption-sweep",
               std::to_string(tried) + " journal bytes flipped, " + std::to_string(refused) +
                   " refused as corrupt, " + std::to_string(harmless) +
                   " in unchecked padding, 0 applied",
               "\"seed\": null, \"iterations\": " + std::to_string(tried) +
                   ", \"faults_injected\": " + std::to_string(tried) + ", \"refused\": " +
                   std::to_string(refused) + ", \"harmless\": " + std::to_string(harmless) +
                   ", \"violations\": 0, \"duration_s\": " +
                   std::to_string(std::time(nullptr) - t0));
  CHECK(refused > 0);
}
