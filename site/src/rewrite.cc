// The journal rewrite of tiered retention: rewrite.h says what and why.
#include "rewrite.h"

#include <algorithm>
#include <string>

#include "ferry/base/hash.h"
#include "ferry/base/kill_point.h"
#include "ferry/transport/codec.h"
#include "ferry/transport/rules.h"

namespace ferry::site {
namespace {

namespace jr = journal;

struct Range {
  std::uint64_t lo = 0, hi = 0;
};

// Sorts and merges overlapping or touching ranges in place.
void coalesce(std::vector<Range>& v) {
  std::sort(v.begin(), v.end(), [](const Range& a, const Range& b) { return a.lo < b.lo; });
  std::size_t n = 0;
  for (const Range& r : v) {
    if (n != 0 && r.lo <= v[n - 1].hi) {
      v[n - 1].hi = std::max(v[n - 1].hi, r.hi);
      continue;
    }
    v[n++] = r;
  }
  v.resize(n);
}

// Merging as ranges arrive keeps the list near the number of distinct ranges, not records.
constexpr std::size_t kCoalesceEvery = 1u << 16;

class RpCopier {
 public:
  RpCopier(const std::shared_ptr<Storage>& st, const Paths& paths, const Chain& chain,
           jr::Writer* out, RewriteStats& stats, transport::Compressor comp)
      : st_(st), paths_(paths), chain_(chain), reader_(st, chain.journal_dir), out_(out),
        stats_(stats), comp_(std::move(comp)) {}

  // The copy of chain.rps[last] on the previous kept RP (`prev`: its begin record, null when
  // there is none and the base holds no disk either): its begin record, and per disk the
  // ranges to copy. chain.rps[first..last] are the RPs since the previous kept one.
  struct Plan {
    RpBeginInfo begin;
    std::vector<std::vector<Range>> ranges;  // per disk of `begin`
  };
  Result<Plan> plan(const RpBeginInfo* prev, std::uint64_t prev_id, std::size_t first,
                    std::size_t last) {
    const jr::CommittedRp& k = chain_.rps[last];
    Plan p;
    p.begin = k.begin;
    p.begin.base_rp = prev_id;
    p.ranges.resize(p.begin.disks.size());
    for (std::size_t d = 0; d < p.begin.disks.size(); ++d) {
      auto& disk = p.begin.disks[d];
      // Since the disk's last full copy in the run (or, when the previous kept RP does not
      // hold it, from scratch: C5 made the RP that added it a full copy).
      std::size_t from = first;
      bool full = prev == nullptr || find_disk(*prev, disk.name) < 0;
      for (std::size_t j = first; j <= last; ++j) {
        const int dj = find_disk(chain_.rps[j].begin, disk.name);
        if (dj >= 0 && chain_.rps[j].begin.disks[dj].full) {
          from = j;
          full = true;
        }
      }
      disk.full = full;
      disk.resync = false;
      std::uint64_t min_size = disk.size_bytes;
      for (std::size_t j = from; j <= last; ++j) {
        const int dj = find_disk(chain_.rps[j].begin, disk.name);
        if (dj < 0) continue;
        min_size = std::min(min_size, chain_.rps[j].begin.disks[dj].size_bytes);
        FERRY_TRY(add_written(chain_.rps[j], static_cast<std::uint16_t>(dj), disk.size_bytes,
                              p.ranges[d]));
      }
      // Bytes above a smaller size in between read as zeros at the kept RP unless rewritten:
      // the copy carries them, so that no older record or base byte shows through there.
      if (min_size < disk.size_bytes) p.ranges[d].push_back({min_size, disk.size_bytes});
      coalesce(p.ranges[d]);
    }
    return p;
  }

  // What the copy would take in the journal, from the index alone (record headers, no
  // data): the run's stored bytes in the proportion of its bytes the copy covers.
  Result<std::uint64_t> estimate(const RpBeginInfo* prev, std::uint64_t prev_id,
                                 std::size_t first, std::size_t last) {
    FERRY_ASSIGN_OR_RETURN(Plan p, plan(prev, prev_id, first, last));
    std::uint64_t covered = 0, logical = 0, stored = 0;
    for (const auto& v : p.ranges)
      for (const Range& r : v) covered += r.hi - r.lo;
    for (std::size_t j = first; j <= last; ++j)
      for (const auto& d : chain_.rps[j].info.disks) {
        logical += d.changed_bytes;
        stored += d.stored_bytes;
      }
    if (logical == 0) return stored;
    return static_cast<std::uint64_t>(static_cast<long double>(stored) *
                                      std::min<long double>(1, (long double)covered / logical));
  }

