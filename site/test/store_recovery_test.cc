// Recovery decision table (docs/journal-format.md): one test per labelled case, on real files.
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <sstream>

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "../src/journal.h"
#include "ferry/base/bytes.h"
#include "ferry/site/faulty_storage.h"
#include "ferry/site/store.h"
#include "journal_test_util.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;
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
  // Every RP 1..last offered and byte-identical; the images equal RP last_applied_rp()
  // (default retention: 1 once anything was applied, 0 before).
  void expect_all(GroupStore& s, std::uint64_t last) {
    REQUIRE(s.last_committed_rp() == last);
    REQUIRE(s.last_applied_rp() <= 1);
    std::vector<std::uint64_t> all;
    for (std::uint64_t r = 1; r <= last; ++r) all.push_back(r);
    CHECK(check_store(s, model, opt.root, dir.path(), all) == "");
  }
  // The state file's base RP and compaction target (catalog.h: bytes 16 and 24).
  std::uint64_t state_base() const { return load_le64(slurp(gdir() + "/state").data() + 16); }
  std::uint64_t state_target() const { return load_le64(slurp(gdir() + "/state").data() + 24); }
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

// R5: a compaction cut short (the state names a target) is redone at the next open. The
// base image is written only in ranges the RPs (base, target] cover, so redoing it over a
// partly written image gives the target's bytes. Here the compaction to RP 3 fails part way
// (EIO or ENOSPC on an image, after the decision was written), as a crash would leave it.
TEST_CASE("recovery R5: a compaction cut short is redone at open", "[store][recovery]") {
  Fixture f;
  f.run(3);
  REQUIRE(f.state_base() == 1);
  int err = EIO;
  std::uint64_t nth = 1;
  std::string file = "replica/a.img";
  SECTION("EIO at the first write of a.img") {}
  SECTION("EIO at the third write of a.img") { nth = 3; }
  SECTION("ENOSPC at the second write of b.img") {
    err = ENOSPC;
    nth = 2;
    file = "replica/b.img";
  }
  FaultPlan plan;
  plan.rules.push_back(FaultRule{FaultOp::write, err, nth, true, file});
  StoreOptions faulty = f.opt;
  faulty.storage = FaultyStorage::create(real_storage(), 5, plan);
  {
    auto s = GroupStore::open(faulty, "g", false);
    REQUIRE(s.is_ok());
    CHECK(!(*s)->prune(keep_newest_only(), 0, false).is_ok());
    CHECK(!(*s)->apply_error().is_ok());
  }
  REQUIRE(f.state_base() == 1);
  REQUIRE(f.state_target() == 3);
  std::ostringstream log;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log);
  spdlog::default_logger()->sinks().push_back(sink);
  auto s = f.reopen();
  spdlog::default_logger()->sinks().pop_back();
  REQUIRE(s.is_ok());
  CHECK(log.str().find("compaction of the replica to RP 3 was cut short; redoing it (R5)") !=
        std::string::npos);
  CHECK((*s)->apply_error().is_ok());
  CHECK((*s)->last_applied_rp() == 3);
  CHECK(f.state_target() == 0);
  CHECK(check_store(**s, f.model, f.opt.root, f.dir.path(), {3}) == "");
  for (std::uint64_t r : {1, 2}) {
    Status gone = (*s)->restore(r, "a", f.dir.path() + "/x.img");
    CHECK(gone.code() == Errc::not_found);
    CHECK(gone.message().find("pruned by retention") != std::string::npos);
  }
}

// R6: a missing or corrupt state file is written anew (base 0, images removed: nothing says
// which RP they hold) while the journal still starts at RP 0.
TEST_CASE("recovery R6: a missing or corrupt state file is written anew while the journal "
          "starts at RP 0", "[store][recovery]") {
  Fixture f;
  f.run(3);
  REQUIRE(f.state_base() == 1);
  SECTION("missing") { fs::remove(f.gdir() + "/state"); }
  SECTION("corrupt") { flip_byte(f.gdir() + "/state", 17); }
  spit(f.gdir() + "/replica/a.img", block_bytes(1, 1000));  // the images are not trusted
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  CHECK((*s)->last_applied_rp() == 0);
  CHECK(!fs::exists(f.gdir() + "/replica/a.img"));
  CHECK(!fs::exists(f.gdir() + "/replica/b.img"));
  f.expect_all(**s, 3);
  REQUIRE((*s)->apply_committed().is_ok());  // the next compaction writes the images again
  CHECK((*s)->last_applied_rp() == 1);
  f.expect_all(**s, 3);
}

