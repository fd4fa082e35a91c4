#include "ferry/source/sender.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "ferry/base/hash.h"
#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "ferry/base/memory.h"
#include "ferry/transport/codec.h"
#include "ferry/transport/rules.h"
#include "ferry/transport/wire.h"

namespace ferry::source {
namespace {

using Clock = std::chrono::steady_clock;
using transport::Compressor;
using transport::MsgType;

inline constexpr std::uint64_t kExtentChunkBytes = 1ull << 30;  // extents asked per call
inline constexpr std::size_t kMaxWorkers = 4;
// Adjacent changed blocks are read with one NBD/io_uring request of at most this many bytes
// (fewer requests and system calls per byte; the bitmap's granularity stays the frame unit).
// Not more: qemu-storage-daemon 7.2 serving 1 GiB to nbdcopy (1 connection, 16 requests) on
// this project's 2-core test host used 0.8-1.2 s CPU with 64 KiB requests, 0.5-0.8 s with
// 256 KiB and 4.4-5.0 s with 1 MiB (each large request costs QEMU a fresh bounce buffer).
inline constexpr std::uint64_t kMaxReadRunBytes = 256u << 10;
inline constexpr std::size_t kMaxReadRunJobs = 16;  // bound on blocks per run (small blocks)
// Resync: the disk is compared region by region; the source keeps this many regions'
// hash_requests ahead of the one it reads, so the receiver hashes while the source reads.
inline constexpr std::uint64_t kResyncRegionBytes = 64ull << 20;
inline constexpr std::size_t kResyncRequestsAhead = 4;
static_assert(kResyncRegionBytes % transport::kMaxBlockBytes == 0, "regions hold whole blocks");
static_assert(kResyncRegionBytes <= transport::kMaxHashRequestBytes);

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double process_cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

struct AtomicDiskStats {
  std::atomic<std::uint64_t> read_bytes{0}, zero_bytes{0}, data_bytes{0}, payload_bytes{0},
      frames{0}, compared_blocks{0}, differing_blocks{0};
};

// Assigns sequence numbers and sends frames one at a time, so seq order is wire order.
class FrameSink {
 public:
  FrameSink(transport::Connection& conn, std::uint64_t group_id, std::uint64_t rp_id)
      : conn_(conn), group_id_(group_id), rp_id_(rp_id) {}

  // `payload`: the block's encoded bytes (empty for a zero block).
  Status send(transport::DataFrame& frame, std::string_view payload = {}) {
    frame.group_id = group_id_;
    frame.rp_id = rp_id_;
    std::lock_guard lock(mu_);
    frame.seq = next_seq_++;
    logical_bytes_ += frame.length_bytes;
    std::string encoded = transport::encode_data(frame, payload);
    const auto t = Clock::now();
    Status s = conn_.send_owned(MsgType::data, std::move(encoded));
    send_ns_ += std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
    return s;
  }
  // Time spent handing frames to the connection (blocked while its queue is full).
  double send_seconds() const {
    std::lock_guard lock(mu_);
    return double(send_ns_) / 1e9;
  }
  std::uint64_t frames() const {
    std::lock_guard lock(mu_);
    return next_seq_;
  }
  std::uint64_t logical_bytes() const {
    std::lock_guard lock(mu_);
    return logical_bytes_;
  }

 private:
  transport::Connection& conn_;
  const std::uint64_t group_id_;
  const std::uint64_t rp_id_;
  mutable std::mutex mu_;
  std::uint64_t next_seq_ = 0;
  std::uint64_t logical_bytes_ = 0;
  std::uint64_t send_ns_ = 0;
};

// Fixed pool of read buffers, one block each, in one mapping: the bound on bytes read and not
// yet sent. Consecutive free slots can be taken together, so a run of adjacent blocks is read
// with one request into contiguous memory and still handed back slot by slot.
class BufferPool {
 public:
  BufferPool(std::size_t count, std::uint32_t bytes) : bytes_(bytes), used_(count, false) {
    FERRY_ASSERT(count > 0 && bytes > 0);
    storage_ = PinnedRegion(count * std::size_t(bytes));
    free_count_ = count;
  }
  // Up to `max_slots` (>= 1) adjacent free slots; returns the first and sets `*got`, or
  // nullptr when none is free.
  char* try_take_run(std::size_t max_slots, std::size_t* got) {
    FERRY_ASSERT(max_slots >= 1);
    std::lock_guard lock(mu_);
    if (free_count_ == 0) return nullptr;
    std::size_t best = used_.size(), best_len = 0;
    for (std::size_t i = 0; i < used_.size() && best_len < max_slots;) {
      if (used_[i]) {
        ++i;
        continue;
      }
      std::size_t j = i;
      while (j < used_.size() && !used_[j] && j - i < max_slots) ++j;
      if (j - i > best_len) {
        best = i;
        best_len = j - i;
      }
      i = j;
    }
    FERRY_ASSERT(best_len >= 1);
    for (std::size_t k = best; k < best + best_len; ++k) used_[k] = true;
    free_count_ -= best_len;
    *got = best_len;
    return storage_.data() + best * std::size_t(bytes_);
  }
  void give_back(char* b) {
    std::size_t slot = static_cast<std::size_t>(b - storage_.data()) / bytes_;
    FERRY_ASSERT(b >= storage_.data() && slot < used_.size() &&
                 b == storage_.data() + slot * std::size_t(bytes_));
    {
      std::lock_guard lock(mu_);
      FERRY_ASSERT(used_[slot]);
      used_[slot] = false;
      ++free_count_;
    }
    cv_.notify_one();
  }
  // Waits up to `timeout` for a buffer to come back.
  void wait_for_free(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return free_count_ > 0; });
  }
  std::uint32_t buffer_bytes() const { return bytes_; }

 private:
  std::uint32_t bytes_;
  PinnedRegion storage_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<bool> used_;  // guarded by mu_
  std::size_t free_count_ = 0;
};

struct Job {
  char* buf = nullptr;
  std::uint16_t disk_index = 0;
  std::uint64_t offset_bytes = 0;
  std::uint32_t length_bytes = 0;
  bool compare = false;  // resync: drop the block when its digest equals `replica_digest`
  Hash128 replica_digest;
};

// The blocks of one read request.
struct ReadRun {
  std::array<Job, kMaxReadRunJobs> jobs;
  std::size_t count = 0;
};

