// ReadView: disk D of group G at recovery point N, read straight from the journal.
//
// The one owner of "what does RP N hold": restore, the NBD export (tools/nbdkit) and later
// verify read through it. It takes no group lock and never writes: it scans the journal
// read-only (as `ferry points` does, honouring the R18 `distrust` marker), so a receiver may
// append to the same group meanwhile; RPs committed after open() are not seen and the RP it
// reads never changes (the journal keeps every committed RP until retention, a later issue,
// which will have to respect readers).
//
// Bounded memory: the piece map of one window (kWindowBytes of the disk) at a time, one
// decoded record, and the scanned RP index (what `points` holds). Nothing is materialised at
// open; a read builds the pieces of the window it falls in, from the chunk index.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::site {

struct ReadExtent {
  std::uint64_t offset_bytes = 0;
  std::uint64_t length_bytes = 0;
  // true: reads as zeros (a zero record or a range no record covers). false: data records,
  // which may hold zeros too.
  bool zero = false;
};

class ReadView {
 public:
  // The piece map is built per aligned window of this many bytes; reads that stay inside one
  // window reuse it (with 64 KiB records a window holds at most 4096 pieces).
  static constexpr std::uint64_t kWindowBytes = 256ull << 20;

  virtual ~ReadView() = default;
  // rp_id 0: the newest committed RP. Errors name the group, the RP and the disk: unknown
  // group (Errc::not_found), RP not committed (not_found), disk not in the RP (not_found),
  // invalid names (invalid_argument).
  static Result<std::unique_ptr<ReadView>> open(const std::string& store_root,
                                                const std::string& group, std::uint64_t rp_id,
                                                const std::string& disk);

  virtual const std::string& group() const = 0;
  virtual const std::string& disk() const = 0;
  virtual std::uint64_t rp_id() const = 0;
  virtual std::uint64_t size_bytes() const = 0;

  // Reads [offset, offset + len) of the disk at the RP; the range must lie inside the disk.
  // Thread-safe (reads are serialised on one journal reader).
  virtual Status pread(void* buf, std::size_t len, std::uint64_t offset) = 0;
  // Data and zero ranges covering [offset, offset + length) in order, adjacent ranges of the
  // same kind merged. The range must lie inside the disk.
  virtual Result<std::vector<ReadExtent>> extents(std::uint64_t offset,
                                                  std::uint64_t length) = 0;
  // The ranges of [offset, offset + length), in order and merged, where the disk at this RP
  // may differ from the base RP's image (base_rp()): covered by a record of an RP in
  // (base, N], or past the bytes the base image supplies (a full RP or a resize since).
  // Everything else reads from the base image unchanged. Failback writes only these
  // (docs/failover.md, "Failback"). `zero` is always false here.
  virtual Result<std::vector<ReadExtent>> changed_since_base(std::uint64_t offset,
                                                             std::uint64_t length) = 0;
  // The RP the group's replica images hold (the store's base RP when the view was opened).
  virtual std::uint64_t base_rp() const = 0;
  // Another view of the same disk at the same RP, sharing what open() loaded and its pin
  // (no second journal scan), with its own reader and window: one per NBD connection.
  virtual Result<std::unique_ptr<ReadView>> clone() const = 0;
};

}  // namespace ferry::site
