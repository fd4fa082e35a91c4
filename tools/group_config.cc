// A protection group's definition at the recovery site: one VM out of the group document,
// and the VMs `ferry points --json` lists (failover.h).
#include "failover.h"

#include "ferry/cbt/group_doc.h"

namespace ferry::tools {

Result<std::string> vm_domain_xml(const std::string& vm_config, const std::string& vm) {
  FERRY_ASSIGN_OR_RETURN(cbt::GroupDoc doc, cbt::group_doc_of(vm_config));
  std::string names;
  for (const cbt::GroupVm& v : doc.vms) {
    if (v.name == vm) return v.domain_xml;
    names += (names.empty() ? "" : ", ") + v.name;
  }
  return Status::error(Errc::not_found, "no VM named '" + vm + "' (the RP's VMs: " + names + ")");
}

nlohmann::json vms_json(const std::string& vm_config) {
  nlohmann::json out = nlohmann::json::array();
  auto doc = cbt::group_doc_of(vm_config);
  if (!doc.is_ok()) return out;
  for (const cbt::GroupVm& v : doc->vms) {
    nlohmann::json disks = nlohmann::json::array();
    for (const cbt::GroupDisk& d : v.disks) disks.push_back({{"name", d.name}, {"target", d.target}});
    std::size_t boot = 0;
    while (boot < doc->boot_order.size() && doc->boot_order[boot] != v.name) ++boot;
    out.push_back({{"name", v.name}, {"boot", boot + 1}, {"disks", disks}});
  }
  return out;
}

}  // namespace ferry::tools