// R6, the other half: once the journal no longer starts at RP 0 (the segments of compacted
// RPs removed), only the state file says which RP the images hold: refused, evidence kept.
// The journal is made to start at RP 2's begin record: RP 1 alone in a (version 1) segment,
// which is then removed as pruning would once RP 1 is below the base.
TEST_CASE("recovery R6: a missing or corrupt state file refuses the group once the journal "
          "starts later", "[store][recovery]") {
  Fixture f;
  f.run(1);
  make_segment_v1(f.seg(1));
  f.opt.retention = keep_newest_only();
  f.run(3);
  REQUIRE(f.state_base() == 3);
  REQUIRE(segment_records(slurp(f.seg(2))).front().h.type == jr::RecordType::rp_begin);
  REQUIRE(segment_records(slurp(f.seg(2))).front().h.rp_id == 2);
  fs::remove(f.seg(1));  // what pruning removes: only RP 1, below the base
  {
    auto s = f.reopen();  // the store is sound this way
    REQUIRE(s.is_ok());
    CHECK(check_store(**s, f.model, f.opt.root, f.dir.path(), {3}) == "");
  }
  const std::string img = slurp(f.gdir() + "/replica/a.img");
  SECTION("missing") { fs::remove(f.gdir() + "/state"); }
  SECTION("corrupt") { flip_byte(f.gdir() + "/state", 17); }
  auto s = f.reopen();
  REQUIRE(!s.is_ok());
  INFO(s.status().to_string());
  CHECK(s.status().code() == Errc::corrupt);
  CHECK(s.status().message().find("(R6)") != std::string::npos);
  CHECK(s.status().message().find("state file " + f.gdir() + "/state") != std::string::npos);
  CHECK(slurp(f.gdir() + "/replica/a.img") == img);  // the evidence stays
}

// R5 once the journal no longer starts at RP 0 (the normal state of a store that has run
// for a while): nothing but the state file says which RP the images hold, so the state a
// compaction leaves mid-way (base, target, pruned list) must decode, and the open must redo
// the compaction whatever sizes the images already have. The journal is made to start at
// RP 2 as in the R6 test above; the compaction from RP 3 to RP 5 fails part way.
TEST_CASE("recovery R5: a compaction cut short is redone at open once the journal starts later",
          "[store][recovery]") {
  Fixture f;
  f.run(1);
  make_segment_v1(f.seg(1));
  f.opt.retention = keep_newest_only();
  f.run(3);
  REQUIRE(f.state_base() == 3);
  REQUIRE(!fs::exists(f.seg(1)));
  TestRp rp4;
  rp4.begin = {4, 3, 4000, 0, {disk("a", 45000, false), disk("b", 8192, false)}};
  rp4.blocks = {{0, 12288, 8192, RecordKind::data, RecordCodec::none, 41}};
  TestRp rp5;
  rp5.begin = {5, 4, 5000, 0, {disk("a", 50000, false), disk("b", 4096, false)}};
  rp5.blocks = {{0, 45000, 5000, RecordKind::data, RecordCodec::zstd, 51}};
  f.rps.push_back(rp4);
  f.rps.push_back(rp5);
  f.model = model_of(f.rps);
  f.opt.retention = RetentionPolicy{};  // the default while RP 4 and 5 arrive: none pruned
  {
    auto s = f.reopen();
    REQUIRE(s.is_ok());
    REQUIRE(feed_rp(**s, rp4).is_ok());
    REQUIRE(feed_rp(**s, rp5).is_ok());
    REQUIRE((*s)->apply_committed().is_ok());
    REQUIRE((*s)->last_applied_rp() == 3);
  }
  // Writes to a.img in the compaction to RP 5: RP 4's truncate(45000) and record, then RP 5's
  // truncate(50000) and record. The fault hits before any resize, or after a.img grew.
  std::uint64_t nth = 1;
  SECTION("before a.img is written") {}
  SECTION("after a.img grew to RP 5's size") { nth = 4; }
  FaultPlan plan;
  plan.rules.push_back(FaultRule{FaultOp::write, EIO, nth, true, "replica/a.img"});
  StoreOptions faulty = f.opt;
  faulty.storage = FaultyStorage::create(real_storage(), 5, plan);
  {
    auto s = GroupStore::open(faulty, "g", false);
    REQUIRE(s.is_ok());
    CHECK(!(*s)->prune(keep_newest_only(), 0, false).is_ok());
  }
  REQUIRE(f.state_target() == 5);
  auto s = f.reopen();
  INFO(s.status().to_string());
  REQUIRE(s.is_ok());
  CHECK((*s)->last_applied_rp() == 5);
  CHECK(check_store(**s, f.model, f.opt.root, f.dir.path(), {5}) == "");
}

