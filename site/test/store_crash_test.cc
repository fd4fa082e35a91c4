// Crash and fault tests of the store: power cuts over every prefix of unsynced writes (the
// faulty twin drops, tears or misdirects), EIO/ENOSPC at every N, and SIGKILL at every
// named kill point in a child process. Oracle: after recovery the replica and every
// restorable RP equal one committed RP k, with last acknowledged <= k <= last begun.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>

#include <ctime>
#include <filesystem>

#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "ferry/site/faulty_storage.h"
#include "ferry/site/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;

namespace {

struct Outcome {
  std::uint64_t last_acked = 0;
  std::uint64_t last_begun = 0;
  bool ack_after_data_loss = false;
};

// The receiver's loop, reduced: commit (= acknowledge), then apply. After the first error it
// keeps trying (as a careless caller would) to prove no later commit succeeds after a failed
// sync without a re-open.
Outcome run_workload(const StoreOptions& opt, const std::vector<TestRp>& rps) {
  Outcome o;
  auto store = GroupStore::open(opt, "g", true);
  if (!store.is_ok()) return o;
  bool data_lost = false, failed = false;
  for (const auto& rp : rps) {
    if (rp.begin.rp_id <= (*store)->last_committed_rp()) continue;
    o.last_begun = std::max(o.last_begun, rp.begin.rp_id);
    auto info = feed_rp(**store, rp);
    if (!info.is_ok()) {
      data_lost = data_lost || info.status().data_lost();
      failed = true;
      continue;
    }
    if (data_lost) o.ack_after_data_loss = true;
    if (!failed) o.last_acked = rp.begin.rp_id;
    // A failed apply (R19) touches no journal byte: later commits are acknowledged as the
    // receiver does; only a failure of the store itself ends the acknowledgements.
    Status a = (*store)->apply_committed();
    if (!a.is_ok() && (*store)->apply_error().is_ok()) {
      data_lost = data_lost || a.data_lost();
      failed = true;
    }
  }
  return o;
}

// "" when the store at opt.root recovers to a committed RP within the bounds.
std::string verify_recovered(StoreOptions opt, const Model& model, const Outcome& o,
                             const std::string& scratch) {
  opt.storage = nullptr;  // the real file system, on whatever the crash left
  auto store = GroupStore::open(opt, "g", true);
  if (!store.is_ok()) return "re-open failed: " + store.status().to_string();
  std::uint64_t k = (*store)->last_committed_rp();
  if (k < o.last_acked)
    return "acknowledged RP " + std::to_string(o.last_acked) + " lost (k=" + std::to_string(k) + ")";
  if (k > std::max(o.last_begun, o.last_acked))
    return "RP " + std::to_string(k) + " committed but never sent";
  if (k == 0) return "";
  if ((*store)->last_applied_rp() != k) return "replica not at the last committed RP";
  for (std::uint64_t r = 1; r <= k; ++r) {
    std::string why = check_rp(**store, model, r, opt.root, scratch, r == k);
    if (!why.empty()) return why;
  }
  return "";
}

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

const char* mode_name(CutMode m) {
  return m == CutMode::drop ? "drop" : m == CutMode::tear ? "tear" : "misdirect";
}

// Stores whose next open must rewrite the replica from the journal, so the sweeps also cut
// the rebuild itself short (R16): an image missing (R13), an image of the wrong size (R13),
// and a half-written image without a state file (R6), as a rebuild cut short before the
// state was marked used to leave it.
constexpr int kRebuildStarts = 3;
const char* rebuild_start_name(int start) {
  return start == 0 ? "image missing" : start == 1 ? "image truncated" : "half written, no state";
}

// Commits and applies the small run at root, then damages it as `start` says.
void prepare_rebuild_start(const std::string& root, int start) {
  StoreOptions opt;
  opt.root = root;
  Outcome o = run_workload(opt, small_run());
  if (o.last_acked != 3) std::abort();
  std::string replica = root + "/g/replica/";
  if (start == 0) std::filesystem::remove(replica + "a.img");
  if (start == 1) std::filesystem::resize_file(replica + "b.img", 4096);
  if (start == 2) {
    std::filesystem::remove(root + "/g/state");
    std::string img = slurp(replica + "a.img");
    spit(replica + "a.img", block_bytes(5, static_cast<std::uint32_t>(img.size() / 2)) +
                                img.substr(img.size() / 2));
  }
}

}  // namespace

