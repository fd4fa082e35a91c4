// Little-endian field access for on-disk and on-wire layouts. Every layout in Ferry is
// little-endian and read/written field by field: never by casting a struct.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "ferry/base/status.h"

namespace ferry {

// Appends fields to a byte string.
class ByteWriter {
 public:
  explicit ByteWriter(std::string& out) : out_(out) {}
  void u8(std::uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u16(std::uint16_t v) { put(v, 2); }
  void u32(std::uint32_t v) { put(v, 4); }
  void u64(std::uint64_t v) { put(v, 8); }
  void bytes(const void* p, std::size_t n) { out_.append(static_cast<const char*>(p), n); }
  // u16 length + bytes; asserts the length fits.
  void str16(std::string_view s) {
    FERRY_ASSERT(s.size() <= 0xffff);
    u16(static_cast<std::uint16_t>(s.size()));
    bytes(s.data(), s.size());
  }
  std::size_t size() const { return out_.size(); }

 private:
  void put(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  std::string& out_;
};

// Reads fields from a byte span; every read is bounds-checked and a short read sets a
// sticky failure instead of reading past the end.
class ByteReader {
 public:
  ByteReader(const void* p, std::size_t n) : p_(static_cast<const unsigned char*>(p)), n_(n) {}
  explicit ByteReader(std::string_view s) : ByteReader(s.data(), s.size()) {}
  std::uint8_t u8() { return static_cast<std::uint8_t>(get(1)); }
  std::uint16_t u16() { return static_cast<std::uint16_t>(get(2)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(get(4)); }
  std::uint64_t u64() { return get(8); }
  bool bytes(void* out, std::size_t n) {
    if (!ok_ || n_ - pos_ < n) { ok_ = false; return false; }
    std::memcpy(out, p_ + pos_, n);
    pos_ += n;
    return true;
  }
  std::string str16(std::size_t max_len) {
    std::uint16_t len = u16();
    if (!ok_ || len > max_len || n_ - pos_ < len) { ok_ = false; return {}; }
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return s;
  }
  bool ok() const { return ok_; }
  std::size_t pos() const { return pos_; }
  std::size_t remaining() const { return ok_ ? n_ - pos_ : 0; }

 private:
  std::uint64_t get(int n) {
    if (!ok_ || n_ - pos_ < static_cast<std::size_t>(n)) { ok_ = false; return 0; }
    std::uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= std::uint64_t(p_[pos_ + i]) << (8 * i);
    pos_ += n;
    return v;
  }
  const unsigned char* p_;
  std::size_t n_;
  std::size_t pos_ = 0;
  bool ok_ = true;
};

inline void store_le32(void* p, std::uint32_t v) {
  auto* b = static_cast<unsigned char*>(p);
  for (int i = 0; i < 4; ++i) b[i] = (v >> (8 * i)) & 0xff;
}
inline void store_le64(void* p, std::uint64_t v) {
  auto* b = static_cast<unsigned char*>(p);
  for (int i = 0; i < 8; ++i) b[i] = (v >> (8 * i)) & 0xff;
}
inline std::uint32_t load_le32(const void* p) {
  auto* b = static_cast<const unsigned char*>(p);
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= std::uint32_t(b[i]) << (8 * i);
  return v;
}
inline std::uint64_t load_le64(const void* p) {
  auto* b = static_cast<const unsigned char*>(p);
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= std::uint64_t(b[i]) << (8 * i);
  return v;
}

}  // namespace ferry
