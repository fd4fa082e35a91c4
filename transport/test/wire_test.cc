// Wire codec: round trips of every message, every rejection rule, bit flips in frames.
#include <catch2/catch.hpp>

#include <cstring>
#include <string>

#include "ferry/base/bytes.h"
#include "ferry/transport/rules.h"
#include "ferry/transport/wire.h"

using namespace ferry;
using namespace ferry::transport;

namespace {

Hello sample_hello() {
  Hello h;
  h.features = 0;
  h.group = "vm-web-01";
  h.source_name = "host-a/ferry[4242]";
  h.disks = {{"vda", 10ull << 30, 65536}, {"vdb", 512ull << 20, 4096}};
  return h;
}

HelloReply sample_reply() {
  HelloReply r;
  r.status = WireStatus::ok;
  r.message = "welcome";
  r.last_committed_rp = 17;
  r.last_committed_unix_ns = 1700000000123456789ull;
  r.disks = {{"vda", 10ull << 30}, {"vdb", 0}};
  return r;
}

RpBegin sample_begin() {
  RpBegin b;
  b.rp_id = 18;
  b.base_rp = 17;
  b.created_unix_ns = 1700000000999ull;
  b.flags = kRpFlagAppConsistent;
  b.disks = {{0, DiskMode::incremental, 10ull << 30}, {1, DiskMode::full, 512ull << 20}};
  return b;
}

DataFrame sample_data() {
  DataFrame d;
  d.group_id = group_id_of("vm-web-01");
  d.rp_id = 18;
  d.seq = 5;
  d.disk_index = 1;
  d.kind = BlockKind::data;
  d.codec = Codec::none;
  d.offset_bytes = 3 * 65536;
  d.payload = std::string(4096, 'x');
  d.length_bytes = 4096;
  d.hash = xxh3_128(d.payload.data(), d.payload.size());
  return d;
}

// Expects a protocol error whose message names `field`.
template <class T>
void expect_rejected(const Result<T>& r, const std::string& field) {
  INFO("expected rejection naming " << field);
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == Errc::protocol);
  CHECK_THAT(r.status().message(), Catch::Contains(field));
}

void put_u16(std::string& s, std::size_t at, std::uint16_t v) {
  s[at] = static_cast<char>(v & 0xff);
  s[at + 1] = static_cast<char>(v >> 8);
}
void put_u32(std::string& s, std::size_t at, std::uint32_t v) { store_le32(s.data() + at, v); }
// Adds one byte to the u16-length-prefixed string whose length sits at `length_at`.
void grow_string(std::string& s, std::size_t length_at) {
  std::uint16_t len = static_cast<std::uint16_t>(static_cast<unsigned char>(s[length_at]) |
                                                 static_cast<unsigned char>(s[length_at + 1]) << 8);
  put_u16(s, length_at, static_cast<std::uint16_t>(len + 1));
  s.insert(length_at + 2, 1, 'm');
}

}  // namespace

TEST_CASE("every message survives a round trip") {
  Hello h = sample_hello();
  CHECK(decode_hello(encode(h)).value() == h);
  HelloReply r = sample_reply();
  CHECK(decode_hello_reply(encode(r)).value() == r);
  RpBegin b = sample_begin();
  CHECK(decode_rp_begin(encode(b)).value() == b);
  DataFrame d = sample_data();
  CHECK(decode_data(encode(d)).value() == d);
  DataFrame z;
  z.group_id = 1;
  z.rp_id = 2;
  z.kind = BlockKind::zero;
  z.offset_bytes = 1ull << 40;
  z.length_bytes = kMaxBlockBytes;
  CHECK(decode_data(encode(z)).value() == z);
  DataFrame c = sample_data();
  c.codec = Codec::zstd;
  c.payload = "compressed";  // the codec checks are the engine's; here only sizes matter
  CHECK(decode_data(encode(c)).value() == c);
  RpEnd e{18, 1000, 1000 * 65536ull};
  CHECK(decode_rp_end(encode(e)).value() == e);
  RpAck a{18, WireStatus::diverged, "base 16 is not 17"};
  CHECK(decode_rp_ack(encode(a)).value() == a);
  ErrorMsg m{WireStatus::busy, "another source sends to vm-web-01"};
  CHECK(decode_error(encode(m)).value() == m);
}

TEST_CASE("encoded sizes match docs/wire-protocol.md") {
  CHECK(encode(RpEnd{}).size() == 24);
  CHECK(encode(ErrorMsg{}).size() == 4);
  CHECK(encode(RpAck{}).size() == 12);
  DataFrame z;
  z.kind = BlockKind::zero;
  z.length_bytes = 1;
  CHECK(encode(z).size() == 56);
  CHECK(encode(RpBegin{1, 0, 0, 0, {{0, DiskMode::full, 1}}}).size() == 32 + 12);
  HelloReply r;
  CHECK(encode(r).size() == 28);
  Hello h;
  h.group = "g";
  h.disks = {{"d", 1, 512}};
  CHECK(encode(h).size() == 8 + 3 + 2 + 3 + 12);
}