// Hashes, detects zeros, compresses and sends read blocks on a few threads.
class WorkerPool {
 public:
  static Result<std::unique_ptr<WorkerPool>> create(unsigned count, int level,
                                                    std::uint32_t block_bytes, FrameSink& sink,
                                                    BufferPool& buffers,
                                                    std::vector<AtomicDiskStats>& stats) {
    auto pool = std::unique_ptr<WorkerPool>(new WorkerPool(sink, buffers, stats));
    for (unsigned i = 0; i < count; ++i) {
      FERRY_ASSIGN_OR_RETURN(Compressor c, Compressor::create(level));
      pool->compressors_.push_back(std::make_unique<Compressor>(std::move(c)));
      pool->out_.emplace_back(Compressor::bound(block_bytes));
    }
    for (unsigned i = 0; i < count; ++i) pool->threads_.emplace_back([p = pool.get(), i] { p->run(i); });
    return pool;
  }
  ~WorkerPool() { shutdown(); }

  void push_all(const Job* jobs, std::size_t n) {
    {
      std::lock_guard lock(mu_);
      for (std::size_t i = 0; i < n; ++i) queue_.push_back(jobs[i]);
      pending_ += n;
    }
    if (n == 1)
      cv_.notify_one();
    else
      cv_.notify_all();
  }
  // Waits until every pushed job is done; returns the first error.
  Status drain() {
    std::unique_lock lock(mu_);
    idle_cv_.wait(lock, [&] { return pending_ == 0; });
    return error_;
  }
  bool failed() {
    std::lock_guard lock(mu_);
    return !error_.is_ok();
  }
  void shutdown() {
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  WorkerPool(FrameSink& sink, BufferPool& buffers, std::vector<AtomicDiskStats>& stats)
      : sink_(sink), buffers_(buffers), stats_(stats) {}

  void run(unsigned index) {
    for (;;) {
      Job job;
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = queue_.front();
        queue_.pop_front();
      }
      const auto t = Clock::now();
      Status s = error_seen() ? Status::ok() : process(index, job);
      busy_ns_ += std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
      buffers_.give_back(job.buf);
      std::lock_guard lock(mu_);
      if (!s.is_ok() && error_.is_ok()) error_ = s;
      if (--pending_ == 0) idle_cv_.notify_all();
    }
  }

  bool error_seen() {
    std::lock_guard lock(mu_);
    return !error_.is_ok();
  }

  Status process(unsigned index, const Job& job) {
    AtomicDiskStats& st = stats_[job.disk_index];
    transport::DataFrame f;
    f.disk_index = job.disk_index;
    f.offset_bytes = job.offset_bytes;
    f.length_bytes = job.length_bytes;
    std::optional<Hash128> digest;
    std::string_view payload;
    if (job.compare) {  // the hash is computed anyway: compare before compressing
      digest = xxh3_128(job.buf, job.length_bytes);
      st.compared_blocks += 1;
      if (*digest == job.replica_digest) return Status::ok();  // the replica holds it
      st.differing_blocks += 1;
    }
    if (is_all_zero(job.buf, job.length_bytes)) {
      f.kind = transport::BlockKind::zero;
      f.codec = transport::Codec::none;
      st.zero_bytes += job.length_bytes;
    } else {
      f.kind = transport::BlockKind::data;
      f.hash = digest ? *digest : xxh3_128(job.buf, job.length_bytes);
      std::vector<char>& out = out_[index];
      FERRY_ASSIGN_OR_RETURN(std::size_t n, compressors_[index]->compress(
                                                job.buf, job.length_bytes, out.data(), out.size()));
      if (n < job.length_bytes) {
        f.codec = transport::Codec::zstd;
        payload = std::string_view(out.data(), n);
      } else {  // incompressible: zstd would only add bytes
        f.codec = transport::Codec::none;
        payload = std::string_view(job.buf, job.length_bytes);
      }
      st.data_bytes += job.length_bytes;
      st.payload_bytes += payload.size();
    }
    st.frames += 1;
    FERRY_KILL_POINT("source.mid_send");
    const auto t = Clock::now();
    Status sent = sink_.send(f, payload);
    sink_ns_ += std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
    return sent;
  }

 public:
  // The workers' busy time outside the send channel, divided by their number: the wall time
  // hashing and compressing held the transfer (explainable RPO).
  double hash_compress_seconds() const {
    const std::uint64_t busy = busy_ns_.load(), sink = sink_ns_.load();
    return threads_.empty() ? 0 : double(busy > sink ? busy - sink : 0) / 1e9 / double(threads_.size());
  }

 private:

  FrameSink& sink_;
  BufferPool& buffers_;
  std::vector<AtomicDiskStats>& stats_;
  std::vector<std::unique_ptr<Compressor>> compressors_;
  std::vector<std::vector<char>> out_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, idle_cv_;
  std::deque<Job> queue_;
  std::size_t pending_ = 0;
  bool stopping_ = false;
  Status error_;
  std::atomic<std::uint64_t> busy_ns_{0}, sink_ns_{0};
};

bool stop_requested(const SenderOptions& o) {
  return o.stop && o.stop->load(std::memory_order_relaxed);
}

// Reads a failure reason the receiver may have sent before closing.
std::string peer_reason(transport::Connection& conn) {
  auto f = conn.receive(std::chrono::milliseconds(1000));
  if (!f.is_ok()) return {};
  if (f->type == MsgType::error) {
    auto e = transport::decode_error(f->payload);
    if (e.is_ok()) return e->message;
  }
  if (f->type == MsgType::rp_ack) {
    auto a = transport::decode_rp_ack(f->payload);
    if (a.is_ok()) return a->message;
  }
  return {};
}

// The receiver's digests of one resync disk, region by region. Keeps kResyncRequestsAhead
// hash_requests outstanding (bounded: the hash_lists in flight are a few hundred KiB at most,
// so the receiver never blocks on a full send queue while the source blocks on it).
class DigestFeed {
 public:
  struct Region {
    std::uint64_t offset_bytes = 0;
    std::uint64_t length_bytes = 0;
    std::vector<Hash128> digests;  // one per block; the last block may be short
  };

  DigestFeed(transport::Connection& conn, std::uint16_t disk_index, std::uint32_t block_bytes,
             std::uint64_t size_bytes, std::chrono::milliseconds timeout)
      : conn_(conn), disk_index_(disk_index), block_bytes_(block_bytes), size_(size_bytes),
        timeout_(timeout) {}

  bool done() const { return next_take_ >= size_; }

  // Receives the digests of the next region (requesting more regions ahead first).
  Result<Region> take() {
    FERRY_ASSERT(!done());
    FERRY_TRY(request_ahead());
    Region r;
    r.offset_bytes = next_take_;
    r.length_bytes = std::min(kResyncRegionBytes, size_ - next_take_);
    const std::uint64_t blocks = (r.length_bytes + block_bytes_ - 1) / block_bytes_;
    while (r.digests.size() < blocks) FERRY_TRY(receive_list(r, blocks));
    next_take_ += r.length_bytes;
    return r;
  }
  std::uint64_t hash_bytes() const { return hash_bytes_; }

