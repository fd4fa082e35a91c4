// libFuzzer target for the journal's byte layouts (site/src/journal.h): arbitrary bytes go
// to the record header, segment header, rp_begin and rp_commit payload decoders and the
// segment name parser. Beyond "no crash, no read past the input", whatever decodes must mean
// the same thing after a re-encode: decode(encode(decode(x))) == decode(x), so no field is
// dropped or misread. (The decoders accept some non-canonical bytes, e.g. non-zero reserved
// header bytes under a valid checksum and a `full` byte of 2; docs/fuzzing.md notes them.)
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "../src/catalog.h"
#include "../src/journal.h"
#include "ferry/base/bytes.h"

namespace jr = ferry::site::journal;
using ferry::Result;

namespace {

bool same_header(const jr::RecordHeader& a, const jr::RecordHeader& b) {
  return a.type == b.type && a.kind == b.kind && a.codec == b.codec &&
         a.total_bytes == b.total_bytes && a.disk_index == b.disk_index && a.lsn == b.lsn &&
         a.rp_id == b.rp_id && a.seq == b.seq && a.offset_bytes == b.offset_bytes &&
         a.length_bytes == b.length_bytes && a.hash.lo == b.hash.lo && a.hash.hi == b.hash.hi &&
         a.payload_checksum == b.payload_checksum && a.position == b.position;
}

void check_record_header(std::string_view in) {
  Result<jr::RecordHeader> h = jr::decode_record_header(in.data(), in.size());
  if (!h.is_ok()) return;
  FERRY_ASSERT_MSG(in.size() >= jr::kRecordHeaderBytes, "decoded a header from short input");
  FERRY_ASSERT(h->total_bytes >= jr::kRecordHeaderBytes && h->total_bytes <= jr::kMaxRecordBytes);
  // Only a zero block record may cover more than a data block (a zero range), and then
  // carries no payload.
  const bool zero_block = h->type == jr::RecordType::block && h->kind == ferry::site::RecordKind::zero;
  FERRY_ASSERT(h->length_bytes <= (zero_block ? jr::kMaxZeroRecordBytes : jr::kMaxBlockBytes));
  FERRY_ASSERT(h->length_bytes <= jr::kMaxBlockBytes || h->total_bytes == jr::kRecordHeaderBytes);
  char out[jr::kRecordHeaderBytes];
  jr::encode_record_header(*h, out);
  Result<jr::RecordHeader> again = jr::decode_record_header(out, sizeof out);
  FERRY_ASSERT_MSG(again.is_ok(), "re-encoded record header does not decode");
  FERRY_ASSERT_MSG(same_header(*h, *again), "record header decode/encode differ");
  // Any single bit flipped in the checksummed bytes must be caught.
  std::size_t bit = (in.size() * 7919) % ((jr::kRecordHeaderBytes - 8) * 8);
  out[bit / 8] = static_cast<char>(out[bit / 8] ^ (1 << (bit % 8)));
  FERRY_ASSERT_MSG(!jr::decode_record_header(out, sizeof out).is_ok(),
                   "a flipped header bit went undetected");
}

void check_segment_header(std::string_view in) {
  Result<jr::SegmentHeader> h = jr::decode_segment_header(in.data(), in.size());
  if (!h.is_ok()) return;
  FERRY_ASSERT(in.size() >= jr::kSegmentHeaderBytes);
  std::string out(jr::kSegmentHeaderBytes, '\0');
  jr::encode_segment_header(*h, out.data());
  Result<jr::SegmentHeader> again = jr::decode_segment_header(out.data(), out.size());
  FERRY_ASSERT_MSG(again.is_ok() && again->group_id == h->group_id &&
                       again->segment_seq == h->segment_seq,
                   "segment header decode/encode differ");
}

bool same_begin(const ferry::site::RpBeginInfo& a, const ferry::site::RpBeginInfo& b) {
  if (a.rp_id != b.rp_id || a.base_rp != b.base_rp || a.created_unix_ns != b.created_unix_ns ||
      a.flags != b.flags || a.disks.size() != b.disks.size() || a.vm_config != b.vm_config)
    return false;
  for (std::size_t i = 0; i < a.disks.size(); ++i)
    if (a.disks[i].name != b.disks[i].name || a.disks[i].size_bytes != b.disks[i].size_bytes ||
        a.disks[i].full != b.disks[i].full)
      return false;
  return true;
}

bool same_commit(const ferry::site::RpInfo& a, const ferry::site::RpInfo& b) {
  if (a.rp_id != b.rp_id || a.base_rp != b.base_rp || a.created_unix_ns != b.created_unix_ns ||
      a.committed_unix_ns != b.committed_unix_ns || a.flags != b.flags ||
      a.disks.size() != b.disks.size())
    return false;
  for (std::size_t i = 0; i < a.disks.size(); ++i) {
    const auto &x = a.disks[i], &y = b.disks[i];
    if (x.name != y.name || x.size_bytes != y.size_bytes || x.full != y.full ||
        x.changed_bytes != y.changed_bytes || x.zero_bytes != y.zero_bytes ||
        x.stored_bytes != y.stored_bytes)
      return false;
  }
  return true;
}

void check_payloads(std::string_view in) {
  auto begin = jr::decode_begin(in);
  if (begin.is_ok()) {
    FERRY_ASSERT(begin->disks.size() <= jr::kMaxDisks);
    for (const auto& d : begin->disks) FERRY_ASSERT(d.name.size() <= jr::kMaxNameBytes);
    auto again = jr::decode_begin(jr::encode_begin(*begin));
    FERRY_ASSERT_MSG(again.is_ok() && same_begin(*begin, *again), "rp_begin decode/encode differ");
  }
  auto commit = jr::decode_commit(in);
  if (commit.is_ok()) {
    FERRY_ASSERT(commit->disks.size() <= jr::kMaxDisks);
    auto again = jr::decode_commit(jr::encode_commit(*commit));
    FERRY_ASSERT_MSG(again.is_ok() && same_commit(*commit, *again),
                     "rp_commit decode/encode differ");
  }
}

}  // namespace

