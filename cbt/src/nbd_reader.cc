// BlockReader over NBD (libnbd, unix socket): the point-in-time view exported by QEMU.
//
// Reads are libnbd aio commands; the completion callback only records the finished op (no
// libnbd calls from inside libnbd callbacks), and poll() runs the caller's callbacks
// afterwards. Op slots are reused through a free list so the read path does not allocate.
#include <libnbd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <deque>
#include <memory>

#include <fmt/format.h>

#include "extent_math.h"
#include "ferry/base/log.h"
#include "ferry/cbt/reader.h"

namespace ferry::cbt {
namespace {

constexpr const char* kAllocContext = "base:allocation";
// base:allocation flags (NBD protocol). HOLE (1) alone does not promise zeros: only ZERO.
constexpr std::uint32_t kNbdStateZero = 2;
constexpr std::uint32_t kNbdStateDirty = 1;  // qemu:dirty-bitmap flag
constexpr std::uint64_t kMaxStatusRequestBytes = 1ull << 30;  // per NBD_CMD_BLOCK_STATUS
constexpr std::uint32_t kMaxReadRequestBytes = 32u << 20;     // libnbd's payload cap
constexpr std::size_t kMaxExtentEntries = 4u << 20;           // per extents() call

// The one place libnbd errors become Status.
Status nbd_error(const char* what, const std::string& where) {
  const char* msg = nbd_get_error();
  int err = nbd_get_errno();
  std::string text = fmt::format("{} ({}): {}", what, where, msg ? msg : "unknown libnbd error");
  if (err == 0) return Status::error(Errc::external, text);
  Status s = Status::from_errno(err, text);
  return s;
}

struct NbdClose {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using NbdPtr = std::unique_ptr<nbd_handle, NbdClose>;

class NbdReader final : public BlockReader {
 public:
  static Result<std::unique_ptr<BlockReader>> open(const DiskView& view);

  std::uint64_t size_bytes() const override { return size_bytes_; }
  Result<std::vector<Extent>> extents(std::uint64_t offset_bytes, std::uint64_t length_bytes,
                                      std::uint32_t align_bytes) override;
  Status submit_read(std::uint64_t offset_bytes, std::uint32_t length_bytes, void* buf,
                     Done done) override;
  Result<unsigned> poll(int timeout_ms) override;
  unsigned in_flight() const override { return in_flight_; }

 private:
  struct Op {
    NbdReader* owner = nullptr;
    Done done;
    int error = 0;            // first errno of any part
    std::uint32_t parts_left = 0;
    std::uint32_t index = 0;      // position in ops_
    std::uint32_t next_free = 0;  // free-list link while unused
  };
  static constexpr std::uint32_t kNoSlot = UINT32_MAX;

  NbdReader(NbdPtr h, std::string where) : h_(std::move(h)), where_(std::move(where)) {}
  static int on_complete(void* user_data, int* error);
  Op* take_slot();
  void free_slot(Op* op);
  Status collect_status(std::uint64_t pos, std::uint64_t end, std::vector<Extent>& alloc,
                        std::vector<Range>& dirty, std::uint64_t& covered);

