#include "journal.h"

#include <sys/mman.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "ferry/base/bytes.h"
#include "ferry/base/kill_point.h"
#include "ferry/transport/codec.h"
#include "ferry/base/log.h"

namespace ferry::site::journal {
namespace {

constexpr std::size_t kScanWindowBytes = 1u << 20;
// A device writes a 512-byte sector whole or not at all: the grain of a torn write.
constexpr std::uint64_t kSectorBytes = 512;

std::uint64_t align_up(std::uint64_t v) {
  return (v + kBlockAlignBytes - 1) / kBlockAlignBytes * kBlockAlignBytes;
}

// The writer's two batch buffers (megabytes each) are mapped, not malloc'ed: page-aligned,
// zero pages until touched, and no fill of the whole size at every store open under
// MALLOC_PERTURB_ (meson sets it for every test; it made the store's crash sweeps 50x
// slower). Under ASan they stay on the heap, where its redzones guard them.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kBuffersOnHeap = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kBuffersOnHeap = true;
#else
constexpr bool kBuffersOnHeap = false;
#endif
#else
constexpr bool kBuffersOnHeap = false;
#endif

char* alloc_batch_buffer(std::size_t bytes) {
  static_assert(kBlockAlignBytes <= 4096, "mmap gives page (4 KiB) alignment");
  void* p = nullptr;
  if (kBuffersOnHeap) {
    p = std::aligned_alloc(kBlockAlignBytes, bytes);
    FERRY_ASSERT(p != nullptr);
  } else {
    p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    FERRY_ASSERT(p != MAP_FAILED);
  }
  return static_cast<char*>(p);
}

void free_batch_buffer(char* p, std::size_t bytes) {
  if (kBuffersOnHeap)
    std::free(p);
  else
    ::munmap(p, bytes);
}

std::string seg_path(const std::string& dir, std::uint64_t seq) {
  return dir + "/" + segment_name(seq);
}

Status corrupt_at(const std::string& dir, std::uint64_t seq, std::uint64_t offset,
                  const std::string& what) {
  return Status::error(Errc::corrupt, "journal segment " + seg_path(dir, seq) + " offset " +
                                          std::to_string(offset) + ": " + what);
}

bool record_type_known(std::uint8_t t) { return t >= 1 && t <= 6; }

bool is_commit_copy(RecordType t) {
  return t == RecordType::rp_commit || t == RecordType::rp_commit_mirror;
}

}  // namespace

// --- layouts ---------------------------------------------------------------------------

void encode_record_header(const RecordHeader& h, char* out) {
  std::string s;
  s.reserve(kRecordHeaderBytes);
  ByteWriter w(s);
  w.u32(kRecordMagic);
  w.u8(static_cast<std::uint8_t>(h.type));
  w.u8(static_cast<std::uint8_t>(h.kind));
  w.u8(static_cast<std::uint8_t>(h.codec));
  w.u8(0);
  w.u32(h.total_bytes);
  w.u16(h.disk_index);
  w.u16(0);
  w.u64(h.lsn);
  w.u64(h.rp_id);
  w.u64(h.seq);
  w.u64(h.offset_bytes);
  w.u32(h.length_bytes);
  w.u32(0);
  w.u64(h.hash.lo);
  w.u64(h.hash.hi);
  w.u64(h.payload_checksum);
  w.u64(h.position);
  FERRY_ASSERT(s.size() == kRecordHeaderBytes - 8);
  w.u64(xxh3_64(s.data(), s.size()));
  std::memcpy(out, s.data(), kRecordHeaderBytes);
}

Result<RecordHeader> decode_record_header(const char* p, std::size_t len) {
  if (len < kRecordHeaderBytes) return Status::error(Errc::corrupt, "record header cut short");
  ByteReader r(p, kRecordHeaderBytes);
  if (r.u32() != kRecordMagic) return Status::error(Errc::corrupt, "bad record magic");
  if (load_le64(p + kRecordHeaderBytes - 8) != xxh3_64(p, kRecordHeaderBytes - 8))
    return Status::error(Errc::corrupt, "record header checksum mismatch");
  RecordHeader h;
  std::uint8_t type = r.u8();
  std::uint8_t kind = r.u8();
  std::uint8_t codec = r.u8();
  r.u8();
  if (!record_type_known(type) || kind > 1 || codec > 1)
    return Status::error(Errc::corrupt, "unknown record type, kind or codec");
  h.type = static_cast<RecordType>(type);
  h.kind = static_cast<RecordKind>(kind);
  h.codec = static_cast<RecordCodec>(codec);
  h.total_bytes = r.u32();
  h.disk_index = r.u16();
  r.u16();
  h.lsn = r.u64();
  h.rp_id = r.u64();
  h.seq = r.u64();
  h.offset_bytes = r.u64();
  h.length_bytes = r.u32();
  r.u32();
  h.hash.lo = r.u64();
  h.hash.hi = r.u64();
  h.payload_checksum = r.u64();
  h.position = r.u64();
  FERRY_ASSERT(r.ok());
  if (h.total_bytes < kRecordHeaderBytes || h.total_bytes > kMaxRecordBytes)
    return Status::error(Errc::corrupt, "record length " + std::to_string(h.total_bytes) +
                                            " out of bounds");
  // Only a zero block may be longer than a data block: it has no payload to bound.
  const bool zero_block = h.type == RecordType::block && h.kind == RecordKind::zero;
  if (h.length_bytes > (zero_block ? kMaxZeroRecordBytes : kMaxBlockBytes))
    return Status::error(Errc::corrupt, "block length out of bounds");
  if (zero_block && h.length_bytes > kMaxBlockBytes && h.total_bytes != kRecordHeaderBytes)
    return Status::error(Errc::corrupt, "zero range record with a payload");
  return h;
}

void encode_segment_header(const SegmentHeader& h, char* out) {
  std::string s;
  ByteWriter w(s);
  FERRY_ASSERT(h.version >= kOldestJournalVersion && h.version <= kJournalVersion);
  w.u64(kSegmentMagic);
  w.u32(h.version);
  w.u32(static_cast<std::uint32_t>(kSegmentHeaderBytes));
  w.u64(h.group_id);
  w.u64(h.segment_seq);
  w.u64(xxh3_64(s.data(), s.size()));
  std::memset(out, 0, kSegmentHeaderBytes);
  std::memcpy(out, s.data(), s.size());
}

Result<SegmentHeader> decode_segment_header(const char* p, std::size_t len) {
  constexpr std::size_t kFields = 32;
  if (len < kSegmentHeaderBytes) return Status::error(Errc::corrupt, "segment header cut short");
  if (load_le64(p + kFields) != xxh3_64(p, kFields))
    return Status::error(Errc::corrupt, "segment header checksum mismatch");
  ByteReader r(p, kFields);
  if (r.u64() != kSegmentMagic) return Status::error(Errc::corrupt, "bad segment magic");
  std::uint32_t version = r.u32();
  if (version < kOldestJournalVersion || version > kJournalVersion)
    return Status::error(Errc::unsupported,
                         "journal version " + std::to_string(version) + " (this build reads " +
                             std::to_string(kOldestJournalVersion) + " to " +
                             std::to_string(kJournalVersion) + ")");
  if (r.u32() != kSegmentHeaderBytes)
    return Status::error(Errc::corrupt, "bad segment header size");
  SegmentHeader h;
  h.group_id = r.u64();
  h.segment_seq = r.u64();
  h.version = version;
  return h;
}

std::string encode_begin(const RpBeginInfo& rp) {
  std::string s;
  ByteWriter w(s);
  FERRY_ASSERT(rp.disks.size() <= kMaxDisks);
  w.u64(rp.rp_id);
  w.u64(rp.base_rp);
  w.u64(rp.created_unix_ns);
  w.u32(rp.flags);
  w.u16(static_cast<std::uint16_t>(rp.disks.size()));
  for (const auto& d : rp.disks) {
    w.str16(d.name);
    w.u64(d.size_bytes);
    w.u8(d.full ? 1 : 0);
  }
  // Tail version 1 (disk identities): older payloads end after the disks and still decode.
  // Version 2 appends the VM's definition, only when there is one.
  FERRY_ASSERT(rp.vm_config.size() <= kMaxVmConfigBytes);
  w.u8(rp.vm_config.empty() ? kBeginTailVersion : kBeginTailVersionVmConfig);
  w.str16(rp.source_name);
  for (const auto& d : rp.disks) {
    w.u8(d.full ? 0 : d.resync ? 2 : 1);
    w.u8(d.identity_ephemeral ? 1 : 0);
    w.u64(d.identity.lo);
    w.u64(d.identity.hi);
  }
  if (!rp.vm_config.empty()) {
    w.u32(static_cast<std::uint32_t>(rp.vm_config.size()));
    w.bytes(rp.vm_config.data(), rp.vm_config.size());
  }
  return s;
}

Result<RpBeginInfo> decode_begin(std::string_view payload) {
  ByteReader r(payload);
  RpBeginInfo rp;
  rp.rp_id = r.u64();
  rp.base_rp = r.u64();
  rp.created_unix_ns = r.u64();
  rp.flags = r.u32();
  std::uint16_t n = r.u16();
  if (!r.ok() || n > kMaxDisks) return Status::error(Errc::corrupt, "bad rp_begin payload");
  for (std::uint16_t i = 0; i < n && r.ok(); ++i) {
    RpBeginInfo::Disk d;
    d.name = r.str16(kMaxNameBytes);
    d.size_bytes = r.u64();
    d.full = r.u8() != 0;
    rp.disks.push_back(std::move(d));
  }
  if (r.ok() && r.remaining() != 0) {
    const std::uint8_t tail = r.u8();
    if (tail != kBeginTailVersion && tail != kBeginTailVersionVmConfig)
      return Status::error(Errc::corrupt, "bad rp_begin payload");
    rp.source_name = r.str16(kMaxNameBytes);
    for (auto& d : rp.disks) {
      std::uint8_t mode = r.u8(), flags = r.u8();
      d.identity.lo = r.u64();
      d.identity.hi = r.u64();
      if (mode > 2 || (mode == 0) != d.full || flags > 1)
        return Status::error(Errc::corrupt, "bad rp_begin payload");
      d.resync = mode == 2;
      d.identity_ephemeral = flags != 0;
    }
    if (r.ok() && tail == kBeginTailVersionVmConfig) {
      // Length checked against the limit and the payload before the copy; never empty.
      const std::uint32_t len = r.u32();
      if (!r.ok() || len == 0 || len > kMaxVmConfigBytes || len > r.remaining())
        return Status::error(Errc::corrupt, "bad rp_begin payload (vm config length)");
      rp.vm_config.resize(len);
      r.bytes(rp.vm_config.data(), len);
    }
  }
  if (!r.ok() || r.remaining() != 0) return Status::error(Errc::corrupt, "bad rp_begin payload");
  return rp;
}

std::string encode_commit(const RpInfo& rp) {
  std::string s;
  ByteWriter w(s);
  FERRY_ASSERT(rp.disks.size() <= kMaxDisks);
  w.u64(rp.rp_id);
  w.u64(rp.base_rp);
  w.u64(rp.created_unix_ns);
  w.u64(rp.committed_unix_ns);
  w.u32(rp.flags);
  w.u16(static_cast<std::uint16_t>(rp.disks.size()));
  for (const auto& d : rp.disks) {
    w.str16(d.name);
    w.u64(d.size_bytes);
    w.u8(d.full ? 1 : 0);
    w.u64(d.changed_bytes);
    w.u64(d.zero_bytes);
    w.u64(d.stored_bytes);
  }
  return s;
}

Result<RpInfo> decode_commit(std::string_view payload) {
  ByteReader r(payload);
  RpInfo rp;
  rp.rp_id = r.u64();
  rp.base_rp = r.u64();
  rp.created_unix_ns = r.u64();
  rp.committed_unix_ns = r.u64();
  rp.flags = r.u32();
  std::uint16_t n = r.u16();
  if (!r.ok() || n > kMaxDisks) return Status::error(Errc::corrupt, "bad rp_commit payload");
  for (std::uint16_t i = 0; i < n && r.ok(); ++i) {
    RpDiskInfo d;
    d.name = r.str16(kMaxNameBytes);
    d.size_bytes = r.u64();
    d.full = r.u8() != 0;
    d.changed_bytes = r.u64();
    d.zero_bytes = r.u64();
    d.stored_bytes = r.u64();
    rp.disks.push_back(std::move(d));
  }
  if (!r.ok() || r.remaining() != 0) return Status::error(Errc::corrupt, "bad rp_commit payload");
  return rp;
}

std::string segment_name(std::uint64_t segment_seq) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%016" PRIx64 ".seg", segment_seq);
  return buf;
}

