// GroupStore: the RP life cycle over the journal, recovery at open, apply and restore.
// The recovery decision table (R1..R19) is in docs/journal-format.md.
#include "ferry/site/store.h"
#include "ferry/site/read_view.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/file.h>
#include <sys/ioctl.h>

#include <unistd.h>

#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>

#include "ferry/base/bytes.h"
#include "ferry/base/fd.h"
#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "chain.h"
#include "journal.h"
#include "rewrite.h"
#include "pins.h"
#include "ferry/site/retention.h"
#include "ferry/site/failover_state.h"

namespace ferry::site {
namespace {

namespace jr = journal;

constexpr std::uint16_t kStateVersion = kLegacyStateVersion;  // the 40-byte layout

// The state file of the release before retention (version 1): the RP the images held, and
// an apply under way. Read only to migrate it (StoreImpl::migrate_legacy_state).
struct LegacyState {
  std::uint64_t applied_rp = 0;
  std::uint64_t applying_rp = 0;
};

// The state file and the R18 marker share one 40-byte layout (docs/journal-format.md):
// magic u32, version u16, 0 u16, group id u64, two values u64, xxh3-64 of bytes 0..31.
constexpr std::size_t kSmallFileBytes = 40;
struct SmallFileKind {
  std::uint32_t magic;
  std::uint16_t version;
};

std::string encode_small_file(SmallFileKind kind, std::uint64_t group_id, std::uint64_t a,
                              std::uint64_t b) {
  std::string s;
  ByteWriter w(s);
  w.u32(kind.magic);
  w.u16(kind.version);
  w.u16(0);
  w.u64(group_id);
  w.u64(a);
  w.u64(b);
  w.u64(xxh3_64(s.data(), s.size()));
  FERRY_ASSERT(s.size() == kSmallFileBytes);
  return s;
}

std::optional<std::pair<std::uint64_t, std::uint64_t>> decode_small_file(
    std::string_view s, SmallFileKind kind, std::uint64_t group_id) {
  if (s.size() != kSmallFileBytes || load_le64(s.data() + 32) != xxh3_64(s.data(), 32))
    return std::nullopt;
  ByteReader r(s);
  if (r.u32() != kind.magic || r.u16() != kind.version) return std::nullopt;
  r.u16();
  if (r.u64() != group_id) return std::nullopt;
  const std::uint64_t a = r.u64();
  return std::pair{a, r.u64()};
}

// Reads a small file whole (one byte more than the layout, so a longer file fails to decode).
Result<std::string> read_small_file(Storage& st, const std::string& path) {
  FERRY_ASSIGN_OR_RETURN(auto f, st.open(path, OpenFlags{.read_only = true}));
  std::string buf(kSmallFileBytes + 1, '\0');
  FERRY_ASSIGN_OR_RETURN(std::size_t got, f->pread(buf.data(), buf.size(), 0));
  buf.resize(got);
  return buf;
}

constexpr SmallFileKind kStateFile{kStateMagic, kStateVersion};

std::optional<LegacyState> decode_legacy_state(std::string_view s, std::uint64_t group_id) {
  auto v = decode_small_file(s, kStateFile, group_id);
  if (!v) return std::nullopt;
  return LegacyState{v->first, v->second};
}

// --- R18: after a failed write or sync, nothing after the last successful sync is trusted ---
//
// Linux marks pages whose writeback failed as clean: they read back with their new bytes
// (a commit record the source was told had failed, say) until evicted or a power cut, and
// no later sync writes them. So when the store fails with unsynced journal bytes, it
// remembers the writer's durable end twice: in a marker file `distrust` (written like the
// state file; survives a receiver restart without a reboot) and in this process-wide table
// (for when the marker cannot be written on a failing disk). The next open cuts the journal
// back to it before the scan reads anything, then forgets both.
constexpr std::uint32_t kDistrustMagic = 0x53494446;  // "FDIS"
constexpr std::uint16_t kDistrustVersion = 1;
constexpr SmallFileKind kDistrustFile{kDistrustMagic, kDistrustVersion};

struct Distrust {
  jr::RecordLoc from;
  bool on_disk = false;  // the marker was written: its absence means another open cut
};
std::mutex g_distrust_mu;
std::map<std::string, Distrust> g_distrust;  // by distrust_key()

// The group directory by name and inode: a directory removed and created again is another
// store.
std::string distrust_key(const std::string& group_dir) {
  struct stat st {};
  std::string key = std::filesystem::path(group_dir).lexically_normal().string();
  if (::stat(group_dir.c_str(), &st) == 0)
    key += "#" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
  return key;
}

std::string encode_distrust(std::uint64_t group_id, jr::RecordLoc from) {
  return encode_small_file(kDistrustFile, group_id, from.segment_seq, from.offset);
}

std::optional<jr::RecordLoc> decode_distrust(std::string_view s, std::uint64_t group_id) {
  auto v = decode_small_file(s, kDistrustFile, group_id);
  if (!v) return std::nullopt;
  return jr::RecordLoc{v->first, v->second};
}

bool loc_before(jr::RecordLoc a, jr::RecordLoc b) {
  return a.segment_seq != b.segment_seq ? a.segment_seq < b.segment_seq : a.offset < b.offset;
}

std::string loc_name(jr::RecordLoc l) {
  return "segment " + jr::segment_name(l.segment_seq) + " offset " + std::to_string(l.offset);
}

// The marker, if any. A marker that fails its checks refuses the group: trusting the
// journal past an unknown point could count an RP whose sync failed.
Result<std::optional<jr::RecordLoc>> read_distrust_marker(Storage& st, const Paths& paths,
                                                          std::uint64_t group_id) {
  if (!st.exists(paths.distrust)) return std::optional<jr::RecordLoc>();
  FERRY_ASSIGN_OR_RETURN(std::string buf, read_small_file(st, paths.distrust));
  auto loc = decode_distrust(buf, group_id);
  if (!loc)
    return Status::error(Errc::corrupt,
                         "marker " + paths.distrust + " (journal not trusted after a failed "
                         "sync) is corrupt; remove it only if no sync failed before (R18)");
  return std::optional<jr::RecordLoc>(*loc);
}

}  // namespace

// Where the journal stops being trusted: the marker and this process's table, the earlier.
Result<std::optional<jr::RecordLoc>> distrust_limit(Storage& st, const Paths& paths,
                                                    std::uint64_t group_id) {
  FERRY_ASSIGN_OR_RETURN(auto marker, read_distrust_marker(st, paths, group_id));
  std::optional<jr::RecordLoc> limit = marker;
  std::lock_guard<std::mutex> g(g_distrust_mu);
  auto it = g_distrust.find(distrust_key(paths.group_dir));
  if (it != g_distrust.end()) {
    if (it->second.on_disk && !marker) {
      g_distrust.erase(it);  // another open cut it already and removed the marker
    } else if (!limit || loc_before(it->second.from, *limit)) {
      limit = it->second.from;
    }
  }
  return limit;
}

Result<std::vector<std::uint64_t>> journal_generations(Storage& st, const Paths& paths) {
  FERRY_ASSIGN_OR_RETURN(auto names, st.list_dir(paths.group_dir));
  std::vector<std::uint64_t> gens;
  for (const auto& n : names) {
    if (n == "journal") {
      gens.push_back(0);
      continue;
    }
    if (n.rfind("journal.", 0) != 0 || n.size() == 8 || n.size() > 8 + 13) continue;
    std::uint64_t g = 0;
    bool digits = true;
    for (std::size_t i = 8; i < n.size(); ++i) {
      if (n[i] < '0' || n[i] > '9') digits = false;
      else g = g * 10 + static_cast<std::uint64_t>(n[i] - '0');
    }
    if (digits && g != 0 && n[8] != '0' && g <= kMaxJournalGen) gens.push_back(g);
  }
  std::sort(gens.begin(), gens.end());
  return gens;
}

int find_disk(const RpBeginInfo& rp, const std::string& name) {
  for (std::size_t i = 0; i < rp.disks.size(); ++i)
    if (rp.disks[i].name == name) return static_cast<int>(i);
  return -1;
}

namespace {

std::uint64_t now_unix_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// --- resync digests: the journal's view of the RP, checked against the replica image -----

class ZeroDigests {
 public:
  Hash128 of(std::uint32_t length) {
    auto it = digests_.find(length);
    if (it != digests_.end()) return it->second;
    std::string zeros(length, '\0');
    return digests_[length] = xxh3_128(zeros.data(), zeros.size());
  }

