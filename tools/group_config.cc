// A protection group's definition at the recovery site: one VM out of the group document,
// and the VMs `ferry points --json` lists (failover.h).
#include "failover.h"

#include <set>
#include <sstream>

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

Result<std::vector<VmPlan>> plan_vms(const std::string& vm_config,
                                     const std::vector<std::string>& rp_disks,
                                     const std::string& boot_order) {
  std::vector<VmPlan> out;
  if (!cbt::is_group_doc(vm_config)) {
    if (!boot_order.empty() && boot_order.find(',') != std::string::npos)
      return Status::error(Errc::invalid_argument,
                           "--boot-order names several VMs, but the RP holds one VM");
    VmPlan one;
    one.xml = vm_config;
    for (const std::string& d : rp_disks) one.disks.emplace_back(d, d);
    out.push_back(std::move(one));
    return out;
  }
  FERRY_ASSIGN_OR_RETURN(cbt::GroupDoc doc, cbt::parse_group_doc(vm_config));
  if (!boot_order.empty()) {
    doc.boot_order.clear();
    std::stringstream in(boot_order);
    for (std::string n; std::getline(in, n, ',');) doc.boot_order.push_back(n);
    if (Status s = cbt::check_group_doc(doc); !s.is_ok())
      return Status::error(Errc::invalid_argument, "--boot-order " + boot_order + ": " + s.message());
  }
  const std::set<std::string> held(rp_disks.begin(), rp_disks.end());
  for (const cbt::GroupVm* vm : cbt::vms_in_boot_order(doc)) {
    VmPlan plan;
    plan.xml = vm->domain_xml;
    for (const cbt::GroupDisk& d : vm->disks) {
      if (!rp_disks.empty() && !held.count(d.name))
        return Status::error(Errc::not_found, "VM " + vm->name + ": the RP holds no disk " + d.name);
      plan.disks.emplace_back(d.name, d.target);
    }
    out.push_back(std::move(plan));
  }
  return out;
}

}  // namespace ferry::tools