std::optional<std::uint64_t> parse_segment_name(const std::string& name) {
  if (name.size() != 20 || name.compare(16, 4, ".seg") != 0) return std::nullopt;
  std::uint64_t v = 0;
  for (int i = 0; i < 16; ++i) {
    char c = name[i];
    int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
    if (d < 0) return std::nullopt;
    v = (v << 4) | static_cast<std::uint64_t>(d);
  }
  return v;
}

// --- recovery scan ---------------------------------------------------------------------

namespace {

// A windowed reader over one segment: few syscalls for many small records.
class SegmentView {
 public:
  static Result<SegmentView> open(Storage& storage, const std::string& path) {
    FERRY_ASSIGN_OR_RETURN(auto f, storage.open(path, OpenFlags{.read_only = true}));
    FERRY_ASSIGN_OR_RETURN(std::uint64_t size, f->size());
    SegmentView v;
    v.file_ = std::move(f);
    v.size_ = size;
    return v;
  }
  std::uint64_t size() const { return size_; }
  void clamp(std::uint64_t end) { size_ = std::min(size_, end); }
  // Up to `len` bytes at `offset` (fewer at the end of the file).
  Result<std::string_view> view(std::uint64_t offset, std::size_t len) {
    if (offset >= size_) return std::string_view();
    len = static_cast<std::size_t>(std::min<std::uint64_t>(len, size_ - offset));
    if (offset < win_off_ || offset + len > win_off_ + win_.size()) {
      win_.resize(std::max(len, kScanWindowBytes));
      FERRY_ASSIGN_OR_RETURN(std::size_t got, file_->pread(win_.data(), win_.size(), offset));
      win_.resize(got);
      win_off_ = offset;
      if (got < len) return std::string_view(win_.data(), got);
    }
    return std::string_view(win_.data() + (offset - win_off_), len);
  }

