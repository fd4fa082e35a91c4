// The RP life cycle on real files: commit, apply, restore of every RP, divergence rules,
// names, the group lock, segment roll-over.
#include <catch2/catch.hpp>
#include <fcntl.h>

#include <filesystem>
#include <map>

#include "ferry/base/fd.h"
#include "ferry/site/faulty_storage.h"
#include "ferry/site/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;

namespace {

StoreOptions options_for(const TempDir& dir) {
  StoreOptions o;
  o.root = dir.path() + "/store";
  return o;
}


}  // namespace

TEST_CASE("store: RP life cycle, replica and restore of every RP byte-identical", "[store]") {
  TempDir dir;
  auto rps = life_cycle_rps();
  Model model = model_of(rps);
  StoreOptions opt = options_for(dir);
  {
    auto store = GroupStore::open(opt, "vm1", true);
    REQUIRE(store.is_ok());
    std::vector<std::uint64_t> offered;
    for (const auto& rp : rps) {
      auto info = feed_rp(**store, rp);
      REQUIRE(info.is_ok());
      CHECK(info->rp_id == rp.begin.rp_id);
      CHECK((*store)->last_committed_rp() == rp.begin.rp_id);
      REQUIRE((*store)->apply_committed().is_ok());
      // Default retention, fewer than 48 RPs: the first apply compacts RP 1 into the images,
      // which then stay at RP 1; the later RPs live in the journal.
      CHECK((*store)->last_applied_rp() == 1);
      offered.push_back(rp.begin.rp_id);
      CHECK(check_store(**store, model, opt.root, dir.path(), offered) == "");
    }
    auto points = (*store)->points();
    REQUIRE(points.size() == 5);
    CHECK(points[1].disks[0].zero_bytes == 65536 + 4096);
    CHECK(points[1].disks[0].changed_bytes == 65536 * 2 + 4096 * 2 + 1000);
    CHECK(points[0].disks[1].stored_bytes > 0);
    CHECK((*store)->replica_disks().at(0).size_bytes == 16 * 65536);
  }
  // Re-open: the index comes back from the journal, nothing to redo.
  auto store = GroupStore::open(opt, "vm1", false);
  REQUIRE(store.is_ok());
  CHECK((*store)->last_committed_rp() == 5);
  CHECK((*store)->last_applied_rp() == 1);
  CHECK(check_store(**store, model, opt.root, dir.path(), {1, 2, 3, 4, 5}) == "");
  // The read-only views agree, while the store is open (no lock needed).
  auto listed = list_points(opt.root, "vm1");
  REQUIRE(listed.is_ok());
  REQUIRE(listed->size() == 5);
  CHECK(listed->back().rp_id == 5);
  std::string out = dir.path() + "/ro.img";
  REQUIRE(restore_point(opt.root, "vm1", 2, "vdb", out).is_ok());
  CHECK(slurp(out) == model.at(2).at("vdb"));
  REQUIRE(restore_point(opt.root, "vm1", 1, "vda", out).is_ok());  // the base, from the image
  CHECK(slurp(out) == model.at(1).at("vda"));
}

// keep-last 1: every apply compacts the images forward to the newest RP (full RPs, resizes
// both ways and zero records written into an existing image), and only it stays offered.
TEST_CASE("store: RP life cycle with keep-last 1, images at the newest RP", "[store]") {
  TempDir dir;
  auto rps = life_cycle_rps();
  Model model = model_of(rps);
  StoreOptions opt = options_for(dir);
  opt.retention = keep_newest_only();
  {
    auto store = GroupStore::open(opt, "vm1", true);
    REQUIRE(store.is_ok());
    for (const auto& rp : rps) {
      REQUIRE(feed_rp(**store, rp).is_ok());
      REQUIRE((*store)->apply_committed().is_ok());
      CHECK((*store)->last_applied_rp() == rp.begin.rp_id);
      CHECK(check_rp(**store, model, rp.begin.rp_id, opt.root, dir.path(), true) == "");
      CHECK(check_store(**store, model, opt.root, dir.path(), {rp.begin.rp_id}) == "");
      if (rp.begin.rp_id > 1) {
        Status pruned = (*store)->restore(rp.begin.rp_id - 1, "vda", dir.path() + "/x.img");
        CHECK(pruned.code() == Errc::not_found);
        CHECK(pruned.message().find("pruned by retention") != std::string::npos);
      }
    }
  }
  auto store = GroupStore::open(opt, "vm1", false);
  REQUIRE(store.is_ok());
  CHECK((*store)->last_applied_rp() == 5);
  CHECK(check_store(**store, model, opt.root, dir.path(), {5}) == "");
}

