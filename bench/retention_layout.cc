// retention-layout: three on-disk layouts for bounded RP retention, measured on real files
// (docs/benchmarks.md, "Retention layout candidates"):
//   A  newest image + before-images: apply reads each changed block's old bytes into an undo
//      log, then writes the image; the applied RP's journal segment is deleted.
//   B  lagging base + forward deltas: ingest only journals (a segment per RP); pruning the
//      oldest RP compacts the next delta into the base image.
//   C  today: journal + apply into the newest image, every RP kept.
// Same disk, seeded RPs and I/O paths for all three: logs (journal, undo) are appended like the
// store's journal (io_uring, O_DIRECT where allowed, 8 MiB batches, fdatasync, directory fsync
// for a new file); the image is written like its apply (buffered pwrite, fdatasync), then its
// pages are dropped from the cache (a site holds far more than its RAM). Every read is checked
// against the seeded model. Options and defaults: bench/retention-layout.
#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "ferry/base/fd.h"
#include "ferry/base/hash.h"
#include "ferry/base/status.h"

namespace {
using ferry::UniqueFd;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

constexpr std::size_t kAlignBytes = 4096;          // O_DIRECT buffer, offset and length
constexpr std::size_t kBatchBytes = 8u << 20;      // the journal's batch (16 MiB in flight / 2)
constexpr std::size_t kReadWindowBytes = 4u << 20; // base/image read per request on a read
constexpr std::uint32_t kRecordMagic = 0x4C525246; // "FRRL"
enum class Codec : std::uint32_t { raw = 0, zstd = 1 };
// A log record: this header then the payload, packed (the store's is 96 bytes).
struct RecordHeader {
  std::uint32_t magic;
  Codec codec;
  std::uint64_t block_index;
  std::uint32_t payload_bytes, decoded_bytes;
  std::uint64_t payload_xxh3;
};
static_assert(sizeof(RecordHeader) == 32);

[[noreturn]] void die(const std::string& what, int err = errno) {
  std::fprintf(stderr, "retention-layout: %s: %s\n", what.c_str(), std::strerror(err));
  std::exit(1);
}
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
void sync_dir(const std::string& dir) {
  UniqueFd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!d.valid() || ::fsync(d.get()) != 0) die("fsync directory " + dir);
}

// Whole-buffer positional I/O (buffered files: short counts are possible, EINTR too).
void full_io(bool write, int fd, void* buf, std::size_t len, std::uint64_t off) {
  auto* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = write ? ::pwrite(fd, p, len, off_t(off)) : ::pread(fd, p, len, off_t(off));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (n == 0 && write)) die((write ? "pwrite at " : "pread at ") + std::to_string(off));
    if (n == 0) return std::memset(p, 0, len), void();  // past the end: zeros
    p += n, len -= std::size_t(n), off += std::uint64_t(n);
  }
}
void datasync(int fd, const std::string& what) {
  if (::fdatasync(fd) != 0) die("fdatasync " + what);
}
void drop_cache(int fd) { (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED); }
std::uint64_t allocated_bytes(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) die("stat " + path);
  return std::uint64_t(st.st_blocks) * 512;
}
using AlignedBuf = std::unique_ptr<char, decltype(&std::free)>;
AlignedBuf aligned(std::size_t bytes) {
  return AlignedBuf(static_cast<char*>(std::aligned_alloc(kAlignBytes, bytes)), &std::free);
}

