#include "ferry/base/memory.h"

#include <malloc.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <utility>

#include "ferry/base/status.h"

namespace ferry {
namespace {
constexpr std::size_t kHugePage = 2u << 20;
}

void tune_allocator() {
  // Frames are at most a few MiB: serve them from the heap, never from fresh mmaps, and keep
  // up to 64 MiB of freed heap instead of trimming it after every burst.
  mallopt(M_MMAP_THRESHOLD, 8 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  mallopt(M_TOP_PAD, 4 << 20);
}

PinnedRegion::PinnedRegion(std::size_t bytes) : bytes_(bytes) {
  FERRY_ASSERT(bytes > 0);
  // Map one huge page more, so the region can start on a huge-page boundary.
  mapped_ = (bytes + kHugePage - 1) / kHugePage * kHugePage + kHugePage;
  void* p = mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  auto base = reinterpret_cast<std::uintptr_t>(p);
  auto aligned = (base + kHugePage - 1) / kHugePage * kHugePage;
  // Unmap the unaligned head and the tail beyond the aligned region.
  if (aligned > base) munmap(p, aligned - base);
  std::size_t keep = mapped_ - kHugePage;
  std::uintptr_t end = base + mapped_;
  if (end > aligned + keep) munmap(reinterpret_cast<void*>(aligned + keep), end - (aligned + keep));
  mapped_ = keep;
  data_ = reinterpret_cast<char*>(aligned);
  (void)madvise(data_, mapped_, MADV_HUGEPAGE);  // advisory: small pages are fine too
  std::memset(data_, 0, mapped_);                 // fault it in now, once
}

PinnedRegion::PinnedRegion(PinnedRegion&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)),
      mapped_(std::exchange(o.mapped_, 0)) {}

PinnedRegion& PinnedRegion::operator=(PinnedRegion&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    mapped_ = std::exchange(o.mapped_, 0);
  }
  return *this;
}

PinnedRegion::~PinnedRegion() { release(); }

void PinnedRegion::release() {
  if (data_) munmap(data_, mapped_);
  data_ = nullptr;
}

}  // namespace ferry
