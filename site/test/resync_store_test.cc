// GroupStore::replica_digests, the receiver's half of a resync (C4): digests equal the xxh3-128
// of the replica at the last committed RP block by block (holes, zero records, data, a short
// last block), the RP is applied first, and every out-of-range request is refused.
#include <catch2/catch.hpp>

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <fstream>
#include <sstream>

#include "ferry/site/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;

namespace {

constexpr std::uint32_t kB = 65536;
constexpr std::uint64_t kSize = 40 * std::uint64_t(kB) + 3000;  // a short last block

StoreOptions options_for(const TempDir& dir) {
  StoreOptions o;
  o.root = dir.path() + "/store";
  return o;
}

std::vector<TestRp> resync_rps() {
  std::vector<TestRp> rps(2);
  rps[0].begin = {1, 0, 1, 0, {disk("vda", kSize, true)}};
  for (std::uint32_t i = 0; i < 40; i += 3)  // data every third block, holes between
    rps[0].blocks.push_back({0, i * std::uint64_t(kB), kB, RecordKind::data,
                             i % 2 ? RecordCodec::zstd : RecordCodec::none, 10 + i});
  rps[0].blocks.push_back({0, 40 * std::uint64_t(kB), 3000, RecordKind::data, RecordCodec::none, 99});
  rps[1].begin = {2, 1, 2, 0, {disk("vda", kSize, false)}};
  rps[1].blocks = {{0, 3 * kB, kB, RecordKind::zero, RecordCodec::none, 0},  // data -> zeros
                   {0, 7 * kB + 4096, 4096, RecordKind::data, RecordCodec::none, 201},  // in a hole
                   {0, 12 * kB, kB, RecordKind::data, RecordCodec::zstd, 202}};
  return rps;
}

// What replica_digests must return, computed from the model image.
std::vector<Hash128> expected(const std::string& img, std::uint64_t offset, std::uint32_t block,
                              std::uint32_t count) {
  std::vector<Hash128> out;
  for (std::uint32_t i = 0; i < count; ++i) {
    std::uint64_t at = offset + std::uint64_t(i) * block;
    std::size_t len = std::min<std::uint64_t>(block, img.size() - at);
    out.push_back(xxh3_128(img.data() + at, len));
  }
  return out;
}

}  // namespace

TEST_CASE("resync: replica digests equal the RP's blocks, holes included", "[resync]") {
  TempDir dir;
  auto rps = resync_rps();
  Model model = model_of(rps);
  auto store = GroupStore::open(options_for(dir), "g", true).value();
  REQUIRE(feed_rp(*store, rps[0]).is_ok());
  REQUIRE(store->apply_committed().is_ok());
  const std::uint32_t blocks = 41;
  auto d1 = store->replica_digests("vda", 0, kB, blocks);
  REQUIRE(d1.is_ok());
  CHECK(*d1 == expected(model.at(1).at("vda"), 0, kB, blocks));
  // Not yet applied: the call applies RP 2 first, so the digests are those of RP 2.
  REQUIRE(feed_rp(*store, rps[1]).is_ok());
  CHECK(store->last_applied_rp() == 1);
  auto d2 = store->replica_digests("vda", 0, kB, blocks);
  REQUIRE(d2.is_ok());
  CHECK(store->last_applied_rp() == 2);
  CHECK(*d2 == expected(model.at(2).at("vda"), 0, kB, blocks));
  CHECK((*d1)[3] != (*d2)[3]);  // the test sees the change it expects
  CHECK((*d1)[7] != (*d2)[7]);
  // Other block sizes and a range in the middle, ending on the short last block.
  auto d3 = store->replica_digests("vda", 8 * 4096, 4096, 40 * 16 + 1 - 8);
  REQUIRE(d3.is_ok());
  CHECK(*d3 == expected(model.at(2).at("vda"), 8 * 4096, 4096, 40 * 16 + 1 - 8));
  auto d4 = store->replica_digests("vda", 0, 1u << 20, 3);
  REQUIRE(d4.is_ok());
  CHECK(*d4 == expected(model.at(2).at("vda"), 0, 1u << 20, 3));
}