// An append-only log written like the journal: records packed into one of two aligned
// batches, the aligned prefix of a full batch written with io_uring while the other fills,
// the tail zero-padded at commit, then fdatasync. Written once (one RP), then only read.
class AppendLog {
 public:
  explicit AppendLog(std::string path) : path_(std::move(path)) {
    int flags = O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC;
    fd_.reset(::open(path_.c_str(), flags | O_DIRECT, 0600));
    direct_ = fd_.valid();
    if (!direct_ && errno == EINVAL) fd_.reset(::open(path_.c_str(), flags, 0600));
    if (!fd_.valid()) die("open " + path_);
    read_fd_.reset(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));  // the reader is buffered
    if (!read_fd_.valid()) die("open " + path_);
    if (int rc = io_uring_queue_init(4, &ring_, 0); rc < 0) die("io_uring_queue_init", -rc);
    FERRY_ASSERT(buf_[0] && buf_[1]);
  }
  ~AppendLog() { io_uring_queue_exit(&ring_); }  // not copyable: it owns buffers
  // Returns the record's offset in the file.
  std::uint64_t append(RecordHeader h, const void* payload) {
    h.payload_xxh3 = ferry::xxh3_64(payload, h.payload_bytes);
    const std::size_t total = sizeof h + h.payload_bytes;
    FERRY_ASSERT(total + kAlignBytes <= kBatchBytes);
    if (used_ + total > kBatchBytes) submit_aligned_prefix();
    const std::uint64_t at = file_offset_ + used_;
    std::memcpy(buf_[cur_].get() + used_, &h, sizeof h);
    std::memcpy(buf_[cur_].get() + used_ + sizeof h, payload, h.payload_bytes);
    used_ += total;
    return at;
  }
  void commit() {
    const std::size_t padded = (used_ + kAlignBytes - 1) / kAlignBytes * kAlignBytes;
    std::memset(buf_[cur_].get() + used_, 0, padded - used_);
    wait_write();
    submit(buf_[cur_].get(), padded);
    wait_write();
    datasync(fd_.get(), path_);
    file_offset_ += padded;
    used_ = 0;
  }
  // Reads and checks one record; decodes its payload into `out` (decoded_bytes long).
  void read_record(std::uint64_t at, std::vector<char>& scratch, char* out) const {
    RecordHeader h;
    full_io(false, read_fd_.get(), &h, sizeof h, at);
    FERRY_ASSERT_MSG(h.magic == kRecordMagic, "bad record magic");
    scratch.resize(h.payload_bytes);
    full_io(false, read_fd_.get(), scratch.data(), h.payload_bytes, at + sizeof h);
    FERRY_ASSERT_MSG(ferry::xxh3_64(scratch.data(), h.payload_bytes) == h.payload_xxh3,
                     "record checksum mismatch");
    std::size_t n = h.codec == Codec::raw
                        ? (std::memcpy(out, scratch.data(), h.payload_bytes), h.payload_bytes)
                        : ZSTD_decompress(out, h.decoded_bytes, scratch.data(), h.payload_bytes);
    FERRY_ASSERT_MSG(!ZSTD_isError(n) && n == h.decoded_bytes, "payload does not decode");
  }
  void drop_cache() const { ::drop_cache(read_fd_.get()); }
  const std::string& path() const { return path_; }
  std::uint64_t bytes_written() const { return file_offset_; }
  bool direct() const { return direct_; }
 private:
  void submit(const char* p, std::size_t len) {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    FERRY_ASSERT(sqe != nullptr);
    io_uring_prep_write(sqe, fd_.get(), p, unsigned(len), file_offset_);
    if (int rc = io_uring_submit(&ring_); rc < 0) die("io_uring_submit " + path_, -rc);
    inflight_bytes_ = len;
  }
  void wait_write() {
    if (inflight_bytes_ == 0) return;
    io_uring_cqe* cqe = nullptr;
    if (int rc = io_uring_wait_cqe(&ring_, &cqe); rc < 0) die("io_uring_wait_cqe", -rc);
    const int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    if (res < 0) die("write " + path_, -res);
    FERRY_ASSERT_MSG(std::size_t(res) == inflight_bytes_, "short log write");  // not resubmitted
    inflight_bytes_ = 0;
  }
  void submit_aligned_prefix() {
    const std::size_t aligned_len = used_ / kAlignBytes * kAlignBytes;
    wait_write();  // the other batch must be free before it takes the tail
    submit(buf_[cur_].get(), aligned_len);
    const int other = 1 - cur_;
    std::memcpy(buf_[other].get(), buf_[cur_].get() + aligned_len, used_ - aligned_len);
    file_offset_ += aligned_len;
    used_ -= aligned_len;
    cur_ = other;
  }

  std::string path_;
  UniqueFd fd_, read_fd_;
  bool direct_ = false;
  io_uring ring_{};
  AlignedBuf buf_[2] = {aligned(kBatchBytes), aligned(kBatchBytes)};
  int cur_ = 0;
  std::size_t used_ = 0, inflight_bytes_ = 0;
  std::uint64_t file_offset_ = 0;
};

