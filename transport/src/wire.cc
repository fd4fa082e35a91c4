// Wire protocol version 1: frame header and message codecs. Pure functions over bytes (no
// Asio): the clang fuzzers build this file. Byte layouts: docs/wire-protocol.md.
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack: no allocation per frame
#include "ferry/transport/wire.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <utility>

#include "ferry/base/bytes.h"
#include "ferry/transport/rules.h"

namespace ferry::transport {
namespace {

static_assert(kFrameHeaderBytes == 24);
static_assert(kMaxPayloadBytes >= kMaxBlockBytes + 1024, "a DATA frame must fit a raw block");
static_assert(kMaxNameBytes <= 0xffff && kMaxMessageBytes <= 0xffff, "lengths are u16");
static_assert(kMaxDisksPerGroup <= 0xffff, "disk counts are u16");
static_assert(kHashListFixedBytes + std::size_t(kMaxHashesPerList) * kHashBytes <= kMaxPayloadBytes,
              "the largest hash_list must fit one frame");
static_assert(kMaxHashRequestBytes % kMaxBlockBytes == 0);
static_assert(10 + kMaxMessageBytes + kMaxPointsPerReply * kPointBytes <= kMaxPayloadBytes,
              "the largest points_reply must fit one frame");
static_assert(kMaxZeroRangeBytes % kMaxBlockBytes == 0 && kMaxZeroRangeBytes > kMaxBlockBytes &&
              kMaxZeroRangeBytes == 0xffc00000u);

constexpr std::size_t kChecksumOffset = 16;  // header bytes [0,16) are covered by the checksum
constexpr std::size_t kDataFixedBytes = 56;  // DATA fields before the block payload

Status protocol_error(std::string message) {
  return Status::error(Errc::protocol, std::move(message));
}

bool wire_status_known(std::uint16_t v) { return v <= static_cast<std::uint16_t>(WireStatus::forbidden); }

// Reads one message field by field. The first failure is kept with the name of the field
// that caused it; later reads return zeros, so decoders read straight through and check once.
class FieldReader {
 public:
  FieldReader(const char* message, std::string_view payload)
      : message_(message), in_(payload), size_(payload.size()) {}

  std::uint8_t u8(std::string_view field) { return check(field, in_.u8()); }
  std::uint16_t u16(std::string_view field) { return check(field, in_.u16()); }
  std::uint32_t u32(std::string_view field) { return check(field, in_.u32()); }
  std::uint64_t u64(std::string_view field) { return check(field, in_.u64()); }

  // A u16-length-prefixed string of at most max_bytes, non-empty when `required`.
  std::string str(std::string_view field, std::size_t max_bytes, bool required) {
    std::size_t at = in_.pos();
    std::uint16_t len = in_.u16();
    if (!in_.ok()) return truncated(field, at), std::string();
    if (len > max_bytes) {
      fail(field, fmt::format("{} bytes, limit {}", len, max_bytes));
      return {};
    }
    if (required && len == 0) {
      fail(field, "empty, a value is required");
      return {};
    }
    std::string s(len, '\0');
    if (!in_.bytes(s.data(), len)) return truncated(field, at), std::string();
    return s;
  }
  // The next n bytes (n <= remaining(), checked by the caller).
  std::string take(std::size_t n) {
    std::string s(n, '\0');
    if (ok()) in_.bytes(s.data(), n);
    return s;
  }
  // The rest of the payload (DATA block bytes).
  std::string rest() {
    std::string s(in_.remaining(), '\0');
    if (ok()) in_.bytes(s.data(), s.size());
    return s;
  }
  std::size_t remaining() const { return in_.remaining(); }

  void fail(std::string_view field, const std::string& why) {
    if (!error_.is_ok()) return;
    error_ = protocol_error(fmt::format("{}.{}: {}", message_, field, why));
  }
  bool ok() const { return error_.is_ok(); }
  // Call last: fails on trailing bytes.
  Status finish() {
    if (ok() && in_.remaining() != 0)
      fail("payload", fmt::format("{} trailing bytes after the last field ({} bytes in all)",
                                  in_.remaining(), size_));
    return error_;
  }

