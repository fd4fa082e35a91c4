#include "ferry/site/faulty_storage.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <random>

#include "ferry/base/fd.h"

namespace ferry::site {
namespace {

constexpr std::size_t kSectorBytes = 512;
constexpr std::uint64_t kPageBytes = 4096;  // the page cache's grain: what writeback loses

// One file as the twin knows it, by inode: a raw descriptor lets the power cut undo and
// redo writes whatever name the file has by then.
struct FileRec {
  UniqueFd raw;
  std::string path;
};

enum class OpType : std::uint8_t { write, truncate, punch, create, rename };

struct PendingOp {
  OpType type = OpType::write;
  std::shared_ptr<FileRec> file;  // data ops
  std::uint64_t offset = 0;
  std::string data;               // write: the new bytes
  std::string old;                // bytes the op replaced (inside the old size)
  // punch, truncate: the data runs the range (cut off) held, as (offset, bytes); its holes
  // stay holes. A zero range of the journal, or a sparse image, may cover gigabytes, nearly
  // all of them holes.
  std::vector<std::pair<std::uint64_t, std::string>> old_runs;
  std::uint64_t old_size = 0;
  std::uint64_t new_size = 0;
  std::string from, to, backup, dir;  // create/rename
};

std::string parent_of(const std::string& path) {
  return std::filesystem::path(path).parent_path().string();
}

std::uint64_t fd_size(int fd) {
  struct stat st {};
  FERRY_ASSERT(::fstat(fd, &st) == 0);
  return static_cast<std::uint64_t>(st.st_size);
}

std::string read_range(int fd, std::uint64_t offset, std::uint64_t len) {
  std::string out(len, '\0');
  ssize_t r = len ? ::pread(fd, out.data(), len, static_cast<off_t>(offset)) : 0;
  FERRY_ASSERT(r >= 0);
  out.resize(static_cast<std::size_t>(r));
  return out;
}

void write_range(int fd, const std::string& data, std::uint64_t offset) {
  if (data.empty()) return;
  ssize_t w = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
  FERRY_ASSERT(w == static_cast<ssize_t>(data.size()));
}

// The data runs of [offset, offset + len) (SEEK_DATA/SEEK_HOLE), with their bytes.
std::vector<std::pair<std::uint64_t, std::string>> read_data_runs(int fd, std::uint64_t offset,
                                                                  std::uint64_t len) {
  std::vector<std::pair<std::uint64_t, std::string>> runs;
  const std::uint64_t end = std::min(offset + len, fd_size(fd));
  for (std::uint64_t at = offset; at < end;) {
    off_t d = ::lseek(fd, static_cast<off_t>(at), SEEK_DATA);
    if (d < 0 || static_cast<std::uint64_t>(d) >= end) break;  // ENXIO: no data after `at`
    off_t h = ::lseek(fd, d, SEEK_HOLE);
    FERRY_ASSERT(h > d);
    const std::uint64_t run_end = std::min<std::uint64_t>(static_cast<std::uint64_t>(h), end);
    runs.emplace_back(d, read_range(fd, static_cast<std::uint64_t>(d),
                                    run_end - static_cast<std::uint64_t>(d)));
    at = run_end;
  }
  return runs;
}

// Zeros over a punched range's old data runs (a hole where the file system can).
void punch_runs(int fd, const std::vector<std::pair<std::uint64_t, std::string>>& runs) {
  for (const auto& [at, bytes] : runs)
    if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(at),
                    static_cast<off_t>(bytes.size())) != 0)
      write_range(fd, std::string(bytes.size(), '\0'), at);
}

// Undoes one op on an in-memory copy of its file.
void undo_in_memory(std::string& d, const PendingOp& op) {
  auto put_old = [&](std::uint64_t at) {
    if (op.old.empty()) return;
    if (d.size() < at + op.old.size()) d.resize(at + op.old.size(), '\0');
    d.replace(at, op.old.size(), op.old);
  };
  auto put_runs = [&] {
    for (const auto& [at, bytes] : op.old_runs) {
      if (d.size() < at + bytes.size()) d.resize(at + bytes.size(), '\0');
      d.replace(at, bytes.size(), bytes);
    }
  };
  if (op.type == OpType::truncate) {
    d.resize(op.old_size, '\0');
    put_runs();
  } else if (op.type == OpType::punch) {
    put_runs();
    d.resize(op.old_size, '\0');
  } else {
    put_old(op.offset);
    d.resize(op.old_size, '\0');
  }
}

