// Crash and fault tests of tiered retention's journal rewrite (docs/journal-format.md,
// "Journal generations", R23/R24): a power cut at every operation (every prefix of the
// unsynced writes landing, the next dropped or torn), EIO/ENOSPC at every N, and SIGKILL at
// the rewrite's kill points and the state writes around them.
//
// The scenario: six RPs at hand-picked times (hours 0, 1 and 2 of a day) kept by the default
// policy; then keep-last 1 + keep-hourly 3 at 2:31 keeps RPs 2, 4 and 6: RP 1 is compacted
// into the images, RPs 3 and 5 are pruned between kept ones and the journal is rewritten
// (generation 1: RP 4 as a delta on 2, RP 6 on 4). RP 7 at 2:40 then drops RP 6 the same
// way (generation 2).
// Oracle after recovery: the newest committed RP is at least the last acknowledged one;
// every offered RP restores byte-identical to the model and the images equal the base RP;
// every RP the policy keeps at the last acknowledged RP is offered; only one journal
// generation is left once a retention pass ran; and that pass brings the store to the
// policy's RPs exactly, with the same bytes.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <sstream>

#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "ferry/site/faulty_storage.h"
#include "ferry/site/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;

namespace {

constexpr std::uint64_t kMin = 60ull * 1'000'000'000ull;
constexpr std::uint64_t kDay = 20514ull * 24 * 60 * kMin;  // 2026-03-02 00:00 UTC

std::vector<TestRp> rewrite_run() {
  std::vector<TestRp> rps = pruning_run();
  const std::uint64_t minutes[] = {50, 55, 70, 80, 120, 150};
  for (std::size_t i = 0; i < rps.size(); ++i) rps[i].begin.created_unix_ns = kDay + minutes[i] * kMin;
  TestRp rp7;
  rp7.begin = {7, 6, kDay + 160 * kMin, 0, {disk("a", 32768, false), disk("c", 12288, false)}};
  rp7.blocks = {{0, 8192, 4096, RecordKind::data, RecordCodec::none, 71},
                {1, 0, 4096, RecordKind::data, RecordCodec::zstd, 72}};
  rps.push_back(rp7);
  return rps;
}

RetentionPolicy tiered() {
  RetentionPolicy p;
  p.keep_last = 1;
  p.keep_hourly = 3;
  return p;
}

// What the policy keeps once RP `acked` is the newest (the scenario's times).
std::vector<std::uint64_t> kept_at(std::uint64_t acked) {
  return acked >= 7 ? std::vector<std::uint64_t>{2, 4, 7} : std::vector<std::uint64_t>{2, 4, 6};
}

StoreOptions tiered_options(const std::string& root, std::uint64_t* now) {
  StoreOptions opt;
  opt.root = root;
  opt.retention = tiered();
  opt.rewrite_min_garbage_bytes = 0;  // rewrite whenever RPs were pruned between kept ones
  opt.clock = [now] { return *now; };
  return opt;
}

std::vector<std::uint64_t> offered_ids(const GroupStore& s) {
  std::vector<std::uint64_t> out;
  for (const auto& p : s.points()) out.push_back(p.rp_id);
  return out;
}

std::vector<std::string> journal_dirs(const std::string& gdir) {
  std::vector<std::string> out;
  for (const auto& e : std::filesystem::directory_iterator(gdir))
    if (e.path().filename().string().rfind("journal", 0) == 0)
      out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// A store with RPs 1..6 committed under the default policy (which keeps them all).
void make_template(const std::string& root) {
  StoreOptions def;
  def.root = root;
  auto store = GroupStore::open(def, "g", true).value();
  auto rps = rewrite_run();
  for (std::size_t i = 0; i < 6; ++i) {
    REQUIRE(feed_rp(*store, rps[i]).is_ok());
    REQUIRE(store->apply_committed().is_ok());
  }
  REQUIRE(offered_ids(*store) == std::vector<std::uint64_t>{1, 2, 3, 4, 5, 6});
}

// The run under test: the tiered pass over RPs 1..6 (rewrite 1), RP 7 and its pass
// (rewrite 2). Returns the last acknowledged RP (6 unless RP 7 committed).
std::uint64_t run(const StoreOptions& base_opt, std::uint64_t* now,
                  const std::function<void(std::uint64_t)>& on_ack = {}) {
  std::uint64_t acked = 6;
  StoreOptions opt = base_opt;
  *now = kDay + 151 * kMin;
  auto store = GroupStore::open(opt, "g", false);
  if (!store.is_ok()) return acked;
  if (!(*store)->apply_committed().is_ok() && (*store)->apply_error().is_ok()) return acked;
  *now = kDay + 161 * kMin;
  if (!feed_rp(**store, rewrite_run()[6]).is_ok()) return acked;
  acked = 7;
  if (on_ack) on_ack(acked);
  (void)(*store)->apply_committed();
  return acked;
}

// "" when the store at root recovered within the oracle (file comment).
std::string verify(const std::string& root, std::uint64_t acked, const Model& model,
                   const std::string& scratch) {
  std::uint64_t now = kDay + 161 * kMin;
  StoreOptions opt = tiered_options(root, &now);
  auto store = GroupStore::open(opt, "g", false);
  if (!store.is_ok()) return "re-open failed: " + store.status().to_string();
  GroupStore& s = **store;
  if (s.last_committed_rp() < acked)
    return "acknowledged RP " + std::to_string(acked) + " lost";
  const auto after = offered_ids(s);
  for (std::uint64_t r : kept_at(acked))
    if (std::find(after.begin(), after.end(), r) == after.end())
      return "RP " + std::to_string(r) + " is kept by the policy, now it is not offered";
  std::string why = check_store(s, model, root, scratch);
  if (!why.empty()) return why;
  Status a = s.apply_committed();
  if (!a.is_ok()) return "apply after recovery failed: " + a.to_string();
  why = check_store(s, model, root, scratch, kept_at(s.last_committed_rp()));
  if (!why.empty()) return "after the apply that follows recovery: " + why;
  const auto dirs = journal_dirs(root + "/g");
  if (dirs.size() != 1) return "more than one journal generation left: " + dirs[0] + ", " + dirs[1];
  return "";
}

std::uint64_t op_stride() {
  const char* v = std::getenv("FERRY_SANITIZE");
  const char* l = std::getenv("FERRY_LONG");
  const bool lng = l != nullptr && *l != '\0' && std::string(l) != "0";
  return v != nullptr && *v != '\0' && std::string(v) != "0" && !lng ? 3 : 1;
}

struct Fixture {
  TempDir tmpl{"/dev/shm"};
  Model model = model_of(rewrite_run());
  Fixture() {
    spdlog::set_level(spdlog::level::err);
    make_template(tmpl.path() + "/s");
  }
  std::string copy(const TempDir& d) const {
    std::filesystem::copy(tmpl.path() + "/s", d.path() + "/s",
                          std::filesystem::copy_options::recursive);
    return d.path() + "/s";
  }
};

}  // namespace

TEST_CASE("journal rewrite: the scenario rewrites twice and keeps exactly the policy's RPs",
          "[store][rewrite]") {
  Fixture f;
  TempDir d("/dev/shm");
  const std::string root = f.copy(d);
  std::uint64_t now = 0;
  REQUIRE(run(tiered_options(root, &now), &now) == 7);
  CHECK(journal_dirs(root + "/g") == std::vector<std::string>{"journal.2"});
  CHECK(verify(root, 7, f.model, d.path()) == "");
}

TEST_CASE("power cut at every operation of a journal rewrite (drop and tear)", "[store][crash]") {
  Fixture f;
  std::uint64_t ops = 0;
  {
    TempDir d("/dev/shm");
    std::uint64_t now = 0;
    StoreOptions opt = tiered_options(f.copy(d), &now);
    auto twin = FaultyStorage::create(real_storage(), 1, {{}, true, true, 0});
    opt.storage = twin;
    REQUIRE(run(opt, &now) == 7);
    ops = twin->mutating_ops();
  }
  std::uint64_t states = 0, violations = 0;
  for (std::uint64_t n = 1; n <= ops; n += op_stride()) {
    for (CutMode mode : {CutMode::drop, CutMode::tear}) {
      std::size_t unsynced = 0;
      for (std::size_t keep = 0; keep <= unsynced; ++keep) {
        TempDir d("/dev/shm");
        std::uint64_t now = 0;
        StoreOptions opt = tiered_options(f.copy(d), &now);
        const std::uint64_t seed = n * 1000 + keep * 3 + static_cast<std::uint64_t>(mode);
        auto twin = FaultyStorage::create(real_storage(), seed, {{}, true, true, n});
        opt.storage = twin;
        const std::uint64_t acked = run(opt, &now);
        if (keep == 0) unsynced = twin->unsynced_ops();
        REQUIRE(twin->unsynced_ops() == unsynced);  // the run is deterministic
        REQUIRE(twin->power_cut(keep, mode).is_ok());
        ++states;
        std::string why = verify(opt.root, acked, f.model, d.path());
        if (!why.empty()) {
          ++violations;
          UNSCOPED_INFO("power cut after op " << n << " keep " << keep << " mode "
                                              << (mode == CutMode::drop ? "drop" : "tear")
                                              << ": " << why);
          CHECK(why == "");
        }
      }
    }
  }
  std::printf("journal rewrite power cuts: %llu operations, %llu states, %llu violations\n",
              static_cast<unsigned long long>(ops), static_cast<unsigned long long>(states),
              static_cast<unsigned long long>(violations));
  CHECK(states > ops);
}

TEST_CASE("EIO and ENOSPC at every N of a journal rewrite", "[store][crash]") {
  Fixture f;
  struct Kind {
    FaultOp op;
    int err;
  };
  std::uint64_t runs = 0, violations = 0;
  for (Kind kind : {Kind{FaultOp::write, EIO}, Kind{FaultOp::write, ENOSPC},
                    Kind{FaultOp::sync, EIO}, Kind{FaultOp::read, EIO}}) {
    for (bool persistent : {false, true}) {
      for (std::uint64_t n = 1;; n += op_stride()) {
        TempDir d("/dev/shm");
        std::uint64_t now = 0;
        StoreOptions opt = tiered_options(f.copy(d), &now);
        FaultPlan plan;
        plan.rules.push_back(FaultRule{kind.op, kind.err, n, persistent, ""});
        auto twin = FaultyStorage::create(real_storage(), n, plan);
        opt.storage = twin;
        const std::uint64_t acked = run(opt, &now);
        if (twin->faults_injected() == 0) break;
        ++runs;
        std::string why = verify(opt.root, acked, f.model, d.path());
        if (!why.empty()) {
          ++violations;
          UNSCOPED_INFO("fault op " << int(kind.op) << " errno " << kind.err << " at " << n
                                    << (persistent ? " persistent: " : " transient: ") << why);
          CHECK(why == "");
        }
      }
    }
  }
  std::printf("journal rewrite I/O errors: %llu runs, %llu violations\n",
              static_cast<unsigned long long>(runs), static_cast<unsigned long long>(violations));
  CHECK(runs > 50);
}

TEST_CASE("journal rewrite kill-point child (run by the kill-point test)",
          "[.rewrite_kill_child]") {
  const char* root = std::getenv("FERRY_REWRITE_CHILD_ROOT");
  if (root == nullptr) return;
  std::uint64_t now = 0;
  const std::string p = std::string(root) + "/../acked";
  // Written (durably, atomically) once RP 7 is acknowledged, before its retention pass.
  auto note = [&p](std::uint64_t acked) {
    const std::string tmp = p + ".tmp";
    FILE* fp = std::fopen(tmp.c_str(), "w");
    if (fp == nullptr) ::_exit(6);
    std::fprintf(fp, "%llu", static_cast<unsigned long long>(acked));
    if (std::fflush(fp) != 0 || ::fsync(::fileno(fp)) != 0) ::_exit(6);
    std::fclose(fp);
    if (::rename(tmp.c_str(), p.c_str()) != 0) ::_exit(6);
  };
  run(tiered_options(root, &now), &now, note);
  ::_exit(0);
}

TEST_CASE("SIGKILL at every store kill point of a journal rewrite", "[store][crash]") {
  Fixture f;
  const char* points[] = {"rewrite.mid_write", "rewrite.before_switch", "rewrite.after_switch",
                          "prune.after_intent", "state.before_rename", "state.after_rename",
                          "journal.after_commit_sync"};
  int killed_count = 0;
  for (const char* point : points) {
    for (int hit = 1; hit <= 4; ++hit) {
      TempDir d("/dev/shm");
      const std::string root = f.copy(d);
      pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        int null = ::open("/dev/null", O_WRONLY);
        ::dup2(null, 1);
        ::dup2(null, 2);
        const std::string at = std::string(point) + ":" + std::to_string(hit);
        ::setenv("FERRY_KILL_AT", at.c_str(), 1);
        ::setenv("FERRY_REWRITE_CHILD_ROOT", root.c_str(), 1);
        ::execl("/proc/self/exe", "/proc/self/exe", "[.rewrite_kill_child]", nullptr);
        ::_exit(127);
      }
      int status = 0;
      REQUIRE(::waitpid(pid, &status, 0) == pid);
      const bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
      const bool finished = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      INFO("kill point " << point << ":" << hit << " status " << status);
      REQUIRE((killed || finished));
      // The child notes RP 7's acknowledgement; before it, RP 6 is the last acknowledged.
      std::uint64_t acked = 6;
      if (std::filesystem::exists(d.path() + "/acked"))
        acked = std::stoull(slurp(d.path() + "/acked"));
      if (killed) ++killed_count;
      CHECK(verify(root, acked, f.model, d.path()) == "");
    }
  }
  std::printf("journal rewrite kill points: %d kills\n", killed_count);
  CHECK(killed_count >= 12);
}
