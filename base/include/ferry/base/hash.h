// xxh3-128, the one block digest used everywhere (frames, journal, oracle).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ferry {

struct Hash128 {
  std::uint64_t lo = 0;
  std::uint64_t hi = 0;
  friend bool operator==(const Hash128&, const Hash128&) = default;
  std::string hex() const;  // 32 hex digits, high half first (as xxhsum prints)
};

Hash128 xxh3_128(const void* data, std::size_t size);
std::uint64_t xxh3_64(const void* data, std::size_t size);
// True when all `size` bytes are zero (fast, word at a time).
bool is_all_zero(const void* data, std::size_t size);

}  // namespace ferry