struct Options {
  std::string dir, out;
  std::uint64_t disk_gib = 4, rp_mib = 64, block_kib = 64, fill_percent = 50, read_mib = 256;
  std::uint64_t keep = 20, rps = 60, read_back = 10, read_repeats = 3, runs = 1, seed = 1;
};

// The seeded workload: RP 0 is the full base (fill_percent of the disk in 1 MiB regions),
// RPs 1..rps change rp_mib of distinct random blocks each. Block contents are a function of
// (seed, rp, block): incompressible, regenerated wherever needed, never stored in RAM whole.
struct Workload {
  std::uint64_t block_bytes, disk_blocks, seed;
  std::vector<std::vector<std::uint64_t>> changed;  // [rp] sorted block indexes

  explicit Workload(const Options& o)
      : block_bytes(o.block_kib << 10), disk_blocks((o.disk_gib << 30) / block_bytes),
        seed(o.seed) {
    std::mt19937_64 rng(o.seed);
    const std::uint64_t per_region = std::max<std::uint64_t>(1, (1u << 20) / block_bytes);
    changed.resize(o.rps + 1);
    for (std::uint64_t b = 0; b < disk_blocks; b += per_region)
      if (rng() % 100 < o.fill_percent)
        for (std::uint64_t i = b; i < std::min(disk_blocks, b + per_region); ++i)
          changed[0].push_back(i);
    const std::uint64_t per_rp = (o.rp_mib << 20) / block_bytes;
    FERRY_ASSERT(per_rp > 0 && per_rp <= disk_blocks / 2);
    for (unsigned rp = 1; rp <= o.rps; ++rp) {
      std::vector<bool> taken(disk_blocks);
      auto& v = changed[rp];
      while (v.size() < per_rp)
        if (std::uint64_t b = rng() % disk_blocks; !taken[b]) taken[b] = true, v.push_back(b);
      std::sort(v.begin(), v.end());
    }
  }

  void fill(unsigned rp, std::uint64_t block, char* out) const {
    std::mt19937_64 g(seed * 0x9E3779B97F4A7C15ull ^ (std::uint64_t(rp) << 40) ^ block);
    for (std::size_t i = 0; i < block_bytes; i += 8) {
      const std::uint64_t z = g();
      std::memcpy(out + i, &z, 8);
    }
  }

  // The model: digest of [first, first + count) blocks at `rp`, each block as the newest RP
  // <= rp that wrote it (zeros if none). Layout reads must produce the same.
  std::uint64_t expected_digest(unsigned rp, std::uint64_t first, std::uint64_t count) const {
    std::vector<int> src(count, -1);
    for (unsigned r = 0; r <= rp; ++r)
      for (std::uint64_t b : changed[r])
        if (b >= first && b < first + count) src[b - first] = int(r);
    std::vector<char> blk(block_bytes);
    std::vector<std::uint64_t> h(count);
    for (std::uint64_t i = 0; i < count; ++i) {
      if (src[i] < 0) std::fill(blk.begin(), blk.end(), 0);
      else fill(unsigned(src[i]), first + i, blk.data());
      h[i] = ferry::xxh3_64(blk.data(), block_bytes);
    }
    return ferry::xxh3_64(h.data(), h.size() * 8);
  }
};

