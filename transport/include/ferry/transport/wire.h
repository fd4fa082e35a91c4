// The Ferry wire protocol, version 1: framing and message codecs.
//
// Pure functions over bytes: no sockets, no Asio, so the clang fuzzers build this file.
// docs/wire-protocol.md gives every byte; keep the two in step.
//
// A frame is a 24-byte header followed by `payload_bytes` of payload:
//   0  u32 magic        'F','R','Y','1' (0x31595246 little-endian)
//   4  u16 type         MsgType
//   6  u16 flags        0 in version 1 (receivers reject other values)
//   8  u32 payload_bytes <= kMaxPayloadBytes, checked before any allocation
//   12 u32 reserved     0
//   16 u64 checksum     xxh3-64 over header bytes [0,16) followed by the payload
// All integers little-endian.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/base/status.h"

namespace ferry::transport {

inline constexpr std::uint32_t kFrameMagic = 0x31595246;  // "FRY1"
inline constexpr std::uint16_t kProtocolVersion = 1;
inline constexpr std::size_t kFrameHeaderBytes = 24;
inline constexpr std::uint32_t kMaxPayloadBytes = 8u << 20;  // 8 MiB
inline constexpr std::uint32_t kMaxBlockBytes = 4u << 20;    // largest block a DATA frame carries
// Longest range one zero-kind DATA frame covers once kFeatureZeroRanges is accepted: the u32
// length field's maximum rounded down to kMaxBlockBytes (4 GiB - 4 MiB), so a range cut at it
// stays a multiple of every block size. Without the feature, zero frames are kMaxBlockBytes.
inline constexpr std::uint32_t kMaxZeroRangeBytes = 0xffffffffu / kMaxBlockBytes * kMaxBlockBytes;
inline constexpr std::size_t kMaxNameBytes = 255;             // group and disk names
inline constexpr std::size_t kMaxMessageBytes = 1024;         // human-readable messages
inline constexpr std::size_t kMaxDisksPerGroup = 64;

enum class MsgType : std::uint16_t {
  hello = 1,        // source -> receiver: version, group, disks
  hello_reply = 2,  // receiver -> source: accepted or why not, last committed RP
  rp_begin = 3,     // source -> receiver: a new RP on top of base_rp
  data = 4,         // source -> receiver: one block (data or zeros) of the RP
  rp_end = 5,       // source -> receiver: all frames of the RP were sent; totals
  rp_ack = 6,       // receiver -> source: the RP is durable (or rejected, with why)
  error = 7,        // either way: a fatal error, the sender closes after it
  // 8 and 9 are kept for the planned resume of an interrupted RP (rp_resume).
  hash_request = 10,  // source -> receiver: digests of a range of a resync disk, please
  hash_list = 11,     // receiver -> source: xxh3-128 digests of consecutive blocks
  // Management (read-only), instead of hello as a connection's first frame: needs the
  // `manage` right on the group (docs/security.md). One request, one reply, then close.
  points_request = 12,  // client -> receiver: the kept RPs of a group, please
  points_reply = 13,    // receiver -> client: status, message, the RPs (newest last)
  // Health check (`ferry doctor`), instead of hello as a connection's first frame: no group,
  // no right needed, nothing created. One request, one reply, then close.
  probe = 14,        // client -> receiver: the client's protocol version
  probe_reply = 15,  // receiver -> client: its version and its clock
};
bool msg_type_known(std::uint16_t t);
const char* msg_type_name(MsgType t);

// Status codes carried in hello_reply, rp_ack and error.
enum class WireStatus : std::uint16_t {
  ok = 0,
  bad_version = 1,
  bad_request = 2,   // malformed or unexpected message
  diverged = 3,      // rp_begin.base_rp is not the receiver's last committed RP (C5)
  io_error = 4,      // receiver storage failed; retry later
  no_space = 5,      // receiver storage is full; retry later
  corrupt = 6,       // a frame failed its checks (C3); resend
  busy = 7,          // another source is sending to this group
  internal = 8,
  // The peer's verified identity may not do this to this group (the receiver's access map,
  // docs/security.md). Not retryable. A source older than this status fails to decode the
  // hello_reply ("unknown status 9") and stops: clean, if less clear.
  forbidden = 9,
};

struct FrameHeader {
  MsgType type{};
  std::uint32_t payload_bytes = 0;
  std::uint64_t checksum = 0;
};

// Validates magic, type, flags, reserved and size. Never allocates.
Result<FrameHeader> decode_frame_header(const void* header_bytes /* kFrameHeaderBytes */);
// Checks the checksum of a received frame.
Status verify_frame(const void* header_bytes, std::string_view payload);
// Builds a whole frame (header + payload) ready to send.
std::string encode_frame(MsgType type, std::string_view payload);
// Writes the header for `payload` into `out` (kFrameHeaderBytes), so a sender can send
// header and payload as two gathered buffers without copying the payload next to it.
void encode_frame_header(MsgType type, std::string_view payload, void* out);
// xxh3-64 over header bytes [0,16) followed by the payload (what header bytes [16,24) hold).
std::uint64_t frame_checksum(const void* header_bytes, std::string_view payload);

// --- messages --------------------------------------------------------------------------

// A disk's identity: 128 random bits that travel with the disk (a tag bitmap on a QMP node,
// the ledger of a libvirt source), so a disk that changes name, or a name that now means
// another disk, is never sent as an incremental on the other's replica. Zero: unknown.
// `ephemeral`: the identity lives only as long as the QEMU process (a raw disk's in-memory
// tag), so a new one after a restart proves no swap: the disk is resynced, nothing more.
struct DiskIdentity {
  Hash128 id;
  bool ephemeral = false;
  bool known() const { return !(id == Hash128{}); }
  friend bool operator==(const DiskIdentity&, const DiskIdentity&) = default;
};
inline constexpr std::uint8_t kIdentityEphemeral = 1u << 0;  // DiskIdentity flags byte

struct DiskInfo {
  std::string name;
  std::uint64_t size_bytes = 0;
  std::uint32_t block_bytes = 0;  // the source's block (bitmap granularity) size
  friend bool operator==(const DiskInfo&, const DiskInfo&) = default;
};

// Feature bits, negotiated in hello / hello_reply (docs/wire-protocol.md). A receiver replies
// with the subset it accepts; either side uses only accepted features.
inline constexpr std::uint32_t kFeatureResume = 1u << 0;    // reserved (planned, not spoken)
inline constexpr std::uint32_t kFeatureHashList = 1u << 1;  // resync: hash_request/hash_list
// A zero-kind DATA frame may cover up to kMaxZeroRangeBytes (an empty thin disk travels as a
// few frames, not one per 4 MiB).
inline constexpr std::uint32_t kFeatureZeroRanges = 1u << 2;
inline constexpr std::uint32_t kFeatureDiskIdentity = 1u << 3;  // identities, take-over
// rp_begin may carry the VM's definition (libvirt domain XML): kRpFlagVmConfig.
inline constexpr std::uint32_t kFeatureVmConfig = 1u << 4;
// An ok rp_ack carries the receiver's stage times (RpTimes; explainable RPO).
inline constexpr std::uint32_t kFeatureRpTimes = 1u << 5;
inline constexpr std::uint32_t kKnownFeatures = kFeatureHashList | kFeatureZeroRanges |
                                                kFeatureDiskIdentity | kFeatureVmConfig |
                                                kFeatureRpTimes;
// The largest VM definition an rp_begin carries: a domain XML is a few KiB; this leaves room
// for many disks and NICs, and keeps the receiver's largest begin record (names, identities
// and this) within the 256 KiB the state file allows the base RP's (site/src/vm_config.cc).
inline constexpr std::uint32_t kMaxVmConfigBytes = 224u << 10;

struct Hello {
  std::uint16_t version = kProtocolVersion;
  std::uint32_t features = 0;  // offered by the source
  std::string group;
  std::string source_name;  // host/process, for logs
  std::vector<DiskInfo> disks;
  friend bool operator==(const Hello&, const Hello&) = default;
};

struct ReplicaDisk {
  std::string name;
  std::uint64_t size_bytes = 0;  // size of the replica at last_committed_rp (0: none)
  DiskIdentity identity;  // on the wire only with kFeatureDiskIdentity accepted
  friend bool operator==(const ReplicaDisk&, const ReplicaDisk&) = default;
};

struct HelloReply {
  std::uint16_t version = kProtocolVersion;
  WireStatus status = WireStatus::ok;
  std::uint32_t features = 0;  // accepted by the receiver: a subset of Hello::features
  std::string message;
  std::uint64_t last_committed_rp = 0;  // 0: the group has no RP yet
  std::uint64_t last_committed_unix_ns = 0;
  std::vector<ReplicaDisk> disks;  // disks the receiver holds for the group
  // With kFeatureDiskIdentity in `features`: the source that wrote the last committed RP
  // (its hello.source_name; empty: unknown), then an identity per disk after the disks.
  std::string held_source;
  friend bool operator==(const HelloReply&, const HelloReply&) = default;
};

// full: the disk from scratch. incremental: a delta on base_rp chosen by the change tracking.
// resync: a delta on base_rp whose blocks were chosen by comparing block digests with the
// receiver's replica (change tracking was lost; C4). Needs kFeatureHashList.
enum class DiskMode : std::uint8_t { full = 0, incremental = 1, resync = 2 };

struct RpDisk {
  std::uint16_t disk_index = 0;  // index into Hello::disks
  DiskMode mode = DiskMode::full;
  std::uint64_t size_bytes = 0;
  DiskIdentity identity;  // on the wire only with kRpFlagIdentities
  friend bool operator==(const RpDisk&, const RpDisk&) = default;
};

struct RpBegin {
  std::uint64_t rp_id = 0;    // > base_rp
  std::uint64_t base_rp = 0;  // the RP this delta applies on top of (0: none)
  std::uint64_t created_unix_ns = 0;  // when the disks were captured
  std::uint32_t flags = 0;            // kRpFlag*
  std::vector<RpDisk> disks;
  // With kRpFlagVmConfig: the VM's definition (libvirt domain XML, no secrets), 1 to
  // kMaxVmConfigBytes bytes. Sent when it changed; an RP without it keeps the one before.
  std::string vm_config;
  friend bool operator==(const RpBegin&, const RpBegin&) = default;
};
inline constexpr std::uint32_t kRpFlagAppConsistent = 1u << 0;
// Needs kFeatureDiskIdentity: every disk's identity follows the disk list (all known).
inline constexpr std::uint32_t kRpFlagIdentities = 1u << 1;
// Needs kRpFlagIdentities: the source takes the group over from the source that wrote it
// (`ferry replicate --take-over`); its disks are resyncs or full copies.
inline constexpr std::uint32_t kRpFlagTakeOver = 1u << 2;
// Needs kFeatureVmConfig: a u32 length and the VM's definition follow the identities.
inline constexpr std::uint32_t kRpFlagVmConfig = 1u << 3;
inline constexpr std::uint32_t kKnownRpFlags = kRpFlagAppConsistent | kRpFlagIdentities |
                                               kRpFlagTakeOver | kRpFlagVmConfig;

enum class BlockKind : std::uint8_t { data = 0, zero = 1 };
enum class Codec : std::uint8_t { none = 0, zstd = 1 };

// One block. Identity: group (as xxh3-64 of its name), RP, disk, offset, length, sequence.
struct DataFrame {
  std::uint64_t group_id = 0;
  std::uint64_t rp_id = 0;
  std::uint64_t seq = 0;          // 0,1,2,... within the RP, in sending order
  std::uint16_t disk_index = 0;
  BlockKind kind = BlockKind::data;
  Codec codec = Codec::none;
  std::uint64_t offset_bytes = 0;
  // Uncompressed length, <= kMaxBlockBytes; a zero-kind frame up to kMaxZeroRangeBytes when
  // kFeatureZeroRanges was accepted.
  std::uint32_t length_bytes = 0;
  Hash128 hash;                    // xxh3-128 of the uncompressed bytes (zero kind: 0)
  std::string payload;             // codec-encoded bytes; empty for kind zero
  friend bool operator==(const DataFrame&, const DataFrame&) = default;
};

// The source's stages of an RP up to its rp_end (rp_end extension version 1, with
// kFeatureRpTimes), in microseconds: the receiver keeps them with the RP.
inline constexpr std::uint16_t kSourceTimesBytes = 40;
struct SourceTimes {
  std::uint64_t slot_us = 0, capture_us = 0, read_us = 0, hash_compress_us = 0, send_us = 0;
  friend bool operator==(const SourceTimes&, const SourceTimes&) = default;
};

struct RpEnd {
  std::uint64_t rp_id = 0;
  std::uint64_t frame_count = 0;     // DATA frames sent in the RP
  std::uint64_t logical_bytes = 0;   // sum of length_bytes over them
  std::optional<SourceTimes> times;  // with kFeatureRpTimes accepted, optional
  friend bool operator==(const RpEnd&, const RpEnd&) = default;
};

// The receiver's side of an RP's time (docs/wire-protocol.md, rp_ack extension version 1):
// from rp_begin until rp_end arrived, and from rp_end until the commit was durable.
inline constexpr std::uint16_t kRpTimesVersion = 1;
inline constexpr std::uint16_t kRpTimesBytes = 16;  // the fields after version and length
struct RpTimes {
  std::uint64_t receive_us = 0;
  std::uint64_t durable_us = 0;
  friend bool operator==(const RpTimes&, const RpTimes&) = default;
};

struct RpAck {
  std::uint64_t rp_id = 0;
  WireStatus status = WireStatus::ok;
  std::string message;
  // With kFeatureRpTimes accepted, an ok rp_ack carries them (never a refusal).
  std::optional<RpTimes> times;
  friend bool operator==(const RpAck&, const RpAck&) = default;
};

struct ErrorMsg {
  WireStatus status = WireStatus::internal;
  std::string message;
  friend bool operator==(const ErrorMsg&, const ErrorMsg&) = default;
};

// Resync limits: one hash_request covers at most 1 GiB of disk; one hash_list carries at most
// 65536 digests (1 MiB of payload), so a request at small blocks is answered by several lists.
inline constexpr std::uint64_t kMaxHashRequestBytes = 1ull << 30;
inline constexpr std::uint32_t kMaxHashesPerList = 1u << 16;
inline constexpr std::size_t kHashBytes = 16;  // one xxh3-128 digest: lo u64, hi u64
inline constexpr std::size_t kHashListFixedBytes = 24;

// Asks for the digests of the blocks of [offset_bytes, offset_bytes + length_bytes) of one
// disk of the open RP, in blocks of block_bytes (the last block may end early at the disk's end).
struct HashRequest {
  std::uint16_t disk_index = 0;
  std::uint32_t block_bytes = 0;   // rules.h block_bytes_valid
  std::uint64_t offset_bytes = 0;  // multiple of block_bytes
  std::uint64_t length_bytes = 0;  // 1..kMaxHashRequestBytes
  friend bool operator==(const HashRequest&, const HashRequest&) = default;
};

// Digests of `hashes.size()` consecutive blocks starting at offset_bytes (xxh3-128 of the
// replica's bytes at base_rp; a block past the replica's end never appears).
struct HashList {
  std::uint16_t disk_index = 0;
  std::uint32_t block_bytes = 0;
  std::uint64_t offset_bytes = 0;  // multiple of block_bytes
  std::vector<Hash128> hashes;     // 1..kMaxHashesPerList
  friend bool operator==(const HashList&, const HashList&) = default;
};

// Management: the kept RPs of a group (`ferry points --to`). The reply is bounded: at most
// kMaxPointsPerReply RPs (the newest; `truncated` says some older ones were left out), so
// it always fits one frame.
inline constexpr std::size_t kMaxPointsPerReply = 4096;
inline constexpr std::size_t kPointBytes = 32;  // rp_id, created, committed, store_bytes

struct PointsRequest {
  std::string group;
  friend bool operator==(const PointsRequest&, const PointsRequest&) = default;
};

struct PointInfo {
  std::uint64_t rp_id = 0;
  std::uint64_t created_unix_ns = 0;
  std::uint64_t committed_unix_ns = 0;
  std::uint64_t store_bytes = 0;  // its records in the journal (0: the RP the images hold)
  friend bool operator==(const PointInfo&, const PointInfo&) = default;
};

struct PointsReply {
  WireStatus status = WireStatus::ok;
  std::string message;  // why not (status != ok); empty otherwise
  bool truncated = false;
  std::vector<PointInfo> points;  // oldest first; empty unless status is ok
  friend bool operator==(const PointsReply&, const PointsReply&) = default;
};

// `ferry doctor`'s exchange: the receiver's protocol version and its clock, read when the
// reply is built (the client halves the round trip to estimate the offset).
struct Probe {
  std::uint16_t version = kProtocolVersion;
  friend bool operator==(const Probe&, const Probe&) = default;
};
struct ProbeReply {
  std::uint16_t version = kProtocolVersion;
  WireStatus status = WireStatus::ok;
  std::uint64_t receiver_unix_ns = 0;
  std::string message;  // why not (status != ok); empty otherwise
  friend bool operator==(const ProbeReply&, const ProbeReply&) = default;
};

std::uint64_t group_id_of(std::string_view group);

// Encoders return the payload (not the frame). Decoders reject trailing bytes, unknown enum
// values, over-long names and counts, and say which field is wrong.
// Versioning: the first 2 bytes of hello (version) and the first 4 of hello_reply (version,
// status) keep their meaning in every version. When the version is not kProtocolVersion,
// decode_hello / decode_hello_reply return only those fields (the rest has a layout this
// build does not know), so a receiver can answer bad_version and a source can report it.
std::string encode(const Hello&);
std::string encode(const HelloReply&);
std::string encode(const RpBegin&);
std::string encode(const DataFrame&);
// The same bytes with the payload given apart (the fields of `m` without its payload), so a
// sender encodes straight from its compression buffer without a copy into m.payload.
std::string encode_data(const DataFrame& m, std::string_view payload);
std::string encode(const RpEnd&);
std::string encode(const RpAck&);
std::string encode(const ErrorMsg&);
std::string encode(const HashRequest&);
std::string encode(const HashList&);
std::string encode(const PointsRequest&);
std::string encode(const PointsReply&);
std::string encode(const Probe&);
std::string encode(const ProbeReply&);
Result<Hello> decode_hello(std::string_view payload);
Result<HelloReply> decode_hello_reply(std::string_view payload);
Result<RpBegin> decode_rp_begin(std::string_view payload);
// `features`: those accepted on the connection. Without kFeatureZeroRanges a frame longer
// than kMaxBlockBytes is rejected whatever its kind, and rp_end's logical_bytes is bounded by
// frame_count x kMaxBlockBytes; with it, by frame_count x kMaxZeroRangeBytes.
Result<DataFrame> decode_data(std::string_view payload, std::uint32_t features = 0);
Result<RpEnd> decode_rp_end(std::string_view payload, std::uint32_t features = 0);
// `features`: those accepted on the connection; with kFeatureRpTimes an ok rp_ack may carry
// the times extension (and nothing else may follow the message).
Result<RpAck> decode_rp_ack(std::string_view payload, std::uint32_t features = 0);
Result<ErrorMsg> decode_error(std::string_view payload);
Result<HashRequest> decode_hash_request(std::string_view payload);
// Checks count against kMaxHashesPerList and the payload size before allocating the list.
Result<HashList> decode_hash_list(std::string_view payload);
Result<PointsRequest> decode_points_request(std::string_view payload);
// Checks count against kMaxPointsPerReply and the payload size before allocating the list.
Result<PointsReply> decode_points_reply(std::string_view payload);
Result<Probe> decode_probe(std::string_view payload);
Result<ProbeReply> decode_probe_reply(std::string_view payload);

}  // namespace ferry::transport