TEST_CASE("names at the limit pass, one byte more fails") {
  Hello h = sample_hello();
  h.group = std::string(kMaxNameBytes, 'g');
  h.disks[0].name = std::string(kMaxNameBytes, 'd');
  CHECK(decode_hello(encode(h)).is_ok());
  h.group.push_back('g');
  expect_rejected(decode_hello(encode(h)), "hello.group");
  h = sample_hello();
  h.source_name = std::string(kMaxNameBytes + 1, 's');
  expect_rejected(decode_hello(encode(h)), "hello.source_name");
  h = sample_hello();
  h.disks[1].name = std::string(kMaxNameBytes + 1, 'd');
  expect_rejected(decode_hello(encode(h)), "hello.disks[1].name");
  HelloReply r = sample_reply();
  r.disks[0].name = std::string(kMaxNameBytes + 1, 'd');
  expect_rejected(decode_hello_reply(encode(r)), "hello_reply.disks[0].name");
  // Encoders assert the message limit, so the over-long ones are made by growing a valid
  // message of exactly kMaxMessageBytes by one byte in place.
  const std::string full(kMaxMessageBytes, 'm');
  r = sample_reply();
  r.message = full;
  std::string p = encode(r);
  CHECK(decode_hello_reply(p).is_ok());
  grow_string(p, 26);
  expect_rejected(decode_hello_reply(p), "hello_reply.message");
  p = encode(RpAck{1, WireStatus::ok, full});
  CHECK(decode_rp_ack(p).is_ok());
  grow_string(p, 10);
  expect_rejected(decode_rp_ack(p), "rp_ack.message");
  p = encode(ErrorMsg{WireStatus::ok, full});
  CHECK(decode_error(p).is_ok());
  grow_string(p, 2);
  expect_rejected(decode_error(p), "error.message");
}

TEST_CASE("required names must not be empty") {
  Hello h = sample_hello();
  h.group.clear();
  expect_rejected(decode_hello(encode(h)), "hello.group");
  h = sample_hello();
  h.disks[0].name.clear();
  expect_rejected(decode_hello(encode(h)), "hello.disks[0].name");
  h = sample_hello();
  h.source_name.clear();  // optional
  CHECK(decode_hello(encode(h)).is_ok());
  HelloReply r = sample_reply();
  r.disks[1].name.clear();
  expect_rejected(decode_hello_reply(encode(r)), "hello_reply.disks[1].name");
}

TEST_CASE("disk counts are bounded and disks unique") {
  Hello h = sample_hello();
  h.disks.clear();
  expect_rejected(decode_hello(encode(h)), "hello.disk_count");
  for (std::size_t i = 0; i < kMaxDisksPerGroup; ++i)
    h.disks.push_back({"d" + std::to_string(i), 1, 4096});
  CHECK(decode_hello(encode(h)).is_ok());
  std::string p = encode(h);
  put_u16(p, 2, kMaxDisksPerGroup + 1);  // count only: must fail on the count, not later
  expect_rejected(decode_hello(p), "hello.disk_count");
  h = sample_hello();
  h.disks[1].name = h.disks[0].name;
  expect_rejected(decode_hello(encode(h)), "hello.disks[1].name");
  h = sample_hello();
  h.disks[0].block_bytes = 3000;
  expect_rejected(decode_hello(encode(h)), "hello.disks[0].block_bytes");
  h.disks[0].block_bytes = 256;
  expect_rejected(decode_hello(encode(h)), "hello.disks[0].block_bytes");
  h.disks[0].block_bytes = kMaxBlockBytes * 2;
  expect_rejected(decode_hello(encode(h)), "hello.disks[0].block_bytes");

  HelloReply r = sample_reply();
  std::string rp = encode(r);
  put_u16(rp, 24, kMaxDisksPerGroup + 1);
  expect_rejected(decode_hello_reply(rp), "hello_reply.disk_count");

  RpBegin b = sample_begin();
  b.disks.clear();
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.disk_count");
  b = sample_begin();
  std::string bp = encode(b);
  put_u16(bp, 28, kMaxDisksPerGroup + 1);
  expect_rejected(decode_rp_begin(bp), "rp_begin.disk_count");
  b = sample_begin();
  b.disks[1].disk_index = b.disks[0].disk_index;
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.disks[1].disk_index");
  b = sample_begin();
  b.disks[0].disk_index = kMaxDisksPerGroup;
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.disks[0].disk_index");
}