enum class Kind { A, B, C };
constexpr const char* kKindNames[] = {"A undo", "B fwd deltas", "C today"};
struct Figures {
  std::vector<double> ingest_s, prune_s, read_old_s, read_new_s;
  std::uint64_t written_bytes = 0, store_bytes = 0, image_alloc_bytes = 0;
  bool direct = false;
};

// One candidate's store in DIR/<kind>: an image and logs of RPs, with in-memory indexes
// (block -> record offset) standing in for the real lookup structures.
class Layout {
 public:
  Layout(Kind kind, const Workload& w, const std::string& dir)
      : kind_(kind), w_(w), dir_(dir + "/" + std::string(1, "ABC"[int(kind)])) {
    fs::create_directories(dir_);
    img_.reset(::open((dir_ + "/image").c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!img_.valid() || ::ftruncate(img_.get(), off_t(w.disk_blocks * w.block_bytes)) != 0)
      die("create image in " + dir_);
    blk_.resize(w.block_bytes);
    frame_.resize(ZSTD_compressBound(w.block_bytes));
    // RP 0, untimed: the image holds it; C also journals it (today's journal keeps every RP).
    if (kind_ == Kind::C) log_frames(0, make_frames(0), journal_[0], "journal");
    write_image(0);
    drop_cache(img_.get());
  }
  ~Layout() { fs::remove_all(dir_); }
  // Receives and applies RP `rp` (journalled as zstd frames). Returns seconds, generation
  // of the frames excluded (that is the sender's work).
  double ingest(unsigned rp) {
    std::vector<std::string> frames = make_frames(rp);
    const auto t0 = Clock::now();
    log_frames(rp, frames, journal_[rp], "journal");
    if (kind_ == Kind::A) {  // before-images first, durable before the image is overwritten
      auto& u = undo_[rp - 1];
      u.log = std::make_unique<AppendLog>(dir_ + "/undo-" + std::to_string(rp - 1));
      for (std::uint64_t b : w_.changed[rp]) {
        full_io(false, img_.get(), blk_.data(), w_.block_bytes, b * w_.block_bytes);
        const auto n = std::uint32_t(w_.block_bytes);
        RecordHeader h{kRecordMagic, Codec::raw, b, n, n, 0};
        u.at[b] = u.log->append(h, blk_.data());
      }
      u.log->commit();
      sync_dir(dir_);
      f_.written_bytes += u.log->bytes_written();
    }
    if (kind_ != Kind::B) write_image(rp);
    if (kind_ == Kind::A) remove(journal_, rp);  // applied: its journal segment is not needed
    const double secs = seconds_since(t0);
    drop_cache(img_.get());
    newest_ = rp;
    return secs;
  }
  // Drops the oldest kept RP. Returns seconds.
  double prune() {
    FERRY_ASSERT(kind_ != Kind::C);
    const unsigned oldest = base_rp_;
    const auto t0 = Clock::now();
    if (kind_ == Kind::A) {
      remove(undo_, oldest);
    } else {  // the base moves to oldest + 1: its delta is written into the base image
      const Indexed& d = journal_.at(oldest + 1);
      std::vector<char> scratch;
      for (const auto& [b, at] : d.at) {
        d.log->read_record(at, scratch, blk_.data());
        full_io(true, img_.get(), blk_.data(), w_.block_bytes, b * w_.block_bytes);
      }
      datasync(img_.get(), "base image");
      f_.written_bytes += d.at.size() * w_.block_bytes;
      remove(journal_, oldest + 1);
    }
    sync_dir(dir_);
    const double secs = seconds_since(t0);
    drop_cache(img_.get());
    base_rp_ = oldest + 1;
    return secs;
  }
  unsigned kept() const { return newest_ - base_rp_ + 1; }
  // Reads `count` blocks from `first` as of RP `rp` with a cold cache; returns the digest.
  std::uint64_t read(unsigned rp, std::uint64_t first, std::uint64_t count, double* secs) {
    FERRY_ASSERT(rp >= base_rp_ && rp <= newest_);
    drop_cache(img_.get());
    for (auto* logs : {&journal_, &undo_})
      for (auto& [r, l] : *logs) l.log->drop_cache();
    const auto t0 = Clock::now();
    // Which record overrides each block: A, the oldest undo entry of RPs >= rp; B, the
    // newest delta of RPs (base, rp]; C before the newest, the newest journal record <= rp.
    std::vector<const Indexed*> src(count, nullptr);
    std::vector<std::uint64_t> at(count);
    auto take = [&](const Indexed& l) {
      for (auto it = l.at.lower_bound(first); it != l.at.end() && it->first < first + count; ++it)
        src[it->first - first] = &l, at[it->first - first] = it->second;
    };
    const bool from_journal = kind_ == Kind::C && rp != newest_;
    if (kind_ == Kind::A)
      for (unsigned r = newest_; r-- > rp;) take(undo_.at(r));
    else if (kind_ == Kind::B)
      for (unsigned r = base_rp_ + 1; r <= rp; ++r) take(journal_.at(r));
    else if (from_journal)
      for (unsigned r = 0; r <= rp; ++r) take(journal_.at(r));
    const std::uint64_t per_window = kReadWindowBytes / w_.block_bytes;
    std::vector<char> win(kReadWindowBytes), scratch;
    std::vector<std::uint64_t> h(count);
    for (std::uint64_t w0 = 0; w0 < count; w0 += per_window) {
      const std::uint64_t n = std::min(per_window, count - w0);
      if (from_journal) std::fill(win.begin(), win.end(), 0);  // today's read view: no image
      else
        full_io(false, img_.get(), win.data(), n * w_.block_bytes, (first + w0) * w_.block_bytes);
      for (std::uint64_t i = 0; i < n; ++i) {
        char* out = win.data() + i * w_.block_bytes;
        if (src[w0 + i]) src[w0 + i]->log->read_record(at[w0 + i], scratch, out);
        h[w0 + i] = ferry::xxh3_64(out, w_.block_bytes);
      }
    }
    *secs = seconds_since(t0);
    return ferry::xxh3_64(h.data(), h.size() * 8);
  }
  Figures& figures() { return f_; }
  void measure_store() {  // what the file system allocated (st_blocks), holes excluded
    for (const auto& e : fs::directory_iterator(dir_)) f_.store_bytes += allocated_bytes(e.path());
    f_.image_alloc_bytes = allocated_bytes(dir_ + "/image");
  }
 private:
  struct Indexed {
    std::unique_ptr<AppendLog> log;
    std::map<std::uint64_t, std::uint64_t> at;  // block -> record offset
  };
  std::vector<std::string> make_frames(unsigned rp) {
    std::vector<std::string> frames;
    for (std::uint64_t b : w_.changed[rp]) {
      w_.fill(rp, b, blk_.data());
      std::size_t n = ZSTD_compress(frame_.data(), frame_.size(), blk_.data(), w_.block_bytes, 1);
      FERRY_ASSERT(!ZSTD_isError(n) && n >= w_.block_bytes);  // incompressible by design
      frames.emplace_back(frame_.data(), n);
    }
    return frames;
  }
  // Apply: the decoded blocks are in the receiver's memory (today's apply reads them back
  // from the journal; that read is not counted here).
  void write_image(unsigned rp) {
    for (std::uint64_t b : w_.changed[rp]) {
      w_.fill(rp, b, blk_.data());
      full_io(true, img_.get(), blk_.data(), w_.block_bytes, b * w_.block_bytes);
    }
    datasync(img_.get(), "image");
    if (rp != 0) f_.written_bytes += w_.changed[rp].size() * w_.block_bytes;
  }
  void remove(std::map<unsigned, Indexed>& logs, unsigned rp) {
    if (::unlink(logs.at(rp).log->path().c_str()) != 0) die("unlink " + logs.at(rp).log->path());
    logs.erase(rp);
  }
  void log_frames(unsigned rp, const std::vector<std::string>& frames, Indexed& l,
                  const char* what) {
    l.log = std::make_unique<AppendLog>(dir_ + "/" + what + "-" + std::to_string(rp));
    f_.direct = l.log->direct();
    for (std::size_t i = 0; i < frames.size(); ++i) {
      const std::uint64_t b = w_.changed[rp][i];
      RecordHeader h{kRecordMagic, Codec::zstd, b, std::uint32_t(frames[i].size()),
                     std::uint32_t(w_.block_bytes), 0};
      l.at[b] = l.log->append(h, frames[i].data());
    }
    l.log->commit();
    sync_dir(dir_);  // a new file's name must survive, as the journal's segment roll does
    if (rp != 0) f_.written_bytes += l.log->bytes_written();
  }
  Kind kind_;
  const Workload& w_;
  std::string dir_;
  UniqueFd img_;
  std::vector<char> blk_, frame_;
  // By RP. undo_[r]: RP r's bytes of the blocks RP r + 1 changed.
  std::map<unsigned, Indexed> journal_, undo_;
  unsigned base_rp_ = 0, newest_ = 0;
  Figures f_;
};
double pct(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::size_t(p * double(v.size() - 1) + 0.5)];
}
Figures run_one(Kind kind, const Options& o, const Workload& w, std::uint64_t read_first,
                std::uint64_t read_count, const std::uint64_t digest[2]) {
  Layout l(kind, w, o.dir);
  Figures& f = l.figures();
  const auto t0 = Clock::now();
  for (unsigned rp = 1; rp <= o.rps; ++rp) {
    f.ingest_s.push_back(l.ingest(rp));
    while (kind != Kind::C && l.kept() > o.keep) f.prune_s.push_back(l.prune());
  }
  std::fprintf(stderr, "%s: %llu RPs ingested, %zu pruned in %.1f s\n", kKindNames[int(kind)],
               (unsigned long long)o.rps, f.prune_s.size(), seconds_since(t0));
  const unsigned rps[2] = {unsigned(o.rps - o.read_back), unsigned(o.rps)};
  for (unsigned rep = 0; rep < o.read_repeats; ++rep)
    for (int i = 0; i < 2; ++i) {
      double secs = 0;
      const std::uint64_t d = l.read(rps[i], read_first, read_count, &secs);
      FERRY_ASSERT_MSG(d == digest[i], "a layout read other bytes than the model's");
      (i == 0 ? f.read_old_s : f.read_new_s).push_back(secs);
    }
  l.measure_store();
  return f;
}

