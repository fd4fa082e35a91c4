// Test failover and the VM's definition at the recovery site (docs/failover.md):
//   ferry vm-config --store DIR --group G --point N|latest [--vm NAME]
//   ferry failover test --store DIR --group G [--point N|latest] [--uri URI] [--name-suffix S]
//                       [--network-map SRC=DST ...] [--domain-xml FILE]
//   ferry failover test --stop --store DIR --group G [--boot-result ok|failed]
// and what `ferry points` shows of them (the VM config per RP, the tests run on it).
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "ferry/base/status.h"

namespace CLI {
class App;
class Validator;
}  // namespace CLI

namespace ferry::tools {

struct FailoverTestArgs {
  std::string store, group;
  std::string point = "latest";
  std::string uri = "qemu:///system";
  std::string name_suffix = "-test";
  std::vector<std::string> network_map;  // SRC=DST
  std::string domain_xml;                // a definition to use instead of the RP's
  bool stop = false;
  std::string boot_result;  // --stop: ok, failed, or empty (not known)
  std::string vm;           // vm-config --vm: one VM of a group
  std::string boot_order;   // a group's VMs: NAME,NAME,... (default: the RP's boot order)
  unsigned boot_delay_s = 0;  // seconds between starting one VM of a group and the next
};
int cmd_failover_test(const FailoverTestArgs& a);
int cmd_vm_config(const std::string& store, const std::string& group, const std::string& point,
                  const std::string& vm = "");

// Adds "vm_config" ({bytes, sha256, from_rp} or null), "tests" (finished test failovers of
// the RP) and "test_running" to each RP object of `points` (ferry points --json).
void annotate_points_json(const std::string& store, const std::string& group,
                          nlohmann::json& points);
// One line per tested RP and the running test, after ferry points' table.
void print_points_tests(const std::string& store, const std::string& group);

// A group's definition (ferry/cbt/group_doc.h) at the recovery site (group_config.cc):
// one VM's domain XML out of an RP's vm_config (a group document, or a single domain's XML
// when its name is `vm`), and the VMs as `ferry points --json` lists them
// ([{name, boot, disks: [{name, target}]}], [] when the definition cannot be read).
Result<std::string> vm_domain_xml(const std::string& vm_config, const std::string& vm);
nlohmann::json vms_json(const std::string& vm_config);

// One VM to start at the recovery site from an RP.
struct VmPlan {
  std::string xml;  // its domain XML
  std::vector<std::pair<std::string, std::string>> disks;  // (the RP's disk, target dev)
};
// The VMs of an RP in boot order: a group document's (`boot_order` "a,b" overrides the
// RP's; each VM's disks must be in `rp_disks`, unless it is empty: not known yet), or for a plain definition the one VM with
// every disk of the RP, each named by its target (the XML is not read here: the rewrite
// checks it, as for a single VM before groups existed).
Result<std::vector<VmPlan>> plan_vms(const std::string& vm_config,
                                     const std::vector<std::string>& rp_disks,
                                     const std::string& boot_order);

// Registers `vm-config` and `failover test` on `app`; the returned function runs the one
// that was parsed: true and its exit code in `rc`, false when neither was. With `site` holding
// a URL (ferry --site), `failover test` runs through that site's management API.
struct SiteArgs;
std::function<bool(int& rc)> add_failover_commands(CLI::App& app, const CLI::Validator& point_rule,
                                                   const SiteArgs* site = nullptr);

}  // namespace ferry::tools
