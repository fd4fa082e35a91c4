// The faulty twin of Storage, for tests: wraps a real Storage (over a scratch directory) and
//  - fails reads, writes and syncs with EIO, or writes with ENOSPC, at the N-th matching
//    operation, once (transient) or from then on (persistent);
//  - models a power cut: it remembers every write, truncate, hole punch, create and rename
//    that no datasync/sync_dir has covered yet, and power_cut() turns the directory into a
//    state the disk could hold after losing power: the first `keep` unsynced operations
//    land, the next one is dropped, torn (512-byte sectors land or not) or misdirected (lands
//    at the offset of another unsynced write of that file, or one block further), the rest
//    are lost. Unsynced creates and renames are undone like data (a rename's old target is
//    kept as a hard link until the directory is synced). remove() is taken as durable at once.
//  - models a failed datasync as Linux does (with the power-cut model on): the file's
//    unsynced writes stay readable, but their pages are lost for good: a later successful
//    sync does not write them unless they are written again, and a power cut brings back
//    their old bytes (an append's pages come back as zeros). Power-off failures are left
//    to the power cut.
// Everything random comes from the seed, so a failing case reproduces from (seed, plan).
#pragma once

#include <cerrno>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/site/storage.h"

namespace ferry::site {

enum class FaultOp : std::uint8_t { read = 0, write = 1, sync = 2 };

struct FaultRule {
  FaultOp op = FaultOp::write;
  int error = EIO;               // EIO, or ENOSPC for writes
  std::uint64_t nth = 1;         // fires on the nth matching operation (1-based)
  bool persistent = false;       // and on every matching operation after it
  std::string path_contains;     // only files whose path contains this ("" = any)
};

struct FaultPlan {
  std::vector<FaultRule> rules;
  bool track_unsynced = false;     // the power-cut model (needed for power_cut())
  bool skip_inner_sync = false;    // with tracking: the model is the durability, skip fsync
  std::uint64_t power_off_after_ops = 0;  // > 0: that many mutating ops, then every op fails
};

enum class CutMode : std::uint8_t { drop = 0, tear = 1, misdirect = 2 };

class FaultyStorage final : public Storage {
 public:
  static std::shared_ptr<FaultyStorage> create(std::shared_ptr<Storage> inner,
                                               std::uint64_t seed, FaultPlan plan);
  ~FaultyStorage() override;

  Result<std::unique_ptr<StorageFile>> open(const std::string& path, OpenFlags flags) override;
  Status remove(const std::string& path) override;
  Status rename(const std::string& from, const std::string& to) override;
  Status sync_dir(const std::string& dir) override;
  Status make_dirs(const std::string& dir) override;
  Result<std::vector<std::string>> list_dir(const std::string& dir) override;
  bool exists(const std::string& path) override;

  std::size_t unsynced_ops() const;     // operations a power cut may lose
  std::uint64_t mutating_ops() const;   // counted so far (writes, syncs, creates, renames, ...)
  std::uint64_t faults_injected() const;
  bool power_is_off() const;
  // Applies the power cut described above to the files (all handles must be closed), then
  // forgets the unsynced list: afterwards the directory is the durable state.
  Status power_cut(std::size_t keep, CutMode mode);

  struct Twin;  // shared with the open files

 private:
  explicit FaultyStorage(std::shared_ptr<Twin> twin) : twin_(std::move(twin)) {}
  std::shared_ptr<Twin> twin_;
};

}  // namespace ferry::site
