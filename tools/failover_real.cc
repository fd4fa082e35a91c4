// Failover proper (failover_real.h, docs/failover.md "Failover").
//
// The steps, each idempotent, in this order (a crash anywhere, then the same command again,
// finishes the job; `failover.*` kill points sit between them):
//   1. checks that create nothing (group, test failover, RP, definition, libvirtd, name);
//   2. the marker <group>/failed-over (durable): from here the receiver refuses the group's
//      hellos and RPs and closes its store; the store's retention is off;
//   3. the group lock (GroupStore::open, waiting up to --lock-timeout for a session to end);
//      `latest` is resolved under it and written into the marker;
//   4. GroupStore::fail_over_to(N): the images compacted forward to N;
//   5. per disk a qcow2 overlay over <group>/replica/<disk>.img, made under a temporary name
//      and renamed, so an overlay that exists is whole (and may hold the VM's writes: never
//      made again);
//   6. the domain defined (looked up by the UUID the record keeps) and started.
// The record <group>/failover/record.json says how far it got.
#include "events_cmd.h"
#include "failover_real.h"
#include "failover.h"
#include "failover_util.h"

#include <fcntl.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <thread>

#include "ferry/base/fd.h"
#include "ferry/base/kill_point.h"
#include "ferry/base/status.h"
#include "ferry/site/failover_state.h"
#include "ferry/site/store.h"
#include "ferry/site/vm_config.h"
#include "tools.h"
#include "vm_xml.h"

