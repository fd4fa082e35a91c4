// What `ferry doctor` asks of a libvirt domain, read-only (nothing is healed or changed):
// libvirtd reachable; each disk able to carry a checkpoint (qcow2); Ferry's checkpoints of
// the group and the disks' bitmaps consistent (docs/change-tracking.md, L3 and L4: what the
// next capture would heal or read in full); QEMU's NBD server usable for a pull backup.
#pragma once

#include <string>
#include <vector>

namespace ferry::cbt {

struct LibvirtFinding {
  std::string check;  // "libvirt", "disk-format", "checkpoints", "nbd"
  bool ok = true;
  bool skipped = false;
  std::string detail;
  std::string fix;  // empty when ok
};

std::vector<LibvirtFinding> diagnose_libvirt(const std::string& uri, const std::string& domain,
                                             const std::string& group);

}  // namespace ferry::cbt