TEST_CASE("store: restore output is sparse", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  TestRp rp;
  rp.begin = {1, 0, 1, 0, {disk("d", 64u << 20, true)}};
  rp.blocks = {{0, 32u << 20, 65536, RecordKind::data, RecordCodec::zstd, 5}};
  REQUIRE(feed_rp(**store, rp).is_ok());
  std::string out = dir.path() + "/sparse.img";
  REQUIRE((*store)->restore(1, "d", out).is_ok());
  struct stat st {};
  REQUIRE(::stat(out.c_str(), &st) == 0);
  CHECK(st.st_size == (64 << 20));
  CHECK(st.st_blocks * 512 < (1 << 20));
}

TEST_CASE("store: diverged base refused, naming the rule (C5)", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  auto rps = small_run();
  // An incremental first RP: nothing is held at base 0.
  RpBeginInfo inc = {1, 0, 1, 0, {disk("a", 4096, false)}};
  Status s = (*store)->begin_rp(inc);
  CHECK(s.code() == Errc::diverged);
  CHECK(s.message().find("C5.disk") != std::string::npos);
  REQUIRE(feed_rp(**store, rps[0]).is_ok());
  RpBeginInfo wrong_base = rps[1].begin;
  wrong_base.base_rp = 0;
  s = (*store)->begin_rp(wrong_base);
  CHECK(s.code() == Errc::diverged);
  CHECK(s.message().find("C5.base") != std::string::npos);
  RpBeginInfo old_id = rps[0].begin;
  old_id.base_rp = 1;
  s = (*store)->begin_rp(old_id);
  CHECK(s.code() == Errc::diverged);
  CHECK(s.message().find("C5.order") != std::string::npos);
  RpBeginInfo new_disk = rps[1].begin;
  new_disk.disks.push_back(disk("c", 4096, false));
  s = (*store)->begin_rp(new_disk);
  CHECK(s.code() == Errc::diverged);
  CHECK(s.message().find("C5.disk") != std::string::npos);
  // Refusals wrote nothing that matters: the right RP still goes through.
  REQUIRE(feed_rp(**store, rps[1]).is_ok());
  CHECK((*store)->last_committed_rp() == 2);
}

TEST_CASE("store: totals mismatch at commit discards the RP", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  auto rps = small_run();
  REQUIRE((*store)->begin_rp(rps[0].begin).is_ok());
  auto r = (*store)->commit_rp(1, 3, 100);
  CHECK(r.status().code() == Errc::protocol);
  CHECK((*store)->last_committed_rp() == 0);
  REQUIRE(feed_rp(**store, rps[0]).is_ok());  // a retry of the same RP works
  CHECK((*store)->last_committed_rp() == 1);
}

TEST_CASE("store: bad blocks refused before they reach the journal", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  REQUIRE((*store)->begin_rp({1, 0, 1, 0, {disk("a", 8192, true)}}).is_ok());
  std::string raw = block_bytes(1, 4096);
  BlockRecord b{1, 0, 0, RecordKind::data, RecordCodec::none, 6144, 4096,
                xxh3_128(raw.data(), raw.size()), raw};
  CHECK((*store)->append_block(b).code() == Errc::invalid_argument);  // past the end
  b.offset_bytes = 0;
  b.disk_index = 1;
  CHECK((*store)->append_block(b).code() == Errc::invalid_argument);  // no such disk
  b.disk_index = 0;
  b.payload = std::string_view(raw).substr(0, 100);
  CHECK((*store)->append_block(b).code() == Errc::invalid_argument);  // short raw payload
  b.payload = raw;
  CHECK((*store)->append_block(b).is_ok());
}

