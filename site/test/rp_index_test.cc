// The compact per-RP index (journal::RpIndex): chunk boundaries, range lookups against a
// brute-force oracle (records in any order, several disks), and on a real journal: a record
// spanning a chunk bound, lookups across chunks and RPs through restore and resync digests,
// and the recovery scan building the same chunks as commit did.
#include <catch2/catch.hpp>

#include <algorithm>
#include <random>
#include <set>

#include "../src/journal.h"
#include "ferry/site/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;
namespace jr = ferry::site::journal;

namespace {

jr::BlockEntry entry(std::uint64_t seg, std::uint64_t at, std::uint16_t disk, std::uint64_t offset,
                     std::uint32_t length) {
  return jr::BlockEntry{{seg, at}, offset, length, 200, disk, RecordKind::data, RecordCodec::zstd};
}

std::vector<std::uint32_t> brute_force(const std::vector<jr::BlockEntry>& all,
                                       const jr::RpIndex& index, std::uint16_t disk,
                                       std::uint64_t lo, std::uint64_t hi) {
  // The chunks holding a record of `disk` that touches [lo, hi): every one must be found.
  std::set<std::uint32_t> out;
  std::size_t chunk = 0, in_chunk = 0;
  for (const auto& e : all) {
    if (in_chunk == index.chunks()[chunk].record_count) {
      ++chunk;
      in_chunk = 0;
    }
    ++in_chunk;
    if (e.disk_index == disk && e.offset_bytes < hi && e.offset_bytes + e.length_bytes > lo)
      out.insert(static_cast<std::uint32_t>(chunk));
  }
  return {out.begin(), out.end()};
}

StoreOptions options_for(const TempDir& dir) {
  StoreOptions o;
  o.root = dir.path() + "/store";
  return o;
}

}  // namespace

TEST_CASE("index: chunks of at most 256 records, a new one at a segment change", "[store][index]") {
  jr::RpIndex index;
  std::uint64_t at = 4096;
  for (std::uint64_t i = 0; i < 600; ++i, at += 200) index.add(entry(1, at, 0, i * 65536, 65536));
  for (std::uint64_t i = 600; i < 610; ++i, at += 200) index.add(entry(2, at, 1, i * 65536, 65536));
  index.seal();
  REQUIRE(index.record_count() == 610);
  REQUIRE(index.chunks().size() == 4);
  const auto& c = index.chunks();
  CHECK(c[0].record_count == 256);
  CHECK(c[1].record_count == 256);
  CHECK(c[2].record_count == 88);
  CHECK(c[3].record_count == 10);
  CHECK(c[0].offset() == 4096);
  CHECK(c[0].span_bytes == 256 * 200);
  CHECK(c[1].lowest_bytes == 256 * 65536ull);
  CHECK(c[1].highest_end_bytes == 512 * 65536ull);
  CHECK(c[2].segment_seq() == 1);
  CHECK(c[3].segment_seq() == 2);
  CHECK(c[3].disk_mask == 2);
  // A range across the bound of chunks 0 and 1, one inside chunk 1, one past every record.
  CHECK(index.overlapping(0, 255 * 65536ull, 256 * 65536ull + 1) == std::vector<std::uint32_t>{0, 1});
  CHECK(index.overlapping(0, 300 * 65536ull, 301 * 65536ull) == std::vector<std::uint32_t>{1});
  CHECK(index.overlapping(0, 700 * 65536ull, 800 * 65536ull).empty());
  CHECK(index.overlapping(1, 0, 1ull << 40) == std::vector<std::uint32_t>{3});
  // Memory: per chunk, not per record.
  CHECK(index.memory_bytes() <= 4 * 64);
}

