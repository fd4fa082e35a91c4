// Retention in the store (layout 2): bounded journal and images, a tiered policy on a
// synthetic clock, prune --dry-run, pinned readers, and the migration of a layout 1 store.
#include <catch2/catch.hpp>

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <filesystem>
#include <map>
#include <set>
#include <sstream>

#include "ferry/base/bytes.h"
#include "ferry/site/read_view.h"
#include "ferry/site/store.h"
#include "ferry/site/vm_config.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;
namespace fs = std::filesystem;

namespace {

constexpr std::uint32_t kB64 = 65536;

std::uint64_t dir_bytes(const std::string& dir) {
  std::uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file()) n += e.file_size();
  return n;
}

std::vector<std::uint64_t> ids_of(const std::vector<RpInfo>& points) {
  std::vector<std::uint64_t> out;
  for (const auto& p : points) out.push_back(p.rp_id);
  return out;
}

// RP `id` of one disk "d" of `disk_bytes`: a full copy first, then `blocks` blocks of 64 KiB
// at offsets from the id (raw, incompressible: the journal grows by what the RPs carry).
TestRp one_disk_rp(std::uint64_t id, std::uint64_t disk_bytes, std::uint32_t blocks,
                   std::uint64_t created_unix_ns = 0) {
  TestRp rp;
  rp.begin = {id, id - 1, created_unix_ns != 0 ? created_unix_ns : id * 1000, 0,
              {disk("d", disk_bytes, id == 1)}};
  const std::uint64_t slots = disk_bytes / kB64;
  for (std::uint32_t i = 0; i < blocks; ++i)
    rp.blocks.push_back({0, ((id * 7 + i * 3) % slots) * kB64, kB64, RecordKind::data,
                         RecordCodec::none, id * 1000 + i});
  return rp;
}

// The image of "d" at each RP, without holding every RP (a Model keeps them all).
class RollingModel {
 public:
  void apply(const TestRp& rp) {
    std::string img = rp.begin.disks[0].full ? std::string() : last_;
    img.resize(rp.begin.disks[0].size_bytes, '\0');
    for (const auto& b : rp.blocks) img.replace(b.offset, b.length, block_bytes(b.seed, b.length));
    last_ = img;
    at_[rp.begin.rp_id] = std::move(img);
  }
  void forget_below(std::uint64_t rp) { at_.erase(at_.begin(), at_.lower_bound(rp)); }
  const std::string& at(std::uint64_t rp) const { return at_.at(rp); }

 private:
  std::string last_;
  std::map<std::uint64_t, std::string> at_;
};

std::string restored(GroupStore& s, std::uint64_t rp, const std::string& scratch) {
  const std::string out = scratch + "/restore.img";
  Status st = s.restore(rp, "d", out);
  if (!st.is_ok()) return "error: " + st.to_string();
  std::string bytes = slurp(out);
  fs::remove(out);
  return bytes;
}

// Unix ns of UTC day `day` (days since the epoch) at hh:mm.
std::uint64_t utc(std::uint64_t day, std::uint64_t hh, std::uint64_t mm) {
  return ((day * 24 + hh) * 60 + mm) * 60ull * 1'000'000'000ull;
}
constexpr std::uint64_t kMonday = 20514;  // 2026-03-02, a Monday

}  // namespace