TEST_CASE("store: names, lock and not_found", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  for (const char* bad : {"", ".", "..", "a/b", "x y", "../etc"})
    CHECK(GroupStore::open(opt, bad, true).status().code() == Errc::invalid_argument);
  CHECK(GroupStore::open(opt, std::string(256, 'a'), true).status().code() ==
        Errc::invalid_argument);
  CHECK(GroupStore::open(opt, "missing", false).status().code() == Errc::not_found);
  auto store = GroupStore::open(opt, "g.1_x-y", true);
  REQUIRE(store.is_ok());
  auto second = GroupStore::open(opt, "g.1_x-y", false);
  CHECK(second.status().code() == Errc::busy);
  Status s = (*store)->begin_rp({1, 0, 1, 0, {disk("../evil", 4096, true)}});
  CHECK(s.code() == Errc::invalid_argument);
  auto rps = small_run();
  REQUIRE(feed_rp(**store, rps[0]).is_ok());
  s = (*store)->restore(7, "a", dir.path() + "/x");
  CHECK(s.code() == Errc::not_found);
  CHECK(s.message().find("RP 7") != std::string::npos);
  s = (*store)->restore(1, "zz", dir.path() + "/x");
  CHECK(s.code() == Errc::not_found);
  CHECK(s.message().find("zz") != std::string::npos);
  CHECK(list_points(opt.root, "nope").status().code() == Errc::not_found);
  CHECK(restore_point(opt.root, "g.1_x-y", 9, "a", dir.path() + "/x").code() == Errc::not_found);
  store->reset();
  CHECK(GroupStore::open(opt, "g.1_x-y", false).is_ok());  // the lock went with the store
}

TEST_CASE("store: journal rolls over segments and every RP restores", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  opt.segment_bytes = 5u << 20;
  opt.max_inflight_write_bytes = 1u << 20;  // below the floor: buffers are raised to it
  std::vector<TestRp> rps(3);
  std::uint64_t base = 0;
  for (std::uint64_t r = 0; r < 3; ++r) {
    rps[r].begin = {r + 1, base, r, 0, {disk("d", 8u << 20, r == 0)}};
    for (std::uint64_t i = 0; i < 40; ++i)
      rps[r].blocks.push_back({0, ((i * 7 + r) % 128) * 65536, 65536, RecordKind::data,
                               RecordCodec::none, r * 1000 + i});
    base = r + 1;
  }
  Model model = model_of(rps);
  {
    auto store = GroupStore::open(opt, "g", true);
    REQUIRE(store.is_ok());
    for (const auto& rp : rps) REQUIRE(feed_rp(**store, rp).is_ok());
    REQUIRE((*store)->apply_committed().is_ok());
  }
  auto names = std::filesystem::directory_iterator(opt.root + "/g/journal");
  CHECK(std::distance(begin(names), end(names)) >= 2);
  auto store = GroupStore::open(opt, "g", false);
  REQUIRE(store.is_ok());
  CHECK((*store)->last_applied_rp() == 1);
  CHECK(check_store(**store, model, opt.root, dir.path(), {1, 2, 3}) == "");
}

// R17: resync digests come from the journal's view (the restore piece map); here over
// overwrites, zero records, resizes both ways and a full RP after incrementals.
TEST_CASE("store: resync digests equal every RP's disks, from the journal", "[store]") {
  TempDir dir;
  auto rps = life_cycle_rps();
  Model model = model_of(rps);
  auto store = GroupStore::open(options_for(dir), "g", true).value();
  for (const auto& rp : rps) {
    REQUIRE(feed_rp(*store, rp).is_ok());
    for (const auto& [name, img] : model.at(rp.begin.rp_id)) {
      for (std::uint32_t block : {4096u, 65536u}) {
        auto count = static_cast<std::uint32_t>((img.size() + block - 1) / block);
        auto d = store->replica_digests(name, 0, block, count);
        REQUIRE(d.is_ok());
        for (std::uint32_t i = 0; i < count; ++i) {
          std::size_t at = std::size_t(i) * block;
          std::size_t len = std::min<std::size_t>(block, img.size() - at);
          INFO("RP " << rp.begin.rp_id << " disk " << name << " block " << i << " of " << block);
          CHECK((*d)[i] == xxh3_128(img.data() + at, len));
        }
      }
    }
  }
}