 private:
  std::map<std::uint32_t, Hash128> digests_;  // at most two lengths: the block, the last one
};

// --- disk identities ---------------------------------------------------------------------

// The rule itself is transport's (rules.h), shared with the source.
transport::SourceClaim claim_of(const RpBeginInfo& rp) {
  transport::SourceClaim c{rp.source_name, {}};
  for (const auto& d : rp.disks) c.disks.push_back({d.name, d.identity, d.identity_ephemeral});
  return c;
}

}  // namespace

bool second_source(const RpBeginInfo& held, const RpBeginInfo& offered) {
  return transport::second_source(claim_of(held), claim_of(offered));
}

std::string second_source_message(const std::string& group, const RpBeginInfo& held,
                                  const RpBeginInfo& offered) {
  return transport::second_source_message(group, claim_of(held), claim_of(offered));
}

namespace {

// --- the store ---------------------------------------------------------------------------

class StoreImpl final : public GroupStore {
 public:
  StoreImpl(const StoreOptions& options, std::string group)
      : opt_(options), group_(std::move(group)), group_id_(group_id_of(group_)),
        paths_(options.root, group_), st_(options.storage ? options.storage : real_storage()),
        images_(file_images(st_, paths_.replica_dir)) {
    chain_.group = group_;
  }

  Status open(bool create) {
    if (!st_->exists(paths_.group_dir)) {
      if (!create)
        return Status::error(Errc::not_found, "group " + group_ + " not found in store " +
                                                  opt_.root);
      FERRY_TRY(st_->make_dirs(paths_.group_dir));
    }
    FERRY_TRY(st_->make_dirs(paths_.replica_dir));
    // Readers pin RPs here; made now so a reader needs only an empty file (an inode, a
    // directory slot), not a new directory block, when the volume is full.
    FERRY_TRY(st_->make_dirs(paths_.group_dir + "/pins"));
    FERRY_TRY(lock());
    { FERRY_ASSIGN_OR_RETURN(auto gate, ReaderGate::shared(paths_.group_dir)); }
    FERRY_TRY(recover());
    FERRY_ASSIGN_OR_RETURN(writer_, jr::Writer::open(st_, writer_options(jdir_), scan_));
    return Status::ok();
  }

  const std::string& group() const override { return group_; }
  std::uint64_t last_committed_rp() const override { return chain_.newest(); }
  std::uint64_t last_applied_rp() const override { return chain_.catalog.base_rp; }
  std::vector<RpDiskInfo> replica_disks() const override {
    if (!chain_.rps.empty()) return chain_.rps.back().info.disks;
    return chain_.catalog.base_rp != 0 ? chain_.catalog.base_info.disks
                                       : std::vector<RpDiskInfo>{};
  }
  std::string last_source_name() const override {
    const RpBeginInfo* b = chain_.newest_begin();
    return b != nullptr ? b->source_name : std::string();
  }

  // C4: the digests describe the newest RP as the chain holds it (records over the base
  // image), read through the same view restore and the export use.
  Result<std::vector<Hash128>> replica_digests(const std::string& disk, std::uint64_t offset_bytes,
                                               std::uint32_t block_bytes,
                                               std::uint32_t block_count) override {
    FERRY_TRY(failed_);
    const RpBeginInfo* newest = chain_.newest_begin();
    if (newest == nullptr) return Status::error(Errc::not_found, "group " + group_ + " has no RP");
    int d = find_disk(*newest, disk);
    if (d < 0)
      return Status::error(Errc::not_found, "disk " + disk + " is not held at RP " +
                                                std::to_string(last_committed_rp()));
    const std::uint64_t size = newest->disks[d].size_bytes;
    if (!transport::block_bytes_valid(block_bytes) ||
        offset_bytes % block_bytes != 0 || block_count == 0 || block_count > kMaxDigestBlocks ||
        offset_bytes >= size || (block_count - 1) > (size - offset_bytes - 1) / block_bytes)
      return Status::error(Errc::invalid_argument,
                           "digests of " + std::to_string(block_count) + " blocks of " +
                               std::to_string(block_bytes) + " bytes at " +
                               std::to_string(offset_bytes) + " of disk " + disk + " (" +
                               std::to_string(size) + " bytes): not inside the disk");
    FERRY_ASSIGN_OR_RETURN(auto view, view_of(st_, paths_, chain_, 0, disk));
    std::string buf(block_bytes, '\0');
    std::vector<Hash128> out;
    out.reserve(block_count);
    for (std::uint32_t i = 0; i < block_count; ++i) {
      std::uint64_t at = offset_bytes + std::uint64_t(i) * block_bytes;
      auto len = static_cast<std::uint32_t>(std::min<std::uint64_t>(block_bytes, size - at));
      FERRY_ASSIGN_OR_RETURN(auto ext, view->extents(at, len));
      if (ext.size() == 1 && ext[0].zero) {
        out.push_back(zeros_.of(len));
        continue;
      }
      FERRY_TRY(view->pread(buf.data(), len, at));
      out.push_back(xxh3_128(buf.data(), len));
    }
    return out;
  }

  std::vector<RpInfo> points() const override { return chain_.points(); }
  Status restore(std::uint64_t rp_id, const std::string& disk,
                 const std::string& out_path) const override {
    FERRY_ASSIGN_OR_RETURN(auto view, view_of(st_, paths_, chain_, rp_id, disk));
    return write_image(st_, *view, out_path);
  }

