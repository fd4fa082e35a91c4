// Crash and fault tests of the store: power cuts over every prefix of unsynced writes (the
// faulty twin drops, tears or misdirects), EIO/ENOSPC at every N, and SIGKILL at every
// named kill point in a child process. The workloads run with keep-last 2, so every apply
// prunes and compacts the replica images forward (layout 2), and the sweeps also start from
// stores whose next open or apply prunes: a compaction cut short, many RPs to prune at once,
// a layout 1 store to migrate.
// Oracle after recovery: the newest committed RP k has last acknowledged <= k <= last begun;
// the images equal the model at the base RP; every offered RP restores byte-identical (a
// pruned RP may only be absent, or offered with the right bytes); every RP offered when the
// crash hit and not being pruned by it (the newest 2 of those and k) is still offered; and
// an apply after recovery brings the store to keep-last 2 with the same bytes.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <ctime>
#include <filesystem>
#include <set>
#include <sstream>

#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "ferry/site/faulty_storage.h"
#include "ferry/site/store.h"
#include "journal_test_util.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;

namespace {

constexpr std::uint32_t kKeepLast = 2;

// The sweeps' policy: keep-last 2 prunes and compacts at every apply from RP 3 on.
StoreOptions sweep_options(const std::string& root) {
  StoreOptions opt;
  opt.root = root;
  opt.retention.keep_last = kKeepLast;
  return opt;
}

struct Outcome {
  std::uint64_t last_acked = 0;
  std::uint64_t last_begun = 0;
  bool ack_after_data_loss = false;
  bool observed = false;               // the store opened: `offered` is what it showed
  std::vector<std::uint64_t> offered;  // points() after the last step that returned
};

std::vector<std::uint64_t> offered_ids(const GroupStore& s) {
  std::vector<std::uint64_t> out;
  for (const auto& p : s.points()) out.push_back(p.rp_id);
  return out;
}

// The receiver's loop, reduced: commit (= acknowledge), then apply (= retention). After the
// first error it keeps trying (as a careless caller would) to prove no later commit succeeds
// after a failed sync without a re-open.
Outcome run_workload(const StoreOptions& opt, const std::vector<TestRp>& rps,
                     bool apply = true) {
  Outcome o;
  auto store = GroupStore::open(opt, "g", true);
  if (!store.is_ok()) return o;
  o.observed = true;
  o.offered = offered_ids(**store);
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
    o.offered = offered_ids(**store);
    if (!apply) continue;
    // A failed compaction (R19) touches no journal byte: later commits are acknowledged as
    // the receiver does; only a failure of the store itself ends the acknowledgements.
    Status a = (*store)->apply_committed();
    if (!a.is_ok() && (*store)->apply_error().is_ok()) {
      data_lost = data_lost || a.data_lost();
      failed = true;
    }
    o.offered = offered_ids(**store);
  }
  return o;
}

// Counted over a sweep, for the figures.
struct Tally {
  std::uint64_t resurrected = 0;  // pruned RPs offered again after recovery (right bytes)
  std::uint64_t required = 0;     // RPs that had to survive, summed over states
};

// The newest `n` of `ids` (any order), ascending.
std::vector<std::uint64_t> newest(std::vector<std::uint64_t> ids, std::size_t n) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  if (ids.size() > n) ids.erase(ids.begin(), ids.end() - static_cast<std::ptrdiff_t>(n));
  return ids;
}