// The twin's model of a failed datasync (R18), as Linux behaves: the bytes stay readable,
// a later successful sync of other pages does not make them durable, a power cut loses them;
// a page written again is written whole by the next sync that succeeds.
TEST_CASE("faulty twin: a failed datasync loses its pages for good", "[store]") {
  TempDir dir;
  FaultPlan plan;
  plan.track_unsynced = true;
  plan.skip_inner_sync = true;
  plan.rules.push_back(FaultRule{FaultOp::sync, EIO, 2, false, "f.dat"});
  auto twin = FaultyStorage::create(real_storage(), 1, plan);
  const std::string path = dir.path() + "/f.dat";
  const std::string a(8192, 'a'), b(4096, 'b'), c(4096, 'c'), d(100, 'd');
  {
    auto f = twin->open(path, OpenFlags{.create = true}).value();
    REQUIRE(f->pwrite(a.data(), a.size(), 0).is_ok());
    REQUIRE(f->datasync().is_ok());
    REQUIRE(twin->sync_dir(dir.path()).is_ok());
    REQUIRE(f->pwrite(b.data(), b.size(), 0).is_ok());      // page 0
    REQUIRE(f->pwrite(b.data(), b.size(), 4096).is_ok());   // page 1
    REQUIRE(f->pwrite(b.data(), b.size(), 8192).is_ok());   // page 2, an append
    REQUIRE(!f->datasync().is_ok());                        // lost
    std::string got(12288, '\0');
    REQUIRE(f->pread(got.data(), got.size(), 0).value() == got.size());
    CHECK(got == b + b + b);                                 // still readable
    REQUIRE(f->pwrite(d.data(), d.size(), 4096 + 10).is_ok());  // dirties page 1 again
    REQUIRE(f->pwrite(c.data(), c.size(), 12288).is_ok());
    REQUIRE(f->datasync().is_ok());
  }
  REQUIRE(twin->power_cut(0, CutMode::drop).is_ok());
  std::string page1 = b;
  page1.replace(10, d.size(), d);
  CHECK(slurp(path) == a.substr(0, 4096) + page1 + std::string(4096, '\0') + c);
}

namespace {

// The data extents of a sparse file, as (offset, length).
std::vector<std::pair<std::uint64_t, std::uint64_t>> data_runs(const std::string& path) {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> out;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(fd.valid());
  for (off_t at = 0;;) {
    off_t d = ::lseek(fd.get(), at, SEEK_DATA);
    if (d < 0) break;
    off_t h = ::lseek(fd.get(), d, SEEK_HOLE);
    out.emplace_back(d, h - d);
    at = h;
  }
  return out;
}

std::string read_at(const std::string& path, std::uint64_t offset, std::size_t len) {
  std::string s(len, '\x55');
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  REQUIRE(fd.valid());
  REQUIRE(::pread(fd.get(), s.data(), len, static_cast<off_t>(offset)) == ssize_t(len));
  return s;
}

// 16 GiB + an unaligned tail: zero ranges of gigabytes, one record each.
constexpr std::uint64_t kGiB = 1ull << 30;
constexpr std::uint64_t kBigDisk = 16 * kGiB + 12345;
constexpr std::uint32_t kB64 = 65536;

std::vector<TestRp> long_zero_rps() {
  std::vector<TestRp> rps(2);
  rps[0].begin = {1, 0, 1, 0, {disk("big", kBigDisk, true)}};
  rps[0].blocks = {{0, 0, kB64, RecordKind::data, RecordCodec::zstd, 1},
                   {0, kB64, kMaxStoredZeroBytes, RecordKind::zero, RecordCodec::none, 0},
                   {0, 10 * kGiB, kB64, RecordKind::data, RecordCodec::none, 2},
                   // Not in offset order: a zero range over data of the same full RP.
                   {0, 10 * kGiB - kGiB / 2, std::uint32_t(kGiB), RecordKind::zero,
                    RecordCodec::none, 0},
                   {0, 12 * kGiB, kB64, RecordKind::data, RecordCodec::none, 3},
                   {0, 12 * kGiB + kB64, kMaxStoredZeroBytes, RecordKind::zero,
                    RecordCodec::none, 0},
                   {0, 12 * kGiB + kB64 + kMaxStoredZeroBytes,
                    std::uint32_t(kBigDisk - 12 * kGiB - kB64 - kMaxStoredZeroBytes),
                    RecordKind::zero, RecordCodec::none, 0}};
  rps[1].begin = {2, 1, 2, 0, {disk("big", kBigDisk, false)}};
  rps[1].blocks = {{0, 14 * kGiB, kB64, RecordKind::data, RecordCodec::zstd, 4},
                   {0, 0, std::uint32_t(3 * kGiB), RecordKind::zero, RecordCodec::none, 0},
                   {0, 12 * kGiB + 4096, 8192, RecordKind::zero, RecordCodec::none, 0}};
  return rps;
}

// What the disk holds at RP 1 and RP 2: data blocks by offset (the rest reads as zeros).
std::map<std::uint64_t, std::string> long_zero_expected(std::uint64_t rp) {
  std::string b3 = block_bytes(3, kB64);
  if (rp == 1) return {{0, block_bytes(1, kB64)}, {12 * kGiB, b3}};
  std::fill(b3.begin() + 4096, b3.begin() + 4096 + 8192, '\0');
  return {{12 * kGiB, b3}, {14 * kGiB, block_bytes(4, kB64)}};
}

void check_long_zero_image(const std::string& path, std::uint64_t rp) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK(std::uint64_t(st.st_size) == kBigDisk);
  auto expected = long_zero_expected(rp);
  for (const auto& [at, len] : data_runs(path)) {
    bool inside = false;
    for (const auto& [off, bytes] : expected) inside |= at >= off && at + len <= off + bytes.size();
    INFO("data at " << at << "+" << len << " in " << path << " at RP " << rp);
    CHECK(inside);
  }
  for (const auto& [off, bytes] : expected) CHECK(read_at(path, off, bytes.size()) == bytes);
  CHECK(read_at(path, 10 * kGiB, kB64) == std::string(kB64, '\0'));
}

