// The real storage: plain syscalls for positional I/O and metadata, io_uring for the
// journal's asynchronous writes (one small ring per file that submits, created on first use).
#include "ferry/site/storage.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "ferry/base/fd.h"
#include "ferry/base/log.h"

namespace ferry::site {
namespace {

// The one place where an errno (from a syscall or a negated io_uring completion) becomes a
// Status for this module: names the operation, the file and the offset.
Status io_status(int err, const char* op, const std::string& path, std::uint64_t offset) {
  if (err < 0) err = -err;
  FERRY_ASSERT(err != 0);
  return Status::from_errno(err, std::string(op) + " " + path + " at offset " +
                                     std::to_string(offset));
}

struct RingDeleter {
  void operator()(io_uring* ring) const {
    io_uring_queue_exit(ring);
    delete ring;
  }
};
using RingPtr = std::unique_ptr<io_uring, RingDeleter>;

Result<RingPtr> make_ring(unsigned depth) {
  auto* raw = new io_uring;
  int rc = io_uring_queue_init(depth, raw, 0);
  if (rc < 0) {
    delete raw;
    return Status::from_errno(-rc, "io_uring_queue_init (depth " + std::to_string(depth) + ")")
        .with_context("io_uring unavailable");
  }
  return RingPtr(raw);
}

class RealFile final : public StorageFile {
 public:
  RealFile(UniqueFd fd, std::string path, bool direct)
      : fd_(std::move(fd)), path_(std::move(path)), direct_(direct) {}
  ~RealFile() override {
    // Never leave the kernel writing from buffers the owner is about to free.
    if (inflight_count_ > 0) (void)wait_writes();
  }

  Status pwrite(const void* buf, std::size_t len, std::uint64_t offset) override {
    check_alignment(buf, len, offset);
    auto* p = static_cast<const char*>(buf);
    while (len > 0) {
      ssize_t w = ::pwrite(fd_.get(), p, len, static_cast<off_t>(offset));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) return io_status(errno, "write", path_, offset);
      if (w == 0) return io_status(EIO, "write (no progress)", path_, offset);
      p += w;
      len -= static_cast<std::size_t>(w);
      offset += static_cast<std::uint64_t>(w);
    }
    return Status::ok();
  }

  Result<std::size_t> pread(void* buf, std::size_t len, std::uint64_t offset) override {
    auto* p = static_cast<char*>(buf);
    std::size_t done = 0;
    while (done < len) {
      ssize_t r = ::pread(fd_.get(), p + done, len - done, static_cast<off_t>(offset + done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return io_status(errno, "read", path_, offset + done);
      if (r == 0) break;  // end of file: the caller sees the short count
      done += static_cast<std::size_t>(r);
    }
    return done;
  }

  Status submit_write(const void* buf, std::size_t len, std::uint64_t offset) override {
    check_alignment(buf, len, offset);
    FERRY_ASSERT(len > 0);
    if (!ring_) {
      FERRY_ASSIGN_OR_RETURN(ring_, make_ring(kRingQueueDepth));
    }
    while (inflight_count_ == kRingQueueDepth) reap_one();
    std::size_t slot = free_slot();
    slots_[slot] = Pending{static_cast<const char*>(buf), len, offset, true};
    ++inflight_count_;
    queue(slot);
    int rc = io_uring_submit(ring_.get());
    if (rc < 0) return io_status(-rc, "io_uring_submit write", path_, offset);
    return Status::ok();
  }

  Status wait_writes() override {
    while (inflight_count_ > 0) reap_one();
    Status s = std::move(first_error_);
    first_error_ = Status::ok();
    return s;
  }

  Status datasync() override {
    FERRY_ASSERT(inflight_count_ == 0);
    if (::fdatasync(fd_.get()) != 0)
      return io_status(errno, "fdatasync", path_, 0).set_data_lost();
    return Status::ok();
  }

  Status truncate(std::uint64_t size) override {
    if (::ftruncate(fd_.get(), static_cast<off_t>(size)) != 0)
      return io_status(errno, "ftruncate", path_, size);
    return Status::ok();
  }

  Status punch_hole(std::uint64_t offset, std::uint64_t len) override {
    int rc = ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                         static_cast<off_t>(offset), static_cast<off_t>(len));
    if (rc == 0) return Status::ok();
    if (errno != EOPNOTSUPP) return io_status(errno, "punch hole", path_, offset);
    return write_zeros(offset, len);  // file systems without hole punching
  }

  Result<std::uint64_t> size() override {
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) return io_status(errno, "fstat", path_, 0);
    return static_cast<std::uint64_t>(st.st_size);
  }

