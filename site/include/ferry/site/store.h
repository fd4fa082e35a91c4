// The receiver's store for one group: write-ahead journal, replica images, state file.
//
// Directory layout (docs/journal-format.md gives every byte):
//   <store>/<group>/journal/<seq>.seg   journal segments of checksummed records
//   <store>/<group>/replica/<disk>.img  sparse raw image per disk = the base RP, the oldest kept
//   <store>/<group>/state               the catalog: base RP, pruned RPs; replaced atomically
//   <store>/<group>/LOCK                flock: one process per group
//   <store>/<group>/READERS, pins/      readers pin the RP they read (read_view.h)
//   <store>/<group>/distrust            only after a failed sync: journal trusted up to (R18)
//
// Life of an RP: begin_rp() -> append_block()* -> commit_rp() [durable: all records and the
// commit record fdatasync'ed; only now may the RP be acknowledged] -> apply_committed()
// [retention: the RPs the policy drops leave the catalog, the images are compacted forward
// to the oldest kept RP, old journal segments are removed; redone on restart if cut short].
// Every kept RP is readable (restore, ReadView) as the base image plus the records of the RPs
// above it. open() runs recovery: first cuts what no successful sync covered before an
// earlier failed write or sync (R18: <group>/distrust, or this process's memory of the
// failure), then cuts a torn journal tail, drops uncommitted records, finishes a compaction
// cut short (R5); if that fails, the store opens all the same with it pending (R19,
// apply_error()). The decision table is in docs/journal-format.md. The receiver needs no
// extra call for R18: dropping a failed store and opening the group again suffices.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/base/status.h"
#include "ferry/site/retention.h"
#include "ferry/site/rp.h"
#include "ferry/site/storage.h"
#include "ferry/transport/rules.h"

namespace ferry::site {

struct StoreOptions {
  std::string root;  // <store>
  // Storage seam: the real file system (io_uring, O_DIRECT where supported) or a faulty
  // twin in tests. Null means the real one.
  std::shared_ptr<Storage> storage;
  // Journal segment size bound. Pruning removes whole segments, so the store holds at most
  // one segment of pruned RPs beyond the bound (docs/journal-format.md, "Retention").
  std::uint64_t segment_bytes = 64ull << 20;
  std::size_t max_inflight_write_bytes = 16u << 20;  // journal appends in flight
  // Retention (retention.h): the options given for this group; empty means the default.
  // apply_committed() applies it; set_retention() changes it (a SIGHUP reload).
  RetentionPolicy retention;
  // The clock retention measures RP ages against (unix ns); null: the system clock. Tests
  // give a synthetic one.
  std::function<std::uint64_t()> clock;
  // Tiered retention (keep-hourly/daily/weekly) prunes RPs between kept ones; their records
  // stay until the journal is rewritten, which happens once they reach half the kept RPs'
  // bytes and at least this much (docs/journal-format.md, "Journal generations"). 0: at
  // every retention pass that leaves pruned RPs between kept ones (for tests).
  std::uint64_t rewrite_min_garbage_bytes = 64ull << 20;
};

// One offered RP as retention judged it.
struct PrunePoint {
  RpInfo info;
  bool keep = false;
  KeepRule rule = KeepRule::none;  // the rule that keeps it; none: removed
  bool pinned = false;             // a reader (an export, a restore) holds it
  std::uint64_t store_bytes = 0;   // its records in the journal (0: the base RP, in the images)
};

struct PruneReport {
  bool dry_run = false;
  RetentionPolicy policy;            // the effective policy applied
  std::vector<PrunePoint> points;    // every RP offered before, oldest first
  std::uint64_t removed = 0;         // RPs removed by this call
  std::uint64_t removed_bytes = 0;   // their journal bytes
  std::uint64_t compacted_bytes = 0; // journal bytes written into the replica images
  std::uint64_t rewritten_bytes = 0; // journal bytes of a rewrite (0: none this call)
  std::uint64_t base_before = 0, base_after = 0;  // the RP the images held
};

class GroupStore {
 public:
  virtual ~GroupStore() = default;
  // Opens (creating when `create`) the group's store and runs recovery. Takes the group lock;
  // a second open of the same group fails with Errc::busy.
  static Result<std::unique_ptr<GroupStore>> open(const StoreOptions& options,
                                                  const std::string& group, bool create);

  virtual const std::string& group() const = 0;
  virtual std::uint64_t last_committed_rp() const = 0;  // 0: none
  virtual std::uint64_t last_applied_rp() const = 0;
  // Disks of the last committed RP with their sizes and identities.
  virtual std::vector<RpDiskInfo> replica_disks() const = 0;
  // The source that sent the last committed RP (empty: none, or an older source).
  virtual std::string last_source_name() const = 0;

