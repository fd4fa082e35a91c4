// synth-store: writes a valid store for one group holding one committed full RP of a large
// disk, fast, so the receiver's memory and start-up can be measured on a disk size no test
// machine could replicate for real (bench/index-memory, docs/benchmarks.md).
//
//   synth-store ROOT GROUP DISK_GIB [--block-kib 64]
//
// The journal is written through the store API (GroupStore: begin_rp, append_block,
// commit_rp), so it is exactly what a receiver writes. Each block is a data record with a
// zstd payload built by hand: a frame holding one RLE block of zeros (11 bytes) and a
// skippable frame holding the block's index (16 bytes), so every payload and its checksum
// differ while the journal stays small (123 bytes a record). The decoded blocks are zeros:
// a restore reads, decodes and checks every record but writes nothing, and no replica data
// has to be written. The RP stays in the journal (layout 2, base 0: no image is read until
// retention compacts it), as a receiver leaves it before its first pruning.
//
// Prints one JSON object: records, journal bytes, seconds, peak RSS of this process.
#include <fcntl.h>
#include <unistd.h>
#include <zstd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "ferry/base/bytes.h"
#include "ferry/base/hash.h"
#include "ferry/site/store.h"

using namespace ferry;
using namespace ferry::site;

namespace {

[[noreturn]] void die(const std::string& what, const Status& s) {
  std::fprintf(stderr, "synth-store: %s: %s\n", what.c_str(), s.to_string().c_str());
  std::exit(1);
}

void put_le(std::string& s, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) s.push_back(static_cast<char>(v >> (8 * i)));
}

// A zstd frame of `length` zero bytes (one RLE block, content size in the header), then a
// skippable frame carrying `index`.
std::string zero_frame(std::uint32_t length, std::uint64_t index) {
  std::string s;
  put_le(s, 0xFD2FB528u, 4);  // frame magic
  s.push_back(static_cast<char>(0xA0));  // single segment, 4-byte frame content size
  put_le(s, length, 4);
  put_le(s, (std::uint64_t(length) << 3) | (1u << 1) | 1u, 3);  // last block, RLE, size
  s.push_back('\0');
  put_le(s, 0x184D2A50u, 4);  // skippable frame magic
  put_le(s, 8, 4);
  put_le(s, index, 8);
  return s;
}

std::uint64_t peak_rss_kib() {
  FILE* f = std::fopen("/proc/self/status", "r");
  char line[256];
  std::uint64_t v = 0;
  while (f && std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "VmHWM:", 6) == 0) v = std::strtoull(line + 6, nullptr, 10);
  if (f) std::fclose(f);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: synth-store ROOT GROUP DISK_GIB [--block-kib 64]\n");
    return 2;
  }
  const std::string root = argv[1], group = argv[2];
  const std::uint64_t disk_bytes = std::strtoull(argv[3], nullptr, 10) << 30;
  std::uint32_t block = 64u << 10;
  if (argc >= 6 && std::string(argv[4]) == "--block-kib")
    block = static_cast<std::uint32_t>(std::strtoul(argv[5], nullptr, 10)) << 10;
  const auto t0 = std::chrono::steady_clock::now();

  StoreOptions o;
  o.root = root;
  auto store = GroupStore::open(o, group, /*create=*/true);
  if (!store.is_ok()) die("open", store.status());
  RpBeginInfo rp{1, 0, 1, 0, {RpBeginInfo::Disk{"vda", disk_bytes, true}}};
  if (Status s = (*store)->begin_rp(rp); !s.is_ok()) die("begin", s);
  const std::string zeros(block, '\0');
  const Hash128 zero_hash = xxh3_128(zeros.data(), zeros.size());
  {  // the hand-built frame decodes to the block it claims
    std::string p = zero_frame(block, 7), out(block, 'x');
    std::size_t n = ZSTD_decompress(out.data(), out.size(), p.data(), p.size());
    if (ZSTD_isError(n) || n != block || out != zeros) die("frame", Status::error(Errc::internal, "bad frame"));
  }
  std::uint64_t seq = 0, logical = 0;
  for (std::uint64_t at = 0; at < disk_bytes; at += block, ++seq) {
    std::uint32_t len = static_cast<std::uint32_t>(std::min<std::uint64_t>(block, disk_bytes - at));
    std::string payload = zero_frame(len, seq);
    BlockRecord b;
    b.rp_id = 1;
    b.seq = seq;
    b.codec = RecordCodec::zstd;
    b.offset_bytes = at;
    b.length_bytes = len;
    b.hash = len == block ? zero_hash : xxh3_128(zeros.data(), len);
    b.payload = payload;
    if (Status s = (*store)->append_block(b); !s.is_ok()) die("append", s);
    logical += len;
  }
  auto info = (*store)->commit_rp(1, seq, logical);
  if (!info.is_ok()) die("commit", info.status());
  store->reset();  // releases the group lock

  // Layout 2: the store's own state file says base 0 (no image read); RP 1, the full copy,
  // stays in the journal until retention compacts it.
  const std::string group_dir = root + "/" + group;

  std::uint64_t journal_bytes = 0;
  for (const auto& e : std::filesystem::directory_iterator(group_dir + "/journal"))
    journal_bytes += e.file_size();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("{\"disk_bytes\": %llu, \"block_bytes\": %u, \"records\": %llu, "
              "\"journal_bytes\": %llu, \"seconds\": %.1f, \"peak_rss_kib\": %llu}\n",
              (unsigned long long)disk_bytes, block, (unsigned long long)seq,
              (unsigned long long)journal_bytes, secs, (unsigned long long)peak_rss_kib());
  return 0;
}