// R13: the images of the base RP hold every byte no later record covers; one missing or of
// the wrong size is data lost, which nothing in the store can rebuild: refused, naming it.
TEST_CASE("recovery R13: a missing or mis-sized image of the base RP refuses the group",
          "[store][recovery]") {
  Fixture f;
  f.run(3);
  REQUIRE(f.state_base() == 1);
  std::string what;
  SECTION("missing") {
    fs::remove(f.gdir() + "/replica/a.img");
    what = "is missing";
  }
  SECTION("truncated") {
    fs::resize_file(f.gdir() + "/replica/a.img", 4096);
    what = "has 4096 bytes where disk a has 40000";
  }
  auto s = f.reopen();
  REQUIRE(!s.is_ok());
  CHECK(s.status().code() == Errc::corrupt);
  CHECK(s.status().message().find("(R13)") != std::string::npos);
  CHECK(s.status().message().find(f.gdir() + "/replica/a.img of RP 1 " + what) !=
        std::string::npos);
}

// R13 with base 0: no image is read, so stray images are simply removed.
TEST_CASE("recovery R13: with base 0 stray images are removed", "[store][recovery]") {
  Fixture f;
  f.run(3, /*apply=*/false);
  REQUIRE(f.state_base() == 0);
  spit(f.gdir() + "/replica/a.img", block_bytes(2, 40000));
  spit(f.gdir() + "/replica/zz.img", block_bytes(3, 100));
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  CHECK(!fs::exists(f.gdir() + "/replica/a.img"));
  CHECK(!fs::exists(f.gdir() + "/replica/zz.img"));
  CHECK((*s)->last_applied_rp() == 0);
  f.expect_all(**s, 3);
}

// R19: a compaction that fails (EIO, ENOSPC, EFBIG on the replica) leaves the store usable:
// RPs still commit (durable in the journal), apply_error() says why, points, restore and
// resync digests read through the view, the state file names the target (so no open takes
// the half-written image for any RP), and each apply_committed() retries.
TEST_CASE("recovery R19: a failed compaction leaves the store usable, retried by the next apply",
          "[store][recovery]") {
  Fixture f;
  f.run(3);
  TestRp rp4;
  rp4.begin = {4, 3, 4000, 0, {disk("a", 45000, false), disk("b", 8192, false)}};
  rp4.blocks = {{0, 12288, 8192, RecordKind::data, RecordCodec::none, 41},
                {1, 0, 4096, RecordKind::data, RecordCodec::zstd, 42}};
  TestRp rp5;
  rp5.begin = {5, 4, 5000, 0, {disk("a", 45000, false), disk("b", 8192, false)}};
  rp5.blocks = {{0, 0, 4096, RecordKind::zero, RecordCodec::none, 0},
                {0, 20000, 3000, RecordKind::data, RecordCodec::zstd, 51}};
  f.rps.push_back(rp4);
  f.rps.push_back(rp5);
  f.model = model_of(f.rps);
  // Writes to a.img fail twice (the compaction at RP 4's apply, then its retry at RP 5's);
  // then the fault is gone.
  FaultPlan plan;
  plan.rules.push_back(FaultRule{FaultOp::write, EIO, 2, false, "replica/a.img"});
  plan.rules.push_back(FaultRule{FaultOp::write, EIO, 3, false, "replica/a.img"});
  StoreOptions faulty = f.opt;
  faulty.storage = FaultyStorage::create(real_storage(), 19, plan);
  faulty.retention = keep_newest_only();
  auto s = GroupStore::open(faulty, "g", false);
  REQUIRE(s.is_ok());
  GroupStore& store = **s;
  REQUIRE(store.apply_error().is_ok());
  REQUIRE(feed_rp(store, rp4).is_ok());
  Status a = store.apply_committed();
  CHECK(!a.is_ok());
  CHECK(store.apply_error().code() == Errc::io);
  CHECK(store.apply_error().message().find("injected fault") != std::string::npos);
  CHECK(store.last_committed_rp() == 4);
  CHECK(store.last_applied_rp() == 1);
  CHECK(f.state_base() == 1);
  CHECK(f.state_target() == 4);  // nothing may take the half-written image for an RP
  CHECK(check_store(store, f.model, f.opt.root, f.dir.path(), {4}) == "");
  // RP 1 is being compacted away and its image is half written: it must not be offered, or
  // if it is, it must read right.
  for (const auto& p : store.points())
    CHECK(check_rp(store, f.model, p.rp_id, f.opt.root, f.dir.path(), false) == "");

  // Resync digests come through the view: RP 4 exactly, though the image is half written.
  auto digests = store.replica_digests("a", 0, 4096, 10);
  REQUIRE(digests.is_ok());
  const std::string& a4 = f.model.at(4).at("a");
  for (std::uint32_t i = 0; i < 10; ++i)
    CHECK((*digests)[i] == xxh3_128(a4.data() + i * 4096, 4096));

  // A new RP commits while the compaction is pending; the retry fails once more.
  REQUIRE(feed_rp(store, rp5).is_ok());
  CHECK(!store.apply_committed().is_ok());
  CHECK(!store.apply_error().is_ok());
  CHECK(store.last_committed_rp() == 5);
  CHECK(f.state_target() != 0);
  CHECK(check_store(store, f.model, f.opt.root, f.dir.path()) == "");
  CHECK(check_rp(store, f.model, 5, f.opt.root, f.dir.path(), false) == "");

  // The fault is gone: the retry finishes the compaction and moves on to RP 5.
  REQUIRE(store.apply_committed().is_ok());
  CHECK(store.apply_error().is_ok());
  CHECK(f.state_target() == 0);
  CHECK(store.last_applied_rp() == 5);
  CHECK(check_store(store, f.model, f.opt.root, f.dir.path(), {5}) == "");
}