  Status copy(const RpBeginInfo* prev, std::uint64_t prev_id, std::size_t first,
              std::size_t last) {
    const jr::CommittedRp& k = chain_.rps[last];
    FERRY_ASSIGN_OR_RETURN(Plan p, plan(prev, prev_id, first, last));
    const RpBeginInfo& nb = p.begin;
    const auto& ranges = p.ranges;
    jr::RecordHeader bh;
    bh.type = jr::RecordType::rp_begin;
    bh.rp_id = nb.rp_id;
    FERRY_TRY(out_->append(bh, jr::encode_begin(nb)).status());
    std::vector<RpDiskInfo> disk_stats(nb.disks.size());
    seq_ = 0;
    for (std::size_t d = 0; d < nb.disks.size(); ++d) {
      if (ranges[d].empty()) continue;
      FERRY_ASSIGN_OR_RETURN(auto view, view_of(st_, paths_, chain_, nb.rp_id, nb.disks[d].name));
      for (const Range& r : ranges[d])
        FERRY_TRY(copy_range(*view, nb.rp_id, static_cast<std::uint16_t>(d), r, disk_stats[d]));
    }

    RpInfo info = k.info;
    info.base_rp = prev_id;
    for (std::size_t d = 0; d < nb.disks.size() && d < info.disks.size(); ++d) {
      RpDiskInfo& di = info.disks[d];
      di.full = nb.disks[d].full;
      di.resync = false;
      di.changed_bytes = disk_stats[d].changed_bytes;
      di.zero_bytes = disk_stats[d].zero_bytes;
      di.stored_bytes = disk_stats[d].stored_bytes;
    }
    FERRY_TRY(out_->flush());  // a commit record starts an aligned block
    jr::RecordHeader ch;
    ch.type = jr::RecordType::rp_commit;
    ch.rp_id = nb.rp_id;
    FERRY_TRY(out_->append(ch, jr::encode_commit(info)).status());
    ++stats_.rps;
    return Status::ok();
  }

 private:
  // The ranges of disk `d` of `rp` its records write, clipped to `size`.
  Status add_written(const jr::CommittedRp& rp, std::uint16_t d, std::uint64_t size,
                     std::vector<Range>& out) {
    for (const jr::Chunk& c : rp.index.chunks()) {
      if (((c.disk_mask >> d) & 1u) == 0) continue;
      FERRY_TRY(reader_.load_chunk(rp.info.rp_id, c, entries_));
      for (const jr::BlockEntry& e : entries_) {
        if (e.disk_index != d || e.length_bytes == 0 || e.offset_bytes >= size) continue;
        out.push_back({e.offset_bytes, std::min(size, e.offset_bytes + e.length_bytes)});
      }
      if (out.size() >= kCoalesceEvery) coalesce(out);
    }
    return Status::ok();
  }

  Status copy_range(ReadView& view, std::uint64_t rp_id, std::uint16_t d, Range r,
                    RpDiskInfo& s) {
    std::uint64_t pos = r.lo;
    while (pos < r.hi) {
      // One read-view window at a time bounds the extent list.
      const std::uint64_t stop =
          std::min(r.hi, (pos / ReadView::kWindowBytes + 1) * ReadView::kWindowBytes);
      FERRY_ASSIGN_OR_RETURN(auto extents, view.extents(pos, stop - pos));
      for (const ReadExtent& e : extents) {
        std::uint64_t at = e.offset_bytes;
        const std::uint64_t end = e.offset_bytes + e.length_bytes;
        while (at < end) {
          if (e.zero) {
            const auto n = static_cast<std::uint32_t>(
                std::min<std::uint64_t>(end - at, jr::kMaxZeroRecordBytes));
            FERRY_TRY(put(rp_id, d, RecordKind::zero, at, n, {}, s));
            at += n;
            continue;
          }
          const auto n = static_cast<std::uint32_t>(
              std::min<std::uint64_t>(end - at, kRewriteRecordBytes));
          block_.resize(n);
          FERRY_TRY(view.pread(block_.data(), n, at));
          FERRY_TRY(put(rp_id, d, is_all_zero(block_.data(), n) ? RecordKind::zero
                                                                : RecordKind::data,
                        at, n, block_, s));
          at += n;
        }
      }
      pos = stop;
    }
    return Status::ok();
  }