 private:
  Status request_ahead() {
    while (next_request_ < size_ && next_request_ - next_take_ < kResyncRequestsAhead * kResyncRegionBytes) {
      transport::HashRequest q;
      q.disk_index = disk_index_;
      q.block_bytes = block_bytes_;
      q.offset_bytes = next_request_;
      q.length_bytes = std::min(kResyncRegionBytes, size_ - next_request_);
      std::string payload = transport::encode(q);
      hash_bytes_ += transport::kFrameHeaderBytes + payload.size();
      FERRY_TRY(conn_.send(MsgType::hash_request, payload));
      next_request_ += q.length_bytes;
    }
    // No flush: the I/O thread sends queued frames as they come, and a flush here would wait
    // for the data frames the workers keep queueing.
    return Status::ok();
  }

  // One hash_list, which must continue region `r` exactly where it stands.
  Status receive_list(Region& r, std::uint64_t blocks) {
    FERRY_ASSIGN_OR_RETURN(transport::Frame f, conn_.receive(timeout_));
    if (f.type != MsgType::hash_list) return unexpected(f);
    hash_bytes_ += transport::kFrameHeaderBytes + f.payload.size();
    FERRY_ASSIGN_OR_RETURN(transport::HashList l, transport::decode_hash_list(f.payload));
    const std::uint64_t want = r.offset_bytes + r.digests.size() * std::uint64_t(block_bytes_);
    if (l.disk_index != disk_index_ || l.block_bytes != block_bytes_ || l.offset_bytes != want ||
        l.hashes.size() > blocks - r.digests.size())
      return Status::error(Errc::protocol,
                           fmt::format("hash_list for disk {} at {} ({} digests of {} bytes); "
                                       "expected disk {} at {}, at most {} digests of {} bytes",
                                       l.disk_index, l.offset_bytes, l.hashes.size(),
                                       l.block_bytes, disk_index_, want,
                                       blocks - r.digests.size(), block_bytes_));
    r.digests.insert(r.digests.end(), l.hashes.begin(), l.hashes.end());
    return Status::ok();
  }

  // The receiver answered with something else: a refusal (rp_ack) or an error says why.
  static Status unexpected(const transport::Frame& f) {
    std::string why;
    if (f.type == MsgType::error) {
      auto e = transport::decode_error(f.payload);
      why = e.is_ok() ? e->message : "(undecodable error)";
    } else if (f.type == MsgType::rp_ack) {
      auto a = transport::decode_rp_ack(f.payload);
      why = a.is_ok() ? a->message : "(undecodable rp_ack)";
    }
    return Status::error(Errc::protocol, std::string("expected hash_list, got ") +
                                             transport::msg_type_name(f.type) +
                                             (why.empty() ? "" : ": " + why));
  }

  transport::Connection& conn_;
  const std::uint16_t disk_index_;
  const std::uint32_t block_bytes_;
  const std::uint64_t size_;
  const std::chrono::milliseconds timeout_;
  std::uint64_t next_request_ = 0;  // start of the next region to request
  std::uint64_t next_take_ = 0;     // start of the next region to hand out
  std::uint64_t hash_bytes_ = 0;
};

class DiskStreamer {
 public:
  // `max_zero_bytes`: the longest zero frame the receiver takes (kMaxZeroRangeBytes once it
  // accepted kFeatureZeroRanges, else kMaxBlockBytes).
  DiskStreamer(const SenderOptions& o, FrameSink& sink, WorkerPool& workers, BufferPool& buffers,
               std::vector<AtomicDiskStats>& stats, DiskStats& totals,
               std::uint32_t max_zero_bytes)
      : o_(o), sink_(sink), workers_(workers), buffers_(buffers), stats_(stats), totals_(totals),
        max_zero_bytes_(max_zero_bytes) {
    FERRY_ASSERT(max_zero_bytes_ >= transport::kMaxBlockBytes &&
                 max_zero_bytes_ % transport::kMaxBlockBytes == 0);
  }

  // `tracked_end_bytes`: an incremental view's dirty bitmap is trusted below it only; from it
  // to the end the disk is sent as a full view (see grown_from()). The disk's size for a
  // full view.
  Status stream(std::uint16_t disk_index, const cbt::DiskView& view,
                std::uint64_t tracked_end_bytes) {
    FERRY_ASSERT(tracked_end_bytes <= view.size_bytes);
    FERRY_ASSIGN_OR_RETURN(auto reader, o_.open_reader ? o_.open_reader(view)
                                                       : cbt::open_nbd_reader(view));
    FERRY_TRY(stream_range(*reader, disk_index, 0, tracked_end_bytes));
    FERRY_TRY(flush_zero());
    // Completions run only from the reader's own poll(): its reads must end before another
    // reader waits for the buffers they hold.
    while (reader->in_flight() > 0) FERRY_TRY(poll(*reader, 100));
    if (tracked_end_bytes < view.size_bytes) {
      // The same point-in-time view without the bitmap: every byte, data or zero.
      cbt::DiskView whole = view;
      whole.dirty_context.clear();
      FERRY_ASSIGN_OR_RETURN(auto all, o_.open_reader ? o_.open_reader(whole)
                                                      : cbt::open_nbd_reader(whole));
      FERRY_TRY(stream_range(*all, disk_index, tracked_end_bytes, view.size_bytes));
      FERRY_TRY(flush_zero());
      while (all->in_flight() > 0) FERRY_TRY(poll(*all, 100));
    }
    return read_error_;
  }

  // Resync (C4): the whole disk, region by region, sending only the blocks whose digest
  // differs from the receiver's. Data extents are read and compared by the workers; zero
  // extents are compared with the digest of zeros without reading.
  Status resync(transport::Connection& conn, std::uint16_t disk_index, const cbt::DiskView& view) {
    FERRY_ASSIGN_OR_RETURN(auto reader, o_.open_reader ? o_.open_reader(view)
                                                       : cbt::open_nbd_reader(view));
    DigestFeed feed(conn, disk_index, o_.block_bytes, view.size_bytes, o_.ack_timeout);
    Status s = resync_regions(feed, *reader, disk_index);
    if (s.is_ok()) s = flush_zero();
    totals_.resync_hash_bytes = feed.hash_bytes();
    if (!s.is_ok()) return s;
    while (reader->in_flight() > 0) FERRY_TRY(poll(*reader, 100));
    return read_error_;
  }

