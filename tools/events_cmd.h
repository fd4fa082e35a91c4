// The event log's and the health checks' commands (docs/operations.md):
//   ferry events --group G [--since T] [--json] [--store DIR | --work-dir DIR]
//   ferry doctor [--domain D | --group G] [--json] [...]
#pragma once

#include <functional>
#include <string>

#include "ferry/events/event_log.h"

namespace CLI {
class App;
}  // namespace CLI

namespace ferry::site {
struct PruneReport;
}  // namespace ferry::site

namespace ferry::tools {

// Registers `events` and `doctor` on `app`; the returned function runs the one that was
// parsed: true and its exit code in `rc`, false when neither was.
std::function<bool(int& rc)> add_events_commands(CLI::App& app);

// For the receive-side tools that act on a group without the receiver (prune, export,
// failover): appends one event to the group's log in the store; never fails the caller.
void emit_store_event(const std::string& store, events::Event e);
// `ferry prune`: one rp_pruned per RP it removed.
void emit_prune_events(const std::string& store, const std::string& group,
                       const site::PruneReport& report);

}  // namespace ferry::tools
