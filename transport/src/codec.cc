#include "ferry/transport/codec.h"

#include <string>

namespace ferry::transport {

Result<Compressor> Compressor::create(int level) {
  if (level < ZSTD_minCLevel() || level > ZSTD_maxCLevel())
    return Status::error(Errc::invalid_argument,
                         "zstd level " + std::to_string(level) + " is outside " +
                             std::to_string(ZSTD_minCLevel()) + ".." +
                             std::to_string(ZSTD_maxCLevel()));
  ZSTD_CCtx* c = ZSTD_createCCtx();
  if (!c) return Status::error(Errc::internal, "ZSTD_createCCtx failed (out of memory)");
  size_t r = ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level);
  if (ZSTD_isError(r)) {
    ZSTD_freeCCtx(c);
    return Status::error(Errc::internal, std::string("zstd level: ") + ZSTD_getErrorName(r));
  }
  // Blocks are small and independent; a checksum inside zstd would duplicate our xxh3.
  ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0);
  ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 1);
  return Compressor(c, level);
}

Result<std::size_t> Compressor::compress(const void* src, std::size_t src_len, void* dst,
                                         std::size_t dst_cap) {
  FERRY_ASSERT(dst_cap >= bound(src_len));
  size_t r = ZSTD_compress2(ctx_.get(), dst, dst_cap, src, src_len);
  if (ZSTD_isError(r))
    return Status::error(Errc::internal, std::string("zstd compress: ") + ZSTD_getErrorName(r));
  return r;
}

Result<Decompressor> Decompressor::create() {
  ZSTD_DCtx* c = ZSTD_createDCtx();
  if (!c) return Status::error(Errc::internal, "ZSTD_createDCtx failed (out of memory)");
  return Decompressor(c);
}

Status Decompressor::decompress(const void* src, std::size_t src_len, void* dst,
                                std::size_t expected_len) {
  // The frame header states the content size: check it before decompressing so a hostile
  // frame cannot make us write past dst or spend time on a bomb.
  unsigned long long content = ZSTD_getFrameContentSize(src, src_len);
  if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN)
    return Status::error(Errc::corrupt, "zstd payload has no valid frame header");
  if (content != expected_len)
    return Status::error(Errc::corrupt, "zstd payload decodes to " + std::to_string(content) +
                                            " bytes, frame says " + std::to_string(expected_len));
  size_t r = ZSTD_decompressDCtx(ctx_.get(), dst, expected_len, src, src_len);
  if (ZSTD_isError(r))
    return Status::error(Errc::corrupt, std::string("zstd decompress: ") + ZSTD_getErrorName(r));
  if (r != expected_len)
    return Status::error(Errc::corrupt, "zstd payload decoded to " + std::to_string(r) +
                                            " bytes, expected " + std::to_string(expected_len));
  return Status::ok();
}

}  // namespace ferry::transport