RpBeginInfo::Disk id_disk(const std::string& name, std::uint64_t size, bool full,
                          std::uint64_t id, bool resync = false, bool ephemeral = false) {
  RpBeginInfo::Disk d = disk(name, size, full);
  d.resync = resync;
  d.identity = Hash128{id, id * 7};
  d.identity_ephemeral = ephemeral;
  return d;
}

Status begin_and_commit(GroupStore& s, const RpBeginInfo& b) {
  FERRY_TRY(s.begin_rp(b));
  return s.commit_rp(b.rp_id, 0, 0).status();
}

}  // namespace

// A zero range of up to kMaxStoredZeroBytes is one record (journal-format.md): stored as a
// header, applied as nothing (a full RP's fresh image) or one punched hole, restored as a
// hole, hashed per block as zeros, and read back by the recovery scan.
TEST_CASE("store: zero ranges of gigabytes are one record each", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  auto rps = long_zero_rps();
  std::uint64_t stored = 0;
  {
    auto store = GroupStore::open(opt, "g", true).value();
    for (const auto& rp : rps) {
      auto info = feed_rp(*store, rp);
      INFO(info.status().to_string());
      REQUIRE(info.is_ok());
      stored += info->disks[0].stored_bytes;
      REQUIRE(store->apply_committed().is_ok());
      // Default retention: the images hold RP 1 (the base); RP 2 is compacted below.
      REQUIRE(store->last_applied_rp() == 1);
      check_long_zero_image(opt.root + "/g/replica/big.img", 1);
    }
    CHECK(store->points()[0].disks[0].zero_bytes ==
          kMaxStoredZeroBytes + kGiB + (kBigDisk - 12 * kGiB - kB64));
    // Digests per block, zero ranges as zeros without a read.
    const std::string zeros(kB64, '\0');
    const Hash128 zero = xxh3_128(zeros.data(), zeros.size());
    auto d = store->replica_digests("big", 12 * kGiB - 2 * kB64, kB64, 8);
    REQUIRE(d.is_ok());
    const std::string b12 = long_zero_expected(2).at(12 * kGiB);
    for (std::uint32_t i = 0; i < 8; ++i)
      CHECK((*d)[i] == (i == 2 ? xxh3_128(b12.data(), b12.size()) : zero));
    auto tail = store->replica_digests("big", kBigDisk / kB64 * kB64, kB64, 1);
    REQUIRE(tail.is_ok());
    CHECK((*tail)[0] == xxh3_128(zeros.data(), kBigDisk % kB64));
  }
  CHECK(stored < 5 * kB64);  // the data blocks and 10 record headers, no zero payload
  // Re-open: the recovery scan reads the long records back.
  auto store = GroupStore::open(opt, "g", false);
  REQUIRE(store.is_ok());
  CHECK((*store)->last_committed_rp() == 2);
  for (std::uint64_t rp : {1, 2}) {
    const std::string out = dir.path() + "/restore-" + std::to_string(rp) + ".img";
    REQUIRE((*store)->restore(rp, "big", out).is_ok());
    check_long_zero_image(out, rp);
    ::unlink(out.c_str());
  }
  // Compacting RP 2 into the image punches its zero range (one hole, nothing read).
  auto pruned = (*store)->prune(keep_newest_only(), 0, false);
  REQUIRE(pruned.is_ok());
  CHECK(pruned->base_after == 2);
  CHECK((*store)->last_applied_rp() == 2);
  check_long_zero_image(opt.root + "/g/replica/big.img", 2);
}