// The state file (catalog.h, version 2): whatever decodes re-encodes to the same bytes
// (the layout has no slack), and any flipped bit is caught by the checksum or a check.
void check_catalog(std::string_view in) {
  if (in.size() < 16) return;
  const std::uint64_t group_id = ferry::load_le64(in.data() + 8);
  Result<ferry::site::Catalog> c = ferry::site::decode_catalog(in, group_id);
  if (!c.is_ok()) return;
  FERRY_ASSERT(c->target_rp == 0 || c->target_rp > c->base_rp);
  for (std::size_t i = 0; i < c->pruned.size(); ++i)
    FERRY_ASSERT(c->pruned[i] > c->base_rp && (i == 0 || c->pruned[i] > c->pruned[i - 1]));
  std::string out = ferry::site::encode_catalog(group_id, *c);
  FERRY_ASSERT_MSG(out == in, "state file decode/encode differ");
  std::size_t bit = (in.size() * 7919) % (out.size() * 8);
  out[bit / 8] = static_cast<char>(out[bit / 8] ^ (1 << (bit % 8)));
  FERRY_ASSERT_MSG(!ferry::site::decode_catalog(out, group_id).is_ok(),
                   "a flipped state file bit went undetected");
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // Exact-size copies: ASan then catches any read past the input.
  std::string whole(reinterpret_cast<const char*>(data), size);
  check_record_header(whole);
  check_segment_header(whole);
  check_catalog(whole);
  check_payloads(whole);
  if (size > jr::kRecordHeaderBytes) check_payloads(std::string_view(whole).substr(jr::kRecordHeaderBytes));
  if (auto seq = jr::parse_segment_name(whole))
    FERRY_ASSERT_MSG(jr::segment_name(*seq) == whole, "segment name round trip differs");
  return 0;
}
