// ReadView: "disk D of group G at RP N" read from the journal equals what restore writes (and
// the model), for every RP of a run with full and incremental RPs, zero ranges and resizes;
// extents agree with the content; reads cross record, chunk and window bounds.
#include <catch2/catch.hpp>

#include <random>

#include "ferry/site/read_view.h"
#include "ferry/site/store.h"
#include "store_test_util.h"

using namespace ferry;
using namespace ferry::site;
using namespace ferry::site::test;

namespace {

constexpr std::uint32_t kB = 65536;

// Full RP, incrementals with zeros and overwrites, a grow, a shrink, a later full RP, and
// enough small records that an RP's index has several chunks.
std::vector<TestRp> view_rps() {
  std::vector<TestRp> rps = life_cycle_rps();
  for (std::uint32_t i = 0; i < 3000; ++i)
    rps[1].blocks.push_back({0, 8 * kB + (i % 120) * 512, 512, RecordKind::data,
                             RecordCodec::none, 1000 + i});
  return rps;
}

// Extents tile [off, off + len) in order, alternate kinds, and zero extents read as zeros.
std::string check_extents(ReadView& v, const std::string& img, std::uint64_t off,
                          std::uint64_t len) {
  auto ex = v.extents(off, len);
  if (!ex.is_ok()) return ex.status().to_string();
  std::uint64_t pos = off;
  for (std::size_t i = 0; i < ex->size(); ++i) {
    const auto& e = (*ex)[i];
    if (e.offset_bytes != pos || e.length_bytes == 0) return "extents do not tile the range";
    if (i > 0 && (*ex)[i - 1].zero == e.zero) return "adjacent extents of one kind";
    if (e.zero && !is_all_zero(img.data() + e.offset_bytes, e.length_bytes))
      return "zero extent at " + std::to_string(e.offset_bytes) + " holds data";
    pos += e.length_bytes;
  }
  return pos == off + len ? "" : "extents end early";
}

}  // namespace

TEST_CASE("read view: random reads equal restore and the model at every RP", "[view]") {
  TempDir dir;
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  auto rps = view_rps();
  Model model = model_of(rps);
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  for (const auto& rp : rps) REQUIRE(feed_rp(**store, rp).is_ok());
  std::mt19937_64 rng(42);
  for (const auto& rp : rps) {
    for (const auto& [name, img] : model.at(rp.begin.rp_id)) {
      INFO("RP " << rp.begin.rp_id << " disk " << name);
      auto v = ReadView::open(opt.root, "g", rp.begin.rp_id, name);
      REQUIRE(v.is_ok());
      CHECK((*v)->rp_id() == rp.begin.rp_id);
      REQUIRE((*v)->size_bytes() == img.size());
      std::string out = dir.path() + "/r.img";
      REQUIRE(restore_point(opt.root, "g", rp.begin.rp_id, name, out).is_ok());
      CHECK(slurp(out) == img);
      std::string whole(img.size(), 'x');
      REQUIRE((*v)->pread(whole.data(), whole.size(), 0).is_ok());
      CHECK(whole == img);
      CHECK(check_extents(**v, img, 0, img.size()) == "");
      for (int i = 0; i < 200; ++i) {
        std::uint64_t off = rng() % img.size();
        std::size_t len = 1 + rng() % std::min<std::uint64_t>(img.size() - off, 3 * kB);
        std::string got(len, 'x');
        REQUIRE((*v)->pread(got.data(), len, off).is_ok());
        REQUIRE(got == img.substr(off, len));
        REQUIRE(check_extents(**v, img, off, len) == "");
      }
      char c;
      CHECK((*v)->pread(&c, 1, img.size()).code() == Errc::invalid_argument);
    }
  }
  // 0 means the newest RP.
  auto latest = ReadView::open(opt.root, "g", 0, "vda");
  REQUIRE(latest.is_ok());
  CHECK((*latest)->rp_id() == 5);
}

