// The write-ahead journal of one group: byte layout, the appender and the recovery scan.
// docs/journal-format.md gives every byte and the recovery decision table (R1..R15).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/base/status.h"
#include "ferry/site/storage.h"
#include "ferry/site/rp.h"
#include "ferry/transport/codec.h"
#include "ferry/transport/wire.h"

namespace ferry::site::journal {

inline constexpr std::uint64_t kSegmentMagic = 0x4745534a59525246ull;  // "FRYJSEG" + 'G'
inline constexpr std::uint32_t kRecordMagic = 0x524a5946;              // "FYJR"
// Version 2 stores every commit record twice (the rp_commit record and its mirror in the
// next aligned block); version 1 segments are still read, never appended to.
inline constexpr std::uint32_t kJournalVersion = 2;
inline constexpr std::uint32_t kOldestJournalVersion = 1;
inline constexpr std::size_t kBlockAlignBytes = 4096;   // batches start and end here
inline constexpr std::size_t kSegmentHeaderBytes = 4096;  // one aligned block
inline constexpr std::size_t kRecordHeaderBytes = 96;
inline constexpr std::uint32_t kMaxBlockBytes = transport::kMaxBlockBytes;  // decoded block bound
// A zero record (no payload) covers a whole zero range of the wire, up to the u32 length's
// maximum rounded down to kMaxBlockBytes (= transport::kMaxZeroRangeBytes). Records written
// before zero ranges existed hold at most kMaxBlockBytes and read the same.
inline constexpr std::uint32_t kMaxZeroRecordBytes = 0xffffffffu / kMaxBlockBytes * kMaxBlockBytes;
static_assert(kMaxZeroRecordBytes == kMaxStoredZeroBytes);
// Largest payload: a zstd block may exceed its decoded size a little (ZSTD_compressBound).
// Owned by store.h: the receiver refuses a larger frame before it reaches the journal.
inline constexpr std::uint32_t kMaxPayloadBytes = kMaxStoredPayloadBytes;
static_assert(kMaxPayloadBytes > kMaxBlockBytes);
inline constexpr std::uint32_t kMaxRecordBytes = kRecordHeaderBytes + kMaxPayloadBytes;
inline constexpr std::size_t kMaxDisks = 64;
inline constexpr std::size_t kMaxNameBytes = kMaxStoreNameBytes;  // names are file names
// A batch ends with a padding record up to the next aligned block; a padding record needs
// at least its header, so the worst case is just under one block plus a header.
inline constexpr std::size_t kMaxPaddingBytes = kBlockAlignBytes + kRecordHeaderBytes;
// A segment holds its header, one largest record and the padding after it.
inline constexpr std::uint64_t kMinSegmentBytes =
    (kSegmentHeaderBytes + kMaxRecordBytes + kMaxPaddingBytes + kBlockAlignBytes - 1) /
    kBlockAlignBytes * kBlockAlignBytes;
static_assert(kSegmentHeaderBytes % kBlockAlignBytes == 0);
static_assert(kRecordHeaderBytes % 8 == 0);
// The largest rp_commit payload (encode_commit): 38 fixed bytes, then per disk a u16-prefixed
// name and 33 bytes. Each copy of a commit record takes whole aligned blocks.
inline constexpr std::size_t kMaxCommitPayloadBytes = 38 + kMaxDisks * (2 + kMaxNameBytes + 33);
inline constexpr std::size_t kMaxCommitCopyBlocks =
    (kRecordHeaderBytes + kMaxCommitPayloadBytes + kBlockAlignBytes - 1) / kBlockAlignBytes;
static_assert(kMaxCommitCopyBlocks == 5);

enum class RecordType : std::uint8_t {
  rp_begin = 1,
  block = 2,
  rp_commit = 3,
  rp_abort = 4,
  padding = 5,
  // The second copy of an rp_commit (version 2): same lsn, rp id and payload; it starts at
  // the aligned block after the commit record and offset_bytes holds the commit's position.
  rp_commit_mirror = 6,
};

struct RecordHeader {
  RecordType type = RecordType::padding;
  RecordKind kind = RecordKind::data;
  RecordCodec codec = RecordCodec::none;
  std::uint32_t total_bytes = 0;  // header + payload
  std::uint16_t disk_index = 0;
  std::uint64_t lsn = 0;  // journal sequence number: +1 per record, across segments
  std::uint64_t rp_id = 0;
  std::uint64_t seq = 0;  // the frame's sequence in its RP (blocks)
  std::uint64_t offset_bytes = 0;
  std::uint32_t length_bytes = 0;
  Hash128 hash;                       // xxh3-128 of the decoded block
  std::uint64_t payload_checksum = 0;  // xxh3-64 of the payload bytes
  // Where the writer put the record: segment_seq << 40 | offset. A misdirected write is a
  // valid record in the wrong place; this field exposes it.
  std::uint64_t position = 0;
};
inline constexpr int kPositionOffsetBits = 40;
inline std::uint64_t record_position(std::uint64_t segment_seq, std::uint64_t offset) {
  return (segment_seq << kPositionOffsetBits) | offset;
}

// Writes the 88-byte header (computing the header checksum) into `out`.
void encode_record_header(const RecordHeader& h, char* out);
// Checks magic, header checksum, type, bounds. Says what is wrong, never reads past `len`.
Result<RecordHeader> decode_record_header(const char* p, std::size_t len);

struct SegmentHeader {
  std::uint64_t group_id = 0;  // xxh3-64 of the group name
  std::uint64_t segment_seq = 0;
  std::uint32_t version = kJournalVersion;  // kOldestJournalVersion..kJournalVersion
};
void encode_segment_header(const SegmentHeader& h, char* out /* kSegmentHeaderBytes */);
Result<SegmentHeader> decode_segment_header(const char* p, std::size_t len);

// rp_begin payload: the fields and disks of RpBeginInfo, then (tail version 1, disk
// identities) the source name and per disk its mode and identity. A payload that ends after
// the disks (written before identities) decodes with identities unknown. Tail version 2 (the
// VM's definition) adds a u32 length and the domain XML after version 1's fields; it is
// written only when the RP has one, so a store of RPs without it stays readable by builds
// that know version 1 only.
inline constexpr std::uint8_t kBeginTailVersion = 1;
inline constexpr std::uint8_t kBeginTailVersionVmConfig = 2;
std::string encode_begin(const RpBeginInfo& rp);
Result<RpBeginInfo> decode_begin(std::string_view payload);
std::string encode_commit(const RpInfo& rp);
Result<RpInfo> decode_commit(std::string_view payload);

std::string segment_name(std::uint64_t segment_seq);  // "<16 hex digits>.seg"
std::optional<std::uint64_t> parse_segment_name(const std::string& name);

// Where a record lives.
struct RecordLoc {
  std::uint64_t segment_seq = 0;
  std::uint64_t offset = 0;
};

// One block of a committed RP, enough to find, check and place it. Not held for every block:
// the index keeps chunks (below), and a chunk's entries are read back from its records.
struct BlockEntry {
  RecordLoc loc;
  std::uint64_t offset_bytes = 0;
  std::uint32_t length_bytes = 0;
  std::uint32_t total_bytes = 0;
  std::uint16_t disk_index = 0;
  RecordKind kind = RecordKind::data;
  RecordCodec codec = RecordCodec::none;
};

// Up to kChunkRecords consecutive block records of one RP, in journal order, in one segment
// (padding records may lie between them). The records are self-describing, so the index
// keeps only where they are and which bytes of which disks they may touch: lookups use the
// [lowest_bytes, highest_end_bytes) bound, never an assumption about the sender's order.
inline constexpr std::uint32_t kChunkRecords = 256;
// Reading a chunk back: one read of at most this many bytes at a time (headers in between
// are parsed from it); a chunk of large records is read header by header instead.
inline constexpr std::size_t kChunkReadBytes = 1u << 20;
struct Chunk {
  std::uint64_t position = 0;          // record_position() of its first record
  std::uint64_t lowest_bytes = 0;      // lowest offset of its records
  std::uint64_t highest_end_bytes = 0; // highest offset + length of its records (u64)
  std::uint64_t disk_mask = 0;         // bit d: it holds a record of disk d
  std::uint32_t span_bytes = 0;        // from its first record's start to its last one's end
  std::uint32_t record_count = 0;      // block records (1..kChunkRecords)
  std::uint64_t segment_seq() const { return position >> kPositionOffsetBits; }
  std::uint64_t offset() const { return position & ((1ull << kPositionOffsetBits) - 1); }
};
static_assert(sizeof(Chunk) == 40);
static_assert(kMaxDisks <= 64, "Chunk::disk_mask has a bit per disk");
// 256 records of at most kMaxRecordBytes and a padding record after each fit in span_bytes.
static_assert(std::uint64_t(kChunkRecords) * (kMaxRecordBytes + kMaxPaddingBytes) < (1ull << 32));

// The block records of one RP: memory is bounded by the number of chunks (about 52 bytes
// per kChunkRecords records), not by the number of blocks.
class RpIndex {
 public:
  // Records come in journal order.
  void add(const BlockEntry& e);
  // After the last add (commit, or the scan's commit record): builds the offset order.
  void seal();
  const std::vector<Chunk>& chunks() const { return chunks_; }
  std::uint64_t record_count() const { return record_count_; }
  // The chunks that may hold records of `disk` touching [lo, hi), ascending (journal order).
  std::vector<std::uint32_t> overlapping(std::uint16_t disk, std::uint64_t lo,
                                         std::uint64_t hi) const;
  std::size_t memory_bytes() const;