TEST_CASE("index: lookups find every chunk a brute force finds, records in any order",
          "[store][index]") {
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    std::mt19937_64 rng(seed);
    std::vector<jr::BlockEntry> all;
    jr::RpIndex index;
    std::uint64_t at = 4096, seg = 1;
    const std::size_t n = 1 + rng() % 2000;
    for (std::size_t i = 0; i < n; ++i) {
      if (rng() % 500 == 0) seg += 1, at = 4096;
      // Mostly ascending, sometimes anywhere; a few records far longer than 4 MiB (u64 ends).
      std::uint64_t offset = rng() % 4 == 0 ? rng() % (1ull << 32) : i * 65536;
      std::uint32_t length = rng() % 50 == 0 ? (64u << 20) : 1 + static_cast<std::uint32_t>(rng() % 65536);
      all.push_back(entry(seg, at, static_cast<std::uint16_t>(rng() % 3), offset, length));
      index.add(all.back());
      at += 200 + (rng() % 3 == 0 ? 4096 : 0);  // padding records between some
    }
    index.seal();
    INFO("seed " << seed);
    for (int q = 0; q < 200; ++q) {
      std::uint64_t lo = rng() % (1ull << 32), hi = lo + 1 + rng() % (1ull << 26);
      auto disk = static_cast<std::uint16_t>(rng() % 3);
      auto found = index.overlapping(disk, lo, hi);
      REQUIRE(std::is_sorted(found.begin(), found.end()));
      auto want = brute_force(all, index, disk, lo, hi);
      // Bounds may name a chunk without a matching record (a superset), never miss one.
      for (auto id : want) REQUIRE(std::binary_search(found.begin(), found.end(), id));
    }
  }
}

TEST_CASE("index: restore, digests and recovery over many chunks and RPs", "[store][index]") {
  TempDir dir;
  constexpr std::uint32_t kB = 4096;
  std::vector<TestRp> rps(3);
  const std::uint64_t size = 700 * std::uint64_t(kB) + 123;
  rps[0].begin = {1, 0, 1, 0, {disk("vda", size, true), disk("vdb", 64 * kB, true)}};
  for (std::uint64_t i = 0; i < 700; ++i) {
    rps[0].blocks.push_back({0, i * kB, kB, RecordKind::data,
                             i % 2 ? RecordCodec::zstd : RecordCodec::none, 1000 + i});
    if (i % 11 == 0)  // the disks interleave: chunks hold both
      rps[0].blocks.push_back({1, (i / 11) * kB, kB, RecordKind::data, RecordCodec::zstd, 5000 + i});
  }
  rps[0].blocks.push_back({0, 700 * std::uint64_t(kB), 123, RecordKind::data, RecordCodec::none, 9});
  // Incrementals: records out of offset order, one across the bound between the ranges of
  // chunks 0 and 1 of RP 1 (chunk 0 ends with the record at 233 * kB), zeros, one near the end.
  rps[1].begin = {2, 1, 2, 0, {disk("vda", size, false), disk("vdb", 64 * kB, false)}};
  rps[1].blocks = {{0, 500 * kB + 100, 3 * kB, RecordKind::data, RecordCodec::zstd, 21},
                   {0, 233 * kB + 7, 2 * kB, RecordKind::data, RecordCodec::none, 22},
                   {0, 460 * kB, 8 * kB, RecordKind::zero, RecordCodec::none, 0},
                   {1, 3 * kB, kB, RecordKind::zero, RecordCodec::none, 0},
                   {0, 699 * kB + 5, kB, RecordKind::data, RecordCodec::zstd, 23}};
  rps[2].begin = {3, 2, 3, 0, {disk("vda", size, false), disk("vdb", 64 * kB, false)}};
  for (std::uint64_t i = 0; i < 300; ++i)
    rps[2].blocks.push_back({0, (699 - 2 * i) * kB, kB, RecordKind::data, RecordCodec::zstd, 3000 + i});
  Model model = model_of(rps);
  {
    auto store = GroupStore::open(options_for(dir), "g", true).value();
    for (const auto& rp : rps) {
      REQUIRE(feed_rp(*store, rp).is_ok());
      // Restore and digests through the index commit built (nothing applied in between).
      REQUIRE(check_rp(*store, model, rp.begin.rp_id, dir.path() + "/store", dir.path(), false) == "");
    }
    auto d = store->replica_digests("vda", 250 * kB, kB, 300);
    REQUIRE(d.is_ok());
    const std::string& img = model.at(3).at("vda");
    for (std::uint32_t i = 0; i < 300; ++i)
      REQUIRE((*d)[i] == xxh3_128(img.data() + (250 + i) * kB, kB));
    REQUIRE(check_store(*store, model, dir.path() + "/store", dir.path(), {1, 2, 3}) == "");
    // Compaction reads the records through the same index: images at RP 3.
    REQUIRE(store->prune(keep_newest_only(), 0, false).is_ok());
    REQUIRE(check_rp(*store, model, 3, dir.path() + "/store", dir.path(), true) == "");
  }
  // Recovery: the scan's chunks are the ones commit builds from the same records.
  auto scan = jr::scan(*real_storage(), dir.path() + "/store/g/journal", xxh3_64("g", 1),
                       jr::ScanMode::read_only);
  REQUIRE(scan.is_ok());
  REQUIRE(scan->committed.size() == 3);
  jr::Reader reader(real_storage(), dir.path() + "/store/g/journal");
  for (std::size_t r = 0; r < 3; ++r) {
    const auto& index = scan->committed[r].index;
    REQUIRE(index.record_count() == rps[r].blocks.size());
    jr::RpIndex again;
    std::size_t k = 0;
    std::vector<jr::BlockEntry> entries;
    for (const auto& c : index.chunks()) {
      REQUIRE(reader.load_chunk(r + 1, c, entries).is_ok());
      for (const auto& e : entries) {
        const auto& b = rps[r].blocks[k++];
        REQUIRE((e.disk_index == b.disk && e.offset_bytes == b.offset && e.length_bytes == b.length &&
                 e.kind == b.kind));
        again.add(e);
      }
    }
    again.seal();
    REQUIRE(again.chunks().size() == index.chunks().size());
    for (std::size_t i = 0; i < index.chunks().size(); ++i) {
      const auto &a = again.chunks()[i], &b = index.chunks()[i];
      REQUIRE((a.position == b.position && a.span_bytes == b.span_bytes &&
               a.record_count == b.record_count && a.disk_mask == b.disk_mask &&
               a.lowest_bytes == b.lowest_bytes && a.highest_end_bytes == b.highest_end_bytes));
    }
  }
  const auto& rp1 = scan->committed[0].index;
  CHECK(rp1.chunks().size() == (700 + 64 + 1 + 255) / 256);
  CHECK(rp1.chunks()[0].highest_end_bytes == 234 * kB);  // the record above crosses it
  // Chunk 2 holds records of vdb at low offsets too: its bounds (shared by the disks) make it
  // a candidate, and reading it back finds nothing of vda there.
  CHECK(rp1.overlapping(0, 233 * kB + 7, 235 * kB + 7) == std::vector<std::uint32_t>{0, 1, 2});
  CHECK(rp1.overlapping(0, 1, 2) == std::vector<std::uint32_t>{0});
  // And the store opened again (recovery's index) restores every RP byte for byte.
  auto store = GroupStore::open(options_for(dir), "g", false).value();
  REQUIRE(check_store(*store, model, dir.path() + "/store", dir.path(), {3}) == "");
}

