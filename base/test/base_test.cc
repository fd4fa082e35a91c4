#include <catch2/catch.hpp>
#include <string>
#include <vector>

#include "ferry/base/bytes.h"
#include "ferry/base/hash.h"
#include "ferry/base/status.h"
#include "ferry/base/units.h"

using namespace ferry;

TEST_CASE("Status carries code, errno and flags") {
  Status ok;
  CHECK(ok.is_ok());
  Status s = Status::from_errno(28, "write journal");  // ENOSPC
  CHECK(s.code() == Errc::no_space);
  CHECK(s.sys_errno() == 28);
  CHECK(s.retryable());
  CHECK(s.to_string().find("write journal") != std::string::npos);
  Status d = std::move(s).with_context("rp 7");
  CHECK(d.message().rfind("rp 7: write journal", 0) == 0);
  d.set_data_lost();
  CHECK(d.data_lost());
}

static Result<int> half(int x) {
  if (x % 2) return Status::error(Errc::invalid_argument, "odd");
  return x / 2;
}
static Status quarter(int x, int* out) {
  FERRY_ASSIGN_OR_RETURN(int h, half(x));
  FERRY_ASSIGN_OR_RETURN(*out, half(h));
  return Status::ok();
}

TEST_CASE("Result and the try macros propagate errors") {
  int out = 0;
  CHECK(quarter(8, &out).is_ok());
  CHECK(out == 2);
  Status e = quarter(6, &out);
  CHECK(e.code() == Errc::invalid_argument);
}

TEST_CASE("ByteReader never reads past the end") {
  std::string buf;
  ByteWriter w(buf);
  w.u32(0xdeadbeef);
  w.u64(42);
  w.str16("disk0");
  ByteReader r(buf);
  CHECK(r.u32() == 0xdeadbeefu);
  CHECK(r.u64() == 42);
  CHECK(r.str16(64) == "disk0");
  CHECK(r.ok());
  CHECK(r.u8() == 0);
  CHECK_FALSE(r.ok());
  ByteReader r2(buf.data(), 3);
  CHECK(r2.u32() == 0);
  CHECK_FALSE(r2.ok());
}

TEST_CASE("xxh3 and zero detection") {
  std::vector<char> z(65536, 0);
  CHECK(is_all_zero(z.data(), z.size()));
  z[65535] = 1;
  CHECK_FALSE(is_all_zero(z.data(), z.size()));
  z[65535] = 0;
  z[3] = 1;
  CHECK_FALSE(is_all_zero(z.data(), z.size()));
  CHECK(is_all_zero(z.data(), 3));
  Hash128 a = xxh3_128("abc", 3), b = xxh3_128("abd", 3);
  CHECK_FALSE(a == b);
  CHECK(a.hex().size() == 32);
}

TEST_CASE("human_bytes: B to EiB, exact form adds the byte count") {
  CHECK(human_bytes(0) == "0 B");
  CHECK(human_bytes(1023) == "1023 B");
  CHECK(human_bytes(1536) == "1.5 KiB");
  CHECK(human_bytes(20ull << 40) == "20.0 TiB");
  CHECK(human_bytes(3ull << 50) == "3.0 PiB");
  CHECK(human_bytes(~0ull) == "16.0 EiB");
  CHECK(human_bytes_exact(512) == "512 B (512 bytes)");
  CHECK(human_bytes_exact(20ull << 40) == "20.0 TiB (21990232555520 bytes)");
}