 private:
  template <class T>
  T check(std::string_view field, T v) {
    if (!in_.ok() && ok()) truncated(field, in_.pos());
    return ok() ? v : T{0};
  }
  void truncated(std::string_view field, std::size_t at) {
    fail(field, fmt::format("payload ends at byte {} of {}, field missing", at, size_));
  }
  const char* message_;
  ByteReader in_;
  std::size_t size_;
  Status error_;
};

template <class T>
Result<T> finish(FieldReader& r, T value) {
  Status s = r.finish();
  if (!s.is_ok()) return s;
  return value;
}

WireStatus read_wire_status(FieldReader& r, std::string_view field) {
  std::uint16_t v = r.u16(field);
  if (!wire_status_known(v)) r.fail(field, fmt::format("unknown status {}", v));
  return r.ok() ? static_cast<WireStatus>(v) : WireStatus::ok;
}

// 17 bytes: flags u8 (kIdentityEphemeral, other bits rejected), id lo u64, id hi u64.
void write_identity(ByteWriter& w, const DiskIdentity& d) {
  w.u8(d.ephemeral ? kIdentityEphemeral : 0);
  w.u64(d.id.lo);
  w.u64(d.id.hi);
}

DiskIdentity read_identity(FieldReader& r, const char* array, std::size_t i, bool required) {
  DiskIdentity d;
  const std::string field = fmt::format("{}[{}]", array, i);
  std::uint8_t flags = r.u8(field + ".flags");
  d.id.lo = r.u64(field + ".id");
  d.id.hi = r.u64(field + ".id");
  if (!r.ok()) return {};
  if ((flags & ~kIdentityEphemeral) != 0)
    r.fail(field + ".flags", fmt::format("unknown bits 0x{:02x}", flags & ~kIdentityEphemeral));
  else if (required && !d.known())
    r.fail(field + ".id", "zero, an identity is required");
  else if (!d.known() && flags != 0)
    r.fail(field + ".flags", "set on an unknown (zero) identity");
  d.ephemeral = (flags & kIdentityEphemeral) != 0;
  return d;
}

std::uint16_t read_count(FieldReader& r, std::string_view field, std::size_t min_count) {
  std::uint16_t n = r.u16(field);
  if (n > kMaxDisksPerGroup)
    r.fail(field, fmt::format("{} disks, limit {}", n, kMaxDisksPerGroup));
  else if (n < min_count)
    r.fail(field, fmt::format("{} disks, at least {} required", n, min_count));
  return r.ok() ? n : 0;
}

std::string indexed(const char* array, std::size_t i, const char* field) {
  return fmt::format("{}[{}].{}", array, i, field);
}

}  // namespace

bool msg_type_known(std::uint16_t t) {
  if (t >= static_cast<std::uint16_t>(MsgType::hello) &&
      t <= static_cast<std::uint16_t>(MsgType::error))
    return true;
  return t >= static_cast<std::uint16_t>(MsgType::hash_request) &&
         t <= static_cast<std::uint16_t>(MsgType::probe_reply);
}

const char* msg_type_name(MsgType t) {
  switch (t) {
    case MsgType::hello: return "hello";
    case MsgType::hello_reply: return "hello_reply";
    case MsgType::rp_begin: return "rp_begin";
    case MsgType::data: return "data";
    case MsgType::rp_end: return "rp_end";
    case MsgType::rp_ack: return "rp_ack";
    case MsgType::error: return "error";
    case MsgType::hash_request: return "hash_request";
    case MsgType::hash_list: return "hash_list";
    case MsgType::points_request: return "points_request";
    case MsgType::points_reply: return "points_reply";
    case MsgType::probe: return "probe";
    case MsgType::probe_reply: return "probe_reply";
  }
  return "unknown";
}

// --- framing ---------------------------------------------------------------------------

std::uint64_t frame_checksum(const void* header_bytes, std::string_view payload) {
  XXH3_state_t state;
  XXH3_INITSTATE(&state);
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, header_bytes, kChecksumOffset);
  XXH3_64bits_update(&state, payload.data(), payload.size());
  return XXH3_64bits_digest(&state);
}

Result<FrameHeader> decode_frame_header(const void* header_bytes) {
  const auto* h = static_cast<const unsigned char*>(header_bytes);
  std::uint32_t magic = load_le32(h);
  if (magic != kFrameMagic)
    return protocol_error(fmt::format("frame.magic: 0x{:08x}, expected 0x{:08x} (\"FRY1\")",
                                      magic, kFrameMagic));
  std::uint16_t type = static_cast<std::uint16_t>(h[4] | (h[5] << 8));
  if (!msg_type_known(type)) return protocol_error(fmt::format("frame.type: unknown type {}", type));
  std::uint16_t flags = static_cast<std::uint16_t>(h[6] | (h[7] << 8));
  if (flags != 0) return protocol_error(fmt::format("frame.flags: 0x{:04x}, must be 0", flags));
  std::uint32_t payload_bytes = load_le32(h + 8);
  if (payload_bytes > kMaxPayloadBytes)
    return protocol_error(fmt::format("frame.payload_bytes: {}, limit {}", payload_bytes,
                                      kMaxPayloadBytes));
  std::uint32_t reserved = load_le32(h + 12);
  if (reserved != 0)
    return protocol_error(fmt::format("frame.reserved: 0x{:08x}, must be 0", reserved));
  return FrameHeader{static_cast<MsgType>(type), payload_bytes, load_le64(h + kChecksumOffset)};
}

