#include "rpo.h"

#include <fmt/format.h>

#include <algorithm>

#include "ferry/source/sender.h"

namespace ferry::tools {
namespace {

// What a slow stage means: where to look.
std::string stage_cause(const std::string& name, double seconds, std::uint64_t wire_bytes) {
  if (name == "send")
    return fmt::format(" at {:.1f} MB/s, link-bound", seconds > 0 ? double(wire_bytes) / 1e6 / seconds : 0.0);
  if (name == "read") return ", source-read-bound (the disks or the NBD export)";
  if (name == "hash_compress") return ", CPU-bound (hashing and zstd)";
  if (name == "durable") return ", receiver-bound (journal write and fdatasync)";
  if (name == "capture") return ", hypervisor-bound (bitmaps and fleecing)";
  if (name == "slot") return ", waiting for the group's slot on the receiver";
  if (name == "finish") return ", hypervisor-bound (bitmap clean-up)";
  return "";
}

std::string secs(double s) { return s >= 10 ? fmt::format("{:.0f} s", s) : fmt::format("{:.1f} s", s); }

}  // namespace

std::vector<Stage> rp_stages(const source::RpStats& s) {
  return {{"slot", s.slot_seconds},       {"capture", s.capture_seconds},
          {"read", s.read_seconds},       {"hash_compress", s.hash_compress_seconds},
          {"send", s.send_seconds},       {"durable", s.durable_seconds},
          {"finish", s.finish_seconds}};
}

std::string slowest_stage(const std::vector<Stage>& stages, std::uint64_t wire_bytes) {
  if (stages.empty()) return "";
  const Stage& worst = *std::max_element(stages.begin(), stages.end(),
                                         [](const Stage& a, const Stage& b) { return a.seconds < b.seconds; });
  return worst.name + " " + secs(worst.seconds) + stage_cause(worst.name, worst.seconds, wire_bytes);
}

std::string rpo_alert(const RpoInputs& in) {
  const bool over = in.rpo_seconds ? *in.rpo_seconds > in.alert_seconds
                                   : in.watched_seconds > in.alert_seconds;
  if (!over) return "";
  std::string head = in.rpo_seconds ? fmt::format("RPO {} > {}", secs(*in.rpo_seconds), secs(in.alert_seconds))
                                    : fmt::format("RPO unknown > {}", secs(in.alert_seconds));
  if (!in.last_error.empty()) return head + ": the last RP failed: " + in.last_error;
  if (in.last_stages.empty()) {
    if (in.running_seconds > 0) return head + ": the first RP is running for " + secs(in.running_seconds);
    return head + ": no RP acknowledged yet";
  }
  return head + ": " + slowest_stage(in.last_stages, in.last_wire_bytes);
}

}  // namespace ferry::tools