template <class... Args>
std::string fmt(const char* f, Args... args) {
  std::string s(std::size_t(std::snprintf(nullptr, 0, f, args...)), '\0');
  std::snprintf(s.data(), s.size() + 1, f, args...);
  return s;
}
std::string loadavg() {
  double l[3] = {0, 0, 0};
  return ::getloadavg(l, 3) < 0 ? "?" : fmt("%.2f %.2f %.2f", l[0], l[1], l[2]);
}
using Runs = std::map<Kind, std::vector<Figures>>;
// The table: samples of all runs pooled, median (10th-90th percentile); ratios against C.
std::string table(const Options& o, const std::vector<Kind>& kinds, Runs& runs, double mb_per_rp) {
  std::vector<std::pair<std::string, std::vector<std::string>>> rows;
  auto row = [&](std::string name, auto cell) {
    auto& r = rows.emplace_back(std::move(name), std::vector<std::string>{});
    for (Kind k : kinds) r.second.push_back(cell(k));
  };
  using Samples = std::vector<double> Figures::*;
  auto at = [&](Kind k, Samples m, double p) {  // -1: no samples
    std::vector<double> v;
    for (const auto& f : runs[k]) v.insert(v.end(), (f.*m).begin(), (f.*m).end());
    return v.empty() ? -1.0 : pct(v, p);
  };
  auto timed = [&](const std::string& name, Samples m, bool rate) {
    row(name + ", s", [&](Kind k) {
      return at(k, m, .5) < 0 ? "n/a"
                              : fmt("%.3f (%.3f-%.3f)", at(k, m, .5), at(k, m, .1), at(k, m, .9));
    });
    if (rate)
      row(name + ", MB/s", [&](Kind k) {
        return at(k, m, .5) < 0 ? "n/a"
                                : fmt("%.0f (%.0f-%.0f)", mb_per_rp / at(k, m, .5),
                                      mb_per_rp / at(k, m, .9), mb_per_rp / at(k, m, .1));
      });
    if (at(Kind::C, m, .5) > 0)
      row("  time ratio to C",
          [&](Kind k) { return fmt("x%.2f", at(k, m, .5) / at(Kind::C, m, .5)); });
  };
  const std::string range = "read " + std::to_string(o.read_mib) + " MiB of ";
  timed("ingest+apply per RP", &Figures::ingest_s, true);
  timed("prune per dropped RP", &Figures::prune_s, true);
  timed(range + "RP newest-" + std::to_string(o.read_back), &Figures::read_old_s, false);
  timed(range + "newest RP", &Figures::read_new_s, false);
  const double gib = double(1ull << 30), kept_bytes = double(o.keep) * mb_per_rp * 1e6;
  auto last = [&](Kind k) { return runs[k].back(); };
  row("written per RP (ingest+prune), MB",
      [&](Kind k) { return fmt("%.0f", double(last(k).written_bytes) / 1e6 / double(o.rps)); });
  row("store after all RPs, GiB", [&](Kind k) { return fmt("%.2f", last(k).store_bytes / gib); });
  row("bound: image alloc + kept changes, GiB",
      [&](Kind k) { return fmt("%.2f", (last(k).image_alloc_bytes + kept_bytes) / gib); });
  row("  store / bound", [&](Kind k) {
    return fmt("%.2f", last(k).store_bytes / (last(k).image_alloc_bytes + kept_bytes));
  });
  row("  store ratio to C", [&](Kind k) {
    return fmt("x%.2f", double(last(k).store_bytes) / double(last(Kind::C).store_bytes));
  });
  std::size_t w0 = 0;
  for (const auto& r : rows) w0 = std::max(w0, r.first.size());
  auto pad = [](std::string c, std::size_t w) {
    return c + std::string(w - std::min(w, c.size()), ' ');
  };
  std::string out = pad("figure", w0);
  for (Kind k : kinds) out += " | " + pad(kKindNames[int(k)], 22);
  for (const auto& [name, cells] : rows) {
    out += "\n" + pad(name, w0);
    for (const auto& c : cells) out += " | " + pad(c, 22);
  }
  return out + "\n";
}