 private:
  std::unique_ptr<StorageFile> file_;
  std::uint64_t size_ = 0;
  std::string win_;
  std::uint64_t win_off_ = 0;
};

class Scanner {
 public:
  Scanner(Storage& storage, const std::string& dir, std::uint64_t group_id, ScanMode mode,
          std::optional<RecordLoc> trusted_end)
      : storage_(storage), dir_(dir), group_id_(group_id), mode_(mode),
        trusted_end_(trusted_end) {}

  Result<ScanResult> run() {
    FERRY_TRY(list_segments());
    for (std::size_t i = 0; i < out_.segments.size() && !stopped_; ++i)
      FERRY_TRY(scan_segment(i));
    finish();
    return std::move(out_);
  }

 private:
  Status list_segments() {
    FERRY_ASSIGN_OR_RETURN(auto names, storage_.list_dir(dir_));
    for (const auto& n : names)
      if (auto seq = parse_segment_name(n)) out_.segments.push_back(*seq);
    std::sort(out_.segments.begin(), out_.segments.end());
    if (trusted_end_)
      std::erase_if(out_.segments, [&](std::uint64_t seq) {
        return seq > trusted_end_->segment_seq ||
               (seq == trusted_end_->segment_seq && trusted_end_->offset < kSegmentHeaderBytes);
      });
    for (std::size_t i = 1; i < out_.segments.size(); ++i)
      if (out_.segments[i] != out_.segments[i - 1] + 1)
        return Status::error(Errc::corrupt,
                             "journal " + dir_ + ": segment " +
                                 segment_name(out_.segments[i - 1] + 1) +
                                 " is missing (R9)");
    return Status::ok();
  }

  Status scan_segment(std::size_t index) {
    std::uint64_t seq = out_.segments[index];
    FERRY_ASSIGN_OR_RETURN(SegmentView view, SegmentView::open(storage_, seg_path(dir_, seq)));
    if (trusted_end_ && seq == trusted_end_->segment_seq) view.clamp(trusted_end_->offset);
    sizes_[seq] = view.size();
    FERRY_ASSIGN_OR_RETURN(std::string_view hb, view.view(0, kSegmentHeaderBytes));
    auto sh = decode_segment_header(hb.data(), hb.size());
    if (sh.is_ok() && (sh->group_id != group_id_ || sh->segment_seq != seq))
      return corrupt_at(dir_, seq, 0, "segment header names another group or sequence (R8)");
    if (!sh.is_ok() && sh.status().code() == Errc::unsupported) return sh.status();
    if (!sh.is_ok()) return invalid(index, 0, sh.status().message());
    version_ = sh->version;
    if (index == 0) {
      cut_ = RecordLoc{seq, kSegmentHeaderBytes};
      cut_version_ = version_;
    }
    std::uint64_t pos = kSegmentHeaderBytes;
    while (pos < view.size() && !stopped_) FERRY_TRY(scan_record(index, view, pos));
    return Status::ok();
  }

  // One record read and checked; `why` says what is wrong (empty: every check passed).
  struct Checked {
    RecordHeader h;
    std::string_view payload;  // valid until the next read of the view
    std::string why;
    bool payload_mismatch = false;  // the header is good, the payload checksum is not
  };

  // Reads the record at `pos` and checks header, place, lsn (`lsn`; padding has none) and
  // payload. Fails only for I/O errors, never for bad bytes.
  Result<Checked> check_record(SegmentView& view, std::uint64_t seq, std::uint64_t pos,
                               std::uint64_t lsn) {
    Checked c;
    FERRY_ASSIGN_OR_RETURN(std::string_view hv, view.view(pos, kRecordHeaderBytes));
    auto h = decode_record_header(hv.data(), hv.size());
    if (!h.is_ok()) {
      c.why = h.status().message();
      return c;
    }
    c.h = *h;
    if (h->position != record_position(seq, pos)) {
      c.why = "record written for another place (misdirected)";
      return c;
    }
    // lsn 0: the first record of the journal, which pruning may have started anywhere.
    if (h->type != RecordType::padding && lsn != 0 && h->lsn != lsn) {
      c.why = "lsn " + std::to_string(h->lsn) + " where " + std::to_string(lsn) + " was expected";
      return c;
    }
    FERRY_ASSIGN_OR_RETURN(c.payload, view.view(pos + kRecordHeaderBytes,
                                                h->total_bytes - kRecordHeaderBytes));
    if (c.payload.size() != h->total_bytes - kRecordHeaderBytes) {
      c.why = "record cut short by the end of the segment";
    } else if (xxh3_64(c.payload.data(), c.payload.size()) != h->payload_checksum) {
      c.why = "payload checksum mismatch";
      c.payload_mismatch = true;
    }
    return c;
  }

  // Reads, checks and applies the record at `pos`; advances `pos` or stops the scan.
  Status scan_record(std::size_t index, SegmentView& view, std::uint64_t& pos) {
    std::uint64_t seq = out_.segments[index];
    FERRY_ASSIGN_OR_RETURN(Checked c, check_record(view, seq, pos, expected_lsn_));
    if (!c.why.empty()) {
      if (version_ >= 2 && open_ && pos % kBlockAlignBytes == 0) {
        FERRY_ASSIGN_OR_RETURN(bool committed, commit_from_mirror(index, view, pos, c.why));
        if (committed) return Status::ok();
      }
      return invalid(index, pos, c.why);
    }
    // Pruning removes whole segments below the one where the oldest RP above the store's
    // base begins, so the first segment may start inside an older RP (compacted into the
    // replica): its records before the first rp_begin are skipped. The store checks that
    // the first RP the scan returns follows its base (R20).
    if (orphan_prefix_ && c.h.type == RecordType::rp_begin) orphan_prefix_ = false;
    if (orphan_prefix_ && index == 0 && c.h.type != RecordType::padding &&
        c.h.type != RecordType::rp_commit_mirror) {
      expected_lsn_ = c.h.lsn + 1;
      ++out_.skipped_records;
      if (c.h.type != RecordType::rp_commit) pos += c.h.total_bytes;
      else if (version_ < 2) pos = after_v1_commit(pos + c.h.total_bytes);
      else pos += 2 * align_up(c.h.total_bytes);
      return Status::ok();
    }
    if (c.h.type != RecordType::padding) orphan_prefix_ = false;
    if (c.h.type == RecordType::rp_commit_mirror)
      return corrupt_at(dir_, seq, pos, "rp_commit_mirror without its rp_commit before it (R11)");
    if (c.h.type != RecordType::padding) expected_lsn_ = c.h.lsn + 1;
    if (c.h.type == RecordType::rp_commit) {
      std::string payload(c.payload);  // the view's window moves when the mirror is read
      if (version_ < 2) {
        std::uint64_t end = after_v1_commit(pos + c.h.total_bytes);
        FERRY_TRY(on_commit(c.h, payload, RecordLoc{seq, pos}, end));
        pos = end;
        return Status::ok();
      }
      std::uint64_t copy = align_up(c.h.total_bytes);
      FERRY_TRY(on_commit(c.h, payload, RecordLoc{seq, pos}, pos + 2 * copy));
      FERRY_TRY(check_mirror(view, seq, pos, c.h, payload));
      pos += 2 * copy;
      return Status::ok();
    }
    FERRY_TRY(apply(c.h, c.payload, RecordLoc{seq, pos}));
    pos += c.h.total_bytes;
    return Status::ok();
  }