// The pages [first, last) an op dirties; empty for ops without a file.
std::pair<std::uint64_t, std::uint64_t> pages_of(const PendingOp& op) {
  if (!op.file) return {0, 0};
  if (op.type == OpType::truncate) {
    std::uint64_t lo = std::min(op.old_size, op.new_size);
    return {lo / kPageBytes, UINT64_MAX};  // the page at the new end and all after it
  }
  if (op.type == OpType::punch) {  // the pages that held data: the rest were holes and stay so
    if (op.old_runs.empty()) return {0, 0};
    const auto& last = op.old_runs.back();
    return {op.old_runs.front().first / kPageBytes,
            (last.first + last.second.size() + kPageBytes - 1) / kPageBytes};
  }
  std::uint64_t len = op.type == OpType::write ? op.data.size() : op.old.size();
  if (len == 0) return {0, 0};
  return {op.offset / kPageBytes, (op.offset + len + kPageBytes - 1) / kPageBytes};
}

}  // namespace

struct FaultyStorage::Twin {
  std::shared_ptr<Storage> inner;
  FaultPlan plan;
  std::mt19937_64 rng;
  std::vector<std::uint64_t> rule_hits;
  std::map<std::pair<dev_t, ino_t>, std::shared_ptr<FileRec>> files;
  std::vector<PendingOp> pending;
  // Pages whose writeback failed (a failed datasync): Linux marks them clean, so reads still
  // return the new bytes while the disk keeps the old ones, and a later successful sync does
  // not write them (unless they are dirtied again). A power cut brings the old bytes back.
  struct LostFile {
    std::map<std::uint64_t, std::string> pages;  // page -> durable bytes (zeros past the end)
    std::uint64_t durable_size = 0;
  };
  std::map<std::shared_ptr<FileRec>, LostFile> lost;
  std::uint64_t mutating = 0;
  std::uint64_t injected = 0;
  std::uint64_t backups = 0;
  bool power_off = false;

  // Counts the operation and decides its fate: the power is off, or a rule fires.
  Status check(FaultOp op, bool mutating_op, const std::string& path) {
    if (power_off) return Status::from_errno(EIO, "power is off (simulated) at " + path);
    if (mutating_op && plan.power_off_after_ops > 0 && ++mutating > plan.power_off_after_ops) {
      power_off = true;
      return Status::from_errno(EIO, "power is off (simulated) at " + path);
    }
    if (mutating_op && plan.power_off_after_ops == 0) ++mutating;
    for (std::size_t i = 0; i < plan.rules.size(); ++i) {
      const FaultRule& r = plan.rules[i];
      if (r.op != op || path.find(r.path_contains) == std::string::npos) continue;
      std::uint64_t n = ++rule_hits[i];
      if (n == r.nth || (r.persistent && n > r.nth)) {
        ++injected;
        Status s = Status::from_errno(r.error, "injected fault at " + path);
        return op == FaultOp::sync ? std::move(s.set_data_lost()) : s;
      }
    }
    return Status::ok();
  }

