// Failover in the store (failover_state.h, GroupStore::fail_over_to): the images brought
// forward to an RP by the store's own compaction, with the group's retention off, and
// SIGKILL at every point of it (failover.after_intent and the compaction's apply.*, state.*,
// prune.after_base), then the same call again: the images hold exactly the RP, and every
// RP at or above it still restores byte for byte.
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
#include "ferry/site/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;
namespace fs = std::filesystem;

namespace {

constexpr std::uint32_t kB64 = 65536;
constexpr std::uint64_t kDisk = 1u << 20;
constexpr std::uint64_t kRps = 6;

// RP `id` of disk "d": a full copy first, then 4 blocks of 64 KiB at offsets from the id.
TestRp rp_of(std::uint64_t id) {
  TestRp rp;
  rp.begin = {id, id - 1, id * 1000, 0, {disk("d", kDisk, id == 1)}};
  for (std::uint32_t i = 0; i < 4; ++i)
    rp.blocks.push_back({0, ((id * 7 + i * 3) % (kDisk / kB64)) * kB64, kB64, RecordKind::data,
                         RecordCodec::none, id * 1000 + i});
  return rp;
}

Model model_all() {
  std::vector<TestRp> rps;
  for (std::uint64_t id = 1; id <= kRps; ++id) rps.push_back(rp_of(id));
  return model_of(rps);
}

StoreOptions options(const std::string& root) {
  StoreOptions o;
  o.root = root;
  o.segment_bytes = 8u << 20;
  o.retention.keep_last = 100;
  return o;
}

void fill(const std::string& root) {
  auto store = GroupStore::open(options(root), "g", true).value();
  for (std::uint64_t id = 1; id <= kRps; ++id) {
    REQUIRE(feed_rp(*store, rp_of(id)).is_ok());
    REQUIRE(store->apply_committed().is_ok());
  }
}

void mark(const std::string& root, std::uint64_t rp) {
  FailoverState s;
  s.rp_id = rp;
  s.since_unix_ns = 1'796'000'000'000'000'000ull;
  REQUIRE(write_failover_state(root + "/g", s).is_ok());
}

// "" when the group is failed over at `rp` as it must be, else what is wrong.
std::string check_failed_over(const std::string& root, const Model& m, std::uint64_t rp,
                              const std::string& scratch) {
  auto store = GroupStore::open(options(root), "g", false);
  if (!store.is_ok()) return "open: " + store.status().to_string();
  if (Status s = (*store)->fail_over_to(rp); !s.is_ok()) return "again: " + s.to_string();
  if ((*store)->last_applied_rp() != rp)
    return "base is RP " + std::to_string((*store)->last_applied_rp());
  std::string img = slurp(root + "/g/replica/d.img");
  img.resize(kDisk, '\0');
  if (img != m.at(rp).at("d")) return "the image is not RP " + std::to_string(rp);
  for (std::uint64_t id = rp; id <= kRps; ++id) {
    const std::string out = scratch + "/r.img";
    if (Status s = (*store)->restore(id, "d", out); !s.is_ok())
      return "restore RP " + std::to_string(id) + ": " + s.to_string();
    std::string got = slurp(out);
    got.resize(kDisk, '\0');
    if (got != m.at(id).at("d")) return "RP " + std::to_string(id) + " restores wrong";
  }
  return "";
}

}  // namespace

