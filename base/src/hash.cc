#include "ferry/base/hash.h"

#include <xxhash.h>

#include <cstring>

namespace ferry {

Hash128 xxh3_128(const void* data, std::size_t size) {
  XXH128_hash_t h = XXH3_128bits(data, size);
  return Hash128{h.low64, h.high64};
}

std::uint64_t xxh3_64(const void* data, std::size_t size) { return XXH3_64bits(data, size); }

std::string Hash128::hex() const {
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(hi),
                static_cast<unsigned long long>(lo));
  return buf;
}

bool is_all_zero(const void* data, std::size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  // Check the first 16 bytes, then compare the buffer with itself shifted by 16: if the
  // head is zero and every byte equals the one 16 before it, all bytes are zero.
  if (size < 16) {
    for (std::size_t i = 0; i < size; ++i)
      if (p[i]) return false;
    return true;
  }
  static const unsigned char kZero[16] = {};
  if (std::memcmp(p, kZero, 16) != 0) return false;
  return std::memcmp(p, p + 16, size - 16) == 0;
}

}  // namespace ferry