  Status begin_rp(const RpBeginInfo& rp) override {
    FERRY_TRY(failed_);
    // The receiver refuses first (with the same text); this is the store's own guard.
    if (auto why = failover_refusal_for(paths_.group_dir, group_))
      return Status::error(Errc::invalid_argument, *why);
    FERRY_TRY(check_begin(rp));
    if (open_) abort_rp();
    FERRY_TRY(failed_);
    jr::RecordHeader h;
    h.type = jr::RecordType::rp_begin;
    h.rp_id = rp.rp_id;
    FERRY_ASSIGN_OR_RETURN(jr::RecordLoc loc, append(h, jr::encode_begin(rp)));
    open_ = OpenRp{};
    open_->rp.begin = rp;
    open_->rp.first_segment = loc.segment_seq;
    open_->stats.resize(rp.disks.size());
    return Status::ok();
  }
  Status append_block(const BlockRecord& b) override {
    FERRY_TRY(failed_);
    FERRY_TRY(check_block(b));
    jr::RecordHeader h;
    h.type = jr::RecordType::block;
    h.kind = b.kind;
    h.codec = b.codec;
    h.disk_index = b.disk_index;
    h.rp_id = b.rp_id;
    h.seq = b.seq;
    h.offset_bytes = b.offset_bytes;
    h.length_bytes = b.length_bytes;
    h.hash = b.hash;
    FERRY_ASSIGN_OR_RETURN(jr::RecordLoc loc, append(h, b.payload));
    std::uint32_t total = static_cast<std::uint32_t>(jr::kRecordHeaderBytes + b.payload.size());
    open_->rp.index.add(jr::BlockEntry{loc, b.offset_bytes, b.length_bytes, total,
                                       b.disk_index, b.kind, b.codec});
    auto& s = open_->stats[b.disk_index];
    s.changed_bytes += b.length_bytes;
    if (b.kind == RecordKind::zero) s.zero_bytes += b.length_bytes;
    s.stored_bytes += total;
    open_->frames += 1;
    open_->logical_bytes += b.length_bytes;
    return Status::ok();
  }
  Result<RpInfo> commit_rp(std::uint64_t rp_id, std::uint64_t frame_count,
                           std::uint64_t logical_bytes) override {
    FERRY_TRY(failed_);
    if (!open_ || open_->rp.begin.rp_id != rp_id)
      return Status::error(Errc::invalid_argument,
                           "commit of RP " + std::to_string(rp_id) + ": it is not the open RP");
    if (open_->frames != frame_count || open_->logical_bytes != logical_bytes) {
      auto s = Status::error(Errc::protocol,
                             "commit of RP " + std::to_string(rp_id) + ": the sender counts " +
                                 std::to_string(frame_count) + " frames / " +
                                 std::to_string(logical_bytes) + " bytes, the journal holds " +
                                 std::to_string(open_->frames) + " / " +
                                 std::to_string(open_->logical_bytes));
      abort_rp();
      return s;
    }
    FERRY_TRY(make_records_durable());
    RpInfo info = commit_info();
    FERRY_TRY(write_commit_record(info));
    open_->rp.info = info;
    open_->rp.index.seal();
    chain_.rps.push_back(std::move(open_->rp));
    open_.reset();
    return info;
  }
  void abort_rp() override {
    if (!open_) return;
    std::uint64_t id = open_->rp.begin.rp_id;
    open_.reset();
    if (!failed_.is_ok()) return;
    jr::RecordHeader h;
    h.type = jr::RecordType::rp_abort;
    h.rp_id = id;
    (void)append(h, {});  // not synced: recovery ignores an RP without commit anyway (R3)
  }
  // Retention after a commit (the receiver calls it once the RP is acknowledged): finishes
  // a compaction left pending, prunes what the group's policy drops and compacts the base
  // forward. A failure touches only the images and the state file, never the journal, so
  // it leaves the store usable with the compaction pending (R19): the error is kept
  // (apply_error) and the next call retries.
  Status apply_committed() override {
    FERRY_TRY(failed_);
    // Failed over: the images back the running VM's overlays; retention is off.
    if (failed_over(paths_.group_dir)) return Status::ok();
    Status s = retain(opt_.retention, clock_now(), false).status();
    if (!s.is_ok()) {
      apply_error_ = std::move(s).with_context("group " + group_ + ": retention could not "
                                               "compact the replica (pending, retried)");
      // The caller reports it (the receiver once per episode, not at every retry).
      spdlog::debug("{}", apply_error_.to_string());
      return apply_error_;
    }
    apply_error_ = Status::ok();
    return Status::ok();
  }

  Status apply_error() const override { return apply_error_; }

  // Failover (failover_state.h): the images brought forward to `rp_id` by the store's own
  // compaction (cost: the journal bytes of the RPs up to it). RPs above it stay in the
  // journal, untouched. Idempotent: a crash anywhere leaves either the intent (redone by this
  // call or by open's recovery, R5) or the new base.
  Status fail_over_to(std::uint64_t rp_id) override {
    FERRY_TRY(failed_);
    FERRY_ASSERT(failed_over(paths_.group_dir));  // the marker first: no retention after this
    const std::string g = "group '" + group_ + "'";
    if (rp_id == 0 || rp_id > chain_.newest())
      return Status::error(Errc::not_found, g + ": RP " + std::to_string(rp_id) +
                                                " is not committed (newest: " +
                                                std::to_string(chain_.newest()) + ")");
    // A compaction left pending (R19, or a failover cut short) is finished first.
    if (chain_.catalog.target_rp != 0 && chain_.catalog.target_rp <= rp_id)
      FERRY_TRY(compact(chain_.catalog.target_rp));
    if (rp_id == chain_.catalog.base_rp) return Status::ok();  // done already
    // A pending compaction past rp_id means retention dropped it (the images may hold part
    // of the newer RPs already).
    if (rp_id < chain_.catalog.base_rp || chain_.catalog.is_pruned(rp_id) ||
        chain_.catalog.target_rp > rp_id)
      return Status::error(Errc::not_found, g + ": RP " + std::to_string(rp_id) +
                                                " was pruned (see ferry points)");
    bool known = false;
    for (const auto& r : chain_.rps) known |= r.info.rp_id == rp_id;
    if (!known)
      return Status::error(Errc::not_found, g + ": RP " + std::to_string(rp_id) + " is unknown");
    {
      FERRY_ASSIGN_OR_RETURN(auto gate, ReaderGate::exclusive(paths_.group_dir));
      FERRY_ASSIGN_OR_RETURN(auto pins, live_pins(paths_.group_dir));
      for (const auto& p : pins)
        if (p.rp_id < rp_id)
          return Status::error(Errc::busy, g + ": a reader (an export or restore) holds RP " +
                                               std::to_string(p.rp_id) +
                                               ", older than RP " + std::to_string(rp_id) +
                                               "; stop it and run ferry failover again");
      Catalog next = chain_.catalog;
      next.target_rp = rp_id;
      FERRY_TRY(write_catalog(next));
      chain_.catalog = std::move(next);
    }
    FERRY_KILL_POINT("failover.after_intent");
    return compact(rp_id);
  }

  void set_retention(const RetentionPolicy& policy) override { opt_.retention = policy; }

  Result<PruneReport> prune(const RetentionPolicy& policy, std::uint64_t now_unix_ns,
                            bool dry_run) override {
    FERRY_TRY(failed_);
    if (!dry_run)
      if (auto why = failover_refusal_for(paths_.group_dir, group_))
        return Status::error(Errc::busy, *why + "; retention is off while failed over");
    auto r = retain(policy, now_unix_ns, dry_run);
    if (!dry_run) apply_error_ = r.is_ok() ? Status::ok() : r.status();
    return r;
  }

 private:
  struct OpenRp {
    jr::CommittedRp rp;
    std::vector<RpDiskInfo> stats;
    std::uint64_t frames = 0;
    std::uint64_t logical_bytes = 0;
  };

  std::uint64_t clock_now() const { return opt_.clock ? opt_.clock() : now_unix_ns(); }

