// Unit tests of the pure parts of cbt/: extent alignment and the healing table (healing.h).
#include <catch2/catch.hpp>

#include <algorithm>

#include "extent_math.h"
#include "healing.h"

namespace Catch {
template <>
struct StringMaker<ferry::cbt::Extent> {
  static std::string convert(const ferry::cbt::Extent& e) {
    return (e.zero ? "Z(" : "D(") + std::to_string(e.offset_bytes) + ", " +
           std::to_string(e.length_bytes) + ")";
  }
};
}  // namespace Catch

using namespace ferry;
using namespace ferry::cbt;

namespace {
constexpr std::uint64_t K = 1024;
Extent D(std::uint64_t o, std::uint64_t l) { return {o, l, false}; }
Extent Z(std::uint64_t o, std::uint64_t l) { return {o, l, true}; }
}  // namespace

TEST_CASE("full view: data rounds outwards, zero inwards, merged") {
  // 1 MiB disk: zero [0,100K) data [100K,130K) zero [130K, 1M)
  std::vector<Extent> runs = {Z(0, 100 * K), D(100 * K, 30 * K), Z(130 * K, 894 * K)};
  std::vector<Extent> out;
  append_aligned(out, runs, 64 * K, 1024 * K);
  REQUIRE(out == std::vector<Extent>{Z(0, 64 * K), D(64 * K, 128 * K), Z(192 * K, 832 * K)});
}

TEST_CASE("full view: a sub-granule zero run between data becomes data") {
  std::vector<Extent> runs = {D(0, 10 * K), Z(10 * K, 20 * K), D(30 * K, 98 * K)};
  std::vector<Extent> out;
  append_aligned(out, runs, 64 * K, 128 * K);
  REQUIRE(out == std::vector<Extent>{D(0, 128 * K)});
}

TEST_CASE("full view: the short last granule keeps its zero tail") {
  std::vector<Extent> runs = {D(0, 64 * K), Z(64 * K, 36 * K)};  // disk of 100 KiB
  std::vector<Extent> out;
  append_aligned(out, runs, 64 * K, 100 * K);
  REQUIRE(out == std::vector<Extent>{D(0, 64 * K), Z(64 * K, 36 * K)});
}

TEST_CASE("incremental: dirty granules split by allocation") {
  // dirty [70K, 75K) and [200K, 330K); alloc: data up to 256K, zero after.
  std::vector<Range> dirty = {{70 * K, 5 * K}, {200 * K, 130 * K}};
  std::vector<Extent> alloc = {D(0, 256 * K), Z(256 * K, 768 * K)};
  auto out = dirty_extents(dirty, alloc, 64 * K, 1024 * K);
  REQUIRE(out == std::vector<Extent>{D(64 * K, 64 * K), D(192 * K, 64 * K), Z(256 * K, 128 * K)});
}

TEST_CASE("incremental: adjacent dirty windows merge") {
  std::vector<Range> dirty = {{0, 10 * K}, {64 * K, 1}};
  std::vector<Extent> alloc = {D(0, 1024 * K)};
  auto out = dirty_extents(dirty, alloc, 64 * K, 1024 * K);
  REQUIRE(out == std::vector<Extent>{D(0, 128 * K)});
}

TEST_CASE("extents_window checks its arguments and widens to granules") {
  CHECK(extents_window(0, 100, 4096, 1 << 20)->length_bytes == 4096);
  CHECK(extents_window(0, 5 << 20, 4096, 1 << 20)->length_bytes == 1 << 20);
  CHECK(extents_window(100, 100, 4096, 1 << 20).status().code() == Errc::invalid_argument);
  CHECK(extents_window(0, 100, 3000, 1 << 20).status().code() == Errc::invalid_argument);
}

TEST_CASE("bitmap names parse only for their group") {
  CHECK(bitmap_name("vm1", 7) == "ferry.vm1.7");
  CHECK(bitmap_rp("vm1", "ferry.vm1.7") == 7u);
  CHECK(!bitmap_rp("vm1", "ferry.vm1.7x"));
  CHECK(!bitmap_rp("vm1", "ferry.vm10.7"));
  CHECK(!bitmap_rp("vm1", "other"));
}

namespace {
BitmapState bm(std::string name, bool busy = false, bool inconsistent = false) {
  return {std::move(name), !busy, busy, inconsistent, 65536};
}
}  // namespace

TEST_CASE("healing H6/H7: leftovers above base merge into it, stale ones go") {
  auto p = plan_healing("g", 5, true,
                        {bm("ferry.g.3"), bm("ferry.g.5"), bm("ferry.g.6"), bm("ferry.g.7"),
                         bm("user-bitmap"), bm("ferry.h.1")});
  CHECK(p.full_reason == FullReason::none);
  CHECK(std::string(p.rule) == "H6");
  CHECK(p.merge_into_base == std::vector<std::string>{"ferry.g.6", "ferry.g.7"});
  CHECK(p.remove == std::vector<std::string>{"ferry.g.3", "ferry.g.6", "ferry.g.7"});
  CHECK(p.enable_base);
}

TEST_CASE("healing H1/H2: first RP and new disk are full and clear old bitmaps") {
  auto p = plan_healing("g", 0, true, {bm("ferry.g.4")});
  CHECK(p.full_reason == FullReason::first_rp);
  CHECK(p.remove == std::vector<std::string>{"ferry.g.4"});
  CHECK(plan_healing("g", 4, false, {bm("ferry.g.4")}).full_reason == FullReason::new_disk);
}

