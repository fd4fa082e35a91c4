// Seeded groups and the failback reset (seed.h): a group whose base RP is images the store
// never received opens like any other, reports its disks with no identity (so the first
// source is not a second one and sends a resync), answers resync digests from the image, and
// its read view names exactly the ranges the RPs after the seed changed. The reset replaces
// every RP by one new base above them all, in a new journal generation, kill-safe.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "ferry/base/kill_point.h"
#include "ferry/site/failover_state.h"
#include "ferry/site/read_view.h"
#include "ferry/site/seed.h"
#include "ferry/site/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;
namespace fs = std::filesystem;

namespace {

constexpr std::uint32_t kB64 = 65536;
constexpr std::uint64_t kDisk = 1u << 20;

StoreOptions options(const std::string& root) {
  StoreOptions o;
  o.root = root;
  o.segment_bytes = 8u << 20;
  o.retention.keep_last = 100;
  return o;
}

std::string seed_image() {
  std::string img = block_bytes(4242, kDisk);
  std::fill(img.begin() + 5 * kB64, img.begin() + 7 * kB64, '\0');  // a hole
  return img;
}

// A seeded group "g" at `root` with disk "d" = seed_image().
void make_seeded(const std::string& root) {
  const std::string dir = root + "/g";
  fs::create_directories(dir + "/replica");
  spit(dir + "/replica/d.img", seed_image());
  REQUIRE(write_seed_state(dir, "g", 1, {{"d", kDisk}}, 1000).is_ok());
}

TestRp resync_rp(std::uint64_t id, std::uint64_t base, std::vector<std::uint64_t> blocks) {
  TestRp rp;
  RpBeginInfo::Disk d = disk("d", kDisk, false);
  d.resync = true;
  d.identity = xxh3_128("dr-vm-disk", 10);
  rp.begin = {id, base, id * 1000, 0, {d}};
  rp.begin.source_name = "dr-host/vm";
  for (auto b : blocks)
    rp.blocks.push_back({0, b * kB64, kB64, RecordKind::data, RecordCodec::none, id * 100 + b});
  return rp;
}

std::string apply_blocks(std::string img, const TestRp& rp) {
  for (const auto& b : rp.blocks) img.replace(b.offset, b.length, block_bytes(b.seed, b.length));
  return img;
}

}  // namespace

TEST_CASE("seed: a group whose base RP is an adopted image", "[seed]") {
  spdlog::set_level(spdlog::level::err);
  TempDir d("/dev/shm");
  const std::string root = d.path() + "/s";
  make_seeded(root);
  const std::string img = seed_image();
  {
    auto store = GroupStore::open(options(root), "g", false).value();
    CHECK(store->last_committed_rp() == 1);
    CHECK(store->last_applied_rp() == 1);
    auto disks = store->replica_disks();
    REQUIRE(disks.size() == 1);
    CHECK(disks[0].name == "d");
    CHECK(disks[0].size_bytes == kDisk);
    CHECK(disks[0].identity == Hash128{});
    CHECK(store->last_source_name().empty());
    // Resync digests come from the image.
    auto dig = store->replica_digests("d", 0, kB64, kDisk / kB64).value();
    for (std::uint64_t b = 0; b < kDisk / kB64; ++b)
      CHECK(dig[b] == xxh3_128(img.data() + b * kB64, kB64));
    // The first source's resync (identities, a source name) is not a second source.
    const TestRp r2 = resync_rp(2, 1, {0, 3, 9});
    REQUIRE(feed_rp(*store, r2).is_ok());
    const TestRp r3 = resync_rp(3, 2, {3, 12});
    REQUIRE(feed_rp(*store, r3).is_ok());
    std::string out = d.path() + "/r3";
    REQUIRE(store->restore(3, "d", out).is_ok());
    CHECK(slurp(out) == apply_blocks(apply_blocks(img, r2), r3));
  }
  // What the RPs after the seed changed: exactly their blocks, merged.
  auto view = ReadView::open(root, "g", 3, "d").value();
  CHECK(view->base_rp() == 1);
  auto ch = view->changed_since_base(0, kDisk).value();
  REQUIRE(ch.size() == 4);
  CHECK((ch[0].offset_bytes == 0 && ch[0].length_bytes == kB64));
  CHECK((ch[1].offset_bytes == 3 * kB64 && ch[1].length_bytes == kB64));
  CHECK((ch[2].offset_bytes == 9 * kB64 && ch[2].length_bytes == kB64));
  CHECK((ch[3].offset_bytes == 12 * kB64 && ch[3].length_bytes == kB64));
  auto part = view->changed_since_base(3 * kB64 + 100, kB64).value();
  REQUIRE(part.size() == 1);
  CHECK((part[0].offset_bytes == 3 * kB64 + 100 && part[0].length_bytes == kB64 - 100));
  {
    // A resize: the bytes past the seed's end are the RP's (zeros or records), all changed.
    auto store = GroupStore::open(options(root), "g", false).value();
    TestRp grown = resync_rp(4, 3, {16});
    grown.begin.disks[0].size_bytes = kDisk + 2 * kB64;
    REQUIRE(feed_rp(*store, grown).is_ok());
  }
  auto v4 = ReadView::open(root, "g", 4, "d").value();
  auto g4 = v4->changed_since_base(0, kDisk + 2 * kB64).value();
  REQUIRE(g4.size() == 5);  // 0, 3, 9, 12, then [old end, new end): a record and zeros
  CHECK((g4[4].offset_bytes == kDisk && g4[4].length_bytes == 2 * kB64));
  // The seed RP itself changed nothing.
  auto v1 = ReadView::open(root, "g", 1, "d").value();
  CHECK(v1->changed_since_base(0, kDisk).value().empty());
}