  bool is_direct() const override { return direct_; }

  Result<DataRun> next_data(std::uint64_t offset) override {
    off_t d = ::lseek(fd_.get(), static_cast<off_t>(offset), SEEK_DATA);
    if (d < 0 && errno == ENXIO) return DataRun{offset, offset};
    if (d < 0 && errno == EINVAL) {  // a file system without SEEK_DATA: all data
      FERRY_ASSIGN_OR_RETURN(std::uint64_t n, size());
      return offset < n ? DataRun{offset, n} : DataRun{offset, offset};
    }
    if (d < 0) return io_status(errno, "SEEK_DATA", path_, offset);
    off_t h = ::lseek(fd_.get(), d, SEEK_HOLE);
    if (h < 0) return io_status(errno, "SEEK_HOLE", path_, static_cast<std::uint64_t>(d));
    return DataRun{static_cast<std::uint64_t>(d), static_cast<std::uint64_t>(h)};
  }

 private:
  struct Pending {
    const char* buf = nullptr;
    std::size_t len = 0;
    std::uint64_t offset = 0;
    bool used = false;
  };

  void check_alignment(const void* buf, std::size_t len, std::uint64_t offset) const {
    if (!direct_) return;
    FERRY_ASSERT(reinterpret_cast<std::uintptr_t>(buf) % kDirectAlignBytes == 0);
    FERRY_ASSERT(len % kDirectAlignBytes == 0 && offset % kDirectAlignBytes == 0);
  }

  std::size_t free_slot() const {
    for (std::size_t i = 0; i < slots_.size(); ++i)
      if (!slots_[i].used) return i;
    FERRY_ASSERT_MSG(false, "no free io_uring slot below the queue depth");
    return 0;
  }

  void queue(std::size_t slot) {
    io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());
    FERRY_ASSERT(sqe != nullptr);  // inflight_count_ <= depth guarantees a free SQE
    const Pending& p = slots_[slot];
    io_uring_prep_write(sqe, fd_.get(), p.buf, static_cast<unsigned>(p.len), p.offset);
    io_uring_sqe_set_data64(sqe, slot);
  }

  // The completion loop: short writes and -EAGAIN are resubmitted for the remainder, every
  // other failure is kept (the first one) for wait_writes().
  void reap_one() {
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(ring_.get(), &cqe);
    if (rc == -EINTR) return;
    FERRY_ASSERT_MSG(rc == 0, "io_uring_wait_cqe failed with writes in flight");
    std::size_t slot = io_uring_cqe_get_data64(cqe);
    int res = cqe->res;
    io_uring_cqe_seen(ring_.get(), cqe);
    FERRY_ASSERT(slot < slots_.size() && slots_[slot].used);
    Pending& p = slots_[slot];
    if (res == -EAGAIN || res == -EINTR || (res > 0 && static_cast<std::size_t>(res) < p.len)) {
      if (res > 0) {
        p.buf += res;
        p.len -= static_cast<std::size_t>(res);
        p.offset += static_cast<std::uint64_t>(res);
      }
      queue(slot);
      int s = io_uring_submit(ring_.get());
      if (s >= 0) return;
      res = s;
    }
    if (res <= 0 && first_error_.is_ok())
      first_error_ = io_status(res == 0 ? EIO : -res, "write", path_, p.offset);
    p.used = false;
    --inflight_count_;
  }