// "" when the store at opt.root recovers within the bounds (see the file comment).
std::string verify_recovered(StoreOptions opt, const Model& model, const Outcome& o,
                             const std::string& scratch, Tally* tally = nullptr) {
  opt.storage = nullptr;  // the real file system, on whatever the crash left
  auto store = GroupStore::open(opt, "g", true);
  if (!store.is_ok()) return "re-open failed: " + store.status().to_string();
  GroupStore& s = **store;
  std::uint64_t k = s.last_committed_rp();
  if (k < o.last_acked)
    return "acknowledged RP " + std::to_string(o.last_acked) + " lost (k=" + std::to_string(k) + ")";
  if (k > std::max(o.last_begun, o.last_acked))
    return "RP " + std::to_string(k) + " committed but never sent";
  if (k == 0) return "";
  const std::vector<std::uint64_t> after = offered_ids(s);
  // Offered when the crash hit and kept by the prune the crash may have cut short.
  std::vector<std::uint64_t> seen = o.offered;
  seen.push_back(k);
  const std::size_t keep = opt.retention.keep_last.value_or(48);
  for (std::uint64_t r : newest(seen, keep)) {
    if (tally != nullptr) ++tally->required;
    if (std::find(after.begin(), after.end(), r) == after.end())
      return "RP " + std::to_string(r) + " was offered and kept, now it is not (k=" +
             std::to_string(k) + ")";
  }
  if (tally != nullptr)
    for (std::uint64_t r : after)
      if (std::find(seen.begin(), seen.end(), r) == seen.end()) ++tally->resurrected;
  std::string why = check_store(s, model, opt.root, scratch);
  if (!why.empty()) return why;
  // Liveness: retention runs again on what recovery left, to keep-last exactly.
  Status a = s.apply_committed();
  if (!a.is_ok()) return "apply after recovery failed: " + a.to_string();
  why = check_store(s, model, opt.root, scratch, newest(after, keep));
  return why.empty() ? "" : "after the apply that follows recovery: " + why;
}