  // Version 1 ends a commit's batch with a padding record to the block end; when less than a
  // record header's room was left, that padding runs on through the whole next block.
  static std::uint64_t after_v1_commit(std::uint64_t end) {
    std::uint64_t next = align_up(end);
    if (next != end && next - end < kRecordHeaderBytes) next += kBlockAlignBytes;
    return next;
  }

  static bool is_mirror_of(const RecordHeader& m, std::uint64_t seq, std::uint64_t commit_pos,
                           std::uint64_t rp_id, std::uint64_t copy_bytes) {
    return m.type == RecordType::rp_commit_mirror && m.rp_id == rp_id &&
           m.offset_bytes == record_position(seq, commit_pos) &&
           align_up(m.total_bytes) == copy_bytes;
  }

  // Version 2, a valid commit record at `pos`: its mirror follows in the next aligned block.
  // A damaged mirror loses nothing (R14): the commit record alone commits the RP.
  Status check_mirror(SegmentView& view, std::uint64_t seq, std::uint64_t pos,
                      const RecordHeader& h, const std::string& payload) {
    std::uint64_t copy = align_up(h.total_bytes);
    FERRY_ASSIGN_OR_RETURN(Checked m, check_record(view, seq, pos + copy, h.lsn));
    if (m.why.empty() && !is_mirror_of(m.h, seq, pos, h.rp_id, copy))
      m.why = "not the mirror of that commit record";
    else if (m.why.empty() && m.payload != payload)
      m.why = "its payload differs from the commit record's";
    if (!m.why.empty())
      out_.notes.push_back("R14: RP " + std::to_string(h.rp_id) + ": the mirror of its commit "
                           "record, segment " + segment_name(seq) + " offset " +
                           std::to_string(pos + copy) + ", is damaged (" + m.why +
                           "); the commit record at offset " + std::to_string(pos) +
                           " commits it");
    return Status::ok();
  }

  // Version 2: the record at aligned `pos` failed a check while an RP is open. If it was that
  // RP's commit record, its mirror in one of the next aligned blocks commits the RP (R14). If
  // both copies show damage that no torn write explains, refuse (R15): the RP was committed
  // and maybe acknowledged, so cutting it as a torn tail would lose it silently.
  Result<bool> commit_from_mirror(std::size_t index, SegmentView& view, std::uint64_t& pos,
                                  const std::string& why) {
    std::uint64_t seq = out_.segments[index];
    std::uint64_t rp = open_->begin.rp_id;
    for (std::uint64_t n = 1; n <= kMaxCommitCopyBlocks; ++n) {
      std::uint64_t copy = n * kBlockAlignBytes;
      if (pos + copy + kRecordHeaderBytes > view.size()) break;
      FERRY_ASSIGN_OR_RETURN(Checked m, check_record(view, seq, pos + copy, expected_lsn_));
      if (!m.why.empty() || !is_mirror_of(m.h, seq, pos, rp, copy)) continue;
      std::string payload(m.payload);
      RecordHeader h = m.h;
      h.type = RecordType::rp_commit;
      out_.notes.push_back("R14: RP " + std::to_string(rp) + ": its commit record, segment " +
                           segment_name(seq) + " offset " + std::to_string(pos) +
                           ", is damaged (" + why + "); its mirror at offset " +
                           std::to_string(pos + copy) + " commits it");
      ++expected_lsn_;
      FERRY_TRY(on_commit(h, payload, RecordLoc{seq, pos}, pos + 2 * copy));
      pos += 2 * copy;
      return true;
    }
    if (mode_ != ScanMode::recover) return false;
    FERRY_ASSIGN_OR_RETURN(bool damaged, commit_copy_damaged(view, pos, rp));
    if (!damaged) return false;
    stopped_ = true;
    return corrupt_at(dir_, seq, pos,
                      "the commit record of RP " + std::to_string(rp) +
                          " and its mirror are both damaged (" + why +
                          "); refusing rather than lose a committed RP (R15)");
  }

  // Damage no torn or lost write explains, in the commit record's block or a mirror slot
  // after it. A sector is written whole or not at all, so a header with the record magic and
  // a commit type that fails its checksum, or a commit copy of RP `rp` that fits in one
  // sector yet fails its payload checksum, was once written whole: it was durable.
  Result<bool> commit_copy_damaged(SegmentView& view, std::uint64_t pos, std::uint64_t rp) {
    for (std::uint64_t n = 0; n <= kMaxCommitCopyBlocks; ++n) {
      std::uint64_t at = pos + n * kBlockAlignBytes;
      FERRY_ASSIGN_OR_RETURN(std::string_view hv, view.view(at, kRecordHeaderBytes));
      if (hv.size() < kRecordHeaderBytes) break;
      auto type = static_cast<RecordType>(static_cast<std::uint8_t>(hv[4]));
      if (load_le32(hv.data()) != kRecordMagic || !is_commit_copy(type)) continue;
      auto h = decode_record_header(hv.data(), hv.size());
      if (!h.is_ok()) return true;
      if (h->rp_id != rp || h->total_bytes > kSectorBytes) continue;
      FERRY_ASSIGN_OR_RETURN(std::string_view pv, view.view(at + kRecordHeaderBytes,
                                                            h->total_bytes - kRecordHeaderBytes));
      if (pv.size() == h->total_bytes - kRecordHeaderBytes &&
          xxh3_64(pv.data(), pv.size()) != h->payload_checksum)
        return true;
    }
    return false;
  }

  // The record state machine. A record that passed its checksums but breaks the structure
  // cannot come from a torn write: R11, corrupt. (Commit records go through on_commit.)
  Status apply(const RecordHeader& h, std::string_view payload, RecordLoc loc) {
    switch (h.type) {
      case RecordType::padding: return Status::ok();
      case RecordType::rp_begin: return on_begin(h, payload, loc);
      case RecordType::block: return on_block(h, loc);
      case RecordType::rp_abort:
        if (open_) out_.notes.push_back("R3: RP " + std::to_string(open_->begin.rp_id) + " aborted");
        open_.reset();
        return Status::ok();
      case RecordType::rp_commit:
      case RecordType::rp_commit_mirror: break;
    }
    return corrupt_at(dir_, loc.segment_seq, loc.offset, "unexpected record type (R11)");
  }