// R18: Linux marks pages whose writeback failed as clean and keeps returning their new
// bytes, so a store re-opened in the same process after a failed fdatasync used to read the
// commit record of the RP the source was told had failed, count it, and build on it; the
// next power cut then left a hole (RP 2's commit lost under RP 3's: R2, the group refused).
TEST_CASE("recovery R18: the RP whose commit sync failed is never trusted after a re-open",
          "[store][recovery]") {
  TempDir dir;
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  auto rps = small_run();
  Model model = model_of(rps);
  FaultPlan plan;
  plan.track_unsynced = true;
  plan.skip_inner_sync = true;
  // Journal syncs: RP 1 records, RP 1 commit, RP 2 records, RP 2 commit (the 4th) fails.
  plan.rules.push_back(FaultRule{FaultOp::sync, EIO, 4, false, ".seg"});
  auto twin = FaultyStorage::create(real_storage(), 7, plan);
  opt.storage = twin;
  {
    auto s = GroupStore::open(opt, "g", true);
    REQUIRE(s.is_ok());
    REQUIRE(feed_rp(**s, rps[0]).is_ok());
    REQUIRE((*s)->apply_committed().is_ok());
    auto c = feed_rp(**s, rps[1]);
    REQUIRE(!c.is_ok());
    CHECK(c.status().data_lost());
  }  // the receiver drops the failed store and re-opens it at the next session
  {
    auto s = GroupStore::open(opt, "g", false);
    REQUIRE(s.is_ok());
    CHECK((*s)->last_committed_rp() == 1);
    CHECK((*s)->last_applied_rp() == 1);  // RP 1 compacted at its apply (default retention)
    REQUIRE(feed_rp(**s, rps[1]).is_ok());  // the source sends RP 2 again
    REQUIRE(feed_rp(**s, rps[2]).is_ok());
    REQUIRE((*s)->apply_committed().is_ok());
  }
  REQUIRE(twin->power_cut(0, CutMode::drop).is_ok());
  opt.storage = nullptr;
  auto s = GroupStore::open(opt, "g", false);
  REQUIRE(s.is_ok());  // no hole
  REQUIRE((*s)->last_committed_rp() == 3);
  REQUIRE((*s)->last_applied_rp() == 1);
  CHECK(check_store(**s, model, opt.root, dir.path(), {1, 2, 3}) == "");
}