 private:
  Status resync_regions(DigestFeed& feed, cbt::BlockReader& reader, std::uint16_t disk_index) {
    while (!feed.done()) {
      FERRY_ASSIGN_OR_RETURN(DigestFeed::Region region, feed.take());
      const std::uint64_t end = region.offset_bytes + region.length_bytes;
      FERRY_ASSIGN_OR_RETURN(auto extents, reader.extents(region.offset_bytes,
                                                          region.length_bytes, o_.block_bytes));
      for (const cbt::Extent& e : extents) {
        FERRY_ASSERT(e.offset_bytes >= region.offset_bytes &&
                     e.offset_bytes + e.length_bytes <= end);
        totals_.extent_bytes += e.length_bytes;
        FERRY_TRY(e.zero ? resync_zero(disk_index, e, region)
                         : read_data(reader, disk_index, e, &region));
      }
    }
    return Status::ok();
  }

  // A zero extent of the view: the blocks whose replica digest is not that of zeros are sent
  // as zero ranges, without reading anything. send_zero() merges adjacent ones (across
  // extents and regions too) up to max_zero_bytes_.
  Status resync_zero(std::uint16_t disk_index, const cbt::Extent& e,
                     const DigestFeed::Region& region) {
    FERRY_ASSERT(e.offset_bytes % o_.block_bytes == 0);
    const std::uint64_t end = e.offset_bytes + e.length_bytes;
    for (std::uint64_t at = e.offset_bytes; at < end; at += o_.block_bytes) {
      auto len = static_cast<std::uint32_t>(std::min<std::uint64_t>(o_.block_bytes, end - at));
      const Hash128& want = region.digests[(at - region.offset_bytes) / o_.block_bytes];
      stats_[disk_index].compared_blocks += 1;
      if (want == zero_digest(len)) continue;
      stats_[disk_index].differing_blocks += 1;
      FERRY_TRY(send_zero(disk_index, {at, len, true}));
    }
    return Status::ok();
  }

  const Hash128& zero_digest(std::uint32_t length) {
    auto it = zero_digests_.find(length);
    if (it != zero_digests_.end()) return it->second;
    std::string zeros(length, '\0');
    return zero_digests_[length] = xxh3_128(zeros.data(), zeros.size());
  }

  // Adds a zero range to the pending run: a range adjacent to it extends it, any other
  // flushes it first. Whole frames of max_zero_bytes_ go at once; the rest waits for the
  // next range (an empty thin disk is one run, cut only by the frame bound).
  Status send_zero(std::uint16_t disk_index, const cbt::Extent& e) {
    FERRY_ASSERT(e.length_bytes > 0);
    if (zero_run_ && (zero_run_->disk_index != disk_index || zero_run_->end_bytes != e.offset_bytes))
      FERRY_TRY(flush_zero());
    if (!zero_run_) zero_run_ = ZeroRun{disk_index, e.offset_bytes, e.offset_bytes};
    zero_run_->end_bytes += e.length_bytes;
    while (zero_run_->end_bytes - zero_run_->offset_bytes >= max_zero_bytes_)
      FERRY_TRY(send_zero_frame(max_zero_bytes_));
    return Status::ok();
  }

  Status flush_zero() {
    if (zero_run_ && zero_run_->end_bytes > zero_run_->offset_bytes)
      FERRY_TRY(send_zero_frame(
          static_cast<std::uint32_t>(zero_run_->end_bytes - zero_run_->offset_bytes)));
    zero_run_.reset();
    return Status::ok();
  }

  // One zero frame from the start of the pending run.
  Status send_zero_frame(std::uint32_t length_bytes) {
    FERRY_ASSERT(zero_run_ && length_bytes > 0 && length_bytes <= max_zero_bytes_ &&
                 length_bytes <= zero_run_->end_bytes - zero_run_->offset_bytes);
    transport::DataFrame f;
    f.disk_index = zero_run_->disk_index;
    f.kind = transport::BlockKind::zero;
    f.offset_bytes = zero_run_->offset_bytes;
    f.length_bytes = length_bytes;
    FERRY_TRY(sink_.send(f));
    stats_[f.disk_index].zero_bytes += length_bytes;
    stats_[f.disk_index].frames += 1;
    zero_run_->offset_bytes += length_bytes;
    return Status::ok();
  }

  // `region`: resync only; each block then carries the receiver's digest to compare with.
  // Adjacent whole blocks are read together, up to kMaxReadRunBytes per request, into adjacent
  // pool slots; each block is then a job of its own.
  Status read_data(cbt::BlockReader& reader, std::uint16_t disk_index, const cbt::Extent& e,
                   const DigestFeed::Region* region = nullptr) {
    FERRY_TRY(flush_zero());  // data ends the zero run before it
    const std::uint64_t end = e.offset_bytes + e.length_bytes;
    const std::size_t max_run_blocks =
        std::max<std::size_t>(1, std::min<std::size_t>(kMaxReadRunBytes / o_.block_bytes,
                                                       kMaxReadRunJobs));
    std::uint64_t at = e.offset_bytes;
    while (at < end) {
      if (stop_requested(o_)) return Status::error(Errc::cancelled, "stopped during transfer");
      FERRY_TRY(read_error_);
      if (workers_.failed()) return workers_.drain();
      // Cut at block boundaries so blocks line up with the bitmap granularity. A run starts on
      // a block boundary (else it is the one partial block) and its blocks are whole except
      // possibly the last, at the end of the extent.
      const std::uint64_t first_end = (at / o_.block_bytes + 1) * o_.block_bytes;
      std::size_t want = 1;
      if (at % o_.block_bytes == 0) {
        std::uint64_t blocks_left = (end - at + o_.block_bytes - 1) / o_.block_bytes;
        want = static_cast<std::size_t>(std::min<std::uint64_t>(blocks_left, max_run_blocks));
      }
      char* buf = nullptr;
      std::size_t got = 0;
      while (reader.in_flight() >= o_.max_inflight_reads ||
             !(buf = buffers_.try_take_run(want, &got))) {
        if (reader.in_flight() > 0)
          FERRY_TRY(poll(reader, 50));
        else
          buffers_.wait_for_free(std::chrono::milliseconds(50));
        FERRY_TRY(read_error_);
        if (workers_.failed()) return workers_.drain();
      }
      const std::uint64_t run_end =
          got == 1 ? std::min(first_end, end)
                   : std::min<std::uint64_t>(end, at + std::uint64_t(got) * o_.block_bytes);
      ReadRun run;
      for (std::uint64_t p = at; p < run_end; p += o_.block_bytes) {
        const std::uint64_t piece_end = std::min<std::uint64_t>(run_end, (p / o_.block_bytes + 1) * o_.block_bytes);
        Job job{buf + (p - at), disk_index, p, static_cast<std::uint32_t>(piece_end - p)};
        if (region) {
          FERRY_ASSERT(p % o_.block_bytes == 0 && p >= region->offset_bytes);
          job.compare = true;
          job.replica_digest = region->digests[(p - region->offset_bytes) / o_.block_bytes];
        }
        run.jobs[run.count++] = job;
        if (got == 1) break;
      }
      FERRY_ASSERT(run.count == got);
      const auto len = static_cast<std::uint32_t>(run_end - at);
      Status s = reader.submit_read(at, len, buf, [this, run](Status st) {
        if (!st.is_ok()) {
          for (std::size_t k = 0; k < run.count; ++k) buffers_.give_back(run.jobs[k].buf);
          if (read_error_.is_ok())
            read_error_ = std::move(st).with_context("read at offset " +
                                                     std::to_string(run.jobs[0].offset_bytes));
          return;
        }
        std::uint64_t bytes = 0;
        for (std::size_t k = 0; k < run.count; ++k) bytes += run.jobs[k].length_bytes;
        stats_[run.jobs[0].disk_index].read_bytes += bytes;
        workers_.push_all(run.jobs.data(), run.count);
      });
      if (!s.is_ok()) {
        for (std::size_t k = 0; k < run.count; ++k) buffers_.give_back(run.jobs[k].buf);
        return s;
      }
      at = run_end;
      note_done(len);
    }
    return Status::ok();
  }