  Status put(std::uint64_t rp_id, std::uint16_t d, RecordKind kind, std::uint64_t at,
             std::uint32_t n, std::string_view raw, RpDiskInfo& s) {
    jr::RecordHeader h;
    h.type = jr::RecordType::block;
    h.kind = kind;
    h.disk_index = d;
    h.rp_id = rp_id;
    h.seq = seq_++;
    h.offset_bytes = at;
    h.length_bytes = n;
    std::string_view payload;
    if (kind == RecordKind::data) {
      h.hash = xxh3_128(raw.data(), raw.size());
      packed_.resize(transport::Compressor::bound(raw.size()));
      FERRY_ASSIGN_OR_RETURN(std::size_t z, comp_.compress(raw.data(), raw.size(),
                                                           packed_.data(), packed_.size()));
      if (z < raw.size()) {
        h.codec = RecordCodec::zstd;
        payload = std::string_view(packed_.data(), z);
      } else {
        payload = raw;
      }
    }
    FERRY_TRY(out_->append(h, payload).status());
    const std::uint64_t total = jr::kRecordHeaderBytes + payload.size();
    s.changed_bytes += n;
    if (kind == RecordKind::zero) s.zero_bytes += n;
    s.stored_bytes += total;
    ++stats_.records;
    stats_.logical_bytes += n;
    stats_.stored_bytes += total;
    return Status::ok();
  }

  const std::shared_ptr<Storage>& st_;
  const Paths& paths_;
  const Chain& chain_;
  jr::Reader reader_;
  jr::Writer* out_;  // null: estimates only
  RewriteStats& stats_;
  transport::Compressor comp_;
  std::vector<jr::BlockEntry> entries_;
  std::string block_, packed_;
  std::uint64_t seq_ = 0;
};

// Calls f(prev, prev_id, first, last) for each kept RP in order (see RpCopier::plan).
template <typename F>
Status for_each_run(const Chain& chain, const std::vector<std::uint64_t>& kept, F f) {
  FERRY_ASSERT(!kept.empty() && kept.back() == chain.newest());
  const RpBeginInfo* prev = chain.catalog.base_rp != 0 ? &chain.catalog.base_begin : nullptr;
  std::uint64_t prev_id = chain.catalog.base_rp;
  std::size_t first = 0;
  for (std::uint64_t id : kept) {
    std::size_t last = first;
    while (last < chain.rps.size() && chain.rps[last].info.rp_id != id) ++last;
    FERRY_ASSERT(last < chain.rps.size());
    FERRY_TRY(f(prev, prev_id, first, last));
    prev = &chain.rps[last].begin;
    prev_id = id;
    first = last + 1;
  }
  return Status::ok();
}

}  // namespace

Status write_kept_rps(const std::shared_ptr<Storage>& st, const Paths& paths, const Chain& chain,
                      const std::vector<std::uint64_t>& kept, jr::Writer& out,
                      RewriteStats& stats) {
  FERRY_ASSIGN_OR_RETURN(auto comp, transport::Compressor::create(transport::kDefaultZstdLevel));
  RpCopier copier(st, paths, chain, &out, stats, std::move(comp));
  return for_each_run(chain, kept, [&](const RpBeginInfo* prev, std::uint64_t prev_id,
                                       std::size_t first, std::size_t last) -> Status {
    FERRY_TRY(copier.copy(prev, prev_id, first, last));
    if (stats.rps == 1) FERRY_KILL_POINT("rewrite.mid_write");
    return Status::ok();
  });
}

Result<std::uint64_t> estimate_rewrite_bytes(const std::shared_ptr<Storage>& st,
                                             const Paths& paths, const Chain& chain,
                                             const std::vector<std::uint64_t>& kept) {
  FERRY_ASSIGN_OR_RETURN(auto comp, transport::Compressor::create(transport::kDefaultZstdLevel));
  RewriteStats unused;
  RpCopier copier(st, paths, chain, nullptr, unused, std::move(comp));
  std::uint64_t total = 0;
  FERRY_TRY(for_each_run(chain, kept, [&](const RpBeginInfo* prev, std::uint64_t prev_id,
                                          std::size_t first, std::size_t last) -> Status {
    FERRY_ASSIGN_OR_RETURN(std::uint64_t n, copier.estimate(prev, prev_id, first, last));
    total += n;
    return Status::ok();
  }));
  return total;
}

}  // namespace ferry::site