namespace ferry::tools {
namespace {

using namespace failover_util;
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr std::size_t kMaxRecordBytes = 1u << 20;

int fail(const std::string& msg) {
  std::fprintf(stderr, "ferry failover: %s\n", msg.c_str());
  return 1;
}

struct Paths {
  std::string group_dir, dir, record, test_running;
  Paths(const std::string& store, const std::string& group)
      : group_dir(fs::absolute(store + "/" + group).lexically_normal().string()),
        dir(group_dir + "/failover"),
        record(dir + "/record.json"),
        test_running(group_dir + "/tests/running.json") {}
};

Result<json> load_record(const Paths& p) {
  return read_json_object(p.record, kMaxRecordBytes, "a failover record");
}
Status save_record(const Paths& p, const json& j) { return write_atomic(p.record, j.dump(2)); }

// The group lock, waited for: a receiver session may hold the store until its source's next
// rp_begin is refused (the receiver then closes it within a quarter second).
Result<std::unique_ptr<site::GroupStore>> open_store_waiting(const FailoverArgs& a) {
  site::StoreOptions o;
  o.root = a.store;
  const auto deadline = Clock::now() + std::chrono::seconds(a.lock_timeout_s);
  for (;;) {
    auto s = site::GroupStore::open(o, a.group, /*create=*/false);
    if (s.is_ok() || s.status().code() != Errc::busy) return s;
    if (Clock::now() >= deadline)
      return Status::error(Errc::busy,
                           "group '" + a.group + "' is still held by another process (a receiver "
                           "session or a ferry command) after " +
                               std::to_string(a.lock_timeout_s) +
                               " s: " + s.status().message() +
                               ". The group already refuses new RPs; run the same command again "
                               "(or with a longer --lock-timeout)");
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
}

std::uint64_t point_arg(const std::string& p) { return p == "latest" ? 0 : std::stoull(p); }

// Step 1: what can be checked without creating anything. Fills `xml`.
int precheck(const FailoverArgs& a, const Paths& p, std::uint64_t want, std::string& xml) {
  auto cfg = site::vm_config_at(a.store, a.group, want);
  if (!cfg.is_ok()) return fail("group '" + a.group + "': " + cfg.status().message());
  xml = cfg->xml;
  if (!a.domain_xml.empty()) {
    auto f = read_file_bounded(a.domain_xml, site::kMaxVmConfigBytes);
    if (!f.is_ok()) return fail("--domain-xml: " + f.status().to_string());
    xml = *f;
  } else if (xml.empty()) {
    return fail("RP " + std::to_string(cfg->rp_id) + " of group '" + a.group +
                "' has no VM config: give one with --domain-xml FILE");
  }
  (void)p;
  return 0;
}

}  // namespace

int cmd_failover(const FailoverArgs& a) try {
  const auto t0 = Clock::now();
  const Paths p(a.store, a.group);
  if (!fs::is_directory(p.group_dir + "/journal") && !fs::is_directory(p.group_dir + "/replica"))
    return fail("unknown group '" + a.group + "' in store " + a.store);
  auto netmap = parse_network_map(a.network_map);
  if (!netmap.is_ok()) return fail(netmap.status().message());
  if (::access(p.test_running.c_str(), F_OK) == 0)
    return fail("a test failover of group '" + a.group +
                "' is running; stop it first: ferry failover test --stop --store " + a.store +
                " --group " + a.group);
  auto marker = site::read_failover_state(p.group_dir);
  if (!marker.is_ok()) return fail(marker.status().to_string());
  auto rec_or = load_record(p);
  json rec = rec_or.is_ok() ? *rec_or : json::object();
  if (marker->has_value() && rec.value("phase", "") == "running")
    return fail(site::failover_refusal(a.group, **marker) + ": it was failed over already" +
                " (domain " + rec.value("domain", "?") +
                "); bring it home first: ferry failback (docs/failover.md)");
  const std::uint64_t asked = point_arg(a.point);
  std::uint64_t rp = marker->has_value() ? (*marker)->rp_id : 0;
  if (rp != 0 && asked != 0 && asked != rp)
    return fail("a failover of group '" + a.group + "' to RP " + std::to_string(rp) +
                " was cut short; finish it with --point " + std::to_string(rp) + " (or latest)");
  const bool resuming = marker->has_value();

  auto conn = connect_libvirt(a.uri);
  if (!conn.is_ok())
    return fail(conn.status().message() +
                (resuming ? "; the group stays failed over: run the same command again once "
                            "libvirtd is up"
                          : "; nothing was changed"));

  std::string xml;
  if (rec.contains("source_xml")) {
    xml = rec["source_xml"].get<std::string>();
  } else if (int rc = precheck(a, p, rp != 0 ? rp : asked, xml); rc != 0) {
    return rc;
  }
  // The VMs in boot order (a group document's, or the one VM of a plain definition), each
  // with the UUID the record keeps (a rerun defines nothing twice).
  auto plans = plan_vms(xml, {}, rec.value("boot_order", a.boot_order));  // group_config.cc
  if (!plans.is_ok()) return fail("the VM definition: " + plans.status().message());
  const bool group = plans->size() > 1;
  if (group && !rec.contains("vms")) rec["vms"] = json::array();
  std::vector<std::string> names;
  for (std::size_t i = 0; i < plans->size(); ++i) {
    if (group && rec["vms"].size() <= i) rec["vms"].push_back(json::object());
    json& vm = group ? rec["vms"][i] : rec;
    if (vm.value("uuid", "").empty()) {
      auto u = random_uuid();
      if (!u.is_ok()) return fail(u.status().to_string());
      vm["uuid"] = *u;
    }
    // A dry run of the rewrite names the domain and refuses a bad definition before anything.
    VmXmlRewrite probe;
    probe.name_suffix = a.name_suffix;
    probe.uuid = vm["uuid"];
    auto named = rewrite_vm_xml((*plans)[i].xml, probe);
    if (!named.is_ok()) return fail("the VM definition: " + named.status().message());
    if (!vm.value("defined", false)) {
      Domain d(virDomainLookupByName(conn->get(), named->name.c_str()));
      if (d)
        return fail("a domain named '" + named->name + "' already exists at " + a.uri +
                    ": remove it, or choose another --name-suffix");
      virResetLastError();
    }
    names.push_back(named->name);
  }
  std::string all_names;
  for (const auto& n : names) all_names += (all_names.empty() ? "" : ",") + n;
  const json planned_vms = group ? rec["vms"] : json();
  std::string uuid = group ? std::string() : rec["uuid"].get<std::string>();

  // Step 2: the marker. From here nothing writes the replica but this command.
  if (!resuming) {
    site::FailoverState st;
    st.rp_id = asked;
    st.since_unix_ns = now_unix_ns();
    if (Status s = site::write_failover_state(p.group_dir, st); !s.is_ok())
      return fail(s.to_string());
  }
  FERRY_KILL_POINT("failover.after_marker");
  auto state = site::read_failover_state(p.group_dir);
  if (!state.is_ok() || !state->has_value()) return fail("the failover marker vanished");
  site::FailoverState st = **state;

  // Step 3: the lock, and the RP.
  auto store = open_store_waiting(a);
  if (!store.is_ok()) return fail(store.status().message());
  // A second `ferry failover` that waited for the lock behind the first: the record is the
  // truth now, read again under the lock.
  if (auto again = load_record(p); again.is_ok()) {
    rec = *again;
    if (rec.value("phase", "") == "running")
      return fail(site::failover_refusal(a.group, st) + ": it was failed over already" +
                  " (domain " + rec.value("domain", "?") +
                  "); bring it home first: ferry failback (docs/failover.md)");
    if (!rec.value("uuid", "").empty()) uuid = rec["uuid"].get<std::string>();
  }
  if (group && !rec.contains("vms")) rec["vms"] = planned_vms;
  const std::uint64_t newest = (*store)->last_committed_rp();
  if (st.rp_id == 0) st.rp_id = asked != 0 ? asked : newest;
  // Step 4: the images brought to the RP (refuses a pruned or unknown RP before writing).
  if (Status s = (*store)->fail_over_to(st.rp_id); !s.is_ok()) {
    if (s.code() == Errc::not_found && !rec.value("compacted", false)) {
      // Nothing was written: the group goes back to protecting.
      ::unlink((p.group_dir + "/" + site::kFailoverStateFile).c_str());
      (void)fsync_dir(p.group_dir);
      return fail(s.message() + "; nothing was changed, the group keeps protecting");
    }
    return fail(s.to_string() + " (the group stays failed over; run the same command again)");
  }
  FERRY_KILL_POINT("failover.after_compact");
  if (Status s = site::write_failover_state(p.group_dir, st); !s.is_ok())
    return fail(s.to_string());
  std::vector<site::RpDiskInfo> disks;
  std::vector<std::uint64_t> given_up;
  for (const auto& r : (*store)->points()) {
    if (r.rp_id == st.rp_id) disks = r.disks;
    if (r.rp_id > st.rp_id) given_up.push_back(r.rp_id);
  }
  if (disks.empty()) return fail("RP " + std::to_string(st.rp_id) + " holds no disk");

  std::error_code ec;
  fs::create_directories(p.dir, ec);
  if (ec) return fail("create " + p.dir + ": " + ec.message());
  if (!rec.contains("group")) {  // a new record (it may already hold the VMs' UUIDs)
    rec["group"] = a.group;
    rec["uri"] = a.uri;
    rec["started_unix_ns"] = st.since_unix_ns;
  }
  rec["rp_id"] = st.rp_id;
  if (!group) rec["uuid"] = uuid;
  rec["domain"] = all_names;
  rec["source_xml"] = xml;
  if (group) rec["boot_order"] = rec.value("boot_order", a.boot_order);
  rec["compacted"] = true;
  rec["given_up"] = given_up;
  if (!rec.contains("phase")) rec["phase"] = "compacted";
  if (!rec.contains("defined")) rec["defined"] = false;
  if (Status s = save_record(p, rec); !s.is_ok()) return fail(s.to_string());

  // Step 5: the overlays. An existing overlay is whole (renamed in) and may hold the VM's
  // writes: it is never made again.
  VmXmlRewrite rw;
  rw.name_suffix = a.name_suffix;
  rw.uuid = uuid;
  rw.network_map = *netmap;
  std::string chardir = rec.value("chardev_dir", "");
  if (chardir.empty()) {
    // The domain is persistent: its sockets and logs belong with the group, unless that path
    // is too long for a unix socket (108 bytes with the file name), then under /tmp.
    if (p.dir.size() + std::strlen("/chr/") + 24 < 108) {
      chardir = p.dir + "/chr";
    } else {
      char tmpl[] = "/tmp/ferry-failover-XXXXXX";
      if (::mkdtemp(tmpl) == nullptr)
        return fail(std::string("mkdtemp: ") + std::strerror(errno));
      chardir = tmpl;
    }
    rec["chardev_dir"] = chardir;
  }
  fs::create_directories(chardir, ec);
  ::chmod(chardir.c_str(), 0755);
  rw.chardev_dir = chardir;
  json overlays = json::object();
  for (const auto& d : disks) {
    const std::string image = p.group_dir + "/replica/" + d.name + ".img";
    const std::string overlay = p.dir + "/" + d.name + ".qcow2";
    rw.disks[d.name] = {overlay, "", image};
    overlays[d.name] = {{"overlay", overlay}, {"backing", image}, {"size_bytes", d.size_bytes}};
    if (fs::exists(overlay)) continue;
    const std::string tmp = overlay + ".tmp";
    fs::remove(tmp, ec);
    std::string out;
    auto rc = run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "raw",
                           tmp, std::to_string(d.size_bytes)},
                          out);
    if (!rc.is_ok()) return fail(rc.status().to_string());
    if (*rc != 0) return fail("qemu-img create of the overlay of disk " + d.name + ": " + out);
    if (Status s = fsync_dir(p.dir); !s.is_ok()) return fail(s.to_string());
    {
      UniqueFd fd(::open(tmp.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd.valid() || ::fsync(fd.get()) != 0) return fail("fsync " + tmp);
    }
    if (::rename(tmp.c_str(), overlay.c_str()) != 0) return fail("rename " + tmp);
    if (Status s = fsync_dir(p.dir); !s.is_ok()) return fail(s.to_string());
    FERRY_KILL_POINT("failover.after_overlay");
  }
  rec["overlays"] = overlays;
  if (rec["phase"] == "compacted") rec["phase"] = "overlays";
  if (Status s = save_record(p, rec); !s.is_ok()) return fail(s.to_string());