  // Progress (SenderOptions::progress): every 64 MiB of the disk gone through.
  void note_done(std::uint64_t len) {
    done_bytes_ += len;
    if (o_.progress && (done_bytes_ & ((64u << 20) - 1)) < len) o_.progress(done_bytes_, 0);
  }

 public:
  std::uint64_t done_bytes() const { return done_bytes_; }

 private:

  // The extents of [begin, end) sent, in chunks so memory stays bounded; an extent reaching
  // past `end` (a granule wider than a block) is cut there, the rest is another range's.
  Status stream_range(cbt::BlockReader& reader, std::uint16_t disk_index, std::uint64_t begin,
                      std::uint64_t end) {
    for (std::uint64_t at = begin; at < end; at += kExtentChunkBytes) {
      std::uint64_t len = std::min(kExtentChunkBytes, end - at);
      FERRY_ASSIGN_OR_RETURN(auto extents, reader.extents(at, len, o_.block_bytes));
      for (cbt::Extent e : extents) {
        FERRY_ASSERT(e.offset_bytes >= at && e.offset_bytes + e.length_bytes <= reader.size_bytes());
        if (e.offset_bytes >= end) break;
        e.length_bytes = std::min(e.length_bytes, end - e.offset_bytes);
        totals_.extent_bytes += e.length_bytes;
        FERRY_TRY(e.zero ? send_zero(disk_index, e) : read_data(reader, disk_index, e));
        if (e.zero) note_done(e.length_bytes);
      }
    }
    return Status::ok();
  }

  Status poll(cbt::BlockReader& reader, int timeout_ms) {
    auto r = reader.poll(timeout_ms);
    if (!r.is_ok()) return r.status();
    return Status::ok();
  }

  const SenderOptions& o_;
  FrameSink& sink_;
  WorkerPool& workers_;
  BufferPool& buffers_;
  std::vector<AtomicDiskStats>& stats_;
  DiskStats& totals_;
  Status read_error_;
  std::uint64_t done_bytes_ = 0;
  std::map<std::uint32_t, Hash128> zero_digests_;  // by block length (the last may be short)
  const std::uint32_t max_zero_bytes_;
  struct ZeroRun {
    std::uint16_t disk_index = 0;
    std::uint64_t offset_bytes = 0;  // start of the part not sent yet
    std::uint64_t end_bytes = 0;
  };
  std::optional<ZeroRun> zero_run_;  // zero ranges not sent yet (see send_zero)
};

Result<transport::HelloReply> handshake(transport::Connection& conn, const SenderOptions& o) {
  transport::Hello hello;
  hello.group = o.group;
  hello.source_name = o.source_name;
  hello.features = transport::kFeatureHashList | transport::kFeatureZeroRanges |
                   transport::kFeatureDiskIdentity | transport::kFeatureVmConfig |
                   transport::kFeatureRpTimes;
  for (const auto& n : o.disk_names) hello.disks.push_back({n, 0, o.block_bytes});
  FERRY_TRY(conn.send(MsgType::hello, transport::encode(hello)));
  FERRY_ASSIGN_OR_RETURN(transport::Frame f, conn.receive(std::chrono::milliseconds(60000)));
  if (f.type == MsgType::error) {
    auto e = transport::decode_error(f.payload);
    return Status::error(Errc::protocol,
                         "receiver refused the connection: " + (e.is_ok() ? e->message : "?"));
  }
  if (f.type != MsgType::hello_reply)
    return Status::error(Errc::protocol, std::string("expected hello_reply, got ") +
                                             transport::msg_type_name(f.type));
  FERRY_ASSIGN_OR_RETURN(transport::HelloReply reply, transport::decode_hello_reply(f.payload));
  if (reply.status != transport::WireStatus::ok) {
    Errc code = reply.status == transport::WireStatus::busy ? Errc::busy : Errc::protocol;
    // Forbidden (its access map, docs/security.md) is no protocol error of ours: say so.
    const bool forbidden = reply.status == transport::WireStatus::forbidden;
    if (forbidden) code = Errc::external;
    return Status::error(code, "receiver refused group '" + o.group + "'" +
                                   (forbidden ? " (not authorised)" : "") + ": " + reply.message)
        .set_retryable(reply.status == transport::WireStatus::busy);
  }
  return reply;
}

Result<transport::RpAck> wait_for_ack(transport::Connection& conn, std::uint64_t rp_id,
                                      std::chrono::milliseconds timeout, std::uint32_t features) {
  FERRY_ASSIGN_OR_RETURN(transport::Frame f, conn.receive(timeout));
  if (f.type == MsgType::error) {
    auto e = transport::decode_error(f.payload);
    return Status::error(Errc::protocol, "receiver failed the RP: " + (e.is_ok() ? e->message : "?"));
  }
  if (f.type != MsgType::rp_ack)
    return Status::error(Errc::protocol,
                         std::string("expected rp_ack, got ") + transport::msg_type_name(f.type));
  FERRY_ASSIGN_OR_RETURN(transport::RpAck ack, transport::decode_rp_ack(f.payload, features));
  if (ack.rp_id != rp_id)
    return Status::error(Errc::protocol, "rp_ack for RP " + std::to_string(ack.rp_id) +
                                             ", expected " + std::to_string(rp_id));
  return ack;
}