// (a) keep-last 20 over 300 RPs with 8 MiB segments: exactly 20 offered, the store's size
// levels off within images + the kept RPs' records + one segment + 64 KiB, every kept RP
// restores byte-identical and a pruned one is refused, naming it.
TEST_CASE("retention: keep-last 20 over 300 RPs bounds the store and keeps exactly 20",
          "[retention]") {
  TempDir dir("/dev/shm");  // hundreds of fdatasyncs: tmpfs keeps the suite fast
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  opt.segment_bytes = 8u << 20;
  opt.retention.keep_last = 20;
  constexpr std::uint64_t kDisk = 1u << 20;
  RollingModel model;
  auto store = GroupStore::open(opt, "g", true).value();
  const std::string gdir = opt.root + "/g";
  std::vector<std::uint64_t> sizes;
  for (std::uint64_t id = 1; id <= 300; ++id) {
    TestRp rp = one_disk_rp(id, kDisk, 4);
    model.apply(rp);
    REQUIRE(feed_rp(*store, rp).is_ok());
    REQUIRE(store->apply_committed().is_ok());
    model.forget_below(id > 25 ? id - 25 : 1);
    auto points = store->points();
    REQUIRE(points.size() == std::min<std::uint64_t>(id, 20));
    REQUIRE(points.back().rp_id == id);
    REQUIRE(store->last_applied_rp() == points.front().rp_id);
    if (id % 100 == 0) {
      std::uint64_t kept_records = 0;
      for (const auto& p : points)
        for (const auto& d : p.disks) kept_records += d.stored_bytes;
      const std::uint64_t journal = dir_bytes(gdir + "/journal");
      const std::uint64_t replica = dir_bytes(gdir + "/replica");
      const std::uint64_t bound = kDisk + kept_records + opt.segment_bytes + (64u << 10);
      INFO("after RP " << id << ": journal " << journal << " + replica " << replica
                       << " bytes, bound " << bound);
      CHECK(replica == kDisk);
      CHECK(journal + replica <= bound);
      sizes.push_back(journal + replica);
    }
  }
  // Levels off: the last two measurements differ by at most one segment.
  REQUIRE(sizes.size() == 3);
  CHECK(sizes[2] <= sizes[1] + opt.segment_bytes);
  CHECK(sizes[1] <= sizes[0] + opt.segment_bytes);
  std::vector<std::uint64_t> want;
  for (std::uint64_t id = 281; id <= 300; ++id) want.push_back(id);
  CHECK(ids_of(store->points()) == want);
  CHECK(store->last_applied_rp() == 281);
  for (std::uint64_t id = 281; id <= 300; ++id) {
    INFO("RP " << id);
    CHECK(restored(*store, id, dir.path()) == model.at(id));
  }
  CHECK(slurp(gdir + "/replica/d.img") == model.at(281));
  for (std::uint64_t id : {1, 150, 280}) {
    Status s = store->restore(id, "d", dir.path() + "/x.img");
    CHECK(s.code() == Errc::not_found);
    CHECK(s.message().find("RP " + std::to_string(id) + " of group g was pruned by retention") !=
          std::string::npos);
  }
  auto listed = list_points(opt.root, "g");  // the read-only view agrees
  INFO(listed.status().to_string());
  REQUIRE(listed.is_ok());
  CHECK(ids_of(*listed) == want);
}

// The same store closed and opened again: what retention left must be a journal recovery
// reads. Pruning removes every segment below the one where the first kept RP begins; when
// a compacted RP crossed into that segment, its tail records lead the segment.
TEST_CASE("retention: a store whose segments retention removed opens again", "[retention]") {
  TempDir dir("/dev/shm");  // hundreds of fdatasyncs: tmpfs keeps the suite fast
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  opt.segment_bytes = 8u << 20;
  opt.retention.keep_last = 20;
  RollingModel model;
  {
    auto store = GroupStore::open(opt, "g", true).value();
    for (std::uint64_t id = 1; id <= 100; ++id) {
      TestRp rp = one_disk_rp(id, 1u << 20, 4);
      model.apply(rp);
      REQUIRE(feed_rp(*store, rp).is_ok());
      REQUIRE(store->apply_committed().is_ok());
    }
  }
  REQUIRE(!fs::exists(opt.root + "/g/journal/0000000000000001.seg"));
  auto store = GroupStore::open(opt, "g", false);
  INFO(store.status().to_string());
  REQUIRE(store.is_ok());
  CHECK((*store)->last_committed_rp() == 100);
  for (std::uint64_t id = 81; id <= 100; ++id) {
    INFO("RP " << id);
    CHECK(restored(**store, id, dir.path()) == model.at(id));
  }
}