TEST_CASE("store: a zero range past the bound, or a data block past 4 MiB, is refused",
          "[store]") {
  TempDir dir;
  auto store = GroupStore::open(options_for(dir), "g", true).value();
  REQUIRE(store->begin_rp({1, 0, 1, 0, {disk("a", 8 * kGiB, true)}}).is_ok());
  BlockRecord z{1, 0, 0, RecordKind::zero, RecordCodec::none, 0, kMaxStoredZeroBytes + 4096u,
                Hash128{}, {}};
  CHECK(store->append_block(z).code() == Errc::invalid_argument);
  std::string raw = block_bytes(1, (4u << 20) + 4096);
  BlockRecord b{1, 0, 0, RecordKind::data, RecordCodec::none, 0, std::uint32_t(raw.size()),
                xxh3_128(raw.data(), raw.size()), raw};
  CHECK(store->append_block(b).code() == Errc::invalid_argument);
  z.length_bytes = kMaxStoredZeroBytes;
  CHECK(store->append_block(z).is_ok());
}

// Sources before zero ranges sent one zero record per 4 MiB: such a journal still opens,
// applies, restores sparse and hashes the same.
TEST_CASE("store: a journal of old-style 4 MiB zero records still reads", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  constexpr std::uint32_t kMiB4 = 4u << 20;
  TestRp rp;
  rp.begin = {1, 0, 1, 0, {disk("d", 64ull << 20, true)}};
  for (std::uint64_t at = 0; at < (64ull << 20); at += kMiB4)
    rp.blocks.push_back(at == (32ull << 20)
                            ? TestBlock{0, at, kMiB4, RecordKind::data, RecordCodec::zstd, 9}
                            : TestBlock{0, at, kMiB4, RecordKind::zero, RecordCodec::none, 0});
  Model model = model_of({rp});
  {
    auto store = GroupStore::open(opt, "g", true).value();
    REQUIRE(feed_rp(*store, rp).is_ok());
  }
  auto store = GroupStore::open(opt, "g", false);
  REQUIRE(store.is_ok());
  CHECK((*store)->last_applied_rp() == 0);  // never applied: base 0, every RP in the journal
  CHECK(check_rp(**store, model, 1, opt.root, dir.path(), false) == "");
  REQUIRE((*store)->apply_committed().is_ok());  // compacts RP 1: the zero records applied
  CHECK(check_rp(**store, model, 1, opt.root, dir.path(), true) == "");
  auto d = (*store)->replica_digests("d", 0, kMiB4, 16);
  REQUIRE(d.is_ok());
  const std::string& img = model.at(1).at("d");
  for (std::uint32_t i = 0; i < 16; ++i)
    CHECK((*d)[i] == xxh3_128(img.data() + std::size_t(i) * kMiB4, kMiB4));
  const std::string out = dir.path() + "/old.img";
  REQUIRE((*store)->restore(1, "d", out).is_ok());
  CHECK(data_runs(out).size() == 1);
}

// A hole punched over gigabytes is modelled by the data it covered: a power cut that drops
// the punch brings that data back, one that keeps it leaves holes; nothing of the size of the
// range is read or held.
TEST_CASE("faulty twin: a long punch is undone and redone by its data runs", "[store]") {
  for (bool keep : {false, true}) {
    TempDir dir;
    FaultPlan plan;
    plan.track_unsynced = true;
    plan.skip_inner_sync = true;
    auto twin = FaultyStorage::create(real_storage(), 1, plan);
    const std::string path = dir.path() + "/img";
    const std::string a(8192, 'a'), b(4096, 'b');
    {
      auto f = twin->open(path, OpenFlags{.create = true}).value();
      REQUIRE(f->truncate(64 * kGiB).is_ok());
      REQUIRE(f->pwrite(a.data(), a.size(), kGiB).is_ok());
      REQUIRE(f->pwrite(b.data(), b.size(), 40 * kGiB).is_ok());
      REQUIRE(f->datasync().is_ok());
      REQUIRE(twin->sync_dir(dir.path()).is_ok());
      REQUIRE(f->punch_hole(0, std::uint64_t(kMaxStoredZeroBytes) * 15).is_ok());
      CHECK(data_runs(path).empty());
    }
    REQUIRE(twin->power_cut(keep ? 1 : 0, CutMode::drop).is_ok());
    INFO("punch kept: " << keep);
    CHECK(data_runs(path).size() == (keep ? 0u : 2u));
    CHECK(read_at(path, kGiB, a.size()) == (keep ? std::string(a.size(), '\0') : a));
    CHECK(read_at(path, 40 * kGiB, b.size()) == (keep ? std::string(b.size(), '\0') : b));
  }
}

