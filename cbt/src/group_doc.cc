// The group document (group_doc.h): written by the group source, read by the recovery site.
#include "ferry/cbt/group_doc.h"

#include <set>

#include <fmt/format.h>

#include "libvirt_api.h"

namespace ferry::cbt {
namespace {

constexpr std::string_view kRoot = "<ferry-group";

std::string strip_declaration(const std::string& xml) {
  std::size_t start = xml.find_first_not_of(" \t\r\n");
  if (start == std::string::npos) return "";
  if (xml.compare(start, 5, "<?xml") == 0) {
    std::size_t end = xml.find("?>", start);
    if (end == std::string::npos) return xml;
    start = xml.find_first_not_of(" \t\r\n", end + 2);
    if (start == std::string::npos) return "";
  }
  return xml.substr(start);
}

// An attribute value: XML-escaped, and the whitespace a parser would normalise to a space
// (a newline, a tab) as character references, so a value reads back exactly.
std::string attr(const std::string& v) {
  std::string out;
  for (char c : lv::xml_escape(v)) {
    if (c == '\n') out += "&#10;";
    else if (c == '\r') out += "&#13;";
    else if (c == '\t') out += "&#9;";
    else out += c;
  }
  return out;
}

Status bad(const std::string& what) {
  return Status::error(Errc::protocol, "group document: " + what);
}

}  // namespace

bool is_group_doc(std::string_view vm_config) {
  std::size_t start = vm_config.find_first_not_of(" \t\r\n");
  if (start != std::string_view::npos && vm_config.compare(start, 5, "<?xml") == 0) {
    std::size_t end = vm_config.find("?>", start);
    start = end == std::string_view::npos ? end : vm_config.find_first_not_of(" \t\r\n", end + 2);
  }
  return start != std::string_view::npos && vm_config.compare(start, kRoot.size(), kRoot) == 0;
}

std::string group_disk_name(const std::string& vm, const std::string& target) {
  return vm + "." + target;
}

Status check_group_doc(const GroupDoc& doc) {
  if (doc.vms.empty()) return bad("no <vm>");
  if (doc.vms.size() > kMaxGroupVms)
    return bad(fmt::format("{} VMs, more than {}", doc.vms.size(), kMaxGroupVms));
  std::set<std::string> names, disks;
  for (const GroupVm& vm : doc.vms) {
    if (vm.name.empty()) return bad("a <vm> without a name");
    if (!names.insert(vm.name).second) return bad("VM '" + vm.name + "' is listed twice");
    if (strip_declaration(vm.domain_xml).rfind("<domain", 0) != 0)
      return bad("VM '" + vm.name + "' has no <domain> definition");
    for (const GroupDisk& d : vm.disks) {
      if (d.name.empty() || d.target.empty())
        return bad("VM '" + vm.name + "' has a disk without a name or target");
      if (!disks.insert(d.name).second) return bad("disk '" + d.name + "' is listed twice");
    }
  }
  std::set<std::string> booted;
  for (const std::string& n : doc.boot_order) {
    if (!names.count(n)) return bad("boot order names '" + n + "', which is not a VM of the group");
    if (!booted.insert(n).second) return bad("boot order names '" + n + "' twice");
  }
  if (booted.size() != names.size()) return bad("the boot order does not name every VM");
  return Status::ok();
}

std::string group_doc_text(const GroupDoc& doc) {
  FERRY_ASSERT_MSG(check_group_doc(doc).is_ok(), "an invalid group document");
  std::string out = fmt::format("<ferry-group version='{}' group='{}'>\n  <boot-order>",
                                kGroupDocVersion, attr(doc.group));
  for (const std::string& n : doc.boot_order) out += "<vm name='" + attr(n) + "'/>";
  out += "</boot-order>\n";
  for (const GroupVm& vm : doc.vms) {
    out += "  <vm name='" + attr(vm.name) + "'>\n";
    for (const GroupDisk& d : vm.disks)
      out += fmt::format("    <disk name='{}' target='{}'/>\n", attr(d.name), attr(d.target));
    std::string xml = strip_declaration(vm.domain_xml);
    while (!xml.empty() && (xml.back() == '\n' || xml.back() == ' ')) xml.pop_back();
    out += xml + "\n  </vm>\n";
  }
  return out + "</ferry-group>\n";
}

Result<GroupDoc> parse_group_doc(const std::string& text) {
  if (!is_group_doc(text)) return bad("not a <ferry-group> document");
  FERRY_ASSIGN_OR_RETURN(lv::XmlDoc x, lv::XmlDoc::parse(text, "group document"));
  const std::string version = x.text("/ferry-group/@version").value_or("");
  if (version != std::to_string(kGroupDocVersion))
    return Status::error(Errc::unsupported,
                         fmt::format("group document version '{}': this Ferry reads version {}",
                                     version, kGroupDocVersion));
  GroupDoc doc;
  doc.group = x.text("/ferry-group/@group").value_or("");
  auto vms = x.nodes("/ferry-group/vm");
  if (vms.size() > kMaxGroupVms)
    return bad(fmt::format("{} VMs, more than {}", vms.size(), kMaxGroupVms));
  for (xmlNodePtr n : vms) {
    GroupVm vm;
    vm.name = x.text("@name", n).value_or("");
    for (xmlNodePtr d : x.nodes("disk", n))
      vm.disks.push_back({x.text("@name", d).value_or(""), x.text("@target", d).value_or("")});
    auto domains = x.nodes("domain", n);
    if (domains.size() != 1)
      return bad(fmt::format("VM '{}' has {} <domain> elements, not one", vm.name, domains.size()));
    vm.domain_xml = x.dump(domains.front()) + "\n";
    doc.vms.push_back(std::move(vm));
  }
  for (xmlNodePtr n : x.nodes("/ferry-group/boot-order/vm"))
    doc.boot_order.push_back(x.text("@name", n).value_or(""));
  FERRY_TRY(check_group_doc(doc));
  return doc;
}

Result<GroupDoc> group_doc_of(const std::string& vm_config) {
  if (is_group_doc(vm_config)) return parse_group_doc(vm_config);
  FERRY_ASSIGN_OR_RETURN(lv::XmlDoc x, lv::XmlDoc::parse(vm_config, "VM definition"));
  GroupVm vm;
  vm.name = x.text("/domain/name").value_or("");
  if (vm.name.empty()) return bad("the VM definition is not a libvirt domain with a <name>");
  for (xmlNodePtr n : x.nodes("/domain/devices/disk[(@device='disk' or not(@device)) and not(readonly)]")) {
    std::string target = x.text("target/@dev", n).value_or("");
    if (!target.empty()) vm.disks.push_back({target, target});
  }
  vm.domain_xml = strip_declaration(vm_config);
  GroupDoc doc;
  doc.boot_order = {vm.name};
  doc.vms.push_back(std::move(vm));
  return doc;
}

std::vector<const GroupVm*> vms_in_boot_order(const GroupDoc& doc) {
  std::vector<const GroupVm*> out;
  for (const std::string& n : doc.boot_order)
    for (const GroupVm& vm : doc.vms)
      if (vm.name == n) out.push_back(&vm);
  return out;
}

}  // namespace ferry::cbt