Status verify_frame(const void* header_bytes, std::string_view payload) {
  const auto* h = static_cast<const unsigned char*>(header_bytes);
  std::uint32_t payload_bytes = load_le32(h + 8);
  if (payload.size() != payload_bytes)
    return protocol_error(fmt::format("frame.payload_bytes: header says {}, frame has {}",
                                      payload_bytes, payload.size()));
  std::uint64_t want = load_le64(h + kChecksumOffset);
  std::uint64_t got = frame_checksum(h, payload);
  if (want != got)
    return protocol_error(fmt::format(
        "frame.checksum: 0x{:016x} in header, 0x{:016x} computed over {} payload bytes", want,
        got, payload.size()));
  return Status::ok();
}

void encode_frame_header(MsgType type, std::string_view payload, void* out) {
  FERRY_ASSERT(msg_type_known(static_cast<std::uint16_t>(type)));
  FERRY_ASSERT(payload.size() <= kMaxPayloadBytes);
  auto* h = static_cast<unsigned char*>(out);
  store_le32(h, kFrameMagic);
  h[4] = static_cast<unsigned char>(static_cast<std::uint16_t>(type) & 0xff);
  h[5] = static_cast<unsigned char>(static_cast<std::uint16_t>(type) >> 8);
  h[6] = 0;  // flags
  h[7] = 0;
  store_le32(h + 8, static_cast<std::uint32_t>(payload.size()));
  store_le32(h + 12, 0);  // reserved
  store_le64(h + kChecksumOffset, frame_checksum(h, payload));
}

std::string encode_frame(MsgType type, std::string_view payload) {
  std::string frame(kFrameHeaderBytes, '\0');
  encode_frame_header(type, payload, frame.data());
  frame.append(payload);
  return frame;
}

std::uint64_t group_id_of(std::string_view group) { return xxh3_64(group.data(), group.size()); }

// --- hello -----------------------------------------------------------------------------

std::string encode(const Hello& m) {
  FERRY_ASSERT(m.disks.size() <= kMaxDisksPerGroup);
  std::string out;
  ByteWriter w(out);
  w.u16(m.version);
  w.u16(static_cast<std::uint16_t>(m.disks.size()));
  w.u32(m.features);
  w.str16(m.group);
  w.str16(m.source_name);
  for (const DiskInfo& d : m.disks) {
    w.str16(d.name);
    w.u64(d.size_bytes);
    w.u32(d.block_bytes);
  }
  return out;
}

static void check_block_bytes(FieldReader& r, std::size_t i, std::uint32_t block_bytes) {
  if (!block_bytes_valid(block_bytes))
    r.fail(indexed("disks", i, "block_bytes"), block_bytes_rule(block_bytes));
}

Result<Hello> decode_hello(std::string_view payload) {
  FieldReader r("hello", payload);
  Hello m;
  m.version = r.u16("version");
  if (r.ok() && m.version != kProtocolVersion) return m;  // foreign layout: version only
  std::uint16_t count = read_count(r, "disk_count", 1);
  m.features = r.u32("features");
  m.group = r.str("group", kMaxNameBytes, true);
  m.source_name = r.str("source_name", kMaxNameBytes, false);
  for (std::size_t i = 0; i < count && r.ok(); ++i) {
    DiskInfo d;
    d.name = r.str(indexed("disks", i, "name"), kMaxNameBytes, true);
    d.size_bytes = r.u64(indexed("disks", i, "size_bytes"));
    d.block_bytes = r.u32(indexed("disks", i, "block_bytes"));
    if (r.ok()) check_block_bytes(r, i, d.block_bytes);
    for (std::size_t j = 0; j < i && r.ok(); ++j)
      if (m.disks[j].name == d.name)
        r.fail(indexed("disks", i, "name"), fmt::format("\"{}\" repeats disks[{}]", d.name, j));
    m.disks.push_back(std::move(d));
  }
  return finish(r, std::move(m));
}

// --- hello_reply -----------------------------------------------------------------------

std::string encode(const HelloReply& m) {
  FERRY_ASSERT(m.disks.size() <= kMaxDisksPerGroup);
  FERRY_ASSERT(m.message.size() <= kMaxMessageBytes);
  std::string out;
  ByteWriter w(out);
  w.u16(m.version);
  w.u16(static_cast<std::uint16_t>(m.status));
  w.u32(m.features);
  w.u64(m.last_committed_rp);
  w.u64(m.last_committed_unix_ns);
  w.u16(static_cast<std::uint16_t>(m.disks.size()));
  w.str16(m.message);
  for (const ReplicaDisk& d : m.disks) {
    w.str16(d.name);
    w.u64(d.size_bytes);
  }
  // Only a source that offered the feature can get it accepted, so an older source never
  // sees these bytes.
  if ((m.features & kFeatureDiskIdentity) != 0) {
    FERRY_ASSERT(m.held_source.size() <= kMaxNameBytes);
    w.str16(m.held_source);
    for (const ReplicaDisk& d : m.disks) write_identity(w, d.identity);
  }
  return out;
}

