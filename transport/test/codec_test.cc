#include <catch2/catch.hpp>
#include <random>
#include <string>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/transport/codec.h"

using namespace ferry;
using namespace ferry::transport;

static std::vector<char> mixed_block(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<char> b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = (i / 512) % 2 ? char(rng()) : char('a' + i % 7);
  return b;
}

TEST_CASE("zstd round trip keeps every byte and the xxh3 digest") {
  auto c = Compressor::create(kDefaultZstdLevel);
  REQUIRE(c.is_ok());
  auto d = Decompressor::create();
  REQUIRE(d.is_ok());
  for (std::size_t n : {std::size_t(1), std::size_t(4096), std::size_t(65536), std::size_t(65536 + 17)}) {
    auto in = mixed_block(n, unsigned(n));
    std::vector<char> packed(Compressor::bound(n));
    auto len = c->compress(in.data(), n, packed.data(), packed.size());
    REQUIRE(len.is_ok());
    std::vector<char> out(n);
    REQUIRE(d->decompress(packed.data(), *len, out.data(), n).is_ok());
    CHECK(out == in);
    CHECK(xxh3_128(out.data(), n) == xxh3_128(in.data(), n));
  }
}

TEST_CASE("a zstd payload that lies about its size or is damaged is corrupt, never written past") {
  auto c = Compressor::create(3);
  auto d = Decompressor::create();
  REQUIRE((c.is_ok() && d.is_ok()));
  auto in = mixed_block(65536, 7);
  std::vector<char> packed(Compressor::bound(in.size()));
  auto len = c->compress(in.data(), in.size(), packed.data(), packed.size());
  REQUIRE(len.is_ok());
  std::vector<char> out(65536);
  SECTION("expected length differs from the frame's content size") {
    Status s = d->decompress(packed.data(), *len, out.data(), 4096);
    CHECK(s.code() == Errc::corrupt);
  }
  SECTION("truncated payload") {
    Status s = d->decompress(packed.data(), *len / 2, out.data(), out.size());
    CHECK(s.code() == Errc::corrupt);
  }
  SECTION("garbage") {
    std::string junk(100, 'x');
    Status s = d->decompress(junk.data(), junk.size(), out.data(), out.size());
    CHECK(s.code() == Errc::corrupt);
  }
  SECTION("a flipped byte is caught by zstd or by the block digest") {
    std::vector<char> bad(packed.begin(), packed.begin() + *len);
    bad[bad.size() / 2] ^= 0x40;
    Status s = d->decompress(bad.data(), bad.size(), out.data(), out.size());
    bool caught = !s.is_ok() || !(xxh3_128(out.data(), out.size()) == xxh3_128(in.data(), in.size()));
    CHECK(caught);
  }
}

TEST_CASE("levels outside zstd's range are refused with the range") {
  auto c = Compressor::create(99);
  REQUIRE_FALSE(c.is_ok());
  CHECK(c.status().code() == Errc::invalid_argument);
  CHECK(c.status().message().find("99") != std::string::npos);
}