TEST_CASE("resync: digest requests outside the replica are refused", "[resync]") {
  TempDir dir;
  auto rps = resync_rps();
  auto store = GroupStore::open(options_for(dir), "g", true).value();
  CHECK(store->replica_digests("vda", 0, kB, 1).status().code() == Errc::not_found);  // no RP
  REQUIRE(feed_rp(*store, rps[0]).is_ok());
  CHECK(store->replica_digests("vdb", 0, kB, 1).status().code() == Errc::not_found);
  auto refused = [&](std::uint64_t off, std::uint32_t block, std::uint32_t count) {
    INFO("offset " << off << " block " << block << " count " << count);
    CHECK(store->replica_digests("vda", off, block, count).status().code() ==
          Errc::invalid_argument);
  };
  refused(0, kB, 42);                     // one block past the end
  refused(41 * std::uint64_t(kB), kB, 1);  // starts at the end
  refused(512, kB, 1);                    // not aligned
  refused(0, 3000, 1);                    // not a power of two
  refused(0, 8u << 20, 1);                // above the largest block
  refused(0, kB, 0);
  refused(0, 512, GroupStore::kMaxDigestBlocks + 1);
  CHECK(store->replica_digests("vda", 40 * std::uint64_t(kB), kB, 1).is_ok());  // the short one
}

// R17, the contract's "replica changed behind our back": the image drifted from its RP (a
// test boot in place, an operator's tool, a rebuild cut short before R16). Digests taken
// from the image would follow the drift, so the source would skip exactly the blocks where
// it equals the drifted image, and a restore of the resync RP would return stale bytes.
// Digests come from the journal's view of the RP; the drift is reported and the image is
// rebuilt from the journal at the next apply instead of being patched incrementally.
TEST_CASE("resync R17: digests follow the journal, not a replica changed behind our back",
          "[resync]") {
  TempDir dir;
  auto rps = resync_rps();
  Model model = model_of(rps);
  std::ostringstream log;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log);
  spdlog::default_logger()->sinks().push_back(sink);
  auto store = GroupStore::open(options_for(dir), "g", true).value();
  REQUIRE(feed_rp(*store, rps[0]).is_ok());
  REQUIRE(store->apply_committed().is_ok());
  const std::string image = dir.path() + "/store/g/replica/vda.img";
  {
    std::fstream f(image, std::ios::in | std::ios::out | std::ios::binary);
    std::string junk = block_bytes(77, kB);
    f.seekp(4 * kB);  // a hole at RP 1
    f.write(junk.data(), junk.size());
    f.seekp(6 * kB + 100);  // inside a data block
    f.write(junk.data(), 5000);
  }
  const std::uint32_t blocks = 41;
  auto d = store->replica_digests("vda", 0, kB, blocks);
  spdlog::default_logger()->sinks().pop_back();
  REQUIRE(d.is_ok());
  CHECK(*d == expected(model.at(1).at("vda"), 0, kB, blocks));
  INFO(log.str());
  CHECK(log.str().find("group g, disk vda: the replica image differs from RP 1 at offset " +
                       std::to_string(4 * kB)) != std::string::npos);
  // The next RP is applied by a rebuild from the journal, not on top of the drifted image.
  REQUIRE(feed_rp(*store, rps[1]).is_ok());
  REQUIRE(store->apply_committed().is_ok());
  CHECK(slurp(image) == model.at(2).at("vda"));
  CHECK(*store->replica_digests("vda", 0, kB, blocks) ==
        expected(model.at(2).at("vda"), 0, kB, blocks));
}

TEST_CASE("resync R17: a drift found by digests is rebuilt at the next open if no apply ran",
          "[resync]") {
  TempDir dir;
  auto rps = resync_rps();
  Model model = model_of(rps);
  const std::string image = dir.path() + "/store/g/replica/vda.img";
  {
    auto store = GroupStore::open(options_for(dir), "g", true).value();
    REQUIRE(feed_rp(*store, rps[0]).is_ok());
    REQUIRE(store->apply_committed().is_ok());
    std::fstream f(image, std::ios::in | std::ios::out | std::ios::binary);
    std::string junk = block_bytes(78, 4096);
    f.seekp(9 * kB);
    f.write(junk.data(), junk.size());
    f.close();
    auto d = store->replica_digests("vda", 8 * kB, kB, 4);
    REQUIRE(d.is_ok());
    CHECK(*d == expected(model.at(1).at("vda"), 8 * kB, kB, 4));
  }  // the session ends before any RP commits
  auto store = GroupStore::open(options_for(dir), "g", false).value();
  CHECK(store->last_applied_rp() == 1);
  CHECK(slurp(image) == model.at(1).at("vda"));
}