TEST_CASE("unknown enum values and reserved bits are rejected") {
  std::string p = encode(sample_reply());
  put_u16(p, 2, 10);  // 9 is forbidden, the last known status
  expect_rejected(decode_hello_reply(p), "hello_reply.status");
  p = encode(RpAck{1, WireStatus::ok, ""});
  put_u16(p, 8, 0xffff);
  expect_rejected(decode_rp_ack(p), "rp_ack.status");
  p = encode(ErrorMsg{});
  put_u16(p, 0, 100);
  expect_rejected(decode_error(p), "error.status");

  RpBegin b = sample_begin();
  p = encode(b);
  p[32 + 2] = 3;  // disks[0].mode (2 is resync)
  expect_rejected(decode_rp_begin(p), "rp_begin.disks[0].mode");
  p = encode(b);
  p[32 + 3] = 1;  // disks[0].reserved
  expect_rejected(decode_rp_begin(p), "rp_begin.disks[0].reserved");
  p = encode(b);
  put_u16(p, 30, 1);
  expect_rejected(decode_rp_begin(p), "rp_begin.reserved");
  b.flags = 1u << 5;  // bits 1 and 2 are identities and take-over
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.flags");

  DataFrame d = sample_data();
  p = encode(d);
  p[38] = 2;
  expect_rejected(decode_data(p), "data.kind");
  p = encode(d);
  p[39] = 2;
  expect_rejected(decode_data(p), "data.codec");
}

TEST_CASE("rp_begin must move forward") {
  RpBegin b = sample_begin();
  b.rp_id = b.base_rp;
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.rp_id");
  b.rp_id = 0;
  b.base_rp = 0;
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.rp_id");
}

TEST_CASE("data frames: length, kind, codec and payload agree") {
  DataFrame d = sample_data();
  d.length_bytes = 0;
  d.payload.clear();
  expect_rejected(decode_data(encode(d)), "data.length_bytes");
  d = sample_data();
  d.length_bytes = kMaxBlockBytes + 1;
  expect_rejected(decode_data(encode(d)), "data.length_bytes");
  d = sample_data();
  d.length_bytes = 4095;  // codec none: payload must be exactly length_bytes
  expect_rejected(decode_data(encode(d)), "data.payload");
  d = sample_data();
  d.codec = Codec::zstd;
  d.payload.clear();
  expect_rejected(decode_data(encode(d)), "data.payload");
  d = sample_data();
  d.kind = BlockKind::zero;
  d.hash = {};
  expect_rejected(decode_data(encode(d)), "data.payload");  // zero kind with a payload
  d.payload.clear();
  d.codec = Codec::zstd;
  expect_rejected(decode_data(encode(d)), "data.codec");
  d.codec = Codec::none;
  d.hash = {1, 0};
  expect_rejected(decode_data(encode(d)), "data.hash");
  d = sample_data();
  d.offset_bytes = UINT64_MAX - 100;
  expect_rejected(decode_data(encode(d)), "data.offset_bytes");
  d = sample_data();
  d.disk_index = kMaxDisksPerGroup;
  expect_rejected(decode_data(encode(d)), "data.disk_index");
  expect_rejected(decode_rp_end(encode(RpEnd{1, 1, kMaxBlockBytes * 2ull})), "rp_end.logical_bytes");
}

// Feature zero_ranges (docs/wire-protocol.md): only then may a zero frame exceed 4 MiB, up to
// kMaxZeroRangeBytes; data frames keep their bound; without it a long zero frame is a bad frame.
TEST_CASE("data frames: zero ranges beyond 4 MiB only with the zero_ranges feature") {
  CHECK(kMaxZeroRangeBytes == 0xffc00000u);
  CHECK(kMaxZeroRangeBytes % kMaxBlockBytes == 0);
  CHECK((kKnownFeatures & kFeatureZeroRanges) != 0);
  CHECK(kFeatureZeroRanges == (1u << 2));
  DataFrame z;
  z.group_id = 1;
  z.rp_id = 2;
  z.seq = 3;
  z.kind = BlockKind::zero;
  z.offset_bytes = 20ull << 40;
  z.length_bytes = kMaxZeroRangeBytes;
  CHECK(decode_data(encode(z), kFeatureZeroRanges).value() == z);
  CHECK(decode_data(encode(z), kFeatureZeroRanges | kFeatureHashList).value() == z);
  expect_rejected(decode_data(encode(z)), "data.length_bytes");  // not negotiated
  expect_rejected(decode_data(encode(z), kFeatureHashList), "data.length_bytes");
  z.length_bytes = kMaxBlockBytes + 1;
  expect_rejected(decode_data(encode(z)), "data.length_bytes");
  CHECK(decode_data(encode(z), kFeatureZeroRanges).value() == z);
  z.length_bytes = kMaxBlockBytes;  // short zero frames read the same either way
  CHECK(decode_data(encode(z)).value() == z);
  CHECK(decode_data(encode(z), kFeatureZeroRanges).value() == z);
  z.length_bytes = kMaxZeroRangeBytes + 1;  // past the bound, feature or not
  expect_rejected(decode_data(encode(z), kFeatureZeroRanges), "data.length_bytes");
  z.length_bytes = 0xffffffffu;
  expect_rejected(decode_data(encode(z), kFeatureZeroRanges), "data.length_bytes");
  z.length_bytes = kMaxZeroRangeBytes;
  z.offset_bytes = UINT64_MAX - kMaxZeroRangeBytes + 1;
  expect_rejected(decode_data(encode(z), kFeatureZeroRanges), "data.offset_bytes");
  // A data frame stays at 4 MiB with the feature.
  DataFrame d = sample_data();
  d.length_bytes = kMaxBlockBytes + 1;
  d.payload.assign(d.length_bytes, 'x');
  expect_rejected(decode_data(encode(d), kFeatureZeroRanges), "data.length_bytes");
  // rp_end: logical_bytes bounded by frame_count x the longest frame the connection allows.
  RpEnd e{7, 2, 2ull * kMaxZeroRangeBytes};
  CHECK(decode_rp_end(encode(e), kFeatureZeroRanges).value() == e);
  expect_rejected(decode_rp_end(encode(e)), "rp_end.logical_bytes");
  expect_rejected(decode_rp_end(encode(RpEnd{7, 2, 3ull * kMaxZeroRangeBytes}), kFeatureZeroRanges),
                  "rp_end.logical_bytes");
}