TEST_CASE("store: an incremental across identities is refused (C5.identity)", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  GroupStore& s = **store;
  RpBeginInfo first = {1, 0, 1, 0, {id_disk("root", 8192, true, 1), id_disk("data", 8192, true, 2)}};
  first.source_name = "host-a";
  REQUIRE(begin_and_commit(s, first).is_ok());
  CHECK(s.replica_disks()[0].identity == (Hash128{1, 7}));
  CHECK(s.last_source_name() == "host-a");

  // The names swapped: each disk is a known identity under the other's name.
  RpBeginInfo swapped = {2, 1, 2, 0, {id_disk("root", 8192, false, 2), id_disk("data", 8192, false, 1)}};
  swapped.source_name = "host-a";
  Status refused = s.begin_rp(swapped);
  CHECK(refused.code() == Errc::diverged);
  CHECK_THAT(refused.message(), Catch::Contains("C5.identity"));
  CHECK_THAT(refused.message(), Catch::Contains("root"));
  CHECK_THAT(refused.message(), Catch::Contains((Hash128{1, 7}).hex()));
  CHECK_THAT(refused.message(), Catch::Contains((Hash128{2, 14}).hex()));
  CHECK(s.last_committed_rp() == 1);

  // As resyncs they are accepted, and the new identities are what the replica holds now.
  swapped.disks[0].resync = swapped.disks[1].resync = true;
  REQUIRE(begin_and_commit(s, swapped).is_ok());
  CHECK(s.replica_disks()[0].identity == (Hash128{2, 14}));
  CHECK(s.points().back().disks[0].resync);

  // An older source (no identity) is accepted as before.
  RpBeginInfo old_source = {3, 2, 3, 0, {disk("root", 8192, false), disk("data", 8192, false)}};
  REQUIRE(begin_and_commit(s, old_source).is_ok());
}

TEST_CASE("store: a second source for one group is refused (C5.source)", "[store]") {
  TempDir dir;
  StoreOptions opt = options_for(dir);
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  GroupStore& s = **store;
  RpBeginInfo a = {1, 0, 1, 0, {id_disk("vda", 8192, true, 10)}};
  a.source_name = "host-a";
  REQUIRE(begin_and_commit(s, a).is_ok());
  RpBeginInfo b = {2, 1, 2, 0, {id_disk("vda", 8192, false, 20, /*resync=*/true)}};
  b.source_name = "host-b";
  Status refused = s.begin_rp(b);
  CHECK(refused.code() == Errc::diverged);
  for (const char* what : {"C5.source", "'g'", "host-a", "host-b", "--take-over", "--group"})
    CHECK_THAT(refused.message(), Catch::Contains(what));
  // An identity that lives in QEMU's memory only (a raw disk, QEMU restarted) proves nothing.
  b.disks[0].identity_ephemeral = true;
  REQUIRE(begin_and_commit(s, b).is_ok());
  // Take-over lifts the rule.
  RpBeginInfo c = {3, 2, 3, 0, {id_disk("vda", 8192, true, 30)}};
  c.source_name = "host-c";
  RpBeginInfo held_persistent = {3, 2, 3, 0, {id_disk("vda", 8192, false, 20, true)}};
  REQUIRE(begin_and_commit(s, held_persistent).is_ok());
  c.rp_id = 4;
  c.base_rp = 3;
  CHECK(s.begin_rp(c).code() == Errc::diverged);
  c.flags = kRpFlagTakeOver;
  REQUIRE(begin_and_commit(s, c).is_ok());
  CHECK(s.last_source_name() == "host-c");
  // Identities survive a re-open (they are in the journal's rp_begin records).
  store->reset();
  auto again = GroupStore::open(opt, "g", false);
  REQUIRE(again.is_ok());
  CHECK((*again)->replica_disks()[0].identity == (Hash128{30, 210}));
  CHECK((*again)->last_source_name() == "host-c");
}
