// RAII owner for a file descriptor, plus the few file helpers every module needs.
#pragma once

#include <unistd.h>

#include <string>
#include <utility>

#include "ferry/base/status.h"

namespace ferry {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// Writes `data` to `path` atomically and durably: temp file, write, fsync, rename, fsync dir.
Status write_file_atomic(const std::string& path, const std::string& data);
// Reads a whole (small) file.
Result<std::string> read_file(const std::string& path);
// fsync of the directory holding `path` (after a create or rename in it).
Status fsync_parent_dir(const std::string& path);
// mkdir -p.
Status make_dirs(const std::string& path);

}  // namespace ferry