  Status on_begin(const RecordHeader& h, std::string_view payload, RecordLoc loc) {
    auto b = decode_begin(payload);
    if (!b.is_ok() || b->rp_id != h.rp_id)
      return corrupt_at(dir_, loc.segment_seq, loc.offset, "bad rp_begin record (R11)");
    if (open_) out_.notes.push_back("R3: RP " + std::to_string(open_->begin.rp_id) +
                                    " superseded by a new rp_begin");
    open_ = CommittedRp{};
    open_->begin = std::move(*b);
    open_->first_segment = loc.segment_seq;
    return Status::ok();
  }

  Status on_block(const RecordHeader& h, RecordLoc loc) {
    if (!open_ || open_->begin.rp_id != h.rp_id || h.disk_index >= open_->begin.disks.size())
      return corrupt_at(dir_, loc.segment_seq, loc.offset,
                        "block record outside its RP or disk (R11)");
    const auto& disk = open_->begin.disks[h.disk_index];
    if (h.offset_bytes > disk.size_bytes || h.length_bytes > disk.size_bytes - h.offset_bytes)
      return corrupt_at(dir_, loc.segment_seq, loc.offset, "block beyond the disk size (R11)");
    open_->index.add(BlockEntry{loc, h.offset_bytes, h.length_bytes, h.total_bytes,
                                h.disk_index, h.kind, h.codec});
    return Status::ok();
  }

  // Closes the open RP; appends resume at `end` (after the commit and, in version 2, its
  // mirror).
  Status on_commit(const RecordHeader& h, std::string_view payload, RecordLoc loc,
                   std::uint64_t end) {
    auto info = decode_commit(payload);
    bool ok = open_ && info.is_ok() && info->rp_id == h.rp_id && open_->begin.rp_id == h.rp_id &&
              loc.offset % kBlockAlignBytes == 0;
    std::uint64_t last = out_.committed.empty() ? 0 : out_.committed.back().info.rp_id;
    // The journal may start after pruning dropped older segments: the first RP it holds
    // chains to the store's base RP, which the store checks (its state names the base).
    const bool first = out_.committed.empty();
    if (!ok || h.rp_id <= last || (!first && open_->begin.base_rp != last))
      return corrupt_at(dir_, loc.segment_seq, loc.offset,
                        "rp_commit does not close the open RP in order (R11)");
    FERRY_ASSERT(end % kBlockAlignBytes == 0 && end > loc.offset);
    open_->info = std::move(*info);
    open_->index.seal();
    // How each disk was sent and its identity live in the begin record only.
    for (std::size_t i = 0; i < open_->info.disks.size() && i < open_->begin.disks.size(); ++i) {
      open_->info.disks[i].resync = open_->begin.disks[i].resync;
      open_->info.disks[i].identity = open_->begin.disks[i].identity;
      open_->info.disks[i].identity_ephemeral = open_->begin.disks[i].identity_ephemeral;
    }
    out_.committed.push_back(std::move(*open_));
    open_.reset();
    cut_ = RecordLoc{loc.segment_seq, end};
    cut_version_ = version_;
    cut_lsn_ = h.lsn + 1;
    return Status::ok();
  }

  // The first record that fails a check. In recovery, a valid commit record further on
  // proves the bad bytes were durable: corruption (R2). Otherwise it is the torn tail (R1).
  Status invalid(std::size_t index, std::uint64_t pos, const std::string& why) {
    stopped_ = true;
    std::uint64_t seq = out_.segments[index];
    if (mode_ == ScanMode::recover) {
      FERRY_ASSIGN_OR_RETURN(auto later, find_later_commit(index, pos));
      if (later)
        return corrupt_at(dir_, seq, pos,
                          why + ", yet committed RP " + std::to_string(later->rp_id) +
                              " follows at segment " + segment_name(later->seg) + " offset " +
                              std::to_string(later->offset) + " (R2)");
    }
    out_.notes.push_back("R1: tail cut at segment " + segment_name(seq) + " offset " +
                         std::to_string(pos) + ": " + why);
    return Status::ok();
  }

  struct LaterCommit {
    std::uint64_t rp_id, seg, offset;
  };
  // Commit records start on aligned blocks, so the look-ahead reads one header per block.
  Result<std::optional<LaterCommit>> find_later_commit(std::size_t index, std::uint64_t pos) {
    for (std::size_t i = index; i < out_.segments.size(); ++i) {
      std::uint64_t seq = out_.segments[i];
      FERRY_ASSIGN_OR_RETURN(SegmentView view, SegmentView::open(storage_, seg_path(dir_, seq)));
      std::uint64_t start = i == index ? align_up(pos + 1) : kSegmentHeaderBytes;
      for (std::uint64_t off = start; off + kRecordHeaderBytes <= view.size();
           off += kBlockAlignBytes) {
        FERRY_ASSIGN_OR_RETURN(std::string_view hv, view.view(off, kRecordHeaderBytes));
        auto h = decode_record_header(hv.data(), hv.size());
        if (h.is_ok() && is_commit_copy(h->type) && h->lsn >= expected_lsn_ &&
            h->position == record_position(seq, off))
          return std::optional<LaterCommit>(LaterCommit{h->rp_id, seq, off});
      }
    }
    return std::optional<LaterCommit>();
  }

  void finish() {
    if (open_)
      out_.notes.push_back("R3: RP " + std::to_string(open_->begin.rp_id) +
                           " has no commit record; ignored");
    out_.cut = cut_;
    out_.cut_version = cut_version_;
    out_.next_lsn = cut_lsn_;
    if (cut_) {
      out_.next_segment_seq = cut_->segment_seq + 1;
      out_.tail_dirty = sizes_[cut_->segment_seq] != cut_->offset ||
                        out_.segments.back() != cut_->segment_seq;
    } else {
      out_.next_segment_seq = out_.segments.empty() ? 1 : out_.segments.front();
      out_.tail_dirty = !out_.segments.empty();
      if (!out_.segments.empty()) out_.notes.push_back("R4: no valid segment header");
    }
  }

  Storage& storage_;
  const std::string& dir_;
  std::uint64_t group_id_;
  ScanMode mode_;
  std::optional<RecordLoc> trusted_end_;
  ScanResult out_;
  std::map<std::uint64_t, std::uint64_t> sizes_;
  std::optional<CommittedRp> open_;
  std::optional<RecordLoc> cut_;
  std::uint32_t cut_version_ = kJournalVersion;
  std::uint32_t version_ = kJournalVersion;  // of the segment being scanned
  std::uint64_t cut_lsn_ = 1;
  std::uint64_t expected_lsn_ = 0;  // 0: any (the journal's first record)
  bool orphan_prefix_ = true;       // no rp_begin seen yet
  bool stopped_ = false;
};

}  // namespace

Result<ScanResult> scan(Storage& storage, const std::string& journal_dir, std::uint64_t group_id,
                        ScanMode mode, std::optional<RecordLoc> trusted_end) {
  return Scanner(storage, journal_dir, group_id, mode, trusted_end).run();
}