TEST_CASE("encode_data with the payload apart gives the same bytes as encode") {
  DataFrame d = sample_data();
  DataFrame fields = d;
  fields.payload.clear();
  std::string apart = encode_data(fields, d.payload);
  CHECK(apart == encode(d));
  auto back = decode_data(apart);
  REQUIRE(back.is_ok());
  CHECK(*back == d);
}

TEST_CASE("truncated payloads and trailing bytes are rejected") {
  const std::string payloads[] = {encode(sample_hello()), encode(sample_reply()),
                                  encode(sample_begin()), encode(RpEnd{1, 2, 3}),
                                  encode(RpAck{1, WireStatus::ok, "ok"}),
                                  encode(ErrorMsg{WireStatus::internal, "boom"})};
  auto decode_any = [](int i, std::string_view p) -> Status {
    switch (i) {
      case 0: return decode_hello(p).status();
      case 1: return decode_hello_reply(p).status();
      case 2: return decode_rp_begin(p).status();
      case 3: return decode_rp_end(p).status();
      case 4: return decode_rp_ack(p).status();
      default: return decode_error(p).status();
    }
  };
  for (int i = 0; i < 6; ++i) {
    const std::string& p = payloads[i];
    REQUIRE(decode_any(i, p).is_ok());
    for (std::size_t cut = 0; cut < p.size(); ++cut) {
      INFO("message " << i << " cut at " << cut);
      Status s = decode_any(i, std::string_view(p).substr(0, cut));
      CHECK(s.code() == Errc::protocol);
    }
    Status s = decode_any(i, p + "x");
    CHECK(s.code() == Errc::protocol);
    CHECK_THAT(s.message(), Catch::Contains("trailing"));
  }
  // DATA's payload is "the rest", so a truncated data frame fails on its size rules.
  std::string d = encode(sample_data());
  for (std::size_t cut = 0; cut < d.size(); cut += 7)
    CHECK(decode_data(std::string_view(d).substr(0, cut)).status().code() == Errc::protocol);
}

TEST_CASE("a foreign version decodes to its version only") {
  std::string p = encode(sample_hello());
  put_u16(p, 0, 2);
  p += "layout of version 2";
  Result<Hello> h = decode_hello(p);
  REQUIRE(h.is_ok());
  CHECK(h->version == 2);
  CHECK(h->group.empty());
  std::string r = encode(sample_reply());
  put_u16(r, 0, 3);
  put_u16(r, 2, static_cast<std::uint16_t>(WireStatus::bad_version));
  Result<HelloReply> hr = decode_hello_reply(r);
  REQUIRE(hr.is_ok());
  CHECK(hr->version == 3);
  CHECK(hr->status == WireStatus::bad_version);
}

TEST_CASE("frame header rules, checked before any payload") {
  std::string f = encode_frame(MsgType::rp_end, encode(RpEnd{1, 2, 3}));
  REQUIRE(f.size() == kFrameHeaderBytes + 24);
  Result<FrameHeader> h = decode_frame_header(f.data());
  REQUIRE(h.is_ok());
  CHECK(h->type == MsgType::rp_end);
  CHECK(h->payload_bytes == 24);
  CHECK(verify_frame(f.data(), std::string_view(f).substr(kFrameHeaderBytes)).is_ok());

  auto rejected = [](std::string frame, const char* field) {
    expect_rejected(decode_frame_header(frame.data()), field);
  };
  std::string g = f;
  put_u32(g, 0, 0x31595247);
  rejected(g, "frame.magic");
  g = f;
  put_u16(g, 4, 0);
  rejected(g, "frame.type");
  put_u16(g, 4, 8);
  rejected(g, "frame.type");
  g = f;
  put_u16(g, 6, 1);
  rejected(g, "frame.flags");
  g = f;
  put_u32(g, 8, kMaxPayloadBytes + 1);
  rejected(g, "frame.payload_bytes");
  put_u32(g, 8, kMaxPayloadBytes);
  CHECK(decode_frame_header(g.data()).is_ok());
  g = f;
  put_u32(g, 12, 1);
  rejected(g, "frame.reserved");
  // The payload must be as long as the header says.
  Status s = verify_frame(f.data(), std::string_view(f).substr(kFrameHeaderBytes, 23));
  CHECK(s.code() == Errc::protocol);
  CHECK_THAT(s.message(), Catch::Contains("frame.payload_bytes"));
}

