// The definition of a protection group of several VMs, as it travels with an RP in the
// rp_begin vm_config field (docs/failover.md, "Protection groups"): a small XML document
// that wraps each VM's libvirt domain XML with the group's disks of that VM and the boot
// order. A group of one VM sends its domain XML alone, as before groups existed.
//
//   <ferry-group version='1' group='app'>
//     <boot-order><vm name='db'/><vm name='web'/></boot-order>
//     <vm name='web'>
//       <disk name='web.vda' target='vda'/>
//       <domain type='kvm'>...</domain>
//     </vm>
//     <vm name='db'>...</vm>
//   </ferry-group>
//
// <vm> elements come in the group's disk order (the order of `--domain`); <boot-order>
// lists every VM exactly once. A reader refuses any other version with a clear error.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::cbt {

inline constexpr unsigned kGroupDocVersion = 1;
inline constexpr std::size_t kMaxGroupVms = 32;

struct GroupDisk {
  std::string name;    // the disk's name in the group (the store's name): "<vm>.<target>"
  std::string target;  // the target dev in the VM's domain XML: "vda"
  bool operator==(const GroupDisk&) const = default;
};

struct GroupVm {
  std::string name;  // the libvirt domain's name at the source
  std::vector<GroupDisk> disks;
  std::string domain_xml;  // <domain>...</domain>, no XML declaration
};

struct GroupDoc {
  std::string group;
  std::vector<GroupVm> vms;              // in disk order
  std::vector<std::string> boot_order;   // VM names, each once
};

// True when a vm_config is a group document (else it is one domain's XML, or empty).
bool is_group_doc(std::string_view vm_config);
// The document's text. Asserts the document is valid (check_group_doc).
std::string group_doc_text(const GroupDoc& doc);
// Parses and checks; errors name what is wrong (Errc::protocol for a malformed document,
// Errc::unsupported for another version).
Result<GroupDoc> parse_group_doc(const std::string& text);
// Names unique and non-empty, boot order a permutation of the VMs, a domain XML per VM.
Status check_group_doc(const GroupDoc& doc);
// Any RP's VM definition as a group document: a group document parsed, or a single domain's
// XML as a group of one VM (its <name>, its writable disks named by target, as a one-VM group
// names them). Errors as parse_group_doc, or for a domain XML without a name.
Result<GroupDoc> group_doc_of(const std::string& vm_config);
// The VMs in boot order (pointers into doc.vms).
std::vector<const GroupVm*> vms_in_boot_order(const GroupDoc& doc);

// "<domain>.<target>": the store name of a disk of a multi-VM group.
std::string group_disk_name(const std::string& vm, const std::string& target);

}  // namespace ferry::cbt
