#include "ferry/source/sender_events.h"

#include <spdlog/spdlog.h>

namespace ferry::source {
namespace {

using events::Event;
using events::Priority;

const char* mode_name(transport::DiskMode m) {
  switch (m) {
    case transport::DiskMode::incremental: return "incremental";
    case transport::DiskMode::resync: return "resync";
    default: return "full";
  }
}

// Change tracking lost (not a first RP or a new disk): the disk had to be compared or read.
bool lost(cbt::FullReason r) {
  return r != cbt::FullReason::none && r != cbt::FullReason::first_rp &&
         r != cbt::FullReason::new_disk;
}

}  // namespace

std::unique_ptr<events::EventLog> open_source_events(const std::string& state_dir,
                                                     const std::string& group,
                                                     std::uint64_t max_file_bytes) {
  auto log = events::EventLog::open({.dir = events::source_events_dir(state_dir, group),
                                     .max_file_bytes = max_file_bytes});
  if (log.is_ok()) return std::move(log).value();
  spdlog::warn("group '{}': event log not opened (events go to this log only): {}", group,
               log.status().to_string());
  return nullptr;
}

Result<RpStats> take_recovery_point_with_events(cbt::ChangeSource& source,
                                                const SenderOptions& options,
                                                events::EventLog* log) {
  if (log == nullptr) return take_recovery_point(source, options);
  const std::string& group = options.group;
  SenderOptions o = options;
  std::uint64_t started_rp = 0;
  o.on_started = [&](const RpStats& s) {
    started_rp = s.rp_id;
    std::string modes;
    for (const DiskStats& d : s.disks)
      modes += (modes.empty() ? "" : ",") + d.name + ":" + mode_name(d.mode);
    log->emit({.group = group, .kind = "rp_started", .rp = s.rp_id,
               .message = "RP " + std::to_string(s.rp_id) + " of group '" + group +
                          "' started (base " + std::to_string(s.base_rp) + ", " + modes + ")",
               .fields = {{"base_rp", std::int64_t(s.base_rp)}, {"disks", modes}}});
    for (const DiskStats& d : s.disks)
      if (lost(d.full_reason))
        log->emit({.group = group, .kind = "bitmap_lost", .rp = s.rp_id, .disk = d.name,
                   .priority = Priority::warning,
                   .message = "disk '" + d.name + "' of group '" + group +
                              "': change tracking lost (" + cbt::full_reason_name(d.full_reason) +
                              "); sent as " + mode_name(d.mode),
                   .fields = {{"reason", std::string(cbt::full_reason_name(d.full_reason))},
                              {"mode", std::string(mode_name(d.mode))}}});
    if (options.on_started) options.on_started(s);
  };
  auto rp = take_recovery_point(source, o);
  if (!rp.is_ok()) {
    const Status& why = rp.status();
    log->emit({.group = group, .kind = "error", .rp = started_rp, .priority = Priority::error,
               .message = "group '" + group + "': recovery point failed: " + why.message(),
               .fields = {{"what", std::string("recovery point failed")},
                          {"code", std::string(errc_name(why.code()))},
                          {"cause", why.message()},
                          {"retryable", std::int64_t(why.retryable() ? 1 : 0)}}});
    return rp;
  }
  std::int64_t bytes = 0, wire = std::int64_t(rp->wire_bytes);
  for (const DiskStats& d : rp->disks) bytes += std::int64_t(d.data_bytes + d.zero_bytes);
  log->emit({.group = group, .kind = "rp_committed", .rp = rp->rp_id, .priority = Priority::notice,
             .message = "RP " + std::to_string(rp->rp_id) + " of group '" + group +
                        "' committed and acknowledged",
             .fields = {{"base_rp", std::int64_t(rp->base_rp)}, {"changed_bytes", bytes},
                        {"wire_bytes", wire},
                        {"duration_ms", std::int64_t(rp->total_seconds * 1000)}}});
  for (const DiskStats& d : rp->disks)
    if (lost(d.full_reason))
      log->emit({.group = group, .kind = "bitmap_healed", .rp = rp->rp_id, .disk = d.name,
                 .message = "disk '" + d.name + "' of group '" + group + "': change tracking " +
                            "restored (RP " + std::to_string(rp->rp_id) +
                            " committed; the next RP is incremental)",
                 .fields = {{"reason", std::string(cbt::full_reason_name(d.full_reason))}}});
  return rp;
}

}  // namespace ferry::source