// Change tracking that was lost or cannot be trusted: the disk may differ from the replica
// anywhere, so it is compared block by block rather than read as an incremental (C4).
bool tracking_lost(cbt::FullReason r) {
  switch (r) {
    case cbt::FullReason::no_bitmap:
    case cbt::FullReason::bitmap_inconsistent:
    case cbt::FullReason::bitmap_busy:
    case cbt::FullReason::no_checkpoint:
    case cbt::FullReason::new_identity: return true;
    default: return false;
  }
}

// incremental when the change tracking holds; resync when it was lost but the receiver holds
// the disk at base_rp at the same size and speaks hash_list; full otherwise (first RP, new
// disk, a resized disk, an older receiver).
transport::DiskMode mode_of(const cbt::DiskView& v, const transport::HelloReply& reply) {
  if (v.full_reason == cbt::FullReason::none) return transport::DiskMode::incremental;
  if (!tracking_lost(v.full_reason) || (reply.features & transport::kFeatureHashList) == 0)
    return transport::DiskMode::full;
  for (const auto& d : reply.disks)
    if (d.name == v.name && d.size_bytes == v.size_bytes) return transport::DiskMode::resync;
  return transport::DiskMode::full;
}

std::uint64_t replica_size(const transport::HelloReply& reply, const std::string& name) {
  for (const auto& d : reply.disks)
    if (d.name == name) return d.size_bytes;
  return 0;
}

// Where an incremental disk's dirty bitmap stops telling the whole story: QEMU marks nothing
// dirty when a disk grows, yet the grown area can hold data (a block device extended with
// `lvextend`, a file grown behind QEMU's back) or differ from what the replica held beyond its
// old end. So from the replica's end, rounded down to a block, to the new end the disk is sent
// in full. A shrink needs nothing: the receiver cuts the replica at the new size. Returns the
// disk's size when the bitmap covers all of it.
std::uint64_t grown_from(const cbt::DiskView& v, transport::DiskMode mode,
                         const transport::HelloReply& reply, std::uint32_t block_bytes) {
  if (mode != transport::DiskMode::incremental) return v.size_bytes;
  for (const auto& d : reply.disks)
    if (d.name == v.name && d.size_bytes < v.size_bytes)
      return d.size_bytes / block_bytes * block_bytes;
  return v.size_bytes;
}

const transport::ReplicaDisk* held_disk(const transport::HelloReply& reply,
                                        const std::string& name) {
  for (const auto& d : reply.disks)
    if (d.name == name) return &d;
  return nullptr;
}

std::string short_id(const Hash128& id) { return id.hex().substr(0, 8) + ".."; }

// Never an incremental across identities: a disk whose identity differs from the one the
// receiver holds under its name (names swapped on the command line, another image behind a
// node name) is read whole and sent as a resync (same size) or a full copy. A capture that
// looks like another source writing the group (rule C5.source) is refused unless `take_over`.
// Returns whether the RP carries identities (kRpFlagIdentities); `taking_over`: the capture
// is another source's and `take_over` lets it write the group (kRpFlagTakeOver).
Result<bool> check_identities(const SenderOptions& o, const transport::HelloReply& reply,
                              cbt::Capture& cap, bool& taking_over) {
  taking_over = false;
  if ((reply.features & transport::kFeatureDiskIdentity) == 0) {
    if (o.take_over)
      spdlog::warn("group '{}': --take-over has no effect: the receiver does not know disk "
                   "identities (an older release)", o.group);
    return false;
  }
  for (const cbt::DiskView& v : cap.disks)
    if (v.identity == Hash128{}) return false;  // a source without identities: as before
  if (reply.last_committed_rp != 0) {
    transport::SourceClaim held, offered;
    held.source_name = reply.held_source;
    offered.source_name = o.source_name;
    for (const auto& d : reply.disks)
      held.disks.push_back({d.name, d.identity.id, d.identity.ephemeral});
    for (const auto& v : cap.disks)
      offered.disks.push_back({v.name, v.identity, v.identity_ephemeral});
    if (transport::second_source(held, offered)) {
      if (!o.take_over)
        return Status::error(Errc::diverged,
                             transport::second_source_message(o.group, held, offered));
      spdlog::warn("{}; taking it over (--take-over): every disk is sent as a resync or a full "
                   "copy", transport::second_source_message(o.group, held, offered));
      taking_over = true;
    }
  }
  for (cbt::DiskView& v : cap.disks) {
    const transport::ReplicaDisk* h = held_disk(reply, v.name);
    const bool changed = h && h->identity.known() && !(h->identity.id == v.identity);
    if (!changed && !(taking_over && h)) continue;
    if (changed && (v.identity_ephemeral || h->identity.ephemeral))
      spdlog::warn("disk '{}' (node {}) has a new identity {}, the receiver holds id {}: its "
                   "QEMU process restarted (the identity of a disk without persistent bitmaps "
                   "lives in memory) or the disks were swapped or replaced; sending it as a "
                   "resync (a full copy if the sizes differ)", v.name, v.node,
                   short_id(v.identity), short_id(h->identity.id));
    else if (changed)
      spdlog::warn("disk '{}' is now node {} (id {}), the receiver holds '{}' as id {}: the "
                   "disks were swapped or replaced; sending it as a resync (a full copy if "
                   "the sizes differ)", v.name, v.node, short_id(v.identity), v.name,
                   short_id(h->identity.id));
    if (v.full_reason == cbt::FullReason::none || changed) {
      v.full_reason = cbt::FullReason::new_identity;
      v.dirty_context.clear();  // the whole point-in-time view, not the bitmap's extents
    }
  }
  return true;
}

