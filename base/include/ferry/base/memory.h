// Memory the data path reuses instead of faulting in again.
//
// On this project's target hosts (and markedly in paravirtualized guests, where every page
// fault and TLB flush is a hypercall) the cost of moving a block is dominated by faulting in
// fresh pages, not by copying them. Two measures keep the data path on warm memory:
//  * tune_allocator(): glibc keeps freed memory instead of returning it to the kernel after
//    every burst of frame-sized frees (measured: 17k -> 6k minor faults and -34% source CPU
//    on a 200 MiB incremental RP, bench/profile-rp --time);
//  * PinnedRegion: one anonymous mapping for a fixed pool, asked to be backed by huge pages,
//    touched once at creation, released as a whole.
#pragma once

#include <cstddef>

namespace ferry {

// Sets the process's malloc trim and mmap thresholds (idempotent; call early in main()).
// The freed memory glibc then keeps is bounded by the trim threshold (64 MiB).
void tune_allocator();

// An anonymous, page-aligned, zero-filled mapping of `bytes`, prefaulted; huge pages where
// the kernel offers them (THP "madvise" mode). Move-only.
class PinnedRegion {
 public:
  PinnedRegion() = default;
  explicit PinnedRegion(std::size_t bytes);
  PinnedRegion(PinnedRegion&& o) noexcept;
  PinnedRegion& operator=(PinnedRegion&& o) noexcept;
  PinnedRegion(const PinnedRegion&) = delete;
  PinnedRegion& operator=(const PinnedRegion&) = delete;
  ~PinnedRegion();

  char* data() const { return data_; }
  std::size_t size() const { return bytes_; }

 private:
  void release();
  char* data_ = nullptr;
  std::size_t bytes_ = 0;
  std::size_t mapped_ = 0;
};

}  // namespace ferry