TEST_CASE("power cut at every operation, every prefix of unsynced writes, drop/tear/misdirect",
          "[store][crash]") {
  spdlog::set_level(spdlog::level::off);  // thousands of stores warn and fail on purpose
  auto rps = small_run();
  Model model = model_of(rps);
  std::uint64_t total_ops = 0;
  {
    TempDir d("/dev/shm");
    StoreOptions opt;
    opt.root = d.path() + "/s";
    auto twin = FaultyStorage::create(real_storage(), 1, {{}, true, true, 0});
    opt.storage = twin;
    Outcome o = run_workload(opt, rps);
    REQUIRE(o.last_acked == 3);
    total_ops = twin->mutating_ops();
  }
  std::uint64_t states = 0, violations = 0, torn_or_misdirected = 0;
  auto t0 = std::time(nullptr);
  // The seed picks where a misdirected write lands; a long run tries more of them.
  const std::uint64_t reps = long_mode() ? 8 : 1;
  for (std::uint64_t rep = 0; rep < reps; ++rep)
  for (std::uint64_t n = 1; n <= total_ops; ++n) {
    for (CutMode mode : {CutMode::drop, CutMode::tear, CutMode::misdirect}) {
      std::size_t unsynced = 0;
      for (std::size_t keep = 0; keep <= unsynced; ++keep) {
        TempDir d("/dev/shm");
        StoreOptions opt;
        opt.root = d.path() + "/s";
        std::uint64_t seed = rep * 1000003 + n * 1000 + keep * 3 + static_cast<std::uint64_t>(mode);
        auto twin = FaultyStorage::create(real_storage(), seed, {{}, true, true, n});
        opt.storage = twin;
        Outcome o = run_workload(opt, rps);
        if (keep == 0) unsynced = twin->unsynced_ops();
        REQUIRE(twin->unsynced_ops() == unsynced);  // the run is deterministic
        REQUIRE(twin->power_cut(keep, mode).is_ok());
        ++states;
        if (mode != CutMode::drop && keep < unsynced) ++torn_or_misdirected;
        std::string why = verify_recovered(opt, model, o, d.path());
        if (!why.empty()) {
          ++violations;
          UNSCOPED_INFO("power cut after op " << n << " keep " << keep << " mode "
                                              << mode_name(mode) << " seed " << seed << ": "
                                              << why);
          CHECK(why == "");
        }
      }
    }
  }
  std::printf("store power cut: %llu crash states (%llu with a torn or misdirected write) over "
              "%llu operations, %llu violations\n",
              static_cast<unsigned long long>(states),
              static_cast<unsigned long long>(torn_or_misdirected),
              static_cast<unsigned long long>(total_ops),
              static_cast<unsigned long long>(violations));
  write_figure("store-power-cut",
               std::to_string(states) + " crash states, " + std::to_string(violations) +
                   " violations, torn and misdirected records detected 100%",
               "\"seed\": null, \"iterations\": " + std::to_string(states) +
                   ", \"faults_injected\": " + std::to_string(states) +
                   ", \"torn_or_misdirected_states\": " + std::to_string(torn_or_misdirected) +
                   ", \"operations\": " + std::to_string(total_ops) +
                   ", \"violations\": " + std::to_string(violations) +
                   ", \"duration_s\": " + std::to_string(std::time(nullptr) - t0));
  CHECK(violations == 0);
  CHECK(states > total_ops);
}