  // Step 6: the domains, in boot order. A VM that is defined and running (a rerun) is left
  // as it is; a failure leaves the record, and the same command again goes on from there.
  auto runs = plan_vms(xml, {}, rec.value("boot_order", a.boot_order));
  if (!runs.is_ok()) return fail("the VM definition: " + runs.status().message());
  std::vector<VmXmlResult> started;
  for (std::size_t i = 0; i < runs->size(); ++i) {
    json& vm = group ? rec["vms"][i] : rec;
    VmXmlRewrite rwv = rw;
    rwv.uuid = vm["uuid"];
    if (group) {  // this VM's disks, by its targets; its character devices in a directory of its own
      rwv.disks.clear();
      for (const auto& [name, target] : (*plans)[i].disks) {
        auto it = rw.disks.find(name);
        if (it == rw.disks.end())
          return fail("RP " + std::to_string(st.rp_id) + " holds no disk " + name +
                      " of VM " + names[i]);
        rwv.disks[target] = it->second;
      }
      rwv.chardev_dir = chardir + "/" + std::to_string(i);
      fs::create_directories(rwv.chardev_dir, ec);
      ::chmod(rwv.chardev_dir.c_str(), 0755);
    }
    auto x = rewrite_vm_xml((*runs)[i].xml, rwv);
    if (!x.is_ok()) return fail("the VM definition: " + x.status().message());
    for (const auto& path : x->required_paths)
      if (::access(path.c_str(), R_OK) != 0)
        return fail("the domain " + (group ? x->name + " " : std::string()) + "needs " + path +
                    ", which this host does not have; give a definition that fits with "
                    "--domain-xml FILE (the group stays failed over; run the command again)");
    if (Status s = write_atomic(p.dir + (group ? "/domain-" + x->name + ".xml" : "/domain.xml"), x->xml);
        !s.is_ok())
      return fail(s.to_string());
    vm["defined"] = true;  // before the call: a crash right after it finds the domain by UUID
    vm["notes"] = x->notes;
    vm["chardevs"] = x->chardev_paths;
    if (group) vm["domain"] = x->name;
    if (Status s = save_record(p, rec); !s.is_ok()) return fail(s.to_string());
    FERRY_KILL_POINT("failover.before_define");
    const std::string vm_uuid = vm["uuid"];
    Domain dom(virDomainLookupByUUIDString(conn->get(), vm_uuid.c_str()));
    if (!dom) {
      virResetLastError();
      if (Domain other(virDomainLookupByName(conn->get(), x->name.c_str())); other)
        return fail("a domain named '" + x->name + "' already exists at " + a.uri +
                    " (not this failover's): remove it, or run again with another --name-suffix");
      virResetLastError();
      dom.reset(virDomainDefineXML(conn->get(), x->xml.c_str()));
      if (!dom) return fail(libvirt_error("defining the domain " + x->name).message());
    }
    FERRY_KILL_POINT("failover.after_define");
    if (virDomainIsActive(dom.get()) != 1) {
      if (i > 0 && a.boot_delay_s > 0) std::this_thread::sleep_for(std::chrono::seconds(a.boot_delay_s));
      if (virDomainCreate(dom.get()) != 0)
        return fail(libvirt_error("starting the domain " + x->name).message() +
                    " (the group stays failed over; fix it and run the same command again)");
    }
    FERRY_KILL_POINT("failover.after_start");
    if (group) {
      vm["running"] = true;
      if (Status s = save_record(p, rec); !s.is_ok()) return fail(s.to_string());
    }
    started.push_back(std::move(*x));
  }
  rec["phase"] = "running";
  rec["running_unix_ns"] = now_unix_ns();
  st.domain = all_names;
  if (Status s = site::write_failover_state(p.group_dir, st); !s.is_ok())
    return fail(s.to_string());
  if (Status s = save_record(p, rec); !s.is_ok()) return fail(s.to_string());

  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::string joined_names;
  for (const auto& x : started) joined_names += (joined_names.empty() ? "" : ",") + x.name;
  emit_store_event(a.store, {.group = a.group, .kind = "failover", .rp = st.rp_id,
                             .priority = events::Priority::warning,
                             .message = "failover of group '" + a.group + "' at RP " +
                                        std::to_string(st.rp_id) + ": domain(s) " + joined_names +
                                        " started; the group accepts no RPs until failback",
                             .fields = {{"domain", joined_names},
                                        {"duration_ms", std::int64_t(secs * 1000)}}});
  for (std::size_t i = 0; i < started.size(); ++i) {
    const VmXmlResult& x = started[i];
    const json& vm = group ? rec["vms"][i] : rec;
    std::printf("failover of %s (group %s) at RP %llu: domain %s (uuid %s) started at %s in %.2f s%s%s\n",
                x.source_name.c_str(), a.group.c_str(), (unsigned long long)st.rp_id,
                x.name.c_str(), vm.value("uuid", "").c_str(), a.uri.c_str(), secs,
                group ? (" (boot " + std::to_string(i + 1) + " of " + std::to_string(started.size()) + ")").c_str() : "",
                resuming ? " (a run cut short, finished)" : "");
  }
  for (const auto& d : disks)
    std::printf("  disk %s: overlay %s on %s (raw, read-only from now on)\n", d.name.c_str(),
                rw.disks[d.name].overlay.c_str(), rw.disks[d.name].backing_file.c_str());
  if (!given_up.empty()) {
    std::string ids;
    for (auto id : given_up) ids += (ids.empty() ? "" : ", ") + std::to_string(id);
    std::printf("  given up: RP %s (newer than RP %llu; still in the journal, not replicated "
                "onwards)\n", ids.c_str(), (unsigned long long)st.rp_id);
  }
  for (const auto& x : started)
    for (const auto& n : x.notes) std::printf("  note (%s): %s\n", x.name.c_str(), n.c_str());
  std::printf("group %s accepts no RPs until failback (ferry failback); retention is off\n",
              a.group.c_str());
  return 0;
} catch (const std::exception& e) {  // a record edited by hand, a bad --point number
  return fail(std::string("unexpected: ") + e.what());
}

}  // namespace ferry::tools