  NbdPtr h_;
  std::string where_;  // "socket/export" for messages
  std::uint64_t size_bytes_ = 0;
  std::uint32_t max_request_bytes_ = kMaxReadRequestBytes;
  std::string dirty_context_;
  std::deque<Op> ops_;  // stable addresses: libnbd holds pointers into it
  std::uint32_t free_head_ = kNoSlot;
  std::vector<Op*> completed_;
  std::vector<Op*> delivering_;
  unsigned in_flight_ = 0;
};

Result<std::unique_ptr<BlockReader>> NbdReader::open(const DiskView& view) {
  std::string where = view.nbd_socket + " export " + view.export_name;
  NbdPtr h(nbd_create());
  if (!h) return nbd_error("nbd_create", where);
  if (nbd_add_meta_context(h.get(), kAllocContext) == -1)
    return nbd_error("nbd_add_meta_context", where);
  if (!view.dirty_context.empty() &&
      nbd_add_meta_context(h.get(), view.dirty_context.c_str()) == -1)
    return nbd_error("nbd_add_meta_context", where);
  if (nbd_set_export_name(h.get(), view.export_name.c_str()) == -1)
    return nbd_error("nbd_set_export_name", where);
  if (nbd_connect_unix(h.get(), view.nbd_socket.c_str()) == -1)
    return nbd_error("nbd_connect_unix", where);

  std::unique_ptr<NbdReader> r(new NbdReader(std::move(h), where));
  nbd_handle* hp = r->h_.get();
  if (nbd_can_meta_context(hp, kAllocContext) != 1)
    return Status::error(Errc::unsupported,
                         fmt::format("NBD server {} does not offer {}", where, kAllocContext));
  if (!view.dirty_context.empty() && nbd_can_meta_context(hp, view.dirty_context.c_str()) != 1)
    return Status::error(Errc::not_found, fmt::format("NBD server {} does not offer {}", where,
                                                      view.dirty_context));
  int64_t size = nbd_get_size(hp);
  if (size < 0) return nbd_error("nbd_get_size", where);
  r->size_bytes_ = static_cast<std::uint64_t>(size);
  int64_t max_req = nbd_get_block_size(hp, LIBNBD_SIZE_MAXIMUM);
  if (max_req > 0)
    r->max_request_bytes_ = static_cast<std::uint32_t>(
        std::min<int64_t>(max_req, kMaxReadRequestBytes));
  r->dirty_context_ = view.dirty_context;
  r->completed_.reserve(256);
  r->delivering_.reserve(256);
  return std::unique_ptr<BlockReader>(std::move(r));
}

// Block status for [pos, end): appends allocation runs and dirty ranges, and sets `covered`
// to how far both contexts were described (servers may answer for less than asked).
Status NbdReader::collect_status(std::uint64_t pos, std::uint64_t end, std::vector<Extent>& alloc,
                                 std::vector<Range>& dirty, std::uint64_t& covered) {
  struct Reply {
    const std::string* dirty_context;
    std::vector<Extent> alloc;
    std::vector<Range> dirty;
    std::uint64_t alloc_end = 0, dirty_end = 0;
    std::size_t entries = 0;
  } reply{&dirty_context_, {}, {}, pos, pos, 0};
  auto cb = [](void* ud, const char* ctx, std::uint64_t off, std::uint32_t* entries,
               std::size_t nr_entries, int* /*error*/) -> int {
    auto* rp = static_cast<Reply*>(ud);
    bool is_alloc = std::string_view(ctx) == kAllocContext;
    if (!is_alloc && *rp->dirty_context != ctx) return 0;
    std::uint64_t at = off;
    for (std::size_t i = 0; i + 1 < nr_entries; i += 2) {
      std::uint32_t len = entries[i], flags = entries[i + 1];
      if (len == 0) continue;
      if (is_alloc)
        rp->alloc.push_back({at, len, (flags & kNbdStateZero) != 0});
      else if (flags & kNbdStateDirty)
        rp->dirty.push_back({at, len});
      at += len;
    }
    rp->entries += nr_entries / 2;
    (is_alloc ? rp->alloc_end : rp->dirty_end) = at;
    return 0;
  };
  std::uint64_t ask = std::min(end - pos, kMaxStatusRequestBytes);
  if (nbd_block_status(h_.get(), ask, pos, nbd_extent_callback{cb, &reply, nullptr}, 0) == -1)
    return nbd_error("nbd_block_status", where_);
  covered = std::min(reply.alloc_end, pos + ask);
  if (!dirty_context_.empty()) covered = std::min(covered, reply.dirty_end);
  if (covered <= pos)
    return Status::error(Errc::protocol, fmt::format("NBD server {}: block status at {} "
                                                     "described nothing", where_, pos));
  for (Extent& e : reply.alloc) {
    if (e.offset_bytes >= covered) break;
    e.length_bytes = std::min(e.offset_bytes + e.length_bytes, covered) - e.offset_bytes;
    alloc.push_back(e);
  }
  for (Range& d : reply.dirty) {
    if (d.offset_bytes >= covered) break;
    d.length_bytes = std::min(d.end(), covered) - d.offset_bytes;
    if (!dirty.empty() && dirty.back().end() == d.offset_bytes)
      dirty.back().length_bytes += d.length_bytes;
    else
      dirty.push_back(d);
  }
  if (alloc.size() + dirty.size() > kMaxExtentEntries)
    return Status::error(Errc::invalid_argument,
                         fmt::format("NBD server {}: more than {} extents in one range; ask for "
                                     "a smaller range", where_, kMaxExtentEntries));
  return Status::ok();
}

Result<std::vector<Extent>> NbdReader::extents(std::uint64_t offset_bytes,
                                               std::uint64_t length_bytes,
                                               std::uint32_t align_bytes) {
  FERRY_ASSIGN_OR_RETURN(Range w, extents_window(offset_bytes, length_bytes, align_bytes,
                                                 size_bytes_));
  std::vector<Extent> alloc;
  std::vector<Range> dirty;
  for (std::uint64_t pos = w.offset_bytes; pos < w.end();) {
    std::uint64_t covered = 0;
    FERRY_TRY(collect_status(pos, w.end(), alloc, dirty, covered));
    pos = covered;
  }
  if (!dirty_context_.empty()) return dirty_extents(dirty, alloc, align_bytes, size_bytes_);
  std::vector<Extent> out;
  append_aligned(out, alloc, align_bytes, size_bytes_);
  return out;
}

NbdReader::Op* NbdReader::take_slot() {
  if (free_head_ == kNoSlot) {
    ops_.emplace_back();
    ops_.back().owner = this;
    ops_.back().index = static_cast<std::uint32_t>(ops_.size() - 1);
    return &ops_.back();
  }
  Op* op = &ops_[free_head_];
  free_head_ = op->next_free;
  return op;
}

void NbdReader::free_slot(Op* op) {
  op->done = nullptr;
  op->error = 0;
  op->next_free = free_head_;
  free_head_ = op->index;
}

int NbdReader::on_complete(void* user_data, int* error) {
  auto* op = static_cast<Op*>(user_data);
  if (*error != 0 && op->error == 0) op->error = *error;
  FERRY_ASSERT(op->parts_left > 0);
  if (--op->parts_left == 0) op->owner->completed_.push_back(op);
  return 1;  // retire the command
}

Status NbdReader::submit_read(std::uint64_t offset_bytes, std::uint32_t length_bytes, void* buf,
                              Done done) {
  FERRY_ASSERT(length_bytes > 0 && buf != nullptr);
  if (offset_bytes > size_bytes_ || length_bytes > size_bytes_ - offset_bytes)
    return Status::error(Errc::invalid_argument,
                         fmt::format("read [{}, +{}) beyond the end of {} ({} bytes)",
                                     offset_bytes, length_bytes, where_, size_bytes_));
  Op* op = take_slot();
  op->done = std::move(done);
  const std::uint32_t parts = (length_bytes + max_request_bytes_ - 1) / max_request_bytes_;
  op->parts_left = parts;
  ++in_flight_;
  for (std::uint32_t i = 0; i < parts; ++i) {
    std::uint32_t off = i * max_request_bytes_;
    std::uint32_t len = std::min(max_request_bytes_, length_bytes - off);
    if (nbd_aio_pread(h_.get(), static_cast<char*>(buf) + off, len, offset_bytes + off,
                      nbd_completion_callback{&NbdReader::on_complete, op, nullptr}, 0) != -1)
      continue;
    Status s = nbd_error("nbd_aio_pread", where_);
    op->parts_left -= parts - i;  // the parts never submitted will never complete
    if (i == 0) {  // nothing in flight: report here, the callback is not called
      --in_flight_;
      free_slot(op);
      return s;
    }
    if (op->error == 0) op->error = s.sys_errno() ? s.sys_errno() : EIO;
    if (op->parts_left == 0) completed_.push_back(op);
    break;
  }
  return Status::ok();
}

Result<unsigned> NbdReader::poll(int timeout_ms) {
  using Clock = std::chrono::steady_clock;
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  Status poll_error;
  while (completed_.empty() && nbd_aio_in_flight(h_.get()) > 0) {
    int wait_ms = -1;
    if (timeout_ms >= 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      wait_ms = static_cast<int>(std::max<long long>(0, left.count()));
    }
    int r = nbd_poll(h_.get(), wait_ms);
    if (r == -1) {
      poll_error = nbd_error("nbd_poll", where_);
      break;
    }
    if (r == 0 && wait_ms >= 0 && Clock::now() >= deadline) break;
  }
  if (completed_.empty() && !poll_error.is_ok()) return poll_error;
  delivering_.swap(completed_);  // callbacks may submit (and complete) new reads
  unsigned n = 0;
  for (Op* op : delivering_) {
    Done done = std::move(op->done);
    Status s = op->error == 0 ? Status::ok()
                              : Status::from_errno(op->error, "NBD read from " + where_);
    free_slot(op);
    --in_flight_;
    ++n;
    done(std::move(s));
  }
  delivering_.clear();
  return n;
}

}  // namespace

Result<std::unique_ptr<BlockReader>> open_nbd_reader(const DiskView& view) {
  return NbdReader::open(view);
}

}  // namespace ferry::cbt