Result<HelloReply> decode_hello_reply(std::string_view payload) {
  FieldReader r("hello_reply", payload);
  HelloReply m;
  m.version = r.u16("version");
  m.status = read_wire_status(r, "status");
  if (r.ok() && m.version != kProtocolVersion) return m;  // foreign layout: version, status
  m.features = r.u32("features");
  m.last_committed_rp = r.u64("last_committed_rp");
  m.last_committed_unix_ns = r.u64("last_committed_unix_ns");
  std::uint16_t count = read_count(r, "disk_count", 0);
  m.message = r.str("message", kMaxMessageBytes, false);
  for (std::size_t i = 0; i < count && r.ok(); ++i) {
    ReplicaDisk d;
    d.name = r.str(indexed("disks", i, "name"), kMaxNameBytes, true);
    d.size_bytes = r.u64(indexed("disks", i, "size_bytes"));
    m.disks.push_back(std::move(d));
  }
  if (r.ok() && (m.features & kFeatureDiskIdentity) != 0) {
    m.held_source = r.str("held_source", kMaxNameBytes, false);
    // Zero is allowed here: the receiver holds no identity for a disk an older source wrote.
    for (std::size_t i = 0; i < m.disks.size() && r.ok(); ++i)
      m.disks[i].identity = read_identity(r, "identities", i, /*required=*/false);
  }
  return finish(r, std::move(m));
}

// --- rp_begin --------------------------------------------------------------------------

std::string encode(const RpBegin& m) {
  FERRY_ASSERT(m.disks.size() <= kMaxDisksPerGroup);
  std::string out;
  ByteWriter w(out);
  w.u64(m.rp_id);
  w.u64(m.base_rp);
  w.u64(m.created_unix_ns);
  w.u32(m.flags);
  w.u16(static_cast<std::uint16_t>(m.disks.size()));
  w.u16(0);  // reserved
  for (const RpDisk& d : m.disks) {
    w.u16(d.disk_index);
    w.u8(static_cast<std::uint8_t>(d.mode));
    w.u8(0);  // reserved
    w.u64(d.size_bytes);
  }
  // Only with kFeatureDiskIdentity accepted (the engine's rule), so an older receiver, which
  // rejects the flag, never sees these bytes.
  if ((m.flags & kRpFlagIdentities) != 0)
    for (const RpDisk& d : m.disks) write_identity(w, d.identity);
  // Only with kFeatureVmConfig accepted; the flag and the bytes go together.
  FERRY_ASSERT(((m.flags & kRpFlagVmConfig) != 0) == !m.vm_config.empty());
  if ((m.flags & kRpFlagVmConfig) != 0) {
    FERRY_ASSERT(m.vm_config.size() <= kMaxVmConfigBytes);
    w.u32(static_cast<std::uint32_t>(m.vm_config.size()));
    w.bytes(m.vm_config.data(), m.vm_config.size());
  }
  return out;
}

static void read_rp_disk(FieldReader& r, std::size_t i, const RpBegin& m, RpDisk& d) {
  d.disk_index = r.u16(indexed("disks", i, "disk_index"));
  std::uint8_t mode = r.u8(indexed("disks", i, "mode"));
  std::uint8_t reserved = r.u8(indexed("disks", i, "reserved"));
  d.size_bytes = r.u64(indexed("disks", i, "size_bytes"));
  if (!r.ok()) return;
  if (d.disk_index >= kMaxDisksPerGroup)
    r.fail(indexed("disks", i, "disk_index"),
           fmt::format("{}, limit {}", d.disk_index, kMaxDisksPerGroup - 1));
  if (mode > static_cast<std::uint8_t>(DiskMode::resync))
    r.fail(indexed("disks", i, "mode"), fmt::format("unknown mode {}", mode));
  if (reserved != 0) r.fail(indexed("disks", i, "reserved"), "must be 0");
  for (std::size_t j = 0; j < i; ++j)
    if (m.disks[j].disk_index == d.disk_index)
      r.fail(indexed("disks", i, "disk_index"),
             fmt::format("{} repeats disks[{}]", d.disk_index, j));
  d.mode = static_cast<DiskMode>(mode);
}

