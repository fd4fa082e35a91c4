// The read path: disk D of group G at RP N (ReadView), restore to a file or a block device,
// `ferry points`, and the compaction step that brings a replica image forward by one RP.
// chain.h says how a disk at an RP is composed; docs/journal-format.md gives the layout.
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>

#include "chain.h"
#include "ferry/site/image_store.h"
#include "ferry/base/bytes.h"
#include "ferry/base/fd.h"
#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "pins.h"

namespace ferry::site {

namespace jr = journal;

std::uint64_t group_id_of(const std::string& group) {
  return xxh3_64(group.data(), group.size());
}

Status check_name(const char* what, const std::string& s) {
  if (valid_store_name(s)) return Status::ok();
  return Status::error(Errc::invalid_argument, std::string(what) + " name '" + s +
                                                   "' is not valid (" + kStoreNameRule + ")");
}

const RpBeginInfo* Chain::newest_begin() const {
  if (!rps.empty()) return &rps.back().begin;
  return catalog.base_rp != 0 ? &catalog.base_begin : nullptr;
}

bool Chain::offered(std::uint64_t rp_id) const {
  if (rp_id == 0) return false;
  // RPs below a compaction under way are gone for readers, the base RP among them.
  if (catalog.target_rp != 0 && rp_id < catalog.target_rp) return false;
  if (rp_id == catalog.base_rp) return true;
  if (rp_id < catalog.base_rp || catalog.is_pruned(rp_id)) return false;
  if (catalog.target_rp != 0 && rp_id < catalog.target_rp) return false;
  for (const auto& r : rps)
    if (r.info.rp_id == rp_id) return true;
  return false;
}

std::vector<RpInfo> Chain::points() const {
  std::vector<RpInfo> out;
  if (catalog.base_rp != 0 && offered(catalog.base_rp)) out.push_back(catalog.base_info);
  for (const auto& r : rps)
    if (offered(r.info.rp_id)) out.push_back(r.info);
  return out;
}

const RpBeginInfo* Chain::begin_of(std::uint64_t rp_id) const {
  if (rp_id != 0 && rp_id == catalog.base_rp) return &catalog.base_begin;
  for (const auto& r : rps)
    if (r.info.rp_id == rp_id) return &r.begin;
  return nullptr;
}

namespace {

// --- the disk at an RP as pieces of records over the base image ---------------------------

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

// The entries of index chunks, kept across windows: a chunk of records at random offsets
// spans most of the disk, so every window would read its headers again. Bounded by entries;
// the oldest chunk loaded goes first.
class ChunkCache {
 public:
  static constexpr std::size_t kMaxEntries = 1u << 19;  // 20 MiB of 40-byte entries

  Result<const std::vector<jr::BlockEntry>*> get(jr::Reader& reader, std::uint64_t rp_id,
                                                 const jr::Chunk& c) {
    auto it = map_.find(c.position);
    if (it != map_.end()) return &it->second;
    std::vector<jr::BlockEntry> entries;
    FERRY_TRY(reader.load_chunk(rp_id, c, entries));
    while (entries_ + entries.size() > kMaxEntries && !order_.empty()) {
      auto old = map_.find(order_.front());
      entries_ -= old->second.size();
      map_.erase(old);
      order_.pop_front();
    }
    entries_ += entries.size();
    order_.push_back(c.position);
    return &(map_[c.position] = std::move(entries));
  }

