// libFuzzer target for journal recovery (GroupStore::open, docs/journal-format.md R1..R12).
// The input is up to kMaxSegments segment files separated by kSplit (a dictionary entry, so
// mutations keep the structure), optionally followed by a part starting with "STATE" whose
// rest becomes the group's state file. They are written into a fresh store directory on
// tmpfs and the store is opened. Recovery must never crash or hang, and when it succeeds:
//   - committed RP ids strictly increase and each RP's base is the one before it (C5);
//   - the replica is the last committed RP (applied = committed), and restoring each disk
//     of that RP from the journal (which re-checks every record's checksums and the xxh3-128
//     of every decoded block) gives exactly the replica image: no record that fails its
//     checks reached the replica (C3);
//   - a second open finds the same RPs (recovery is idempotent).
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <vector>

#include "../src/journal.h"
#include "ferry/base/log.h"
#include "ferry/site/store.h"

namespace fs = std::filesystem;
namespace jr = ferry::site::journal;
using ferry::site::GroupStore;
using ferry::site::RpInfo;
using ferry::site::StoreOptions;

namespace {

constexpr std::string_view kSplit = "FERRY-NEXT-SEGMENT";
constexpr std::string_view kStatePrefix = "STATE";
constexpr std::size_t kMaxSegments = 3;
constexpr const char* kGroup = "fz";  // the corpus generator writes this group
// Images larger than this are not compared byte by byte (a fuzzed size may be huge).
constexpr std::uint64_t kMaxCompareBytes = 4u << 20;

std::string root_dir() {
  static const std::string root = [] {
    std::string base = fs::exists("/dev/shm") ? "/dev/shm" : fs::temp_directory_path().string();
    return base + "/ferry-fuzz-recovery-" + std::to_string(::getpid());
  }();
  return root;
}

void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  FERRY_ASSERT_MSG(f.good(), "cannot write the fuzz input to the scratch store");
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

std::vector<std::string_view> split(std::string_view in) {
  std::vector<std::string_view> parts;
  while (parts.size() < kMaxSegments + 1) {
    std::size_t at = in.find(kSplit);
    if (at == std::string_view::npos) break;
    parts.push_back(in.substr(0, at));
    in.remove_prefix(at + kSplit.size());
  }
  parts.push_back(in);
  return parts;
}

void check_points(const std::vector<RpInfo>& points) {
  for (std::size_t i = 0; i < points.size(); ++i) {
    std::uint64_t prev = i == 0 ? 0 : points[i - 1].rp_id;
    FERRY_ASSERT_MSG(points[i].rp_id > prev, "committed RP ids do not strictly increase");
    bool any_incremental = false;
    for (const auto& d : points[i].disks) any_incremental |= !d.full;
    if (i > 0 || any_incremental)
      FERRY_ASSERT_MSG(points[i].base_rp == prev, "a committed RP's base is not the RP before it");
  }
}

// Layout 2: after a retention pass the images hold the oldest kept RP (the base); each of
// its images equals that RP restored through the read view, and the newest RP restores.
void check_replica(GroupStore& store, const StoreOptions& opt) {
  std::uint64_t last = store.last_committed_rp();
  if (last == 0) return;
  FERRY_ASSERT_MSG(store.apply_committed().is_ok() || !store.apply_error().is_ok(),
                   "retention failed without saying why");
  if (!store.apply_error().is_ok()) return;
  const std::vector<RpInfo> pts = store.points();
  FERRY_ASSERT_MSG(!pts.empty() && pts.back().rp_id == last, "the newest RP is not offered");
  const std::uint64_t base = store.last_applied_rp();
  FERRY_ASSERT_MSG(base == pts.front().rp_id, "the images do not hold the oldest kept RP");
  for (const auto& d : pts.front().disks) {
    if (d.size_bytes > kMaxCompareBytes) continue;
    std::string image = opt.root + "/" + kGroup + "/replica/" + d.name + ".img";
    std::string restored = opt.root + "/restored.img";
    ferry::Status st = store.restore(base, d.name, restored);
    FERRY_ASSERT_MSG(st.is_ok(), "restore of the base RP failed");
    std::string a = read_file(image), b = read_file(restored);
    a.resize(d.size_bytes, '\0');  // an image is sparse and sized; compare the logical bytes
    b.resize(d.size_bytes, '\0');
    FERRY_ASSERT_MSG(a == b, "replica differs from the base RP read through the view");
  }
  for (const auto& d : pts.back().disks) {
    if (d.size_bytes > kMaxCompareBytes) continue;
    ferry::Status st = store.restore(last, d.name, opt.root + "/restored.img");
    FERRY_ASSERT_MSG(st.is_ok(), "restore of the newest RP failed: a record that fails its "
                                 "checks is part of a committed RP");
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // recovery notes for every input drown the output
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  StoreOptions opt;
  opt.root = root_dir();
  opt.segment_bytes = jr::kMinSegmentBytes;
  opt.max_inflight_write_bytes = 1u << 20;
  fs::remove_all(opt.root);
  std::string journal = opt.root + "/" + kGroup + "/journal";
  fs::create_directories(journal);

  std::uint64_t seq = 1;
  for (std::string_view part : split(in)) {
    if (part.substr(0, kStatePrefix.size()) == kStatePrefix) {
      write_file(opt.root + "/" + kGroup + "/state", part.substr(kStatePrefix.size()));
      break;
    }
    if (seq > kMaxSegments) break;
    write_file(journal + "/" + jr::segment_name(seq++), part);
  }

  std::vector<RpInfo> first;
  {
    auto store = GroupStore::open(opt, kGroup, /*create=*/true);
    if (!store.is_ok()) {
      fs::remove_all(opt.root);
      return 0;  // refused (corrupt, unsupported): the replica was not touched
    }
    first = (*store)->points();
    check_points(first);
    check_replica(**store, opt);
  }
  {
    auto again = GroupStore::open(opt, kGroup, /*create=*/false);
    FERRY_ASSERT_MSG(again.is_ok(), "a store that recovered once refuses the second open");
    std::vector<RpInfo> second = (*again)->points();
    FERRY_ASSERT_MSG(second.size() == first.size(), "second recovery finds other RPs");
    for (std::size_t i = 0; i < first.size(); ++i)
      FERRY_ASSERT_MSG(second[i].rp_id == first[i].rp_id, "second recovery finds other RPs");
  }
  fs::remove_all(opt.root);
  return 0;
}
