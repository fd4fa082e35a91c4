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
#include "journal.h"

namespace ferry::site {
namespace {

namespace jr = journal;

constexpr std::uint32_t kStateMagic = 0x41545346;  // "FSTA"
constexpr std::uint16_t kStateVersion = 1;

struct State {
  std::uint64_t applied_rp = 0;
  std::uint64_t applying_rp = 0;  // != 0: an apply was under way; images are not trusted
};

Status check_name(const char* what, const std::string& s) {
  if (valid_store_name(s)) return Status::ok();
  return Status::error(Errc::invalid_argument, std::string(what) + " name '" + s +
                                                   "' is not valid (" + kStoreNameRule + ")");
}

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
  std::string image(const std::string& disk) const { return replica_dir + "/" + disk + ".img"; }
};

std::uint64_t group_id_of(const std::string& group) {
  return xxh3_64(group.data(), group.size());
}

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

std::string encode_state(std::uint64_t group_id, State st) {
  return encode_small_file(kStateFile, group_id, st.applied_rp, st.applying_rp);
}

std::optional<State> decode_state(std::string_view s, std::uint64_t group_id) {
  auto v = decode_small_file(s, kStateFile, group_id);
  if (!v) return std::nullopt;
  return State{v->first, v->second};
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

int find_disk(const RpBeginInfo& rp, const std::string& name) {
  for (std::size_t i = 0; i < rp.disks.size(); ++i)
    if (rp.disks[i].name == name) return static_cast<int>(i);
  return -1;
}

std::uint64_t now_unix_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// --- restore: the newest record per byte range, since the disk's last full RP -----------

struct Piece {
  std::uint64_t end = 0;
  jr::BlockEntry entry;  // a copy: the index holds chunks, not entries
  std::uint64_t rp_id = 0;
};
using PieceMap = std::map<std::uint64_t, Piece>;  // start -> piece; pieces never overlap

void insert_piece(PieceMap& m, std::uint64_t start, Piece p) {
  FERRY_ASSERT(p.end > start);
  auto it = m.lower_bound(start);
  if (it != m.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end > start) {
      Piece old = prev->second;
      prev->second.end = start;
      if (old.end > p.end) m[p.end] = old;  // the old piece continues after the new one
    }
  }
  it = m.lower_bound(start);
  while (it != m.end() && it->first < p.end) {
    if (it->second.end > p.end) {
      Piece rest = it->second;
      m.erase(it);
      m[p.end] = rest;
      break;
    }
    it = m.erase(it);
  }
  m[start] = p;
}

void clip_pieces(PieceMap& m, std::uint64_t size_bytes) {
  m.erase(m.lower_bound(size_bytes), m.end());
  if (!m.empty() && m.rbegin()->second.end > size_bytes) m.rbegin()->second.end = size_bytes;
}

// The disk's last full RP at or before rps[target].
Result<std::size_t> first_full(const std::vector<jr::CommittedRp>& rps, std::size_t target,
                               const std::string& disk) {
  std::size_t first = target + 1;
  for (std::size_t i = target + 1; i-- > 0;) {
    int d = find_disk(rps[i].begin, disk);
    if (d >= 0 && rps[i].begin.disks[d].full) {
      first = i;
      break;
    }
  }
  if (first > target)
    return Status::error(Errc::corrupt, "disk " + disk + " has no full RP at or before RP " +
                                            std::to_string(rps[target].info.rp_id));
  return first;
}

// The disk at rps[target] as pieces of records. Only [lo, hi) is kept (records clipped to
// it): a resync asks for one region at a time, an image is written window by window, and
// the map then holds that range's pieces. Only the index chunks that may touch the range
// are read back from the journal.
Result<PieceMap> build_pieces(jr::Reader& reader, const std::vector<jr::CommittedRp>& rps,
                              std::size_t target, const std::string& disk, std::uint64_t lo,
                              std::uint64_t hi) {
  FERRY_ASSERT(lo < hi);
  FERRY_ASSIGN_OR_RETURN(std::size_t first, first_full(rps, target, disk));
  PieceMap m;
  std::vector<jr::BlockEntry> entries;
  for (std::size_t i = first; i <= target; ++i) {
    int d = find_disk(rps[i].begin, disk);
    if (d < 0) continue;
    if (rps[i].begin.disks[d].full) m.clear();
    clip_pieces(m, rps[i].begin.disks[d].size_bytes);
    for (std::uint32_t id : rps[i].index.overlapping(static_cast<std::uint16_t>(d), lo, hi)) {
      FERRY_TRY(reader.load_chunk(rps[i].info.rp_id, rps[i].index.chunks()[id], entries));
      for (const auto& b : entries) {
        if (b.disk_index != d || b.length_bytes == 0) continue;
        std::uint64_t start = std::max(b.offset_bytes, lo);
        std::uint64_t end = std::min(b.offset_bytes + std::uint64_t(b.length_bytes), hi);
        if (start < end) insert_piece(m, start, Piece{end, b, rps[i].info.rp_id});
      }
    }
  }
  return m;
}

// Writes the non-zero granules of buf (at `offset` of the output), so the output stays sparse
// where the disk reads as zeros; runs of data granules go out as one write.
Status write_nonzero(StorageFile& out, const char* buf, std::size_t len, std::uint64_t offset) {
  constexpr std::size_t kGranuleBytes = 64u << 10;
  std::size_t run = 0, run_len = 0;
  for (std::size_t at = 0; at < len; at += kGranuleBytes) {
    const std::size_t n = std::min(kGranuleBytes, len - at);
    if (!is_all_zero(buf + at, n)) {
      if (run_len == 0) run = at;
      run_len += n;
      continue;
    }
    if (run_len != 0) FERRY_TRY(out.pwrite(buf + run, run_len, offset + run));
    run_len = 0;
  }
  if (run_len != 0) FERRY_TRY(out.pwrite(buf + run, run_len, offset + run));
  return Status::ok();
}

std::uint64_t position_of(const jr::BlockEntry& e) {
  return jr::record_position(e.loc.segment_seq, e.loc.offset);
}

// The ReadView over a list of committed RPs: owned (ReadView::open, a read-only scan) or the
// store's own list (restore and rebuild under the group lock, which outlives the view).
class JournalView final : public ReadView {
 public:
  JournalView(std::shared_ptr<Storage> st, const std::string& journal_dir, std::string group,
              std::string disk, const std::vector<jr::CommittedRp>* rps, std::size_t target,
              std::vector<jr::CommittedRp> owned = {})
      : owned_(std::move(owned)),
        rps_(rps != nullptr ? rps : &owned_),
        target_(target),
        group_(std::move(group)),
        disk_(std::move(disk)),
        reader_(std::move(st), journal_dir) {
    FERRY_ASSERT(target_ < rps_->size());
    const int d = find_disk((*rps_)[target_].begin, disk_);
    FERRY_ASSERT(d >= 0);
    size_ = (*rps_)[target_].begin.disks[d].size_bytes;
  }