namespace {

// Twelve RPs at hand-picked times over three days; the default policy (keep-last 48, ...)
// keeps them all while they arrive.
struct TieredStore {
  TempDir dir{"/dev/shm"};
  StoreOptions opt;
  std::vector<TestRp> rps;
  Model model;
  std::uint64_t now = utc(kMonday, 11, 5);
  std::unique_ptr<GroupStore> store;

  TieredStore() {
    opt.root = dir.path() + "/store";
    opt.clock = [this] { return now; };
    const std::uint64_t times[] = {
        utc(kMonday - 2, 10, 0), utc(kMonday - 2, 20, 0), utc(kMonday - 1, 9, 0),
        utc(kMonday - 1, 9, 30), utc(kMonday - 1, 22, 0), utc(kMonday, 8, 5),
        utc(kMonday, 8, 40),     utc(kMonday, 9, 10),     utc(kMonday, 10, 0),
        utc(kMonday, 10, 20),    utc(kMonday, 10, 40),    utc(kMonday, 11, 0)};
    for (std::uint64_t i = 0; i < 12; ++i) rps.push_back(one_disk_rp(i + 1, 1u << 20, 2, times[i]));
    model = model_of(rps);
    store = GroupStore::open(opt, "g", true).value();
    for (const auto& rp : rps) {
      REQUIRE(feed_rp(*store, rp).is_ok());
      REQUIRE(store->apply_committed().is_ok());
    }
    REQUIRE(store->points().size() == 12);
  }
  static RetentionPolicy policy() {
    RetentionPolicy p;
    p.keep_last = 2;
    p.keep_hourly = 3;
    p.keep_daily = 2;
    return p;
  }
};

}  // namespace

// (b) keep-last 2, keep-hourly 3, keep-daily 2 at Monday 11:05 UTC:
//   K1 newest RP 12 (Mon 11h); K4 last: RP 11 (Mon 10h);
//   K5 hourly, hours 11 and 10 of Monday covered: RP 10, 9 pass (10h), RP 8 (9h), RP 7 (8h)
//      kept, RP 6 passes (8h taken), RP 5 (Sun 22h) kept: three hours taken;
//   K6 daily, Monday and Sunday covered: RP 2 (Sat) kept, RP 1 passes (Sat taken); only one
//      day left to take.
TEST_CASE("retention: a tiered policy on a synthetic clock keeps exactly the expected RPs",
          "[retention]") {
  TieredStore t;
  t.store->set_retention(TieredStore::policy());
  REQUIRE(t.store->apply_committed().is_ok());
  CHECK(ids_of(t.store->points()) == std::vector<std::uint64_t>{2, 5, 7, 8, 11, 12});
  CHECK(t.store->last_applied_rp() == 2);
  CHECK(check_store(*t.store, t.model, t.opt.root, t.dir.path(), {2, 5, 7, 8, 11, 12}) == "");
  for (std::uint64_t gone : {1, 3, 4, 6, 9, 10}) {
    Status s = t.store->restore(gone, "d", t.dir.path() + "/x.img");
    CHECK(s.code() == Errc::not_found);
    CHECK(s.message().find("RP " + std::to_string(gone) + " of group g was pruned") !=
          std::string::npos);
  }
  // One more RP an hour later: RP 11 leaves keep-last and is kept by keep-hourly instead;
  // RP 5 leaves the three hours and is kept by keep-daily (Sunday); nothing is removed.
  TestRp rp13 = one_disk_rp(13, 1u << 20, 2, utc(kMonday, 12, 0));
  t.model.apply(rp13);
  t.now = utc(kMonday, 12, 1);
  REQUIRE(feed_rp(*t.store, rp13).is_ok());
  REQUIRE(t.store->apply_committed().is_ok());
  // K1 13 (12h), K4 12 (11h); hourly: 11 (10h), 8 (9h), 7 (8h); daily, Mon covered: 5 (Sun),
  // 2 (Sat).
  CHECK(ids_of(t.store->points()) == std::vector<std::uint64_t>{2, 5, 7, 8, 11, 12, 13});
  CHECK(check_store(*t.store, t.model, t.opt.root, t.dir.path()) == "");
}

