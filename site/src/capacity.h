// Can the store hold a replica image of a given size? Checked by the receiver at rp_begin,
// before anything of the RP is journalled, so a disk the store cannot hold is refused before
// it is acknowledged (an acknowledged RP that can never be applied would wedge the group:
// every apply and every recovery would fail, e.g. with EFBIG on ext4 past 16 TiB).
//
// Two limits: the file system's largest file, found by probing (a sparse probe file in the
// group's replica directory is grown with ftruncate and removed: EFBIG/EINVAL means the file
// system cannot hold that size), and a configured maximum (ferry receive --max-disk-bytes).
// No free-space policy: replicas are thin (holes stay holes), so a disk's size says nothing
// about the space its replica takes; running out of space is the disk-full path (the RP is
// refused as retryable and the group resumes once space returns).
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "ferry/base/status.h"

namespace ferry::site {

// The name of the file system holding `path` ("ext4", "xfs", ...; "unknown" if unrecognised).
std::string file_system_name(const std::string& path);

class CapacityProbe {
 public:
  // The bound on cached verdicts (file system x size); the cache is dropped when full.
  static constexpr std::size_t kMaxCachedVerdicts = 4096;

  struct Verdict {
    bool fits = true;
    // When !fits: the largest file size the file system accepts (found by bisection).
    std::uint64_t max_file_bytes = 0;
    std::string fs_name;
  };

  // Whether a file of size_bytes can exist in directory `dir` (which must exist). Probes once
  // per (file system, size); later calls are a stat and a map lookup. A probe that fails for
  // another reason than the size (EIO, EROFS, ENOSPC on the inode...) says nothing about the
  // size limit: it is returned as an error and not cached.
  Result<Verdict> check(const std::string& dir, std::uint64_t size_bytes);

  std::uint64_t probes() const;  // real probes run (for tests: the cache works)

 private:
  mutable std::mutex mu_;
  std::map<std::pair<dev_t, std::uint64_t>, Verdict> cache_;
  std::uint64_t probes_ = 0;
};

// The refusal of a disk the store cannot hold, or ok. `max_disk_bytes` 0: no configured
// maximum. Names the group, the disk, its size, the limit and the fix.
Status check_disk_capacity(CapacityProbe& probe, const std::string& replica_dir,
                           const std::string& group, const std::string& disk,
                           std::uint64_t size_bytes, std::uint64_t max_disk_bytes);

}  // namespace ferry::site
