// The receiver's capacity check (capacity.h): the probe's verdicts, its cache, the refusals.
#include <sys/resource.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <limits>

#include "capacity.h"

using namespace ferry;
using namespace ferry::site;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/ferry-capacity-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

bool dir_is_empty(const std::string& dir) {
  return std::filesystem::directory_iterator(dir) == std::filesystem::directory_iterator();
}

}  // namespace

TEST_CASE("a size the file system holds fits, once probed, then cached") {
  TempDir d;
  CapacityProbe probe;
  auto v = probe.check(d.path, 1ull << 30);
  REQUIRE(v.is_ok());
  CHECK(v->fits);
  CHECK(probe.probes() == 1);
  for (int i = 0; i < 100; ++i) REQUIRE(probe.check(d.path, 1ull << 30).is_ok());
  CHECK(probe.probes() == 1);  // per RP: a stat and a lookup, no probe
  CHECK(dir_is_empty(d.path));  // the probe file never stays
}

TEST_CASE("a size past the file system's limit does not fit, and the limit is exact") {
  TempDir d;
  CapacityProbe probe;
  // Past what off_t holds no file system can go; below it, ext4 stops at 16 TiB, XFS does not.
  const std::uint64_t huge = std::uint64_t(std::numeric_limits<off_t>::max()) + 1;
  auto v = probe.check(d.path, huge);
  REQUIRE(v.is_ok());
  CHECK_FALSE(v->fits);
  CHECK(v->max_file_bytes < huge);
  auto at_limit = probe.check(d.path, v->max_file_bytes);
  REQUIRE(at_limit.is_ok());
  CHECK(at_limit->fits);
  auto past = probe.check(d.path, v->max_file_bytes + 1);
  REQUIRE(past.is_ok());
  CHECK_FALSE(past->fits);
  CHECK(dir_is_empty(d.path));
}

TEST_CASE("refusals name the disk, its size, the limit and the fix") {
  TempDir d;
  CapacityProbe probe;
  Status over_max = check_disk_capacity(probe, d.path, "g1", "vda", 16ull << 20, 8ull << 20);
  REQUIRE_FALSE(over_max.is_ok());
  CHECK(over_max.message().find("disk 'vda' of group 'g1' is 16.0 MiB (16777216 bytes)") !=
        std::string::npos);
  CHECK(over_max.message().find("--max-disk-bytes 8.0 MiB") != std::string::npos);
  CHECK(probe.probes() == 0);  // the configured maximum is checked first, without I/O

  CHECK(check_disk_capacity(probe, d.path, "g1", "vda", 8ull << 20, 8ull << 20).is_ok());
  CHECK(check_disk_capacity(probe, d.path, "g1", "vda", 1ull << 40, 0).is_ok());

  const std::uint64_t huge = std::uint64_t(std::numeric_limits<off_t>::max()) + 1;
  Status too_big = check_disk_capacity(probe, d.path, "g1", "vdb", huge, 0);
  REQUIRE_FALSE(too_big.is_ok());
  CHECK(too_big.code() == Errc::unsupported);
  CHECK(too_big.message().find("disk 'vdb' of group 'g1'") != std::string::npos);
  CHECK(too_big.message().find("largest file") != std::string::npos);
  CHECK(too_big.message().find("XFS") != std::string::npos);
}

TEST_CASE("a probe that cannot run is not a verdict on the size") {
  CapacityProbe probe;
  auto v = probe.check("/nonexistent/ferry/replica", 1ull << 20);
  CHECK_FALSE(v.is_ok());
  CHECK(check_disk_capacity(probe, "/nonexistent/ferry/replica", "g", "vda", 1ull << 20, 0)
            .is_ok());
}

TEST_CASE("a size past the process's file size limit is refused without probing") {
  TempDir d;
  CapacityProbe probe;
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  rlimit low = old;
  low.rlim_cur = 1ull << 30;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &low) == 0);
  // Probing 2 GiB here would raise SIGXFSZ and kill the test.
  Status s = check_disk_capacity(probe, d.path, "g", "vda", 2ull << 30, 0);
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &old) == 0);
  REQUIRE_FALSE(s.is_ok());
  CHECK(s.message().find("RLIMIT_FSIZE") != std::string::npos);
  CHECK(probe.probes() == 0);
}