 private:
  std::map<std::uint64_t, std::vector<jr::BlockEntry>> map_;  // by chunk position
  std::deque<std::uint64_t> order_;
  std::size_t entries_ = 0;
};

struct Layers {
  PieceMap pieces;
  // Bytes below this read from the base image where no piece covers them; above, zeros.
  std::uint64_t base_limit = 0;
};

// The disk at chain.rps[target] (target == -1: the base RP itself) over [lo, hi): pieces of
// the records since its last full RP in (base, N], clipped to its size at each RP; the
// base image below the smallest size the disk had since the base, if no full RP intervened.
// Only the index chunks that may touch the range are read back from the journal.
Result<Layers> build_layers(jr::Reader& reader, ChunkCache& cache, const Chain& chain,
                            std::ptrdiff_t target, const std::string& disk, std::uint64_t lo,
                            std::uint64_t hi) {
  FERRY_ASSERT(lo < hi);
  Layers out;
  const auto& rps = chain.rps;
  std::size_t first = 0;
  bool from_base = true;
  if (target >= 0) {
    for (std::size_t i = static_cast<std::size_t>(target) + 1; i-- > 0;) {
      int d = find_disk(rps[i].begin, disk);
      if (d >= 0 && rps[i].begin.disks[d].full) {
        first = i;
        from_base = false;
        break;
      }
    }
  }
  if (from_base) {
    const int b = chain.catalog.base_rp != 0 ? find_disk(chain.catalog.base_begin, disk) : -1;
    if (b < 0)
      return Status::error(Errc::corrupt,
                           "disk " + disk + " of group " + chain.group + " has no full RP at or "
                           "before RP " + std::to_string(target >= 0 ? rps[target].info.rp_id
                                                                     : chain.catalog.base_rp) +
                           " and is not in the base RP " + std::to_string(chain.catalog.base_rp));
    out.base_limit = chain.catalog.base_begin.disks[b].size_bytes;
  }
  for (std::ptrdiff_t i = static_cast<std::ptrdiff_t>(first); i <= target; ++i) {
    const auto& rp = rps[static_cast<std::size_t>(i)];
    int d = find_disk(rp.begin, disk);
    if (d < 0) continue;
    if (rp.begin.disks[d].full) out.pieces.clear();
    out.base_limit = std::min(out.base_limit, rp.begin.disks[d].size_bytes);
    clip_pieces(out.pieces, rp.begin.disks[d].size_bytes);
    for (std::uint32_t id : rp.index.overlapping(static_cast<std::uint16_t>(d), lo, hi)) {
      FERRY_ASSIGN_OR_RETURN(const std::vector<jr::BlockEntry>* entries,
                             cache.get(reader, rp.info.rp_id, rp.index.chunks()[id]));
      for (const auto& b : *entries) {
        if (b.disk_index != d || b.length_bytes == 0) continue;
        std::uint64_t start = std::max(b.offset_bytes, lo);
        std::uint64_t end = std::min(b.offset_bytes + std::uint64_t(b.length_bytes), hi);
        if (start < end) insert_piece(out.pieces, start, Piece{end, b, rp.info.rp_id});
      }
    }
  }
  return out;
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

// Reads of the base image: positional, a short image reads as zeros past its end.
Status read_base(StorageFile& f, char* out, std::uint64_t len, std::uint64_t offset) {
  std::uint64_t done = 0;
  while (done < len) {
    FERRY_ASSIGN_OR_RETURN(std::size_t n, f.pread(out + done, static_cast<std::size_t>(len - done),
                                                  offset + done));
    if (n == 0) {
      std::memset(out + done, 0, static_cast<std::size_t>(len - done));
      break;
    }
    done += n;
  }
  return Status::ok();
}

// The data and hole runs of the base image in [lo, hi), as its backend reports them.
template <typename Add>
Status base_extents(StorageFile& f, std::uint64_t lo, std::uint64_t hi, Add add) {
  std::uint64_t pos = lo;
  while (pos < hi) {
    FERRY_ASSIGN_OR_RETURN(StorageFile::DataRun run, f.next_data(pos));
    if (run.start >= run.end) break;  // no data from here on
    const std::uint64_t data = std::min(run.start, hi);
    if (data > pos) add(pos, data - pos, true);
    if (data >= hi) return Status::ok();
    const std::uint64_t hole = std::min(run.end, hi);
    add(data, hole - data, false);
    pos = hole;
  }
  if (pos < hi) add(pos, hi - pos, true);
  return Status::ok();
}

// The ReadView over a chain: its own (ReadView::open: a read-only load, pinned) or the
// store's (restore under the group lock, which outlives the view).
class JournalView final : public ReadView {
 public:
  JournalView(std::shared_ptr<Storage> st, const Paths& paths, const Chain* chain,
              std::shared_ptr<const Chain> owned, std::ptrdiff_t target, std::string disk)
      : st_(st),
        paths_(paths),
        owned_(std::move(owned)),
        chain_(chain != nullptr ? chain : owned_.get()),
        target_(target),
        disk_(std::move(disk)),
        images_(file_images(st, paths.replica_dir)),
        reader_(std::move(st), chain_->journal_dir) {
    const RpBeginInfo* b = target_ >= 0 ? &chain_->rps[target_].begin : &chain_->catalog.base_begin;
    rp_id_ = b->rp_id;
    const int d = find_disk(*b, disk_);
    FERRY_ASSERT(d >= 0);
    size_ = b->disks[d].size_bytes;
  }

  // Opens the base image if the disk reads from it (kept open: compaction writes the image in
  // place, never ranges this view reads from it).
  Status open_base() {
    if (chain_->catalog.base_rp == 0 || find_disk(chain_->catalog.base_begin, disk_) < 0)
      return Status::ok();
    auto f = images_->open(disk_, /*create=*/false);
    if (!f.is_ok())
      return std::move(f).status().with_context("the image of base RP " +
                                                std::to_string(chain_->catalog.base_rp) +
                                                " of group " + chain_->group);
    base_ = std::move(f).value();
    return Status::ok();
  }

  void keep_pin(Pin pin) { pin_ = std::make_shared<Pin>(std::move(pin)); }

  Result<std::unique_ptr<ReadView>> clone() const override {
    auto v = std::make_unique<JournalView>(st_, paths_, owned_ ? nullptr : chain_, owned_,
                                           target_, disk_);
    FERRY_TRY(v->open_base());
    v->pin_ = pin_;
    return std::unique_ptr<ReadView>(std::move(v));
  }

  const std::string& group() const override { return chain_->group; }
  const std::string& disk() const override { return disk_; }
  std::uint64_t rp_id() const override { return rp_id_; }
  std::uint64_t size_bytes() const override { return size_; }

  Status pread(void* buf, std::size_t len, std::uint64_t offset) override {
    FERRY_TRY(check_range(offset, len));
    std::lock_guard<std::mutex> g(mu_);
    char* out = static_cast<char*>(buf);
    const std::uint64_t end = offset + len;
    std::uint64_t pos = offset;
    // A range no record covers: the base image below the limit, zeros above.
    auto gap = [&](std::uint64_t to) -> Status {
      const std::uint64_t base_end = std::min(to, layers_.base_limit);
      if (pos < base_end) {
        FERRY_ASSERT(base_ != nullptr);
        FERRY_TRY(read_base(*base_, out + (pos - offset), base_end - pos, pos));
        pos = base_end;
      }
      if (pos < to) std::memset(out + (pos - offset), 0, static_cast<std::size_t>(to - pos));
      pos = to;
      return Status::ok();
    };
    while (pos < end) {
      FERRY_TRY(load_window(pos / kWindowBytes));
      const std::uint64_t stop = std::min(end, window_hi_);
      const PieceMap& pieces = layers_.pieces;
      auto it = pieces.upper_bound(pos);
      if (it != pieces.begin() && std::prev(it)->second.end > pos) --it;
      while (pos < stop) {
        if (it == pieces.end() || it->first >= stop) {
          FERRY_TRY(gap(stop));
          break;
        }
        if (it->first > pos) FERRY_TRY(gap(it->first));
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
    auto gap = [&](std::uint64_t from, std::uint64_t to) -> Status {
      const std::uint64_t base_end = std::min(to, layers_.base_limit);
      if (from < base_end) {
        FERRY_TRY(base_extents(*base_, from, base_end, add));
        from = base_end;
      }
      if (from < to) add(from, to - from, true);
      return Status::ok();
    };
    const std::uint64_t end = offset + length;
    std::uint64_t pos = offset;
    while (pos < end) {
      FERRY_TRY(load_window(pos / kWindowBytes));
      const std::uint64_t stop = std::min(end, window_hi_);
      const PieceMap& pieces = layers_.pieces;
      auto it = pieces.upper_bound(pos);
      if (it != pieces.begin() && std::prev(it)->second.end > pos) --it;
      for (; it != pieces.end() && it->first < stop; ++it) {
        if (it->first > pos) FERRY_TRY(gap(pos, it->first));
        pos = std::max(pos, it->first);
        const std::uint64_t e = std::min(it->second.end, stop);
        add(pos, e - pos, it->second.entry.kind == RecordKind::zero);
        pos = e;
      }
      FERRY_TRY(gap(pos, stop));
      pos = stop;
    }
    return out;
  }

  Result<std::vector<ReadExtent>> changed_since_base(std::uint64_t offset,
                                                     std::uint64_t length) override {
    FERRY_TRY(check_range(offset, length));
    std::lock_guard<std::mutex> g(mu_);
    std::vector<ReadExtent> out;
    auto add = [&out](std::uint64_t at, std::uint64_t n) {
      if (n == 0) return;
      FERRY_ASSERT(out.empty() || out.back().offset_bytes + out.back().length_bytes <= at);
      if (!out.empty() && out.back().offset_bytes + out.back().length_bytes == at) {
        out.back().length_bytes += n;
        return;
      }
      out.push_back(ReadExtent{at, n, false});
    };
    const std::uint64_t end = offset + length;
    std::uint64_t pos = offset;
    while (pos < end) {
      FERRY_TRY(load_window(pos / kWindowBytes));
      const std::uint64_t stop = std::min(end, window_hi_);
      // Past the base image's limit every byte is a record's or zeros the base did not hold.
      auto gap = [&](std::uint64_t from, std::uint64_t to) {
        const std::uint64_t from_limit = std::max(from, layers_.base_limit);
        if (from_limit < to) add(from_limit, to - from_limit);
      };
      const PieceMap& pieces = layers_.pieces;
      auto it = pieces.upper_bound(pos);
      if (it != pieces.begin() && std::prev(it)->second.end > pos) --it;
      for (; it != pieces.end() && it->first < stop; ++it) {
        if (it->first > pos) gap(pos, it->first);
        pos = std::max(pos, it->first);
        const std::uint64_t e = std::min(it->second.end, stop);
        add(pos, e - pos);
        pos = e;
      }
      gap(pos, stop);
      pos = stop;
    }
    return out;
  }
  std::uint64_t base_rp() const override { return chain_->catalog.base_rp; }

 private:
  Status check_range(std::uint64_t offset, std::uint64_t len) const {
    if (offset > size_ || len > size_ - offset)
      return Status::error(Errc::invalid_argument,
                           "read of " + std::to_string(len) + " bytes at " +
                               std::to_string(offset) + " is past the end of disk " + disk_ +
                               " (" + std::to_string(size_) + " bytes) at RP " +
                               std::to_string(rp_id_) + " of group " + chain_->group);
    return Status::ok();
  }

  // The layers of window w; the last one built is kept, so sequential reads build each once.
  Status load_window(std::uint64_t w) {
    const std::uint64_t lo = w * kWindowBytes;
    const std::uint64_t hi = std::min(size_, lo + kWindowBytes);
    FERRY_ASSERT(lo < hi);
    if (window_valid_ && window_lo_ == lo) return Status::ok();
    window_valid_ = false;
    FERRY_ASSIGN_OR_RETURN(layers_,
                           build_layers(reader_, chunks_, *chain_, target_, disk_, lo, hi));
    if (layers_.base_limit > lo && base_ == nullptr)
      return Status::error(Errc::corrupt, "disk " + disk_ + " at RP " + std::to_string(rp_id_) +
                                              " reads from the replica image, which is not open");
    window_lo_ = lo;
    window_hi_ = hi;
    window_valid_ = true;
    return Status::ok();
  }

  std::shared_ptr<Storage> st_;
  Paths paths_;
  std::shared_ptr<const Chain> owned_;
  const Chain* chain_;
  std::ptrdiff_t target_;  // index in chain_->rps; -1: the base RP
  std::string disk_;
  std::unique_ptr<ImageStore> images_;
  std::uint64_t rp_id_ = 0;
  std::uint64_t size_ = 0;
  std::unique_ptr<StorageFile> base_;  // the base RP's image, when the disk reads from it
  std::shared_ptr<Pin> pin_;  // shared with clones: the RP stays pinned while any is open
  std::mutex mu_;  // guards everything below: one reader, one cached window and record
  jr::Reader reader_;
  ChunkCache chunks_;
  Layers layers_;
  bool window_valid_ = false;
  std::uint64_t window_lo_ = 0, window_hi_ = 0;
  std::string block_;
  std::uint64_t loaded_ = UINT64_MAX;  // position of the record in block_
};

std::string kept_range(const Chain& chain) {
  auto pts = chain.points();
  if (pts.empty()) return "none";
  return std::to_string(pts.size()) + " kept, RP " + std::to_string(pts.front().rp_id) +
         " to RP " + std::to_string(pts.back().rp_id);
}

// Where RP `rp_id` (0: the newest) of disk `disk` is in the chain, or the error naming what
// is missing: -1 the base RP, else an index in chain.rps.
Result<std::ptrdiff_t> find_target(const Chain& chain, std::uint64_t rp_id,
                                   const std::string& disk) {
  FERRY_TRY(check_name("disk", disk));
  const std::string& group = chain.group;
  if (chain.newest() == 0)
    return Status::error(Errc::not_found, "group " + group + " has no committed RP");
  if (rp_id == 0) rp_id = chain.newest();
  if (!chain.offered(rp_id)) {
    if (rp_id > chain.newest())
      return Status::error(Errc::not_found, "RP " + std::to_string(rp_id) + " of group " + group +
                                                " is not committed (newest: RP " +
                                                std::to_string(chain.newest()) + ")");
    return Status::error(Errc::not_found,
                         "RP " + std::to_string(rp_id) + " of group " + group +
                             " was pruned by retention and cannot be read (" + kept_range(chain) +
                             "; `ferry points` lists them)");
  }
  std::ptrdiff_t i = -1;
  if (rp_id != chain.catalog.base_rp)
    for (i = 0; chain.rps[static_cast<std::size_t>(i)].info.rp_id != rp_id; ++i) {
    }
  const RpBeginInfo* b = chain.begin_of(rp_id);
  FERRY_ASSERT(b != nullptr);
  if (find_disk(*b, disk) < 0) {
    std::string names;
    for (const auto& d : b->disks) names += (names.empty() ? "" : ", ") + d.name;
    return Status::error(Errc::not_found, "disk " + disk + " is not part of RP " +
                                              std::to_string(rp_id) + " of group " + group +
                                              " (disks: " + names + ")");
  }
  return i;
}

// Zeros written as data: after a failed fdatasync of an image, punching a range that already
// reads as a hole may change nothing the next writeback carries (the lost punch stays lost),
// while written pages are dirtied again and go out whole.
Status write_zeros(StorageFile& f, std::uint64_t offset, std::uint64_t len) {
  static const std::string kZeros(1u << 20, '\0');
  while (len > 0) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(len, kZeros.size()));
    FERRY_TRY(f.pwrite(kZeros.data(), n, offset));
    offset += n;
    len -= n;
  }
  return Status::ok();
}

// Restore copies this many bytes of data at a time (bounded buffer).
constexpr std::size_t kCopySliceBytes = 4u << 20;

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
// Progress of a copy: every kProgressBytes of the disk and at its end.
constexpr std::uint64_t kProgressBytes = 64ull << 20;
void report(const CopyProgress& progress, std::uint64_t done, std::uint64_t size, std::uint64_t* next) {
  if (!progress || (done < *next && done < size)) return;
  progress(done, size);
  *next = done + kProgressBytes;
}

Status write_device(ReadView& view, const std::string& path, const CopyProgress& progress) {
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
  std::uint64_t next_report = 0;
  for (std::uint64_t lo = 0; lo < size; lo += ReadView::kWindowBytes) {
    FERRY_ASSIGN_OR_RETURN(auto extents,
                           view.extents(lo, std::min(size - lo, ReadView::kWindowBytes)));
    for (const auto& e : extents) {
      if (e.zero) {
        FERRY_TRY(zero_device_range(fd.get(), e.offset_bytes, e.length_bytes, path, zeros));
        report(progress, e.offset_bytes + e.length_bytes, size, &next_report);
        continue;
      }
      for (std::uint64_t at = e.offset_bytes; at < e.offset_bytes + e.length_bytes;) {
        const std::size_t n = static_cast<std::size_t>(
            std::min<std::uint64_t>(kCopySliceBytes, e.offset_bytes + e.length_bytes - at));
        FERRY_TRY(view.pread(buf.data(), n, at));
        FERRY_TRY(write_all(fd.get(), buf.data(), n, at, path));
        at += n;
        report(progress, at, size, &next_report);
      }
    }
  }
  if (::fdatasync(fd.get()) != 0) return Status::from_errno(errno, "fdatasync of " + path);
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<ReadView>> view_of(std::shared_ptr<Storage> st, const Paths& paths,
                                          const Chain& chain, std::uint64_t rp_id,
                                          const std::string& disk) {
  FERRY_ASSIGN_OR_RETURN(std::ptrdiff_t i, find_target(chain, rp_id, disk));
  auto v = std::make_unique<JournalView>(std::move(st), paths, &chain, nullptr, i, disk);
  FERRY_TRY(v->open_base());
  return std::unique_ptr<ReadView>(std::move(v));
}

Result<std::unique_ptr<ReadView>> view_owning(std::shared_ptr<Storage> st, const Paths& paths,
                                              std::shared_ptr<const Chain> chain,
                                              std::uint64_t rp_id, const std::string& disk) {
  FERRY_ASSIGN_OR_RETURN(std::ptrdiff_t i, find_target(*chain, rp_id, disk));
  auto v = std::make_unique<JournalView>(std::move(st), paths, nullptr, std::move(chain), i, disk);
  FERRY_TRY(v->open_base());
  return std::unique_ptr<ReadView>(std::move(v));
}

// Writes the disk image of `view` to out_path: sparse, zero ranges skipped.
Status write_image(const std::shared_ptr<Storage>& st, ReadView& view,
                   const std::string& out_path, const CopyProgress& progress) {
  const std::uint64_t size = view.size_bytes();
  FERRY_ASSIGN_OR_RETURN(auto out, st->open(out_path, OpenFlags{.create = true}));
  FERRY_TRY(out->truncate(0));
  FERRY_TRY(out->truncate(size));
  std::string buf(kCopySliceBytes, '\0');
  std::uint64_t next_report = 0;
  for (std::uint64_t lo = 0; lo < size; lo += ReadView::kWindowBytes) {
    FERRY_ASSIGN_OR_RETURN(auto extents,
                           view.extents(lo, std::min(size - lo, ReadView::kWindowBytes)));
    for (const auto& e : extents) {
      if (e.zero) {
        report(progress, e.offset_bytes + e.length_bytes, size, &next_report);
        continue;
      }
      for (std::uint64_t at = e.offset_bytes; at < e.offset_bytes + e.length_bytes;) {
        const std::size_t n = static_cast<std::size_t>(
            std::min<std::uint64_t>(kCopySliceBytes, e.offset_bytes + e.length_bytes - at));
        FERRY_TRY(view.pread(buf.data(), n, at));
        FERRY_TRY(write_nonzero(*out, buf.data(), n, at));
        at += n;
        report(progress, at, size, &next_report);
      }
    }
  }
  return out->datasync();
}

Result<Chain> load_chain(Storage& st, const std::string& root, const std::string& group) {
  FERRY_TRY(check_name("group", group));
  Paths paths(root, group);
  if (!st.exists(paths.state) && !st.exists(paths.journal_dir))
    return Status::error(Errc::not_found, "group " + group + " not found in store " + root);
  Chain chain;
  chain.group = group;
  if (st.exists(paths.state)) {
    FERRY_ASSIGN_OR_RETURN(auto f, st.open(paths.state, OpenFlags{.read_only = true}));
    std::string buf(kMaxCatalogBytes + 1, '\0');
    FERRY_ASSIGN_OR_RETURN(std::size_t got, f->pread(buf.data(), buf.size(), 0));
    buf.resize(got);
    auto c = decode_catalog(buf, group_id_of(group));
    if (c.is_ok()) {
      chain.catalog = std::move(*c);
    } else if (c.status().code() != Errc::unsupported ||
               c.status().message().find("version 1") == std::string::npos) {
      return std::move(c).status().with_context("group " + group + ": " + paths.state);
    }
    // A version 1 state (a store of the release before retention, not opened since): the
    // journal still holds every RP from the first, so it reads as a chain from RP 0.
  }
  chain.journal_dir = paths.journal_dir_for(chain.catalog.journal_gen);
  // R18: a receiver that failed a sync and has not re-opened the group yet left a marker;
  // what follows it may be in the page cache only.
  FERRY_ASSIGN_OR_RETURN(auto trusted_end, distrust_limit(st, paths, group_id_of(group)));
  FERRY_ASSIGN_OR_RETURN(auto scan, jr::scan(st, chain.journal_dir, group_id_of(group),
                                             jr::ScanMode::read_only, trusted_end));
  const std::uint64_t base = chain.catalog.base_rp;
  for (auto& r : scan.committed)
    if (r.info.rp_id > base) chain.rps.push_back(std::move(r));
  if (!chain.rps.empty() && chain.rps.front().begin.base_rp != base)
    return Status::error(Errc::corrupt,
                         "group " + group + ": the journal's oldest RP " +
                             std::to_string(chain.rps.front().info.rp_id) + " follows RP " +
                             std::to_string(chain.rps.front().begin.base_rp) +
                             ", but the replica holds RP " + std::to_string(base) +
                             " (segments missing?)");
  return chain;
}

Result<Chain> load_chain_gated(Storage& st, const std::string& root, const std::string& group,
                               ReaderGate& gate) {
  FERRY_TRY(check_name("group", group));
  Paths paths(root, group);
  if (!st.exists(paths.state) && !st.exists(paths.journal_dir))
    return Status::error(Errc::not_found, "group " + group + " not found in store " + root);
  FERRY_ASSIGN_OR_RETURN(gate, ReaderGate::shared(paths.group_dir));
  return load_chain(st, root, group);
}

Result<std::vector<RpInfo>> list_points(const std::string& root, const std::string& group) {
  ReaderGate gate;
  FERRY_ASSIGN_OR_RETURN(Chain chain, load_chain_gated(*real_storage(), root, group, gate));
  return chain.points();
}

Status restore_point(const std::string& root, const std::string& group, std::uint64_t rp_id,
                     const std::string& disk, const std::string& out_path,
                     const std::function<void(std::uint64_t, std::uint64_t)>& progress) {
  FERRY_ASSIGN_OR_RETURN(auto view, ReadView::open(root, group, rp_id, disk));
  struct stat sb {};
  if (::stat(out_path.c_str(), &sb) == 0 && S_ISBLK(sb.st_mode))
    return write_device(*view, out_path, progress);
  return write_image(real_storage(), *view, out_path, progress);
}

Result<std::unique_ptr<ReadView>> ReadView::open(const std::string& store_root,
                                                 const std::string& group, std::uint64_t rp_id,
                                                 const std::string& disk) {
  Paths paths(store_root, group);
  auto st = real_storage();
  // Under the gate: the pin is in place before the gate is released, so a pruner either saw
  // the pin or wrote its decision before this load (and then the RP is refused here).
  ReaderGate gate;
  FERRY_ASSIGN_OR_RETURN(Chain loaded, load_chain_gated(*st, store_root, group, gate));
  auto chain = std::make_shared<Chain>(std::move(loaded));
  if (rp_id == 0) rp_id = chain->newest();
  FERRY_ASSIGN_OR_RETURN(Pin pin, Pin::create(paths.group_dir, rp_id, chain->catalog.base_rp,
                                                     chain->catalog.journal_gen));
  FERRY_ASSIGN_OR_RETURN(std::ptrdiff_t i, find_target(*chain, rp_id, disk));
  // RPs after the target are never read: drop them (and their index) from the view.
  if (i >= 0) chain->rps.resize(static_cast<std::size_t>(i) + 1);
  auto v = std::make_unique<JournalView>(st, paths, nullptr, std::move(chain), i, disk);
  FERRY_TRY(v->open_base());
  v->keep_pin(std::move(pin));
  return std::unique_ptr<ReadView>(std::move(v));
}

Status apply_rp_to_images(ImageStore& store, jr::Reader& reader, const jr::CommittedRp& rp,
                          bool rewrite_zeros) {
  std::vector<std::unique_ptr<StorageFile>> images;
  for (const auto& d : rp.begin.disks) {
    FERRY_ASSIGN_OR_RETURN(auto f, store.open(d.name, /*create=*/true));
    if (d.full) FERRY_TRY(f->truncate(0));  // a full RP resets the disk
    FERRY_TRY(f->truncate(d.size_bytes));
    images.push_back(std::move(f));
  }
  FERRY_KILL_POINT("apply.before_write");
  // Per disk of a full RP: where the data written by this step ends. A full disk's image
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
        if (full && b.offset_bytes >= data_end[b.disk_index]) {
          // a hole already: the image was truncated to 0 above
        } else if (rewrite_zeros) {
          FERRY_TRY(write_zeros(img, b.offset_bytes, b.length_bytes));
        } else {
          FERRY_TRY(img.punch_hole(b.offset_bytes, b.length_bytes));
        }
      } else {
        FERRY_TRY(img.pwrite(block.data(), block.size(), b.offset_bytes));
        data_end[b.disk_index] = std::max(data_end[b.disk_index], b.offset_bytes + b.length_bytes);
      }
      if (i++ == rp.index.record_count() / 2) FERRY_KILL_POINT("apply.mid_write");
    }
  }
  FERRY_KILL_POINT("apply.before_fsync");
  for (auto& img : images) FERRY_TRY(img->datasync());
  return Status::ok();
}

}  // namespace ferry::site