  Result<std::shared_ptr<FileRec>> rec_for(const std::string& path) {
    UniqueFd raw(::open(path.c_str(), O_RDWR | O_CLOEXEC));
    if (!raw.valid()) raw.reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!raw.valid()) return Status::from_errno(errno, "faulty twin: open " + path);
    struct stat st {};
    if (::fstat(raw.get(), &st) != 0) return Status::from_errno(errno, "fstat " + path);
    auto key = std::make_pair(st.st_dev, st.st_ino);
    auto& slot = files[key];
    if (!slot) slot = std::make_shared<FileRec>(FileRec{std::move(raw), path});
    return slot;
  }

  void note_write(const std::shared_ptr<FileRec>& f, const void* buf, std::size_t len,
                  std::uint64_t offset) {
    if (!plan.track_unsynced) return;
    PendingOp op;
    op.type = OpType::write;
    op.file = f;
    op.offset = offset;
    op.data.assign(static_cast<const char*>(buf), len);
    op.old_size = fd_size(f->raw.get());
    if (offset < op.old_size)
      op.old = read_range(f->raw.get(), offset, std::min<std::uint64_t>(len, op.old_size - offset));
    op.new_size = std::max<std::uint64_t>(op.old_size, offset + len);
    pending.push_back(std::move(op));
  }

  void note_truncate(const std::shared_ptr<FileRec>& f, std::uint64_t size) {
    if (!plan.track_unsynced) return;
    PendingOp op;
    op.type = OpType::truncate;
    op.file = f;
    op.old_size = fd_size(f->raw.get());
    op.new_size = size;
    if (size < op.old_size) op.old_runs = read_data_runs(f->raw.get(), size, op.old_size - size);
    op.offset = size;
    pending.push_back(std::move(op));
  }

  void note_punch(const std::shared_ptr<FileRec>& f, std::uint64_t offset, std::uint64_t len) {
    if (!plan.track_unsynced) return;
    PendingOp op;
    op.type = OpType::punch;
    op.file = f;
    op.offset = offset;
    op.old_size = op.new_size = fd_size(f->raw.get());
    op.old_runs = read_data_runs(f->raw.get(), offset, len);
    pending.push_back(std::move(op));
  }

  void synced_file(const std::shared_ptr<FileRec>& f) {
    auto it = lost.find(f);
    if (it != lost.end()) {
      for (const auto& op : pending)
        if (op.file == f) forget_pages(it->second, op);
      std::uint64_t size = fd_size(f->raw.get());
      it->second.durable_size = size;
      it->second.pages.erase(it->second.pages.lower_bound((size + kPageBytes - 1) / kPageBytes),
                             it->second.pages.end());
      if (it->second.pages.empty()) lost.erase(it);
    }
    std::erase_if(pending, [&](const PendingOp& op) { return op.file == f; });
  }

  // A page dirtied again is written whole by the next writeback that succeeds (or lands at
  // a power cut): it is no longer lost.
  static void forget_pages(LostFile& lf, const PendingOp& op) {
    auto [first, last] = pages_of(op);
    if (first >= last) return;
    lf.pages.erase(lf.pages.lower_bound(first), lf.pages.lower_bound(last));
  }

  // A datasync of `f` failed: its unsynced writes are lost for good (see `lost`).
  void lose_unsynced(const std::shared_ptr<FileRec>& f) {
    if (!plan.track_unsynced) return;
    std::vector<PendingOp> ops, rest;
    for (auto& op : pending) (op.file == f ? ops : rest).push_back(std::move(op));
    pending = std::move(rest);
    if (ops.empty()) return;
    int fd = f->raw.get();
    std::string durable = read_range(fd, 0, fd_size(fd));
    for (std::size_t i = ops.size(); i-- > 0;) undo_in_memory(durable, ops[i]);
    bool known = lost.count(f) != 0;
    LostFile& lf = lost[f];
    if (!known) lf.durable_size = durable.size();
    std::uint64_t end_page = std::max<std::uint64_t>(fd_size(fd), durable.size());
    end_page = (end_page + kPageBytes - 1) / kPageBytes;
    for (const auto& op : ops) {
      auto [first, last] = pages_of(op);
      for (std::uint64_t p = first; p < std::min(last, end_page); ++p) {
        if (lf.pages.count(p)) continue;  // lost earlier: its durable bytes are older still
        std::string page(kPageBytes, '\0');
        if (p * kPageBytes < durable.size())
          page.replace(0, std::min<std::uint64_t>(kPageBytes, durable.size() - p * kPageBytes),
                       durable, p * kPageBytes, kPageBytes);
        lf.pages[p] = std::move(page);
      }
    }
    if (lf.pages.empty()) lost.erase(f);
  }

  // At a power cut: the lost pages get their durable bytes back, unless a kept op dirtied
  // them again.
  void restore_lost(std::size_t keep) {
    for (auto& [f, lf] : lost) {
      bool touched = false;
      for (std::size_t i = 0; i < keep && i < pending.size(); ++i)
        if (pending[i].file == f) {
          forget_pages(lf, pending[i]);
          touched = true;
        }
      int fd = f->raw.get();
      std::uint64_t size = fd_size(fd);
      if (!touched && lf.durable_size > size) {  // a lost truncate: the old end comes back
        FERRY_ASSERT(::ftruncate(fd, static_cast<off_t>(lf.durable_size)) == 0);
        size = lf.durable_size;
      }
      for (const auto& [p, bytes] : lf.pages) {
        if (p * kPageBytes >= size) break;
        write_range(fd, bytes.substr(0, std::min<std::uint64_t>(kPageBytes, size - p * kPageBytes)),
                    p * kPageBytes);
      }
    }
    lost.clear();
  }

  void synced_dir(const std::string& dir) {
    std::erase_if(pending, [&](const PendingOp& op) {
      bool covered = !op.file && op.dir == dir;
      if (covered && !op.backup.empty()) ::unlink(op.backup.c_str());
      return covered;
    });
  }

  // --- the power cut ---

  void undo(const PendingOp& op) {
    int fd = op.file ? op.file->raw.get() : -1;
    switch (op.type) {
      case OpType::write:
        write_range(fd, op.old, op.offset);
        FERRY_ASSERT(::ftruncate(fd, static_cast<off_t>(op.old_size)) == 0);
        break;
      case OpType::punch:
        for (const auto& [at, bytes] : op.old_runs) write_range(fd, bytes, at);
        FERRY_ASSERT(::ftruncate(fd, static_cast<off_t>(op.old_size)) == 0);
        break;
      case OpType::truncate:
        FERRY_ASSERT(::ftruncate(fd, static_cast<off_t>(op.old_size)) == 0);
        for (const auto& [at, bytes] : op.old_runs) write_range(fd, bytes, at);
        break;
      case OpType::create: (void)::unlink(op.to.c_str()); break;
      case OpType::rename:
        (void)::rename(op.to.c_str(), op.from.c_str());
        if (!op.backup.empty()) (void)::rename(op.backup.c_str(), op.to.c_str());
        break;
    }
  }

  void redo(const PendingOp& op) {
    int fd = op.file ? op.file->raw.get() : -1;
    switch (op.type) {
      case OpType::write: write_range(fd, op.data, op.offset); break;
      case OpType::punch: punch_runs(fd, op.old_runs); break;
      case OpType::truncate:
        FERRY_ASSERT(::ftruncate(fd, static_cast<off_t>(op.new_size)) == 0);
        break;
      case OpType::create:
      case OpType::rename: break;  // still in place: only undone ones are touched
    }
  }

  void tear(const PendingOp& op) {
    for (std::size_t s = 0; s < op.data.size(); s += kSectorBytes)
      if (rng() & 1)
        write_range(op.file->raw.get(), op.data.substr(s, kSectorBytes), op.offset + s);
  }

  void misdirect(const PendingOp& op, std::size_t self) {
    std::vector<std::uint64_t> targets;
    for (std::size_t i = 0; i < pending.size(); ++i)
      if (i != self && pending[i].type == OpType::write && pending[i].file == op.file &&
          pending[i].offset != op.offset)
        targets.push_back(pending[i].offset);
    std::uint64_t target = targets.empty() ? op.offset + 4096 : targets[rng() % targets.size()];
    write_range(op.file->raw.get(), op.data, target);
  }

  void cut(std::size_t keep, CutMode mode) {
    for (std::size_t i = pending.size(); i-- > 0;)
      if (pending[i].file) undo(pending[i]);
    for (std::size_t i = 0; i < keep && i < pending.size(); ++i)
      if (pending[i].file) redo(pending[i]);
    if (keep < pending.size() && pending[keep].type == OpType::write) {
      if (mode == CutMode::tear) tear(pending[keep]);
      if (mode == CutMode::misdirect) misdirect(pending[keep], keep);
    }
    restore_lost(keep);
    for (std::size_t i = pending.size(); i-- > keep;)
      if (!pending[i].file) undo(pending[i]);
    for (std::size_t i = 0; i < keep && i < pending.size(); ++i)
      if (!pending[i].backup.empty()) ::unlink(pending[i].backup.c_str());
    pending.clear();
  }
};

