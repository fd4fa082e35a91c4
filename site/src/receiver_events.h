// The receiver's events (events/event_log.h): one log per group in <store>/<group>/events/,
// opened on first use. The receiver calls these at its steps; none of them can fail an RP.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/events/event_log.h"
#include "ferry/site/rp.h"

namespace ferry::site {

class GroupStore;

class ReceiverEvents {
 public:
  ReceiverEvents(std::string store_root, std::uint64_t max_file_bytes)
      : root_(std::move(store_root)),
        max_file_bytes_(max_file_bytes ? max_file_bytes : events::kDefaultMaxFileBytes) {}

  void rp_started(const std::string& group, const RpBeginInfo& rp, const std::string& peer);
  void rp_refused(const std::string& group, std::uint64_t rp_id, const Status& why);
  void rp_committed(const std::string& group, const RpInfo& rp, std::uint64_t frames,
                    std::uint64_t logical_bytes, double seconds, bool acked);
  // The RP ids offered before an apply; after it, rp_applied and one rp_pruned per RP gone.
  static std::vector<std::uint64_t> point_ids(const GroupStore& store);
  void applied(const std::string& group, const std::vector<std::uint64_t>& before,
               std::uint64_t base_before, const GroupStore& store, const Status& apply);
  // `what` says what failed ("recovery at start-up failed"); `why` is the cause.
  void error(const std::string& group, std::uint64_t rp_id, const std::string& what,
             const Status& why);
  void emit(events::Event e);

 private:
  events::EventLog* log_for(const std::string& group);

  std::string root_;
  std::uint64_t max_file_bytes_;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<events::EventLog>> logs_;
};

}  // namespace ferry::site