TEST_CASE("EIO and ENOSPC at every N, transient and persistent", "[store][crash]") {
  spdlog::set_level(spdlog::level::off);
  auto rps = small_run();
  Model model = model_of(rps);
  struct Kind {
    FaultOp op;
    int err;
  };
  std::uint64_t runs = 0, violations = 0, acks_after_failed_sync = 0;
  auto t0 = std::time(nullptr);
  for (Kind kind : {Kind{FaultOp::write, EIO}, Kind{FaultOp::write, ENOSPC},
                    Kind{FaultOp::sync, EIO}, Kind{FaultOp::read, EIO}}) {
    for (bool persistent : {false, true}) {
      for (std::uint64_t n = 1;; ++n) {
        TempDir d("/dev/shm");
        StoreOptions opt;
        opt.root = d.path() + "/s";
        FaultPlan plan;
        plan.rules.push_back(FaultRule{kind.op, kind.err, n, persistent, ""});
        auto twin = FaultyStorage::create(real_storage(), n, plan);
        opt.storage = twin;
        Outcome o = run_workload(opt, rps);
        if (twin->faults_injected() == 0) break;  // past the last matching operation
        ++runs;
        if (o.ack_after_data_loss) ++acks_after_failed_sync;
        std::string why = verify_recovered(opt, model, o, d.path());
        if (!why.empty()) {
          ++violations;
          UNSCOPED_INFO("fault op " << int(kind.op) << " errno " << kind.err << " at " << n
                                    << (persistent ? " persistent: " : " transient: ") << why);
          CHECK(why == "");
        }
      }
    }
  }
  std::printf("store I/O errors: %llu runs, %llu acks after a failed fsync, %llu violations\n",
              static_cast<unsigned long long>(runs),
              static_cast<unsigned long long>(acks_after_failed_sync),
              static_cast<unsigned long long>(violations));
  write_figure("store-io-errors",
               std::to_string(runs) + " runs, " + std::to_string(acks_after_failed_sync) +
                   " acks after a failed fsync, " + std::to_string(violations) + " violations",
               "\"seed\": null, \"iterations\": " + std::to_string(runs) +
                   ", \"faults_injected\": " + std::to_string(runs) +
                   ", \"acks_after_failed_fsync\": " + std::to_string(acks_after_failed_sync) +
                   ", \"violations\": " + std::to_string(violations) +
                   ", \"duration_s\": " + std::to_string(std::time(nullptr) - t0));
  CHECK(acks_after_failed_sync == 0);
  CHECK(violations == 0);
  CHECK(runs > 50);
}

TEST_CASE("power cut at every operation of a replica rebuild (R16), drop/tear/misdirect",
          "[store][crash]") {
  spdlog::set_level(spdlog::level::off);
  auto rps = small_run();
  Model model = model_of(rps);
  std::uint64_t states = 0, violations = 0, total_ops = 0;
  auto t0 = std::time(nullptr);
  for (int start = 0; start < kRebuildStarts; ++start) {
    TempDir tmpl("/dev/shm");
    prepare_rebuild_start(tmpl.path() + "/s", start);
    auto fresh_copy = [&](const TempDir& d) {
      std::filesystem::copy(tmpl.path() + "/s", d.path() + "/s",
                            std::filesystem::copy_options::recursive);
    };
    std::uint64_t ops = 0;
    {
      TempDir d("/dev/shm");
      fresh_copy(d);
      StoreOptions opt;
      opt.root = d.path() + "/s";
      auto twin = FaultyStorage::create(real_storage(), 1, {{}, true, true, 0});
      opt.storage = twin;
      REQUIRE(run_workload(opt, rps).last_begun == 0);  // recovery alone brings it to RP 3
      ops = twin->mutating_ops();
    }
    total_ops += ops;
    for (std::uint64_t n = 1; n <= ops; ++n) {
      for (CutMode mode : {CutMode::drop, CutMode::tear, CutMode::misdirect}) {
        std::size_t unsynced = 0;
        for (std::size_t keep = 0; keep <= unsynced; ++keep) {
          TempDir d("/dev/shm");
          fresh_copy(d);
          StoreOptions opt;
          opt.root = d.path() + "/s";
          std::uint64_t seed = n * 1000 + keep * 3 + static_cast<std::uint64_t>(mode);
          auto twin = FaultyStorage::create(real_storage(), seed, {{}, true, true, n});
          opt.storage = twin;
          Outcome o = run_workload(opt, rps);
          o.last_acked = o.last_begun = 3;  // acknowledged before the damage
          if (keep == 0) unsynced = twin->unsynced_ops();
          REQUIRE(twin->unsynced_ops() == unsynced);
          REQUIRE(twin->power_cut(keep, mode).is_ok());
          ++states;
          std::string why = verify_recovered(opt, model, o, d.path());
          if (!why.empty()) {
            ++violations;
            UNSCOPED_INFO("rebuild from '" << rebuild_start_name(start) << "', power cut after op "
                                           << n << " keep " << keep << " mode "
                                           << mode_name(mode) << " seed " << seed << ": " << why);
            CHECK(why == "");
          }
        }
      }
    }
  }
  std::printf("store power cut during rebuilds: %llu crash states over %llu operations, %llu "
              "violations, %lld s\n",
              static_cast<unsigned long long>(states), static_cast<unsigned long long>(total_ops),
              static_cast<unsigned long long>(violations),
              static_cast<long long>(std::time(nullptr) - t0));
  CHECK(violations == 0);
  CHECK(states > total_ops);
}

