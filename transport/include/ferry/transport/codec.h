// zstd compression of blocks, with RAII owners of the zstd contexts (one per thread).
#pragma once

#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "ferry/base/status.h"
#include "ferry/transport/rules.h"  // kDefaultZstdLevel

namespace ferry::transport {

class Compressor {
 public:
  static Result<Compressor> create(int level);
  // Compresses src into dst (capacity dst_cap >= bound(src_len)); returns the compressed size.
  Result<std::size_t> compress(const void* src, std::size_t src_len, void* dst,
                               std::size_t dst_cap);
  static std::size_t bound(std::size_t src_len) { return ZSTD_compressBound(src_len); }
  int level() const { return level_; }

 private:
  struct Free {
    void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
  };
  Compressor(ZSTD_CCtx* c, int level) : ctx_(c), level_(level) {}
  std::unique_ptr<ZSTD_CCtx, Free> ctx_;
  int level_;
};

class Decompressor {
 public:
  static Result<Decompressor> create();
  // Decompresses exactly `expected_len` bytes into dst; anything else is Errc::corrupt.
  Status decompress(const void* src, std::size_t src_len, void* dst, std::size_t expected_len);

 private:
  struct Free {
    void operator()(ZSTD_DCtx* c) const { ZSTD_freeDCtx(c); }
  };
  explicit Decompressor(ZSTD_DCtx* c) : ctx_(c) {}
  std::unique_ptr<ZSTD_DCtx, Free> ctx_;
};

}  // namespace ferry::transport