Options parse(int argc, char** argv) {
  Options o;
  const std::map<std::string, std::string*> text{{"--dir", &o.dir}, {"--out", &o.out}};
  const std::map<std::string, std::uint64_t*> num{
      {"--disk-gib", &o.disk_gib}, {"--rp-mib", &o.rp_mib}, {"--block-kib", &o.block_kib},
      {"--fill-percent", &o.fill_percent}, {"--read-mib", &o.read_mib}, {"--keep", &o.keep},
      {"--rps", &o.rps}, {"--read-back", &o.read_back}, {"--read-repeats", &o.read_repeats},
      {"--runs", &o.runs}, {"--seed", &o.seed}};
  for (int i = 1; i < argc; i += 2) {
    if (i + 1 >= argc) throw std::invalid_argument(std::string(argv[i]) + " needs a value");
    if (auto t = text.find(argv[i]); t != text.end()) *t->second = argv[i + 1];
    else if (auto n = num.find(argv[i]); n != num.end()) *n->second = std::stoull(argv[i + 1]);
    else throw std::invalid_argument(std::string("unknown option ") + argv[i]);
  }
  if (o.keep < 2 || o.read_back >= o.keep || o.rps <= o.keep || o.runs == 0 || o.read_repeats == 0)
    throw std::invalid_argument("need 2 <= keep, read-back < keep < rps, runs and repeats >= 1");
  if (o.read_mib > (o.disk_gib << 10) || kReadWindowBytes % (o.block_kib << 10) != 0)
    throw std::invalid_argument("read-mib beyond the disk, or block-kib not dividing 4 MiB");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "retention-layout: %s\n", e.what());
    return 2;
  }
  const bool made_dir = o.dir.empty();
  if (made_dir) {  // the store's file system: /var/tmp, as bench/run's --workdir
    char tmpl[] = "/var/tmp/ferry-retention-XXXXXX";
    if (!::mkdtemp(tmpl)) die("mkdtemp");
    o.dir = tmpl;
  }
  const Workload w(o);
  const double mb_per_rp = double(w.changed[1].size() * w.block_bytes) / 1e6;
  const std::uint64_t read_count = (o.read_mib << 20) / w.block_bytes;
  const std::uint64_t window = kReadWindowBytes / w.block_bytes;
  const std::uint64_t read_first = (w.disk_blocks - read_count) / 2 / window * window;  // mid-disk
  const std::uint64_t digest[2] = {
      w.expected_digest(unsigned(o.rps - o.read_back), read_first, read_count),
                                   w.expected_digest(unsigned(o.rps), read_first, read_count)};
  const std::string load_start = loadavg();
  const std::vector<Kind> kinds = {Kind::A, Kind::B, Kind::C};
  Runs runs;
  for (unsigned r = 0; r < o.runs; ++r)
    for (std::size_t i = 0; i < kinds.size(); ++i) {  // rotate the order: no layout always first
      Kind k = kinds[(i + r) % kinds.size()];
      runs[k].push_back(run_one(k, o, w, read_first, read_count, digest));
    }
  if (made_dir) fs::remove_all(o.dir);

  using ull = unsigned long long;
  std::string out = fmt(
      "retention-layout: %llu GiB sparse disk, %llu%% written by RP 0 (the full base), %llu RPs "
      "of %llu MiB in %llu KiB random blocks (incompressible; zstd -1 frames), keep last %llu, "
      "seed %llu\n"
      "logs (journal, undo): io_uring %s, 8 MiB batches, fdatasync; image: buffered pwrite + "
      "fdatasync; image cache dropped after each sync, all caches before each read\n",
      ull(o.disk_gib), ull(o.fill_percent), ull(o.rps), ull(o.rp_mib), ull(o.block_kib),
      ull(o.keep), ull(o.seed),
      runs.begin()->second.back().direct ? "O_DIRECT" : "buffered (no O_DIRECT here)");
  out += fmt("runs %llu (layout order rotated), reads repeated %llu times; load average at "
             "start %s, at end %s\ncells: median (10th-90th percentile) of every RP, prune or "
             "read of all runs; "
             "every read checked against the model\n\n",
             ull(o.runs), ull(o.read_repeats), load_start.c_str(), loadavg().c_str());
  out += table(o, kinds, runs, mb_per_rp);
  std::fputs(out.c_str(), stdout);
  if (!o.out.empty()) {
    FILE* f = std::fopen(o.out.c_str(), "w");
    if (!f || std::fputs(out.c_str(), f) < 0 || std::fclose(f) != 0) die("write " + o.out);
  }
  return 0;
}
