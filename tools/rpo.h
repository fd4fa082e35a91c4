// Explainable RPO (docs/operations.md, "Why is the RPO late?"): an RP's time split into its
// stages, and the alert line that names the stage that made the RPO late. Pure: no clock, no
// I/O; unit-tested in test/rpo_test.cc.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ferry::source {
struct RpStats;
}

namespace ferry::tools {

struct Stage {
  std::string name;  // slot, capture, read, hash_compress, send, durable, finish
  double seconds = 0;
};

// The source's stages of an RP, in order.
std::vector<Stage> rp_stages(const source::RpStats& s);

// What status and the logs say when the RPO is over its threshold, e.g.
// "RPO 95 s > 60 s: send 71 s at 1.2 MB/s, link-bound". `rpo_seconds` empty: no RP yet.
// `last_stages`: the newest acknowledged RP's (empty: none); `last_error`: the newest RP's
// failure (empty: it succeeded), which then is the reason.
struct RpoInputs {
  std::optional<double> rpo_seconds;
  double alert_seconds = 0;
  std::vector<Stage> last_stages;
  std::uint64_t last_wire_bytes = 0;
  std::string last_error;
  double running_seconds = 0;  // the RP in flight, if any: how long it has run
  double watched_seconds = 0;  // since protection started: an unknown RPO is over after this
};
// Empty when the RPO is within its threshold.
std::string rpo_alert(const RpoInputs& in);
// The slowest stage and why it is slow, e.g. "send 71 s at 1.2 MB/s, link-bound".
std::string slowest_stage(const std::vector<Stage>& stages, std::uint64_t wire_bytes);

}  // namespace ferry::tools