namespace {

class FaultyFile final : public StorageFile {
 public:
  FaultyFile(std::shared_ptr<FaultyStorage::Twin> twin, std::unique_ptr<StorageFile> inner,
             std::shared_ptr<FileRec> rec, std::string path)
      : twin_(std::move(twin)), inner_(std::move(inner)), rec_(std::move(rec)),
        path_(std::move(path)) {}

  Status pwrite(const void* buf, std::size_t len, std::uint64_t offset) override {
    FERRY_TRY(twin_->check(FaultOp::write, true, path_));
    twin_->note_write(rec_, buf, len, offset);
    return inner_->pwrite(buf, len, offset);
  }
  Result<std::size_t> pread(void* buf, std::size_t len, std::uint64_t offset) override {
    FERRY_TRY(twin_->check(FaultOp::read, false, path_));
    return inner_->pread(buf, len, offset);
  }
  // With the power-cut model the write is done at once (its old bytes must be read first);
  // otherwise it goes to the inner ring. An injected failure shows at wait_writes().
  Status submit_write(const void* buf, std::size_t len, std::uint64_t offset) override {
    Status s = twin_->check(FaultOp::write, true, path_);
    if (!s.is_ok()) {
      if (deferred_.is_ok()) deferred_ = s;
      return Status::ok();
    }
    if (!twin_->plan.track_unsynced) return inner_->submit_write(buf, len, offset);
    twin_->note_write(rec_, buf, len, offset);
    Status w = inner_->pwrite(buf, len, offset);
    if (!w.is_ok() && deferred_.is_ok()) deferred_ = w;
    return Status::ok();
  }
  Status wait_writes() override {
    Status inner = inner_->wait_writes();
    Status s = std::move(deferred_);
    deferred_ = Status::ok();
    return s.is_ok() ? inner : s;
  }
  Status datasync() override {
    Status s = twin_->check(FaultOp::sync, true, path_);
    if (!s.is_ok()) {
      // An injected failure loses the unsynced pages for good; with the power off, the power
      // cut decides what landed.
      if (!twin_->power_off) twin_->lose_unsynced(rec_);
      return s;
    }
    if (!twin_->plan.skip_inner_sync) FERRY_TRY(inner_->datasync());
    twin_->synced_file(rec_);
    return Status::ok();
  }
  Status truncate(std::uint64_t size) override {
    FERRY_TRY(twin_->check(FaultOp::write, true, path_));
    twin_->note_truncate(rec_, size);
    return inner_->truncate(size);
  }
  Status punch_hole(std::uint64_t offset, std::uint64_t len) override {
    FERRY_TRY(twin_->check(FaultOp::write, true, path_));
    twin_->note_punch(rec_, offset, len);
    return inner_->punch_hole(offset, len);
  }
  Result<std::uint64_t> size() override {
    FERRY_TRY(twin_->check(FaultOp::read, false, path_));
    return inner_->size();
  }
  bool is_direct() const override { return inner_->is_direct(); }
  Result<DataRun> next_data(std::uint64_t offset) override {
    FERRY_TRY(twin_->check(FaultOp::read, false, path_));
    return inner_->next_data(offset);
  }