TEST_CASE("read view: reads across window bounds; zero records and holes as zero extents",
          "[view]") {
  TempDir dir;
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  constexpr std::uint64_t W = ReadView::kWindowBytes;
  const std::uint64_t size = 2 * W + 3 * kB;
  TestRp r1, r2;
  r1.begin = {1, 0, 1, 0, {disk("d", size, true)}};
  r1.blocks = {{0, W - kB / 2, kB, RecordKind::data, RecordCodec::zstd, 7},      // straddles W
               {0, 2 * W - kB, 2 * kB, RecordKind::data, RecordCodec::none, 8},  // straddles 2W
               {0, 2 * W + 2 * kB, kB, RecordKind::data, RecordCodec::none, 9}};
  r2.begin = {2, 1, 2, 0, {disk("d", size, false)}};
  r2.blocks = {{0, 2 * W - kB / 2, kB, RecordKind::zero, RecordCodec::none, 0}};
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  REQUIRE(feed_rp(**store, r1).is_ok());
  REQUIRE(feed_rp(**store, r2).is_ok());
  // The expected bytes of [lo, lo + len) at RP 2, from the blocks (no whole-disk model).
  auto expected = [&](std::uint64_t lo, std::size_t len) {
    std::string s(len, '\0');
    for (const auto* rp : {&r1, &r2})
      for (const auto& b : rp->blocks) {
        std::string bytes = b.kind == RecordKind::data ? block_bytes(b.seed, b.length)
                                                       : std::string(b.length, '\0');
        for (std::uint64_t i = 0; i < b.length; ++i)
          if (b.offset + i >= lo && b.offset + i < lo + len) s[b.offset + i - lo] = bytes[i];
      }
    return s;
  };
  auto v = ReadView::open(opt.root, "g", 2, "d");
  REQUIRE(v.is_ok());
  for (std::uint64_t lo : {W - kB, 2 * W - 2 * kB, W - 1, 2 * W - 1, size - 3 * kB}) {
    std::size_t len = static_cast<std::size_t>(std::min<std::uint64_t>(3 * kB, size - lo));
    std::string got(len, 'x');
    REQUIRE((*v)->pread(got.data(), len, lo).is_ok());
    CHECK(got == expected(lo, len));
  }
  auto ex = (*v)->extents(0, size);
  REQUIRE(ex.is_ok());
  std::vector<ReadExtent> want = {{0, W - kB / 2, true},
                                  {W - kB / 2, kB, false},
                                  {W + kB / 2, W - kB - kB / 2, true},
                                  {2 * W - kB, kB / 2, false},
                                  {2 * W - kB / 2, kB, true},  // the zero record
                                  {2 * W + kB / 2, kB / 2, false},
                                  {2 * W + kB, kB, true},
                                  {2 * W + 2 * kB, kB, false}};
  REQUIRE(ex->size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    INFO("extent " << i);
    CHECK((*ex)[i].offset_bytes == want[i].offset_bytes);
    CHECK((*ex)[i].length_bytes == want[i].length_bytes);
    CHECK((*ex)[i].zero == want[i].zero);
  }
}

TEST_CASE("read view: stable while the receiver appends; errors name group, RP and disk",
          "[view]") {
  TempDir dir;
  StoreOptions opt;
  opt.root = dir.path() + "/store";
  auto rps = view_rps();
  Model model = model_of(rps);
  auto store = GroupStore::open(opt, "g", true);
  REQUIRE(store.is_ok());
  REQUIRE(feed_rp(**store, rps[0]).is_ok());
  REQUIRE((*store)->apply_committed().is_ok());
  auto v = ReadView::open(opt.root, "g", 0, "vda");  // the group lock is held: no lock needed
  REQUIRE(v.is_ok());
  REQUIRE((*v)->rp_id() == 1);
  const std::string& img = model.at(1).at("vda");
  for (std::size_t i = 1; i < rps.size(); ++i) {
    REQUIRE(feed_rp(**store, rps[i]).is_ok());
    REQUIRE((*store)->apply_committed().is_ok());
    std::string got(img.size(), 'x');
    REQUIRE((*v)->pread(got.data(), got.size(), 0).is_ok());
    CHECK(got == img);
  }
  auto no_group = ReadView::open(opt.root, "nope", 1, "vda");
  CHECK(no_group.status().code() == Errc::not_found);
  CHECK(no_group.status().to_string().find("group nope") != std::string::npos);
  auto no_rp = ReadView::open(opt.root, "g", 9, "vda");
  CHECK(no_rp.status().code() == Errc::not_found);
  CHECK(no_rp.status().to_string().find("RP 9 of group g is not committed") != std::string::npos);
  auto no_disk = ReadView::open(opt.root, "g", 3, "vdz");
  CHECK(no_disk.status().code() == Errc::not_found);
  CHECK(no_disk.status().to_string().find("disk vdz is not part of RP 3 of group g") !=
        std::string::npos);
  CHECK(ReadView::open(opt.root, "g", 3, "../x").status().code() == Errc::invalid_argument);
}
