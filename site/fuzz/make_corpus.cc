// Writes the seed corpora of the journal fuzz targets from a short real store: three RPs
// (a full one with data, zstd and zero blocks, an incremental one, an RP left open) written
// through GroupStore into a temp dir, then cut into inputs:
//   DIR/journal_record/   the segment header, every record (header + payload), each payload
//   DIR/journal_recovery/ the whole segment, torn copies, a two-segment journal, with state
// Usage: engine_fuzz_make_corpus DIR   (the committed corpus lives in engine/fuzz/corpus/)
#include <unistd.h>
#include <zstd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../src/catalog.h"
#include "../src/chain.h"
#include "../src/journal.h"
#include "ferry/base/hash.h"
#include "ferry/site/store.h"

namespace fs = std::filesystem;
namespace jr = ferry::site::journal;
using namespace ferry::site;

namespace {

constexpr const char* kGroup = "fz";  // = fuzz_journal_recovery.cc
constexpr std::string_view kSplit = "FERRY-NEXT-SEGMENT";

void put(const fs::path& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f.good()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

std::string get(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void die(const ferry::Status& st, const char* what) {
  if (st.is_ok()) return;
  std::fprintf(stderr, "%s: %s\n", what, st.message().c_str());
  std::exit(1);
}

std::string pattern(std::size_t n, unsigned seed) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 131 + seed * 7) ^ (i >> 5));
  return s;
}

void block(GroupStore& g, std::uint64_t rp, std::uint64_t seq, std::uint16_t disk,
           std::uint64_t off, const std::string& data, RecordKind kind, RecordCodec codec,
           std::uint64_t& logical) {
  std::string payload;
  if (kind == RecordKind::data && codec == RecordCodec::zstd) {
    payload.resize(ZSTD_compressBound(data.size()));
    std::size_t n = ZSTD_compress(payload.data(), payload.size(), data.data(), data.size(), 1);
    if (ZSTD_isError(n)) std::exit(1);
    payload.resize(n);
  } else if (kind == RecordKind::data) {
    payload = data;
  }
  BlockRecord b;
  b.rp_id = rp;
  b.seq = seq;
  b.disk_index = disk;
  b.kind = kind;
  b.codec = codec;
  b.offset_bytes = off;
  b.length_bytes = static_cast<std::uint32_t>(data.size());
  b.hash = ferry::xxh3_128(data.data(), data.size());
  b.payload = payload;
  die(g.append_block(b), "append_block");
  logical += data.size();
}

