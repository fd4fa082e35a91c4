// BlockReader over a raw file or block device with io_uring (full views only).
//
// Reads are queued as SQEs and submitted in poll() together with the wait, so a burst of
// submit_read() calls costs one system call. Short reads are resubmitted for the rest in the
// completion loop; the number in flight is bounded by the ring's depth.
#include <fcntl.h>
#include <linux/fs.h>
#include <liburing.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include <cerrno>
#include <memory>

#include <fmt/format.h>

#include "extent_math.h"
#include "ferry/base/fd.h"
#include "ferry/cbt/reader.h"

namespace ferry::cbt {
namespace {

constexpr unsigned kMaxQueueDepth = 4096;

class Ring {
 public:
  static Result<std::unique_ptr<Ring>> create(unsigned entries) {
    std::unique_ptr<Ring> r(new Ring);
    int rc = io_uring_queue_init(entries, &r->ring_, 0);
    if (rc < 0) return Status::from_errno(-rc, "io_uring_queue_init");
    r->live_ = true;
    return r;
  }
  ~Ring() {
    if (live_) io_uring_queue_exit(&ring_);
  }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;
  io_uring* get() { return &ring_; }

 private:
  Ring() = default;
  io_uring ring_{};
  bool live_ = false;
};

class FileReader final : public BlockReader {
 public:
  static Result<std::unique_ptr<BlockReader>> open(const std::string& path, unsigned depth);

  std::uint64_t size_bytes() const override { return size_bytes_; }
  Result<std::vector<Extent>> extents(std::uint64_t offset_bytes, std::uint64_t length_bytes,
                                      std::uint32_t align_bytes) override;
  Status submit_read(std::uint64_t offset_bytes, std::uint32_t length_bytes, void* buf,
                     Done done) override;
  Result<unsigned> poll(int timeout_ms) override;
  unsigned in_flight() const override { return in_flight_; }

 private:
  struct Slot {
    Done done;
    char* buf = nullptr;
    std::uint64_t offset_bytes = 0;
    std::uint32_t length_bytes = 0;
    std::uint32_t done_bytes = 0;
  };
  FileReader(UniqueFd fd, std::unique_ptr<Ring> ring, std::string path, unsigned depth)
      : fd_(std::move(fd)), ring_(std::move(ring)), path_(std::move(path)), slots_(depth) {
    free_.reserve(depth);
    for (unsigned i = depth; i > 0; --i) free_.push_back(i - 1);
    finished_.reserve(depth);
  }
  Status queue(unsigned slot_index);
  // Handles one completion; returns true when the slot's read is finished (ok or error).
  bool complete(unsigned slot_index, int res, Status& status);

