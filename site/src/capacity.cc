#include "capacity.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <limits>

#include "ferry/base/fd.h"
#include "ferry/base/log.h"
#include "ferry/base/units.h"

namespace ferry::site {

std::string file_system_name(const std::string& path) {
  struct statfs fs {};
  if (::statfs(path.c_str(), &fs) != 0) return "unknown";
  switch (static_cast<unsigned long>(fs.f_type)) {
    case 0xEF53: return "ext4";  // ext2/3/4 share the magic; ext4 is the one in use today
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x2FC12FC1: return "zfs";
    case 0xF2F52010: return "f2fs";
    case 0x6969: return "nfs";
    case 0x794C7630: return "overlayfs";
    default: return "unknown";
  }
}

namespace {

// An unnamed file in `dir` (O_TMPFILE: nothing is left behind by a crash mid-probe), or a
// named one removed at once where the file system lacks O_TMPFILE.
Result<UniqueFd> open_probe_file(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600));
  if (fd.valid()) return fd;
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
    return Status::from_errno(errno, "create a capacity probe file in " + dir);
  static std::atomic<std::uint64_t> counter{0};
  const std::string path = dir + "/.ferry-capacity-probe." + std::to_string(::getpid()) + "." +
                           std::to_string(counter.fetch_add(1));
  UniqueFd named(::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600));
  if (!named.valid()) return Status::from_errno(errno, "create capacity probe file " + path);
  ::unlink(path.c_str());
  return named;
}

// true: the file can be that large; false: the file system refuses the size.
Result<bool> try_size(int fd, std::uint64_t size, const std::string& dir) {
  if (size > std::uint64_t(std::numeric_limits<off_t>::max())) return false;
  if (::ftruncate(fd, static_cast<off_t>(size)) == 0) return true;
  if (errno == EFBIG || errno == EINVAL) return false;
  return Status::from_errno(errno, "capacity probe in " + dir + ": ftruncate to " +
                                       std::to_string(size));
}

}  // namespace

Result<CapacityProbe::Verdict> CapacityProbe::check(const std::string& dir,
                                                    std::uint64_t size_bytes) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) return Status::from_errno(errno, "stat " + dir);
  std::lock_guard lock(mu_);
  const auto key = std::make_pair(st.st_dev, size_bytes);
  if (auto it = cache_.find(key); it != cache_.end()) return it->second;
  ++probes_;
  FERRY_ASSIGN_OR_RETURN(UniqueFd fd, open_probe_file(dir));
  Verdict v;
  v.fs_name = file_system_name(dir);
  FERRY_ASSIGN_OR_RETURN(v.fits, try_size(fd.get(), size_bytes, dir));
  if (!v.fits) {
    // Bisect for the limit, so the refusal can name it: ~45 ftruncates of a sparse file.
    std::uint64_t lo = 0, hi = size_bytes;  // lo fits, hi does not
    while (hi - lo > 1) {
      const std::uint64_t mid = lo + (hi - lo) / 2;
      FERRY_ASSIGN_OR_RETURN(bool ok, try_size(fd.get(), mid, dir));
      (ok ? lo : hi) = mid;
    }
    v.max_file_bytes = lo;
  }
  if (cache_.size() >= kMaxCachedVerdicts) cache_.clear();
  cache_.emplace(key, v);
  return v;
}

std::uint64_t CapacityProbe::probes() const {
  std::lock_guard lock(mu_);
  return probes_;
}

Status check_disk_capacity(CapacityProbe& probe, const std::string& replica_dir,
                           const std::string& group, const std::string& disk,
                           std::uint64_t size_bytes, std::uint64_t max_disk_bytes) {
  const std::string what = "disk '" + disk + "' of group '" + group + "' is " +
                           human_bytes_exact(size_bytes);
  if (max_disk_bytes != 0 && size_bytes > max_disk_bytes)
    return Status::error(Errc::invalid_argument,
                         what + ", larger than this receiver's --max-disk-bytes " +
                             human_bytes_exact(max_disk_bytes) +
                             ": raise --max-disk-bytes or replicate the disk to another receiver");
  // Past the process's file size limit, growing the probe would raise SIGXFSZ and kill the
  // receiver; the limit is the process's, not the file system's, and the fix differs.
  rlimit fsize{};
  if (::getrlimit(RLIMIT_FSIZE, &fsize) == 0 && fsize.rlim_cur != RLIM_INFINITY &&
      size_bytes > fsize.rlim_cur)
    return Status::error(Errc::unsupported,
                         what + ", larger than the receiver's file size limit (RLIMIT_FSIZE) " +
                             human_bytes_exact(fsize.rlim_cur) +
                             ": raise it (ulimit -f unlimited, or LimitFSIZE=infinity in the "
                             "systemd unit)");
  auto v = probe.check(replica_dir, size_bytes);
  if (!v.is_ok()) {
    // Not a verdict on the size: the store itself reports a real storage failure when it
    // writes. Accepting here never acknowledges anything the store did not make durable.
    spdlog::warn("group '{}': cannot check whether the store can hold disk '{}' ({}): {}", group,
                 disk, human_bytes_exact(size_bytes), v.status().to_string());
    return Status::ok();
  }
  if (v->fits) return Status::ok();
  return Status::error(Errc::unsupported,
                       what + ", larger than the largest file the store's file system (" +
                           v->fs_name + " at " + replica_dir + ") can hold, " +
                           human_bytes_exact(v->max_file_bytes) +
                           ": use a store on XFS, whose file size limit is 8 EiB, or replicate "
                           "a smaller disk");
}

}  // namespace ferry::site