Status cut_back_to(Storage& storage, const std::string& dir, RecordLoc end) {
  FERRY_ASSIGN_OR_RETURN(auto names, storage.list_dir(dir));
  std::vector<std::uint64_t> segments;
  for (const auto& n : names)
    if (auto seq = parse_segment_name(n)) segments.push_back(*seq);
  for (auto seq : segments) {
    if (seq < end.segment_seq) continue;
    if (seq > end.segment_seq || end.offset < kSegmentHeaderBytes) {
      FERRY_TRY(storage.remove(seg_path(dir, seq)));
      continue;
    }
    FERRY_ASSIGN_OR_RETURN(auto f, storage.open(seg_path(dir, seq), OpenFlags{}));
    FERRY_ASSIGN_OR_RETURN(std::uint64_t size, f->size());
    if (size <= end.offset) continue;
    FERRY_TRY(f->truncate(end.offset));
    FERRY_TRY(f->datasync());
  }
  return storage.sync_dir(dir);
}

Status cut_tail(Storage& storage, const std::string& dir, const ScanResult& s) {
  FERRY_ASSERT(s.tail_dirty);
  for (auto seq : s.segments) {
    if (s.cut && seq < s.cut->segment_seq) continue;
    if (s.cut && seq == s.cut->segment_seq) {
      FERRY_ASSIGN_OR_RETURN(auto f, storage.open(seg_path(dir, seq), OpenFlags{}));
      FERRY_TRY(f->truncate(s.cut->offset));
      FERRY_TRY(f->datasync());
      continue;
    }
    FERRY_TRY(storage.remove(seg_path(dir, seq)));
  }
  return storage.sync_dir(dir);
}

// --- writer ----------------------------------------------------------------------------

Result<std::unique_ptr<Writer>> Writer::open(std::shared_ptr<Storage> storage,
                                             const Options& options, const ScanResult& scan) {
  FERRY_ASSERT(options.segment_bytes >= kMinSegmentBytes &&
               options.segment_bytes % kBlockAlignBytes == 0);
  FERRY_ASSERT(options.segment_bytes < (1ull << kPositionOffsetBits));
  FERRY_ASSERT(options.buffer_bytes >= kMaxRecordBytes + 2 * kMaxPaddingBytes &&
               options.buffer_bytes % kBlockAlignBytes == 0);
  std::unique_ptr<Writer> w(new Writer());
  w->storage_ = std::move(storage);
  w->opt_ = options;
  for (auto& b : w->buf_) b = alloc_batch_buffer(options.buffer_bytes);
  w->next_lsn_ = scan.next_lsn;
  w->next_segment_seq_ = scan.next_segment_seq;
  // Recovery cut the tail and synced it; what is left up to the cut is taken as durable.
  w->durable_end_ = scan.cut ? *scan.cut : RecordLoc{scan.next_segment_seq, 0};
  // A segment has one version: after older segments, appends start a new segment.
  if (scan.cut && scan.cut_version != kJournalVersion)
    spdlog::info("journal {}: segment {} has version {}; new records go to a version {} segment",
                 options.dir, segment_name(scan.cut->segment_seq), scan.cut_version,
                 kJournalVersion);
  if (scan.cut && scan.cut_version == kJournalVersion) {
    FERRY_ASSIGN_OR_RETURN(
        w->file_, w->storage_->open(seg_path(options.dir, scan.cut->segment_seq),
                                    OpenFlags{.direct = true}));
    w->segment_seq_ = scan.cut->segment_seq;
    w->buf_file_offset_ = scan.cut->offset;
    FERRY_ASSERT(w->buf_file_offset_ % kBlockAlignBytes == 0);
  }
  return w;
}

Writer::~Writer() {
  file_.reset();  // waits for writes in flight before their buffers go
  for (auto* b : buf_)
    if (b != nullptr) free_batch_buffer(b, opt_.buffer_bytes);
}

bool Writer::is_direct() const { return !file_ || file_->is_direct(); }

void Writer::put(const RecordHeader& h, std::string_view payload) {
  FERRY_ASSERT(used_ + h.total_bytes <= opt_.buffer_bytes);
  FERRY_ASSERT(h.total_bytes == kRecordHeaderBytes + payload.size());
  encode_record_header(h, buf_[cur_] + used_);
  if (!payload.empty())
    std::memcpy(buf_[cur_] + used_ + kRecordHeaderBytes, payload.data(), payload.size());
  used_ += h.total_bytes;
}

void Writer::put_zeros_to_block_end() {
  std::size_t end = static_cast<std::size_t>(align_up(used_));
  FERRY_ASSERT(end <= opt_.buffer_bytes);
  std::memset(buf_[cur_] + used_, 0, end - used_);
  used_ = end;
}

Result<RecordLoc> Writer::append(RecordHeader h, std::string_view payload) {
  FERRY_ASSERT(payload.size() <= kMaxPayloadBytes);
  FERRY_ASSERT(h.type != RecordType::rp_commit_mirror);
  if (h.type == RecordType::rp_commit) return append_commit(h, payload);
  std::size_t total = kRecordHeaderBytes + payload.size();
  FERRY_TRY(ensure_room(total));
  h.total_bytes = static_cast<std::uint32_t>(total);
  h.lsn = next_lsn_++;
  h.payload_checksum = xxh3_64(payload.data(), payload.size());
  RecordLoc loc{segment_seq_, buf_file_offset_ + used_};
  h.position = record_position(loc.segment_seq, loc.offset);
  put(h, payload);
  return loc;
}

// The commit record and its mirror, each from an aligned block and zero-filled to the block
// end: one damaged copy (bit rot, a misdirected write over it) leaves the other (R14). Both
// go out in the same write and the same fdatasync.
Result<RecordLoc> Writer::append_commit(RecordHeader h, std::string_view payload) {
  FERRY_ASSERT(payload.size() <= kMaxCommitPayloadBytes);
  std::size_t total = kRecordHeaderBytes + payload.size();
  std::size_t copy = static_cast<std::size_t>(align_up(total));
  FERRY_TRY(ensure_room(2 * copy));
  RecordLoc loc{segment_seq_, buf_file_offset_ + used_};
  FERRY_ASSERT(loc.offset % kBlockAlignBytes == 0);  // the store flushes before a commit
  h.total_bytes = static_cast<std::uint32_t>(total);
  h.lsn = next_lsn_++;
  h.payload_checksum = xxh3_64(payload.data(), payload.size());
  h.position = record_position(loc.segment_seq, loc.offset);
  put(h, payload);
  put_zeros_to_block_end();
  RecordHeader mirror = h;
  mirror.type = RecordType::rp_commit_mirror;
  mirror.offset_bytes = h.position;  // names the record it mirrors
  mirror.position = record_position(loc.segment_seq, loc.offset + copy);
  put(mirror, payload);
  put_zeros_to_block_end();
  FERRY_ASSERT(buf_file_offset_ + used_ == loc.offset + 2 * copy);
  return loc;
}

Status Writer::ensure_room(std::size_t record_bytes) {
  if (!file_) FERRY_TRY(roll_segment());
  std::uint64_t seg_end = buf_file_offset_ + used_ + record_bytes + kMaxPaddingBytes;
  if (seg_end > opt_.segment_bytes) FERRY_TRY(roll_segment());
  if (used_ + record_bytes + kMaxPaddingBytes > opt_.buffer_bytes)
    FERRY_TRY(submit_aligned_prefix());
  FERRY_ASSERT(used_ + record_bytes + kMaxPaddingBytes <= opt_.buffer_bytes);
  return Status::ok();
}