TEST_CASE("index: a chunk whose records changed on disk is refused, not applied", "[store][index]") {
  TempDir dir;
  std::vector<TestRp> rps(1);
  rps[0].begin = {1, 0, 1, 0, {disk("vda", 1 << 20, true)}};
  for (std::uint64_t i = 0; i < 10; ++i)
    rps[0].blocks.push_back({0, i * 4096, 4096, RecordKind::data, RecordCodec::none, 70 + i});
  auto store = GroupStore::open(options_for(dir), "g", true).value();
  REQUIRE(feed_rp(*store, rps[0]).is_ok());
  auto scan = jr::scan(*real_storage(), dir.path() + "/store/g/journal", xxh3_64("g", 1),
                       jr::ScanMode::read_only);
  REQUIRE(scan.is_ok());
  jr::Chunk c = scan->committed[0].index.chunks()[0];
  jr::Reader reader(real_storage(), dir.path() + "/store/g/journal");
  std::vector<jr::BlockEntry> entries;
  CHECK(reader.load_chunk(2, c, entries).code() == Errc::corrupt);  // another RP's chunk
  jr::Chunk shorter = c;
  shorter.record_count -= 1;
  CHECK(reader.load_chunk(1, shorter, entries).code() == Errc::corrupt);
  jr::Chunk narrower = c;
  narrower.highest_end_bytes -= 1;
  CHECK(reader.load_chunk(1, narrower, entries).code() == Errc::corrupt);
  REQUIRE(reader.load_chunk(1, c, entries).is_ok());
  CHECK(entries.size() == 10);
}