// (c) prune --dry-run judges and reports, and changes nothing.
TEST_CASE("retention: prune dry-run reports and changes nothing", "[retention]") {
  TieredStore t;
  const std::string gdir = t.opt.root + "/g";
  auto snapshot = [&] {
    std::map<std::string, std::string> files;
    for (const auto& e : fs::recursive_directory_iterator(gdir))
      if (e.is_regular_file() && e.path().filename() != "LOCK" &&
          e.path().filename() != "READERS")
        files[e.path().string()] = slurp(e.path().string());
    return files;
  };
  const auto before = snapshot();
  const auto points_before = ids_of(t.store->points());
  const std::uint64_t base_before = t.store->last_applied_rp();
  auto rep = t.store->prune(TieredStore::policy(), t.now, /*dry_run=*/true);
  REQUIRE(rep.is_ok());
  CHECK(rep->dry_run);
  CHECK(rep->removed == 6);
  CHECK(rep->removed_bytes > 0);
  CHECK(rep->compacted_bytes == 0);
  REQUIRE(rep->points.size() == 12);
  std::vector<std::uint64_t> kept;
  for (const auto& p : rep->points)
    if (p.keep) kept.push_back(p.info.rp_id);
  CHECK(kept == std::vector<std::uint64_t>{2, 5, 7, 8, 11, 12});
  CHECK(rep->points[11].rule == KeepRule::newest);
  CHECK(rep->points[10].rule == KeepRule::last);
  CHECK(rep->points[7].rule == KeepRule::hourly);
  CHECK(rep->points[4].rule == KeepRule::hourly);
  CHECK(rep->points[1].rule == KeepRule::daily);
  CHECK(rep->points[0].rule == KeepRule::none);
  CHECK(snapshot() == before);
  CHECK(ids_of(t.store->points()) == points_before);
  CHECK(t.store->last_applied_rp() == base_before);
  CHECK(check_store(*t.store, t.model, t.opt.root, t.dir.path(), points_before) == "");
}

// (d) A reader pins its RP: retention keeps it, and the view reads the same bytes while 20
// newer RPs arrive and the base moves up to it; once the view is gone the RP is pruned.
TEST_CASE("retention: a pinned RP is kept while a view reads it, pruned after", "[retention]") {
  TempDir dir("/dev/shm");  // hundreds of fdatasyncs: tmpfs keeps the suite fast
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  opt.retention.keep_last = 3;
  RollingModel model;
  auto store = GroupStore::open(opt, "g", true).value();
  auto feed = [&](std::uint64_t id) {
    TestRp rp = one_disk_rp(id, 1u << 20, 3);
    model.apply(rp);
    REQUIRE(feed_rp(*store, rp).is_ok());
    REQUIRE(store->apply_committed().is_ok());
  };
  for (std::uint64_t id = 1; id <= 3; ++id) feed(id);
  REQUIRE(store->last_applied_rp() == 1);
  auto view = ReadView::open(opt.root, "g", 2, "d");
  REQUIRE(view.is_ok());
  auto read_all = [&] {
    std::string out((*view)->size_bytes(), '\0');
    REQUIRE((*view)->pread(out.data(), out.size(), 0).is_ok());
    return out;
  };
  const std::string want = model.at(2);
  CHECK(read_all() == want);
  for (std::uint64_t id = 4; id <= 23; ++id) {
    feed(id);
    auto pts = ids_of(store->points());
    INFO("after RP " << id);
    REQUIRE(pts.front() == 2);
    std::set<std::uint64_t> want_ids = {2, id - 2, id - 1, id};
    CHECK(pts == std::vector<std::uint64_t>(want_ids.begin(), want_ids.end()));
    CHECK(read_all() == want);
  }
  CHECK(store->last_applied_rp() == 2);  // the base moved up to the pinned RP, not past it
  auto rep = store->prune(opt.retention, 0, /*dry_run=*/true);
  REQUIRE(rep.is_ok());
  CHECK(rep->points.front().pinned);
  CHECK(rep->points.front().rule == KeepRule::pinned);
  CHECK(restored(*store, 2, dir.path()) == want);
  view->reset();
  REQUIRE(store->apply_committed().is_ok());
  CHECK(ids_of(store->points()) == (std::vector<std::uint64_t>{21, 22, 23}));
  CHECK(store->last_applied_rp() == 21);
  Status s = store->restore(2, "d", dir.path() + "/x.img");
  CHECK(s.code() == Errc::not_found);
  CHECK(s.message().find("RP 2 of group g was pruned by retention") != std::string::npos);
  CHECK(restored(*store, 21, dir.path()) == model.at(21));
  CHECK(slurp(opt.root + "/g/replica/d.img") == model.at(21));
}

