// ChangeSource for a running libvirt domain: checkpoints plus pull-mode backups over NBD.
//
// Per RP: virDomainBackupBegin in pull mode with <incremental> = the checkpoint of the last
// acknowledged RP and a new checkpoint created atomically with the job, exported over NBD on
// a unix socket (scratch files under work_dir); the engine reads dirty extents and data with
// libnbd exactly as for the QMP source; release_views() ends the job (virDomainAbortJob).
// finish(ack) drops checkpoints that are no longer needed; without an ack the new checkpoint
// stays and the next RP is incremental from it (the receiver committed it, only the ack was
// lost) or from the last acknowledged checkpoint (it was not committed).
//
// Ferry owns the truth about change tracking: a ledger under work_dir records, per disk, the
// last acknowledged RP and its checkpoint; each capture reconciles it with libvirt's
// checkpoint list and QEMU's bitmaps and heals (redefine lost checkpoint metadata) or falls
// back to a full read with a named FullReason (the engine then runs a hash-compare resync
// when the receiver already holds the disk). See docs/change-tracking.md.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "ferry/cbt/source.h"

namespace ferry::cbt {

struct LibvirtSourceOptions {
  std::string uri = "qemu:///system";
  std::string domain;    // name or UUID
  std::string group;     // group name (the caller defaults it to the domain name)
  std::string work_dir;  // ledger, scratch files, NBD socket; created if missing
  bool quiesce = false;  // freeze file systems through the guest agent around backup begin
  std::chrono::milliseconds freeze_timeout{10000};  // longest a guest stays frozen
};

Result<std::unique_ptr<ChangeSource>> open_libvirt_source(const LibvirtSourceOptions& options);

// A protection group of one or more running domains captured at one instant per RP: every
// domain is paused (file systems frozen first with quiesce), each domain's backup job and
// checkpoint started, then all resumed (group_capture.h; docs/change-tracking.md). Each
// domain keeps its own change tracking (ledger under work_dir/<domain>, checkpoints
// "ferry.<group>.<rp>"). Disks are named "<domain>.<target>" and the RP carries the group
// document (ferry/cbt/group_doc.h). With one domain this is open_libvirt_source(): today's
// disk names, work_dir and plain domain XML, no pause.
struct LibvirtGroupOptions {
  std::string uri = "qemu:///system";
  std::vector<std::string> domains;     // names, in disk order
  std::vector<std::string> boot_order;  // empty: the order of `domains`
  // The group's name of each domain (same order; empty: the domain names): the prefix of its
  // disk names and its <vm name> in the group document. A failed-over domain `db-dr` sends
  // home as the group's `db` (docs/failover.md, "Failback of a protection group").
  std::vector<std::string> vm_names;
  std::string group;                    // required with several domains
  std::string work_dir;
  bool quiesce = false;
  std::chrono::milliseconds freeze_timeout{10000};
  // Longest the domains stay paused: then they are resumed and the RP fails ("pause timeout").
  std::chrono::milliseconds max_pause{5000};
};

Result<std::unique_ptr<ChangeSource>> open_libvirt_group_source(const LibvirtGroupOptions& options);

}  // namespace ferry::cbt