  Status lock() {
    UniqueFd fd(::open(paths_.lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
    if (!fd.valid()) return Status::from_errno(errno, "open lock file " + paths_.lock);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK)
        return Status::error(Errc::busy, "group " + group_ + " is open elsewhere (lock " +
                                             paths_.lock + " is held)");
      return Status::from_errno(errno, "flock " + paths_.lock);
    }
    lock_ = std::move(fd);
    return Status::ok();
  }
  jr::Writer::Options writer_options(const std::string& dir) const {
    std::size_t buffer_bytes = std::max<std::size_t>(
        opt_.max_inflight_write_bytes / 2 / jr::kBlockAlignBytes * jr::kBlockAlignBytes,
        (jr::kMaxRecordBytes + 2 * jr::kMaxPaddingBytes + jr::kBlockAlignBytes) /
            jr::kBlockAlignBytes * jr::kBlockAlignBytes);
    return jr::Writer::Options{dir, group_id_, opt_.segment_bytes, buffer_bytes};
  }

  // --- recovery (docs/journal-format.md, R1..R24) ---

  // The journal generation the state file names (catalog.h). A state file that cannot be
  // read names generation 0, the only one a store has before its first rewrite; once a
  // rewrite happened the base had moved, so nothing else says which RP the images hold
  // (R6). A named generation whose directory is gone lost every RP above the base (R24).
  Status choose_journal() {
    std::uint64_t gen = 0;
    bool named = false;
    if (st_->exists(paths_.state)) {
      FERRY_ASSIGN_OR_RETURN(auto f, st_->open(paths_.state, OpenFlags{.read_only = true}));
      std::string buf(kMaxCatalogBytes + 1, '\0');
      FERRY_ASSIGN_OR_RETURN(std::size_t got, f->pread(buf.data(), buf.size(), 0));
      buf.resize(got);
      if (auto c = decode_catalog(buf, group_id_); c.is_ok()) {
        gen = c->journal_gen;
        named = true;
      }
    }
    FERRY_ASSIGN_OR_RETURN(auto gens, journal_generations(*st_, paths_));
    if (!named && !gens.empty() && gens.back() != 0)
      return Status::error(Errc::corrupt,
                           "state file " + paths_.state + " cannot be read, and the journal of "
                           "group " + group_ + " was rewritten by retention (" +
                               paths_.journal_dir_for(gens.back()) +
                               "): nothing else says which generation and which RP the replica "
                               "images hold; refusing the group (R6). Restore the state file "
                               "from a backup of the store, or remove the group and replicate "
                               "it again in full");
    jdir_ = paths_.journal_dir_for(gen);
    if (gen != 0 && !st_->exists(jdir_))
      return Status::error(Errc::corrupt,
                           "state file " + paths_.state + " names journal generation " +
                               std::to_string(gen) + ", but " + jdir_ + " is missing: the RPs "
                               "above the replica's are lost (R24). Restore the directory from "
                               "a backup of the store, or remove the group and replicate it "
                               "again in full");
    FERRY_TRY(st_->make_dirs(jdir_));
    chain_.journal_dir = jdir_;
    return Status::ok();
  }

  Status recover() {
    FERRY_TRY(probe_io_uring());
    FERRY_TRY(choose_journal());
    FERRY_TRY(cut_untrusted());  // R18, before the scan can trust anything
    FERRY_ASSIGN_OR_RETURN(scan_, jr::scan(*st_, jdir_, group_id_, jr::ScanMode::recover));
    for (const auto& n : scan_.notes) spdlog::info("group {}: recovery: {}", group_, n);
    // R7/R20 are checked before anything is cut, so a refusal leaves the evidence in place.
    FERRY_ASSIGN_OR_RETURN(chain_.catalog, read_catalog());
    const std::uint64_t base = chain_.catalog.base_rp;
    const std::uint64_t journal_newest =
        scan_.committed.empty() ? 0 : scan_.committed.back().info.rp_id;
    for (auto& r : scan_.committed)
      if (r.info.rp_id > base) chain_.rps.push_back(std::move(r));
    scan_.committed.clear();
    if (base != 0 && journal_newest != 0 && journal_newest < base)  // R7
      return Status::error(Errc::corrupt,
                           "state file " + paths_.state + " says the replica holds RP " +
                               std::to_string(base) + ", but the journal ends at RP " +
                               std::to_string(journal_newest) + " (R7)");
    if (!chain_.rps.empty() && chain_.rps.front().begin.base_rp != base)  // R20
      return Status::error(Errc::corrupt,
                           "group " + group_ + ": the journal's oldest RP above the replica's "
                           "RP " + std::to_string(base) + " is RP " +
                               std::to_string(chain_.rps.front().info.rp_id) + ", which follows RP " +
                               std::to_string(chain_.rps.front().begin.base_rp) +
                               ": journal segments are missing (R20)");
    const std::uint64_t target = chain_.catalog.target_rp;
    const bool target_held = std::any_of(chain_.rps.begin(), chain_.rps.end(), [&](const auto& r) {
      return r.info.rp_id == target;
    });
    if (target != 0 && !target_held)
      return Status::error(Errc::corrupt, "state file " + paths_.state + " names a compaction to RP " +
                                              std::to_string(target) +
                                              ", which the journal does not hold (R21)");
    if (scan_.tail_dirty) {
      FERRY_KILL_POINT("journal.before_truncate");
      FERRY_TRY(jr::cut_tail(*st_, jdir_, scan_));
      FERRY_KILL_POINT("journal.after_truncate");
    }
    if (st_->exists(paths_.state_tmp)) FERRY_TRY(st_->remove(paths_.state_tmp));  // R10
    if (st_->exists(paths_.distrust_tmp)) FERRY_TRY(st_->remove(paths_.distrust_tmp));
    FERRY_TRY(check_base_images());  // R13
    // The journal is sound from here on. A compaction cut short (R5) is redone; it may fail
    // (EIO, ENOSPC, EFBIG on the replica) without failing the open: the group keeps
    // journalling and committing RPs with it pending (R19), instead of refusing every hello.
    if (target != 0) {
      spdlog::info("group {}: recovery: a compaction of the replica to RP {} was cut short; "
                   "redoing it (R5)", group_, target);
      if (Status s = compact(target); !s.is_ok()) {
        apply_error_ = s;
        spdlog::info("group {}: recovery: the journal is sound (last committed RP {}), but the "
                     "replica could not be compacted to RP {}: {}; RPs are still accepted, the "
                     "compaction is retried (R19)", group_, last_committed_rp(), target,
                     s.to_string());
        return Status::ok();
      }
    }
    if (Status s = remove_garbage(/*state_read_at_open=*/true); !s.is_ok())
      spdlog::warn("group {}: cannot remove pruned journal segments yet: {}", group_,
                   s.to_string());
    return Status::ok();
  }