TEST_CASE("every single bit flip in a frame is detected") {
  DataFrame d = sample_data();
  d.payload = std::string(100, 'q');
  d.length_bytes = 100;
  std::string frame = encode_frame(MsgType::data, encode(d));
  for (std::size_t bit = 0; bit < frame.size() * 8; ++bit) {
    std::string g = frame;
    g[bit / 8] = static_cast<char>(g[bit / 8] ^ (1 << (bit % 8)));
    Result<FrameHeader> h = decode_frame_header(g.data());
    if (!h.is_ok()) continue;
    INFO("bit " << bit);
    // A flipped payload_bytes makes the frame a different length: the receiver reads that
    // many bytes, which here means the payload no longer matches.
    std::string_view payload = std::string_view(g).substr(kFrameHeaderBytes);
    CHECK(verify_frame(g.data(), payload).code() == Errc::protocol);
  }
}

TEST_CASE("group ids are xxh3-64 of the name") {
  CHECK(group_id_of("vm-web-01") == xxh3_64("vm-web-01", 9));
  CHECK(group_id_of("a") != group_id_of("b"));
  CHECK(std::string(msg_type_name(MsgType::rp_ack)) == "rp_ack");
  CHECK(msg_type_known(7));
  CHECK_FALSE(msg_type_known(8));  // kept for rp_resume
  CHECK_FALSE(msg_type_known(9));
  CHECK(msg_type_known(10));
  CHECK(msg_type_known(11));
  CHECK(msg_type_known(12));  // points_request, points_reply
  CHECK(msg_type_known(13));
  CHECK(msg_type_known(14));  // probe, probe_reply
  CHECK(msg_type_known(15));
  CHECK_FALSE(msg_type_known(16));
  CHECK(std::string(msg_type_name(MsgType::hash_list)) == "hash_list");
}

// --- resync messages -------------------------------------------------------------------

namespace {

HashRequest sample_hash_request() { return HashRequest{3, 65536, 128ull << 20, 64ull << 20}; }

HashList sample_hash_list(std::size_t count = 5) {
  HashList l;
  l.disk_index = 3;
  l.block_bytes = 65536;
  l.offset_bytes = 128ull << 20;
  for (std::size_t i = 0; i < count; ++i) l.hashes.push_back({i * 7 + 1, ~i});
  return l;
}

}  // namespace

TEST_CASE("resync messages: round trips and sizes") {
  HashRequest q = sample_hash_request();
  CHECK(encode(q).size() == 24);
  CHECK(decode_hash_request(encode(q)).value() == q);
  q.length_bytes = kMaxHashRequestBytes;  // the limit itself passes
  q.block_bytes = 512;
  q.offset_bytes = 512 * 3;
  CHECK(decode_hash_request(encode(q)).value() == q);
  HashList l = sample_hash_list();
  CHECK(encode(l).size() == kHashListFixedBytes + 5 * kHashBytes);
  CHECK(decode_hash_list(encode(l)).value() == l);
  HashList big = sample_hash_list(kMaxHashesPerList);
  std::string p = encode(big);
  CHECK(p.size() <= kMaxPayloadBytes);
  CHECK(decode_hash_list(p).value() == big);
  // Digests travel lo then hi, like data.hash.
  HashList one = sample_hash_list(1);
  one.hashes[0] = {0x0102030405060708ull, 0x1112131415161718ull};
  p = encode(one);
  CHECK(load_le64(p.data() + 24) == 0x0102030405060708ull);
  CHECK(load_le64(p.data() + 32) == 0x1112131415161718ull);
  RpBegin b = sample_begin();
  b.disks[0].mode = DiskMode::resync;
  CHECK(decode_rp_begin(encode(b)).value() == b);
  std::string bp = encode(b);
  bp[32 + 2] = 3;
  expect_rejected(decode_rp_begin(bp), "rp_begin.disks[0].mode");
}

TEST_CASE("hash_request: every rule") {
  HashRequest q = sample_hash_request();
  q.disk_index = kMaxDisksPerGroup;
  expect_rejected(decode_hash_request(encode(q)), "hash_request.disk_index");
  q = sample_hash_request();
  for (std::uint32_t bad : {0u, 256u, 3000u, kMaxBlockBytes * 2}) {
    q.block_bytes = bad;
    expect_rejected(decode_hash_request(encode(q)), "hash_request.block_bytes");
  }
  q = sample_hash_request();
  q.offset_bytes += 512;  // not a multiple of the block size
  expect_rejected(decode_hash_request(encode(q)), "hash_request.offset_bytes");
  q = sample_hash_request();
  q.length_bytes = 0;
  expect_rejected(decode_hash_request(encode(q)), "hash_request.length_bytes");
  q.length_bytes = kMaxHashRequestBytes + 1;
  expect_rejected(decode_hash_request(encode(q)), "hash_request.length_bytes");
  q = sample_hash_request();
  q.offset_bytes = (UINT64_MAX / 65536) * 65536;
  expect_rejected(decode_hash_request(encode(q)), "hash_request.offset_bytes");
  std::string p = encode(sample_hash_request());
  put_u16(p, 2, 1);
  expect_rejected(decode_hash_request(p), "hash_request.reserved");
  p = encode(sample_hash_request());
  for (std::size_t cut = 0; cut < p.size(); ++cut)
    CHECK(decode_hash_request(std::string_view(p).substr(0, cut)).status().code() == Errc::protocol);
  expect_rejected(decode_hash_request(p + "x"), "trailing");
}

