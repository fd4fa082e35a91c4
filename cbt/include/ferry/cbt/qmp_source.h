// ChangeSource for a QEMU process or qemu-storage-daemon reached over its QMP unix socket.
//
// Bitmaps: for group G, Ferry keeps one dirty bitmap per disk named "ferry.G.<rp>", where
// <rp> is the RP at whose capture it started recording. Persistent when the node's format
// supports it (qcow2). capture(base, new) — in one QMP transaction — adds "ferry.G.<new>",
// disables "ferry.G.<base>" and starts a fleecing view of every disk; the view is exported
// over NBD with "ferry.G.<base>". finish(ack) removes "ferry.G.<base>" (ack) or keeps both
// (no ack: the receiver may have committed either RP); the next capture merges "ferry.G.<new>"
// into "ferry.G.<base>" or drops the base, by the receiver's answer (healing.h).
// Leftovers of a source killed mid-RP are healed at the next capture (see qmp_source.cc).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "ferry/cbt/source.h"

namespace ferry::cbt {

struct QmpDisk {
  std::string node;  // QEMU block node name
  std::string name;  // name in the group
};

struct QmpSourceOptions {
  std::string qmp_socket;
  std::string group;
  std::vector<QmpDisk> disks;
  // An NBD server that already runs in the QEMU process (unix socket path); when empty,
  // Ferry starts one on a socket of its own under work_dir.
  std::string nbd_socket;
  std::string work_dir;  // scratch overlays and sockets; created if missing
  std::chrono::milliseconds qmp_timeout{30000};
};

Result<std::unique_ptr<ChangeSource>> open_qmp_source(const QmpSourceOptions& options);

}  // namespace ferry::cbt