  // The state file (catalog.h). Absent or damaged while the journal still starts at RP 0
  // (nothing pruned: the images are not read) it is written anew (R6, R12); a version 1
  // file, from the release before retention, is migrated in place (R22). Absent or damaged
  // once the base has moved, nothing else says which RP the images hold: refused (R6).
  Result<Catalog> read_catalog() {
    const bool from_zero =
        scan_.committed.empty() || scan_.committed.front().begin.base_rp == 0;
    std::string why = "is missing";
    if (st_->exists(paths_.state)) {
      FERRY_ASSIGN_OR_RETURN(auto f, st_->open(paths_.state, OpenFlags{.read_only = true}));
      std::string buf(kMaxCatalogBytes + 1, '\0');
      FERRY_ASSIGN_OR_RETURN(std::size_t got, f->pread(buf.data(), buf.size(), 0));
      buf.resize(got);
      auto c = decode_catalog(buf, group_id_);
      if (c.is_ok()) return std::move(*c);
      if (auto legacy = decode_legacy_state(buf, group_id_); legacy && from_zero)
        return migrate_legacy_state(*legacy);
      if (c.status().code() == Errc::unsupported && !decode_legacy_state(buf, group_id_))
        return std::move(c).status().with_context("group " + group_);
      why = "is corrupt (" + c.status().message() + ")";
    }
    if (!from_zero)
      return Status::error(Errc::corrupt,
                           "state file " + paths_.state + " " + why + ", and the journal starts "
                           "after RP " + std::to_string(scan_.committed.front().begin.base_rp) +
                           ": nothing else says which RP the replica images hold; refusing the "
                           "group (R6). Restore the state file from a backup of the store, or "
                           "remove the group and replicate it again in full");
    if (why != "is missing" || !scan_.committed.empty())
      spdlog::warn("group {}: state file {} {}; the journal holds every RP from the first, so "
                   "it is written anew (R6)", group_, paths_.state, why);
    Catalog fresh;
    FERRY_TRY(write_catalog(fresh));
    FERRY_TRY(remove_images_not_in(fresh));
    return fresh;
  }

  // R22: a store of the release before retention kept every RP in the journal and its
  // images at the newest RP. In layout 2 the images hold the base RP; a journal that starts
  // at RP 0 needs none, so the migration writes a version 2 state (base 0: images unread)
  // and then removes the old images (a crash in between leaves them unread, removed at the
  // next open). The first compaction writes them again.
  Result<Catalog> migrate_legacy_state(const LegacyState& old) {
    Catalog fresh;
    FERRY_TRY(write_catalog(fresh));
    FERRY_KILL_POINT("migrate.after_state");
    FERRY_TRY(remove_images_not_in(fresh));
    spdlog::info("group {}: migrated the store in place from layout 1 (replica images at the "
                 "newest RP {}, every RP in the journal) to layout 2 (images at the oldest kept "
                 "RP, written by retention): every committed RP stays restorable", group_,
                 old.applied_rp);
    return fresh;
  }

  // R13: the images of the base RP hold every byte no later record covers: one missing or
  // of the wrong size is data lost, and nothing in the store can rebuild it.
  Status check_base_images() {
    const Catalog& c = chain_.catalog;
    if (c.base_rp == 0) return Status::ok();
    // A compaction cut short (R5) may have resized the images already: only their presence
    // is checked then; the redo sets their sizes.
    const bool resizing = c.target_rp != 0;
    for (const auto& d : c.base_begin.disks) {
      const std::string path = images_->describe(d.name);
      std::optional<std::uint64_t> got;
      if (images_->exists(d.name)) {
        auto f = images_->open(d.name, /*create=*/false);
        if (f.is_ok()) {
          auto size = (*f)->size();
          if (size.is_ok()) got = *size;
        }
      }
      if (got && (resizing || *got == d.size_bytes)) continue;
      return Status::error(Errc::corrupt,
                           "replica image " + path + " of RP " + std::to_string(c.base_rp) +
                               (got ? " has " + std::to_string(*got) + " bytes where disk " +
                                          d.name + " has " + std::to_string(d.size_bytes)
                                    : std::string(" is missing")) +
                               ": the bytes no kept RP changed since RP " +
                               std::to_string(c.base_rp) +
                               " are lost (R13). Restore the image from a backup of the store, "
                               "or remove the group and replicate it again in full");
    }
    return Status::ok();
  }

  // R18: a failed write or sync left journal bytes that no successful sync covered; they
  // may read back from the page cache yet be lost on the disk. Cut them before the scan.
  // A cut that fails fails the open (retried at the next one); the marker stays till then.
  Status cut_untrusted() {
    FERRY_ASSIGN_OR_RETURN(auto limit, distrust_limit(*st_, paths_, group_id_));
    if (!limit) return Status::ok();
    spdlog::info("group {}: recovery: R18: a write or sync failed earlier; the journal is "
                 "trusted only up to {}, the last position a successful sync covered: cutting "
                 "it there", group_, loc_name(*limit));
    Status s = jr::cut_back_to(*st_, jdir_, *limit);
    if (s.is_ok() && st_->exists(paths_.distrust)) {
      s = st_->remove(paths_.distrust);
      if (s.is_ok()) s = st_->sync_dir(paths_.group_dir);
    }
    if (!s.is_ok())
      return std::move(s.set_retryable())
          .with_context("group " + group_ + ": cannot cut the journal back to " +
                        loc_name(*limit) + " after a failed sync (R18); retry the open");
    std::lock_guard<std::mutex> g(g_distrust_mu);
    g_distrust.erase(distrust_key(paths_.group_dir));
    return Status::ok();
  }
  // Called once, when the store fails with journal bytes no successful sync covered.
  void distrust_unsynced(jr::RecordLoc from) {
    Status s = write_small_file(paths_.distrust_tmp, paths_.distrust,
                                encode_distrust(group_id_, from));
    // Debug level: on a full or failing disk this fails at every refused session, and the
    // receiver reports the cause once per episode (the marker is a second line of defence).
    if (!s.is_ok())
      spdlog::debug("group {}: cannot write marker {} ({}); this process still cuts the journal "
                    "back to {} at the next open, a restart before that would not", group_,
                    paths_.distrust, s.to_string(), loc_name(from));
    std::lock_guard<std::mutex> g(g_distrust_mu);
    auto& d = g_distrust[distrust_key(paths_.group_dir)];
    d.from = from;
    d.on_disk = s.is_ok();
  }
  Status write_catalog(const Catalog& c) {
    return write_small_file(paths_.state_tmp, paths_.state, encode_catalog(group_id_, c));
  }

  // tmp + fdatasync + rename + fsync dir: the old or the new bytes, never a mix.
  Status write_small_file(const std::string& tmp, const std::string& path,
                          const std::string& bytes) {
    {
      FERRY_ASSIGN_OR_RETURN(auto f, st_->open(tmp, OpenFlags{.create = true}));
      FERRY_TRY(f->truncate(0));
      FERRY_TRY(f->pwrite(bytes.data(), bytes.size(), 0));
      FERRY_TRY(f->datasync());
    }
    FERRY_KILL_POINT("state.before_rename");
    FERRY_TRY(st_->rename(tmp, path));
    FERRY_KILL_POINT("state.after_rename");
    return st_->sync_dir(paths_.group_dir);
  }
  // --- retention ---