  const std::string& group() const override { return group_; }
  const std::string& disk() const override { return disk_; }
  std::uint64_t rp_id() const override { return (*rps_)[target_].info.rp_id; }
  std::uint64_t size_bytes() const override { return size_; }

  Status pread(void* buf, std::size_t len, std::uint64_t offset) override {
    FERRY_TRY(check_range(offset, len));
    std::lock_guard<std::mutex> g(mu_);
    char* out = static_cast<char*>(buf);
    const std::uint64_t end = offset + len;
    std::uint64_t pos = offset;
    while (pos < end) {
      FERRY_TRY(load_window(pos / kWindowBytes));
      const std::uint64_t stop = std::min(end, window_hi_);
      auto it = pieces_.upper_bound(pos);
      if (it != pieces_.begin() && std::prev(it)->second.end > pos) --it;
      while (pos < stop) {
        if (it == pieces_.end() || it->first >= stop) {
          std::memset(out + (pos - offset), 0, static_cast<std::size_t>(stop - pos));
          pos = stop;
          break;
        }
        if (it->first > pos) {  // a range no record covers: zeros
          std::memset(out + (pos - offset), 0, static_cast<std::size_t>(it->first - pos));
          pos = it->first;
        }
        const Piece& p = it->second;
        const std::uint64_t n = std::min(p.end, stop) - pos;
        if (p.entry.kind == RecordKind::zero) {
          std::memset(out + (pos - offset), 0, static_cast<std::size_t>(n));
        } else {
          if (loaded_ != position_of(p.entry)) {
            loaded_ = UINT64_MAX;
            FERRY_TRY(reader_.load_block(p.rp_id, p.entry, block_));
            loaded_ = position_of(p.entry);
          }
          const std::uint64_t in = pos - p.entry.offset_bytes;
          FERRY_ASSERT(in + n <= block_.size());
          std::memcpy(out + (pos - offset), block_.data() + in, static_cast<std::size_t>(n));
        }
        pos += n;
        ++it;
      }
    }
    return Status::ok();
  }

  Result<std::vector<ReadExtent>> extents(std::uint64_t offset, std::uint64_t length) override {
    FERRY_TRY(check_range(offset, length));
    std::lock_guard<std::mutex> g(mu_);
    std::vector<ReadExtent> out;
    auto add = [&out](std::uint64_t at, std::uint64_t n, bool zero) {
      if (n == 0) return;
      if (!out.empty() && out.back().zero == zero &&
          out.back().offset_bytes + out.back().length_bytes == at) {
        out.back().length_bytes += n;
        return;
      }
      out.push_back(ReadExtent{at, n, zero});
    };
    const std::uint64_t end = offset + length;
    std::uint64_t pos = offset;
    while (pos < end) {
      FERRY_TRY(load_window(pos / kWindowBytes));
      const std::uint64_t stop = std::min(end, window_hi_);
      auto it = pieces_.upper_bound(pos);
      if (it != pieces_.begin() && std::prev(it)->second.end > pos) --it;
      for (; it != pieces_.end() && it->first < stop; ++it) {
        if (it->first > pos) add(pos, it->first - pos, true);
        pos = std::max(pos, it->first);
        const std::uint64_t e = std::min(it->second.end, stop);
        add(pos, e - pos, it->second.entry.kind == RecordKind::zero);
        pos = e;
      }
      add(pos, stop - pos, true);
      pos = stop;
    }
    return out;
  }

 private:
  Status check_range(std::uint64_t offset, std::uint64_t len) const {
    if (offset > size_ || len > size_ - offset)
      return Status::error(Errc::invalid_argument,
                           "read of " + std::to_string(len) + " bytes at " +
                               std::to_string(offset) + " is past the end of disk " + disk_ +
                               " (" + std::to_string(size_) + " bytes) at RP " +
                               std::to_string(rp_id()) + " of group " + group_);
    return Status::ok();
  }