// (e) R22: a store of layout 1 (state version 1, images at the newest RP, every RP in the
// journal) is migrated in place at open: every RP restorable, a log line, state version 2,
// the old images removed (base 0: not read) and written again by the first compaction.
TEST_CASE("retention: a version 1 state file is migrated in place (R22)", "[retention]") {
  TempDir dir("/dev/shm");  // hundreds of fdatasyncs: tmpfs keeps the suite fast
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  auto rps = small_run();
  Model model = model_of(rps);
  {
    auto store = GroupStore::open(opt, "g", true).value();
    for (const auto& rp : rps) REQUIRE(feed_rp(*store, rp).is_ok());
  }
  make_layout1(opt.root, "g", model, 3);
  const std::string state = opt.root + "/g/state";
  REQUIRE(fs::file_size(state) == 40);
  std::ostringstream log;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log);
  spdlog::default_logger()->sinks().push_back(sink);
  {
    auto store = GroupStore::open(opt, "g", false);
    spdlog::default_logger()->sinks().pop_back();
    REQUIRE(store.is_ok());
    INFO(log.str());
    CHECK(log.str().find("group g: migrated the store in place from layout 1 (replica images at "
                         "the newest RP 3") != std::string::npos);
    const std::string v2 = slurp(state);
    REQUIRE(v2.size() > 40);
    CHECK(load_le32(v2.data()) == 0x41545346);
    CHECK(static_cast<std::uint16_t>(load_le32(v2.data() + 4)) == 2);
    CHECK((*store)->last_applied_rp() == 0);
    CHECK(!fs::exists(opt.root + "/g/replica/a.img"));
    CHECK(check_store(**store, model, opt.root, dir.path(), {1, 2, 3}) == "");
    REQUIRE((*store)->apply_committed().is_ok());
    CHECK((*store)->last_applied_rp() == 1);
    CHECK(check_store(**store, model, opt.root, dir.path(), {1, 2, 3}) == "");
  }
  // A second open finds version 2: no migration again.
  std::ostringstream log2;
  auto sink2 = std::make_shared<spdlog::sinks::ostream_sink_mt>(log2);
  spdlog::default_logger()->sinks().push_back(sink2);
  auto again = GroupStore::open(opt, "g", false);
  spdlog::default_logger()->sinks().pop_back();
  REQUIRE(again.is_ok());
  CHECK(log2.str().find("migrated") == std::string::npos);
  CHECK(check_store(**again, model, opt.root, dir.path(), {1, 2, 3}) == "");
}

namespace {

// Two disks under a tiered policy: "d" written at random 64 KiB blocks (some as zero
// records, some zstd), shrunk and grown back now and then and sent in full once; "e" added
// half way. RPs every 10 minutes of a synthetic clock.
struct TieredRun {
  static constexpr std::uint64_t kDisk = 8u << 20;
  std::mt19937_64 rng{20261207};
  std::map<std::string, std::string> img;  // the source's disks now
  std::uint64_t size_d = kDisk;