// R18 without the process's memory: a receiver restarted (no reboot) finds the marker.
TEST_CASE("recovery R18: the distrust marker survives a restart; read-only views honour it",
          "[store][recovery]") {
  TempDir dir;
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  auto rps = small_run();
  FaultPlan plan;
  plan.rules.push_back(FaultRule{FaultOp::sync, EIO, 4, false, ".seg"});  // RP 2's commit
  opt.storage = FaultyStorage::create(real_storage(), 7, plan);
  {
    auto s = GroupStore::open(opt, "g", true);
    REQUIRE(s.is_ok());
    REQUIRE(feed_rp(**s, rps[0]).is_ok());
    REQUIRE(!feed_rp(**s, rps[1]).is_ok());
  }
  REQUIRE(fs::exists(opt.root + "/g/distrust"));
  // Another directory (another inode): only the marker tells what is not trusted.
  const std::string moved = dir.path() + "/moved";
  fs::copy(opt.root, moved, fs::copy_options::recursive);
  fs::remove(moved + "/g/LOCK");
  auto listed = list_points(moved, "g");
  REQUIRE(listed.is_ok());
  CHECK(listed->size() == 1);
  SECTION("a corrupt marker refuses the group") {
    flip_byte(moved + "/g/distrust", 20);
    StoreOptions m;
    m.root = moved;
    auto s = GroupStore::open(m, "g", false);
    REQUIRE(!s.is_ok());
    CHECK(s.status().code() == Errc::corrupt);
    CHECK(s.status().message().find("(R18)") != std::string::npos);
  }
  SECTION("a cut that fails fails the open, which is retried") {
    StoreOptions m;
    m.root = moved;
    FaultPlan cut_fails;
    cut_fails.rules.push_back(FaultRule{FaultOp::write, EIO, 1, false, ".seg"});
    m.storage = FaultyStorage::create(real_storage(), 8, cut_fails);
    auto s = GroupStore::open(m, "g", false);
    REQUIRE(!s.is_ok());
    CHECK(s.status().retryable());
    CHECK(s.status().message().find("(R18)") != std::string::npos);
    CHECK(fs::exists(moved + "/g/distrust"));
    m.storage = nullptr;
    auto again = GroupStore::open(m, "g", false);
    REQUIRE(again.is_ok());
    CHECK((*again)->last_committed_rp() == 1);
    CHECK(!fs::exists(moved + "/g/distrust"));
    REQUIRE(feed_rp(**again, rps[1]).is_ok());
  }
  SECTION("the open cuts and removes the marker") {
    StoreOptions m;
    m.root = moved;
    {
      auto s = GroupStore::open(m, "g", false);
      REQUIRE(s.is_ok());
      CHECK((*s)->last_committed_rp() == 1);
      CHECK(!fs::exists(moved + "/g/distrust"));
      REQUIRE(feed_rp(**s, rps[1]).is_ok());
    }
    auto s = GroupStore::open(m, "g", false);  // the cut is not repeated
    REQUIRE(s.is_ok());
    CHECK((*s)->last_committed_rp() == 2);
  }
}