  Status write_zeros(std::uint64_t offset, std::uint64_t len) {
    static const std::array<char, 65536> kZeros{};
    while (len > 0) {
      std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(len, kZeros.size()));
      FERRY_TRY(pwrite(kZeros.data(), n, offset));
      offset += n;
      len -= n;
    }
    return Status::ok();
  }

  UniqueFd fd_;
  std::string path_;
  bool direct_;
  RingPtr ring_;
  std::array<Pending, kRingQueueDepth> slots_{};
  unsigned inflight_count_ = 0;
  Status first_error_;
};

class RealStorage final : public Storage {
 public:
  Result<std::unique_ptr<StorageFile>> open(const std::string& path, OpenFlags flags) override {
    int base = O_CLOEXEC | (flags.read_only ? O_RDONLY : O_RDWR) | (flags.create ? O_CREAT : 0);
    bool direct = flags.direct;
    int fd = ::open(path.c_str(), base | (direct ? O_DIRECT : 0), 0644);
    if (fd < 0 && direct && errno == EINVAL) {
      direct = false;  // tmpfs and friends refuse O_DIRECT; the caller sees is_direct()
      fd = ::open(path.c_str(), base, 0644);
    }
    if (fd < 0) return Status::from_errno(errno, "open " + path);
    return std::unique_ptr<StorageFile>(new RealFile(UniqueFd(fd), path, direct));
  }

  Status remove(const std::string& path) override {
    if (::unlink(path.c_str()) == 0) return Status::ok();
    if (errno == EISDIR && ::rmdir(path.c_str()) == 0) return Status::ok();  // an empty directory
    return Status::from_errno(errno, "remove " + path);
  }

  Status rename(const std::string& from, const std::string& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0)
      return Status::from_errno(errno, "rename " + from + " to " + to);
    return Status::ok();
  }

  Status sync_dir(const std::string& dir) override {
    UniqueFd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!d.valid()) return Status::from_errno(errno, "open directory " + dir);
    if (::fsync(d.get()) != 0)
      return Status::from_errno(errno, "fsync directory " + dir).set_data_lost();
    return Status::ok();
  }

  Status make_dirs(const std::string& dir) override { return ferry::make_dirs(dir); }

  Result<std::vector<std::string>> list_dir(const std::string& dir) override {
    std::error_code ec;
    std::vector<std::string> names;
    for (std::filesystem::directory_iterator it(dir, ec), end; !ec && it != end;
         it.increment(ec))
      names.push_back(it->path().filename().string());
    if (ec) return Status::from_errno(ec.value(), "list directory " + dir);
    return names;
  }

  bool exists(const std::string& path) override {
    struct stat st {};
    return ::stat(path.c_str(), &st) == 0;
  }
};

Status probe_once() {
  io_uring ring{};
  int rc = io_uring_queue_init(4, &ring, 0);
  if (rc < 0)
    return Status::from_errno(-rc, "io_uring_setup failed (needs Linux >= 5.6, not disabled "
                                   "by sysctl kernel.io_uring_disabled or seccomp)")
        .with_context("io_uring probe");
  io_uring_probe* probe = io_uring_get_probe_ring(&ring);
  bool write_ok = probe != nullptr && io_uring_opcode_supported(probe, IORING_OP_WRITE);
  if (probe) io_uring_free_probe(probe);
  io_uring_queue_exit(&ring);
  if (!write_ok)
    return Status::error(Errc::unsupported,
                         "io_uring probe: the kernel lacks IORING_OP_WRITE (needs Linux >= 5.6)");
  return Status::ok();
}

}  // namespace

Status probe_io_uring() {
  static const Status result = probe_once();
  return result;
}

std::shared_ptr<Storage> real_storage() {
  static const std::shared_ptr<Storage> storage = std::make_shared<RealStorage>();
  return storage;
}

}  // namespace ferry::site