  TestRp next(std::uint64_t id, std::uint64_t created) {
    TestRp rp;
    const bool full_d = id == 1 || id == 97;
    if (id % 37 == 0) size_d = kDisk - 512 * 1024;  // shrink ...
    else if (id % 37 == 3) size_d = kDisk;          // ... and grow back two RPs later
    rp.begin = {id, id - 1, created, 0, {disk("d", size_d, full_d)}};
    if (id >= 60) rp.begin.disks.push_back(disk("e", kDisk / 2, id == 60));
    for (std::uint16_t d = 0; d < rp.begin.disks.size(); ++d) {
      const auto& bd = rp.begin.disks[d];
      std::string& im = img[bd.name];
      if (bd.full) im.assign(bd.size_bytes, '\0');
      im.resize(bd.size_bytes, '\0');
      const std::uint64_t slots = bd.size_bytes / kB64;
      const int n = bd.full ? static_cast<int>(slots) : 1 + static_cast<int>(rng() % 12);
      for (int i = 0; i < n; ++i) {
        const std::uint64_t off = (bd.full ? std::uint64_t(i) : rng() % slots) * kB64;
        TestBlock b{d, off, kB64, RecordKind::data, RecordCodec::none, rng()};
        if (rng() % 5 == 0) b.kind = RecordKind::zero;
        else if (rng() % 2 == 0) b.codec = RecordCodec::zstd;
        im.replace(off, kB64, b.kind == RecordKind::zero ? std::string(kB64, '\0')
                                                         : block_bytes(b.seed, kB64));
        rp.blocks.push_back(b);
      }
    }
    return rp;
  }
};

std::vector<std::string> journal_dirs(const std::string& gdir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(gdir))
    if (e.path().filename().string().rfind("journal", 0) == 0)
      out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

std::string restored_disk(GroupStore& s, std::uint64_t rp, const std::string& disk,
                          const std::string& scratch) {
  const std::string out = scratch + "/restore.img";
  Status st = s.restore(rp, disk, out);
  if (!st.is_ok()) return "error: " + st.to_string();
  std::string bytes = slurp(out);
  fs::remove(out);
  return bytes;
}

}  // namespace

