// Extent arithmetic shared by the readers (private to cbt/): turning what a server or file
// system reports (allocation runs, dirty runs) into aligned extents to send.
//
// Alignment rule: a granule (align_bytes) is sent as zero only if every byte of it is known
// to read as zero; otherwise it is data. So data rounds outwards, zero inwards; the last
// granule may be short at the end of the disk.
#pragma once

#include <cstdint>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/cbt/reader.h"

namespace ferry::cbt {

// A byte range [offset, offset+length).
struct Range {
  std::uint64_t offset_bytes = 0;
  std::uint64_t length_bytes = 0;
  std::uint64_t end() const { return offset_bytes + length_bytes; }
};

// Checks the arguments of BlockReader::extents and returns the aligned window it covers:
// [offset, min(align_up(offset+length), disk_size)). offset must be aligned and < size.
Result<Range> extents_window(std::uint64_t offset_bytes, std::uint64_t length_bytes,
                             std::uint32_t align_bytes, std::uint64_t disk_size_bytes);

// `runs`: sorted, contiguous classification of an aligned window (zero = reads as zeros).
// Appends the aligned extents to `out`, merging with its last extent where adjacent.
void append_aligned(std::vector<Extent>& out, const std::vector<Extent>& runs,
                    std::uint32_t align_bytes, std::uint64_t disk_size_bytes);

// Incremental view: `dirty` are sorted dirty ranges, `alloc` a contiguous classification
// covering them. Each dirty range is widened to whole granules and split into data and zero.
std::vector<Extent> dirty_extents(const std::vector<Range>& dirty, const std::vector<Extent>& alloc,
                                  std::uint32_t align_bytes, std::uint64_t disk_size_bytes);

// Appends e, merging with the last extent if adjacent and of the same kind.
void append_merged(std::vector<Extent>& out, const Extent& e);

}  // namespace ferry::cbt