TEST_CASE("seed: refusals", "[seed]") {
  TempDir d("/dev/shm");
  const std::string dir = d.path() + "/g";
  fs::create_directories(dir + "/replica");
  spit(dir + "/replica/d.img", std::string(4096, 'x'));
  CHECK(write_seed_state(dir, "g", 1, {{"d", kDisk}}, 1).code() == Errc::invalid_argument);
  CHECK(write_seed_state(dir, "g", 1, {{"e", 4096}}, 1).code() == Errc::not_found);
  CHECK(write_seed_state(dir, "bad/name", 1, {{"d", 4096}}, 1).code() == Errc::invalid_argument);
  CHECK_FALSE(fs::exists(dir + "/state"));
}

namespace {

// A protected group at `root`: RPs 1 (full) .. 6, failed over at 4, the images at RP 4, then
// the "VM's writes" put into the image (as qemu-img commit would). Returns the final image.
std::string failed_over_and_committed(const std::string& root) {
  std::string img;
  {
    auto store = GroupStore::open(options(root), "g", true).value();
    for (std::uint64_t id = 1; id <= 6; ++id) {
      TestRp rp;
      rp.begin = {id, id - 1, id * 1000, 0, {disk("d", kDisk, id == 1)}};
      for (std::uint32_t i = 0; i < 3; ++i)
        rp.blocks.push_back({0, ((id * 5 + i) % 16) * kB64, kB64, RecordKind::data,
                             RecordCodec::none, id * 10 + i});
      REQUIRE(feed_rp(*store, rp).is_ok());
    }
    FailoverState s;
    s.rp_id = 4;
    s.since_unix_ns = 1;
    REQUIRE(write_failover_state(root + "/g", s).is_ok());
    REQUIRE(store->fail_over_to(4).is_ok());
  }
  img = slurp(root + "/g/replica/d.img");
  img.replace(2 * kB64, kB64, block_bytes(777, kB64));
  spit(root + "/g/replica/d.img", img);
  return img;
}

std::string check_reset(const std::string& root, const std::string& img, std::uint64_t base,
                        const std::string& scratch) {
  ::unlink((root + "/g/" + kFailoverStateFile).c_str());
  auto store = GroupStore::open(options(root), "g", false);
  if (!store.is_ok()) return "open: " + store.status().to_string();
  if ((*store)->last_committed_rp() != base)
    return "newest RP " + std::to_string((*store)->last_committed_rp());
  auto pts = (*store)->points();
  if (pts.size() != 1 || pts[0].rp_id != base) return "points: " + std::to_string(pts.size());
  if (!((*store)->replica_disks().at(0).identity == Hash128{})) return "identity kept";
  const std::string out = scratch + "/out";
  if (Status s = (*store)->restore(base, "d", out); !s.is_ok()) return s.to_string();
  if (slurp(out) != img) return "restore of the new base differs";
  TestRp next = resync_rp(base + 1, base, {1});
  if (auto r = feed_rp(**store, next); !r.is_ok()) return "next RP: " + r.status().to_string();
  if (fs::exists(root + "/g/journal")) return "old journal generation left";
  return "";
}

}  // namespace

TEST_CASE("failback reset: one new base above every RP, a new journal", "[seed]") {
  spdlog::set_level(spdlog::level::err);
  TempDir d("/dev/shm");
  const std::string root = d.path() + "/s";
  const std::string img = failed_over_and_committed(root);
  CHECK(next_unused_rp(root, "g").value() == 7);
  CHECK(reset_to_base(root, "g", 6, {{"d", kDisk}}, 5).code() == Errc::invalid_argument);
  {
    auto holder = GroupStore::open(options(root), "g", false).value();  // the lock is held
    CHECK(reset_to_base(root, "g", 7, {{"d", kDisk}}, 5).code() == Errc::busy);
  }
  REQUIRE(reset_to_base(root, "g", 7, {{"d", kDisk}}, 5).is_ok());
  REQUIRE(reset_to_base(root, "g", 7, {{"d", kDisk}}, 5).is_ok());  // idempotent
  CHECK(check_reset(root, img, 7, d.path()) == "");
}

TEST_CASE("failback reset kill child", "[.reset_kill_child]") {
  const std::string root = std::getenv("FERRY_RESET_ROOT");
  REQUIRE(reset_to_base(root, "g", 7, {{"d", kDisk}}, 5).is_ok());
}

TEST_CASE("failback reset: SIGKILL at every point, then again", "[seed]") {
  spdlog::set_level(spdlog::level::err);
  int fired = 0;
  for (const char* point : {"failback.before_reset_state", "failback.after_reset_state"}) {
    TempDir d("/dev/shm");
    const std::string root = d.path() + "/s";
    const std::string img = failed_over_and_committed(root);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      const int null = ::open("/dev/null", O_WRONLY);
      ::dup2(null, 1);
      ::dup2(null, 2);
      ::setenv("FERRY_KILL_AT", point, 1);
      ::setenv("FERRY_RESET_ROOT", root.c_str(), 1);
      ::execl("/proc/self/exe", "/proc/self/exe", "[.reset_kill_child]", nullptr);
      ::_exit(127);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    fired += WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
    if (std::string(point) == "failback.before_reset_state") {
      // The old state: every RP as before.
      auto pts = list_points(root, "g").value();
      CHECK(pts.size() == 3);  // 4 (the base), 5, 6
    }
    REQUIRE(reset_to_base(root, "g", 7, {{"d", kDisk}}, 5).is_ok());
    INFO(point);
    CHECK(check_reset(root, img, 7, d.path()) == "");
  }
  CHECK(fired == 2);
}
