#include "extent_math.h"

#include <algorithm>

#include <fmt/format.h>

namespace ferry::cbt {
namespace {

std::uint64_t align_down(std::uint64_t v, std::uint64_t a) { return v / a * a; }
std::uint64_t align_up(std::uint64_t v, std::uint64_t a, std::uint64_t cap) {
  if (v >= cap) return cap;
  std::uint64_t r = (v + a - 1) / a * a;
  return std::min(r, cap);
}

void add_data(std::vector<Extent>& out, std::uint64_t a, std::uint64_t b) {
  // Data wins over zero: trim a zero tail that the outward rounding now covers.
  while (!out.empty() && out.back().zero && out.back().offset_bytes + out.back().length_bytes > a) {
    Extent& z = out.back();
    if (z.offset_bytes >= a) {
      out.pop_back();
    } else {
      z.length_bytes = a - z.offset_bytes;
      break;
    }
  }
  if (!out.empty() && !out.back().zero) {
    Extent& d = out.back();
    std::uint64_t d_end = d.offset_bytes + d.length_bytes;
    if (d_end >= a) {
      d.length_bytes = std::max(d_end, b) - d.offset_bytes;
      return;
    }
  }
  out.push_back({a, b - a, false});
}

void add_zero(std::vector<Extent>& out, std::uint64_t a, std::uint64_t b) {
  if (!out.empty()) a = std::max(a, out.back().offset_bytes + out.back().length_bytes);
  if (a >= b) return;
  append_merged(out, {a, b - a, true});
}

}  // namespace

Result<Range> extents_window(std::uint64_t offset_bytes, std::uint64_t length_bytes,
                             std::uint32_t align_bytes, std::uint64_t disk_size_bytes) {
  if (align_bytes == 0 || (align_bytes & (align_bytes - 1)) != 0)
    return Status::error(Errc::invalid_argument,
                         fmt::format("extent alignment {} is not a power of two", align_bytes));
  if (offset_bytes % align_bytes != 0 || offset_bytes >= disk_size_bytes || length_bytes == 0)
    return Status::error(Errc::invalid_argument,
                         fmt::format("extent range offset {} length {} (align {}, disk size {})",
                                     offset_bytes, length_bytes, align_bytes, disk_size_bytes));
  std::uint64_t end = length_bytes > disk_size_bytes - offset_bytes
                          ? disk_size_bytes
                          : align_up(offset_bytes + length_bytes, align_bytes, disk_size_bytes);
  return Range{offset_bytes, end - offset_bytes};
}

void append_merged(std::vector<Extent>& out, const Extent& e) {
  if (e.length_bytes == 0) return;
  if (!out.empty()) {
    Extent& last = out.back();
    if (last.zero == e.zero && last.offset_bytes + last.length_bytes == e.offset_bytes) {
      last.length_bytes += e.length_bytes;
      return;
    }
  }
  out.push_back(e);
}

void append_aligned(std::vector<Extent>& out, const std::vector<Extent>& runs,
                    std::uint32_t align_bytes, std::uint64_t disk_size_bytes) {
  // Merge same-kind neighbours first so two zero runs never shrink separately.
  std::vector<Extent> merged;
  merged.reserve(runs.size());
  for (const Extent& r : runs) append_merged(merged, r);
  const std::size_t first_new = out.size();
  for (const Extent& r : merged) {
    const std::uint64_t s = r.offset_bytes, e = r.offset_bytes + r.length_bytes;
    FERRY_ASSERT(e <= disk_size_bytes);
    if (r.zero) {
      std::uint64_t b = e == disk_size_bytes ? e : align_down(e, align_bytes);
      add_zero(out, align_up(s, align_bytes, disk_size_bytes), b);
    } else {
      add_data(out, align_down(s, align_bytes), align_up(e, align_bytes, disk_size_bytes));
    }
  }
  FERRY_ASSERT(out.size() >= first_new);
}

std::vector<Extent> dirty_extents(const std::vector<Range>& dirty, const std::vector<Extent>& alloc,
                                  std::uint32_t align_bytes, std::uint64_t disk_size_bytes) {
  // Widen each dirty range to whole granules and merge overlapping windows.
  std::vector<Range> windows;
  for (const Range& d : dirty) {
    if (d.length_bytes == 0) continue;
    std::uint64_t a = align_down(d.offset_bytes, align_bytes);
    std::uint64_t b = align_up(d.end(), align_bytes, disk_size_bytes);
    if (!windows.empty() && windows.back().end() >= a) {
      FERRY_ASSERT(a >= windows.back().offset_bytes);
      windows.back().length_bytes = std::max(windows.back().end(), b) - windows.back().offset_bytes;
    } else {
      windows.push_back({a, b - a});
    }
  }
  std::vector<Extent> out;
  std::vector<Extent> clipped;
  std::size_t i = 0;  // alloc is sorted: walk it once
  for (const Range& w : windows) {
    clipped.clear();
    while (i < alloc.size() && alloc[i].offset_bytes + alloc[i].length_bytes <= w.offset_bytes) ++i;
    std::uint64_t covered = w.offset_bytes;
    for (std::size_t j = i; j < alloc.size() && alloc[j].offset_bytes < w.end(); ++j) {
      std::uint64_t a = std::max(alloc[j].offset_bytes, w.offset_bytes);
      std::uint64_t b = std::min(alloc[j].offset_bytes + alloc[j].length_bytes, w.end());
      if (a > covered) clipped.push_back({covered, a - covered, false});
      clipped.push_back({a, b - a, alloc[j].zero});
      covered = b;
    }
    // Anything the allocation map did not describe is sent as data (never assume zero).
    if (covered < w.end()) clipped.push_back({covered, w.end() - covered, false});
    append_aligned(out, clipped, align_bytes, disk_size_bytes);
  }
  return out;
}

}  // namespace ferry::cbt