 private:
  std::vector<Chunk> chunks_;
  std::vector<std::uint32_t> by_lowest_;  // chunk ids by lowest_bytes
  std::vector<std::uint64_t> max_end_;    // max highest_end_bytes of by_lowest_[0..i]
  std::uint64_t record_count_ = 0;
  bool sealed_ = false;
};

struct CommittedRp {
  RpBeginInfo begin;
  RpInfo info;
  RpIndex index;  // its block records, in journal order (later ones win)
  // The segment of its rp_begin record: the segments before it hold only older RPs, so
  // pruning removes them whole once the base has passed those RPs.
  std::uint64_t first_segment = 0;
};

enum class ScanMode : std::uint8_t {
  recover = 0,    // exclusive: decides torn tail vs corruption (look-ahead, R1/R2)
  read_only = 1,  // concurrent with a writer: trusts committed RPs before the first gap
};

struct ScanResult {
  std::vector<CommittedRp> committed;
  // Where appends resume: everything at or after it is not part of a committed RP.
  std::optional<RecordLoc> cut;  // nullopt: no valid segment at all
  std::uint32_t cut_version = kJournalVersion;  // of the segment `cut` is in
  std::uint64_t next_lsn = 1;
  std::uint64_t next_segment_seq = 1;
  bool tail_dirty = false;  // bytes or segments exist past `cut` (R1, R3, R4)
  std::vector<std::uint64_t> segments;  // present, in order
  std::vector<std::string> notes;        // which recovery cases fired, for logs and tests
  // Records at the start of the first segment that belong to an RP whose rp_begin was in
  // a segment pruning removed (the RP is in the replica images): skipped.
  std::uint64_t skipped_records = 0;
};

// `trusted_end`: bytes at or after it (and later segments) are read as absent (R18: what
// followed the last successful sync before a failed one, not yet cut).
Result<ScanResult> scan(Storage& storage, const std::string& journal_dir,
                        std::uint64_t group_id, ScanMode mode,
                        std::optional<RecordLoc> trusted_end = std::nullopt);

// Cuts the journal at `cut` (R1/R3/R4): truncates that segment, removes later ones, and
// makes both durable before any new append may reuse the space.
Status cut_tail(Storage& storage, const std::string& journal_dir, const ScanResult& scan);

// R18: cuts the journal back to `end` before anything reads it: truncates that segment
// (removes it when `end` is inside its header), removes later segments, and makes both
// durable. Idempotent.
Status cut_back_to(Storage& storage, const std::string& journal_dir, RecordLoc end);

// Pruning: removes the segments numbered below `first_kept` (never the newest segment,
// where appends resume) and makes the removal durable. Idempotent; a crash part way leaves
// a prefix removed, which the next call finishes.
Status remove_segments_below(Storage& storage, const std::string& journal_dir,
                             std::uint64_t first_kept);

// Appends records in 4 KiB-aligned batches through two bounded buffers; io_uring writes one
// buffer while the other fills. Nothing is durable until sync().
class Writer {
 public:
  struct Options {
    std::string dir;
    std::uint64_t group_id = 0;
    std::uint64_t segment_bytes = 0;
    std::size_t buffer_bytes = 0;  // each of the two buffers
  };
  // Resumes at `cut` (or creates the first segment lazily when there is none).
  static Result<std::unique_ptr<Writer>> open(std::shared_ptr<Storage> storage,
                                              const Options& options, const ScanResult& scan);
  ~Writer();
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;