TEST_CASE("recovery R7: a state file ahead of the journal refuses to open", "[store][recovery]") {
  Fixture ahead;
  ahead.opt.retention = keep_newest_only();
  ahead.run(3);
  REQUIRE(ahead.state_base() == 3);
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

TEST_CASE("journal v2: every commit record is stored twice, in separate aligned blocks",
          "[store][recovery]") {
  Fixture f;
  f.run(3);
  auto commits = records_of(f.seg(1), jr::RecordType::rp_commit);
  auto mirrors = records_of(f.seg(1), jr::RecordType::rp_commit_mirror);
  REQUIRE(commits.size() == 3);
  REQUIRE(mirrors.size() == 3);
  std::string seg = slurp(f.seg(1));
  for (std::size_t i = 0; i < 3; ++i) {
    const auto& c = commits[i];
    const auto& m = mirrors[i];
    CHECK(c.offset % jr::kBlockAlignBytes == 0);
    CHECK(m.offset == c.offset + align_block(c.h.total_bytes));
    CHECK(m.h.lsn == c.h.lsn);
    CHECK(m.h.rp_id == c.h.rp_id);
    CHECK(m.h.offset_bytes == jr::record_position(1, c.offset));
    CHECK(seg.compare(m.offset + jr::kRecordHeaderBytes, m.h.total_bytes - jr::kRecordHeaderBytes,
                      seg, c.offset + jr::kRecordHeaderBytes,
                      c.h.total_bytes - jr::kRecordHeaderBytes) == 0);
  }
  CHECK(load_le32(seg.data() + 8) == 2);  // segment header: version 2
}

// The last RP is committed (and maybe acknowledged) but not applied yet: the state file says
// RP 2, so nothing but the commit record proves RP 3. Before version 2 a damaged last commit
// record read as a torn tail (R1) and RP 3 was cut silently.
TEST_CASE("recovery R14: a damaged copy of the last commit record loses nothing",
          "[store][recovery]") {
  Fixture f;
  f.run(2);
  f.run(3, /*apply=*/false);
  auto c = records_of(f.seg(1), jr::RecordType::rp_commit).back();
  auto m = records_of(f.seg(1), jr::RecordType::rp_commit_mirror).back();
  REQUIRE(c.h.rp_id == 3);
  REQUIRE(m.h.rp_id == 3);
  SECTION("commit record header") { flip_byte(f.seg(1), c.offset + 20); }
  SECTION("commit record magic") { flip_byte(f.seg(1), c.offset); }
  SECTION("commit record payload") { flip_byte(f.seg(1), c.offset + jr::kRecordHeaderBytes + 9); }
  SECTION("commit record block zeroed") {
    std::string seg = slurp(f.seg(1));
    seg.replace(c.offset, jr::kBlockAlignBytes, jr::kBlockAlignBytes, '\0');
    spit(f.seg(1), seg);
  }
  SECTION("mirror header") { flip_byte(f.seg(1), m.offset + 30); }
  SECTION("mirror payload") { flip_byte(f.seg(1), m.offset + jr::kRecordHeaderBytes + 3); }
  SECTION("mirror cut off (the file ends before it)") { fs::resize_file(f.seg(1), m.offset); }
  {
    auto s = f.reopen();
    REQUIRE(s.is_ok());
    f.expect_all(**s, 3);
  }
  // Appends resume after both copies; the next RP commits and everything survives a reopen.
  TestRp rp4;
  rp4.begin = {4, 3, 4000, 0, {disk("a", 45000, false), disk("b", 8192, false)}};
  rp4.blocks = {{0, 8192, 4096, RecordKind::data, RecordCodec::none, 41}};
  f.model.apply(rp4);
  {
    auto s = f.reopen();
    REQUIRE(s.is_ok());
    REQUIRE(feed_rp(**s, rp4).is_ok());
    REQUIRE((*s)->apply_committed().is_ok());
  }
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 4);
}

TEST_CASE("recovery R14: a damaged older commit record no longer refuses the group",
          "[store][recovery]") {
  Fixture f;
  f.run(3);
  auto c = records_of(f.seg(1), jr::RecordType::rp_commit)[1];
  REQUIRE(c.h.rp_id == 2);
  flip_byte(f.seg(1), c.offset + jr::kRecordHeaderBytes + 1);
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 3);
}

TEST_CASE("recovery R15: both copies of the last commit record damaged refuse, loudly",
          "[store][recovery]") {
  Fixture f;
  f.run(2);
  f.run(3, /*apply=*/false);
  auto c = records_of(f.seg(1), jr::RecordType::rp_commit).back();
  auto m = records_of(f.seg(1), jr::RecordType::rp_commit_mirror).back();
  REQUIRE(c.h.rp_id == 3);
  std::uint64_t size = fs::file_size(f.seg(1));
  SECTION("both headers") {
    flip_byte(f.seg(1), c.offset + 40);
    flip_byte(f.seg(1), m.offset + 50);
  }
  SECTION("both payloads") {
    flip_byte(f.seg(1), c.offset + jr::kRecordHeaderBytes + 2);
    flip_byte(f.seg(1), m.offset + jr::kRecordHeaderBytes + 2);
  }
  SECTION("commit payload, mirror zeroed") {
    flip_byte(f.seg(1), c.offset + jr::kRecordHeaderBytes + 2);
    std::string seg = slurp(f.seg(1));
    seg.replace(m.offset, jr::kBlockAlignBytes, jr::kBlockAlignBytes, '\0');
    spit(f.seg(1), seg);
  }
  auto s = f.reopen();
  REQUIRE(!s.is_ok());
  CHECK(s.status().code() == Errc::corrupt);
  CHECK(s.status().message().find("(R15)") != std::string::npos);
  CHECK(s.status().message().find("0000000000000001.seg offset " + std::to_string(c.offset)) !=
        std::string::npos);
  CHECK(fs::file_size(f.seg(1)) == size);  // nothing cut: the evidence stays
}

