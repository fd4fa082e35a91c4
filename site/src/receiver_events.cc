#include "receiver_events.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>

#include "ferry/site/store.h"

namespace ferry::site {

using events::Event;
using events::Priority;

events::EventLog* ReceiverEvents::log_for(const std::string& group) {
  std::lock_guard lock(mu_);
  auto it = logs_.find(group);
  if (it != logs_.end()) return it->second.get();
  // A group that has no directory yet (a refused peer) gets no log: nothing of it is created.
  std::error_code ec;
  if (!std::filesystem::is_directory(root_ + "/" + group, ec)) return nullptr;
  auto log = events::EventLog::open({.dir = events::receiver_events_dir(root_, group),
                                     .max_file_bytes = max_file_bytes_});
  if (!log.is_ok()) {
    spdlog::warn("group '{}': event log not opened (events go to the log only): {}", group,
                 log.status().to_string());
    return nullptr;
  }
  return (logs_[group] = std::move(log).value()).get();
}

void ReceiverEvents::emit(Event e) {
  if (events::EventLog* log = log_for(e.group)) log->emit(std::move(e));
}

void ReceiverEvents::rp_started(const std::string& group, const RpBeginInfo& rp,
                                const std::string& peer) {
  std::string modes;
  for (const RpBeginInfo::Disk& d : rp.disks)
    modes += (modes.empty() ? "" : ",") + d.name + ":" +
             (d.resync ? "resync" : d.full ? "full" : "incremental");
  emit({.group = group, .kind = "rp_started", .rp = rp.rp_id,
        .message = "RP " + std::to_string(rp.rp_id) + " of group '" + group + "' started (base " +
                   std::to_string(rp.base_rp) + ", " + modes + ")",
        .fields = {{"base_rp", std::int64_t(rp.base_rp)}, {"disks", modes},
                   {"source", rp.source_name}, {"peer", peer}}});
}

void ReceiverEvents::rp_refused(const std::string& group, std::uint64_t rp_id, const Status& why) {
  emit({.group = group, .kind = "rp_refused", .rp = rp_id, .priority = Priority::error,
        .message = "RP " + std::to_string(rp_id) + " of group '" + group + "' refused: " +
                   why.message(),
        .fields = {{"code", std::string(errc_name(why.code()))}, {"cause", why.message()}}});
}

void ReceiverEvents::rp_committed(const std::string& group, const RpInfo& rp, std::uint64_t frames,
                                  std::uint64_t logical_bytes, double seconds, bool acked) {
  emit({.group = group, .kind = "rp_committed", .rp = rp.rp_id, .priority = Priority::notice,
        .message = "RP " + std::to_string(rp.rp_id) + " of group '" + group + "' committed" +
                   (acked ? " and acknowledged" : ", acknowledgement not confirmed"),
        .fields = {{"base_rp", std::int64_t(rp.base_rp)}, {"frames", std::int64_t(frames)},
                   {"logical_bytes", std::int64_t(logical_bytes)},
                   {"duration_ms", std::int64_t(seconds * 1000)},
                   {"acked", std::int64_t(acked ? 1 : 0)}}});
}

std::vector<std::uint64_t> ReceiverEvents::point_ids(const GroupStore& store) {
  std::vector<std::uint64_t> ids;
  for (const RpInfo& p : store.points()) ids.push_back(p.rp_id);
  return ids;
}

void ReceiverEvents::applied(const std::string& group, const std::vector<std::uint64_t>& before,
                             std::uint64_t base_before, const GroupStore& store,
                             const Status& apply) {
  const std::vector<std::uint64_t> after = point_ids(store);
  for (std::uint64_t id : before)
    if (std::find(after.begin(), after.end(), id) == after.end())
      emit({.group = group, .kind = "rp_pruned", .rp = id,
            .message = "RP " + std::to_string(id) + " of group '" + group +
                       "' pruned by retention",
            .fields = {{"by", std::string("retention")}}});
  const std::uint64_t rp = store.last_committed_rp();
  if (!apply.is_ok() || !store.apply_error().is_ok()) {
    const Status& why = apply.is_ok() ? store.apply_error() : apply;
    error(group, rp, "applying RP " + std::to_string(rp) + " to the replica failed", why);
    return;
  }
  emit({.group = group, .kind = "rp_applied", .rp = rp,
        .message = "RP " + std::to_string(rp) + " of group '" + group +
                   "' applied (replica images hold RP " + std::to_string(store.last_applied_rp()) +
                   ")",
        .fields = {{"base_rp", std::int64_t(store.last_applied_rp())},
                   {"base_before", std::int64_t(base_before)}}});
}

void ReceiverEvents::error(const std::string& group, std::uint64_t rp_id, const std::string& what,
                           const Status& why) {
  emit({.group = group, .kind = "error", .rp = rp_id, .priority = Priority::error,
        .message = "group '" + group + "': " + what + ": " + why.message(),
        .fields = {{"what", what}, {"code", std::string(errc_name(why.code()))},
                   {"cause", why.message()},
                   {"data_lost", std::int64_t(why.data_lost() ? 1 : 0)}}});
}

}  // namespace ferry::site