  Result<PruneReport> retain(const RetentionPolicy& given, std::uint64_t now, bool dry_run) {
    FERRY_TRY(check_retention(given));
    const RetentionPolicy policy = effective_retention(given);
    // A compaction left pending by a failure is finished first (R19).
    if (!dry_run && chain_.catalog.target_rp != 0) FERRY_TRY(compact(chain_.catalog.target_rp));
    PruneReport rep;
    std::uint64_t target = 0;
    {
      // The decision under the gate: a reader either pinned its RP before (kept) or loads
      // the state after it is written (and is refused a pruned RP).
      FERRY_ASSIGN_OR_RETURN(auto gate, ReaderGate::exclusive(paths_.group_dir));
      FERRY_ASSIGN_OR_RETURN(auto pins, live_pins(paths_.group_dir));
      rep = judge_points(chain_, pins, policy, now);
      rep.dry_run = dry_run;
      Catalog next = chain_.catalog;
      set_catalog_policy(next, policy);
      for (const auto& p : rep.points) {
        if (!p.keep)
          next.pruned.push_back(p.info.rp_id);
        else if (target == 0)
          target = p.info.rp_id;  // the oldest kept RP: the new base
      }
      if (dry_run) return rep;
      // The base RP itself, when dropped, leaves with the compaction (the target says so).
      std::erase_if(next.pruned, [&](std::uint64_t id) { return id <= next.base_rp; });
      std::sort(next.pruned.begin(), next.pruned.end());
      next.pruned.erase(std::unique(next.pruned.begin(), next.pruned.end()), next.pruned.end());
      if (target == chain_.catalog.base_rp) target = 0;
      next.target_rp = target;
      if (!same_catalog(next, chain_.catalog)) {
        FERRY_TRY(write_catalog(next));
        chain_.catalog = std::move(next);
        FERRY_KILL_POINT("prune.after_intent");
      }
    }
    if (target != 0) FERRY_TRY(compact(target, &rep));
    rep.base_after = chain_.catalog.base_rp;
    FERRY_TRY(maybe_rewrite(rep));
    if (Status s = remove_garbage(); !s.is_ok())
      spdlog::warn("group {}: cannot remove pruned journal segments yet: {}", group_,
                   s.to_string());
    return rep;
  }

  bool same_catalog(const Catalog& a, const Catalog& b) const {
    return encode_catalog(group_id_, a) == encode_catalog(group_id_, b);
  }

  // Brings the replica images from the base to RP `target` (the new oldest kept RP): the
  // records of every RP in (base, target], in order, then one fdatasync per image, then the
  // state names the new base. Cost: the bytes of the RPs it drops. Redone whole after a
  // crash or a failure (R5): it writes only ranges those RPs cover, never a byte a reader of
  // a kept RP takes from the base image.
  Status compact(std::uint64_t target, PruneReport* rep = nullptr) {
    FERRY_ASSERT(chain_.catalog.target_rp == target);
    jr::Reader reader(st_, jdir_);
    const jr::CommittedRp* to = nullptr;
    for (const auto& rp : chain_.rps) {
      if (rp.info.rp_id > target) break;
      Status s = apply_rp_to_images(*images_, reader, rp, rewrite_zeros_);
      if (!s.is_ok()) {
        rewrite_zeros_ = true;  // what the failure lost must be written again, not punched
        return std::move(s).with_context("compact RP " + std::to_string(rp.info.rp_id) +
                                         " into the replica");
      }
      if (rep != nullptr)
        for (const auto& d : rp.info.disks) rep->compacted_bytes += d.stored_bytes;
      to = &rp;
    }
    FERRY_ASSERT(to != nullptr && to->info.rp_id == target);
    if (Status s = images_->sync(); !s.is_ok()) {  // a new image's name must survive too
      rewrite_zeros_ = true;
      return s;
    }
    FERRY_KILL_POINT("apply.after_fsync");
    Catalog next = chain_.catalog;
    next.base_rp = target;
    next.target_rp = 0;
    next.base_begin = to->begin;
    next.base_info = to->info;
    std::erase_if(next.pruned, [&](std::uint64_t id) { return id <= target; });
    FERRY_TRY(write_catalog(next));
    FERRY_KILL_POINT("prune.after_base");
    rewrite_zeros_ = false;
    chain_.catalog = std::move(next);
    std::erase_if(chain_.rps, [&](const jr::CommittedRp& r) { return r.info.rp_id <= target; });
    return Status::ok();
  }

  // Journal segments that hold only RPs at or below the base, and images of disks the base
  // does not hold. Deferred while a reader that opened before the base moved still reads
  // them (its pin names the base it saw).
  // state_read_at_open: the state was read, not written, by this open. It is then written
  // again (durably) before anything it says is done with is removed: a state read back from
  // the page cache after its sync failed could be lost at a power cut, and the old one would
  // still need what was removed. Only when there is something to remove: an open of a full
  // volume must not need space.
  Status remove_garbage(bool state_read_at_open = false) {
    FERRY_ASSIGN_OR_RETURN(auto gate, ReaderGate::exclusive(paths_.group_dir));
    FERRY_ASSIGN_OR_RETURN(auto pins, live_pins(paths_.group_dir));
    const std::uint64_t gen = chain_.catalog.journal_gen;
    bool base_pinned = false, old_gen_pinned = false;
    for (const auto& p : pins) {
      base_pinned |= p.base_rp < chain_.catalog.base_rp;
      old_gen_pinned |= p.journal_gen < gen;
    }
    const std::uint64_t first_kept =
        chain_.rps.empty() ? UINT64_MAX : chain_.rps.front().first_segment;
    if (state_read_at_open) {
      FERRY_ASSIGN_OR_RETURN(bool any, garbage_exists(first_kept));
      if (!any) return Status::ok();
      FERRY_TRY(write_catalog(chain_.catalog));
    }
    // Other journal generations: a rewrite cut short (above) or one replaced (below, kept
    // while a reader still reads it).
    FERRY_ASSIGN_OR_RETURN(auto gens, journal_generations(*st_, paths_));
    for (std::uint64_t g : gens)
      if (g > gen || (g < gen && !old_gen_pinned))
        FERRY_TRY(remove_journal_dir(paths_.journal_dir_for(g)));
    if (base_pinned) return Status::ok();
    FERRY_TRY(jr::remove_segments_below(*st_, jdir_, first_kept));
    return remove_images_not_in(chain_.catalog);
  }

  Result<bool> garbage_exists(std::uint64_t first_kept) {
    FERRY_ASSIGN_OR_RETURN(auto gens, journal_generations(*st_, paths_));
    if (gens.size() > 1) return true;
    FERRY_ASSIGN_OR_RETURN(auto names, st_->list_dir(jdir_));
    std::vector<std::uint64_t> segs;
    for (const auto& n : names)
      if (auto seq = jr::parse_segment_name(n)) segs.push_back(*seq);
    std::sort(segs.begin(), segs.end());
    if (segs.size() > 1 && segs.front() < std::min(first_kept, segs.back())) return true;
    FERRY_ASSIGN_OR_RETURN(auto disks, images_->disks());
    for (const auto& d : disks)
      if (chain_.catalog.base_rp == 0 || find_disk(chain_.catalog.base_begin, d) < 0) return true;
    return false;
  }

  // Removes a journal directory and everything in it (segments; nothing else lives there).
  Status remove_journal_dir(const std::string& dir) {
    FERRY_ASSERT(dir != jdir_);
    FERRY_ASSIGN_OR_RETURN(auto names, st_->list_dir(dir));
    for (const auto& n : names) FERRY_TRY(st_->remove(dir + "/" + n));
    return st_->remove(dir);
  }

  // --- tiered retention: the journal rewrite (rewrite.h) ---

  static std::uint64_t stored_bytes(const RpInfo& info) {
    std::uint64_t n = 0;
    for (const auto& d : info.disks) n += d.stored_bytes;
    return n;
  }