// Restore and compaction write an image 256 MiB at a time: records across a window bound, an
// overwrite of one by a zero record, and the end of a disk that is not a multiple of it.
TEST_CASE("index: restore and compaction across image windows", "[store][index]") {
  TempDir dir;
  constexpr std::uint64_t kW = 256ull << 20;
  const std::uint64_t size = 2 * kW + 12345;
  std::vector<TestRp> rps(2);
  rps[0].begin = {1, 0, 1, 0, {disk("vda", size, true)}};
  rps[0].blocks = {{0, kW - 6000, 65536, RecordKind::data, RecordCodec::zstd, 1},  // spans bound 1
                   {0, 4096, 4096, RecordKind::data, RecordCodec::none, 2},
                   {0, 2 * kW - 100, 12345 + 100, RecordKind::data, RecordCodec::none, 3},  // to the end
                   {0, kW + 65536, 65536, RecordKind::data, RecordCodec::zstd, 4}};
  rps[1].begin = {2, 1, 2, 0, {disk("vda", size, false)}};
  rps[1].blocks = {{0, kW - 1000, 2000, RecordKind::zero, RecordCodec::none, 0},
                   {0, kW + 65536 + 100, 50, RecordKind::data, RecordCodec::none, 5}};
  // The expected bytes in the ranges around the records (everything else is zeros).
  auto expect = [&](std::size_t upto, std::uint64_t at, std::uint64_t len) {
    std::string out(len, '\0');
    for (std::size_t r = 0; r <= upto; ++r)
      for (const auto& b : rps[r].blocks) {
        std::string bytes = b.kind == RecordKind::data ? block_bytes(b.seed, b.length)
                                                       : std::string(b.length, '\0');
        for (std::uint64_t i = 0; i < b.length; ++i)
          if (b.offset + i >= at && b.offset + i < at + len) out[b.offset + i - at] = bytes[i];
      }
    return out;
  };
  auto read_at = [](const std::string& path, std::uint64_t at, std::uint64_t len) {
    std::ifstream in(path, std::ios::binary);
    in.seekg(static_cast<std::streamoff>(at));
    std::string out(len, '\0');
    in.read(out.data(), static_cast<std::streamsize>(len));
    out.resize(static_cast<std::size_t>(in.gcount()));
    return out;
  };
  const std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges = {
      {0, 1 << 20}, {kW - (1 << 20), 2 << 20}, {2 * kW - (1 << 20), (1 << 20) + 12345}};
  auto check_image = [&](const std::string& path, std::size_t upto) {
    REQUIRE(std::filesystem::file_size(path) == size);
    for (auto [at, len] : ranges) REQUIRE(read_at(path, at, len) == expect(upto, at, len));
  };
  {
    auto store = GroupStore::open(options_for(dir), "g", true).value();
    REQUIRE(feed_rp(*store, rps[0]).is_ok());
    REQUIRE(feed_rp(*store, rps[1]).is_ok());
    REQUIRE(store->apply_committed().is_ok());
    for (std::size_t r = 0; r < 2; ++r) {
      std::string out = dir.path() + "/out.img";
      REQUIRE(store->restore(r + 1, "vda", out).is_ok());
      check_image(out, r);
    }
    check_image(dir.path() + "/store/g/replica/vda.img", 0);  // the base: RP 1
    // Compaction writes RP 2's records into the image, across the window bounds.
    REQUIRE(store->prune(keep_newest_only(), 0, false).is_ok());
    REQUIRE(store->last_applied_rp() == 2);
    check_image(dir.path() + "/store/g/replica/vda.img", 1);
    std::string out = dir.path() + "/out.img";
    REQUIRE(store->restore(2, "vda", out).is_ok());  // from the image alone now
    check_image(out, 1);
  }
  // R13: the image of the base RP is gone; nothing can rebuild it: refused.
  std::filesystem::remove(dir.path() + "/store/g/replica/vda.img");
  auto store = GroupStore::open(options_for(dir), "g", false);
  REQUIRE(!store.is_ok());
  CHECK(store.status().message().find("(R13)") != std::string::npos);
}