 private:
  std::shared_ptr<FaultyStorage::Twin> twin_;
  std::unique_ptr<StorageFile> inner_;
  std::shared_ptr<FileRec> rec_;
  std::string path_;
  Status deferred_;
};

}  // namespace

std::shared_ptr<FaultyStorage> FaultyStorage::create(std::shared_ptr<Storage> inner,
                                                     std::uint64_t seed, FaultPlan plan) {
  FERRY_ASSERT(inner != nullptr);
  FERRY_ASSERT(!plan.skip_inner_sync || plan.track_unsynced);
  auto twin = std::make_shared<Twin>();
  twin->inner = std::move(inner);
  twin->rng.seed(seed);
  twin->rule_hits.assign(plan.rules.size(), 0);
  twin->plan = std::move(plan);
  return std::shared_ptr<FaultyStorage>(new FaultyStorage(std::move(twin)));
}

FaultyStorage::~FaultyStorage() = default;

Result<std::unique_ptr<StorageFile>> FaultyStorage::open(const std::string& path,
                                                         OpenFlags flags) {
  bool creating = flags.create && !twin_->inner->exists(path);
  FERRY_TRY(twin_->check(creating ? FaultOp::write : FaultOp::read, creating, path));
  FERRY_ASSIGN_OR_RETURN(auto inner, twin_->inner->open(path, flags));
  FERRY_ASSIGN_OR_RETURN(auto rec, twin_->rec_for(path));
  if (creating && twin_->plan.track_unsynced) {
    PendingOp op;
    op.type = OpType::create;
    op.to = path;
    op.dir = parent_of(path);
    twin_->pending.push_back(std::move(op));
  }
  return std::unique_ptr<StorageFile>(
      new FaultyFile(twin_, std::move(inner), std::move(rec), path));
}