  // The pieces of window w; the last one built is kept, so sequential reads build each once.
  Status load_window(std::uint64_t w) {
    const std::uint64_t lo = w * kWindowBytes;
    const std::uint64_t hi = std::min(size_, lo + kWindowBytes);
    FERRY_ASSERT(lo < hi);
    if (window_valid_ && window_lo_ == lo) return Status::ok();
    window_valid_ = false;
    FERRY_ASSIGN_OR_RETURN(pieces_, build_pieces(reader_, *rps_, target_, disk_, lo, hi));
    window_lo_ = lo;
    window_hi_ = hi;
    window_valid_ = true;
    return Status::ok();
  }

  std::vector<jr::CommittedRp> owned_;
  const std::vector<jr::CommittedRp>* rps_;
  std::size_t target_;
  std::string group_, disk_;
  std::uint64_t size_ = 0;
  std::mutex mu_;  // guards everything below: one reader, one cached window and record
  jr::Reader reader_;
  PieceMap pieces_;
  bool window_valid_ = false;
  std::uint64_t window_lo_ = 0, window_hi_ = 0;
  std::string block_;
  std::uint64_t loaded_ = UINT64_MAX;  // position of the record in block_
};

// The view of `disk` at `rp_id` (0: the newest) in `rps`, or the error naming what is missing.
Result<std::size_t> find_target(const std::vector<jr::CommittedRp>& rps, const std::string& group,
                                std::uint64_t rp_id, const std::string& disk) {
  FERRY_TRY(check_name("disk", disk));
  if (rps.empty())
    return Status::error(Errc::not_found, "group " + group + " has no committed RP");
  std::size_t i = rps.size() - 1;
  if (rp_id != 0) {
    for (i = 0; i < rps.size() && rps[i].info.rp_id != rp_id; ++i) {
    }
    if (i == rps.size())
      return Status::error(Errc::not_found, "RP " + std::to_string(rp_id) + " of group " + group +
                                                " is not committed (newest: RP " +
                                                std::to_string(rps.back().info.rp_id) + ")");
  }
  if (find_disk(rps[i].begin, disk) < 0) {
    std::string names;
    for (const auto& d : rps[i].begin.disks) names += (names.empty() ? "" : ", ") + d.name;
    return Status::error(Errc::not_found, "disk " + disk + " is not part of RP " +
                                              std::to_string(rps[i].info.rp_id) + " of group " +
                                              group + " (disks: " + names + ")");
  }
  FERRY_TRY(first_full(rps, i, disk).status());
  return i;
}

enum class ImageUse : std::uint8_t { restore = 0, rebuild = 1 };

// Restore and rebuild copy this many bytes of data at a time (bounded buffer).
constexpr std::size_t kCopySliceBytes = 4u << 20;

// Writes the disk image of `view` to out_path: sparse, zero ranges skipped. The file
// has its full size before its data is in: a rebuild must have marked the state "applying"
// first (R16), so that an image cut short here is never taken for an RP.
Status write_image(const std::shared_ptr<Storage>& st, ReadView& view,
                   const std::string& out_path, ImageUse use = ImageUse::restore) {
  const std::uint64_t size = view.size_bytes();
  FERRY_ASSIGN_OR_RETURN(auto out, st->open(out_path, OpenFlags{.create = true}));
  FERRY_TRY(out->truncate(0));
  FERRY_TRY(out->truncate(size));
  std::string buf(kCopySliceBytes, '\0');
  const std::uint64_t windows = (size + ReadView::kWindowBytes - 1) / ReadView::kWindowBytes;
  for (std::uint64_t w = 0; w < windows; ++w) {
    const std::uint64_t lo = w * ReadView::kWindowBytes;
    FERRY_ASSIGN_OR_RETURN(auto extents,
                           view.extents(lo, std::min(size, lo + ReadView::kWindowBytes) - lo));
    std::size_t done = 0;
    for (const auto& e : extents) {
      if (use == ImageUse::rebuild && w == windows / 2 && done++ == extents.size() / 2)
        FERRY_KILL_POINT("rebuild.mid_write");
      if (e.zero) continue;
      for (std::uint64_t at = e.offset_bytes; at < e.offset_bytes + e.length_bytes;) {
        const std::size_t n = static_cast<std::size_t>(
            std::min<std::uint64_t>(kCopySliceBytes, e.offset_bytes + e.length_bytes - at));
        FERRY_TRY(view.pread(buf.data(), n, at));
        FERRY_TRY(write_nonzero(*out, buf.data(), n, at));
        at += n;
      }
    }
  }
  if (use == ImageUse::rebuild) FERRY_KILL_POINT("rebuild.before_fsync");
  return out->datasync();
}

Status restore_from(const std::shared_ptr<Storage>& st, const std::string& journal_dir,
                    const std::string& group, const std::vector<jr::CommittedRp>& rps,
                    std::uint64_t rp_id, const std::string& disk, const std::string& out_path) {
  FERRY_ASSIGN_OR_RETURN(std::size_t i, find_target(rps, group, rp_id, disk));
  JournalView view(st, journal_dir, group, disk, &rps, i);
  return write_image(st, view, out_path);
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

// Hashes blocks of a disk as the journal holds it at an RP (the piece map restore uses):
// zero records and ranges no record covers hash as zeros without a read; data comes from
// the records, each loaded (and its checksums checked) once while consecutive blocks use it.
// Memory: one block and one record.
class JournalHasher {
 public:
  JournalHasher(const PieceMap& pieces, jr::Reader& reader, std::uint32_t block_bytes)
      : pieces_(pieces), reader_(reader), buf_(block_bytes, '\0') {}

  Result<Hash128> block(std::uint64_t offset, std::uint32_t length) {
    FERRY_ASSERT(length > 0 && length <= buf_.size());
    const std::uint64_t end = offset + length;
    auto it = pieces_.upper_bound(offset);
    if (it != pieces_.begin()) --it;  // a piece that starts before the block may reach into it
    bool any_data = false;
    for (; it != pieces_.end() && it->first < end; ++it) {
      const Piece& p = it->second;
      if (p.end <= offset || p.entry.kind == RecordKind::zero) continue;
      if (!any_data) std::fill(buf_.begin(), buf_.begin() + length, '\0');
      any_data = true;
      if (loaded_ != position_of(p.entry)) {
        FERRY_TRY(reader_.load_block(p.rp_id, p.entry, record_));
        loaded_ = position_of(p.entry);
      }
      std::uint64_t from = std::max(it->first, offset), to = std::min(p.end, end);
      FERRY_ASSERT(from - p.entry.offset_bytes + (to - from) <= record_.size());
      std::memcpy(buf_.data() + (from - offset), record_.data() + (from - p.entry.offset_bytes),
                  static_cast<std::size_t>(to - from));
    }
    if (!any_data) return zeros_.of(length);
    return xxh3_128(buf_.data(), length);
  }

 private:
  const PieceMap& pieces_;
  jr::Reader& reader_;
  std::string buf_;
  std::string record_;
  std::uint64_t loaded_ = UINT64_MAX;  // position of the record in record_
  ZeroDigests zeros_;
};

// Walks a sparse image in ascending order and hashes blocks; a block that lies wholly in a
// hole is hashed as zeros without a read. The data/hole map is asked of the file system once
// per data run (SEEK_DATA, then SEEK_HOLE), not once per block.
class ImageHasher {
 public:
  ImageHasher(int fd, std::uint64_t size_bytes, std::uint32_t block_bytes)
      : fd_(fd), size_(size_bytes), buf_(block_bytes, '\0') {}

  Result<Hash128> block(std::uint64_t offset, std::uint32_t length) {
    FERRY_ASSERT(length > 0 && length <= buf_.size() && offset + length <= size_);
    if (offset >= hole_) FERRY_TRY(locate(offset));
    if (offset + length <= data_) return zeros_.of(length);
    std::size_t done = 0;
    while (done < length) {
      ssize_t n = ::pread(fd_, buf_.data() + done, length - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::from_errno(errno, "read replica at " + std::to_string(offset + done));
      if (n == 0) {  // the image is shorter than the RP's size: the rest reads as zeros
        std::fill(buf_.begin() + static_cast<std::ptrdiff_t>(done), buf_.begin() + length, '\0');
        break;
      }
      done += static_cast<std::size_t>(n);
    }
    return xxh3_128(buf_.data(), length);
  }

 private:
  // Sets [data_, hole_) to the first data run that ends after `offset`.
  Status locate(std::uint64_t offset) {
    off_t d = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
    if (d < 0 && errno == ENXIO) {  // no data from here to the end of the file
      data_ = hole_ = UINT64_MAX;
      return Status::ok();
    }
    if (d < 0) return Status::from_errno(errno, "SEEK_DATA in replica");
    off_t h = ::lseek(fd_, d, SEEK_HOLE);
    if (h < 0) return Status::from_errno(errno, "SEEK_HOLE in replica");
    data_ = static_cast<std::uint64_t>(d);
    hole_ = static_cast<std::uint64_t>(h);
    FERRY_ASSERT(hole_ > offset);
    return Status::ok();
  }
  int fd_;
  std::uint64_t size_;
  std::string buf_;
  std::uint64_t data_ = 0, hole_ = 0;  // the current data run; nothing located yet
  ZeroDigests zeros_;
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
        paths_(options.root, group_), st_(options.storage ? options.storage : real_storage()) {}

  Status open(bool create) {
    if (!st_->exists(paths_.group_dir)) {
      if (!create)
        return Status::error(Errc::not_found, "group " + group_ + " not found in store " +
                                                  opt_.root);
      FERRY_TRY(st_->make_dirs(paths_.group_dir));
    }
    FERRY_TRY(st_->make_dirs(paths_.journal_dir));
    FERRY_TRY(st_->make_dirs(paths_.replica_dir));
    FERRY_TRY(lock());
    FERRY_TRY(recover());
    std::size_t buffer_bytes = std::max<std::size_t>(
        opt_.max_inflight_write_bytes / 2 / jr::kBlockAlignBytes * jr::kBlockAlignBytes,
        (jr::kMaxRecordBytes + 2 * jr::kMaxPaddingBytes + jr::kBlockAlignBytes) /
            jr::kBlockAlignBytes * jr::kBlockAlignBytes);
    jr::Writer::Options wo{paths_.journal_dir, group_id_, opt_.segment_bytes, buffer_bytes};
    FERRY_ASSIGN_OR_RETURN(writer_, jr::Writer::open(st_, wo, scan_));
    return Status::ok();
  }

  const std::string& group() const override { return group_; }
  std::uint64_t last_committed_rp() const override {
    return rps_.empty() ? 0 : rps_.back().info.rp_id;
  }
  std::uint64_t last_applied_rp() const override { return applied_; }
  std::vector<RpDiskInfo> replica_disks() const override {
    return rps_.empty() ? std::vector<RpDiskInfo>{} : rps_.back().info.disks;
  }
  std::string last_source_name() const override {
    return rps_.empty() ? std::string() : rps_.back().begin.source_name;
  }
  Result<std::vector<Hash128>> replica_digests(const std::string& disk, std::uint64_t offset_bytes,
                                               std::uint32_t block_bytes,
                                               std::uint32_t block_count) override {
    FERRY_TRY(failed_);
    if (rps_.empty()) return Status::error(Errc::not_found, "group " + group_ + " has no RP");
    int d = find_disk(rps_.back().begin, disk);
    if (d < 0)
      return Status::error(Errc::not_found, "disk " + disk + " is not held at RP " +
                                                std::to_string(last_committed_rp()));
    const std::uint64_t size = rps_.back().begin.disks[d].size_bytes;
    if (!transport::block_bytes_valid(block_bytes) ||
        offset_bytes % block_bytes != 0 || block_count == 0 || block_count > kMaxDigestBlocks ||
        offset_bytes >= size || (block_count - 1) > (size - offset_bytes - 1) / block_bytes)
      return Status::error(Errc::invalid_argument,
                           "digests of " + std::to_string(block_count) + " blocks of " +
                               std::to_string(block_bytes) + " bytes at " +
                               std::to_string(offset_bytes) + " of disk " + disk + " (" +
                               std::to_string(size) + " bytes): not inside the disk");
    // An apply that fails leaves the store usable (R19): the digests come from the journal
    // all the same, and the image, untrusted until an apply succeeds, is not compared.
    if (applied_ < last_committed_rp() && !apply_committed().is_ok()) FERRY_TRY(failed_);
    // R17: the digests describe the RP as the journal holds it, whatever the image says;
    // the image is compared on the way (while it is trusted), and a drift is reported and
    // the replica rebuilt at the next apply.
    const std::uint64_t end =
        std::min<std::uint64_t>(size, offset_bytes + std::uint64_t(block_count) * block_bytes);
    jr::Reader reader(st_, paths_.journal_dir);
    FERRY_ASSIGN_OR_RETURN(PieceMap pieces,
                           build_pieces(reader, rps_, rps_.size() - 1, disk, offset_bytes, end));
    JournalHasher journal(pieces, reader, block_bytes);
    UniqueFd fd;
    std::optional<ImageHasher> image;
    if (!replica_untrusted_ && applied_ == last_committed_rp()) {
      fd.reset(::open(paths_.image(disk).c_str(), O_RDONLY | O_CLOEXEC));
      if (fd.valid())
        image.emplace(fd.get(), size, block_bytes);
      else
        FERRY_TRY(replica_drifted(disk, offset_bytes,
                                  Status::from_errno(errno, "open it").to_string()));
    }
    std::vector<Hash128> out;
    out.reserve(block_count);
    for (std::uint32_t i = 0; i < block_count; ++i) {
      std::uint64_t at = offset_bytes + std::uint64_t(i) * block_bytes;
      auto len = static_cast<std::uint32_t>(std::min<std::uint64_t>(block_bytes, size - at));
      FERRY_ASSIGN_OR_RETURN(Hash128 h, journal.block(at, len));
      if (image) {
        auto img = image->block(at, len);
        if (!img.is_ok() || *img != h) {
          image.reset();
          FERRY_TRY(replica_drifted(disk, at, img.is_ok() ? "content" : img.status().to_string()));
        }
      }
      out.push_back(h);
    }
    return out;
  }

  std::vector<RpInfo> points() const override {
    std::vector<RpInfo> out;
    for (const auto& r : rps_) out.push_back(r.info);
    return out;
  }
  Status restore(std::uint64_t rp_id, const std::string& disk,
                 const std::string& out_path) const override {
    return restore_from(st_, paths_.journal_dir, group_, rps_, rp_id, disk, out_path);
  }

  Status begin_rp(const RpBeginInfo& rp) override {
    FERRY_TRY(failed_);
    FERRY_TRY(check_begin(rp));
    if (open_) abort_rp();
    FERRY_TRY(failed_);
    jr::RecordHeader h;
    h.type = jr::RecordType::rp_begin;
    h.rp_id = rp.rp_id;
    FERRY_TRY(append(h, jr::encode_begin(rp)).status());
    open_ = OpenRp{};
    open_->rp.begin = rp;
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
    rps_.push_back(std::move(open_->rp));
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

  // A failed apply touches only the replica and the state file, never the journal, so it
  // leaves the store usable with the apply pending (R19): the error is kept (apply_error),
  // the replica is untrusted, and the next call rebuilds it from the journal.
  Status apply_committed() override {
    FERRY_TRY(failed_);
    Status s = apply_or_rebuild();
    if (!s.is_ok()) {
      replica_untrusted_ = true;
      apply_error_ = std::move(s).with_context("group " + group_ + ": the replica is behind the "
                                               "journal (apply pending, retried)");
      // The caller reports it (the receiver once per episode, not at every retry).
      spdlog::debug("{}", apply_error_.to_string());
      return apply_error_;
    }
    apply_error_ = Status::ok();
    return Status::ok();
  }

  Status apply_error() const override { return apply_error_; }

 private:
  struct OpenRp {
    jr::CommittedRp rp;
    std::vector<RpDiskInfo> stats;
    std::uint64_t frames = 0;
    std::uint64_t logical_bytes = 0;
  };

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

  // --- recovery (docs/journal-format.md, R1..R19) ---

  Status recover() {
    FERRY_TRY(probe_io_uring());
    FERRY_TRY(cut_untrusted());  // R18, before the scan can trust anything
    FERRY_ASSIGN_OR_RETURN(scan_, jr::scan(*st_, paths_.journal_dir, group_id_,
                                           jr::ScanMode::recover));
    for (const auto& n : scan_.notes) spdlog::info("group {}: recovery: {}", group_, n);
    rps_ = std::move(scan_.committed);
    scan_.committed.clear();
    // R7 is checked before anything is cut, so a refusal leaves the evidence in place.
    FERRY_ASSIGN_OR_RETURN(auto state, read_state());
    if (state) {
      applied_ = state->applied_rp;
      FERRY_TRY(check_state_against_journal());
    }
    if (scan_.tail_dirty) {
      FERRY_KILL_POINT("journal.before_truncate");
      FERRY_TRY(jr::cut_tail(*st_, paths_.journal_dir, scan_));
      FERRY_KILL_POINT("journal.after_truncate");
    }
    if (st_->exists(paths_.state_tmp)) FERRY_TRY(st_->remove(paths_.state_tmp));  // R10
    if (st_->exists(paths_.distrust_tmp)) FERRY_TRY(st_->remove(paths_.distrust_tmp));
    // The journal is sound from here on. Bringing the replica to it may fail (EIO, ENOSPC,
    // EFBIG on the replica) without failing the open: the group keeps journalling and
    // committing RPs with the apply pending (R19), instead of refusing every hello.
    if (!state) {
      replica_untrusted_ = true;  // R6 / R12
    } else if (state->applying_rp != 0) {
      // R5b: an apply was cut short. Its writes may have been torn or misdirected anywhere
      // in the images, so redoing only its blocks is not enough: rewrite the images.
      replica_untrusted_ = true;
    } else if (applied_ != 0 && !applied_images_intact()) {
      // R13: the state says an RP is applied, but one of its images is gone or has the
      // wrong size (deleted or lost by the file system): rebuild the replica.
      spdlog::warn("group {}: a replica image of applied RP {} is missing or has the wrong "
                   "size; rewriting the replica from the journal (R13)", group_, applied_);
      replica_untrusted_ = true;
    }
    if (Status s = apply_committed(); !s.is_ok())  // R5, or the rebuild above
      spdlog::info("group {}: recovery: the journal is sound (last committed RP {}), but the "
                   "replica could not be brought to it: {}; RPs are still accepted, the apply "
                   "is retried (R19)", group_, last_committed_rp(), s.to_string());
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
    Status s = jr::cut_back_to(*st_, paths_.journal_dir, *limit);
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

  bool applied_images_intact() {
    for (const auto& r : rps_) {
      if (r.info.rp_id != applied_) continue;
      for (const auto& d : r.begin.disks) {
        const std::string path = paths_.image(d.name);
        if (!st_->exists(path)) return false;
        auto f = st_->open(path, OpenFlags{.read_only = true});
        if (!f.is_ok()) return false;
        auto size = (*f)->size();
        if (!size.is_ok() || *size != d.size_bytes) return false;
      }
      return true;
    }
    return false;
  }

  Result<std::optional<State>> read_state() {
    if (!st_->exists(paths_.state)) return std::optional<State>();
    FERRY_ASSIGN_OR_RETURN(std::string buf, read_small_file(*st_, paths_.state));
    auto v = decode_state(buf, group_id_);
    if (!v) spdlog::warn("group {}: state file {} is corrupt; rebuilding it (R6)", group_,
                         paths_.state);
    return v;
  }

  // R7: the state file may never be ahead of the journal.
  Status check_state_against_journal() {
    if (applied_ == 0) return Status::ok();
    for (const auto& r : rps_)
      if (r.info.rp_id == applied_) return Status::ok();
    return Status::error(Errc::corrupt,
                         "state file " + paths_.state + " says RP " + std::to_string(applied_) +
                             " is applied, but the journal has no commit for it (last committed " +
                             std::to_string(last_committed_rp()) + ") (R7)");
  }

  // R5b/R6/R12/R13: every image is rewritten from the journal at the last committed RP.
  // The state says "applying" durably before the first image is touched (R16): a rebuild
  // cut short by a crash, a power cut, EIO or ENOSPC leaves images of the right size and
  // the wrong bytes, and only that mark makes the next open rebuild them again.
  Status rebuild_replica() {
    if (rps_.empty()) {
      applied_ = 0;
      return write_state(State{0, 0});  // R12
    }
    const std::size_t last = rps_.size() - 1;
    FERRY_TRY(write_state(State{applied_, rps_[last].info.rp_id}));
    FERRY_KILL_POINT("rebuild.before_write");
    for (const auto& d : rps_[last].begin.disks) {
      JournalView view(st_, paths_.journal_dir, group_, d.name, &rps_, last);
      FERRY_TRY(write_image(st_, view, paths_.image(d.name), ImageUse::rebuild));
    }
    FERRY_TRY(st_->sync_dir(paths_.replica_dir));  // a re-created image's name must survive
    applied_ = last_committed_rp();
    return write_state(State{applied_, 0});
  }

  Status write_state(State st) {
    return write_small_file(paths_.state_tmp, paths_.state, encode_state(group_id_, st));
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
      if (!d.full && (rps_.empty() || find_disk(rps_.back().begin, d.name) < 0))
        return diverged("C5.disk", "incremental disk " + d.name + " is not held at base RP " +
                                       std::to_string(last));
    if (rps_.empty()) return Status::ok();
    const RpBeginInfo& held = rps_.back().begin;
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

  // Brings the replica to the last committed RP: a rebuild when it is not trusted (R5b, R6,
  // R13, R17, R19: never an incremental apply over an image of unknown content), else the
  // committed RPs not yet applied, in order (R5).
  Status apply_or_rebuild() {
    if (replica_untrusted_) {
      FERRY_TRY(rebuild_replica().with_context("rewrite the replica from the journal"));
      replica_untrusted_ = false;
      return Status::ok();
    }
    jr::Reader reader(st_, paths_.journal_dir);
    for (const auto& rp : rps_) {
      if (rp.info.rp_id <= applied_) continue;
      FERRY_TRY(apply_one(reader, rp).with_context("apply RP " + std::to_string(rp.info.rp_id)));
    }
    return Status::ok();
  }

  // R17: the image of the applied RP no longer matches the journal (changed behind our
  // back). Marked durably like an apply under way, so the next apply, or the next open
  // (R5b), rewrites the replica from the journal instead of patching the drifted image.
  Status replica_drifted(const std::string& disk, std::uint64_t offset,
                         const std::string& why) {
    spdlog::warn("group {}, disk {}: the replica image differs from RP {} at offset {} ({}); "
                 "it was changed behind the store's back: resync digests come from the "
                 "journal, and the replica is rewritten from the journal at the next apply (R17)",
                 group_, disk, applied_, offset, why);
    replica_untrusted_ = true;
    Status s = write_state(State{applied_, last_committed_rp()});
    if (!s.is_ok()) return fail(s.with_context("mark the drifted replica for a rebuild (R17)"));
    return Status::ok();
  }

  // --- apply ---

  Status apply_one(jr::Reader& reader, const jr::CommittedRp& rp) {
    FERRY_TRY(write_state(State{applied_, rp.info.rp_id}));
    std::vector<std::unique_ptr<StorageFile>> images;
    for (const auto& d : rp.begin.disks) {
      FERRY_ASSIGN_OR_RETURN(auto f, st_->open(paths_.image(d.name), OpenFlags{.create = true}));
      if (d.full) FERRY_TRY(f->truncate(0));  // a full RP resets the disk
      FERRY_TRY(f->truncate(d.size_bytes));
      images.push_back(std::move(f));
    }
    FERRY_KILL_POINT("apply.before_write");
    // Per disk of a full RP: where the data written by this apply ends. A full disk's image
    // was truncated to 0 above, so a zero range past it is a hole already; punching it would
    // cost a system call per record for nothing (an empty thin disk is all zero ranges).
    // Records come in seq order, not necessarily offset order: a zero range that starts
    // before that end may cover data of this RP and is punched.
    std::vector<std::uint64_t> data_end(rp.begin.disks.size(), 0);
    std::string block;
    std::vector<jr::BlockEntry> entries;
    std::uint64_t i = 0;
    for (const auto& chunk : rp.index.chunks()) {
      FERRY_TRY(reader.load_chunk(rp.info.rp_id, chunk, entries));
      for (const auto& b : entries) {
        FERRY_ASSERT(b.disk_index < images.size());
        FERRY_TRY(reader.load_block(rp.info.rp_id, b, block));
        StorageFile& img = *images[b.disk_index];
        const bool full = rp.begin.disks[b.disk_index].full;
        if (b.kind == RecordKind::zero) {
          if (!full || b.offset_bytes < data_end[b.disk_index])
            FERRY_TRY(img.punch_hole(b.offset_bytes, b.length_bytes));
        } else {
          FERRY_TRY(img.pwrite(block.data(), block.size(), b.offset_bytes));
          data_end[b.disk_index] =
              std::max(data_end[b.disk_index], b.offset_bytes + b.length_bytes);
        }
        if (i++ == rp.index.record_count() / 2) FERRY_KILL_POINT("apply.mid_write");
      }
    }
    FERRY_KILL_POINT("apply.before_fsync");
    for (auto& img : images) FERRY_TRY(img->datasync());
    FERRY_TRY(st_->sync_dir(paths_.replica_dir));  // a new image's name must survive too
    FERRY_KILL_POINT("apply.after_fsync");
    FERRY_TRY(write_state(State{rp.info.rp_id, 0}));
    applied_ = rp.info.rp_id;
    return Status::ok();
  }

  StoreOptions opt_;
  std::string group_;
  std::uint64_t group_id_;
  Paths paths_;
  std::shared_ptr<Storage> st_;
  UniqueFd lock_;
  jr::ScanResult scan_;
  std::unique_ptr<jr::Writer> writer_;
  std::vector<jr::CommittedRp> rps_;
  std::uint64_t applied_ = 0;
  std::optional<OpenRp> open_;
  Status failed_;
  // R5b/R6/R13/R17/R19: the images may differ from the state's applied RP (a drift, an apply
  // or rebuild cut short); the next apply rebuilds them and digests never read them.
  bool replica_untrusted_ = false;
  Status apply_error_;  // the last apply or rebuild failed (R19); ok: none pending
};

Result<jr::ScanResult> read_only_scan(const std::string& root, const std::string& group) {
  FERRY_TRY(check_name("group", group));
  Paths paths(root, group);
  auto st = real_storage();
  if (!st->exists(paths.journal_dir))
    return Status::error(Errc::not_found, "group " + group + " not found in store " + root);
  // R18: a receiver that failed a sync and has not re-opened the group yet left a marker;
  // what follows it may be in the page cache only.
  FERRY_ASSIGN_OR_RETURN(auto trusted_end, distrust_limit(*st, paths, group_id_of(group)));
  return jr::scan(*st, paths.journal_dir, group_id_of(group), jr::ScanMode::read_only,
                  trusted_end);
}

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

Result<std::vector<RpInfo>> list_points(const std::string& root, const std::string& group) {
  FERRY_ASSIGN_OR_RETURN(auto scan, read_only_scan(root, group));
  std::vector<RpInfo> out;
  for (const auto& r : scan.committed) out.push_back(r.info);
  return out;
}

namespace {

Status write_all(int fd, const char* buf, std::size_t len, std::uint64_t offset,
                 const std::string& path) {
  while (len > 0) {
    ssize_t n = ::pwrite(fd, buf, len, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      return Status::from_errno(n < 0 ? errno : EIO, "write at " + std::to_string(offset) +
                                                         " of " + path);
    buf += n;
    len -= static_cast<std::size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
  return Status::ok();
}

// A device keeps whatever it held before: a zero range is zeroed on it, by BLKZEROOUT where
// the device takes it (aligned ranges; the kernel discards or writes zeros, never leaves stale
// data), else by writing zeros.
Status zero_device_range(int fd, std::uint64_t offset, std::uint64_t len, const std::string& path,
                         const std::string& zeros) {
  if (offset % 512 == 0 && len % 512 == 0) {
    std::uint64_t range[2] = {offset, len};
    if (::ioctl(fd, BLKZEROOUT, range) == 0) return Status::ok();
  }
  while (len > 0) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(len, zeros.size()));
    FERRY_TRY(write_all(fd, zeros.data(), n, offset, path));
    offset += n;
    len -= n;
  }
  return Status::ok();
}

// Restore onto a block device: never truncated, checked to be large enough, every byte of the
// disk written (data) or zeroed, so nothing stale is left in the disk's range.
Status write_device(ReadView& view, const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC | O_EXCL));
  if (!fd.valid())
    return Status::from_errno(errno, "open block device " + path +
                                         " (O_EXCL: it must not be mounted or in use)");
  std::uint64_t dev_bytes = 0;
  if (::ioctl(fd.get(), BLKGETSIZE64, &dev_bytes) != 0)
    return Status::from_errno(errno, "BLKGETSIZE64 of " + path);
  const std::uint64_t size = view.size_bytes();
  if (dev_bytes < size)
    return Status::error(Errc::invalid_argument,
                         "block device " + path + " holds " + std::to_string(dev_bytes) +
                             " bytes, disk " + view.disk() + " at RP " +
                             std::to_string(view.rp_id()) + " of group " + view.group() +
                             " needs " + std::to_string(size) + ": use a device of at least " +
                             std::to_string(size) + " bytes");
  std::string buf(kCopySliceBytes, '\0');
  const std::string zeros(1u << 20, '\0');
  for (std::uint64_t lo = 0; lo < size; lo += ReadView::kWindowBytes) {
    FERRY_ASSIGN_OR_RETURN(auto extents,
                           view.extents(lo, std::min(size - lo, ReadView::kWindowBytes)));
    for (const auto& e : extents) {
      if (e.zero) {
        FERRY_TRY(zero_device_range(fd.get(), e.offset_bytes, e.length_bytes, path, zeros));
        continue;
      }
      for (std::uint64_t at = e.offset_bytes; at < e.offset_bytes + e.length_bytes;) {
        const std::size_t n = static_cast<std::size_t>(
            std::min<std::uint64_t>(kCopySliceBytes, e.offset_bytes + e.length_bytes - at));
        FERRY_TRY(view.pread(buf.data(), n, at));
        FERRY_TRY(write_all(fd.get(), buf.data(), n, at, path));
        at += n;
      }
    }
  }
  if (::fdatasync(fd.get()) != 0) return Status::from_errno(errno, "fdatasync of " + path);
  return Status::ok();
}

}  // namespace

Status restore_point(const std::string& root, const std::string& group, std::uint64_t rp_id,
                     const std::string& disk, const std::string& out_path) {
  FERRY_ASSIGN_OR_RETURN(auto view, ReadView::open(root, group, rp_id, disk));
  struct stat sb {};
  if (::stat(out_path.c_str(), &sb) == 0 && S_ISBLK(sb.st_mode))
    return write_device(*view, out_path);
  return write_image(real_storage(), *view, out_path);
}

Result<std::unique_ptr<ReadView>> ReadView::open(const std::string& store_root,
                                                 const std::string& group, std::uint64_t rp_id,
                                                 const std::string& disk) {
  FERRY_ASSIGN_OR_RETURN(auto scan, read_only_scan(store_root, group));
  FERRY_ASSIGN_OR_RETURN(std::size_t i, find_target(scan.committed, group, rp_id, disk));
  // RPs after the target are never read: drop them (and their index) from the view.
  scan.committed.resize(i + 1);
  return std::unique_ptr<ReadView>(
      std::make_unique<JournalView>(real_storage(), Paths(store_root, group).journal_dir, group,
                                    disk, nullptr, i, std::move(scan.committed)));
}

}  // namespace ferry::site