TEST_CASE("recovery R1: a commit write torn before its sync is a torn tail, not R15",
          "[store][recovery]") {
  Fixture f;
  f.run(2);
  f.run(3, /*apply=*/false);
  auto c = records_of(f.seg(1), jr::RecordType::rp_commit).back();
  // As a power cut leaves it: the sectors of both copies never reached the disk.
  std::string seg = slurp(f.seg(1));
  std::uint64_t mirror_end = c.offset + 2 * align_block(c.h.total_bytes);
  seg.replace(c.offset, mirror_end - c.offset, mirror_end - c.offset, '\0');
  spit(f.seg(1), seg);
  auto m2 = records_of(f.seg(1), jr::RecordType::rp_commit_mirror).back();  // RP 2: 3 is zeroed
  REQUIRE(m2.h.rp_id == 2);
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 2);
  CHECK(fs::file_size(f.seg(1)) == m2.offset + align_block(m2.h.total_bytes));  // RP 3 cut (R3)
}

// A journal of version 1 (one commit copy, a padding record after it) is read, and new
// records go to a new version-2 segment. Built from a version-2 journal: each mirror becomes
// a version-1 padding record of the same size, the segment header says version 1.
TEST_CASE("journal v1 segments are still read; appends continue in a v2 segment",
          "[store][recovery]") {
  Fixture f;
  f.run(2);
  std::string seg = slurp(f.seg(1));
  std::uint64_t group_id = load_le64(seg.data() + 16);
  jr::encode_segment_header(jr::SegmentHeader{group_id, 1, 1}, seg.data());
  for (const auto& m : records_of(f.seg(1), jr::RecordType::rp_commit_mirror)) {
    std::uint64_t bytes = align_block(m.h.total_bytes);
    std::string zeros(bytes - jr::kRecordHeaderBytes, '\0');
    jr::RecordHeader pad;
    pad.type = jr::RecordType::padding;
    pad.total_bytes = static_cast<std::uint32_t>(bytes);
    pad.payload_checksum = xxh3_64(zeros.data(), zeros.size());
    pad.position = jr::record_position(1, m.offset);
    seg.replace(m.offset, bytes, std::string(jr::kRecordHeaderBytes, '\0') + zeros);
    jr::encode_record_header(pad, seg.data() + m.offset);
  }
  spit(f.seg(1), seg);
  {
    auto s = f.reopen();
    REQUIRE(s.is_ok());
    f.expect_all(**s, 2);
    REQUIRE(feed_rp(**s, f.rps[2]).is_ok());
    REQUIRE((*s)->apply_committed().is_ok());
  }
  REQUIRE(fs::exists(f.seg(2)));
  CHECK(load_le32(slurp(f.seg(1)).data() + 8) == 1);
  CHECK(load_le32(slurp(f.seg(2)).data() + 8) == 2);
  CHECK(records_of(f.seg(2), jr::RecordType::rp_commit_mirror).size() == 1);
  auto s = f.reopen();
  REQUIRE(s.is_ok());
  f.expect_all(**s, 3);
}

TEST_CASE("a journal of an unknown version refuses to open, naming the version",
          "[store][recovery]") {
  Fixture f;
  f.run(1);
  std::string seg = slurp(f.seg(1));
  seg[8] = 3;  // version 3, header checksum recomputed: a newer build wrote it
  std::uint64_t sum = xxh3_64(seg.data(), 32);
  for (int i = 0; i < 8; ++i) seg[32 + i] = static_cast<char>(sum >> (8 * i));
  spit(f.seg(1), seg);
  auto s = f.reopen();
  REQUIRE(!s.is_ok());
  CHECK(s.status().code() == Errc::unsupported);
  CHECK(s.status().message().find("journal version 3") != std::string::npos);
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
  int tried = 0, refused = 0, harmless = 0, other_copy = 0;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> copies;  // [begin, end) of commit copies
  for (const auto& r : segment_records(pristine))
    if (r.h.type == jr::RecordType::rp_commit || r.h.type == jr::RecordType::rp_commit_mirror)
      copies.emplace_back(r.offset, r.offset + r.h.total_bytes);
  REQUIRE(copies.size() == 6);
  auto in_copy = [&](std::uint64_t off) {
    for (auto [b, e] : copies)
      if (off >= b && off < e) return true;
    return false;
  };
  auto t0 = std::time(nullptr);
  // A long run flips many more bytes; the sanitizer pass (FERRY_SANITIZE) fewer.
  const char* sanitize = std::getenv("FERRY_SANITIZE");
  const bool fewer = sanitize != nullptr && *sanitize != '\0' && std::string(sanitize) != "0";
  const std::uint64_t step = long_mode() ? 7 : fewer ? 389 : 97;
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
    // Opened: the flip hit one copy of a commit record (the other one commits the RP, R14)
    // or bytes no check covers (the zeros after a commit copy). All data intact.
    REQUIRE((*s)->last_committed_rp() == 3);
    REQUIRE(check_store(**s, f.model, f.opt.root, f.dir.path(), {1, 2, 3}) == "");
    ++(in_copy(off) ? other_copy : harmless);
  }
  std::printf("store corruption sweep: %d flips, %d refused as corrupt, %d in one commit copy "
              "(recovered from the other), %d in unchecked padding, 0 applied\n", tried,
              refused, other_copy, harmless);
  write_figure("store-corruption-sweep",
               std::to_string(tried) + " journal bytes flipped, " + std::to_string(refused) +
                   " refused as corrupt, " + std::to_string(other_copy) +
                   " in one commit copy (the other committed the RP), " +
                   std::to_string(harmless) + " in unchecked padding, 0 applied",
               "\"seed\": null, \"iterations\": " + std::to_string(tried) +
                   ", \"faults_injected\": " + std::to_string(tried) + ", \"refused\": " +
                   std::to_string(refused) + ", \"harmless\": " + std::to_string(harmless) +
                   ", \"recovered_from_other_copy\": " + std::to_string(other_copy) +
                   ", \"violations\": 0, \"duration_s\": " +
                   std::to_string(std::time(nullptr) - t0));
  CHECK(refused > 0);
}

