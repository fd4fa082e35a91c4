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
  // Not applied: the digests are RP 2's, read through the view (RP 2's records over the
  // image of RP 1); nothing is applied for them.
  REQUIRE(feed_rp(*store, rps[1]).is_ok());
  CHECK(store->last_applied_rp() == 1);
  auto d2 = store->replica_digests("vda", 0, kB, blocks);
  REQUIRE(d2.is_ok());
  CHECK(store->last_applied_rp() == 1);
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

// The digests describe exactly what a restore of the newest RP returns (C4: the source
// skips the blocks whose digests match, so both must read the same bytes): the records of
// the RPs above the base over the base image. Layout 2 has no other copy of the bytes no
// later record covers, so R17 (comparing the image with the journal and rebuilding it) is
// gone; an image changed behind our back shows in the digests and the restore alike, and
// the ranges later records cover do not.
TEST_CASE("resync: digests equal a restore of the newest RP, over the base image",
          "[resync]") {
  TempDir dir;
  auto rps = resync_rps();
  Model model = model_of(rps);
  auto store = GroupStore::open(options_for(dir), "g", true).value();
  REQUIRE(feed_rp(*store, rps[0]).is_ok());
  REQUIRE(store->apply_committed().is_ok());
  REQUIRE(store->last_applied_rp() == 1);
  REQUIRE(feed_rp(*store, rps[1]).is_ok());
  const std::string image = dir.path() + "/store/g/replica/vda.img";
  {
    std::fstream f(image, std::ios::in | std::ios::out | std::ios::binary);
    std::string junk = block_bytes(77, kB);
    f.seekp(12 * kB);  // covered by RP 2's record: RP 2 reads the record
    f.write(junk.data(), junk.size());
    f.seekp(6 * kB + 100);  // covered by nothing above the base: RP 2 reads the image
    f.write(junk.data(), 5000);
  }
  const std::uint32_t blocks = 41;
  auto d = store->replica_digests("vda", 0, kB, blocks);
  REQUIRE(d.is_ok());
  const std::string out = dir.path() + "/rp2.img";
  REQUIRE(store->restore(2, "vda", out).is_ok());
  const std::string restored = slurp(out);
  CHECK(*d == expected(restored, 0, kB, blocks));
  const std::string& want = model.at(2).at("vda");
  CHECK(restored.compare(12 * kB, kB, want, 12 * kB, kB) == 0);
  CHECK(restored.compare(6 * kB + 100, 5000, want, 6 * kB + 100, 5000) != 0);
  CHECK(restored.substr(0, 6 * kB) == want.substr(0, 6 * kB));
  CHECK(restored.substr(7 * kB) == want.substr(7 * kB));
}