  // Pruned RPs between kept ones keep their records until the base passes them. A rewrite
  // drops what of them no kept RP needs (what a later RP overwrote before the next kept one);
  // the rest moves into the kept RP after them. It runs once the index says it would drop
  // at least half of what it writes (and rewrite_min_garbage_bytes): so it costs at most
  // twice the bytes it drops, and at rest the journal stays within 1.5 times the kept RPs'
  // changes plus that minimum, plus what was pruned since the last look (a quarter of the
  // kept bytes, or the minimum). The look reads record headers only, and only when the
  // pruned RPs' bytes could pass the mark. After a failed rewrite the next waits as long.
  Status maybe_rewrite(PruneReport& rep) {
    std::uint64_t garbage = 0, kept_bytes = 0;
    std::vector<std::uint64_t> kept;
    for (const auto& r : chain_.rps) {
      if (chain_.catalog.is_pruned(r.info.rp_id)) {
        garbage += stored_bytes(r.info);
      } else {
        kept_bytes += stored_bytes(r.info);
        kept.push_back(r.info.rp_id);
      }
    }
    const std::uint64_t min = opt_.rewrite_min_garbage_bytes;
    if (garbage == 0 || garbage < rewrite_retry_at_ || kept.empty() ||
        kept.back() != chain_.newest())
      return Status::ok();
    const std::uint64_t look_again = garbage + std::max(min, kept_bytes / 4);
    if (min == 0) return run_rewrite(kept, rep, garbage, look_again);  // tests: at once
    if (garbage < std::max(min, kept_bytes / 2)) return Status::ok();
    auto est = estimate_rewrite_bytes(st_, paths_, chain_, kept);
    if (!est.is_ok()) {
      rewrite_retry_at_ = look_again;
      spdlog::warn("group {}: cannot size a journal rewrite: {}", group_, est.status().to_string());
      return Status::ok();
    }
    const std::uint64_t total = garbage + kept_bytes;
    const std::uint64_t drops = total > *est ? total - *est : 0;
    if (drops < std::max(min, *est / 2)) {
      rewrite_retry_at_ = look_again;
      spdlog::debug("group {}: a journal rewrite would write {} bytes to drop {}: not yet",
                    group_, *est, drops);
      return Status::ok();
    }
    return run_rewrite(kept, rep, garbage, look_again);
  }

  Status run_rewrite(const std::vector<std::uint64_t>& kept, PruneReport& rep,
                     std::uint64_t garbage, std::uint64_t look_again) {
    Status s = rewrite_journal(kept, rep);
    if (!s.is_ok() && failed_.is_ok()) {
      rewrite_retry_at_ = look_again;
      spdlog::warn("group {}: the journal rewrite of tiered retention failed ({}); the store "
                   "keeps the pruned RPs' {} bytes until the next attempt", group_,
                   s.to_string(), garbage);
      return Status::ok();
    }
    rewrite_retry_at_ = 0;
    return s;
  }

  // Writes generation gen + 1 (the kept RPs as deltas on one another), makes it durable,
  // reads it back as recovery would, and only then names it in the state file. A crash
  // before that leaves generation gen in force and gen + 1 garbage (R23); after it, the
  // reverse (R23). A failure to write the state file fails the store: what the file holds on
  // disk is not known then, and only a re-open may decide which generation is garbage.
  Status rewrite_journal(const std::vector<std::uint64_t>& kept, PruneReport& rep) {
    FERRY_ASSERT(!open_ && failed_.is_ok());
    const std::uint64_t gen = chain_.catalog.journal_gen + 1;
    if (gen > kMaxJournalGen) return Status::error(Errc::unsupported, "journal generation limit");
    const std::string dir = paths_.journal_dir_for(gen);
    if (st_->exists(dir)) FERRY_TRY(remove_journal_dir(dir));
    FERRY_TRY(st_->make_dirs(dir));
    FERRY_TRY(st_->sync_dir(paths_.group_dir));
    RewriteStats stats;
    {
      FERRY_ASSIGN_OR_RETURN(auto w, jr::Writer::open(st_, writer_options(dir), jr::ScanResult{}));
      FERRY_TRY(write_kept_rps(st_, paths_, chain_, kept, *w, stats));
      FERRY_TRY(w->flush());
      FERRY_TRY(w->sync());
    }
    FERRY_TRY(st_->sync_dir(dir));
    FERRY_KILL_POINT("rewrite.before_switch");
    FERRY_ASSIGN_OR_RETURN(jr::ScanResult scan, jr::scan(*st_, dir, group_id_,
                                                         jr::ScanMode::recover));
    std::vector<std::uint64_t> got;
    for (const auto& r : scan.committed) got.push_back(r.info.rp_id);
    if (got != kept || scan.tail_dirty)
      return Status::error(Errc::corrupt, "group " + group_ + ": the rewritten journal " + dir +
                                              " does not read back as the " +
                                              std::to_string(kept.size()) + " kept RPs");
    FERRY_ASSIGN_OR_RETURN(auto writer, jr::Writer::open(st_, writer_options(dir), scan));
    const std::uint64_t before = journal_bytes();
    {
      FERRY_ASSIGN_OR_RETURN(auto gate, ReaderGate::exclusive(paths_.group_dir));
      Catalog next = chain_.catalog;
      next.journal_gen = gen;
      next.pruned.clear();
      if (Status s = write_catalog(next); !s.is_ok()) return fail(s);
      chain_.catalog = std::move(next);
      chain_.rps = std::move(scan.committed);
      chain_.journal_dir = dir;
      jdir_ = dir;
      writer_ = std::move(writer);
    }
    FERRY_KILL_POINT("rewrite.after_switch");
    rep.rewritten_bytes = stats.stored_bytes;
    spdlog::info("group {}: journal rewritten (generation {}): {} kept RPs in {} bytes, {} "
                 "bytes of the RPs pruned between them dropped", group_, gen, stats.rps,
                 stats.stored_bytes, before > stats.stored_bytes ? before - stats.stored_bytes : 0);
    return Status::ok();
  }

  // The records of the RPs above the base, as the index knows them.
  std::uint64_t journal_bytes() const {
    std::uint64_t n = 0;
    for (const auto& r : chain_.rps) n += stored_bytes(r.info);
    return n;
  }

  Status remove_images_not_in(const Catalog& c) {
    FERRY_ASSIGN_OR_RETURN(auto disks, images_->disks());
    bool removed = false;
    for (const auto& disk : disks) {
      if (c.base_rp != 0 && find_disk(c.base_begin, disk) >= 0) continue;
      FERRY_TRY(images_->remove(disk));
      removed = true;
    }
    return removed ? images_->sync() : Status::ok();
  }

  // --- RP checks ---