  // Opens a new RP. Refuses (Errc::diverged, naming the rule) when base_rp is not
  // last_committed_rp(), when rp_id <= last_committed_rp(), when a disk marked incremental is
  // not held at base_rp (C5.disk) or is held with another identity (C5.identity), or when the
  // RP comes from another source than the one that wrote the group (C5.source: every disk's
  // identity is new, none matches a held one; kRpFlagTakeOver lifts it). An RP left open by
  // a broken connection is discarded.
  virtual Status begin_rp(const RpBeginInfo& rp) = 0;
  // Appends one block of the open RP to the journal (asynchronously; bounded in bytes).
  virtual Status append_block(const BlockRecord& block) = 0;
  // Makes the open RP durable: waits for its records, checks the totals, fdatasyncs, writes
  // and syncs the commit record. Only after this returns ok may the RP be acknowledged.
  virtual Result<RpInfo> commit_rp(std::uint64_t rp_id, std::uint64_t frame_count,
                                   std::uint64_t logical_bytes) = 0;
  // Drops the open RP (never committed; its records are ignored by recovery).
  virtual void abort_rp() = 0;
  // Brings the replica images to the newest committed RP, crash-consistently. A failure
  // (EIO, ENOSPC, EFBIG on the replica) leaves the store usable with the apply pending (R19):
  // see apply_error().
  virtual Status apply_committed() = 0;
  // ok, or why the replica is behind the journal: the last apply or rebuild (at open or by
  // apply_committed) failed. While it is pending, RPs are still begun, journalled and
  // committed (durable: C2), points() and restore() read the journal, resync digests come
  // from the journal without trusting the image, and the state file keeps saying
  // "applying" (or names an older RP), so no open takes a half-written image for an RP.
  // Each apply_committed() retries, rewriting the replica from the journal.
  virtual Status apply_error() const = 0;

  // Retention by hand (`ferry prune`): judges every offered RP by `policy` (empty: the
  // default) at time `now_unix_ns`; unless dry_run, removes the RPs it drops and compacts
  // the replica to the oldest kept RP. apply_committed() does the same with the store's
  // own policy and clock.
  virtual Result<PruneReport> prune(const RetentionPolicy& policy, std::uint64_t now_unix_ns,
                                    bool dry_run) = 0;
  virtual void set_retention(const RetentionPolicy& policy) = 0;

  // Failover (failover_state.h; the marker must exist first, which turns retention off):
  // compacts the replica images forward to committed RP `rp_id`, so they hold it and can
  // back a VM's overlays. Errors: not_found naming the RP (not committed, pruned, unknown),
  // busy when a reader pins an older RP. Idempotent; RPs above rp_id stay in the journal.
  virtual Status fail_over_to(std::uint64_t rp_id) = 0;

  // Resync (C4): the xxh3-128 digests of `block_count` consecutive blocks of `disk` at
  // last_committed_rp(), starting at offset_bytes (a multiple of block_bytes, a power of two
  // <= 4 MiB). The last block of the disk may be short: its digest covers only the bytes up
  // to the disk's end; no block may start at or past the end. The digests describe the RP as
  // the journal holds it (the piece map restore uses: data read from the records, zero
  // records and uncovered ranges hashed as zeros without a read), never the image, which may
  // have drifted. Committed RPs are applied first and the image is compared block by block;
  // a block that differs is reported (warning naming group, disk, offset) and the replica
  // is marked so that the next apply, or the next open, rewrites it from the journal (R17).
  // Bounded: block_count <= kMaxDigestBlocks; memory is one block, one record, and the
  // pieces of the requested range.
  static constexpr std::uint32_t kMaxDigestBlocks = 1u << 16;
  virtual Result<std::vector<Hash128>> replica_digests(const std::string& disk,
                                                       std::uint64_t offset_bytes,
                                                       std::uint32_t block_bytes,
                                                       std::uint32_t block_count) = 0;

  virtual std::vector<RpInfo> points() const = 0;
  // Writes the raw image of `disk` at committed RP `rp_id` to out_path (sparse).
  virtual Status restore(std::uint64_t rp_id, const std::string& disk,
                         const std::string& out_path) const = 0;
};

// Two sources, one group (rule C5.source): every disk `offered` carries an identity, none
// equals an identity of `held` (the group's last RP), and at least one disk of the same name
// is held with another identity stored with its image (not ephemeral). A swap of names, an
// older source or a raw disk whose QEMU restarted is not a second source.
bool second_source(const RpBeginInfo& held, const RpBeginInfo& offered);
// The refusal: names the group, both sources and their disks' identities, and the fix.
std::string second_source_message(const std::string& group, const RpBeginInfo& held,
                                  const RpBeginInfo& offered);

// Read-only views for the CLI, without taking the group lock: lists committed RPs by
// reading the store (safe while a receiver runs).
Result<std::vector<RpInfo>> list_points(const std::string& root, const std::string& group);
// `ferry points`: every RP the group offers, with what retention says of it at `now_unix_ns`
// under the policy its last pruning applied (none yet: the default), whether a reader pins
// it and its bytes in the journal. Read-only, without the group lock.
Result<PruneReport> explain_points(const std::string& root, const std::string& group,
                                   std::uint64_t now_unix_ns);
// Writes disk `disk` at RP `rp_id` (0: the newest) through the ReadView (read_view.h) to
// out_path: a file (truncated to the disk's size, sparse) or a block device (never truncated;
// refused when smaller than the disk; zero ranges zeroed, BLKZEROOUT where it works).
// `progress` (optional) is called now and then with (bytes of the disk gone through, its size).
Status restore_point(const std::string& root, const std::string& group, std::uint64_t rp_id,
                     const std::string& disk, const std::string& out_path,
                     const std::function<void(std::uint64_t, std::uint64_t)>& progress = {});

}  // namespace ferry::site
