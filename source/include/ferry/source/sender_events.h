// take_recovery_point with the source's events (events/event_log.h): rp_started, bitmap_lost
// (per disk whose change tracking was lost: read in full or resynced), rp_committed,
// bitmap_healed (the first RP committed after a loss: tracking holds again), or error with
// the cause. A null log: none.
#pragma once

#include "ferry/events/event_log.h"
#include "ferry/source/sender.h"

namespace ferry::source {

Result<RpStats> take_recovery_point_with_events(cbt::ChangeSource& source,
                                                const SenderOptions& options,
                                                events::EventLog* log);

// The source's log for a group: <state_dir>/<group>/events, files of at most max_file_bytes;
// null (logged) when it cannot open.
std::unique_ptr<events::EventLog> open_source_events(
    const std::string& state_dir, const std::string& group,
    std::uint64_t max_file_bytes = events::kDefaultMaxFileBytes);

}  // namespace ferry::source