// Writes the whole aligned blocks of the current buffer and carries the partial last block
// into the other buffer, which becomes current (after its own write has finished).
Status Writer::submit_aligned_prefix() {
  std::size_t aligned = used_ / kBlockAlignBytes * kBlockAlignBytes;
  FERRY_ASSERT(aligned > 0);
  if (writes_in_flight_) FERRY_TRY(file_->wait_writes());
  writes_in_flight_ = false;
  unsynced_ = true;
  FERRY_TRY(file_->submit_write(buf_[cur_], aligned, buf_file_offset_));
  writes_in_flight_ = true;
  int other = 1 - cur_;
  std::memcpy(buf_[other], buf_[cur_] + aligned, used_ - aligned);
  buf_file_offset_ += aligned;
  used_ -= aligned;
  cur_ = other;
  return Status::ok();
}

Status Writer::flush() {
  if (!file_) return Status::ok();
  std::uint64_t end = buf_file_offset_ + used_;
  std::size_t pad = static_cast<std::size_t>(align_up(end) - end);
  if (pad > 0 && pad < kRecordHeaderBytes) pad += kBlockAlignBytes;
  if (pad > 0) {
    static const std::string kZeros(kMaxPaddingBytes, '\0');
    RecordHeader h;
    h.type = RecordType::padding;
    h.total_bytes = static_cast<std::uint32_t>(pad);
    std::string_view payload(kZeros.data(), pad - kRecordHeaderBytes);
    h.payload_checksum = xxh3_64(payload.data(), payload.size());
    h.position = record_position(segment_seq_, end);
    put(h, payload);  // padding takes no lsn: it is not part of the chain
  }
  if (writes_in_flight_) FERRY_TRY(file_->wait_writes());
  writes_in_flight_ = false;
  if (used_ == 0) return Status::ok();
  FERRY_ASSERT(used_ % kBlockAlignBytes == 0);
  unsynced_ = true;
  FERRY_TRY(file_->submit_write(buf_[cur_], used_, buf_file_offset_));
  FERRY_TRY(file_->wait_writes());
  buf_file_offset_ += used_;
  used_ = 0;
  return Status::ok();
}

Status Writer::sync() {
  FERRY_ASSERT(used_ == 0 && !writes_in_flight_);
  if (!file_) return Status::ok();
  FERRY_TRY(file_->datasync());
  // A new segment's name was synced by the roll, so its bytes up to here now count.
  durable_end_ = RecordLoc{segment_seq_, buf_file_offset_};
  unsynced_ = false;
  return Status::ok();
}

Status remove_segments_below(Storage& storage, const std::string& dir, std::uint64_t first_kept) {
  FERRY_ASSIGN_OR_RETURN(auto names, storage.list_dir(dir));
  std::vector<std::uint64_t> segments;
  for (const auto& n : names)
    if (auto seq = parse_segment_name(n)) segments.push_back(*seq);
  std::sort(segments.begin(), segments.end());
  if (segments.empty()) return Status::ok();
  first_kept = std::min(first_kept, segments.back());  // the newest segment always stays
  bool removed = false;
  for (auto seq : segments) {  // oldest first: a crash leaves the journal without a hole
    if (seq >= first_kept) break;
    FERRY_KILL_POINT("prune.mid_remove");
    FERRY_TRY(storage.remove(seg_path(dir, seq)));
    removed = true;
  }
  return removed ? storage.sync_dir(dir) : Status::ok();
}

// Closes the current segment durably, then starts the next one with its header; the new
// file's directory entry is synced before any commit can depend on it.
Status Writer::roll_segment() {
  if (file_) {
    FERRY_TRY(flush());
    FERRY_TRY(sync());
    file_.reset();
  }
  std::uint64_t seq = next_segment_seq_++;
  std::string path = seg_path(opt_.dir, seq);
  unsynced_ = true;  // the new segment is not trusted until a sync covers it
  FERRY_ASSIGN_OR_RETURN(file_, storage_->open(path, OpenFlags{.create = true, .direct = true}));
  FERRY_TRY(file_->truncate(0));
  if (!file_->is_direct() && !warned_buffered_) {
    warned_buffered_ = true;
    spdlog::warn("journal {}: the file system refuses O_DIRECT; using buffered I/O "
                 "(fdatasync still makes every commit durable)", opt_.dir);
  }
  segment_seq_ = seq;
  buf_file_offset_ = 0;
  FERRY_ASSERT(used_ == 0);
  encode_segment_header(SegmentHeader{opt_.group_id, seq}, buf_[cur_]);
  used_ = kSegmentHeaderBytes;
  return storage_->sync_dir(opt_.dir);
}

// --- the per-RP index ------------------------------------------------------------------

void RpIndex::add(const BlockEntry& e) {
  FERRY_ASSERT(!sealed_ && e.disk_index < kMaxDisks && e.total_bytes >= kRecordHeaderBytes);
  const std::uint64_t end = e.offset_bytes + std::uint64_t(e.length_bytes);
  record_count_ += 1;
  if (!chunks_.empty()) {
    Chunk& c = chunks_.back();
    FERRY_ASSERT(e.loc.segment_seq > c.segment_seq() ||
                 (e.loc.segment_seq == c.segment_seq() && e.loc.offset >= c.offset() + c.span_bytes));
    if (c.record_count < kChunkRecords && e.loc.segment_seq == c.segment_seq()) {
      std::uint64_t span = e.loc.offset + e.total_bytes - c.offset();
      FERRY_ASSERT(span < (1ull << 32));
      c.span_bytes = static_cast<std::uint32_t>(span);
      c.lowest_bytes = std::min(c.lowest_bytes, e.offset_bytes);
      c.highest_end_bytes = std::max(c.highest_end_bytes, end);
      c.disk_mask |= 1ull << e.disk_index;
      c.record_count += 1;
      return;
    }
  }
  chunks_.push_back(Chunk{record_position(e.loc.segment_seq, e.loc.offset), e.offset_bytes, end,
                          1ull << e.disk_index, e.total_bytes, 1});
}

void RpIndex::seal() {
  FERRY_ASSERT(!sealed_ && chunks_.size() < UINT32_MAX);
  sealed_ = true;
  by_lowest_.resize(chunks_.size());
  for (std::size_t i = 0; i < chunks_.size(); ++i) by_lowest_[i] = static_cast<std::uint32_t>(i);
  std::stable_sort(by_lowest_.begin(), by_lowest_.end(), [&](std::uint32_t a, std::uint32_t b) {
    return chunks_[a].lowest_bytes < chunks_[b].lowest_bytes;
  });
  max_end_.resize(chunks_.size());
  std::uint64_t m = 0;
  for (std::size_t i = 0; i < by_lowest_.size(); ++i)
    max_end_[i] = m = std::max(m, chunks_[by_lowest_[i]].highest_end_bytes);
  chunks_.shrink_to_fit();
}