TEST_CASE("failover: images forward to the RP, newer RPs kept, retention off, RPs refused",
          "[failover]") {
  spdlog::set_level(spdlog::level::err);
  TempDir d("/dev/shm");
  const std::string root = d.path() + "/s";
  fill(root);
  const Model m = model_all();
  {
    auto store = GroupStore::open(options(root), "g", false).value();
    REQUIRE(store->last_applied_rp() == 1);
    mark(root, 4);
    REQUIRE(failed_over(root + "/g"));
    // Unknown, not yet committed: named, nothing written.
    Status s = store->fail_over_to(kRps + 3);
    REQUIRE(s.code() == Errc::not_found);
    CHECK(s.message().find("RP 9 is not committed") != std::string::npos);
    REQUIRE(store->fail_over_to(4).is_ok());
    REQUIRE(store->last_applied_rp() == 4);
    // Retention is off: a policy that would drop everything but the newest does nothing.
    store->set_retention(keep_newest_only());
    REQUIRE(store->apply_committed().is_ok());
    CHECK(store->last_applied_rp() == 4);
    auto p = store->prune(keep_newest_only(), 0, false);
    REQUIRE_FALSE(p.is_ok());
    CHECK(p.status().message().find("was failed over at RP 4") != std::string::npos);
    // An RP for the group is refused naming the state.
    Status b = store->begin_rp(rp_of(kRps + 1).begin);
    REQUIRE_FALSE(b.is_ok());
    CHECK(b.message() ==
          "group 'g' was failed over at RP 4 on 2026-11-30T00:53Z (ferry failover); it accepts "
          "no RPs until failback");
    // Older than the base: pruned.
    Status old = store->fail_over_to(2);
    REQUIRE(old.code() == Errc::not_found);
    CHECK(old.message().find("RP 2 was pruned") != std::string::npos);
  }
  CHECK(check_failed_over(root, m, 4, d.path()) == "");
}

TEST_CASE("failover: at the newest RP", "[failover]") {
  spdlog::set_level(spdlog::level::err);
  TempDir d("/dev/shm");
  const std::string root = d.path() + "/s";
  fill(root);
  mark(root, kRps);
  CHECK(check_failed_over(root, model_all(), kRps, d.path()) == "");
}

// The child of the kill-point sweep: fails the group over to FERRY_FAILOVER_RP.
TEST_CASE("failover kill child", "[.failover_kill_child]") {
  const std::string root = std::getenv("FERRY_FAILOVER_ROOT");
  const std::uint64_t rp = std::stoull(std::getenv("FERRY_FAILOVER_RP"));
  auto store = GroupStore::open(options(root), "g", false).value();
  REQUIRE(store->fail_over_to(rp).is_ok());
}

TEST_CASE("failover: SIGKILL at every point of the store's part, then again", "[failover]") {
  spdlog::set_level(spdlog::level::err);
  const Model m = model_all();
  int fired = 0, violations = 0;
  for (auto point : kKillPoints) {
    const std::string name(point);
    const bool ours = name.rfind("failover.after_intent", 0) == 0 ||
                      name.rfind("apply.", 0) == 0 || name.rfind("state.", 0) == 0 ||
                      name == "prune.after_base";
    if (!ours) continue;
    // FERRY_LONG: later hits too (the compaction writes many records per RP).
    const int hits = std::getenv("FERRY_LONG") != nullptr ? 6 : 2;
    for (int hit = 1; hit <= hits; ++hit) {
      TempDir d("/dev/shm");
      const std::string root = d.path() + "/s";
      fill(root);
      mark(root, 5);
      const pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        const int null = ::open("/dev/null", O_WRONLY);
        ::dup2(null, 1);
        ::dup2(null, 2);
        const std::string at = name + ":" + std::to_string(hit);
        ::setenv("FERRY_KILL_AT", at.c_str(), 1);
        ::setenv("FERRY_FAILOVER_ROOT", root.c_str(), 1);
        ::setenv("FERRY_FAILOVER_RP", "5", 1);
        ::execl("/proc/self/exe", "/proc/self/exe", "[.failover_kill_child]", nullptr);
        ::_exit(127);
      }
      int status = 0;
      REQUIRE(::waitpid(pid, &status, 0) == pid);
      const bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
      INFO("kill point " << name << ":" << hit << " status " << status);
      REQUIRE((killed || (WIFEXITED(status) && WEXITSTATUS(status) == 0)));
      fired += killed;
      const std::string why = check_failed_over(root, m, 5, d.path());
      INFO(why);
      violations += !why.empty();
      CHECK(why == "");
    }
  }
  std::printf("failover store kill points: %d crashes, %d violations\n", fired, violations);
  CHECK(fired >= 5);
  CHECK(violations == 0);
}