TEST_CASE("EIO and ENOSPC at every N during a replica rebuild (R16)", "[store][crash]") {
  spdlog::set_level(spdlog::level::off);
  auto rps = small_run();
  Model model = model_of(rps);
  struct Kind {
    FaultOp op;
    int err;
  };
  std::uint64_t runs = 0, violations = 0;
  for (int start = 0; start < kRebuildStarts; ++start) {
    TempDir tmpl("/dev/shm");
    prepare_rebuild_start(tmpl.path() + "/s", start);
    for (Kind kind : {Kind{FaultOp::write, EIO}, Kind{FaultOp::write, ENOSPC},
                      Kind{FaultOp::sync, EIO}, Kind{FaultOp::read, EIO}}) {
      for (bool persistent : {false, true}) {
        for (std::uint64_t n = 1;; ++n) {
          TempDir d("/dev/shm");
          std::filesystem::copy(tmpl.path() + "/s", d.path() + "/s",
                                std::filesystem::copy_options::recursive);
          StoreOptions opt;
          opt.root = d.path() + "/s";
          FaultPlan plan;
          plan.rules.push_back(FaultRule{kind.op, kind.err, n, persistent, ""});
          auto twin = FaultyStorage::create(real_storage(), n, plan);
          opt.storage = twin;
          Outcome o = run_workload(opt, rps);
          if (twin->faults_injected() == 0) break;
          ++runs;
          o.last_acked = o.last_begun = 3;
          std::string why = verify_recovered(opt, model, o, d.path());
          if (!why.empty()) {
            ++violations;
            UNSCOPED_INFO("rebuild from '" << rebuild_start_name(start) << "', fault op "
                                           << int(kind.op) << " errno " << kind.err << " at " << n
                                           << (persistent ? " persistent: " : " transient: ")
                                           << why);
            CHECK(why == "");
          }
        }
      }
    }
  }
  std::printf("store I/O errors during rebuilds: %llu runs, %llu violations\n",
              static_cast<unsigned long long>(runs), static_cast<unsigned long long>(violations));
  CHECK(violations == 0);
  CHECK(runs > 50);
}

// R18: the receiver drops a failed store and re-opens it in the same process (same page
// cache); the faulty twin keeps the pages of a failed datasync readable but lost, as Linux
// does. The re-opened store must not count what no successful sync covered, and after the
// workload completes and the power is cut, every acknowledged RP must be there, no hole.
TEST_CASE("EIO and ENOSPC at every N, then a re-open in the same process and a power cut (R18)",
          "[store][crash]") {
  spdlog::set_level(spdlog::level::off);
  auto rps = small_run();
  Model model = model_of(rps);
  struct Kind {
    FaultOp op;
    int err;
  };
  std::uint64_t runs = 0, violations = 0;
  for (Kind kind : {Kind{FaultOp::sync, EIO}, Kind{FaultOp::write, EIO},
                    Kind{FaultOp::write, ENOSPC}}) {
    bool past_last = false;
    for (std::uint64_t n = 1; !past_last; ++n) {
      std::size_t unsynced = 0;
      for (std::size_t keep = 0; keep <= unsynced; ++keep) {
        TempDir d("/dev/shm");
        StoreOptions opt;
        opt.root = d.path() + "/s";
        FaultPlan plan;
        plan.rules.push_back(FaultRule{kind.op, kind.err, n, false, ""});
        plan.track_unsynced = true;
        plan.skip_inner_sync = true;
        auto twin = FaultyStorage::create(real_storage(), n, plan);
        opt.storage = twin;
        Outcome first = run_workload(opt, rps);
        if (twin->faults_injected() == 0) {
          past_last = true;
          break;
        }
        Outcome again = run_workload(opt, rps);  // the next session, same process
        if (keep == 0) unsynced = twin->unsynced_ops();
        REQUIRE(twin->unsynced_ops() == unsynced);
        ++runs;
        Outcome o;
        o.last_acked = std::max(first.last_acked, again.last_acked);
        o.last_begun = std::max(first.last_begun, again.last_begun);
        std::string why;
        if (o.last_acked != 3) why = "the re-opened store did not complete the workload";
        if (why.empty() && !twin->power_cut(keep, CutMode::drop).is_ok()) why = "power cut failed";
        if (why.empty()) why = verify_recovered(opt, model, o, d.path());
        if (!why.empty()) {
          ++violations;
          UNSCOPED_INFO("fault op " << int(kind.op) << " errno " << kind.err << " at " << n
                                    << ", re-open, power cut keeping " << keep << ": " << why);
          CHECK(why == "");
        }
      }
    }
  }
  std::printf("store failed sync then re-open and power cut: %llu runs, %llu violations\n",
              static_cast<unsigned long long>(runs), static_cast<unsigned long long>(violations));
  CHECK(violations == 0);
  CHECK(runs > 30);
}

