// The receiver: serves sources over the wire protocol and keeps one GroupStore per group.
//
// Per connection: hello -> hello_reply (the group's last committed RP) -> for each RP:
// rp_begin (checked against the store: C5) -> data frames, each checked (identity, sequence,
// bounds, decoded size, xxh3-128: C3) before it reaches the journal -> rp_end (totals checked)
// -> commit (durable) -> rp_ack -> apply to the replica. Any bad frame aborts the open RP,
// sends an error naming the problem and closes that connection; the receiver keeps serving.
//
// Before an RP is journalled, each of its disks must fit the store (rp_begin): the store's
// file system must hold a file of the disk's size, and the disk must be within
// max_disk_bytes; otherwise the RP is refused, naming the disk, its size, the limit and the
// fix. Once acknowledged, an RP must be applicable, or the group is wedged.
//
// A store failure (an RP that could not be written or committed, a journal that cannot be
// recovered at start-up) marks the group failing: its store is dropped and re-opened
// (recovery: torn tail cut, committed RPs re-applied) by the next session or by a
// background thread, whichever comes first, at most once per back-off period (after a failed
// open or apply: reopen_min, doubling per failed attempt up to reopen_max; after a failed RP
// on an open store: 20 times the last open's duration, up to reopen_max), so no failure
// leaves a group refusing RPs until the receiver restarts, and a hostile or broken peer
// cannot make it re-scan journals in a loop. A failed apply (after the acknowledgement, or at open) is not a store failure:
// the group stays open, accepts and commits RPs, and the apply is retried by the first
// commit or background pass after the same back-off; a commit during it does not retry
// (each retry rewrites the whole replica, R19). status() shows each group's
// state.
//
// Authorisation (docs/security.md): with ReceiverOptions::authorize set, the peer's right to
// the group is checked right after its first frame is decoded (hello: write; points_request:
// manage) and before any slot, directory or journal byte of the group exists; a refusal is a
// hello_reply (or points_reply) with WireStatus::forbidden and a message naming the identity
// and the group, logged at warning. A group's quota (quota_for) is checked at rp_begin, before
// anything of the RP is journalled: its store's bytes (images + journal, allocated) plus the
// RP's bound (the sum of its disks' sizes) must not pass the quota, else the RP is refused
// with no_space naming the group, its usage and its quota.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/site/store.h"
#include "ferry/transport/connection.h"

