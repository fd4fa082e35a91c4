// The receiver's storage seam: every byte the receiver makes durable goes through here, so
// tests can swap in a faulty twin (faulty_storage.h) that drops, tears or misdirects
// unsynced writes at a power cut, and fails reads, writes and syncs with EIO/ENOSPC.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::site {

struct OpenFlags {
  bool create = false;
  bool direct = false;  // O_DIRECT; the real storage falls back (and reports it) when refused
  bool read_only = false;
};

class StorageFile {
 public:
  virtual ~StorageFile() = default;
  // Positional I/O. With direct I/O, buffers, offsets and lengths are 4096-aligned.
  virtual Status pwrite(const void* buf, std::size_t len, std::uint64_t offset) = 0;
  virtual Result<std::size_t> pread(void* buf, std::size_t len, std::uint64_t offset) = 0;
  // Asynchronous writes (io_uring in the real storage): submit, then wait for all.
  virtual Status submit_write(const void* buf, std::size_t len, std::uint64_t offset) = 0;
  virtual Status wait_writes() = 0;
  virtual Status datasync() = 0;  // a failure means what it covered is lost
  virtual Status truncate(std::uint64_t size) = 0;
  virtual Status punch_hole(std::uint64_t offset, std::uint64_t len) = 0;
  virtual Result<std::uint64_t> size() = 0;
  virtual bool is_direct() const = 0;
  // The first run of data at or after `offset`: [start, end). start == end: no data from
  // `offset` on (a hole up to the end). Files that cannot tell report everything as data.
  struct DataRun {
    std::uint64_t start = 0, end = 0;
  };
  virtual Result<DataRun> next_data(std::uint64_t offset) = 0;
};

class Storage {
 public:
  virtual ~Storage() = default;
  virtual Result<std::unique_ptr<StorageFile>> open(const std::string& path, OpenFlags flags) = 0;
  virtual Status remove(const std::string& path) = 0;  // a file, or an empty directory
  virtual Status rename(const std::string& from, const std::string& to) = 0;
  virtual Status sync_dir(const std::string& dir) = 0;
  virtual Status make_dirs(const std::string& dir) = 0;
  virtual Result<std::vector<std::string>> list_dir(const std::string& dir) = 0;
  virtual bool exists(const std::string& path) = 0;
};

// The real file system: io_uring for the journal's asynchronous writes, O_DIRECT where the
// file system accepts it.
std::shared_ptr<Storage> real_storage();

// Checks once per process that io_uring can be set up (kernel support, seccomp, memlock
// limits); the error names the missing piece. GroupStore::open calls it.
Status probe_io_uring();

// Bounds of the real storage's ring.
inline constexpr unsigned kRingQueueDepth = 64;            // SQEs per file ring
inline constexpr std::size_t kDirectAlignBytes = 4096;     // O_DIRECT buffer/offset/length

}  // namespace ferry::site