Status FaultyStorage::remove(const std::string& path) {
  FERRY_TRY(twin_->check(FaultOp::write, true, path));
  std::erase_if(twin_->pending, [&](const PendingOp& op) {
    return op.type == OpType::create && op.to == path;
  });
  return twin_->inner->remove(path);
}

Status FaultyStorage::rename(const std::string& from, const std::string& to) {
  FERRY_TRY(twin_->check(FaultOp::write, true, to));
  PendingOp op;
  op.type = OpType::rename;
  op.from = from;
  op.to = to;
  op.dir = parent_of(to);
  if (twin_->plan.track_unsynced && twin_->inner->exists(to)) {
    op.backup = to + ".faulty-bak-" + std::to_string(++twin_->backups);
    if (::link(to.c_str(), op.backup.c_str()) != 0)
      return Status::from_errno(errno, "faulty twin: keep old " + to);
  }
  Status s = twin_->inner->rename(from, to);
  if (!s.is_ok()) {
    if (!op.backup.empty()) ::unlink(op.backup.c_str());
    return s;
  }
  if (twin_->plan.track_unsynced) twin_->pending.push_back(std::move(op));
  return Status::ok();
}

Status FaultyStorage::sync_dir(const std::string& dir) {
  FERRY_TRY(twin_->check(FaultOp::sync, true, dir));
  if (!twin_->plan.skip_inner_sync) FERRY_TRY(twin_->inner->sync_dir(dir));
  twin_->synced_dir(dir);
  return Status::ok();
}

Status FaultyStorage::make_dirs(const std::string& dir) {
  FERRY_TRY(twin_->check(FaultOp::write, false, dir));
  return twin_->inner->make_dirs(dir);  // directories themselves are taken as durable
}

Result<std::vector<std::string>> FaultyStorage::list_dir(const std::string& dir) {
  FERRY_TRY(twin_->check(FaultOp::read, false, dir));
  FERRY_ASSIGN_OR_RETURN(auto names, twin_->inner->list_dir(dir));
  std::erase_if(names, [](const std::string& n) {
    return n.find(".faulty-bak-") != std::string::npos;
  });
  return names;
}

bool FaultyStorage::exists(const std::string& path) { return twin_->inner->exists(path); }

std::size_t FaultyStorage::unsynced_ops() const { return twin_->pending.size(); }
std::uint64_t FaultyStorage::mutating_ops() const { return twin_->mutating; }
std::uint64_t FaultyStorage::faults_injected() const { return twin_->injected; }
bool FaultyStorage::power_is_off() const { return twin_->power_off; }

Status FaultyStorage::power_cut(std::size_t keep, CutMode mode) {
  FERRY_ASSERT(twin_->plan.track_unsynced);
  FERRY_ASSERT(keep <= twin_->pending.size());
  twin_->cut(keep, mode);
  twin_->power_off = false;
  twin_->plan.power_off_after_ops = 0;
  return Status::ok();
}

}  // namespace ferry::site
