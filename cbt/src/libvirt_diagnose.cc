#include "ferry/cbt/libvirt_diagnose.h"

#include <libvirt/libvirt-qemu.h>

#include <map>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "libvirt_api.h"

namespace ferry::cbt {
namespace {

using json = nlohmann::json;

struct Disk {
  std::string dev, format, source;
  int index = -1;
};

LibvirtFinding good(const char* check, std::string detail) {
  return {check, true, false, std::move(detail), {}};
}
LibvirtFinding bad(const char* check, std::string detail, std::string fix) {
  return {check, false, false, std::move(detail), std::move(fix)};
}
LibvirtFinding skip(const char* check, std::string why) {
  return {check, true, true, std::move(why), {}};
}

Result<std::vector<Disk>> disks_of(const std::string& xml, const std::string& domain) {
  FERRY_ASSIGN_OR_RETURN(lv::XmlDoc doc, lv::XmlDoc::parse(xml, "XML of domain " + domain));
  std::vector<Disk> out;
  for (xmlNodePtr n :
       doc.nodes("/domain/devices/disk[(@device='disk' or not(@device)) and not(readonly)]")) {
    Disk d;
    d.dev = doc.text("target/@dev", n).value_or("?");
    d.format = doc.text("driver/@type", n).value_or("raw");
    d.source = doc.text("source/@file", n).value_or(doc.text("source/@dev", n).value_or(""));
    d.index = std::atoi(doc.text("source/@index", n).value_or("-1").c_str());
    out.push_back(std::move(d));
  }
  return out;
}

Result<json> monitor(virDomainPtr dom, const char* command, const std::string& domain) {
  char* reply = nullptr;
  if (virDomainQemuMonitorCommand(dom, command, &reply, 0) < 0)
    return lv::last_error(std::string("QEMU monitor on domain ") + domain);
  json j = json::parse(lv::take_string(reply), nullptr, false);
  if (j.is_discarded() || !j.contains("return"))
    return Status::error(Errc::protocol, "QEMU monitor on domain " + domain + ": bad reply");
  return j["return"];
}

// Ferry's bitmaps per disk dev: name -> inconsistent.
Result<std::map<std::string, std::map<std::string, bool>>> bitmaps_of(
    virDomainPtr dom, const std::vector<Disk>& disks, const std::string& domain,
    const std::string& prefix) {
  FERRY_ASSIGN_OR_RETURN(json nodes,
                         monitor(dom, R"({"execute":"query-named-block-nodes","arguments":{"flat":true}})",
                                 domain));
  std::map<std::string, std::map<std::string, bool>> out;
  if (!nodes.is_array()) return out;
  for (const json& n : nodes)
    for (const Disk& d : disks) {
      if (n.value("node-name", "") != fmt::format("libvirt-{}-format", d.index)) continue;
      auto& m = out[d.dev];
      for (const json& b : n.value("dirty-bitmaps", json::array())) {
        const std::string name = b.value("name", "");
        if (name.rfind(prefix, 0) == 0) m[name] = b.value("inconsistent", false);
      }
    }
  return out;
}

Result<std::set<std::string>> checkpoints_of(virDomainPtr dom, const std::string& domain,
                                             const std::string& prefix) {
  virDomainCheckpointPtr* raw = nullptr;
  const int n = virDomainListAllCheckpoints(dom, &raw, 0);
  if (n < 0) return lv::last_error("checkpoints of domain " + domain);
  std::set<std::string> out;
  for (int i = 0; i < n; ++i) {
    lv::Checkpoint c(raw[i]);
    const std::string name = virDomainCheckpointGetName(c.get());
    if (name.rfind(prefix, 0) == 0) out.insert(name);
  }
  std::free(raw);
  return out;
}

LibvirtFinding check_formats(const std::vector<Disk>& disks, const std::string& domain) {
  std::string raw, all;
  for (const Disk& d : disks) {
    all += (all.empty() ? "" : ", ") + d.dev + " " + d.format;
    if (d.format != "qcow2") raw += (raw.empty() ? "" : ", ") + d.dev + " (" + d.format + ", " + d.source + ")";
  }
  if (disks.empty())
    return bad("disk-format", "domain " + domain + " has no writable disk",
               "attach the disks to protect (read-only disks and cdroms are not replicated)");
  if (!raw.empty())
    return bad("disk-format",
               "cannot carry a checkpoint (not qcow2): " + raw +
                   "; every RP compares these disks block by block (no_checkpoint)",
               "convert them to qcow2 while the domain is off (qemu-img convert -O qcow2 SRC "
               "DST) and point the domain's <driver type='qcow2'/> at the copy");
  return good("disk-format", "every disk can carry a checkpoint (" + all + ")");
}

LibvirtFinding check_consistency(virDomainPtr dom, const std::vector<Disk>& disks,
                                 const std::string& domain, const std::string& group) {
  const std::string prefix = "ferry." + group + ".";
  auto bitmaps = bitmaps_of(dom, disks, domain, prefix);
  if (!bitmaps.is_ok())
    return bad("checkpoints", bitmaps.status().message(),
               "the QEMU monitor passthrough must work (libvirt built with the qemu driver)");
  auto cps = checkpoints_of(dom, domain, prefix);
  if (!cps.is_ok()) return bad("checkpoints", cps.status().message(), "check libvirtd's log");
  std::vector<std::string> problems;
  for (const Disk& d : disks) {
    if (d.format != "qcow2") continue;
    const auto& bm = (*bitmaps)[d.dev];
    for (const auto& [name, inconsistent] : bm) {
      if (inconsistent)
        problems.push_back("bitmap " + name + " on " + d.dev +
                           " is inconsistent (QEMU was killed): the next RP drops it and "
                           "compares the disk block by block (L3)");
      else if (!cps->count(name))
        problems.push_back("bitmap " + name + " on " + d.dev +
                           " has no checkpoint metadata (deleted, or a transient domain "
                           "restarted): the next RP redefines it (L4)");
    }
    for (const std::string& c : *cps)
      if (!bm.count(c))
        problems.push_back("checkpoint " + c + " has no bitmap on " + d.dev +
                           ": the next RP compares the disk block by block (no_bitmap)");
  }
  if (!problems.empty()) {
    std::string detail;
    for (const std::string& p : problems) detail += (detail.empty() ? "" : "; ") + p;
    return bad("checkpoints", detail,
               "let the agent take its next RP, which heals this (docs/change-tracking.md); "
               "never delete ferry.* checkpoints or bitmaps with virsh or qemu-img");
  }
  return good("checkpoints", fmt::format("{} checkpoint(s) of group '{}', each with its bitmap "
                                         "on every qcow2 disk, none inconsistent",
                                         cps->size(), group));
}

LibvirtFinding check_nbd(virDomainPtr dom, const std::string& domain) {
  auto cmds = monitor(dom, R"({"execute":"query-commands"})", domain);
  if (!cmds.is_ok()) return bad("nbd", cmds.status().message(), "check libvirtd's log");
  std::set<std::string> have;
  if (cmds->is_array())
    for (const json& c : *cmds) have.insert(c.value("name", ""));
  for (const char* need : {"nbd-server-start", "block-dirty-bitmap-add", "blockdev-backup"})
    if (!have.count(need))
      return bad("nbd", std::string("QEMU of domain ") + domain + " lacks " + need,
                 "upgrade QEMU (Ferry needs 6.0 or later: NBD server, persistent bitmaps)");
  virDomainJobInfo job{};
  if (virDomainGetJobInfo(dom, &job) == 0 && job.type != VIR_DOMAIN_JOB_NONE) {
    char* xml = virDomainBackupGetXMLDesc(dom, 0);
    const std::string backup = lv::take_string(xml);
    if (xml == nullptr) (void)lv::last_error("");
    return bad("nbd", "domain " + domain + " runs a job" +
                          (backup.empty() ? std::string() : " (a pull backup: its NBD server is taken)"),
               "wait for it to end or abort it (virsh domjobabort " + domain +
                   "); a Ferry leftover is aborted by the next RP (L1)");
  }
  return good("nbd", "QEMU can serve a pull backup over NBD (nbd-server-start, "
                     "block-dirty-bitmap-add, blockdev-backup); no job running");
}

}  // namespace

std::vector<LibvirtFinding> diagnose_libvirt(const std::string& uri, const std::string& domain,
                                             const std::string& group) {
  std::vector<LibvirtFinding> out;
  lv::install_quiet_error_handler();
  lv::Conn conn{virConnectOpen(uri.c_str())};
  if (!conn) {
    Status s = lv::last_error("connecting");
    out.push_back(bad("libvirt", "libvirtd is not reachable at " + uri + " (" + s.message() + ")",
                      "start libvirtd (systemctl start libvirtd, or virtqemud), or give the "
                      "right --uri"));
    for (const char* c : {"disk-format", "checkpoints", "nbd"})
      out.push_back(skip(c, "libvirtd not reachable"));
    return out;
  }
  unsigned long version = 0;
  (void)virConnectGetLibVersion(conn.get(), &version);
  out.push_back(good("libvirt", fmt::format("libvirtd {}.{}.{} answers at {}", version / 1000000,
                                            version / 1000 % 1000, version % 1000, uri)));
  if (domain.empty()) {
    for (const char* c : {"disk-format", "checkpoints", "nbd"})
      out.push_back(skip(c, "no --domain"));
    return out;
  }
  lv::Domain dom{virDomainLookupByName(conn.get(), domain.c_str())};
  if (!dom) {
    Status s = lv::last_error("domain " + domain);
    out.push_back(bad("disk-format", s.message(), "check --domain (virsh list --all)"));
    for (const char* c : {"checkpoints", "nbd"}) out.push_back(skip(c, "no such domain"));
    return out;
  }
  const std::string xml = lv::take_string(virDomainGetXMLDesc(dom.get(), 0));
  auto disks = disks_of(xml, domain);
  if (!disks.is_ok()) {
    out.push_back(bad("disk-format", disks.status().message(), "check the domain's definition"));
    return out;
  }
  out.push_back(check_formats(*disks, domain));
  if (virDomainIsActive(dom.get()) != 1) {
    for (const char* c : {"checkpoints", "nbd"})
      out.push_back(skip(c, "domain " + domain + " is not running"));
    return out;
  }
  out.push_back(check_consistency(dom.get(), *disks, domain, group.empty() ? domain : group));
  out.push_back(check_nbd(dom.get(), domain));
  return out;
}

}  // namespace ferry::cbt