// Runs everything between capture and acknowledgement; the caller finishes the capture.
Result<transport::RpAck> send_capture(transport::Connection& conn, const SenderOptions& o,
                                      const transport::HelloReply& reply,
                                      cbt::ChangeSource& source, cbt::Capture& cap,
                                      RpStats& stats, Clock::time_point t0) {
  transport::RpBegin begin;
  begin.rp_id = cap.rp_id;
  begin.base_rp = cap.base_rp;
  begin.created_unix_ns = cap.created_unix_ns;
  if (cap.app_consistent) begin.flags |= transport::kRpFlagAppConsistent;
  FERRY_ASSERT(cap.disks.size() == o.disk_names.size());
  bool taking_over = false;
  FERRY_ASSIGN_OR_RETURN(const bool identities, check_identities(o, reply, cap, taking_over));
  if (identities) begin.flags |= transport::kRpFlagIdentities;
  if (identities && taking_over) begin.flags |= transport::kRpFlagTakeOver;
  // The VM's definition, when it changed, to a receiver that keeps it (an older one would
  // refuse the flag). One too large to send is logged and skipped: the data goes on.
  if (!cap.vm_config.empty() && (reply.features & transport::kFeatureVmConfig) != 0) {
    if (cap.vm_config.size() <= transport::kMaxVmConfigBytes) {
      begin.flags |= transport::kRpFlagVmConfig;
      begin.vm_config = cap.vm_config;
      spdlog::info("RP {}: sending the VM definition ({} bytes; new or changed)", cap.rp_id,
                   cap.vm_config.size());
    } else {
      spdlog::warn("the VM definition ({} bytes) is over the {} bytes an RP carries: RP {} goes "
                   "without it", cap.vm_config.size(), transport::kMaxVmConfigBytes, cap.rp_id);
    }
  }
  std::vector<std::uint64_t> tracked_end;  // per disk, see grown_from()
  for (std::size_t i = 0; i < cap.disks.size(); ++i) {
    const cbt::DiskView& v = cap.disks[i];
    FERRY_ASSERT(v.name == o.disk_names[i]);
    const transport::DiskMode mode = mode_of(v, reply);
    begin.disks.push_back({static_cast<std::uint16_t>(i), mode, v.size_bytes,
                           {identities ? v.identity : Hash128{}, identities && v.identity_ephemeral}});
    if (mode == transport::DiskMode::resync)
      spdlog::info("disk '{}': change tracking lost ({}); resync by block digests against the "
                   "replica at RP {}", v.name, cbt::full_reason_name(v.full_reason), cap.base_rp);
    tracked_end.push_back(grown_from(v, mode, reply, o.block_bytes));
    if (tracked_end.back() < v.size_bytes)
      spdlog::info("disk '{}' grew since RP {} (replica {} bytes, now {}): bytes {}-{} are sent "
                   "in full, the dirty bitmap does not cover a resize", v.name, cap.base_rp,
                   replica_size(reply, v.name), v.size_bytes, tracked_end.back(), v.size_bytes);
    DiskStats d;
    d.name = v.name;
    d.size_bytes = v.size_bytes;
    d.full_reason = v.full_reason;
    d.mode = mode;
    stats.disks.push_back(d);
  }
  if (o.on_started) o.on_started(stats);
  FERRY_TRY(conn.send(MsgType::rp_begin, transport::encode(begin)));

  FrameSink sink(conn, transport::group_id_of(o.group), cap.rp_id);
  std::size_t buffer_count = std::max<std::size_t>(4, o.max_buffer_bytes / o.block_bytes);
  BufferPool buffers(buffer_count, o.block_bytes);
  std::vector<AtomicDiskStats> disk_stats(cap.disks.size());
  unsigned n_workers = o.workers ? o.workers
                                 : std::min<unsigned>(kMaxWorkers,
                                                      std::max(1u, std::thread::hardware_concurrency()));
  FERRY_ASSIGN_OR_RETURN(auto workers, WorkerPool::create(n_workers, o.zstd_level, o.block_bytes,
                                                          sink, buffers, disk_stats));
  // An older receiver takes zero frames of one block at most.
  const std::uint32_t max_zero_bytes = (reply.features & transport::kFeatureZeroRanges) != 0
                                           ? transport::kMaxZeroRangeBytes
                                           : transport::kMaxBlockBytes;
  auto t_transfer = Clock::now();
  Status streamed;
  // Progress over the whole RP: the disks' sizes are its total when every disk goes in full
  // (the first RP); an incremental's changed bytes are not known ahead (total 0).
  std::uint64_t progress_base = 0, progress_total = 0;
  for (const DiskStats& d : stats.disks)
    progress_total = d.mode == transport::DiskMode::full && progress_total != UINT64_MAX
                         ? progress_total + d.size_bytes : UINT64_MAX;
  if (progress_total == UINT64_MAX) progress_total = 0;
  SenderOptions po = o;
  if (o.progress)
    po.progress = [&](std::uint64_t done, std::uint64_t) { o.progress(progress_base + done, progress_total); };
  for (std::size_t i = 0; i < cap.disks.size() && streamed.is_ok(); ++i) {
    DiskStreamer ds(po, sink, *workers, buffers, disk_stats, stats.disks[i], max_zero_bytes);
    const auto index = static_cast<std::uint16_t>(i);
    streamed = stats.disks[i].mode == transport::DiskMode::resync
                   ? ds.resync(conn, index, cap.disks[i])
                   : ds.stream(index, cap.disks[i], tracked_end[i]);
    if (!streamed.is_ok())
      streamed = std::move(streamed).with_context("disk '" + cap.disks[i].name + "'");
    progress_base += ds.done_bytes();
  }
  if (o.progress && streamed.is_ok()) o.progress(progress_base, progress_total);
  Status drained = workers->drain();
  workers->shutdown();
  if (streamed.is_ok()) streamed = drained;
  for (std::size_t i = 0; i < cap.disks.size(); ++i) {
    DiskStats& d = stats.disks[i];
    d.read_bytes = disk_stats[i].read_bytes;
    d.zero_bytes = disk_stats[i].zero_bytes;
    d.data_bytes = disk_stats[i].data_bytes;
    d.payload_bytes = disk_stats[i].payload_bytes;
    d.frames = disk_stats[i].frames;
    d.resync_compared_blocks = disk_stats[i].compared_blocks;
    d.resync_sent_blocks = disk_stats[i].differing_blocks;
    stats.hash_bytes += d.resync_hash_bytes;
  }
  if (!streamed.is_ok()) {
    std::string why = streamed.code() == Errc::disconnected || streamed.code() == Errc::io
                          ? peer_reason(conn) : std::string();
    return why.empty() ? streamed : std::move(streamed).with_context("receiver: " + why);
  }
  // Everything is read: end the views now so the guest stops paying for copy-before-write.
  if (Status s = source.release_views(cap); !s.is_ok()) {
    // data_lost: the view did not stay point-in-time (the fleecing job ended early), so what
    // was read may mix two instants; such an RP must never be committed.
    if (s.data_lost()) return std::move(s).with_context("point-in-time view broke");
    spdlog::warn("releasing the point-in-time views failed (cleaned up next time): {}",
                 s.to_string());
  }
  stats.transfer_seconds = seconds_since(t_transfer);

  auto t_commit = Clock::now();
  attribute_transfer(stats, sink.send_seconds(), workers->hash_compress_seconds());
  transport::RpEnd end{cap.rp_id, sink.frames(), sink.logical_bytes()};
  if ((reply.features & transport::kFeatureRpTimes) != 0) {  // kept with the RP by the receiver
    auto us = [](double s) { return std::uint64_t(s * 1e6); };
    end.times = transport::SourceTimes{us(stats.slot_seconds), us(stats.capture_seconds),
                                       us(stats.read_seconds), us(stats.hash_compress_seconds),
                                       us(stats.send_seconds)};
  }
  FERRY_TRY(conn.send(MsgType::rp_end, transport::encode(end)));
  FERRY_TRY(conn.flush());
  stats.send_seconds += seconds_since(t_commit);  // the flush: the link's too
  const auto t_durable = Clock::now();
  FERRY_ASSIGN_OR_RETURN(transport::RpAck ack,
                         wait_for_ack(conn, cap.rp_id, o.ack_timeout, reply.features));
  stats.durable_seconds = seconds_since(t_durable);
  // The receiver's word (kFeatureRpTimes): the wait for the ack was its commit plus the bytes
  // still in the kernels' buffers and on the link, which are the send stage's.
  if (ack.times) {
    const double durable = std::min(stats.durable_seconds, double(ack.times->durable_us) / 1e6);
    stats.send_seconds += stats.durable_seconds - durable;
    stats.durable_seconds = durable;
  }
  stats.commit_seconds = seconds_since(t_commit);
  stats.total_seconds = seconds_since(t0);
  if (ack.status != transport::WireStatus::ok)
    return Status::error(transport::errc_of(ack.status),
                         "receiver rejected RP " + std::to_string(cap.rp_id) + ": " + ack.message)
        .set_retryable(transport::wire_status_retryable(ack.status));
  return ack;
}

}  // namespace

