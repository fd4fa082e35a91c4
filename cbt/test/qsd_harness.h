// A real qemu-storage-daemon for the cbt integration tests.
//
// Starts qsd in a fresh temp dir with the given disks (qcow2 or raw image files), a QMP
// socket for the code under test, a second QMP socket for the test itself, and a writable
// FUSE export of every disk node; the test writes through the FUSE file with pwrite + fsync,
// so dirty bitmaps see the writes exactly as they see a guest's. The destructor kills qsd,
// detaches any FUSE mount left behind and removes the temp dir, even when a test failed.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/base/status.h"
#include "qmp_client.h"

namespace ferry::cbt::test {

struct QsdDisk {
  std::string node;     // block node name (the format node for qcow2)
  bool qcow2 = true;    // else a raw file node
  std::uint64_t size_bytes = 0;
};

class Qsd {
 public:
  // True when qemu-storage-daemon, qemu-img and /dev/fuse are usable (else tests skip).
  static bool available();
  static Result<std::unique_ptr<Qsd>> start(std::vector<QsdDisk> disks);
  ~Qsd();

  // Clean stop (QMP quit: persistent bitmaps are stored) and start again on the same images.
  Status restart_clean();
  // SIGKILL (persistent bitmaps stay marked in-use) and start again on the same images.
  Status restart_killed();

  const std::string& dir() const { return dir_; }
  std::string qmp_socket() const { return dir_ + "/qmp.sock"; }
  std::string fuse_path(const std::string& node) const { return dir_ + "/" + node + ".fuse"; }
  std::string image_path(const QsdDisk& d) const;
  QmpClient& monitor() { return *monitor_; }  // the test's own QMP connection

  // Writes through the FUSE export (pwrite + fsync), like a guest.
  Status write(const std::string& node, std::uint64_t offset_bytes, const std::string& data);
  // Zeroes a range through the FUSE export (fallocate ZERO_RANGE + fsync).
  Status write_zeroes(const std::string& node, std::uint64_t offset_bytes, std::uint64_t length);
  // Names of block nodes whose name starts with `prefix`.
  Result<std::vector<std::string>> nodes_with_prefix(const std::string& prefix);

 private:
  Qsd() = default;
  Status launch();
  void kill_and_unmount(bool graceful);

  std::string dir_;
  std::vector<QsdDisk> disks_;
  pid_t pid_ = -1;
  std::unique_ptr<QmpClient> monitor_;
};

}  // namespace ferry::cbt::test