namespace ferry::site {

enum class AccessRight : std::uint8_t { write = 0, manage = 1 };
const char* access_right_name(AccessRight r);  // "write" / "manage"

// One committed RP as the receiver saw it: its own stages (explainable RPO).
struct RpReceived {
  std::string group;
  std::uint64_t rp_id = 0;
  std::uint64_t frames = 0;
  std::uint64_t logical_bytes = 0;  // the disks' bytes the RP carries (data and zero)
  std::uint64_t wire_bytes = 0;     // frame bytes read for it, rp_begin to rp_end
  double receive_seconds = 0;       // rp_begin until rp_end arrived
  double durable_seconds = 0;       // rp_end until the commit was durable
  double ack_seconds = 0;           // the acknowledgement sent and flushed
  double apply_seconds = 0;         // the apply/retention pass after it
  bool acknowledged = false;        // the acknowledgement's flush succeeded
  std::optional<transport::SourceTimes> source_times;  // from rp_end (feature rp_times)
};

struct ReceiverOptions {
  StoreOptions store;  // store.root is the --store directory
  // How long a new session for a group waits while another session holds it.
  std::chrono::milliseconds group_wait{30000};
  // How long a session waits for the next frame before giving up on the peer.
  std::chrono::milliseconds idle_timeout{300000};
  // The largest disk this receiver accepts (ferry receive --max-disk-bytes); 0: no maximum
  // besides what the store's file system can hold.
  std::uint64_t max_disk_bytes = 0;
  // Re-opening a group after a failed open or apply: no sooner than reopen_min after the
  // failure, doubling per failed attempt in a row, up to reopen_max. After a failed RP the
  // wait is 20 times the last open's duration, also capped at reopen_max.
  std::chrono::milliseconds reopen_min{1000};
  std::chrono::milliseconds reopen_max{30000};
  // Retention per group (ferry receive: receive.toml over the --keep-* flags); null: every
  // group uses store.retention. Called with the receiver's lock held: keep it cheap.
  std::function<RetentionPolicy(const std::string& group)> retention_for;
  // May this peer (its verified identity; null on a plaintext connection) have `right` on
  // `group`? ok, or the refusal, whose message names the identity and the group (it is sent
  // to the peer). Null: no authorisation (plaintext mode, docs/security.md). Called on the
  // connection's thread, without the receiver's lock; a reload swaps what it reads.
  std::function<Status(const transport::PeerIdentity* peer, const std::string& group,
                       AccessRight right)>
      authorize;
  // The group's quota in bytes (images + journal); 0 or null: none. Called at each rp_begin.
  std::function<std::uint64_t(const std::string& group)> quota_for;
  // Monitoring (ferry receive --metrics): called on the session's thread after each RP is
  // committed, and after each refused RP with the reason. Null: nothing. Keep them cheap.
  std::function<void(const RpReceived&)> on_rp_committed;
  std::function<void(const std::string& group, const Status& why)> on_rp_refused;
  // Test-only: shifts the clock the probe reports (`ferry doctor`'s clock check), set by
  // `ferry receive` from FERRY_TEST_CLOCK_OFFSET_MS. Nothing else reads it.
  std::int64_t test_clock_offset_ms = 0;
  // Each of a group's two event log files (<store>/<group>/events/); 0: the default.
  std::uint64_t event_log_bytes = 0;
};

// The bytes a group's store takes on disk (allocated blocks of its images and journal),
// counting at most kMaxUsageEntries files. Read-only; for quotas.
inline constexpr std::size_t kMaxUsageEntries = 1u << 20;
Result<std::uint64_t> group_usage_bytes(const std::string& root, const std::string& group);

enum class GroupState : std::uint8_t {
  ok = 0,
  failing = 1,        // a store failure episode is open: RPs are refused until it ends
  // A compaction of the replica images failed and is retried (R19; RPs are still accepted):
  // the cause says why.
  apply_pending = 2,
  // `ferry failover` ran (failover_state.h): RPs are refused until failback; the cause says
  // at which RP and when.
  failed_over = 3,
};
const char* group_state_name(GroupState s);

// What the receiver knows of one group, for status and monitoring.
struct GroupStatus {
  std::string group;
  GroupState state = GroupState::ok;
  std::uint64_t last_committed_rp = 0;  // as last seen by the receiver (0: none)
  std::uint64_t last_applied_rp = 0;    // the RP the replica images hold: the oldest kept
  std::uint64_t last_commit_unix_ns = 0;  // when this receiver last committed an RP of it
  std::string source;                     // the peer serving the group now; empty: none
  // The failure episode (state failing) or the apply episode (state apply_pending after a
  // failed apply), else empty/0: its first cause, when it began, the failed attempts
  // (refused RPs and re-opens; or applies), and when the store is re-opened or the apply
  // retried next (0: now, or when the next source connects).
  std::string cause;
  std::string last_error;  // the latest failure of the episode (the cause may have changed)
  std::uint64_t failing_since_unix_ns = 0;
  std::uint64_t failed_attempts = 0;
  std::uint64_t next_reopen_in_ms = 0;
};

class Receiver {
 public:
  static Result<std::unique_ptr<Receiver>> create(const ReceiverOptions& options);
  ~Receiver();
  // Serves one connection until it ends; called on the connection's own thread.
  void serve(transport::Connection& conn);
  // Every group the receiver knows (those found in the store at start-up and those served
  // since), sorted by name. Thread-safe; never waits for a session.
  std::vector<GroupStatus> status() const;
  // A configuration reload (SIGHUP): each group takes the new policy before its next
  // retention pass (after its next commit, or the background pass). Thread-safe.
  void set_retention(std::function<RetentionPolicy(const std::string& group)> retention_for);

  struct Impl;  // defined in receiver.cc

 private:
  explicit Receiver(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::site
