// Helpers for tests that look inside journal segments (site-private layout, ../src/journal.h).
#pragma once

#include <string>
#include <vector>

#include "../src/journal.h"
#include "ferry/base/bytes.h"
#include "store_test_util.h"

namespace ferry::site::test {

namespace jr = ferry::site::journal;

inline std::uint64_t align_block(std::uint64_t v) {
  return (v + jr::kBlockAlignBytes - 1) / jr::kBlockAlignBytes * jr::kBlockAlignBytes;
}

struct SegRecord {
  std::uint64_t offset = 0;
  jr::RecordHeader h;
};

// The records of a segment in file order (a commit copy is followed by zeros to its block end).
inline std::vector<SegRecord> segment_records(const std::string& seg) {
  std::vector<SegRecord> out;
  std::uint64_t pos = jr::kSegmentHeaderBytes;
  while (pos + jr::kRecordHeaderBytes <= seg.size()) {
    auto h = jr::decode_record_header(seg.data() + pos, seg.size() - pos);
    if (!h.is_ok()) break;
    out.push_back({pos, *h});
    pos += h->total_bytes;
    if (h->type == jr::RecordType::rp_commit || h->type == jr::RecordType::rp_commit_mirror)
      pos = align_block(pos);
  }
  return out;
}

inline std::vector<SegRecord> records_of(const std::string& path, jr::RecordType type) {
  std::vector<SegRecord> out;
  for (const auto& r : segment_records(slurp(path)))
    if (r.h.type == type) out.push_back(r);
  return out;
}


// Makes segment `seg` a version 1 segment (one commit copy, a padding record after it): the
// next append then starts a new segment, with the next RP's begin record first.
inline void make_segment_v1(const std::string& path) {
  std::string seg = slurp(path);
  std::uint64_t group_id = load_le64(seg.data() + 16);
  jr::encode_segment_header(jr::SegmentHeader{group_id, 1, 1}, seg.data());
  for (const auto& m : records_of(path, jr::RecordType::rp_commit_mirror)) {
    std::uint64_t bytes = align_block(m.h.total_bytes);
    std::string zeros(bytes - jr::kRecordHeaderBytes, '\0');
    jr::RecordHeader pad;
    pad.type = jr::RecordType::padding;
    pad.total_bytes = static_cast<std::uint32_t>(bytes);
    pad.payload_checksum = xxh3_64(zeros.data(), zeros.size());
    pad.position = jr::record_position(1, m.offset);
    seg.replace(m.offset, bytes, std::string(jr::kRecordHeaderBytes, '\0') + zeros);
    jr::encode_record_header(pad, seg.data() + m.offset);
  }
  spit(path, seg);
}

}  // namespace ferry::site::test