  Status check_begin(const RpBeginInfo& rp) const {
    auto diverged = [&](const std::string& rule, const std::string& what) {
      return Status::error(Errc::diverged, "RP " + std::to_string(rp.rp_id) + " refused by rule " +
                                               rule + ": " + what);
    };
    std::uint64_t last = last_committed_rp();
    if (rp.disks.empty() || rp.disks.size() > jr::kMaxDisks)
      return Status::error(Errc::invalid_argument, "RP " + std::to_string(rp.rp_id) +
                                                       " must name 1..64 disks");
    for (std::size_t i = 0; i < rp.disks.size(); ++i) {
      FERRY_TRY(check_name("disk", rp.disks[i].name));
      for (std::size_t j = 0; j < i; ++j)
        if (rp.disks[j].name == rp.disks[i].name)
          return Status::error(Errc::invalid_argument, "disk " + rp.disks[i].name + " named twice");
    }
    if (rp.rp_id <= last)
      return diverged("C5.order", "its id is not above the last committed RP " +
                                      std::to_string(last));
    if (rp.base_rp != last)
      return diverged("C5.base", "its base RP " + std::to_string(rp.base_rp) +
                                     " is not the last committed RP " + std::to_string(last));
    for (const auto& d : rp.disks)
      if (!d.full && (chain_.newest_begin() == nullptr ||
                      find_disk(*chain_.newest_begin(), d.name) < 0))
        return diverged("C5.disk", "incremental disk " + d.name + " is not held at base RP " +
                                       std::to_string(last));
    if (chain_.newest_begin() == nullptr) return Status::ok();
    const RpBeginInfo& held = *chain_.newest_begin();
    if ((rp.flags & kRpFlagTakeOver) == 0 && second_source(held, rp))
      return diverged("C5.source", second_source_message(group_, held, rp));
    for (const auto& d : rp.disks) {
      const int h = find_disk(held, d.name);
      if (d.full || d.resync || h < 0) continue;
      const Hash128& was = held.disks[h].identity;
      if (!(was == Hash128{}) && !(d.identity == Hash128{}) && !(was == d.identity))
        return diverged("C5.identity", "incremental disk " + d.name + " has identity " +
                                           d.identity.hex() + ", the replica at base RP " +
                                           std::to_string(last) + " holds identity " +
                                           was.hex() + " (the disks were swapped or replaced: "
                                           "only a resync or full copy may follow)");
    }
    return Status::ok();
  }
  Status check_block(const BlockRecord& b) const {
    auto bad = [&](const std::string& what) {
      return Status::error(Errc::invalid_argument,
                           "block seq " + std::to_string(b.seq) + " of RP " +
                               std::to_string(b.rp_id) + ": " + what);
    };
    if (!open_ || open_->rp.begin.rp_id != b.rp_id) return bad("not the open RP");
    if (b.disk_index >= open_->rp.begin.disks.size()) return bad("disk index out of range");
    std::uint64_t size = open_->rp.begin.disks[b.disk_index].size_bytes;
    const std::uint32_t max_length =
        b.kind == RecordKind::zero ? jr::kMaxZeroRecordBytes : jr::kMaxBlockBytes;
    if (b.length_bytes == 0 || b.length_bytes > max_length) return bad("bad length");
    if (b.offset_bytes > size || b.length_bytes > size - b.offset_bytes)
      return bad("extends beyond the disk size " + std::to_string(size));
    if (b.kind == RecordKind::zero && (!b.payload.empty() || b.codec != RecordCodec::none))
      return bad("zero block with a payload");
    if (b.kind == RecordKind::data && b.codec == RecordCodec::none &&
        b.payload.size() != b.length_bytes)
      return bad("raw payload size differs from the block length");
    if (b.kind == RecordKind::data && b.codec == RecordCodec::zstd &&
        (b.payload.empty() || b.payload.size() > jr::kMaxPayloadBytes))
      return bad("zstd payload size out of bounds");
    return Status::ok();
  }
  // --- journal writes: any failure leaves the store failed until re-opened ---

  Result<jr::RecordLoc> append(const jr::RecordHeader& h, std::string_view payload) {
    FERRY_KILL_POINT("journal.before_append");
    auto loc = writer_->append(h, payload);
    if (!loc.is_ok()) return fail(loc.status());
    FERRY_KILL_POINT("journal.after_append");
    return loc;
  }
  Status make_records_durable() {
    Status s = writer_->flush();
    if (!s.is_ok()) return fail(s);
    FERRY_KILL_POINT("journal.before_fdatasync");
    s = writer_->sync();
    if (!s.is_ok()) return fail(s);
    FERRY_KILL_POINT("journal.after_fdatasync");
    return Status::ok();
  }
  RpInfo commit_info() const {
    const auto& b = open_->rp.begin;
    RpInfo info{b.rp_id, b.base_rp, b.created_unix_ns, now_unix_ns(), b.flags, {}};
    for (std::size_t i = 0; i < b.disks.size(); ++i) {
      RpDiskInfo d = open_->stats[i];
      d.name = b.disks[i].name;
      d.size_bytes = b.disks[i].size_bytes;
      d.full = b.disks[i].full;
      d.resync = b.disks[i].resync;
      d.identity = b.disks[i].identity;
      d.identity_ephemeral = b.disks[i].identity_ephemeral;
      info.disks.push_back(std::move(d));
    }
    return info;
  }
  Status write_commit_record(const RpInfo& info) {
    FERRY_KILL_POINT("journal.before_commit_record");
    jr::RecordHeader h;
    h.type = jr::RecordType::rp_commit;
    h.rp_id = info.rp_id;
    FERRY_ASSIGN_OR_RETURN(jr::RecordLoc loc, append(h, jr::encode_commit(info)));
    FERRY_ASSERT(loc.offset % jr::kBlockAlignBytes == 0);  // recovery's look-ahead relies on it
    Status s = writer_->flush();
    if (!s.is_ok()) return fail(s);
    FERRY_KILL_POINT("journal.after_commit_record");
    s = writer_->sync();
    if (!s.is_ok()) return fail(s);
    FERRY_KILL_POINT("journal.after_commit_sync");
    return Status::ok();
  }
  Status fail(Status s) {
    FERRY_ASSERT(!s.is_ok());
    open_.reset();
    if (failed_.is_ok() && writer_ && writer_->has_unsynced())
      distrust_unsynced(writer_->durable_end());  // R18
    failed_ = std::move(s).with_context("group " + group_ +
                                        " store failed (re-open to recover)");
    // The caller reports it (the receiver once per failure episode, not at every retry).
    spdlog::debug("{}", failed_.to_string());
    return failed_;
  }
  StoreOptions opt_;
  std::string group_;
  std::uint64_t group_id_;
  Paths paths_;
  std::shared_ptr<Storage> st_;
  std::unique_ptr<ImageStore> images_;  // the replica images: only through here
  UniqueFd lock_;
  jr::ScanResult scan_;
  std::unique_ptr<jr::Writer> writer_;
  Chain chain_;
  std::optional<OpenRp> open_;
  Status failed_;
  Status apply_error_;  // the last compaction failed (R19); ok: none pending
  // A compaction failed in this process: its retry writes zero records as zeros (see
  // apply_rp_to_images). A restart starts clean: the open redoes it from durable state.
  bool rewrite_zeros_ = false;
  ZeroDigests zeros_;
  std::string jdir_;  // the journal directory of chain_.catalog.journal_gen
  // After a failed rewrite: the pruned bytes at which the next one is tried (0: at once).
  std::uint64_t rewrite_retry_at_ = 0;
};

}  // namespace

Result<std::unique_ptr<GroupStore>> GroupStore::open(const StoreOptions& options,
                                                     const std::string& group, bool create) {
  FERRY_TRY(check_name("group", group));
  if (options.root.empty())
    return Status::error(Errc::invalid_argument, "store root directory is empty");
  if (options.segment_bytes % jr::kBlockAlignBytes != 0 ||
      options.segment_bytes < jr::kMinSegmentBytes ||
      options.segment_bytes >= (1ull << jr::kPositionOffsetBits))
    return Status::error(Errc::invalid_argument,
                         "segment_bytes " + std::to_string(options.segment_bytes) +
                             " must be a multiple of 4096 and at least " +
                             std::to_string(jr::kMinSegmentBytes));
  auto store = std::make_unique<StoreImpl>(options, group);
  FERRY_TRY(store->open(create));
  return std::unique_ptr<GroupStore>(std::move(store));
}

}  // namespace ferry::site