TEST_CASE("healing H3: an inconsistent needed bitmap forces full and is removed") {
  auto p = plan_healing("g", 4, true, {bm("ferry.g.4", false, true)});
  CHECK(p.full_reason == FullReason::bitmap_inconsistent);
  CHECK(p.remove == std::vector<std::string>{"ferry.g.4"});
  // an inconsistent *stale* one does not matter
  auto q = plan_healing("g", 4, true, {bm("ferry.g.2", false, true), bm("ferry.g.4")});
  CHECK(q.full_reason == FullReason::none);
  CHECK(q.remove == std::vector<std::string>{"ferry.g.2"});
}

TEST_CASE("healing H4/H5: busy is left alone, missing base is full") {
  auto p = plan_healing("g", 4, true, {bm("ferry.g.4", true)});
  CHECK(p.full_reason == FullReason::bitmap_busy);
  CHECK(p.remove.empty());
  auto q = plan_healing("g", 4, true, {bm("ferry.g.6")});
  CHECK(q.full_reason == FullReason::no_bitmap);
  CHECK(std::string(q.rule) == "H5");
  CHECK(q.remove == std::vector<std::string>{"ferry.g.6"});
}

// After finish(acknowledged=false) of RP 6 on base 5: ferry.g.5 frozen, ferry.g.6 recording.
TEST_CASE("healing after a lost ack: incremental whichever RP the receiver holds") {
  BitmapState frozen5 = bm("ferry.g.5");
  frozen5.recording = false;
  const std::vector<BitmapState> left = {frozen5, bm("ferry.g.6")};
  auto not_committed = plan_healing("g", 5, true, left);  // receiver says 5: H6
  CHECK(not_committed.full_reason == FullReason::none);
  CHECK(std::string(not_committed.rule) == "H6");
  CHECK(not_committed.merge_into_base == std::vector<std::string>{"ferry.g.6"});
  CHECK(not_committed.remove == std::vector<std::string>{"ferry.g.6"});
  CHECK(not_committed.enable_base);
  auto committed = plan_healing("g", 6, true, left);  // receiver says 6: base 5 is stale (H7)
  CHECK(committed.full_reason == FullReason::none);
  CHECK(std::string(committed.rule) == "H6");
  CHECK(committed.merge_into_base.empty());
  CHECK(committed.remove == std::vector<std::string>{"ferry.g.5"});
}

TEST_CASE("healing H8: a frozen newest bitmap means its successor is gone") {
  BitmapState frozen5 = bm("ferry.g.5");
  frozen5.recording = false;
  auto p = plan_healing("g", 5, true, {frozen5});
  CHECK(p.full_reason == FullReason::no_bitmap);
  CHECK(std::string(p.rule) == "H8");
  CHECK(p.remove == std::vector<std::string>{"ferry.g.5"});
  BitmapState frozen6 = bm("ferry.g.6");
  frozen6.recording = false;
  CHECK(std::string(plan_healing("g", 5, true, {bm("ferry.g.5"), frozen6}).rule) == "H8");
  // a stale bitmap below base does not count as the newest
  CHECK(std::string(plan_healing("g", 5, true, {bm("ferry.g.4"), bm("ferry.g.5")}).rule) == "H6");
}

TEST_CASE("healing ignores identity tags; tags parse back to their identity") {
  const Hash128 id{0x0123456789abcdefull, 0xfedcba9876543210ull};
  const std::string tag = identity_tag_name("g", id);
  CHECK(tag == "ferry.g.id.fedcba98765432100123456789abcdef");
  CHECK(identity_tag("g", tag) == id);
  CHECK_FALSE(identity_tag("h", tag).has_value());                 // another group's
  CHECK_FALSE(identity_tag("g", "ferry.g.id.xyz").has_value());
  CHECK_FALSE(identity_tag("g", "ferry.g.id." + std::string(32, '0')).has_value());
  CHECK_FALSE(bitmap_rp("g", tag).has_value());                    // never an RP bitmap
  BitmapState t = bm(tag);
  t.recording = false;
  // H1/H2 remove every ferry.g.<k>, never the tag; H6 neither merges nor removes it.
  for (auto p : {plan_healing("g", 0, true, {t, bm("ferry.g.3")}),
                 plan_healing("g", 5, false, {t, bm("ferry.g.5")}),
                 plan_healing("g", 5, true, {t, bm("ferry.g.5"), bm("ferry.g.6")})}) {
    CHECK(std::find(p.remove.begin(), p.remove.end(), tag) == p.remove.end());
    CHECK(std::find(p.merge_into_base.begin(), p.merge_into_base.end(), tag) ==
          p.merge_into_base.end());
  }
  // A disabled tag is not the newest bitmap (H8 stays quiet), nor a missing base (H5).
  CHECK(std::string(plan_healing("g", 5, true, {bm("ferry.g.5"), t}).rule) == "H6");
  // Even an inconsistent tag (QEMU killed) is not removed: it still names the disk.
  t.inconsistent = true;
  auto p = plan_healing("g", 5, true, {bm("ferry.g.5"), t});
  CHECK(std::string(p.rule) == "H6");
  CHECK(p.remove.empty());
}
