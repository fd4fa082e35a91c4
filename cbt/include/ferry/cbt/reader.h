// Reading a point-in-time view: which extents to read, and the reads themselves.
//
// One ops table for every endpoint kind (NBD export, raw file or block device): the engine's
// copy loop never knows what it talks to. Reads are asynchronous with the number and bytes in
// flight bounded by the caller.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/cbt/source.h"

namespace ferry::cbt {

struct Extent {
  std::uint64_t offset_bytes = 0;
  std::uint64_t length_bytes = 0;
  bool zero = false;  // known to read as zeros (hole / zero cluster): send without reading
  friend bool operator==(const Extent&, const Extent&) = default;
};

class BlockReader {
 public:
  virtual ~BlockReader() = default;
  virtual std::uint64_t size_bytes() const = 0;

  // The extents to send for this capture, in ascending order, for the byte range
  // [offset, offset+length): for an incremental view, the dirty extents (each split into
  // zero and data parts by allocation status); for a full view, every allocated extent, with
  // unallocated/zero ranges as zero extents. Extents are aligned to `align_bytes` (except at
  // the end of the disk). Called with successive ranges so memory stays bounded.
  // offset_bytes must be a multiple of align_bytes (a power of two) and below size_bytes();
  // the end of the range is rounded up to align_bytes (capped at the disk's end).
  virtual Result<std::vector<Extent>> extents(std::uint64_t offset_bytes,
                                              std::uint64_t length_bytes,
                                              std::uint32_t align_bytes) = 0;

  // Starts a read of [offset, offset+length) into buf (which stays valid until completion).
  // `done` is called from poll() with the result of the read. When submit_read itself returns
  // an error, `done` is never called. Not thread-safe: one thread drives a reader.
  using Done = std::function<void(Status)>;
  virtual Status submit_read(std::uint64_t offset_bytes, std::uint32_t length_bytes, void* buf,
                             Done done) = 0;
  // Waits up to timeout_ms for at least one completion and runs the callbacks of all that
  // completed. Returns the number completed.
  virtual Result<unsigned> poll(int timeout_ms) = 0;
  virtual unsigned in_flight() const = 0;
};

// Opens the view of one disk through libnbd (unix socket), with the dirty-bitmap context
// when the view is incremental and base:allocation always.
Result<std::unique_ptr<BlockReader>> open_nbd_reader(const DiskView& view);
// Opens a raw file or block device read-only through io_uring (full views only).
Result<std::unique_ptr<BlockReader>> open_file_reader(const std::string& path,
                                                      unsigned queue_depth = 64);

}  // namespace ferry::cbt
