#include "ferry/base/units.h"

#include <cstdio>
#include <iterator>

#include "ferry/base/status.h"

namespace ferry {

std::string human_bytes(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  constexpr int kLast = static_cast<int>(std::size(kUnits)) - 1;
  double v = double(bytes);
  int u = 0;
  while (v >= 1024 && u < kLast) {
    v /= 1024;
    ++u;
  }
  FERRY_ASSERT(u <= kLast);
  char buf[32];
  std::snprintf(buf, sizeof buf, u ? "%.1f %s" : "%.0f %s", v, kUnits[u]);
  return buf;
}

std::string human_bytes_exact(std::uint64_t bytes) {
  return human_bytes(bytes) + " (" + std::to_string(bytes) + " bytes)";
}

}  // namespace ferry