// (d) Tiered retention prunes RPs between kept ones; the journal is rewritten into a new
// generation once that drops half of what it writes (here at least 256 KiB): the journal
// stays within twice the kept RPs' changes (counted from what the source sent) + twice that
// minimum + framing + one segment, every kept RP reads the same before and after each rewrite, a reader pins the old generation until it closes, and
// the store opens again on the newest generation.
TEST_CASE("retention: a tiered policy's journal is rewritten and stays bounded", "[retention]") {
  TempDir dir("/dev/shm");
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  opt.segment_bytes = 5u << 20;  // near the smallest segment a store accepts
  opt.rewrite_min_garbage_bytes = 256u << 10;
  opt.retention.keep_last = 3;
  opt.retention.keep_hourly = 4;
  opt.retention.keep_daily = 2;
  std::uint64_t now = utc(kMonday, 0, 0);
  opt.clock = [&now] { return now; };
  const std::string gdir = opt.root + "/g";
  TieredRun run;
  std::map<std::uint64_t, std::map<std::string, std::string>> at;  // offered RPs' images
  auto store = GroupStore::open(opt, "g", true).value();
  std::set<std::string> gens_seen;
  std::uint64_t worst_ratio_x100 = 0;
  std::map<std::uint64_t, TestRp> sent;  // the RPs above the base
  auto check_all = [&](const std::string& when) {
    for (const auto& p : store->points()) {
      // The VM definition of each RP rides through every rewrite with its begin record.
      auto cfg = vm_config_at(opt.root, "g", p.rp_id);
      REQUIRE(cfg.is_ok());
      CHECK(cfg->from_rp == p.rp_id);
      CHECK(cfg->xml.find("<!-- RP " + std::to_string(p.rp_id) + " -->") != std::string::npos);
      for (const auto& [name, bytes] : at.at(p.rp_id)) {
        INFO(when << ": RP " << p.rp_id << " disk " << name);
        REQUIRE(restored_disk(*store, p.rp_id, name, dir.path()) == bytes);
      }
    }
  };
  for (std::uint64_t id = 1; id <= 240; ++id) {
    now = utc(kMonday, 0, 0) + id * 600ull * 1'000'000'000ull;
    TestRp rp = run.next(id, now);
    rp.begin.vm_config = "<domain><name>vm</name><!-- RP " + std::to_string(id) + " --></domain>";
    at[id] = run.img;
    REQUIRE(feed_rp(*store, rp).is_ok());
    REQUIRE(store->apply_committed().is_ok());
    auto points = store->points();
    std::set<std::uint64_t> offered;
    for (const auto& p : points) offered.insert(p.rp_id);
    std::erase_if(at, [&](const auto& kv) { return !offered.count(kv.first); });
    const auto dirs = journal_dirs(gdir);
    REQUIRE(dirs.size() == 1);  // nothing pins an old generation: it is gone at once
    gens_seen.insert(dirs[0]);
    // The kept RPs' changes, from the source side: per kept RP above the base and disk, the
    // data bytes the RPs since the kept RP before it wrote (since the disk's last full copy),
    // each range counted once.
    sent[id] = rp;
    const std::uint64_t base = store->last_applied_rp();
    std::erase_if(sent, [&](const auto& kv) { return kv.first <= base; });
    std::uint64_t live = 0;
    {
      std::map<std::string, std::vector<std::pair<std::uint64_t, std::uint64_t>>> run;
      for (const auto& [rid, r] : sent) {
        for (std::size_t d = 0; d < r.begin.disks.size(); ++d) {
          auto& v = run[r.begin.disks[d].name];
          if (r.begin.disks[d].full) v.clear();
          for (const auto& b : r.blocks)
            if (b.disk == d && b.kind == RecordKind::data) v.push_back({b.offset, b.length});
        }
        if (!offered.count(rid)) continue;
        for (auto& [name, v] : run) {
          std::set<std::uint64_t> blocks;  // 64 KiB blocks written since the kept RP before
          for (const auto& [off, len] : v)
            for (std::uint64_t o = off; o < off + len; o += kB64) blocks.insert(o);
          live += blocks.size() * (kB64 + 96);
          v.clear();
        }
      }
    }
    const std::uint64_t journal = dir_bytes(gdir + "/" + dirs[0]);
    // Framing: a segment header, and per RP its begin record and two commit copies in
    // aligned blocks, plus padding to the block ends; and the RPs the base passed, until
    // the segment they share with a kept RP goes (one segment at most).
    const std::uint64_t framing = 4096 + sent.size() * 4 * 4096;
    const std::uint64_t slack = 2 * opt.rewrite_min_garbage_bytes + framing + opt.segment_bytes;
    const std::uint64_t bound = 2 * live + slack;
    INFO("after RP " << id << ": journal " << journal << " bytes, the kept RPs' changes "
                     << live << ", bound " << bound << ", " << dirs[0]);
    REQUIRE(journal <= bound);
    if (live != 0)
      worst_ratio_x100 = std::max(worst_ratio_x100,
                                  (journal > slack ? journal - slack : 0) * 100 / live);
    if (id % 20 == 0) check_all("after RP " + std::to_string(id));
  }
  INFO("generations seen: " << gens_seen.size());
  CHECK(gens_seen.size() >= 3);
  std::printf("tiered retention: %zu journal generations over 240 RPs; journal beyond its fixed "
              "slack at most %.2f x the kept RPs' changes\n", gens_seen.size(),
              worst_ratio_x100 / 100.0);

  // A reader pins its generation: the rewrite under it keeps the old directory until the
  // reader closes; the reader reads what it read before.
  const std::uint64_t pinned = store->points()[1].rp_id;
  auto view = ReadView::open(opt.root, "g", pinned, "d");
  REQUIRE(view.is_ok());
  const std::string before_gen = journal_dirs(gdir)[0];
  std::uint64_t id = 241;
  for (; journal_dirs(gdir).size() == 1 && id < 400; ++id) {
    now = utc(kMonday, 0, 0) + id * 600ull * 1'000'000'000ull;
    TestRp rp = run.next(id, now);
    rp.begin.vm_config = "<domain><name>vm</name><!-- RP " + std::to_string(id) + " --></domain>";
    at[id] = run.img;
    REQUIRE(feed_rp(*store, rp).is_ok());
    REQUIRE(store->apply_committed().is_ok());
  }
  REQUIRE(journal_dirs(gdir).size() == 2);
  CHECK(journal_dirs(gdir)[0] == before_gen);
  {
    std::string got((*view)->size_bytes(), '\0');
    REQUIRE((*view)->pread(got.data(), got.size(), 0).is_ok());
    CHECK(got == at.at(pinned).at("d"));
  }
  view->reset();
  now += 600ull * 1'000'000'000ull;
  TestRp rp = run.next(id, now);
  rp.begin.vm_config = "<domain><name>vm</name><!-- RP " + std::to_string(id) + " --></domain>";
  at[id] = run.img;
  REQUIRE(feed_rp(*store, rp).is_ok());
  REQUIRE(store->apply_committed().is_ok());
  CHECK(journal_dirs(gdir).size() == 1);
  std::erase_if(at, [&](const auto& kv) {
    for (const auto& p : store->points())
      if (p.rp_id == kv.first) return false;
    return true;
  });
  check_all("after the pinned rewrite");

  // Opened again: recovery reads the generation the state file names.
  const auto offered = ids_of(store->points());
  store.reset();
  store = GroupStore::open(opt, "g", false).value();
  CHECK(ids_of(store->points()) == offered);
  check_all("after a re-open");
}

