// ferry failback --complete at the main site (failback.h; docs/failover.md, "Failback").
//
// The original domain's disks are the seed's files (seed.json says which, with their size,
// mtime and inode at the seed). Steps, recorded in <group>/failback-complete.json:
//   1. checks that change nothing: the group was seeded, the RP is committed, libvirtd
//      answers, the domain exists and is shut off, each seeded disk is one of its disks, on
//      the seed's file, unchanged since the seed (unless a run cut short wrote it already),
//      of the RP's size;
//   2. the record (phase writing) - *failback.complete_after_record*;
//   3. per disk, the ranges the RPs after the seed changed (ReadView::changed_since_base;
//      the whole disk when retention moved the base past the seed) compared with the file
//      and only what differs written, through qemu-nbd (socket activation by libnbd, so a
//      killed ferry takes it along) for raw and qcow2 alike, then flushed -
//      *failback.complete_after_write*;
//   4. the domain's Ferry change tracking for the group dropped: the ledger
//      (<state-dir>/<group>/ledger.json), its checkpoints' metadata and the qcow2 bitmaps
//      ferry.<group>.*: the disks changed behind them, so the next RP in the original
//      direction is a resync - *failback.complete_after_invalidate*;
//   5. the domain started - *failback.complete_after_start*; the record says done.
// A protection group: every --domain (default: the VMs of the group document at the RP), the
// seed's disk <domain>.<target> on that domain's <target>; started in the RP's boot order.
#include <libnbd.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xpath.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <thread>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>

#include "failback.h"
#include "failover.h"
#include "failover_util.h"
#include "ferry/base/kill_point.h"
#include "ferry/site/read_view.h"
#include "ferry/site/vm_config.h"
#include "ferry/site/store.h"

namespace ferry::tools {
namespace {

using namespace failover_util;
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

int fail(const std::string& msg) {
  std::fprintf(stderr, "ferry failback --complete: %s\n", msg.c_str());
  return 1;
}

struct DomDisk {
  std::string file, format;
};

// target dev -> source file and driver type of every file disk of the definition.
std::map<std::string, DomDisk> domain_disks(const std::string& xml) {
  std::map<std::string, DomDisk> out;
  std::unique_ptr<xmlDoc, void (*)(xmlDocPtr)> doc(
      xmlReadMemory(xml.data(), static_cast<int>(xml.size()), "domain.xml", nullptr,
                    XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING),
      xmlFreeDoc);
  if (!doc) return out;
  std::unique_ptr<xmlXPathContext, void (*)(xmlXPathContextPtr)> ctx(
      xmlXPathNewContext(doc.get()), xmlXPathFreeContext);
  std::unique_ptr<xmlXPathObject, void (*)(xmlXPathObjectPtr)> o(
      xmlXPathEvalExpression(reinterpret_cast<const xmlChar*>("/domain/devices/disk"), ctx.get()),
      xmlXPathFreeObject);
  if (!o || !o->nodesetval) return out;
  auto attr = [](xmlNodePtr n, const char* child, const char* name) -> std::string {
    for (xmlNodePtr c = n->children; c; c = c->next) {
      if (c->type != XML_ELEMENT_NODE || std::strcmp(reinterpret_cast<const char*>(c->name), child))
        continue;
      xmlChar* v = xmlGetProp(c, reinterpret_cast<const xmlChar*>(name));
      if (!v) return "";
      std::string s(reinterpret_cast<char*>(v));
      xmlFree(v);
      return s;
    }
    return "";
  };
  for (int i = 0; i < o->nodesetval->nodeNr; ++i) {
    xmlNodePtr n = o->nodesetval->nodeTab[i];
    const std::string dev = attr(n, "target", "dev"), file = attr(n, "source", "file");
    if (!dev.empty() && !file.empty()) out[dev] = {file, attr(n, "driver", "type")};
  }
  return out;
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : ",") + x;
  return out;
}

struct NbdClose {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using Nbd = std::unique_ptr<nbd_handle, NbdClose>;

Status nbd_err(const std::string& what) {
  const char* e = nbd_get_error();
  return Status::error(Errc::external, what + ": " + (e ? e : "libnbd error"));
}

struct WriteStats {
  std::uint64_t compared = 0, written = 0;
};

// Step 3 for one disk: only the differing 64 KiB granules of `ranges` are written.
Status write_changes(site::ReadView& view, nbd_handle* h,
                     const std::vector<site::ReadExtent>& ranges, WriteStats& st) {
  constexpr std::uint64_t kChunk = 1u << 20, kGranule = 64u << 10;
  std::string want(kChunk, '\0'), have(kChunk, '\0');
  std::uint64_t prev_end = 0;
  for (const auto& r : ranges) {
    // In order, inside the disk (changed_since_base merges and sorts them).
    FERRY_ASSERT(r.offset_bytes >= prev_end && r.length_bytes > 0);
    FERRY_ASSERT(r.offset_bytes + r.length_bytes <= view.size_bytes());
    prev_end = r.offset_bytes + r.length_bytes;
    for (std::uint64_t at = r.offset_bytes; at < r.offset_bytes + r.length_bytes;) {
      const std::uint64_t n = std::min(kChunk, r.offset_bytes + r.length_bytes - at);
      FERRY_TRY(view.pread(want.data(), n, at));
      if (nbd_pread(h, have.data(), n, at, 0) == -1) return nbd_err("read at " + std::to_string(at));
      st.compared += n;
      for (std::uint64_t g = 0; g < n; g += kGranule) {
        const std::uint64_t m = std::min(kGranule, n - g);
        if (std::memcmp(want.data() + g, have.data() + g, m) == 0) continue;
        if (nbd_pwrite(h, want.data() + g, m, at + g, 0) == -1)
          return nbd_err("write at " + std::to_string(at + g));
        st.written += m;
      }
      at += n;
    }
  }
  if (nbd_flush(h, 0) == -1) return nbd_err("flush");
  return Status::ok();
}

std::string gib(std::uint64_t b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(b) / (1 << 20));
  return buf;
}

}  // namespace