// The chunks starting below `hi` are a prefix of the offset order; walking it backwards stops
// where no chunk up to there ends after `lo`. For the usual ascending records that visits the
// overlapping chunks and one more.
std::vector<std::uint32_t> RpIndex::overlapping(std::uint16_t disk, std::uint64_t lo,
                                                std::uint64_t hi) const {
  FERRY_ASSERT(sealed_ && lo < hi && disk < kMaxDisks);
  auto first_at_hi = std::partition_point(by_lowest_.begin(), by_lowest_.end(),
                                          [&](std::uint32_t id) {
                                            return chunks_[id].lowest_bytes < hi;
                                          });
  std::vector<std::uint32_t> out;
  for (auto j = static_cast<std::size_t>(first_at_hi - by_lowest_.begin()); j-- > 0;) {
    if (max_end_[j] <= lo) break;
    const Chunk& c = chunks_[by_lowest_[j]];
    if (c.highest_end_bytes > lo && (c.disk_mask >> disk & 1) != 0) out.push_back(by_lowest_[j]);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::size_t RpIndex::memory_bytes() const {
  return chunks_.capacity() * sizeof(Chunk) + by_lowest_.capacity() * sizeof(std::uint32_t) +
         max_end_.capacity() * sizeof(std::uint64_t);
}

// --- reader ----------------------------------------------------------------------------

Reader::Reader(std::shared_ptr<Storage> storage, std::string dir)
    : storage_(std::move(storage)), dir_(std::move(dir)) {
  auto d = transport::Decompressor::create();
  FERRY_ASSERT_MSG(d.is_ok(), "zstd cannot create a decompression context (out of memory)");
  dctx_.emplace(std::move(d).value());
}

Reader::~Reader() = default;

Result<StorageFile*> Reader::segment(std::uint64_t seq) {
  auto it = files_.find(seq);
  if (it != files_.end()) return it->second.get();
  FERRY_ASSIGN_OR_RETURN(auto f, storage_->open(seg_path(dir_, seq), OpenFlags{.read_only = true}));
  StorageFile* raw = f.get();
  files_[seq] = std::move(f);
  return raw;
}

Status Reader::load_block(std::uint64_t rp_id, const BlockEntry& e, std::string& decoded) {
  FERRY_ASSERT(e.total_bytes >= kRecordHeaderBytes && e.total_bytes <= kMaxRecordBytes);
  FERRY_ASSIGN_OR_RETURN(StorageFile * f, segment(e.loc.segment_seq));
  raw_.resize(e.total_bytes);
  FERRY_ASSIGN_OR_RETURN(std::size_t got, f->pread(raw_.data(), raw_.size(), e.loc.offset));
  auto bad = [&](const std::string& what) {
    return corrupt_at(dir_, e.loc.segment_seq, e.loc.offset, what);
  };
  if (got != raw_.size()) return bad("record cut short");
  auto h = decode_record_header(raw_.data(), raw_.size());
  if (!h.is_ok()) return bad(h.status().message());
  if (h->type != RecordType::block || h->rp_id != rp_id || h->disk_index != e.disk_index ||
      h->offset_bytes != e.offset_bytes || h->length_bytes != e.length_bytes ||
      h->total_bytes != e.total_bytes ||
      h->position != record_position(e.loc.segment_seq, e.loc.offset))
    return bad("record is not the indexed block of RP " + std::to_string(rp_id));
  std::string_view payload(raw_.data() + kRecordHeaderBytes, raw_.size() - kRecordHeaderBytes);
  if (xxh3_64(payload.data(), payload.size()) != h->payload_checksum)
    return bad("payload checksum mismatch");
  decoded.clear();
  if (h->kind == RecordKind::zero) return Status::ok();
  if (h->codec == RecordCodec::none) {
    decoded.assign(payload);
  } else {
    decoded.resize(h->length_bytes);
    Status d = dctx_->decompress(payload.data(), payload.size(), decoded.data(), decoded.size());
    if (!d.is_ok()) return bad("zstd payload does not decode to the block: " + d.message());
  }
  if (decoded.size() != h->length_bytes || xxh3_128(decoded.data(), decoded.size()) != h->hash)
    return bad("decoded block does not match its xxh3-128");
  return Status::ok();
}

// Reads the headers of the chunk's records: through a window of up to kChunkReadBytes when
// records are small (one read serves many headers), one header per read when they are large
// (reading their payloads would cost more than the extra reads).
Status Reader::load_chunk(std::uint64_t rp_id, const Chunk& c, std::vector<BlockEntry>& out) {
  FERRY_ASSERT(c.record_count >= 1 && c.record_count <= kChunkRecords);
  out.clear();
  const std::uint64_t seq = c.segment_seq();
  FERRY_ASSIGN_OR_RETURN(StorageFile * f, segment(seq));
  const bool by_header = c.span_bytes / c.record_count > kChunkReadBytes / kChunkRecords;
  const std::uint64_t end = c.offset() + c.span_bytes;
  std::uint64_t pos = c.offset();
  std::uint64_t win_start = 0;
  std::size_t win_len = 0;
  auto bad = [&](const std::string& what) {
    return corrupt_at(dir_, seq, pos,
                      what + " (in the chunk of " + std::to_string(c.record_count) +
                          " records of RP " + std::to_string(rp_id) + " at offset " +
                          std::to_string(c.offset()) + ")");
  };
  while (pos < end && out.size() < c.record_count) {
    if (pos < win_start || pos + kRecordHeaderBytes > win_start + win_len) {
      std::uint64_t want = by_header ? kRecordHeaderBytes
                                     : std::min<std::uint64_t>(kChunkReadBytes, end - pos);
      if (want < kRecordHeaderBytes) return bad("record cut short by the chunk's end");
      window_.resize(static_cast<std::size_t>(want));
      FERRY_ASSIGN_OR_RETURN(std::size_t got, f->pread(window_.data(), window_.size(), pos));
      if (got < kRecordHeaderBytes) return bad("record cut short");
      win_start = pos;
      win_len = got;
    }
    auto h = decode_record_header(window_.data() + (pos - win_start), kRecordHeaderBytes);
    if (!h.is_ok()) return bad(h.status().message());
    if (h->total_bytes < kRecordHeaderBytes || h->total_bytes > end - pos)
      return bad("record runs past the chunk's end");
    if (h->position != record_position(seq, pos)) return bad("record is not at its position");
    if (h->type == RecordType::padding) {
      pos += h->total_bytes;
      continue;
    }
    const std::uint64_t rec_end = h->offset_bytes + std::uint64_t(h->length_bytes);
    if (h->type != RecordType::block || h->rp_id != rp_id || h->disk_index >= kMaxDisks ||
        (c.disk_mask >> h->disk_index & 1) == 0 || h->offset_bytes < c.lowest_bytes ||
        rec_end > c.highest_end_bytes)
      return bad("record is not an indexed block of RP " + std::to_string(rp_id));
    out.push_back(BlockEntry{RecordLoc{seq, pos}, h->offset_bytes, h->length_bytes,
                             h->total_bytes, h->disk_index, h->kind, h->codec});
    pos += h->total_bytes;
  }
  if (out.size() != c.record_count || pos != end)
    return bad("the chunk holds " + std::to_string(out.size()) + " block records in " +
               std::to_string(pos - c.offset()) + " bytes, the index says " +
               std::to_string(c.record_count) + " in " + std::to_string(c.span_bytes));
  return Status::ok();
}

}  // namespace ferry::site::journal
