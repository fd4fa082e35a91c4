// The receiver re-opens a failed group by itself, with bounded back-off (receiver.h).
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "ferry/site/failover_state.h"
#include "ferry/site/faulty_storage.h"
#include "ferry/site/receiver.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using ferry::site::test::TempDir;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

GroupStatus status_of(const Receiver& r, const std::string& group) {
  for (const GroupStatus& g : r.status())
    if (g.group == group) return g;
  FAIL("group " << group << " is not in status");
  return {};
}

template <class Pred>
bool wait_until(Pred pred, std::chrono::milliseconds bound) {
  const auto end = std::chrono::steady_clock::now() + bound;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

}  // namespace

TEST_CASE("a group that fails at start-up is re-opened in the background, with bounded back-off") {
  TempDir dir;
  const std::string root = dir.path() + "/store";
  {
    auto store = GroupStore::open(StoreOptions{.root = root}, "g1", /*create=*/true);
    REQUIRE(store.is_ok());
  }
  // Recovery cannot run while the journal directory is a file.
  const std::string journal = root + "/g1/journal";
  fs::rename(journal, journal + ".away");
  std::ofstream(journal) << "not a directory\n";

  ReceiverOptions o;
  o.store.root = root;
  o.reopen_min = 40ms;
  o.reopen_max = 160ms;
  auto r = Receiver::create(o);
  REQUIRE(r.is_ok());
  GroupStatus s = status_of(**r, "g1");
  CHECK(s.state == GroupState::failing);
  CHECK(s.cause.find("recovery at start-up failed") != std::string::npos);
  CHECK(s.failing_since_unix_ns > 0);
  CHECK(s.failed_attempts == 1);

  // Over one second: 40 + 80 + 160 + 160 ... ms between attempts (the re-opener looks every
  // 250 ms), never a re-open loop.
  std::this_thread::sleep_for(1s);
  s = status_of(**r, "g1");
  CHECK(s.state == GroupState::failing);
  CHECK(s.failed_attempts >= 3);
  CHECK(s.failed_attempts <= 10);
  CHECK(s.next_reopen_in_ms <= 160);
  CHECK(s.last_error.find("cannot open the store") != std::string::npos);

  // The cause goes away: the group comes back without a session and without a restart.
  fs::remove(journal);
  fs::rename(journal + ".away", journal);
  REQUIRE(wait_until([&] { return status_of(**r, "g1").state == GroupState::ok; }, 2s));
  s = status_of(**r, "g1");
  CHECK(s.cause.empty());
  CHECK(s.last_error.empty());
  CHECK(s.failed_attempts == 0);
}

TEST_CASE("a directory without a journal is not a group") {
  TempDir dir;
  const std::string root = dir.path() + "/store";
  fs::create_directories(root + "/lost+found");
  ReceiverOptions o;
  o.store.root = root;
  auto r = Receiver::create(o);
  REQUIRE(r.is_ok());
  CHECK((*r)->status().empty());
}

// R19: a compaction that fails (here: the replica image of a disk the target RP adds cannot
// be created) used to fail the open, so the group was "failing" and refused every hello
// until the cause was fixed, though its journal was sound. Now the group opens with the
// compaction pending (R5 at open, failing): status says so with the cause, and the
// background thread retries with back-off until it succeeds.
TEST_CASE("a group whose compaction fails at start-up stays open, apply pending, and catches up") {
  namespace t = ferry::site::test;
  TempDir dir;
  const std::string root = dir.path() + "/store";
  auto rps = t::small_run();
  rps.resize(2);
  rps[1].begin.disks.push_back(t::disk("c", 8192, true));  // RP 2 adds disk c
  rps[1].blocks.push_back({2, 0, 8192, RecordKind::data, RecordCodec::none, 23});
  const std::string image = root + "/g2/replica/c.img";
  {
    auto store = GroupStore::open(StoreOptions{.root = root}, "g2", /*create=*/true);
    REQUIRE(store.is_ok());
    for (const auto& rp : rps) {
      REQUIRE(t::feed_rp(**store, rp).is_ok());
      REQUIRE((*store)->apply_committed().is_ok());
    }
    REQUIRE((*store)->last_applied_rp() == 1);
  }
  {  // A compaction to RP 2 decided, then cut short: the state names target RP 2 (R5).
    FaultPlan plan;
    plan.rules.push_back(FaultRule{FaultOp::write, EIO, 1, true, "replica/c.img"});
    StoreOptions faulty{.root = root};
    faulty.storage = FaultyStorage::create(real_storage(), 1, plan);
    auto store = GroupStore::open(faulty, "g2", false);
    REQUIRE(store.is_ok());
    REQUIRE(!(*store)->prune(t::keep_newest_only(), 0, false).is_ok());
  }
  fs::remove_all(image);
  fs::create_directories(image + "/x");  // the redo at open cannot create the image

  ReceiverOptions o;
  o.store.root = root;
  o.reopen_min = 40ms;
  o.reopen_max = 160ms;
  auto r = Receiver::create(o);
  REQUIRE(r.is_ok());
  GroupStatus s = status_of(**r, "g2");
  CHECK(s.state == GroupState::apply_pending);
  CHECK(s.last_committed_rp == 2);
  CHECK(s.cause.find("c.img") != std::string::npos);
  CHECK(s.failed_attempts >= 1);
  CHECK(s.failing_since_unix_ns > 0);

  std::this_thread::sleep_for(1s);  // retried with back-off, never in a loop
  s = status_of(**r, "g2");
  CHECK(s.state == GroupState::apply_pending);
  CHECK(s.failed_attempts >= 3);
  CHECK(s.failed_attempts <= 10);

  fs::remove_all(image);  // the cause goes away: the replica catches up by itself
  REQUIRE(wait_until([&] { return status_of(**r, "g2").state == GroupState::ok; }, 2s));
  s = status_of(**r, "g2");
  CHECK(s.last_applied_rp == 2);
  CHECK(s.cause.empty());
  CHECK(s.failed_attempts == 0);
  const auto model = t::model_of(rps);
  CHECK(t::slurp(image) == model.at(2).at("c"));
  CHECK(t::slurp(root + "/g2/replica/a.img") == model.at(2).at("a"));
}

TEST_CASE("a failed-over group: the receiver closes its store and shows the state") {
  TempDir dir;
  const std::string root = dir.path() + "/store";
  {
    auto store = GroupStore::open(StoreOptions{.root = root}, "g3", /*create=*/true);
    REQUIRE(store.is_ok());
  }
  ReceiverOptions o;
  o.store.root = root;
  auto r = Receiver::create(o);
  REQUIRE(r.is_ok());
  CHECK(status_of(**r, "g3").state == GroupState::ok);
  // The receiver holds the group open: ferry failover cannot take the lock yet.
  CHECK(GroupStore::open(StoreOptions{.root = root}, "g3", false).status().code() == Errc::busy);
  FailoverState st;
  st.rp_id = 7;
  st.since_unix_ns = 1'796'000'000'000'000'000ull;
  REQUIRE(write_failover_state(root + "/g3", st).is_ok());
  // Within its background pass (250 ms) the receiver lets go of the group.
  REQUIRE(wait_until(
      [&] { return GroupStore::open(StoreOptions{.root = root}, "g3", false).is_ok(); }, 3s));
  const GroupStatus s = status_of(**r, "g3");
  CHECK(s.state == GroupState::failed_over);
  CHECK(s.cause ==
        "group 'g3' was failed over at RP 7 on 2026-11-30T00:53Z (ferry failover); it accepts "
        "no RPs until failback");
  CHECK(std::string(group_state_name(s.state)) == "failed_over");
}
