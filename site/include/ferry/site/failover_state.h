// The durable failover state of a group (docs/failover.md, "Failover"): a small marker file
// <store>/<group>/failed-over that `ferry failover` writes first, before it touches anything,
// and that every writer of the group honours:
//   - the receiver refuses hello and rp_begin for the group with failover_refusal()'s text
//     (and drops the group's store, so the CLI can take the group lock);
//   - GroupStore turns retention off (no compaction, no pruning, no journal rewrite): the
//     replica images are the backing files of the running VM's overlays and must never be
//     written again while the group is failed over.
// Its absence means "protecting". `ferry failback` (tools/failback.cc) is what removes it.
//
// Format: text, one `key=value` per line, at most kMaxFailoverStateBytes:
//   ferry-failover=1
//   rp=<RP id the group failed over at; 0 while `latest` is being resolved under the lock>
//   since_unix_ns=<when the failover began>
//   domain=<the domain it starts, may be empty until known>
// Written as tmp + fsync + rename + fsync of the group directory, so a crash leaves the old
// file or the new one.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "ferry/base/status.h"

namespace ferry::site {

inline constexpr const char* kFailoverStateFile = "failed-over";
inline constexpr std::size_t kMaxFailoverStateBytes = 4096;

struct FailoverState {
  std::uint64_t rp_id = 0;
  std::uint64_t since_unix_ns = 0;
  std::string domain;
};

// The marker of <root>/<group>, if any. A marker that cannot be parsed still means "failed
// over" (fail safe): it comes back with rp_id 0 and the parse error is not an error here.
// Errors: only a failed read other than ENOENT.
Result<std::optional<FailoverState>> read_failover_state(const std::string& group_dir);
// Writes it durably (see above). group_dir must exist.
Status write_failover_state(const std::string& group_dir, const FailoverState& s);
// True when the marker exists (one stat; an error reading counts as present: fail safe).
bool failed_over(const std::string& group_dir);
// "group 'web' was failed over at RP 12 on 2026-12-08T00:31Z (ferry failover); it accepts no
// RPs until failback"
std::string failover_refusal(const std::string& group, const FailoverState& s);
// The refusal for the group in <group_dir>, or nullopt when it is not failed over.
std::optional<std::string> failover_refusal_for(const std::string& group_dir,
                                                const std::string& group);

}  // namespace ferry::site