TEST_CASE("hash_list: every rule, count checked before allocation") {
  std::string good = encode(sample_hash_list());
  std::string p = good;
  put_u16(p, 0, kMaxDisksPerGroup);
  expect_rejected(decode_hash_list(p), "hash_list.disk_index");
  p = good;
  put_u16(p, 2, 1);
  expect_rejected(decode_hash_list(p), "hash_list.reserved");
  p = good;
  put_u32(p, 20, 1);
  expect_rejected(decode_hash_list(p), "hash_list.reserved");
  p = good;
  put_u32(p, 4, 1000);
  expect_rejected(decode_hash_list(p), "hash_list.block_bytes");
  p = good;
  store_le64(p.data() + 8, (128ull << 20) + 4096);
  expect_rejected(decode_hash_list(p), "hash_list.offset_bytes");
  p = good;
  store_le64(p.data() + 8, (UINT64_MAX / 65536 - 2) * 65536);  // the 5 blocks pass the end
  expect_rejected(decode_hash_list(p), "hash_list.offset_bytes");
  p = good;
  put_u32(p, 16, 0);
  expect_rejected(decode_hash_list(p), "hash_list.count");
  // A count over the limit fails on the count, not on the (missing) digests.
  p = good;
  put_u32(p, 16, kMaxHashesPerList + 1);
  expect_rejected(decode_hash_list(p), "hash_list.count");
  p = good;
  put_u32(p, 16, 0xffffffffu);
  expect_rejected(decode_hash_list(p), "hash_list.count");
  // count and digest bytes must agree both ways.
  p = good;
  put_u32(p, 16, 6);
  expect_rejected(decode_hash_list(p), "hash_list.hashes");
  p = good;
  put_u32(p, 16, 4);
  expect_rejected(decode_hash_list(p), "hash_list.hashes");
  expect_rejected(decode_hash_list(good + "x"), "hash_list.hashes");
  for (std::size_t cut = 0; cut < good.size(); ++cut)
    CHECK(decode_hash_list(std::string_view(good).substr(0, cut)).status().code() == Errc::protocol);
}

TEST_CASE("resync frames: checksummed like any other") {
  std::string f = encode_frame(MsgType::hash_list, encode(sample_hash_list()));
  Result<FrameHeader> h = decode_frame_header(f.data());
  REQUIRE(h.is_ok());
  CHECK(h->type == MsgType::hash_list);
  CHECK(verify_frame(f.data(), std::string_view(f).substr(kFrameHeaderBytes)).is_ok());
  f[kFrameHeaderBytes + 30] ^= 1;  // one bit of a digest
  CHECK(verify_frame(f.data(), std::string_view(f).substr(kFrameHeaderBytes)).code() ==
        Errc::protocol);
}

TEST_CASE("disk identities: only behind the feature and the flag") {
  // Without the feature, hello_reply is byte for byte what an older source expects.
  HelloReply r = sample_reply();
  const std::size_t plain = encode(r).size();
  r.held_source = "host-a:/run/qsd.qmp";
  r.disks[0].identity = {{0x1111, 0x2222}, false};
  CHECK(encode(r).size() == plain);
  CHECK(decode_hello_reply(encode(r)).value().held_source.empty());

  // With it: held_source str16, then 17 bytes per disk; zero (unknown) identities allowed.
  r.features = kFeatureDiskIdentity;
  r.disks[1].identity = {};
  std::string p = encode(r);
  CHECK(p.size() == plain + 2 + r.held_source.size() + 17 * r.disks.size());
  CHECK(decode_hello_reply(p).value() == r);
  expect_rejected(decode_hello_reply(p.substr(0, p.size() - 1)), "hello_reply.identities[1]");
  expect_rejected(decode_hello_reply(p + "x"), "hello_reply.payload");
  std::string bad = p;
  bad[p.size() - 17] = 2;  // unknown identity flag
  expect_rejected(decode_hello_reply(bad), "hello_reply.identities[1].flags");
  bad[p.size() - 17] = 1;  // ephemeral on an unknown identity
  expect_rejected(decode_hello_reply(bad), "hello_reply.identities[1].flags");

  // rp_begin: no identities without the flag (an older receiver rejects the flag itself).
  RpBegin b = sample_begin();
  b.disks[0].identity = {{1, 2}, false};
  CHECK(encode(b).size() == 32 + 12 * 2);
  b.flags |= kRpFlagIdentities;
  b.disks[1].identity = {{3, 4}, true};
  std::string q = encode(b);
  CHECK(q.size() == 32 + 12 * 2 + 17 * 2);
  CHECK(decode_rp_begin(q).value() == b);
  expect_rejected(decode_rp_begin(q.substr(0, q.size() - 8)), "rp_begin.identities[1].id");
  b.disks[1].identity = {};
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.identities[1].id");
  b.disks[1].identity = {{3, 4}, false};
  b.flags |= kRpFlagTakeOver;
  CHECK(decode_rp_begin(encode(b)).value() == b);
  b.flags &= ~kRpFlagIdentities;
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.flags");
  b.flags = 1u << 5;
  expect_rejected(decode_rp_begin(encode(b)), "rp_begin.flags");
  CHECK(kFeatureZeroRanges != kFeatureDiskIdentity);  // one bit each
}