Result<RpBegin> decode_rp_begin(std::string_view payload) {
  FieldReader r("rp_begin", payload);
  RpBegin m;
  m.rp_id = r.u64("rp_id");
  m.base_rp = r.u64("base_rp");
  m.created_unix_ns = r.u64("created_unix_ns");
  m.flags = r.u32("flags");
  std::uint16_t count = read_count(r, "disk_count", 1);
  std::uint16_t reserved = r.u16("reserved");
  if (r.ok() && m.rp_id <= m.base_rp)
    r.fail("rp_id", fmt::format("{} is not above base_rp {}", m.rp_id, m.base_rp));
  if (r.ok() && (m.flags & ~kKnownRpFlags) != 0)
    r.fail("flags", fmt::format("unknown bits 0x{:08x}", m.flags & ~kKnownRpFlags));
  if (r.ok() && (m.flags & kRpFlagTakeOver) != 0 && (m.flags & kRpFlagIdentities) == 0)
    r.fail("flags", "take_over (bit 2) without identities (bit 1)");
  if (r.ok() && reserved != 0) r.fail("reserved", "must be 0");
  for (std::size_t i = 0; i < count && r.ok(); ++i) {
    RpDisk d;
    read_rp_disk(r, i, m, d);
    m.disks.push_back(d);
  }
  if (r.ok() && (m.flags & kRpFlagIdentities) != 0)
    for (std::size_t i = 0; i < m.disks.size() && r.ok(); ++i)
      m.disks[i].identity = read_identity(r, "identities", i, /*required=*/true);
  if (r.ok() && (m.flags & kRpFlagVmConfig) != 0) {
    // The length is checked against the limit and what is left before any allocation.
    const std::uint32_t n = r.u32("vm_config_bytes");
    if (r.ok() && (n == 0 || n > kMaxVmConfigBytes))
      r.fail("vm_config_bytes", fmt::format("{}, must be 1..{}", n, kMaxVmConfigBytes));
    else if (r.ok() && n > r.remaining())
      r.fail("vm_config", fmt::format("{} bytes announced, {} left", n, r.remaining()));
    else if (r.ok())
      m.vm_config = r.take(n);
  }
  return finish(r, std::move(m));
}

// --- data ------------------------------------------------------------------------------

std::string encode(const DataFrame& m) { return encode_data(m, m.payload); }

std::string encode_data(const DataFrame& m, std::string_view payload) {
  FERRY_ASSERT(m.payload.empty() || m.payload.data() == payload.data());
  std::string out;
  out.reserve(kDataFixedBytes + payload.size());
  ByteWriter w(out);
  w.u64(m.group_id);
  w.u64(m.rp_id);
  w.u64(m.seq);
  w.u64(m.offset_bytes);
  w.u32(m.length_bytes);
  w.u16(m.disk_index);
  w.u8(static_cast<std::uint8_t>(m.kind));
  w.u8(static_cast<std::uint8_t>(m.codec));
  w.u64(m.hash.lo);
  w.u64(m.hash.hi);
  FERRY_ASSERT(out.size() == kDataFixedBytes);
  w.bytes(payload.data(), payload.size());
  return out;
}

// Rules that tie kind, codec, length and payload together.
static void check_data(FieldReader& r, const DataFrame& m, std::uint8_t kind, std::uint8_t codec,
                       std::size_t payload_bytes, std::uint32_t features) {
  if (kind > static_cast<std::uint8_t>(BlockKind::zero))
    return r.fail("kind", fmt::format("unknown kind {}", kind));
  if (codec > static_cast<std::uint8_t>(Codec::zstd))
    return r.fail("codec", fmt::format("unknown codec {}", codec));
  const bool zero_range = static_cast<BlockKind>(kind) == BlockKind::zero &&
                          (features & kFeatureZeroRanges) != 0;
  const std::uint32_t max_length = zero_range ? kMaxZeroRangeBytes : kMaxBlockBytes;
  if (m.length_bytes == 0 || m.length_bytes > max_length)
    return r.fail("length_bytes",
                  fmt::format("{}, must be in [1, {}]{}", m.length_bytes, max_length,
                              static_cast<BlockKind>(kind) == BlockKind::zero && !zero_range
                                  ? " (longer zero ranges need the zero_ranges feature)"
                                  : ""));
  if (m.offset_bytes > UINT64_MAX - m.length_bytes)
    return r.fail("offset_bytes", fmt::format("{} + length {} overflows", m.offset_bytes,
                                              m.length_bytes));
  if (m.disk_index >= kMaxDisksPerGroup)
    return r.fail("disk_index", fmt::format("{}, limit {}", m.disk_index, kMaxDisksPerGroup - 1));
  if (static_cast<BlockKind>(kind) == BlockKind::zero) {
    if (payload_bytes != 0)
      return r.fail("payload", fmt::format("{} bytes in a zero-kind frame, must be empty",
                                           payload_bytes));
    if (static_cast<Codec>(codec) != Codec::none)
      return r.fail("codec", "must be none in a zero-kind frame");
    if (m.hash != Hash128{}) return r.fail("hash", "must be 0 in a zero-kind frame");
    return;
  }
  if (static_cast<Codec>(codec) == Codec::none && payload_bytes != m.length_bytes)
    return r.fail("payload", fmt::format("{} bytes with codec none, length_bytes says {}",
                                         payload_bytes, m.length_bytes));
  if (payload_bytes == 0) r.fail("payload", "empty in a data-kind frame");
}

