// Named kill points for crash tests (see ../shared/RELIABILITY.md).
//
// FERRY_KILL_POINT("journal.after_commit") kills the process with SIGKILL when the build has
// fault points (meson option fault_points, on unless buildtype=release) and the environment
// says FERRY_KILL_AT=<name> (optionally FERRY_KILL_AT=<name>:<n> to fire on the n-th hit,
// counting from 1). Names are checked at compile time against the list below, so crash tests
// can enumerate every point with `ferry debug kill-points`.
#pragma once

#include <array>
#include <string_view>

namespace ferry {

inline constexpr std::array<std::string_view, 49> kKillPoints = {
    // receiver, in the order one RP passes them
    "receiver.frame_received",
    "journal.before_append",
    "journal.after_append",
    "journal.before_fdatasync",
    "journal.after_fdatasync",
    "journal.before_commit_record",
    "journal.after_commit_record",
    "journal.after_commit_sync",
    "receiver.before_ack",
    "receiver.after_ack",
    "apply.before_write",
    "apply.mid_write",
    "apply.before_fsync",
    "apply.after_fsync",
    "state.before_rename",
    "state.after_rename",
    "journal.before_truncate",
    "journal.after_truncate",
    // retention: the decision written, the new base written, old segments being removed
    // (compaction between them passes apply.*); a version 1 store migrated
    "prune.after_intent",
    "prune.after_base",
    "prune.mid_remove",
    "migrate.after_state",
    // tiered retention's journal rewrite: the first kept RP copied, the new generation
    // written and synced, the state naming it written
    "rewrite.mid_write",
    "rewrite.before_switch",
    "rewrite.after_switch",
    // ferry failover (docs/failover.md): the marker written, the compaction's intent
    // written (then apply.* and prune.after_base), the images at the RP, an overlay made,
    // the record saying it is defining, the domain defined, started
    "failover.after_marker",
    "failover.after_intent",
    "failover.after_compact",
    "failover.after_overlay",
    "failover.before_define",
    "failover.after_define",
    "failover.after_start",
    // ferry seed: the group built in its temporary directory, before the rename publishes it
    "seed.before_publish",
    // ferry failback at the recovery site (docs/failover.md, "Failback"): the record
    // written, the VM shut down, its final RP acknowledged by the main site, the overlays
    // committed into the replica images, the reset state about to be / written, the domain
    // undefined, the failover marker removed
    "failback.after_record",
    "failback.after_shutdown",
    "failback.after_final_rp",
    "failback.after_commit",
    "failback.before_reset_state",
    "failback.after_reset_state",
    "failback.after_undefine",
    "failback.after_marker_removed",
    // ferry failback --complete at the main site: the record written, the disks written,
    // the stale change tracking dropped, the domain started
    "failback.complete_after_record",
    "failback.complete_after_write",
    "failback.complete_after_invalidate",
    "failback.complete_after_start",
    // source
    "source.after_transaction",
    "source.mid_send",
    "source.before_bitmap_cleanup",
    "source.after_bitmap_cleanup",
};

constexpr bool kill_point_known(std::string_view name) {
  for (auto k : kKillPoints)
    if (k == name) return true;
  return false;
}

// Fires the point if armed (see above). Cheap when not armed: one relaxed load.
void kill_point_hit(std::string_view name);

}  // namespace ferry

#if defined(FERRY_FAULT_POINTS)
#define FERRY_KILL_POINT(name)                                                  \
  do {                                                                          \
    static_assert(::ferry::kill_point_known(name), "unknown kill point " name); \
    ::ferry::kill_point_hit(name);                                              \
  } while (0)
#else
#define FERRY_KILL_POINT(name)                                                  \
  do {                                                                          \
    static_assert(::ferry::kill_point_known(name), "unknown kill point " name); \
  } while (0)
#endif