// The VM definition kept with each RP (vm_config.h): compaction moves the base's begin record,
// with its definition, into the state file; a pruned RP is refused by name; an RP whose begin
// record has none inherits the newest older one still in the store.
TEST_CASE("retention: VM definitions survive compaction and pruning", "[retention]") {
  TempDir dir("/dev/shm");
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  opt.retention.keep_last = 2;
  auto cfg = [](std::uint64_t id) { return "<domain><name>vm" + std::to_string(id) + "</name></domain>"; };
  {
    auto store = GroupStore::open(opt, "g", true).value();
    for (std::uint64_t id = 1; id <= 6; ++id) {
      TestRp rp = one_disk_rp(id, 1u << 20, 2);
      if (id != 6) rp.begin.vm_config = cfg(id <= 2 ? 1 : 3);  // RP 6: an older receiver's
      REQUIRE(feed_rp(*store, rp).is_ok());
      REQUIRE(store->apply_committed().is_ok());
    }
    CHECK(ids_of(store->points()) == std::vector<std::uint64_t>{5, 6});
  }
  for (int pass = 0; pass < 2; ++pass) {  // and after a re-open of the store
    auto store = GroupStore::open(opt, "g", false).value();
    CHECK(store->last_applied_rp() == 5);  // the base: its begin record is in the state file
    auto at5 = vm_config_at(opt.root, "g", 5);
    REQUIRE(at5.is_ok());
    CHECK(at5->xml == cfg(3));
    CHECK(at5->from_rp == 5);
    auto at6 = vm_config_at(opt.root, "g", 0);  // latest
    REQUIRE(at6.is_ok());
    CHECK(at6->rp_id == 6);
    CHECK(at6->xml == cfg(3));
    CHECK(at6->from_rp == 5);
    auto all = vm_configs(opt.root, "g");
    REQUIRE(all.is_ok());
    CHECK(all->size() == 2);
    auto pruned = vm_config_at(opt.root, "g", 2);
    REQUIRE_FALSE(pruned.is_ok());
    CHECK(pruned.status().message().find("pruned") != std::string::npos);
    auto future = vm_config_at(opt.root, "g", 9);
    REQUIRE_FALSE(future.is_ok());
    CHECK(future.status().message().find("not committed") != std::string::npos);
    auto unknown = vm_config_at(opt.root, "nope", 0);
    REQUIRE_FALSE(unknown.is_ok());
    CHECK(unknown.status().code() == Errc::not_found);
  }
}