Result<DataFrame> decode_data(std::string_view payload, std::uint32_t features) {
  FieldReader r("data", payload);
  DataFrame m;
  m.group_id = r.u64("group_id");
  m.rp_id = r.u64("rp_id");
  m.seq = r.u64("seq");
  m.offset_bytes = r.u64("offset_bytes");
  m.length_bytes = r.u32("length_bytes");
  m.disk_index = r.u16("disk_index");
  std::uint8_t kind = r.u8("kind");
  std::uint8_t codec = r.u8("codec");
  m.hash.lo = r.u64("hash");
  m.hash.hi = r.u64("hash");
  if (r.ok()) check_data(r, m, kind, codec, r.remaining(), features);
  if (!r.ok()) return r.finish();
  m.kind = static_cast<BlockKind>(kind);
  m.codec = static_cast<Codec>(codec);
  m.payload = r.rest();  // the one copy of the block on the receive path
  return finish(r, std::move(m));
}

// --- rp_end, rp_ack, error -------------------------------------------------------------

std::string encode(const RpEnd& m) {
  std::string out;
  ByteWriter w(out);
  w.u64(m.rp_id);
  w.u64(m.frame_count);
  w.u64(m.logical_bytes);
  if (m.times) {
    w.u16(kRpTimesVersion);
    w.u16(kSourceTimesBytes);
    w.u64(m.times->slot_us);
    w.u64(m.times->capture_us);
    w.u64(m.times->read_us);
    w.u64(m.times->hash_compress_us);
    w.u64(m.times->send_us);
  }
  return out;
}

Result<RpEnd> decode_rp_end(std::string_view payload, std::uint32_t features) {
  FieldReader r("rp_end", payload);
  RpEnd m;
  m.rp_id = r.u64("rp_id");
  m.frame_count = r.u64("frame_count");
  m.logical_bytes = r.u64("logical_bytes");
  const std::uint64_t max_frame =
      (features & kFeatureZeroRanges) != 0 ? kMaxZeroRangeBytes : kMaxBlockBytes;
  if (r.ok() && m.logical_bytes / max_frame > m.frame_count)
    r.fail("logical_bytes", fmt::format("{} cannot come from {} frames of at most {} bytes",
                                        m.logical_bytes, m.frame_count, max_frame));
  if (r.ok() && (features & kFeatureRpTimes) != 0 && r.remaining() > 0) {
    const std::uint16_t version = r.u16("times.version");
    const std::uint16_t length = r.u16("times.length");
    if (r.ok() && version != kRpTimesVersion)
      r.fail("times.version", fmt::format("{} is not {}", version, kRpTimesVersion));
    else if (r.ok() && length != kSourceTimesBytes)
      r.fail("times.length", fmt::format("{} is not {}", length, kSourceTimesBytes));
    SourceTimes t;
    t.slot_us = r.u64("times.slot_us");
    t.capture_us = r.u64("times.capture_us");
    t.read_us = r.u64("times.read_us");
    t.hash_compress_us = r.u64("times.hash_compress_us");
    t.send_us = r.u64("times.send_us");
    m.times = t;
  }
  return finish(r, m);
}

std::string encode(const RpAck& m) {
  FERRY_ASSERT(m.message.size() <= kMaxMessageBytes);
  std::string out;
  ByteWriter w(out);
  w.u64(m.rp_id);
  w.u16(static_cast<std::uint16_t>(m.status));
  w.str16(m.message);
  if (m.times) {
    FERRY_ASSERT(m.status == WireStatus::ok);
    w.u16(kRpTimesVersion);
    w.u16(kRpTimesBytes);
    w.u64(m.times->receive_us);
    w.u64(m.times->durable_us);
  }
  return out;
}

Result<RpAck> decode_rp_ack(std::string_view payload, std::uint32_t features) {
  FieldReader r("rp_ack", payload);
  RpAck m;
  m.rp_id = r.u64("rp_id");
  m.status = read_wire_status(r, "status");
  m.message = r.str("message", kMaxMessageBytes, false);
  if (r.ok() && (features & kFeatureRpTimes) != 0 && m.status == WireStatus::ok && r.remaining() > 0) {
    const std::uint16_t version = r.u16("times.version");
    const std::uint16_t length = r.u16("times.length");
    if (r.ok() && version != kRpTimesVersion)
      r.fail("times.version", fmt::format("{} is not {}", version, kRpTimesVersion));
    else if (r.ok() && length != kRpTimesBytes)
      r.fail("times.length", fmt::format("{} is not {}", length, kRpTimesBytes));
    RpTimes t;
    t.receive_us = r.u64("times.receive_us");
    t.durable_us = r.u64("times.durable_us");
    m.times = t;
  }
  return finish(r, std::move(m));
}

