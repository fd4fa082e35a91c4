// The cross-VM instant of a protection group: every domain of the group paused (optionally
// its file systems frozen first), each domain's backup job started, then all resumed, so the
// checkpoints of all disks of all VMs name one instant. See docs/change-tracking.md,
// "Protection groups: the cross-VM instant".
//
// The coordinator only sequences; each member is one domain behind the narrow GroupMember
// interface (the libvirt source implements it; the unit test drives a scripted twin that
// fails at any step). Its guarantees, on every path including errors and the timeout:
//   - every member it suspended is resumed, every member it froze is thawed;
//   - every member whose job it started is abandoned unless the whole instant succeeded;
//   - the pause is bounded: a watchdog resumes the members once `max_pause` has passed and
//     the instant fails with Errc::timeout ("pause timeout").
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::cbt {

class GroupMember {
 public:
  virtual ~GroupMember() = default;
  virtual const std::string& member_name() const = 0;  // the domain's name, for messages
  // Freezes the guest's file systems (guest agent). An error is not fatal to the instant:
  // the RP is then crash-consistent only.
  virtual Status freeze() = 0;
  virtual Status thaw() = 0;
  virtual Status suspend() = 0;  // pauses the vCPUs
  virtual Status resume() = 0;   // must be safe to call from another thread (the watchdog)
  // The backup job and its checkpoint, atomically. Called on one thread per member, all at
  // once: members must not share unsynchronised state.
  virtual Status start_job() = 0;
  virtual void abandon_job() = 0;  // ends a started job; the checkpoint is healed later
};

struct InstantOptions {
  bool quiesce = false;
  std::chrono::milliseconds max_pause{5000};
};

struct Instant {
  std::uint64_t pause_us = 0;   // first suspend to last resume
  std::vector<std::uint64_t> start_us;  // per member: how long its start_job() took
  bool app_consistent = false;  // every member's file systems were frozen
};

// Runs the instant over `members` (in order). On success every job is started and every
// member runs again; on error no job is left started and every member runs.
Result<Instant> capture_instant(const std::vector<GroupMember*>& members,
                                const InstantOptions& options);

}  // namespace ferry::cbt