Result<RpStats> take_recovery_point(cbt::ChangeSource& source, const SenderOptions& o) {
  FERRY_ASSERT(o.block_bytes >= kMinSendBlockBytes && transport::block_bytes_valid(o.block_bytes));
  FERRY_ASSERT(!o.disk_names.empty());
  const auto t0 = Clock::now();
  const double cpu0 = process_cpu_seconds();
  FERRY_ASSIGN_OR_RETURN(auto conn, transport::Connection::connect(o.to, o.connection));
  FERRY_ASSIGN_OR_RETURN(transport::HelloReply reply, handshake(*conn, o));
  if (o.on_receiver_state) o.on_receiver_state(reply.last_committed_rp, reply.last_committed_unix_ns);

  RpStats stats;
  stats.slot_seconds = seconds_since(t0);
  stats.base_rp = reply.last_committed_rp;
  stats.rp_id = reply.last_committed_rp + 1;
  std::vector<std::string> held;
  for (const auto& d : reply.disks) held.push_back(d.name);

  auto t_capture = Clock::now();
  stats.created_unix_ns = std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                            std::chrono::system_clock::now().time_since_epoch())
                                            .count());
  FERRY_ASSIGN_OR_RETURN(cbt::Capture cap, source.capture(stats.base_rp, stats.rp_id, held));
  stats.capture_seconds = seconds_since(t_capture);
  stats.vms_paused = cap.vms_paused;
  stats.pause_us = cap.pause_us;
  const std::uint64_t wire0 = conn->bytes_sent();

  Result<transport::RpAck> acked = send_capture(*conn, o, reply, source, cap, stats, t0);
  stats.wire_bytes = conn->bytes_sent() - wire0;

  auto t_finish = Clock::now();
  Status finished = source.finish(cap, acked.is_ok());  // fires the source.*_bitmap_cleanup points
  stats.finish_seconds = seconds_since(t_finish);
  stats.cpu_seconds = process_cpu_seconds() - cpu0;
  conn->close();
  if (!acked.is_ok()) {
    if (!finished.is_ok())
      spdlog::error("could not merge the dirty bitmaps back after a failed RP: {}",
                    finished.to_string());
    return std::move(acked).status().with_context("RP " + std::to_string(stats.rp_id));
  }
  if (!finished.is_ok())  // The RP is durable; stale bitmaps are healed at the next capture.
    spdlog::warn("RP {} is committed, but cleaning up its bitmaps failed: {}", stats.rp_id,
                 finished.to_string());
  return stats;
}

std::string describe(const RpStats& s) {
  std::uint64_t data = 0, zero = 0, payload = 0, compared = 0, differing = 0, read = 0;
  std::size_t resynced = 0;
  for (const auto& d : s.disks) {
    data += d.data_bytes;
    zero += d.zero_bytes;
    payload += d.payload_bytes;
    compared += d.resync_compared_blocks;
    differing += d.resync_sent_blocks;
    read += d.read_bytes;
    resynced += d.mode == transport::DiskMode::resync;
  }
  double mb = double(data + zero) / 1e6;
  std::string resync;
  if (resynced > 0)
    resync = fmt::format("; resync of {} disk(s): {} blocks compared, {} differed and were sent, "
                         "{} hash bytes ({:.2f} MB)",
                         resynced, compared, differing, s.hash_bytes, s.hash_bytes / 1e6);
  std::string pause;
  if (s.vms_paused) pause = fmt::format("; VMs paused {:.1f} ms", s.pause_us / 1000.0);
  return fmt::format(
      "RP {} (base {}): {} disk(s), {:.1f} MB changed ({:.1f} MB data, {:.1f} MB zero, {} bytes "
      "read), "
      "{:.1f} MB on the wire, {:.2f} s ({:.0f} MB/s; capture {:.2f} s, transfer {:.2f} s, "
      "commit {:.2f} s, then finish {:.2f} s){}{}; {} wire bytes",
      s.rp_id, s.base_rp, s.disks.size(), mb, data / 1e6, zero / 1e6, read, s.wire_bytes / 1e6,
      s.total_seconds, s.total_seconds > 0 ? mb / s.total_seconds : 0.0, s.capture_seconds,
      s.transfer_seconds, s.commit_seconds, s.finish_seconds, resync, pause, s.wire_bytes);
}

void attribute_transfer(RpStats& stats, double send_channel_seconds, double hash_compress_seconds) {
  const double wall = stats.transfer_seconds;
  FERRY_ASSERT(wall >= 0 && send_channel_seconds >= 0 && hash_compress_seconds >= 0);
  stats.send_seconds = std::min(wall, send_channel_seconds);
  stats.hash_compress_seconds = std::min(wall - stats.send_seconds, hash_compress_seconds);
  stats.read_seconds = wall - stats.send_seconds - stats.hash_compress_seconds;
}

}  // namespace ferry::source
