// Site-private: a group's recovery points as the store and its readers see them, and the
// read path over them (read_view.cc). The store (store.cc) owns the chain under the group
// lock; ReadView::open, `ferry points` and restore load one read-only.
//
// A chain is the base RP, which the replica images hold (catalog.h), and the journal's
// committed RPs above it, each a delta on the one before (or a full copy of some disks).
// Disk D at RP N reads, per byte: the newest record of the RPs in (base, N] since D's last
// full RP there; else, below the smallest size D had in (base, N], the base image; else
// zeros.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "catalog.h"
#include "ferry/base/status.h"
#include "ferry/site/image_store.h"
#include "ferry/site/read_view.h"
#include "ferry/site/storage.h"
#include "ferry/site/store.h"
#include "journal.h"
#include "pins.h"

namespace ferry::site {

struct Paths {
  std::string group_dir, journal_dir, replica_dir, state, state_tmp, lock, distrust,
      distrust_tmp;
  Paths(const std::string& root, const std::string& group)
      : group_dir(root + "/" + group),
        journal_dir(group_dir + "/journal"),
        replica_dir(group_dir + "/replica"),
        state(group_dir + "/state"),
        state_tmp(group_dir + "/state.tmp"),
        lock(group_dir + "/LOCK"),
        distrust(group_dir + "/distrust"),
        distrust_tmp(group_dir + "/distrust.tmp") {}
  // The journal directory of generation `gen` (catalog.h): `journal`, then `journal.<n>`.
  std::string journal_dir_for(std::uint64_t gen) const {
    return gen == 0 ? journal_dir : journal_dir + "." + std::to_string(gen);
  }
};
// The generations whose directories exist in the group (journal_dir_for), ascending.
Result<std::vector<std::uint64_t>> journal_generations(Storage& st, const Paths& paths);

std::uint64_t group_id_of(const std::string& group);
Status check_name(const char* what, const std::string& s);
int find_disk(const RpBeginInfo& rp, const std::string& name);

struct Chain {
  std::string group;
  std::string journal_dir;  // of catalog.journal_gen: where rps' records live
  Catalog catalog;
  std::vector<journal::CommittedRp> rps;  // committed, above catalog.base_rp, ascending

  std::uint64_t newest() const { return rps.empty() ? catalog.base_rp : rps.back().info.rp_id; }
  // The newest RP's begin record (null: no RP at all).
  const RpBeginInfo* newest_begin() const;
  // Offered to readers: the base RP, and every RP above it neither pruned nor below a
  // compaction under way.
  bool offered(std::uint64_t rp_id) const;
  // The offered RPs, oldest first.
  std::vector<RpInfo> points() const;
  // The begin record of RP `rp_id` (the base or a journal RP), null if not in the chain.
  const RpBeginInfo* begin_of(std::uint64_t rp_id) const;
};

// Retention's verdict on every offered RP of `chain` (points.cc): `effective` at `now`,
// pinned RPs kept; fills points, policy, removed, removed_bytes and base_before. The one
// judgement `ferry points` shows and the store's pruning acts on.
PruneReport judge_points(const Chain& chain, const std::vector<LivePin>& pins,
                         const RetentionPolicy& effective, std::uint64_t now_unix_ns);

// R18 (store.cc): where the journal stops being trusted after a failed sync, if anywhere.
Result<std::optional<journal::RecordLoc>> distrust_limit(Storage& st, const Paths& paths,
                                                         std::uint64_t group_id);

// Loads a group's chain read-only (safe while a receiver appends): the state file, then a
// read-only scan. Call with the reader gate (pins.h) held shared, so that pruning does not
// move the base in between.
Result<Chain> load_chain(Storage& st, const std::string& root, const std::string& group);
// The readers' way in: checks the group's name and that it exists, takes the reader gate
// shared into `gate` (the caller holds it while it pins or reads the pins), then loads.
Result<Chain> load_chain_gated(Storage& st, const std::string& root, const std::string& group,
                               ReaderGate& gate);

// A view of disk `disk` at RP `rp_id` (0: the newest offered) of `chain`, which must outlive
// it. Errors name the group, the RP and the disk.
Result<std::unique_ptr<ReadView>> view_of(std::shared_ptr<Storage> st, const Paths& paths,
                                          const Chain& chain, std::uint64_t rp_id,
                                          const std::string& disk);
// The same, owning its chain (ReadView::open).
Result<std::unique_ptr<ReadView>> view_owning(std::shared_ptr<Storage> st, const Paths& paths,
                                              std::shared_ptr<const Chain> chain,
                                              std::uint64_t rp_id, const std::string& disk);

// Writes the image of `view` to out_path (a file: truncated, sparse).
// `progress`, if set: (bytes gone through, size) after each 64 MiB and at the end.
using CopyProgress = std::function<void(std::uint64_t, std::uint64_t)>;
Status write_image(const std::shared_ptr<Storage>& st, ReadView& view,
                   const std::string& out_path, const CopyProgress& progress = {});

// Brings the replica image of one disk from the base to RP `rp` (one step of a compaction):
// truncates (a full copy resets the disk), writes its data records and punches its zero
// records, in journal order. Redoing it over a partly written image gives the same bytes.
// rewrite_zeros (a retry after a failed compaction): zero records are written as zeros, not
// punched, so that what a failed fdatasync lost is written again.
Status apply_rp_to_images(ImageStore& images, journal::Reader& reader,
                          const journal::CommittedRp& rp, bool rewrite_zeros);

}  // namespace ferry::site