std::string encode(const ErrorMsg& m) {
  FERRY_ASSERT(m.message.size() <= kMaxMessageBytes);
  std::string out;
  ByteWriter w(out);
  w.u16(static_cast<std::uint16_t>(m.status));
  w.str16(m.message);
  return out;
}

Result<ErrorMsg> decode_error(std::string_view payload) {
  FieldReader r("error", payload);
  ErrorMsg m;
  m.status = read_wire_status(r, "status");
  m.message = r.str("message", kMaxMessageBytes, false);
  return finish(r, std::move(m));
}

// --- hash_request, hash_list (resync) ----------------------------------------------------

// Rules shared by both messages: disk index, block size, offset aligned to the block size.
static void check_hash_range(FieldReader& r, std::uint16_t disk_index, std::uint32_t block_bytes,
                             std::uint64_t offset_bytes) {
  if (disk_index >= kMaxDisksPerGroup)
    return r.fail("disk_index", fmt::format("{}, limit {}", disk_index, kMaxDisksPerGroup - 1));
  if (!block_bytes_valid(block_bytes)) return r.fail("block_bytes", block_bytes_rule(block_bytes));
  if (offset_bytes % block_bytes != 0)
    r.fail("offset_bytes", fmt::format("{} is not a multiple of block_bytes {}", offset_bytes,
                                       block_bytes));
}

std::string encode(const HashRequest& m) {
  std::string out;
  ByteWriter w(out);
  w.u16(m.disk_index);
  w.u16(0);  // reserved
  w.u32(m.block_bytes);
  w.u64(m.offset_bytes);
  w.u64(m.length_bytes);
  return out;
}

Result<HashRequest> decode_hash_request(std::string_view payload) {
  FieldReader r("hash_request", payload);
  HashRequest m;
  m.disk_index = r.u16("disk_index");
  std::uint16_t reserved = r.u16("reserved");
  m.block_bytes = r.u32("block_bytes");
  m.offset_bytes = r.u64("offset_bytes");
  m.length_bytes = r.u64("length_bytes");
  if (r.ok() && reserved != 0) r.fail("reserved", "must be 0");
  if (r.ok()) check_hash_range(r, m.disk_index, m.block_bytes, m.offset_bytes);
  if (r.ok() && (m.length_bytes == 0 || m.length_bytes > kMaxHashRequestBytes))
    r.fail("length_bytes", fmt::format("{}, must be in [1, {}]", m.length_bytes,
                                       kMaxHashRequestBytes));
  if (r.ok() && m.offset_bytes > UINT64_MAX - m.length_bytes)
    r.fail("offset_bytes", fmt::format("{} + length {} overflows", m.offset_bytes,
                                       m.length_bytes));
  return finish(r, m);
}

std::string encode(const HashList& m) {
  FERRY_ASSERT(!m.hashes.empty() && m.hashes.size() <= kMaxHashesPerList);
  std::string out;
  out.reserve(kHashListFixedBytes + m.hashes.size() * kHashBytes);
  ByteWriter w(out);
  w.u16(m.disk_index);
  w.u16(0);  // reserved
  w.u32(m.block_bytes);
  w.u64(m.offset_bytes);
  w.u32(static_cast<std::uint32_t>(m.hashes.size()));
  w.u32(0);  // reserved
  FERRY_ASSERT(out.size() == kHashListFixedBytes);
  for (const Hash128& h : m.hashes) {
    w.u64(h.lo);
    w.u64(h.hi);
  }
  return out;
}

Result<HashList> decode_hash_list(std::string_view payload) {
  FieldReader r("hash_list", payload);
  HashList m;
  m.disk_index = r.u16("disk_index");
  std::uint16_t reserved = r.u16("reserved");
  m.block_bytes = r.u32("block_bytes");
  m.offset_bytes = r.u64("offset_bytes");
  std::uint32_t count = r.u32("count");
  std::uint32_t reserved2 = r.u32("reserved2");
  if (r.ok() && (reserved != 0 || reserved2 != 0)) r.fail("reserved", "must be 0");
  if (r.ok()) check_hash_range(r, m.disk_index, m.block_bytes, m.offset_bytes);
  if (r.ok() && (count == 0 || count > kMaxHashesPerList))
    r.fail("count", fmt::format("{}, must be in [1, {}]", count, kMaxHashesPerList));
  // The size is checked against count before the list is allocated.
  if (r.ok() && r.remaining() != std::size_t(count) * kHashBytes)
    r.fail("hashes", fmt::format("{} bytes for {} digests of {} bytes", r.remaining(), count,
                                 kHashBytes));
  if (r.ok() && m.offset_bytes / m.block_bytes > (UINT64_MAX / m.block_bytes) - count)
    r.fail("offset_bytes", fmt::format("{} + {} blocks of {} overflows", m.offset_bytes, count,
                                       m.block_bytes));
  if (!r.ok()) return r.finish();
  m.hashes.resize(count);
  for (std::uint32_t i = 0; i < count; ++i) {
    m.hashes[i].lo = r.u64("hashes");
    m.hashes[i].hi = r.u64("hashes");
  }
  return finish(r, std::move(m));
}