TEST_CASE("forbidden: a status of its own, known to this build, never retried") {
  HelloReply r;
  r.status = WireStatus::forbidden;
  r.message = "identity uri:spiffe://ferry/source-a may not write group 'B'";
  CHECK(static_cast<int>(WireStatus::forbidden) == 9);
  CHECK(decode_hello_reply(encode(r)).value() == r);
  CHECK_FALSE(wire_status_retryable(WireStatus::forbidden));
  CHECK(errc_of(WireStatus::forbidden) == Errc::external);
  // What a previous release does with it: its decoder knows statuses up to 8 and fails with
  // a protocol error naming the field, so its source stops cleanly (test "unknown enum values").
}

TEST_CASE("points_request and points_reply: round trips, bounds, checked before allocation") {
  PointsRequest q{"web01"};
  CHECK(decode_points_request(encode(q)).value() == q);
  CHECK(encode(q).size() == 2 + 5);
  expect_rejected(decode_points_request(encode(PointsRequest{std::string(kMaxNameBytes, 'g')}) + "x"),
                  "points_request.payload");
  std::string empty_group = "\0\0";
  expect_rejected(decode_points_request(empty_group), "points_request.group");

  PointsReply r;
  r.points = {{1, 10, 11, 0}, {2, 20, 21, 4096}, {5, 50, 51, 8192}};
  std::string p = encode(r);
  CHECK(p.size() == 10 + 3 * kPointBytes);  // status, flags, message length, count
  CHECK(decode_points_reply(p).value() == r);
  for (std::size_t cut = 0; cut < p.size(); ++cut)
    CHECK(decode_points_reply(std::string_view(p).substr(0, cut)).status().code() == Errc::protocol);
  expect_rejected(decode_points_reply(p + "x"), "points_reply.points");
  std::string bad = p;
  put_u16(bad, 2, 2);  // unknown flag bit
  expect_rejected(decode_points_reply(bad), "points_reply.flags");
  bad = p;
  put_u16(bad, 0, 10);
  expect_rejected(decode_points_reply(bad), "points_reply.status");
  // A count past the bound fails before anything is allocated.
  bad = p;
  bad[6] = '\xff';
  bad[7] = '\xff';
  expect_rejected(decode_points_reply(bad), "points_reply.count");
  // RP ids move forward.
  r.points[2].rp_id = 2;
  expect_rejected(decode_points_reply(encode(r)), "points_reply.points");

  PointsReply no;
  no.status = WireStatus::forbidden;
  no.message = "identity uri:spiffe://ferry/source-a may not manage group 'web01'";
  CHECK(decode_points_reply(encode(no)).value() == no);

  PointsReply full;
  full.truncated = true;
  for (std::uint64_t i = 1; i <= kMaxPointsPerReply; ++i) full.points.push_back({i, i, i, i});
  full.message = std::string(kMaxMessageBytes, 'm');
  full.status = WireStatus::ok;
  std::string big = encode(full);
  CHECK(big.size() <= kMaxPayloadBytes);
  CHECK(decode_points_reply(big).value() == full);
  CHECK(msg_type_known(static_cast<std::uint16_t>(MsgType::points_request)));
  CHECK(msg_type_known(static_cast<std::uint16_t>(MsgType::points_reply)));
  CHECK_FALSE(msg_type_known(16));
  CHECK(std::string(msg_type_name(MsgType::points_reply)) == "points_reply");
}

