// Change tracking: what changed on each disk of a group since the last acknowledged RP, and a
// point-in-time view to read it from.
//
// One ChangeSource per group. capture() atomically, for every disk of the group at the same
// instant, starts recording changes for the next RP and freezes the record of changes since
// `base_rp`; it returns one DiskView per disk, readable over NBD while the guest goes on
// writing. finish() ends the capture: acknowledged=true drops what is no longer needed;
// acknowledged=false keeps what either outcome needs (the receiver may have committed the RP
// and only the ack was lost): the next capture continues from whichever RP the receiver holds
// and no dirty bit is ever lost (QEMU's successor/reclaim model, docs/interop/bitmaps.rst).
//
// The QMP implementation (qmp_source.h) drives QEMU or qemu-storage-daemon; the libvirt one
// (a later issue) will implement the same interface, so the engine never knows which it reads.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/base/status.h"

namespace ferry::cbt {

// Why a disk is read in full rather than incrementally; reported to the user.
enum class FullReason : std::uint8_t {
  none = 0,             // incremental
  first_rp,             // the receiver has no RP for the group
  no_bitmap,            // no Ferry bitmap for base_rp on the node (new QEMU instance, ...)
  bitmap_inconsistent,  // QEMU reports the bitmap inconsistent (QEMU was killed)
  bitmap_busy,          // the bitmap is in use by someone else
  new_disk,             // the receiver does not hold this disk
  no_checkpoint,        // the disk cannot carry a bitmap/checkpoint (raw format)
  new_identity,         // the receiver holds this name as another disk (swapped, replaced)
};
const char* full_reason_name(FullReason r);

struct DiskView {
  std::string name;             // the disk's name in the group
  std::string node;             // the QEMU block node
  std::uint64_t size_bytes = 0;
  std::uint32_t granularity_bytes = 0;  // bitmap granularity (64 KiB by default)
  FullReason full_reason = FullReason::none;  // none: read only dirty_context's extents
  // Where to read the point-in-time view: an NBD server on a unix socket.
  std::string nbd_socket;
  std::string export_name;
  std::string dirty_context;  // "qemu:dirty-bitmap:<name>" when incremental, else empty
  // The disk's identity (zero: the source keeps none). It travels with the disk, not with
  // its name: QMP keeps it in a tag bitmap on the node (docs/change-tracking.md).
  Hash128 identity;
  bool identity_ephemeral = false;  // dies with the QEMU process (a raw disk's tag)
};

struct Capture {
  std::uint64_t base_rp = 0;
  std::uint64_t rp_id = 0;
  std::uint64_t created_unix_ns = 0;
  std::vector<DiskView> disks;
  bool app_consistent = false;  // file systems were frozen through the guest agent
  // A group of several VMs pauses them all for the cross-VM instant: how long (first pause to
  // last resume). vms_paused false: nothing was paused (one VM, QMP).
  bool vms_paused = false;
  std::uint64_t pause_us = 0;
  // The VM's definition (libvirt domain XML, no secrets) when it changed since the last
  // acknowledged RP of this source object, so always with its first; empty: unchanged, or
  // a source that has none (QMP).
  std::string vm_config;
  // Implementation-private state needed by finish().
  std::shared_ptr<void> state;
};

class ChangeSource {
 public:
  virtual ~ChangeSource() = default;
  // The disks of the group, in group order (capture() returns views in this order).
  virtual std::vector<std::string> disk_names() const = 0;
  // base_rp: the receiver's last committed RP (0: none). rp_id: the new RP, > base_rp.
  // receiver_disks: names of the disks the receiver already holds at base_rp (others are
  // read in full with FullReason::new_disk).
  virtual Result<Capture> capture(std::uint64_t base_rp, std::uint64_t rp_id,
                                  const std::vector<std::string>& receiver_disks) = 0;
  // Tears down the point-in-time views (NBD exports, fleecing jobs, scratch overlays) once
  // everything was read, so the guest stops paying for copy-before-write while the source
  // waits for the acknowledgement. Idempotent; finish() calls it if it was not called.
  // An error with data_lost() set means the view stopped being point-in-time before it was
  // released (QEMU's copy-before-write job ended early): the RP must not be committed.
  virtual Status release_views(Capture& capture) = 0;
  // Must be called exactly once per successful capture().
  virtual Status finish(Capture& capture, bool acknowledged) = 0;
};

}  // namespace ferry::cbt