TEST_CASE("journal: rp_begin payloads without identities (before issue 18) still decode", "[store]") {
  RpBeginInfo b = {7, 6, 123, 1, {disk("vda", 65536, false), disk("vdb", 4096, true)}};
  // The layout written before disk identities: the disks, nothing after them.
  std::string old;
  ByteWriter w(old);
  w.u64(7);
  w.u64(6);
  w.u64(123);
  w.u32(1);
  w.u16(2);
  w.str16("vda");
  w.u64(65536);
  w.u8(0);
  w.str16("vdb");
  w.u64(4096);
  w.u8(1);
  auto d = jr::decode_begin(old);
  REQUIRE(d.is_ok());
  CHECK(d->disks.size() == 2);
  CHECK(d->disks[0].identity == Hash128{});
  CHECK(d->source_name.empty());
  CHECK(d->disks[1].full);
  CHECK(jr::encode_begin(b).substr(0, old.size()) == old);  // the new tail only appends

  b.source_name = "host-a:/run/qsd.qmp";
  b.disks[0].resync = true;
  b.disks[0].identity = Hash128{5, 6};
  b.disks[1].identity = Hash128{7, 8};
  b.disks[1].identity_ephemeral = true;
  std::string now = jr::encode_begin(b);
  auto n = jr::decode_begin(now);
  REQUIRE(n.is_ok());
  CHECK(n->source_name == b.source_name);
  CHECK(n->disks[0].resync);
  CHECK(n->disks[0].identity == (Hash128{5, 6}));
  CHECK(n->disks[1].identity_ephemeral);
  CHECK_FALSE(jr::decode_begin(now.substr(0, now.size() - 1)).is_ok());
  std::string bad = now;
  bad[old.size()] = 3;  // an unknown tail version
  CHECK_FALSE(jr::decode_begin(bad).is_ok());

  // Tail version 2: the VM's definition after version 1's fields; written only when there is
  // one, so an RP without it keeps version 1's bytes.
  b.vm_config = "<domain type='qemu'><name>vm</name></domain>";
  std::string v2 = jr::encode_begin(b);
  CHECK(v2.size() == now.size() + 4 + b.vm_config.size());
  CHECK(v2[old.size()] == 2);
  auto m = jr::decode_begin(v2);
  REQUIRE(m.is_ok());
  CHECK(m->vm_config == b.vm_config);
  CHECK(m->source_name == b.source_name);
  CHECK(m->disks[1].identity_ephemeral);
  CHECK_FALSE(jr::decode_begin(v2.substr(0, v2.size() - 1)).is_ok());  // cut short
  CHECK_FALSE(jr::decode_begin(v2 + "x").is_ok());                      // trailing bytes
  std::string len = v2;  // a length over the limit: refused before anything is copied
  store_le32(len.data() + now.size(), kMaxVmConfigBytes + 1);
  CHECK_FALSE(jr::decode_begin(len).is_ok());
  store_le32(len.data() + now.size(), 0);  // empty: version 2 means there is one
  CHECK_FALSE(jr::decode_begin(len).is_ok());
  std::string v1 = v2.substr(0, now.size());  // version 2's tag over version 1's bytes
  CHECK_FALSE(jr::decode_begin(v1).is_ok());
}