int cmd_failback_complete(const FailbackArgs& a) try {
  const auto t0 = Clock::now();
  if (a.point != "latest" &&
      (a.point.empty() || a.point.find_first_not_of("0123456789") != std::string::npos))
    return fail("--point '" + a.point + "': give an RP number or latest");
  const std::string store = fs::absolute(a.store).lexically_normal().string();
  const std::string gdir = store + "/" + a.group;
  const std::string record = gdir + "/failback-complete.json";
  if (!fs::is_directory(gdir)) return fail("unknown group '" + a.group + "' in store " + store);
  auto seed_text = read_file_bounded(gdir + "/" + kSeedRecord, 1u << 20);
  if (!seed_text.is_ok())
    return fail("group '" + a.group + "' in store " + store + " was not seeded (no " + gdir + "/" +
                kSeedRecord + "): failback writes only what changed since a seed of the "
                "original disks (ferry seed --store " + a.store + " --group " + a.group +
                " --disk NAME=FILE ...); nothing was changed");
  json seed = json::parse(*seed_text, nullptr, false);
  if (seed.is_discarded() || !seed.contains("disks")) return fail(gdir + "/seed.json is damaged");
  json rec = json::object();
  if (auto t = read_file_bounded(record, 1u << 20); t.is_ok()) {
    rec = json::parse(*t, nullptr, false);
    if (rec.is_discarded()) return fail(record + " is damaged");
  }
  const std::string phase0 = rec.value("phase", "");
  if (phase0 == "done")
    return fail("the failback of group '" + a.group + "' was completed already (RP " +
                std::to_string(rec.value("rp_id", 0ull)) + ", domain " +
                rec.value("domain", "?") + " started); nothing was changed");
  const bool resuming = !phase0.empty();

  // Step 1.
  auto pts = site::list_points(store, a.group);
  if (!pts.is_ok()) return fail(pts.status().message());
  if (pts->empty()) return fail("group '" + a.group + "' has no RP");
  std::uint64_t rp = resuming ? rec.value("rp_id", 0ull)
                              : (a.point == "latest" ? pts->back().rp_id : std::stoull(a.point));
  const site::RpInfo* at = nullptr;
  for (const auto& p : *pts)
    if (p.rp_id == rp) at = &p;
  if (at == nullptr)
    return fail("RP " + std::to_string(rp) + " of group '" + a.group +
                "' is not committed or was pruned (newest: RP " +
                std::to_string(pts->back().rp_id) + "; see ferry points)");
  const std::uint64_t seed_rp = seed.value("rp_id", kSeedRp);
  // The domains, in boot order: a group document's VMs (their names by default), else the
  // one --domain.
  std::vector<std::string> domains = a.domains;
  {
    auto cfg = site::vm_config_at(store, a.group, rp);
    const json vms = cfg.is_ok() ? vms_json(cfg->xml) : json::array();
    if (vms.size() > 1) {
      std::vector<std::pair<std::uint64_t, std::string>> order;
      for (const auto& v : vms) order.emplace_back(v.value("boot", 0ull), v.value("name", ""));
      std::sort(order.begin(), order.end());
      std::vector<std::string> in_order;
      for (const auto& [b, n] : order) in_order.push_back(n);
      if (domains.empty()) domains = in_order;
      std::vector<std::string> given = domains, want = in_order;
      std::sort(given.begin(), given.end());
      std::sort(want.begin(), want.end());
      if (given != want)
        return fail("RP " + std::to_string(rp) + " of group '" + a.group + "' holds the VMs " +
                    join(in_order) + ": give each once with --domain (or none); nothing was "
                    "changed");
      domains = in_order;
    }
  }
  if (domains.empty()) return fail("--domain ORIG is required with --complete");
  if (domains.size() > 1 && resuming && rec.contains("domains"))
    domains = rec["domains"].get<std::vector<std::string>>();
  const bool group = domains.size() > 1;
  auto conn = connect_libvirt(a.uri);
  if (!conn.is_ok())
    return fail(conn.status().message() + (resuming ? "; run the same command again once "
                                                      "libvirtd is up"
                                                    : "; nothing was changed"));
  std::vector<Domain> doms;
  std::vector<std::map<std::string, DomDisk>> ddisks;
  for (const std::string& dn : domains) {
    Domain dom(virDomainLookupByName(conn->get(), dn.c_str()));
    if (!dom) {
      virResetLastError();
      return fail("no domain '" + dn + "' at " + a.uri + "; nothing was changed");
    }
    const bool active = virDomainIsActive(dom.get()) == 1;
    if (active && phase0 != "invalidated")
      return fail("domain '" + dn + "' is running: shut it off first (its disks are "
                  "overwritten with the final RP); nothing was changed");
    char* xml_c = virDomainGetXMLDesc(dom.get(), VIR_DOMAIN_XML_INACTIVE);
    if (!xml_c) return fail(libvirt_error("reading the definition of " + dn).message());
    const std::string xml(xml_c);
    std::free(xml_c);
    ddisks.push_back(domain_disks(xml));
    doms.push_back(std::move(dom));
  }
  struct Work {
    std::string name, file, format;
    std::uint64_t size = 0;
  };
  std::vector<Work> work;
  for (const auto& [name, d] : seed["disks"].items()) {
    const std::string file = d.value("file", "");
    // A group's disk <domain>.<target>; a single VM's disk is named by its target.
    std::size_t di = 0;
    std::string target = name;
    if (group) {
      while (di < domains.size() && name.rfind(domains[di] + ".", 0) != 0) ++di;
      if (di == domains.size())
        return fail("disk '" + name + "' of the seed belongs to none of the domains " +
                    join(domains) + " (a group's disks are named <domain>.<target>); nothing "
                    "was changed");
      target = name.substr(domains[di].size() + 1);
    }
    auto it = ddisks[di].find(target);
    if (it == ddisks[di].end() || fs::path(it->second.file).lexically_normal() != fs::path(file))
      return fail("disk '" + name + "' of the seed is " + file + ", which is not disk " + target +
                  " of domain '" + domains[di] + "'" +
                  (it == ddisks[di].end() ? "" : " (it uses " + it->second.file + ")") +
                  "; nothing was changed");
    const site::RpDiskInfo* rd = nullptr;
    for (const auto& x : at->disks)
      if (x.name == name) rd = &x;
    if (rd == nullptr)
      return fail("RP " + std::to_string(rp) + " holds no disk '" + name + "'");
    auto info = image_info(file);
    if (!info.is_ok()) return fail("disk '" + name + "': " + info.status().message());
    if (info->virtual_size != rd->size_bytes)
      return fail("disk '" + name + "' is " + std::to_string(info->virtual_size) + " bytes, at RP " +
                  std::to_string(rp) + " " + std::to_string(rd->size_bytes) +
                  ": resize " + file + " first (qemu-img resize); nothing was changed");
    if (!resuming) {
      auto now = file_stamp(file);
      const json& s = d["stamp"];
      FileStamp then{s.value("file_bytes", 0ull), s.value("mtime_ns", 0ull),
                     s.value("inode", 0ull), s.value("dev", 0ull)};
      if (!now.is_ok() || !(*now == then))
        return fail("disk '" + name + "': " + file + " changed since the seed (size, mtime or "
                    "inode differ): the store no longer knows which blocks differ; seed again "
                    "(remove the group, ferry seed) and replicate; nothing was changed");
    }
    work.push_back({name, file, info->format, rd->size_bytes});
  }

  // Step 2.
  if (!resuming) {
    rec = {{"group", a.group}, {"rp_id", rp}, {"domain", join(domains)},
           {"domains", domains}, {"phase", "writing"}, {"started_unix_ns", now_unix_ns()}};
    if (Status s = write_atomic(record, rec.dump(2)); !s.is_ok()) return fail(s.to_string());
  }
  auto save = [&](const std::string& ph) -> Status {
    rec["phase"] = ph;
    return write_atomic(record, rec.dump(2));
  };
  FERRY_KILL_POINT("failback.complete_after_record");

  // Step 3.
  std::string phase = rec.value("phase", "writing");
  WriteStats total;
  if (phase == "writing") {
    for (const auto& w : work) {
      auto view = site::ReadView::open(store, a.group, rp, w.name);
      if (!view.is_ok()) return fail(view.status().message());
      std::vector<site::ReadExtent> ranges;
      const bool from_seed = (*view)->base_rp() == seed_rp;
      if (from_seed) {
        for (std::uint64_t lo = 0; lo < w.size; lo += site::ReadView::kWindowBytes) {
          auto r = (*view)->changed_since_base(lo, std::min(w.size - lo, site::ReadView::kWindowBytes));
          if (!r.is_ok()) return fail(r.status().message());
          ranges.insert(ranges.end(), r->begin(), r->end());
        }
      } else {
        ranges.push_back({0, w.size, false});  // retention moved the base past the seed
      }
      Nbd h(nbd_create());
      if (!h) return fail(nbd_err("nbd_create").message());
      std::vector<std::string> args = {"qemu-nbd", "-f", w.format, "--cache=writeback", w.file};
      std::vector<char*> argv;
      for (auto& x : args) argv.push_back(x.data());
      argv.push_back(nullptr);
      if (nbd_connect_systemd_socket_activation(h.get(), argv.data()) == -1)
        return fail(nbd_err("qemu-nbd of " + w.file).message() + " (run the same command again)");
      WriteStats st;
      if (Status s = write_changes(**view, h.get(), ranges, st); !s.is_ok())
        return fail("disk '" + w.name + "' (" + w.file + "): " + s.message() +
                    " (run the same command again)");
      (void)nbd_shutdown(h.get(), 0);
      std::printf("  disk %s: %s compared (%s), %s written into %s\n", w.name.c_str(),
                  gib(st.compared).c_str(),
                  from_seed ? "the ranges the RPs after the seed changed"
                            : "the whole disk: retention moved the base past the seed",
                  gib(st.written).c_str(), w.file.c_str());
      total.compared += st.compared;
      total.written += st.written;
    }
    rec["written_bytes"] = total.written;
    rec["compared_bytes"] = total.compared;
    if (Status s = save("written"); !s.is_ok()) return fail(s.to_string());
    phase = "written";
    FERRY_KILL_POINT("failback.complete_after_write");
  }

  // Step 4.
  const std::string prefix = "ferry." + a.group + ".";
  if (phase == "written") {
    const std::string sdir = (a.state_dir.empty()
                                  ? (std::getenv("FERRY_STATE_DIR") && *std::getenv("FERRY_STATE_DIR")
                                         ? std::string(std::getenv("FERRY_STATE_DIR"))
                                         : std::string("/var/lib/ferry"))
                                  : a.state_dir) + "/" + a.group;
    // A single VM's ledger is <state-dir>/<group>/ledger.json; a group member's
    // <state-dir>/<group>/<domain>/ledger.json.
    std::vector<std::string> ledger_dirs = {sdir};
    if (group)
      for (const auto& dn : domains) ledger_dirs.push_back(sdir + "/" + dn);
    for (const auto& ld : ledger_dirs) {
      if (::unlink((ld + "/ledger.json").c_str()) != 0 && errno != ENOENT)
        return fail("remove " + ld + "/ledger.json: " + std::strerror(errno));
      (void)fsync_dir(ld);
    }
    for (auto& dom : doms) {
      virDomainCheckpointPtr* cps = nullptr;
      const int n = virDomainListAllCheckpoints(dom.get(), &cps, 0);
      for (int i = 0; i < n; ++i) {
        const char* nm = virDomainCheckpointGetName(cps[i]);
        if (nm && std::string(nm).rfind(prefix, 0) == 0 &&
            virDomainCheckpointDelete(cps[i], VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY) != 0)
          std::fprintf(stderr, "ferry failback --complete: warning: %s\n",
                       libvirt_error(std::string("deleting checkpoint ") + nm).message().c_str());
        virDomainCheckpointFree(cps[i]);
      }
      std::free(cps);
      virResetLastError();
    }
    for (const auto& w : work) {
      if (w.format != "qcow2") continue;
      auto info = image_info(w.file);
      if (!info.is_ok()) continue;
      for (const auto& b : info->bitmaps) {
        if (b.rfind(prefix, 0) != 0) continue;
        std::string out;
        auto rc = run_command({"qemu-img", "bitmap", "--remove", w.file, b}, out);
        if (!rc.is_ok() || *rc != 0)
          std::fprintf(stderr, "ferry failback --complete: warning: bitmap %s of %s: %s\n",
                       b.c_str(), w.file.c_str(), out.c_str());
      }
    }
    if (Status s = save("invalidated"); !s.is_ok()) return fail(s.to_string());
    phase = "invalidated";
    FERRY_KILL_POINT("failback.complete_after_invalidate");
  }

  // Step 5: started in boot order (a domain already running, from a run cut short, is left).
  for (std::size_t i = 0; i < doms.size(); ++i) {
    if (virDomainIsActive(doms[i].get()) == 1) continue;
    if (i > 0 && a.boot_delay_s > 0) std::this_thread::sleep_for(std::chrono::seconds(a.boot_delay_s));
    if (virDomainCreate(doms[i].get()) != 0)
      return fail(libvirt_error("starting domain " + domains[i]).message() +
                  " (its disks hold RP " + std::to_string(rp) + "; run the same command again)");
    if (group)
      std::printf("  domain %s started (boot %zu of %zu)\n", domains[i].c_str(), i + 1, doms.size());
  }
  FERRY_KILL_POINT("failback.complete_after_start");
  rec["done_unix_ns"] = now_unix_ns();
  if (Status s = save("done"); !s.is_ok()) return fail(s.to_string());
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const char* s_ = group ? "s" : "";
  std::printf("failback of group %s completed in %.2f s%s: the disks of domain%s %s hold RP %llu "
              "(%s written of %s compared), %s Ferry change tracking for the group dropped, "
              "domain%s started\n",
              a.group.c_str(), secs, resuming ? " (a run cut short, finished)" : "", s_,
              join(domains).c_str(), (unsigned long long)rp,
              gib(rec.value("written_bytes", 0ull)).c_str(),
              gib(rec.value("compared_bytes", 0ull)).c_str(), group ? "their" : "its", s_);
  std::string dargs;
  for (const auto& dn : domains) dargs += " --domain " + dn;
  std::printf("resume protection in the original direction (a resync that sends only what "
              "differs): ferry protect%s --to <recovery site ADDR:PORT> --group %s\n",
              dargs.c_str(), a.group.c_str());
  return 0;
} catch (const std::exception& e) {
  return fail(std::string("unexpected: ") + e.what());
}

}  // namespace ferry::tools