// --- points_request, points_reply (management) -------------------------------------------

std::string encode(const PointsRequest& m) {
  FERRY_ASSERT(!m.group.empty() && m.group.size() <= kMaxNameBytes);
  std::string out;
  ByteWriter w(out);
  w.str16(m.group);
  return out;
}

Result<PointsRequest> decode_points_request(std::string_view payload) {
  FieldReader r("points_request", payload);
  PointsRequest m;
  m.group = r.str("group", kMaxNameBytes, true);
  return finish(r, std::move(m));
}

// status u16, flags u16 (bit 0: truncated), message str16, count u32, then count x 32 bytes.
std::string encode(const PointsReply& m) {
  FERRY_ASSERT(m.message.size() <= kMaxMessageBytes && m.points.size() <= kMaxPointsPerReply);
  FERRY_ASSERT(m.status == WireStatus::ok || m.points.empty());
  std::string out;
  out.reserve(10 + m.message.size() + m.points.size() * kPointBytes);
  ByteWriter w(out);
  w.u16(static_cast<std::uint16_t>(m.status));
  w.u16(m.truncated ? 1 : 0);
  w.str16(m.message);
  w.u32(static_cast<std::uint32_t>(m.points.size()));
  for (const PointInfo& p : m.points) {
    w.u64(p.rp_id);
    w.u64(p.created_unix_ns);
    w.u64(p.committed_unix_ns);
    w.u64(p.store_bytes);
  }
  return out;
}

Result<PointsReply> decode_points_reply(std::string_view payload) {
  FieldReader r("points_reply", payload);
  PointsReply m;
  m.status = read_wire_status(r, "status");
  std::uint16_t flags = r.u16("flags");
  m.message = r.str("message", kMaxMessageBytes, false);
  std::uint32_t count = r.u32("count");
  if (r.ok() && (flags & ~1u) != 0) r.fail("flags", fmt::format("unknown bits 0x{:04x}", flags & ~1u));
  m.truncated = (flags & 1u) != 0;
  if (r.ok() && count > kMaxPointsPerReply)
    r.fail("count", fmt::format("{}, limit {}", count, kMaxPointsPerReply));
  if (r.ok() && m.status != WireStatus::ok && count != 0)
    r.fail("count", fmt::format("{} points with status {}", count, static_cast<int>(m.status)));
  // The size is checked against count before the list is allocated.
  if (r.ok() && r.remaining() != std::size_t(count) * kPointBytes)
    r.fail("points", fmt::format("{} bytes for {} points of {} bytes", r.remaining(), count,
                                 kPointBytes));
  if (!r.ok()) return r.finish();
  m.points.resize(count);
  for (std::uint32_t i = 0; i < count; ++i) {
    PointInfo& p = m.points[i];
    p.rp_id = r.u64("points.rp_id");
    p.created_unix_ns = r.u64("points.created_unix_ns");
    p.committed_unix_ns = r.u64("points.committed_unix_ns");
    p.store_bytes = r.u64("points.store_bytes");
    if (r.ok() && (p.rp_id == 0 || (i > 0 && p.rp_id <= m.points[i - 1].rp_id)))
      r.fail("points", fmt::format("points[{}].rp_id {} is zero or not after the one before", i,
                                   p.rp_id));
  }
  return finish(r, std::move(m));
}

// --- probe, probe_reply (ferry doctor) ---------------------------------------------------

std::string encode(const Probe& m) {
  std::string out;
  ByteWriter w(out);
  w.u16(m.version);
  return out;
}

Result<Probe> decode_probe(std::string_view payload) {
  FieldReader r("probe", payload);
  Probe m;
  m.version = r.u16("version");
  return finish(r, std::move(m));
}

// version u16, status u16, receiver_unix_ns u64, message str16.
std::string encode(const ProbeReply& m) {
  FERRY_ASSERT(m.message.size() <= kMaxMessageBytes);
  std::string out;
  ByteWriter w(out);
  w.u16(m.version);
  w.u16(static_cast<std::uint16_t>(m.status));
  w.u64(m.receiver_unix_ns);
  w.str16(m.message);
  return out;
}

Result<ProbeReply> decode_probe_reply(std::string_view payload) {
  FieldReader r("probe_reply", payload);
  ProbeReply m;
  m.version = r.u16("version");
  m.status = read_wire_status(r, "status");
  m.receiver_unix_ns = r.u64("receiver_unix_ns");
  m.message = r.str("message", kMaxMessageBytes, false);
  return finish(r, std::move(m));
}

}  // namespace ferry::transport