  UniqueFd fd_;
  std::unique_ptr<Ring> ring_;
  std::string path_;
  std::uint64_t size_bytes_ = 0;
  std::vector<Slot> slots_;
  std::vector<unsigned> free_;
  std::vector<std::pair<unsigned, Status>> finished_;
  unsigned in_flight_ = 0;
};

Result<std::uint64_t> file_size(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Status::from_errno(errno, "fstat " + path);
  if (S_ISREG(st.st_mode)) return static_cast<std::uint64_t>(st.st_size);
  if (!S_ISBLK(st.st_mode))
    return Status::error(Errc::invalid_argument,
                         path + " is neither a regular file nor a block device");
  std::uint64_t size = 0;
  if (::ioctl(fd, BLKGETSIZE64, &size) != 0) return Status::from_errno(errno, "BLKGETSIZE64 " + path);
  return size;
}

Result<std::unique_ptr<BlockReader>> FileReader::open(const std::string& path, unsigned depth) {
  if (depth == 0 || depth > kMaxQueueDepth)
    return Status::error(Errc::invalid_argument,
                         fmt::format("queue depth {} outside [1, {}]", depth, kMaxQueueDepth));
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return Status::from_errno(errno, "open " + path);
  FERRY_ASSIGN_OR_RETURN(std::uint64_t size, file_size(fd.get(), path));
  auto ring = Ring::create(depth);
  if (!ring) return ring.status().with_context("file reader for " + path);
  std::unique_ptr<FileReader> r(new FileReader(std::move(fd), std::move(*ring), path, depth));
  r->size_bytes_ = size;
  return std::unique_ptr<BlockReader>(std::move(r));
}

Result<std::vector<Extent>> FileReader::extents(std::uint64_t offset_bytes,
                                                std::uint64_t length_bytes,
                                                std::uint32_t align_bytes) {
  FERRY_ASSIGN_OR_RETURN(Range w, extents_window(offset_bytes, length_bytes, align_bytes,
                                                 size_bytes_));
  std::vector<Extent> runs;
  for (std::uint64_t pos = w.offset_bytes; pos < w.end();) {
    off_t data = ::lseek(fd_.get(), static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0 && errno == ENXIO) data = static_cast<off_t>(w.end());  // only a hole left
    if (data < 0) {
      // No SEEK_DATA (some block devices, old file systems): everything is data.
      if (errno != EINVAL && errno != EOPNOTSUPP) return Status::from_errno(errno, "SEEK_DATA " + path_);
      runs.push_back({pos, w.end() - pos, false});
      break;
    }
    std::uint64_t d = std::min<std::uint64_t>(static_cast<std::uint64_t>(data), w.end());
    if (d > pos) runs.push_back({pos, d - pos, true});
    if (d >= w.end()) break;
    off_t hole = ::lseek(fd_.get(), static_cast<off_t>(d), SEEK_HOLE);
    if (hole < 0) return Status::from_errno(errno, "SEEK_HOLE " + path_);
    std::uint64_t h = std::min<std::uint64_t>(static_cast<std::uint64_t>(hole), w.end());
    FERRY_ASSERT(h > d);
    runs.push_back({d, h - d, false});
    pos = h;
  }
  std::vector<Extent> out;
  append_aligned(out, runs, align_bytes, size_bytes_);
  return out;
}

Status FileReader::queue(unsigned slot_index) {
  Slot& s = slots_[slot_index];
  io_uring_sqe* sqe = io_uring_get_sqe(ring_->get());
  if (sqe == nullptr) {  // SQ full of unsubmitted reads: push them to the kernel first
    int rc = io_uring_submit(ring_->get());
    if (rc < 0) return Status::from_errno(-rc, "io_uring_submit " + path_);
    sqe = io_uring_get_sqe(ring_->get());
    if (sqe == nullptr) return Status::error(Errc::busy, "io_uring SQ full for " + path_);
  }
  io_uring_prep_read(sqe, fd_.get(), s.buf + s.done_bytes, s.length_bytes - s.done_bytes,
                     s.offset_bytes + s.done_bytes);
  io_uring_sqe_set_data64(sqe, slot_index);
  return Status::ok();
}

Status FileReader::submit_read(std::uint64_t offset_bytes, std::uint32_t length_bytes, void* buf,
                               Done done) {
  FERRY_ASSERT(length_bytes > 0 && buf != nullptr);
  if (offset_bytes > size_bytes_ || length_bytes > size_bytes_ - offset_bytes)
    return Status::error(Errc::invalid_argument,
                         fmt::format("read [{}, +{}) beyond the end of {} ({} bytes)",
                                     offset_bytes, length_bytes, path_, size_bytes_));
  if (free_.empty())
    return Status::error(Errc::busy, fmt::format("{} reads already in flight on {}",
                                                 slots_.size(), path_));
  unsigned i = free_.back();
  slots_[i] = Slot{std::move(done), static_cast<char*>(buf), offset_bytes, length_bytes, 0};
  FERRY_TRY(queue(i));
  free_.pop_back();
  ++in_flight_;
  return Status::ok();
}

bool FileReader::complete(unsigned i, int res, Status& status) {
  Slot& s = slots_[i];
  if (res < 0) {
    status = Status::from_errno(-res, fmt::format("read {} at {}", path_, s.offset_bytes));
    return true;
  }
  if (res == 0) {
    status = Status::error(Errc::io, fmt::format("read {} at {}: unexpected end of file", path_,
                                                 s.offset_bytes + s.done_bytes));
    return true;
  }
  s.done_bytes += static_cast<std::uint32_t>(res);
  FERRY_ASSERT(s.done_bytes <= s.length_bytes);
  if (s.done_bytes == s.length_bytes) return true;
  status = queue(i);  // short read: ask for the rest
  return !status.is_ok();
}

Result<unsigned> FileReader::poll(int timeout_ms) {
  io_uring* ring = ring_->get();
  io_uring_cqe* cqe = nullptr;
  int rc;
  if (timeout_ms < 0) {
    rc = io_uring_submit_and_wait(ring, in_flight_ > 0 ? 1 : 0);
  } else {
    rc = io_uring_submit(ring);
    if (rc >= 0 && in_flight_ > 0) {
      __kernel_timespec ts{timeout_ms / 1000, (timeout_ms % 1000) * 1000000LL};
      rc = io_uring_wait_cqe_timeout(ring, &cqe, &ts);
      if (rc == -ETIME || rc == -EINTR) rc = 0;
    }
  }
  if (rc < 0) return Status::from_errno(-rc, "io_uring wait on " + path_);
  finished_.clear();
  unsigned head, seen = 0;
  io_uring_for_each_cqe(ring, head, cqe) {
    ++seen;
    unsigned i = static_cast<unsigned>(io_uring_cqe_get_data64(cqe));
    FERRY_ASSERT(i < slots_.size());
    Status st;
    if (complete(i, cqe->res, st)) finished_.emplace_back(i, std::move(st));
  }
  io_uring_cq_advance(ring, seen);
  for (auto& [i, st] : finished_) {
    Done done = std::move(slots_[i].done);
    slots_[i].done = nullptr;
    free_.push_back(i);
    --in_flight_;
    done(std::move(st));
  }
  return static_cast<unsigned>(finished_.size());
}

}  // namespace

Result<std::unique_ptr<BlockReader>> open_file_reader(const std::string& path,
                                                      unsigned queue_depth) {
  return FileReader::open(path, queue_depth);
}

}  // namespace ferry::cbt