  // Copies the record into the batch; `h.lsn` and `h.total_bytes` are filled in here. An
  // rp_commit must start an aligned block (flush first); it is stored twice (the record and
  // its rp_commit_mirror in the next aligned block, zeros between) and the batch ends aligned.
  Result<RecordLoc> append(RecordHeader h, std::string_view payload);
  // Pads the batch to an aligned block, writes it and waits (not durable yet).
  Status flush();
  // fdatasync of the current segment (earlier segments were synced when they were closed).
  Status sync();
  bool is_direct() const;
  std::uint64_t next_lsn() const { return next_lsn_; }
  // Everything before durable_end() was made durable by a sync that returned ok (or was
  // found at open); has_unsynced(): something was written, or a segment created, after it.
  // After a failed write or sync nothing at or after durable_end() may be trusted (R18).
  RecordLoc durable_end() const { return durable_end_; }
  bool has_unsynced() const { return unsynced_; }

 private:
  Writer() = default;
  Status ensure_room(std::size_t record_bytes);
  Status roll_segment();
  Status submit_aligned_prefix();
  void put(const RecordHeader& h, std::string_view payload);
  void put_zeros_to_block_end();
  Result<RecordLoc> append_commit(RecordHeader h, std::string_view payload);

  std::shared_ptr<Storage> storage_;
  Options opt_;
  std::unique_ptr<StorageFile> file_;
  std::uint64_t segment_seq_ = 0;
  std::uint64_t next_segment_seq_ = 1;
  std::uint64_t next_lsn_ = 1;
  char* buf_[2] = {nullptr, nullptr};
  int cur_ = 0;
  std::size_t used_ = 0;               // bytes in buf_[cur_]
  std::uint64_t buf_file_offset_ = 0;  // file offset of buf_[cur_][0], aligned
  bool writes_in_flight_ = false;
  RecordLoc durable_end_;
  bool unsynced_ = false;
  bool warned_buffered_ = false;  // the O_DIRECT fallback is logged once per store
};

// Reads records of committed RPs back (apply and restore): one read handle per segment.
class Reader {
 public:
  Reader(std::shared_ptr<Storage> storage, std::string dir);
  ~Reader();
  // Reads the record at `e`, re-checks header, identity and payload checksum, decodes it
  // and checks the xxh3-128 of the decoded bytes. Zero blocks return an empty string.
  Status load_block(std::uint64_t rp_id, const BlockEntry& e, std::string& decoded);
  // The entries of chunk `c` of RP `rp_id`, in journal order, from the records' headers
  // (each checked: header checksum, type, RP, position, and inside the chunk's bounds).
  Status load_chunk(std::uint64_t rp_id, const Chunk& c, std::vector<BlockEntry>& out);

 private:
  Result<StorageFile*> segment(std::uint64_t seq);
  std::shared_ptr<Storage> storage_;
  std::string dir_;
  std::map<std::uint64_t, std::unique_ptr<StorageFile>> files_;
  std::string raw_;
  std::string window_;  // load_chunk's read buffer, at most kChunkReadBytes
  std::optional<transport::Decompressor> dctx_;  // reused for every block
};

}  // namespace ferry::site::journal