// A zero range longer than a data block (feature zero_ranges): one record, no payload.
void zero_range(GroupStore& g, std::uint64_t rp, std::uint64_t seq, std::uint16_t disk,
                std::uint64_t off, std::uint32_t length, std::uint64_t& logical) {
  BlockRecord b;
  b.rp_id = rp;
  b.seq = seq;
  b.disk_index = disk;
  b.kind = RecordKind::zero;
  b.codec = RecordCodec::none;
  b.offset_bytes = off;
  b.length_bytes = length;
  die(g.append_block(b), "append_block (zero range)");
  logical += length;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  fs::path out = argv[1];
  std::string tmpl = (fs::temp_directory_path() / "ferry-corpus-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) return 1;
  StoreOptions opt;
  opt.root = tmpl;
  opt.segment_bytes = jr::kMinSegmentBytes;
  opt.max_inflight_write_bytes = 1u << 20;
  std::string state_after_two;
  {
    auto g = GroupStore::open(opt, kGroup, true);
    die(g.status(), "open");
    GroupStore& s = **g;
    std::uint64_t logical = 0;
    RpBeginInfo b1{1, 0, 1700000000000000000ull, 0, {{"vda", 256 << 10, true}, {"vdb", 64 << 10, true}}};
    die(s.begin_rp(b1), "begin 1");
    block(s, 1, 0, 0, 0, pattern(8192, 1), RecordKind::data, RecordCodec::none, logical);
    block(s, 1, 1, 0, 65536, pattern(16384, 2), RecordKind::data, RecordCodec::zstd, logical);
    block(s, 1, 2, 0, 131072, std::string(65536, '\0'), RecordKind::zero, RecordCodec::none, logical);
    block(s, 1, 3, 1, 4096, pattern(4096, 3), RecordKind::data, RecordCodec::none, logical);
    die(s.commit_rp(1, 4, logical).status(), "commit 1");
    die(s.apply_committed(), "apply 1");
    logical = 0;
    RpBeginInfo b2{2, 1, 1700000000000000001ull, 1,
                   {{"vda", 256 << 10, false}, {"vdb", 64 << 10, false}, {"vdc", 8ull << 30, true}}};
    // RP 1 carries no identities (unknown, as from an older source); RP 2 and 3 carry
    // some in the rp_begin tail (a resync disk, an ephemeral identity).
    b2.source_name = "host-a:/run/qsd.qmp";
    b2.disks[0].identity = {0x1111, 0x2222};
    b2.disks[1].identity = {0x3333, 0x4444};
    b2.disks[1].identity_ephemeral = true;
    b2.disks[1].resync = true;
    b2.vm_config = "<domain type='qemu'><name>vm</name><devices/></domain>";  // tail version 2
    die(s.begin_rp(b2), "begin 2");
    block(s, 2, 0, 0, 4096, pattern(4096, 4), RecordKind::data, RecordCodec::zstd, logical);
    block(s, 2, 1, 1, 0, std::string(4096, '\0'), RecordKind::zero, RecordCodec::none, logical);
    zero_range(s, 2, 2, 2, 0, kMaxStoredZeroBytes, logical);  // a new empty thin disk
    die(s.commit_rp(2, 3, logical).status(), "commit 2");
    die(s.apply_committed(), "apply 2");
    state_after_two = get(fs::path(tmpl) / kGroup / "state");
    logical = 0;
    RpBeginInfo b3{3, 2, 1700000000000000002ull, 0,
                   {{"vda", 256 << 10, false}, {"vdb", 64 << 10, false}, {"vdc", 8ull << 30, false}}};
    b3.source_name = b2.source_name;
    b3.disks[0].identity = b2.disks[0].identity;
    b3.disks[1].identity = b2.disks[1].identity;
    die(s.begin_rp(b3), "begin 3");
    block(s, 3, 0, 0, 8192, pattern(4096, 5), RecordKind::data, RecordCodec::none, logical);
    // RP 3 is never committed: its records are the torn tail recovery must cut (R3).
  }
  std::string seg = get(fs::path(tmpl) / kGroup / "journal" / jr::segment_name(1));
  fs::remove_all(tmpl);
  if (seg.size() < jr::kSegmentHeaderBytes) return 1;

  fs::path rec = out / "journal_record", recov = out / "journal_recovery";
  fs::create_directories(rec);
  fs::create_directories(recov);
  put(rec / "segment-header", seg.substr(0, jr::kSegmentHeaderBytes));
  put(rec / "state-v2", state_after_two);  // the catalog (state file version 2)
  {
    // The same catalog after a journal rewrite (generation 3, nothing pruned).
    auto c = ferry::site::decode_catalog(state_after_two, ferry::site::group_id_of(kGroup));
    die(c.status(), "decode the state file");
    c->journal_gen = 3;
    c->pruned.clear();
    put(rec / "state-v2-gen3", ferry::site::encode_catalog(ferry::site::group_id_of(kGroup), *c));
  }
  std::size_t pos = jr::kSegmentHeaderBytes, n = 0;
  std::vector<std::size_t> commit_ends;
  while (pos + jr::kRecordHeaderBytes <= seg.size()) {
    auto h = jr::decode_record_header(seg.data() + pos, seg.size() - pos);
    if (!h.is_ok() || pos + h->total_bytes > seg.size()) break;
    if (h->type != jr::RecordType::padding || n < 12) {
      std::string name = "record-" + std::to_string(n) + "-type" +
                         std::to_string(static_cast<int>(h->type));
      put(rec / name, seg.substr(pos, std::min<std::size_t>(h->total_bytes, 8192)));
      if (h->type == jr::RecordType::rp_begin || h->type == jr::RecordType::rp_commit ||
          h->type == jr::RecordType::rp_commit_mirror)
        put(rec / (name + "-payload"), seg.substr(pos + jr::kRecordHeaderBytes,
                                                  h->total_bytes - jr::kRecordHeaderBytes));
    }
    ++n;
    pos += h->total_bytes;
    // Version 2: a commit record and its mirror, each zero-filled to its block end.
    if (h->type == jr::RecordType::rp_commit || h->type == jr::RecordType::rp_commit_mirror)
      pos = (pos + jr::kBlockAlignBytes - 1) / jr::kBlockAlignBytes * jr::kBlockAlignBytes;
    if (h->type == jr::RecordType::rp_commit_mirror) commit_ends.push_back(pos);
  }
  put(recov / "segment-3rps", seg);
  put(recov / "segment-torn-mid", seg.substr(0, seg.size() - 1000));
  if (!commit_ends.empty()) put(recov / "segment-1rp", seg.substr(0, commit_ends[0]));
  std::string seg2(jr::kSegmentHeaderBytes, '\0');
  jr::encode_segment_header({ferry::xxh3_64(kGroup, 2), 2}, seg2.data());
  if (!commit_ends.empty())
    put(recov / "two-segments", seg.substr(0, commit_ends.back()) + std::string(kSplit) + seg2);
  put(recov / "segment-with-state", seg + std::string(kSplit) + "STATE" + state_after_two);
  std::string flipped = seg;
  flipped[jr::kSegmentHeaderBytes + 200] ^= 0x10;  // inside RP 1: R2 (a commit follows)
  put(recov / "segment-flipped", flipped);
  std::printf("%zu records; corpus written to %s\n", n, out.c_str());
  return 0;
}