// kRpFlagVmConfig (feature vm_config): u32 length + the domain XML after the disks and
// identities; bounded before allocation, the flag and the bytes go together.
TEST_CASE("rp_begin carries the VM's definition with kRpFlagVmConfig") {
  RpBegin b = sample_begin();
  b.flags |= kRpFlagVmConfig;
  b.vm_config = "<domain type='qemu'><name>vm</name></domain>";
  const std::string p = encode(b);
  CHECK(p.size() == encode(sample_begin()).size() + 4 + b.vm_config.size());
  CHECK(decode_rp_begin(p).value() == b);

  // Without the flag the payload is unchanged (an older receiver never sees the bytes).
  CHECK(decode_rp_begin(encode(sample_begin())).value().vm_config.empty());

  std::string q = p;  // the length says more than is left
  put_u32(q, q.size() - b.vm_config.size() - 4, static_cast<std::uint32_t>(b.vm_config.size() + 1));
  expect_rejected(decode_rp_begin(q), "rp_begin.vm_config");
  q = p;  // over the limit: refused before any allocation
  put_u32(q, q.size() - b.vm_config.size() - 4, kMaxVmConfigBytes + 1);
  expect_rejected(decode_rp_begin(q), "rp_begin.vm_config_bytes");
  q = p;  // empty is not a config: the flag would be a lie
  put_u32(q, q.size() - b.vm_config.size() - 4, 0);
  expect_rejected(decode_rp_begin(q), "rp_begin.vm_config_bytes");
  q = p.substr(0, p.size() - b.vm_config.size() - 2);  // cut inside the length
  expect_rejected(decode_rp_begin(q), "rp_begin.vm_config_bytes");
  q = p + "x";  // trailing bytes
  expect_rejected(decode_rp_begin(q), "rp_begin.payload");

  b.vm_config.assign(kMaxVmConfigBytes, 'x');  // the largest fits one frame
  CHECK(encode(b).size() <= kMaxPayloadBytes);
  CHECK(decode_rp_begin(encode(b)).value().vm_config.size() == kMaxVmConfigBytes);
}

TEST_CASE("rp_ack's times extension: only with kFeatureRpTimes, only on an ok ack, version 1") {
  RpAck a{7, WireStatus::ok, "", RpTimes{1'500'000, 20'000}};
  const std::string p = encode(a);
  CHECK(p.size() == 12 + 4 + 16);
  CHECK(decode_rp_ack(p, kFeatureRpTimes).value() == a);
  // An older source (no feature) never gets it; were it to, the trailing bytes are refused.
  auto old = decode_rp_ack(p);
  REQUIRE_FALSE(old.is_ok());
  CHECK(old.status().message().find("trailing") != std::string::npos);
  // Without the extension an ok ack decodes with the feature too (an older receiver).
  CHECK_FALSE(decode_rp_ack(encode(RpAck{7, WireStatus::ok, ""}), kFeatureRpTimes)->times.has_value());
  // A wrong version or length, or a cut extension, is named.
  std::string bad = p;
  bad[12] = 2;
  CHECK(decode_rp_ack(bad, kFeatureRpTimes).status().message().find("times.version") != std::string::npos);
  bad = p;
  bad[14] = 15;
  CHECK(decode_rp_ack(bad, kFeatureRpTimes).status().message().find("times.length") != std::string::npos);
  CHECK_FALSE(decode_rp_ack(p.substr(0, p.size() - 3), kFeatureRpTimes).is_ok());
  // A refusal with bytes after its message is refused even with the feature.
  std::string refusal = encode(RpAck{7, WireStatus::busy, "x"}) + p.substr(12);
  CHECK_FALSE(decode_rp_ack(refusal, kFeatureRpTimes).is_ok());
}

TEST_CASE("rp_end's times extension: the source's stages, only with kFeatureRpTimes") {
  RpEnd e{9, 3, 3 << 16, SourceTimes{1, 2, 3, 4, 5}};
  const std::string p = encode(e);
  CHECK(p.size() == 24 + 4 + 40);
  CHECK(decode_rp_end(p, kFeatureRpTimes).value() == e);
  CHECK_FALSE(decode_rp_end(p).is_ok());  // an older receiver never gets it
  CHECK_FALSE(decode_rp_end(encode(RpEnd{9, 3, 3 << 16}), kFeatureRpTimes)->times.has_value());
  std::string bad = p;
  bad[24] = 3;
  CHECK(decode_rp_end(bad, kFeatureRpTimes).status().message().find("times.version") != std::string::npos);
  CHECK_FALSE(decode_rp_end(p.substr(0, p.size() - 1), kFeatureRpTimes).is_ok());
}

TEST_CASE("probe and probe_reply: round trips, bounds") {
  const Probe p{kProtocolVersion};
  CHECK(decode_probe(encode(p)).value() == p);
  expect_rejected(decode_probe(encode(p) + "x"), "probe");
  const ProbeReply r{kProtocolVersion, WireStatus::ok, 1'765'162'200'000'000'000ull, ""};
  CHECK(decode_probe_reply(encode(r)).value() == r);
  const ProbeReply busy{kProtocolVersion, WireStatus::busy, 0, std::string(kMaxMessageBytes, 'm')};
  CHECK(decode_probe_reply(encode(busy)).value() == busy);
  std::string long_message = encode(ProbeReply{}).substr(0, 12);
  long_message += std::string("\x01\x04", 2) + std::string(kMaxMessageBytes + 1, 'm');
  expect_rejected(decode_probe_reply(long_message), "message");
  expect_rejected(decode_probe_reply(encode(r).substr(0, 5)), "probe_reply");
  CHECK(std::string(msg_type_name(MsgType::probe_reply)) == "probe_reply");
}