// Figures for docs/reliability.md: one JSON line on stdout and appended to
// $FERRY_RESULTS_DIR/<test>.jsonl (test/reliability/meson.build and test/run set it).
// FERRY_LONG=1 scales the runs up.
bool long_mode() {
  const char* v = std::getenv("FERRY_LONG");
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

// Under ASan+UBSan (test/run sets FERRY_SANITIZE=1 for that pass) the sweeps visit every
// third operation: the main pass, on the optimised build, visits every one, and the
// sanitizer pass is there to catch memory errors on the same paths, at 4x the cost each.
std::uint64_t op_stride() {
  const char* v = std::getenv("FERRY_SANITIZE");
  return v != nullptr && *v != '\0' && std::string(v) != "0" && !long_mode() ? 3 : 1;
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

// Stores whose next open or apply prunes, so the sweeps cut pruning and compaction short
// from more than the steady state: a compaction cut short by an I/O error (the state names a
// target, an image half written: R5 at the next open), five RPs kept by the default policy
// of which keep-last 2 prunes three at once (the base moves by three RPs, segments and b.img
// go), a layout 1 store (version 1 state, images at the newest RP: R22 migrates it), and a
// journal that stops starting at RP 0 during the run (RP 1 alone in its segment, removed
// once the base passes it): from then on only the state file says which RP the images
// hold, so R6 can no longer write a lost or undecodable state anew from the journal.
constexpr int kPruneStarts = 4;
const char* prune_start_name(int start) {
  return start == 0   ? "compaction cut short"
         : start == 1 ? "three RPs to prune at once"
         : start == 2 ? "layout 1 store to migrate"
                      : "journal starting after RP 0";
}

// Prepares the start at root; returns what it acknowledged and offered.
Outcome prepare_prune_start(const std::string& root, int start, const std::vector<TestRp>& rps,
                            const Model& model) {
  StoreOptions def;  // the default policy keeps every RP of these runs
  def.root = root;
  Outcome o;
  if (start == 0) {
    o = run_workload(def, {rps.begin(), rps.begin() + 3});
    FaultPlan plan;
    plan.rules.push_back(FaultRule{FaultOp::write, EIO, 2, true, "replica/a.img"});
    StoreOptions faulty = def;
    faulty.storage = FaultyStorage::create(real_storage(), 1, plan);
    auto s = GroupStore::open(faulty, "g", false);
    RetentionPolicy two;
    two.keep_last = kKeepLast;
    if (!s.is_ok() || (*s)->prune(two, 0, false).is_ok()) std::abort();
    o.offered = offered_ids(**s);
  } else if (start == 1) {
    o = run_workload(def, {rps.begin(), rps.begin() + 5});
  } else if (start == 2) {
    o = run_workload(def, {rps.begin(), rps.begin() + 3}, /*apply=*/false);
    make_layout1(root, "g", model, 3);
    o.offered = {1, 2, 3};
  } else {
    o = run_workload(def, {rps[0]});
    make_segment_v1(root + "/g/journal/0000000000000001.seg");  // RP 2 starts segment 2
  }
  if (o.last_acked != (start == 1 ? 5u : start == 3 ? 1u : 3u)) std::abort();
  o.last_begun = o.last_acked;
  return o;
}

// The RPs a sweep from `start` runs: up to the RP whose apply passes what the start sets up
// (the redone compaction and one more; the apply of RP 6; the migration, then keep-last 2
// pruning; segment 1 removed, then a compaction with the journal starting at RP 2), or the
// whole run with FERRY_LONG. The steady-state sweep covers the rest.
std::vector<TestRp> rps_for_start(int start, const std::vector<TestRp>& rps) {
  const std::size_t last = long_mode() ? rps.size() : start == 0 ? 4 : start == 1 ? 6 : 5;
  return {rps.begin(), rps.begin() + static_cast<std::ptrdiff_t>(std::min(last, rps.size()))};
}

// What a crashed run and the start before it acknowledged and offered, together.
Outcome merge(const Outcome& start, const Outcome& run) {
  Outcome o = run;
  o.last_acked = std::max(start.last_acked, run.last_acked);
  o.last_begun = std::max({start.last_begun, run.last_begun, o.last_acked});
  if (!run.observed) o.offered = start.offered;
  return o;
}

// Misdirected writes and the replica images. A misdirected write lands at the offset of
// another unsynced write of its file, or one block further. In a journal file that is
// detected (checksums, record identities) and cut. In a replica image during a compaction it
// is not recoverable by design: the image of the base RP is the only copy of every byte no
// kept RP's record covers, so a write landing in such a range (one block past the last
// record of the compacted RPs, say) destroys base bytes that nothing can restore, and no
// checksum covers image bytes. Redoing the compaction (R5) rewrites only the ranges the RPs
// (base, target] cover. So the misdirect mode cuts the journal, the state file and the
// directories (one twin, misdirect at its `keep`-th unsynced operation) while the replica
// images live on a second twin that loses all its unsynced operations (drop) and never
// misdirects; the power goes off for both at once (at the n-th operation of the first).
// The drop and tear modes still cut everything on one twin, images included. Without the
// split, the misdirect mode finds the violations this comment predicts ("replica a differs
// from RP 2": 23 of 3345 states in the default run with engine fixes for the bugs the sweep
// reports; see the commit message).
class SplitStorage final : public Storage {
 public:
  SplitStorage(std::shared_ptr<FaultyStorage> journal, std::shared_ptr<FaultyStorage> images)
      : journal_(std::move(journal)), images_(std::move(images)) {}

  Result<std::unique_ptr<StorageFile>> open(const std::string& path, OpenFlags flags) override {
    if (!is_image(path)) return journal_->open(path, flags);
    FERRY_TRY(powered());
    FERRY_ASSIGN_OR_RETURN(auto f, images_->open(path, flags));
    return std::unique_ptr<StorageFile>(new File(journal_, std::move(f)));
  }
  Status remove(const std::string& path) override {
    if (!is_image(path)) return journal_->remove(path);
    FERRY_TRY(powered());
    return images_->remove(path);
  }
  Status rename(const std::string& from, const std::string& to) override {
    FERRY_ASSERT(!is_image(from) && !is_image(to));
    return journal_->rename(from, to);
  }
  Status sync_dir(const std::string& dir) override {
    if (!is_image(dir)) return journal_->sync_dir(dir);
    FERRY_TRY(powered());
    return images_->sync_dir(dir);
  }
  Status make_dirs(const std::string& dir) override { return journal_->make_dirs(dir); }
  Result<std::vector<std::string>> list_dir(const std::string& dir) override {
    return is_image(dir) ? images_->list_dir(dir) : journal_->list_dir(dir);
  }
  bool exists(const std::string& path) override {
    return is_image(path) ? images_->exists(path) : journal_->exists(path);
  }

 private:
  static bool is_image(const std::string& path) {
    return path.find("/replica") != std::string::npos;
  }
  Status powered() const {
    return journal_->power_is_off() ? Status::from_errno(EIO, "power off (split twin)")
                                    : Status::ok();
  }
  class File final : public StorageFile {
   public:
    File(std::shared_ptr<FaultyStorage> power, std::unique_ptr<StorageFile> f)
        : power_(std::move(power)), f_(std::move(f)) {}
    Status pwrite(const void* b, std::size_t n, std::uint64_t off) override {
      FERRY_TRY(on());
      return f_->pwrite(b, n, off);
    }
    Result<std::size_t> pread(void* b, std::size_t n, std::uint64_t off) override {
      FERRY_TRY(on());
      return f_->pread(b, n, off);
    }
    Status submit_write(const void* b, std::size_t n, std::uint64_t off) override {
      FERRY_TRY(on());
      return f_->submit_write(b, n, off);
    }
    Status wait_writes() override { return f_->wait_writes(); }
    Status datasync() override {
      FERRY_TRY(on());
      return f_->datasync();
    }
    Status truncate(std::uint64_t size) override {
      FERRY_TRY(on());
      return f_->truncate(size);
    }
    Status punch_hole(std::uint64_t off, std::uint64_t n) override {
      FERRY_TRY(on());
      return f_->punch_hole(off, n);
    }
    Result<std::uint64_t> size() override { return f_->size(); }
    bool is_direct() const override { return f_->is_direct(); }
    Result<DataRun> next_data(std::uint64_t offset) override { return f_->next_data(offset); }

   private:
    Status on() const {
      return power_->power_is_off() ? Status::from_errno(EIO, "power off (split twin)")
                                    : Status::ok();
    }
    std::shared_ptr<FaultyStorage> power_;
    std::unique_ptr<StorageFile> f_;
  };
  std::shared_ptr<FaultyStorage> journal_, images_;
};

struct SweepFigures {
  std::uint64_t states = 0, violations = 0, torn_or_misdirected = 0, ops = 0;
};

// Power cut at every mutating operation n of `rps` run on a copy of `tmpl` (or a fresh
// store), for every prefix of the unsynced operations that lands, the next one dropped, torn
// or misdirected.
void power_cut_sweep(const std::string& label, const std::string& tmpl, const Outcome& before,
                     const std::vector<TestRp>& rps, const Model& model,
                     const std::vector<CutMode>& modes, std::uint64_t reps, SweepFigures& fig,
                     Tally& tally) {
  auto fresh = [&](const TempDir& d) {
    if (!tmpl.empty())
      std::filesystem::copy(tmpl, d.path() + "/s", std::filesystem::copy_options::recursive);
  };
  std::uint64_t ops = 0;
  {
    TempDir d("/dev/shm");
    fresh(d);
    StoreOptions opt = sweep_options(d.path() + "/s");
    auto twin = FaultyStorage::create(real_storage(), 1, {{}, true, true, 0});
    opt.storage = twin;
    Outcome o = run_workload(opt, rps);
    REQUIRE(o.last_acked == rps.back().begin.rp_id);
    ops = twin->mutating_ops();
  }
  // The split twin of the misdirect mode counts only the operations off the images: a
  // power-off at a later n never comes.
  std::uint64_t split_ops = 0;
  {
    TempDir d("/dev/shm");
    fresh(d);
    StoreOptions opt = sweep_options(d.path() + "/s");
    auto twin = FaultyStorage::create(real_storage(), 1, {{}, true, true, 0});
    auto images = FaultyStorage::create(real_storage(), 1, {{}, true, true, 0});
    opt.storage = std::make_shared<SplitStorage>(twin, images);
    REQUIRE(run_workload(opt, rps).last_acked == rps.back().begin.rp_id);
    split_ops = twin->mutating_ops();
  }
  fig.ops += ops;
  for (std::uint64_t rep = 0; rep < reps; ++rep)
    for (std::uint64_t n = 1; n <= ops; n += op_stride()) {
      for (CutMode mode : modes) {
        if (mode == CutMode::misdirect && n > split_ops) continue;
        std::size_t unsynced = 0;
        for (std::size_t keep = 0; keep <= unsynced; ++keep) {
          TempDir d("/dev/shm");
          fresh(d);
          StoreOptions opt = sweep_options(d.path() + "/s");
          std::uint64_t seed =
              rep * 1000003 + n * 1000 + keep * 3 + static_cast<std::uint64_t>(mode);
          auto twin = FaultyStorage::create(real_storage(), seed, {{}, true, true, n});
          // Misdirect: the images on a twin of their own that never misdirects (see
          // SplitStorage).
          std::shared_ptr<FaultyStorage> images;
          if (mode == CutMode::misdirect) {
            images = FaultyStorage::create(real_storage(), seed, {{}, true, true, 0});
            opt.storage = std::make_shared<SplitStorage>(twin, images);
          } else {
            opt.storage = twin;
          }
          Outcome o = merge(before, run_workload(opt, rps));
          if (keep == 0) unsynced = twin->unsynced_ops();
          REQUIRE(twin->unsynced_ops() == unsynced);  // the run is deterministic
          REQUIRE(twin->power_cut(keep, mode).is_ok());
          if (images) REQUIRE(images->power_cut(0, CutMode::drop).is_ok());
          ++fig.states;
          if (mode != CutMode::drop && keep < unsynced) ++fig.torn_or_misdirected;
          std::string why = verify_recovered(opt, model, o, d.path(), &tally);
          if (!why.empty()) {
            ++fig.violations;
            UNSCOPED_INFO(label << ": power cut after op " << n << " keep " << keep << " mode "
                                << mode_name(mode) << " seed " << seed << ": " << why);
            CHECK(why == "");
          }
        }
      }
    }
}

struct ErrorKind {
  FaultOp op;
  int err;
};
constexpr ErrorKind kErrorKinds[] = {{FaultOp::write, EIO}, {FaultOp::write, ENOSPC},
                                     {FaultOp::sync, EIO}, {FaultOp::read, EIO}};

// EIO/ENOSPC at every matching operation n, transient and persistent.
void io_error_sweep(const std::string& label, const std::string& tmpl, const Outcome& before,
                    const std::vector<TestRp>& rps, const Model& model, std::uint64_t& runs,
                    std::uint64_t& violations, std::uint64_t& acks_after_failed_sync,
                    Tally& tally) {
  for (ErrorKind kind : kErrorKinds) {
    for (bool persistent : {false, true}) {
      for (std::uint64_t n = 1;; n += op_stride()) {
        TempDir d("/dev/shm");
        if (!tmpl.empty())
          std::filesystem::copy(tmpl, d.path() + "/s", std::filesystem::copy_options::recursive);
        StoreOptions opt = sweep_options(d.path() + "/s");
        FaultPlan plan;
        plan.rules.push_back(FaultRule{kind.op, kind.err, n, persistent, ""});
        auto twin = FaultyStorage::create(real_storage(), n, plan);
        opt.storage = twin;
        Outcome o = merge(before, run_workload(opt, rps));
        if (twin->faults_injected() == 0) break;  // past the last matching operation
        ++runs;
        if (o.ack_after_data_loss) ++acks_after_failed_sync;
        std::string why = verify_recovered(opt, model, o, d.path(), &tally);
        if (!why.empty()) {
          ++violations;
          UNSCOPED_INFO(label << ": fault op " << int(kind.op) << " errno " << kind.err << " at "
                              << n << (persistent ? " persistent: " : " transient: ") << why);
          CHECK(why == "");
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("power cut at every operation, every prefix of unsynced writes, drop/tear/misdirect",
          "[store][crash]") {
  spdlog::set_level(spdlog::level::off);  // thousands of stores warn and fail on purpose
  auto rps = pruning_run();
  Model model = model_of(rps);
  SweepFigures fig;
  Tally tally;
  auto t0 = std::time(nullptr);
  // The seed picks where a misdirected write lands; a long run tries more of them.
  const std::uint64_t reps = long_mode() ? 8 : 1;
  power_cut_sweep("steady state", "", Outcome{}, rps, model,
                  {CutMode::drop, CutMode::tear, CutMode::misdirect}, reps, fig, tally);
  std::printf("store power cut: %llu crash states (%llu with a torn or misdirected write) over "
              "%llu operations, %llu violations; %llu RPs required to survive, %llu pruned RPs "
              "offered again (byte-identical), %lld s\n",
              static_cast<unsigned long long>(fig.states),
              static_cast<unsigned long long>(fig.torn_or_misdirected),
              static_cast<unsigned long long>(fig.ops),
              static_cast<unsigned long long>(fig.violations),
              static_cast<unsigned long long>(tally.required),
              static_cast<unsigned long long>(tally.resurrected),
              static_cast<long long>(std::time(nullptr) - t0));
  write_figure("store-power-cut",
               std::to_string(fig.states) + " crash states, " + std::to_string(fig.violations) +
                   " violations, torn and misdirected records detected 100%",
               "\"seed\": null, \"iterations\": " + std::to_string(fig.states) +
                   ", \"faults_injected\": " + std::to_string(fig.states) +
                   ", \"torn_or_misdirected_states\": " + std::to_string(fig.torn_or_misdirected) +
                   ", \"operations\": " + std::to_string(fig.ops) +
                   ", \"retention\": \"keep-last 2\", \"pruned_rps_offered_again\": " +
                   std::to_string(tally.resurrected) +
                   ", \"violations\": " + std::to_string(fig.violations) +
                   ", \"duration_s\": " + std::to_string(std::time(nullptr) - t0));
  CHECK(fig.violations == 0);
  CHECK(fig.states > fig.ops);
}

TEST_CASE("EIO and ENOSPC at every N, transient and persistent", "[store][crash]") {
  spdlog::set_level(spdlog::level::off);
  auto rps = pruning_run();
  Model model = model_of(rps);
  std::uint64_t runs = 0, violations = 0, acks_after_failed_sync = 0;
  Tally tally;
  auto t0 = std::time(nullptr);
  io_error_sweep("steady state", "", Outcome{}, rps, model, runs, violations,
                 acks_after_failed_sync, tally);
  std::printf("store I/O errors: %llu runs, %llu acks after a failed fsync, %llu violations, "
              "%lld s\n",
              static_cast<unsigned long long>(runs),
              static_cast<unsigned long long>(acks_after_failed_sync),
              static_cast<unsigned long long>(violations),
              static_cast<long long>(std::time(nullptr) - t0));
  write_figure("store-io-errors",
               std::to_string(runs) + " runs, " + std::to_string(acks_after_failed_sync) +
                   " acks after a failed fsync, " + std::to_string(violations) + " violations",
               "\"seed\": null, \"iterations\": " + std::to_string(runs) +
                   ", \"faults_injected\": " + std::to_string(runs) +
                   ", \"retention\": \"keep-last 2\", \"acks_after_failed_fsync\": " +
                   std::to_string(acks_after_failed_sync) +
                   ", \"violations\": " + std::to_string(violations) +
                   ", \"duration_s\": " + std::to_string(std::time(nullptr) - t0));
  CHECK(acks_after_failed_sync == 0);
  CHECK(violations == 0);
  CHECK(runs > 50);
}

TEST_CASE("power cut at every operation of pruning and compaction starts, drop/tear/misdirect",
          "[store][crash]") {
  spdlog::set_level(spdlog::level::off);
  auto rps = pruning_run();
  Model model = model_of(rps);
  SweepFigures fig;
  Tally tally;
  auto t0 = std::time(nullptr);
  for (int start = 0; start < kPruneStarts; ++start) {
    TempDir tmpl("/dev/shm");
    Outcome before = prepare_prune_start(tmpl.path() + "/s", start, rps, model);
    power_cut_sweep(prune_start_name(start), tmpl.path() + "/s", before,
                    rps_for_start(start, rps), model,
                    {CutMode::drop, CutMode::tear, CutMode::misdirect}, 1, fig, tally);
  }
  std::printf("store power cut from pruning starts: %llu crash states over %llu operations, "
              "%llu violations; %llu pruned RPs offered again (byte-identical), %lld s\n",
              static_cast<unsigned long long>(fig.states),
              static_cast<unsigned long long>(fig.ops),
              static_cast<unsigned long long>(fig.violations),
              static_cast<unsigned long long>(tally.resurrected),
              static_cast<long long>(std::time(nullptr) - t0));
  CHECK(fig.violations == 0);
  CHECK(fig.states > fig.ops);
}

TEST_CASE("EIO and ENOSPC at every N from pruning and compaction starts", "[store][crash]") {
  spdlog::set_level(spdlog::level::off);
  auto rps = pruning_run();
  Model model = model_of(rps);
  std::uint64_t runs = 0, violations = 0, acks_after_failed_sync = 0;
  Tally tally;
  for (int start = 0; start < kPruneStarts; ++start) {
    TempDir tmpl("/dev/shm");
    Outcome before = prepare_prune_start(tmpl.path() + "/s", start, rps, model);
    io_error_sweep(prune_start_name(start), tmpl.path() + "/s", before,
                   rps_for_start(start, rps), model, runs,
                   violations, acks_after_failed_sync, tally);
  }
  std::printf("store I/O errors from pruning starts: %llu runs, %llu violations\n",
              static_cast<unsigned long long>(runs), static_cast<unsigned long long>(violations));
  CHECK(acks_after_failed_sync == 0);
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
  auto rps = pruning_run();
  Model model = model_of(rps);
  std::uint64_t runs = 0, violations = 0;
  for (ErrorKind kind : {ErrorKind{FaultOp::sync, EIO}, ErrorKind{FaultOp::write, EIO},
                         ErrorKind{FaultOp::write, ENOSPC}}) {
    bool past_last = false;
    for (std::uint64_t n = 1; !past_last; n += op_stride()) {
      std::size_t unsynced = 0;
      for (std::size_t keep = 0; keep <= unsynced; ++keep) {
        TempDir d("/dev/shm");
        StoreOptions opt = sweep_options(d.path() + "/s");
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
        Outcome o = merge(first, again);
        std::string why;
        if (o.last_acked != 6) why = "the re-opened store did not complete the workload";
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

// Six RPs of 2 MiB on one disk with 5 MiB segments: pruning removes journal segments
// (prune.mid_remove) while keep-last 2 compacts.
std::vector<TestRp> segment_run() {
  std::vector<TestRp> rps(6);
  for (std::uint64_t r = 0; r < 6; ++r) {
    rps[r].begin = {r + 1, r, (r + 1) * 1000, 0, {disk("d", 8u << 20, r == 0)}};
    for (std::uint64_t i = 0; i < 32; ++i)
      rps[r].blocks.push_back({0, ((i * 5 + r * 7) % 128) * 65536, 65536, RecordKind::data,
                               RecordCodec::none, r * 100 + i});
  }
  return rps;
}
constexpr std::uint64_t kSegmentRunSegmentBytes = 5u << 20;

// The child's progress, written atomically after every step: "<acked> <offered,...>".
void write_progress(const std::string& root, std::uint64_t acked,
                    const std::vector<std::uint64_t>& offered) {
  std::string text = std::to_string(acked) + " ";
  for (auto r : offered) text += std::to_string(r) + ",";
  const std::string tmp = root + "/progress.tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size()) ||
      ::fsync(fd) != 0)
    ::_exit(6);
  ::close(fd);
  if (::rename(tmp.c_str(), (root + "/progress").c_str()) != 0) ::_exit(6);
}

Outcome read_progress(const std::string& root) {
  Outcome o;
  std::istringstream in(slurp(root + "/progress"));
  std::string offered;
  in >> o.last_acked >> offered;
  std::stringstream list(offered);
  for (std::string id; std::getline(list, id, ',');)
    if (!id.empty()) o.offered.push_back(std::stoull(id));
  return o;
}

TEST_CASE("store kill-point child (run by the kill-point test)", "[.store_kill_child]") {
  const char* root = std::getenv("FERRY_STORE_CHILD_ROOT");
  if (root == nullptr) return;
  const bool segments = std::getenv("FERRY_STORE_CHILD_SEGMENTS") != nullptr;
  StoreOptions opt = sweep_options(root);
  if (segments) opt.segment_bytes = kSegmentRunSegmentBytes;
  auto store = GroupStore::open(opt, "g", true);
  if (!store.is_ok()) ::_exit(3);
  std::uint64_t acked = read_progress(root).last_acked;
  write_progress(root, acked, offered_ids(**store));
  for (const auto& rp : segments ? segment_run() : pruning_run()) {
    if (rp.begin.rp_id <= (*store)->last_committed_rp()) continue;
    if (!feed_rp(**store, rp).is_ok()) ::_exit(4);
    acked = rp.begin.rp_id;
    write_progress(root, acked, offered_ids(**store));
    if (!(*store)->apply_committed().is_ok()) ::_exit(5);
    write_progress(root, acked, offered_ids(**store));
  }
  ::_exit(0);
}

TEST_CASE("SIGKILL at every store kill point, recovery after", "[store][crash]") {
  spdlog::set_level(spdlog::level::err);
  const auto rps = pruning_run();
  const Model model = model_of(rps);
  const auto seg_rps = segment_run();
  const Model seg_model = model_of(seg_rps);
  int crash_points = 0, violations = 0;
  std::set<std::string> fired;
  auto t0 = std::time(nullptr);
  for (auto point : kKillPoints) {
    std::string name(point);
    auto has_prefix = [&](const char* p) { return name.rfind(p, 0) == 0; };
    bool store_point = has_prefix("journal.") || has_prefix("apply.") || has_prefix("state.") ||
                       has_prefix("prune.") || has_prefix("migrate.");
    if (!store_point) continue;
    const bool at_recovery = name.find("truncate") != std::string::npos;
    // Runs: the steady state (hits 1..3); the retention points also from the pruning starts
    // and over segment removal.
    struct Run {
      int start;  // -1: fresh, 0..kPruneStarts-1: prepare_prune_start, kPruneStarts: segment_run
      int hit;
    };
    std::vector<Run> runs;
    for (int hit = 1; hit <= 3; ++hit) runs.push_back({-1, hit});
    // (FERRY_LONG: every apply.* and state.* point too, and three hits).
    const bool from_starts = has_prefix("prune.") || has_prefix("migrate.") ||
                             name == "apply.mid_write" ||
                             (long_mode() && (has_prefix("apply.") || has_prefix("state.")));
    if (from_starts)
      for (int start = 0; start <= kPruneStarts; ++start)
        for (int hit = 1; hit <= (long_mode() ? 3 : 2); ++hit) runs.push_back({start, hit});
    for (const Run& run : runs) {
      TempDir d("/dev/shm");  // a SIGKILL loses no page-cache write: tmpfs is enough
      std::string root = d.path() + "/s";
      std::filesystem::create_directories(root);
      const bool segments = run.start == kPruneStarts;
      const Model& m = segments ? seg_model : model;
      if (at_recovery) {  // the truncate points fire while recovery cuts a torn tail
        run_workload(sweep_options(root), {rps[0]});
        std::string seg = root + "/g/journal/0000000000000001.seg";
        spit(seg, slurp(seg) + block_bytes(7, 5000));
        write_progress(root, 1, {1});
      } else if (run.start >= 0 && run.start < kPruneStarts) {
        Outcome before = prepare_prune_start(root, run.start, rps, model);
        write_progress(root, before.last_acked, before.offered);
      } else {
        write_progress(root, 0, {});
      }
      pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        int null = ::open("/dev/null", O_WRONLY);
        ::dup2(null, 1);
        ::dup2(null, 2);
        std::string at = name + ":" + std::to_string(run.hit);
        ::setenv("FERRY_KILL_AT", at.c_str(), 1);
        ::setenv("FERRY_STORE_CHILD_ROOT", root.c_str(), 1);
        if (segments) ::setenv("FERRY_STORE_CHILD_SEGMENTS", "1", 1);
        ::execl("/proc/self/exe", "/proc/self/exe", "[.store_kill_child]", nullptr);
        ::_exit(127);
      }
      int status = 0;
      REQUIRE(::waitpid(pid, &status, 0) == pid);
      bool killed = WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
      bool finished = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      INFO("kill point " << name << ":" << run.hit << " start " << run.start << " status "
                         << status);
      REQUIRE((killed || finished));
      if (killed) {
        ++crash_points;
        fired.insert(name);
      }
      Outcome o = read_progress(root);
      o.last_begun = 6;
      StoreOptions opt = sweep_options(root);
      if (segments) opt.segment_bytes = kSegmentRunSegmentBytes;
      std::string why = verify_recovered(opt, m, o, d.path());
      if (!why.empty()) ++violations;
      CHECK(why == "");
    }
  }
  for (const char* p : {"prune.after_intent", "prune.after_base", "prune.mid_remove",
                        "migrate.after_state", "apply.mid_write"}) {
    INFO("kill point " << p << " never fired");
    CHECK(fired.count(p) == 1);
  }
  std::printf("store kill points: %d crash points, %d replicas not equal to one committed RP "
              "or acknowledged RPs lost, %lld s\n", crash_points, violations,
              static_cast<long long>(std::time(nullptr) - t0));
  write_figure("store-kill-points",
               std::to_string(crash_points) + " crash points, " + std::to_string(violations) +
                   " replicas not equal to one committed RP or acknowledged RPs lost",
               "\"seed\": null, \"iterations\": " + std::to_string(crash_points) +
                   ", \"faults_injected\": " + std::to_string(crash_points) +
                   ", \"retention\": \"keep-last 2\", \"violations\": " +
                   std::to_string(violations) + ", \"duration_s\": " +
                   std::to_string(std::time(nullptr) - t0));
  CHECK(crash_points >= 30);
}