// --- kill points: a child process runs the workload with FERRY_KILL_AT set ---

TEST_CASE("store kill-point child (run by the kill-point test)", "[.store_kill_child]") {
  const char* root = std::getenv("FERRY_STORE_CHILD_ROOT");
  if (root == nullptr) return;
  StoreOptions opt;
  opt.root = root;
  auto store = GroupStore::open(opt, "g", true);
  if (!store.is_ok()) ::_exit(3);
  std::string acked = std::string(root) + "/acked";
  for (const auto& rp : small_run()) {
    if (rp.begin.rp_id <= (*store)->last_committed_rp()) continue;
    if (!feed_rp(**store, rp).is_ok()) ::_exit(4);
    int fd = ::open(acked.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::string id = std::to_string(rp.begin.rp_id);
    if (fd < 0 || ::write(fd, id.data(), id.size()) < 0 || ::fsync(fd) != 0) ::_exit(6);
    ::close(fd);
    if (!(*store)->apply_committed().is_ok()) ::_exit(5);
  }
  ::_exit(0);
}

TEST_CASE("SIGKILL at every store kill point, recovery after", "[store][crash]") {
  spdlog::set_level(spdlog::level::err);
  auto rps = small_run();
  Model model = model_of(rps);
  int crash_points = 0, violations = 0;
  auto t0 = std::time(nullptr);
  for (auto point : kKillPoints) {
    std::string name(point);
    bool store_point = name.rfind("journal.", 0) == 0 || name.rfind("apply.", 0) == 0 ||
                       name.rfind("state.", 0) == 0 || name.rfind("rebuild.", 0) == 0;
    if (!store_point) continue;
    bool at_recovery = name.find("truncate") != std::string::npos;
    bool at_rebuild = name.rfind("rebuild.", 0) == 0;
    for (int hit = 1; hit <= 3; ++hit) {
      TempDir d;
      std::string root = d.path() + "/s";
      Outcome o;
      if (at_recovery) {  // the truncate points fire while recovery cuts a torn tail
        StoreOptions opt;
        opt.root = root;
        o = run_workload(opt, {rps[0]});
        std::string seg = root + "/g/journal/0000000000000001.seg";
        spit(seg, slurp(seg) + block_bytes(7, 5000));
        spit(root + "/acked", "1");
      }
      if (at_rebuild) {  // these fire while recovery rewrites the replica (R16)
        prepare_rebuild_start(root, (hit - 1) % kRebuildStarts);
        spit(root + "/acked", "3");
      }
      pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        int null = ::open("/dev/null", O_WRONLY);
        ::dup2(null, 1);
        ::dup2(null, 2);
        std::string at = name + ":" + std::to_string(hit);
        ::setenv("FERRY_KILL_AT", at.c_str(), 1);
        ::setenv("FERRY_STORE_CHILD_ROOT", root.c_str(), 1);
        ::execl("/proc/self/exe", "/proc/self/exe", "[.store_kill_child]", nullptr);
        ::_exit(127);
      }
      int status = 0;
      REQUIRE(::waitpid(pid, &status, 0) == pid);
      bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
      bool finished = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      INFO("kill point " << name << ":" << hit << " status " << status);
      REQUIRE((killed || finished));
      if (killed) ++crash_points;
      std::string acked = slurp(root + "/acked");
      o.last_acked = acked.empty() ? 0 : std::stoull(acked);
      o.last_begun = 3;
      StoreOptions opt;
      opt.root = root;
      std::string why = verify_recovered(opt, model, o, d.path());
      if (!why.empty()) ++violations;
      CHECK(why == "");
    }
  }
  std::printf("store kill points: %d crash points, %d replicas not equal to one committed RP "
              "or acknowledged RPs lost\n", crash_points, violations);
  write_figure("store-kill-points",
               std::to_string(crash_points) + " crash points, " + std::to_string(violations) +
                   " replicas not equal to one committed RP or acknowledged RPs lost",
               "\"seed\": null, \"iterations\": " + std::to_string(crash_points) +
                   ", \"faults_injected\": " + std::to_string(crash_points) +
                   ", \"violations\": " + std::to_string(violations) + ", \"duration_s\": " + std::to_string(std::time(nullptr) - t0));
  CHECK(crash_points >= 30);
}
