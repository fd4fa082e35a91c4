// ChangeSource for a running libvirt domain: checkpoints + pull-mode backups over NBD.
//
// Names: the checkpoint of RP n of group G is "ferry.G.n"; libvirt names its bitmap in each
// qcow2 the same. libvirt keeps only the newest checkpoint's bitmap recording (older ones are
// frozen), and an incremental backup from checkpoint c merges the chain c..newest. Deleting a
// checkpoint that has a parent merges its bitmap into the parent's (and re-enables the parent
// when the deleted one was recording), so deleting an unacknowledged checkpoint loses no
// dirty bit. The ledger (work_dir/ledger.json) is Ferry's own record of the last acknowledged
// RP per disk; libvirt's checkpoint metadata and QEMU's bitmaps are reconciled with it at
// every capture. See docs/change-tracking.md, "libvirt source".
#include "ferry/cbt/libvirt_source.h"

#include <libvirt/libvirt-qemu.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ferry/base/fd.h"
#include "ferry/base/log.h"
#include "libvirt_api.h"
#include "libvirt_member.h"

namespace ferry::cbt {

namespace {

using json = nlohmann::json;

constexpr std::size_t kMaxDisks = 64;
constexpr std::size_t kMaxGroupNameBytes = 64;
constexpr std::size_t kMaxCheckpoints = 4096;
constexpr std::uint32_t kDefaultGranularityBytes = 64 * 1024;
constexpr auto kJobEndTimeout = std::chrono::seconds(60);
constexpr auto kJobPoll = std::chrono::milliseconds(50);
constexpr unsigned long kMinLibvirtVersion = 7006000;  // per-disk backupmode/incremental

struct LvDisk {
  std::string dev;     // target dev: the disk's name in the group
  std::string format;  // driver type: qcow2, raw, ...
  std::string source;  // file or block device
  int index = -1;      // libvirt's source index: its QEMU node is libvirt-<index>-format
  bool qcow2() const { return format == "qcow2"; }
};

struct BitmapInfo {
  bool inconsistent = false, busy = false;
  std::uint32_t granularity_bytes = 0;
};
struct NodeBitmaps {
  std::uint32_t cluster_bytes = 0;
  std::map<std::string, BitmapInfo> bitmaps;
};

struct LedgerDisk {
  std::uint64_t rp = 0;
  std::string checkpoint;  // empty: the disk carries no checkpoint (raw)
};
using Ledger = std::map<std::string, LedgerDisk>;

struct DiskRun {
  LvDisk disk;
  FullReason reason = FullReason::none;
  std::string incremental_from;  // checkpoint the backup is incremental from
  std::uint64_t size_bytes = 0;
  std::uint32_t granularity_bytes = kDefaultGranularityBytes;
  std::string export_name, export_bitmap;
};

struct CaptureState {
  std::uint64_t base_rp = 0, rp_id = 0;
  std::vector<DiskRun> disks;
  std::string new_checkpoint;  // empty when no disk carries one
  std::string vm_config;       // the domain's definition at this capture (empty: unreadable)
  bool job_active = false;
  bool finished = false;
};

bool valid_group(const std::string& g) {
  if (g.empty() || g.size() > kMaxGroupNameBytes) return false;
  return std::all_of(g.begin(), g.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_';
  });
}

// The RP of a checkpoint/bitmap name of this group, or nullopt for anything else.
std::optional<std::uint64_t> rp_of(const std::string& prefix, const std::string& name) {
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  std::uint64_t rp = 0;
  for (char c : name.substr(prefix.size())) {
    if (c < '0' || c > '9' || rp > (UINT64_MAX - 9) / 10) return std::nullopt;
    rp = rp * 10 + static_cast<std::uint64_t>(c - '0');
  }
  return rp;
}

Result<std::vector<LvDisk>> parse_disks(const std::string& xml, const std::string& domain) {
  FERRY_ASSIGN_OR_RETURN(lv::XmlDoc doc, lv::XmlDoc::parse(xml, "XML of domain " + domain));
  std::vector<LvDisk> out;
  // cdroms, floppies and read-only disks never change: not part of the group.
  for (xmlNodePtr n : doc.nodes("/domain/devices/disk[(@device='disk' or not(@device)) and not(readonly)]")) {
    LvDisk d;
    d.dev = doc.text("target/@dev", n).value_or("");
    d.format = doc.text("driver/@type", n).value_or("raw");
    d.source = doc.text("source/@file", n).value_or(doc.text("source/@dev", n).value_or(""));
    d.index = std::atoi(doc.text("source/@index", n).value_or("-1").c_str());
    if (d.dev.empty())
      return Status::error(Errc::protocol, "domain " + domain + ": a disk without target dev");
    out.push_back(std::move(d));
  }
  if (out.empty())
    return Status::error(Errc::invalid_argument,
                         "domain " + domain + " has no writable disk to protect");
  if (out.size() > kMaxDisks)
    return Status::error(Errc::invalid_argument,
                         fmt::format("domain {} has {} disks, more than {}", domain, out.size(), kMaxDisks));
  return out;
}

Result<Ledger> load_ledger(const std::string& path) {
  if (::access(path.c_str(), F_OK) != 0) return Ledger{};
  FERRY_ASSIGN_OR_RETURN(std::string text, read_file(path));
  try {
    Ledger l;
    json j = json::parse(text);
    for (const auto& [dev, d] : j.at("disks").items())
      l[dev] = {d.at("rp").get<std::uint64_t>(), d.at("checkpoint").get<std::string>()};
    return l;
  } catch (const json::exception& e) {
    return Status::error(Errc::corrupt, fmt::format("ledger {}: {}", path, e.what()));
  }
}

std::string ledger_text(const Ledger& l, const std::string& domain, const std::string& group) {
  json disks = json::object();
  for (const auto& [dev, d] : l) disks[dev] = {{"rp", d.rp}, {"checkpoint", d.checkpoint}};
  return json{{"version", 1}, {"domain", domain}, {"group", group}, {"disks", disks}}.dump(2) + "\n";
}

// Per disk: full or incremental, and from which checkpoint. An incremental from a checkpoint
// older than base covers a superset of the writes since base, so it is still exact for the
// receiver (a block may be sent that did not change since base, never the reverse).
void decide(DiskRun& d, std::uint64_t base_rp, bool receiver_has, const LedgerDisk* ledger,
            const NodeBitmaps* node, bool metadata_ok) {
  d.granularity_bytes = node && node->cluster_bytes ? node->cluster_bytes : kDefaultGranularityBytes;
  if (!d.disk.qcow2()) { d.reason = FullReason::no_checkpoint; return; }
  if (base_rp == 0) { d.reason = FullReason::first_rp; return; }
  if (!receiver_has) { d.reason = FullReason::new_disk; return; }
  if (!ledger || ledger->checkpoint.empty() || ledger->rp > base_rp || !node) {
    d.reason = FullReason::no_bitmap;
    return;
  }
  auto b = node->bitmaps.find(ledger->checkpoint);
  if (b == node->bitmaps.end()) { d.reason = FullReason::no_bitmap; return; }
  if (b->second.inconsistent) { d.reason = FullReason::bitmap_inconsistent; return; }
  if (b->second.busy) { d.reason = FullReason::bitmap_busy; return; }
  if (!metadata_ok) { d.reason = FullReason::no_bitmap; return; }  // heal could not redefine
  d.reason = FullReason::none;
  d.incremental_from = ledger->checkpoint;
  if (b->second.granularity_bytes) d.granularity_bytes = b->second.granularity_bytes;
}

class LibvirtSource final : public LibvirtMember {
 public:
  LibvirtSource(LibvirtSourceOptions opt, lv::Conn conn, lv::Domain dom, std::vector<LvDisk> disks)
      : opt_(std::move(opt)), conn_(std::move(conn)), dom_(std::move(dom)), disks_(std::move(disks)),
        prefix_("ferry." + opt_.group + ".") {}

  std::vector<std::string> disk_names() const override {
    std::vector<std::string> out;
    for (const LvDisk& d : disks_) out.push_back(d.dev);
    return out;
  }
  Result<Capture> capture(std::uint64_t base_rp, std::uint64_t rp_id,
                          const std::vector<std::string>& receiver_disks) override;
  Status release_views(Capture& capture) override;
  Status finish(Capture& capture, bool acknowledged) override;

  // LibvirtMember / GroupMember: the phases of capture() for a group's instant.
  Status prepare(std::uint64_t base_rp, std::uint64_t rp_id,
                 const std::vector<std::string>& receiver_disks) override;
  Result<Capture> complete() override;
  const std::string& prepared_config() const override { return pending_->vm_config; }
  const std::string& member_name() const override { return opt_.domain; }
  Status freeze() override;
  Status thaw() override;
  Status suspend() override;
  Status resume() override;
  Status start_job() override;
  void abandon_job() override;

 private:
  std::string ledger_path() const { return opt_.work_dir + "/ledger.json"; }
  std::string nbd_socket() const { return opt_.work_dir + "/nbd.sock"; }
  std::string scratch_path(const std::string& dev) const {
    return opt_.work_dir + "/scratch-" + dev + ".qcow2";
  }
  std::string checkpoint_name(std::uint64_t rp) const { return prefix_ + std::to_string(rp); }

  Status refresh_disks();
  Status clear_jobs();
  Status wait_job_gone();
  Result<std::map<std::string, NodeBitmaps>> query_bitmaps();
  Result<std::map<std::string, std::string>> list_checkpoints();  // name -> parent
  Status heal(Ledger& ledger, std::uint64_t base_rp, std::map<std::string, NodeBitmaps>& nodes,
              std::map<std::string, std::string>& checkpoints);
  Status remove_inconsistent(std::map<std::string, NodeBitmaps>& nodes,
                             std::map<std::string, std::string>& checkpoints);
  Status redefine(const std::string& name, const std::string& parent,
                  const std::map<std::string, NodeBitmaps>& nodes);
  Status delete_checkpoint(const std::string& name, unsigned flags = 0);
  std::string backup_xml(const CaptureState& st) const;
  std::string checkpoint_xml(const CaptureState& st) const;
  Status begin_backup(CaptureState& st, bool& app_consistent);
  Status read_backup_xml(CaptureState& st);
  Status release(CaptureState& st);

  LibvirtSourceOptions opt_;
  lv::Conn conn_;
  lv::Domain dom_;
  std::vector<LvDisk> disks_;
  std::string prefix_;
  bool warned_no_agent_ = false;
  // The definition the receiver acknowledged last (with an RP of this process): a capture
  // sends the domain's XML only when it differs, so the first RP of a process always has it.
  std::string acked_config_;
  std::string domain_config();
  std::weak_ptr<CaptureState> active_;
  // Between prepare() and complete() (or abandon_job()).
  std::shared_ptr<CaptureState> pending_;
  Capture pending_cap_;
};

// The domain's definition as one would define it elsewhere: the persistent (inactive) config
// of a defined domain, without runtime-only parts (MIGRATABLE) and without secrets (no
// VIR_DOMAIN_XML_SECURE). A definition that cannot be read costs the RP its definition,
// never the RP: the capture goes on and the next one tries again.
std::string LibvirtSource::domain_config() {
  std::string xml = lv::take_string(
      virDomainGetXMLDesc(dom_.get(), VIR_DOMAIN_XML_INACTIVE | VIR_DOMAIN_XML_MIGRATABLE));
  if (xml.empty())
    spdlog::warn("the definition of domain {} could not be read, the RP goes without it: {}",
                 opt_.domain, lv::last_error("XML of domain " + opt_.domain).to_string());
  return xml;
}

// Source indexes (and so QEMU node names) change when the domain restarts: re-read them.
Status LibvirtSource::refresh_disks() {
  int active = virDomainIsActive(dom_.get());
  if (active < 0) return lv::last_error("domain " + opt_.domain);
  if (active == 0)
    return Status::error(Errc::invalid_argument, "domain " + opt_.domain + " is not running")
        .set_retryable();
  std::string xml = lv::take_string(virDomainGetXMLDesc(dom_.get(), 0));
  if (xml.empty()) return lv::last_error("XML of domain " + opt_.domain);
  FERRY_ASSIGN_OR_RETURN(auto now, parse_disks(xml, opt_.domain));
  if (now.size() != disks_.size())
    return Status::error(Errc::invalid_argument,
                         fmt::format("domain {} now has {} disks, the group has {}", opt_.domain,
                                     now.size(), disks_.size()));
  for (std::size_t i = 0; i < now.size(); ++i) {
    if (now[i].dev != disks_[i].dev)
      return Status::error(Errc::invalid_argument, fmt::format("domain {}: disk {} became {}",
                                                               opt_.domain, disks_[i].dev, now[i].dev));
  }
  disks_ = std::move(now);
  return Status::ok();
}

Status LibvirtSource::wait_job_gone() {
  auto deadline = std::chrono::steady_clock::now() + kJobEndTimeout;
  for (;;) {
    virDomainJobInfo info{};
    if (virDomainGetJobInfo(dom_.get(), &info) < 0) return lv::last_error("job of domain " + opt_.domain);
    if (info.type == VIR_DOMAIN_JOB_NONE) return Status::ok();
    if (std::chrono::steady_clock::now() > deadline)
      return Status::error(Errc::timeout, "the backup job of domain " + opt_.domain + " does not end")
          .set_retryable();
    std::this_thread::sleep_for(kJobPoll);
  }
}

// A backup job of ours (our NBD socket) is what a killed Ferry left: abort it. Any other job
// belongs to someone else: busy, and nothing is touched.
Status LibvirtSource::clear_jobs() {
  virDomainJobInfo info{};
  if (virDomainGetJobInfo(dom_.get(), &info) < 0) return lv::last_error("job of domain " + opt_.domain);
  if (info.type == VIR_DOMAIN_JOB_NONE) return Status::ok();
  std::string xml = lv::take_string(virDomainBackupGetXMLDesc(dom_.get(), 0));
  if (xml.empty()) {
    (void)lv::last_error("");  // not a backup job
    return Status::error(Errc::busy, fmt::format("domain {} already runs a job (type {}) that is "
                                                 "not a backup", opt_.domain, info.type))
        .set_retryable();
  }
  FERRY_ASSIGN_OR_RETURN(lv::XmlDoc doc, lv::XmlDoc::parse(xml, "backup of domain " + opt_.domain));
  std::string socket = doc.text("/domainbackup/server/@socket").value_or("");
  if (socket != nbd_socket())
    return Status::error(Errc::busy, fmt::format("domain {} already runs a backup job that is not "
                                                 "Ferry's (NBD server {})", opt_.domain,
                                                 socket.empty() ? "none/push mode" : socket))
        .set_retryable();
  spdlog::warn("domain {}: aborting a backup job a previous Ferry run left", opt_.domain);
  if (virDomainAbortJob(dom_.get()) < 0) return lv::last_error("aborting the leftover backup of " + opt_.domain);
  return wait_job_gone();
}

// Bitmap state comes from QEMU through the monitor passthrough: libvirt 9.0 has no API that
// says whether a checkpoint's bitmap exists or is inconsistent (a QEMU killed while it was in
// use), and Ferry must know before trusting it. The command only reads.
Result<std::map<std::string, NodeBitmaps>> LibvirtSource::query_bitmaps() {
  char* reply = nullptr;
  if (virDomainQemuMonitorCommand(dom_.get(), R"({"execute":"query-named-block-nodes","arguments":{"flat":true}})",
                                  &reply, 0) < 0)
    return lv::last_error("query-named-block-nodes on domain " + opt_.domain);
  std::string text = lv::take_string(reply);
  std::map<std::string, NodeBitmaps> out;  // by disk dev
  try {
    json j = json::parse(text);
    for (const json& n : j.at("return")) {
      std::string node = n.value("node-name", "");
      for (const LvDisk& d : disks_) {
        if (node != fmt::format("libvirt-{}-format", d.index)) continue;
        NodeBitmaps nb;
        nb.cluster_bytes = n.value("image", json::object()).value("cluster-size", std::uint32_t{0});
        for (const json& b : n.value("dirty-bitmaps", json::array()))
          nb.bitmaps[b.value("name", "")] = {b.value("inconsistent", false), b.value("busy", false),
                                             b.value("granularity", std::uint32_t{0})};
        out[d.dev] = std::move(nb);
      }
    }
  } catch (const json::exception& e) {
    return Status::error(Errc::protocol, fmt::format("query-named-block-nodes on domain {}: {}",
                                                     opt_.domain, e.what()));
  }
  return out;
}

Result<std::map<std::string, std::string>> LibvirtSource::list_checkpoints() {
  virDomainCheckpointPtr* raw = nullptr;
  int n = virDomainListAllCheckpoints(dom_.get(), &raw, 0);
  if (n < 0) return lv::last_error("checkpoints of domain " + opt_.domain);
  std::vector<lv::Checkpoint> cps;
  for (int i = 0; i < n; ++i) cps.emplace_back(raw[i]);
  std::free(raw);
  if (cps.size() > kMaxCheckpoints)
    return Status::error(Errc::invalid_argument, fmt::format("domain {} has {} checkpoints", opt_.domain, n));
  std::map<std::string, std::string> out;
  for (const lv::Checkpoint& c : cps) {
    std::string parent;
    if (lv::Checkpoint p{virDomainCheckpointGetParent(c.get(), 0)}) parent = virDomainCheckpointGetName(p.get());
    else (void)lv::last_error("");  // no parent: the root of the chain
    out[virDomainCheckpointGetName(c.get())] = parent;
  }
  return out;
}

Status LibvirtSource::delete_checkpoint(const std::string& name, unsigned flags) {
  lv::Checkpoint cp{virDomainCheckpointLookupByName(dom_.get(), name.c_str(), 0)};
  if (!cp) return lv::last_error(fmt::format("checkpoint {} of domain {}", name, opt_.domain));
  if (virDomainCheckpointDelete(cp.get(), flags) < 0)
    return lv::last_error(fmt::format("deleting checkpoint {} of domain {}", name, opt_.domain));
  return Status::ok();
}

// Re-creates lost checkpoint metadata for a bitmap that QEMU still has and reports
// consistent (a transient domain restarted on the same qcow2, or metadata deleted by hand).
Status LibvirtSource::redefine(const std::string& name, const std::string& parent,
                               const std::map<std::string, NodeBitmaps>& nodes) {
  std::string disks;
  for (const LvDisk& d : disks_) {
    auto n = nodes.find(d.dev);
    bool has = n != nodes.end() && n->second.bitmaps.count(name);
    disks += has ? fmt::format("<disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
                               lv::xml_escape(d.dev), lv::xml_escape(name))
                 : fmt::format("<disk name='{}' checkpoint='no'/>", lv::xml_escape(d.dev));
  }
  std::string xml = fmt::format("<domaincheckpoint><name>{}</name>{}<creationTime>{}</creationTime>"
                                "<disks>{}</disks></domaincheckpoint>",
                                lv::xml_escape(name),
                                parent.empty() ? "" : "<parent><name>" + lv::xml_escape(parent) + "</name></parent>",
                                ::time(nullptr), disks);
  lv::Checkpoint cp{virDomainCheckpointCreateXML(dom_.get(), xml.c_str(),
                                                 VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)};
  if (!cp) return lv::last_error(fmt::format("redefining checkpoint {} of domain {}", name, opt_.domain));
  spdlog::warn("domain {}: checkpoint {} had lost its metadata; redefined (bitmap intact)", opt_.domain, name);
  return Status::ok();
}

// An inconsistent bitmap can only be removed (QEMU refuses to merge, disable or export it),
// and libvirt's checkpoint delete would try to merge it: drop the metadata, then the bitmap.
Status LibvirtSource::remove_inconsistent(std::map<std::string, NodeBitmaps>& nodes,
                                          std::map<std::string, std::string>& checkpoints) {
  for (const LvDisk& d : disks_) {
    auto n = nodes.find(d.dev);
    if (n == nodes.end()) continue;
    for (const auto& [name, b] : n->second.bitmaps) {
      if (!b.inconsistent || !rp_of(prefix_, name)) continue;
      spdlog::warn("domain {} disk {}: bitmap {} is inconsistent (QEMU was killed?): removing it",
                   opt_.domain, d.dev, name);
      if (checkpoints.erase(name))
        FERRY_TRY(delete_checkpoint(name, VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY));
      std::string cmd = json{{"execute", "block-dirty-bitmap-remove"},
                             {"arguments", {{"node", fmt::format("libvirt-{}-format", d.index)},
                                            {"name", name}}}}.dump();
      char* reply = nullptr;
      if (virDomainQemuMonitorCommand(dom_.get(), cmd.c_str(), &reply, 0) < 0)
        return lv::last_error(fmt::format("removing bitmap {} of disk {}", name, d.dev));
      lv::take_string(reply);
    }
  }
  return Status::ok();
}

// Reconciles ledger, checkpoint metadata and bitmaps so that at most the ledger's checkpoint
// of this group remains, with metadata, and every unacknowledged checkpoint's bits merged
// into it. The decision table (L1-L6) is in docs/change-tracking.md.
Status LibvirtSource::heal(Ledger& ledger, std::uint64_t base_rp,
                           std::map<std::string, NodeBitmaps>& nodes,
                           std::map<std::string, std::string>& checkpoints) {
  FERRY_TRY(remove_inconsistent(nodes, checkpoints));  // L3
  std::map<std::uint64_t, std::string> ours;  // every name of ours, metadata or bitmap
  for (const auto& [name, parent] : checkpoints)
    if (auto rp = rp_of(prefix_, name)) ours[*rp] = name;
  std::set<std::string> orphans;
  for (const auto& [dev, nb] : nodes)
    for (const auto& [name, b] : nb.bitmaps)
      if (auto rp = rp_of(prefix_, name); rp && !b.inconsistent && !checkpoints.count(name)) {
        ours[*rp] = name;
        orphans.insert(name);
      }
  // L4: redefine orphans in RP order, each the child of the previous, as libvirt made them.
  std::string parent;
  for (const auto& [rp, name] : ours) {
    if (orphans.count(name)) {
      FERRY_TRY(redefine(name, parent, nodes));
      checkpoints[name] = parent;
    }
    parent = name;
  }
  std::uint64_t acked = 0;
  for (const auto& [dev, l] : ledger) acked = std::max(acked, l.rp);
  // L7: the receiver committed an RP whose acknowledgement never arrived (finish(ack=false)
  // keeps its checkpoint) or whose finish never ran. Its checkpoint was created atomically
  // with that RP's view, so it is exactly the base the receiver holds: the ledger takes it.
  if (base_rp > acked && ours.count(base_rp)) {
    const std::string& name = ours[base_rp];
    spdlog::info("domain {}: RP {} was committed but not acknowledged: continuing from its "
                 "checkpoint {}", opt_.domain, base_rp, name);
    for (const LvDisk& d : disks_) ledger[d.dev] = {base_rp, d.qcow2() ? name : ""};
    FERRY_TRY(write_file_atomic(ledger_path(), ledger_text(ledger, opt_.domain, opt_.group)));
    acked = base_rp;
  }
  // L5: unacknowledged checkpoints (a capture whose finish never ran), newest first so each
  // merges into its parent; L6: older than the ledger's, stale.
  for (auto it = ours.rbegin(); it != ours.rend(); ++it) {
    if (it->first <= acked) continue;
    spdlog::warn("domain {}: checkpoint {} was never acknowledged: merging it into its parent",
                 opt_.domain, it->second);
    FERRY_TRY(delete_checkpoint(it->second));
    checkpoints.erase(it->second);
  }
  for (const auto& [rp, name] : ours) {
    if (rp >= acked) continue;
    FERRY_TRY(delete_checkpoint(name));
    checkpoints.erase(name);
  }
  return Status::ok();
}

std::string LibvirtSource::backup_xml(const CaptureState& st) const {
  std::string disks;
  for (const DiskRun& d : st.disks) {
    std::string mode = d.incremental_from.empty()
                           ? "backupmode='full'"
                           : "backupmode='incremental' incremental='" + lv::xml_escape(d.incremental_from) + "'";
    disks += fmt::format("<disk name='{}' backup='yes' type='file' {}><scratch file='{}'/></disk>",
                         lv::xml_escape(d.disk.dev), mode, lv::xml_escape(scratch_path(d.disk.dev)));
  }
  return fmt::format("<domainbackup mode='pull'><server transport='unix' socket='{}'/>"
                     "<disks>{}</disks></domainbackup>",
                     lv::xml_escape(nbd_socket()), disks);
}

std::string LibvirtSource::checkpoint_xml(const CaptureState& st) const {
  std::string disks;
  for (const DiskRun& d : st.disks)
    disks += fmt::format("<disk name='{}' checkpoint='{}'/>", lv::xml_escape(d.disk.dev),
                         d.disk.qcow2() ? "bitmap" : "no");
  return fmt::format("<domaincheckpoint><name>{}</name><disks>{}</disks></domaincheckpoint>",
                     lv::xml_escape(st.new_checkpoint), disks);
}

// Freeze, begin, thaw at once: the guest is frozen only for the instant the job starts.
Status LibvirtSource::begin_backup(CaptureState& st, bool& app_consistent) {
  bool frozen = false;
  if (opt_.quiesce) {
    auto secs = std::max<long long>(1, std::chrono::duration_cast<std::chrono::seconds>(opt_.freeze_timeout).count());
    if (virDomainAgentSetResponseTimeout(dom_.get(), static_cast<int>(secs), 0) < 0 ||
        virDomainFSFreeze(dom_.get(), nullptr, 0, 0) < 0) {
      Status s = lv::last_error("freezing the file systems of domain " + opt_.domain);
      if (!warned_no_agent_) spdlog::warn("{}: RPs are crash-consistent, not application-consistent", s.to_string());
      warned_no_agent_ = true;
    } else {
      frozen = true;
    }
  }
  std::string bxml = backup_xml(st);
  std::string cxml = st.new_checkpoint.empty() ? "" : checkpoint_xml(st);
  int rc = virDomainBackupBegin(dom_.get(), bxml.c_str(), cxml.empty() ? nullptr : cxml.c_str(), 0);
  Status begun = rc < 0 ? lv::last_error("starting the backup of domain " + opt_.domain) : Status::ok();
  if (frozen && virDomainFSThaw(dom_.get(), nullptr, 0, 0) < 0)
    spdlog::error("{}", lv::last_error("THAWING domain " + opt_.domain + " (guest may stay frozen)").to_string());
  if (!begun) {
    if (begun.message().find("already") != std::string::npos) {
      return Status::error(Errc::busy, begun.message()).set_retryable();
    }
    return begun;
  }
  st.job_active = true;
  app_consistent = frozen;
  return Status::ok();
}

Status LibvirtSource::read_backup_xml(CaptureState& st) {
  std::string xml = lv::take_string(virDomainBackupGetXMLDesc(dom_.get(), 0));
  if (xml.empty()) return lv::last_error("backup of domain " + opt_.domain);
  FERRY_ASSIGN_OR_RETURN(lv::XmlDoc doc, lv::XmlDoc::parse(xml, "backup of domain " + opt_.domain));
  for (DiskRun& d : st.disks) {
    std::string path = "/domainbackup/disks/disk[@name='" + d.disk.dev + "']";
    d.export_name = doc.text((path + "/@exportname").c_str()).value_or(d.disk.dev);
    d.export_bitmap = doc.text((path + "/@exportbitmap").c_str()).value_or("");
    if (!d.incremental_from.empty() && d.export_bitmap.empty())
      return Status::error(Errc::protocol, fmt::format("backup of domain {} exports no bitmap for "
                                                       "incremental disk {}", opt_.domain, d.disk.dev));
    virDomainBlockInfo info{};
    if (virDomainGetBlockInfo(dom_.get(), d.disk.dev.c_str(), &info, 0) < 0)
      return lv::last_error(fmt::format("size of disk {} of domain {}", d.disk.dev, opt_.domain));
    d.size_bytes = info.capacity;
  }
  return Status::ok();
}

// A disk's identity is derived, not stored: the target and the source path name one disk
// wherever and however often the domain starts (a transient domain gets a new UUID at every
// `virsh create`; a live migration on shared storage keeps both), and a target that now
// points at another file or device gets another identity, so it is never sent as an
// incremental on the old one's replica. Nothing to lose with the ledger, nothing to keep in
// step with it. Two hosts whose domains use the same target and image path look alike.
Hash128 disk_identity(const LvDisk& d) {
  std::string key = "ferry-libvirt-disk\n" + d.dev + "\n" + d.source;
  return xxh3_128(key.data(), key.size());
}

Status LibvirtSource::prepare(std::uint64_t base_rp, std::uint64_t rp_id,
                              const std::vector<std::string>& receiver_disks) {
  FERRY_ASSERT(rp_id > base_rp);
  FERRY_ASSERT_MSG(active_.expired() && !pending_, "capture() before finish() of the previous capture");
  FERRY_TRY(refresh_disks());
  FERRY_TRY(clear_jobs());
  for (const LvDisk& d : disks_) ::unlink(scratch_path(d.dev).c_str());  // a killed run's
  FERRY_ASSIGN_OR_RETURN(Ledger ledger, load_ledger(ledger_path()));
  FERRY_ASSIGN_OR_RETURN(auto nodes, query_bitmaps());
  FERRY_ASSIGN_OR_RETURN(auto checkpoints, list_checkpoints());
  FERRY_TRY(heal(ledger, base_rp, nodes, checkpoints));

  auto st = std::make_shared<CaptureState>();
  st->base_rp = base_rp;
  st->rp_id = rp_id;
  std::set<std::string> held(receiver_disks.begin(), receiver_disks.end());
  for (const LvDisk& d : disks_) {
    DiskRun run;
    run.disk = d;
    auto l = ledger.find(d.dev);
    auto n = nodes.find(d.dev);
    bool metadata = l != ledger.end() && checkpoints.count(l->second.checkpoint);
    decide(run, base_rp, held.count(d.dev) > 0, l == ledger.end() ? nullptr : &l->second,
           n == nodes.end() ? nullptr : &n->second, metadata);
    if (d.qcow2()) st->new_checkpoint = checkpoint_name(rp_id);
    spdlog::info("domain {} disk {}: {}{}", opt_.domain, d.dev, full_reason_name(run.reason),
                 run.incremental_from.empty() ? "" : " from checkpoint " + run.incremental_from);
    st->disks.push_back(std::move(run));
  }
  if (checkpoints.count(st->new_checkpoint))
    return Status::error(Errc::invalid_argument, fmt::format("domain {}: checkpoint {} already "
                         "exists, but RP {} is newer than every acknowledged RP", opt_.domain,
                         st->new_checkpoint, rp_id));

  Capture cap;
  cap.base_rp = base_rp;
  cap.rp_id = rp_id;
  cap.created_unix_ns = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  st->vm_config = domain_config();
  if (st->vm_config != acked_config_) cap.vm_config = st->vm_config;
  pending_ = std::move(st);
  pending_cap_ = std::move(cap);
  return Status::ok();
}

Status LibvirtSource::start_job() {
  FERRY_ASSERT(pending_ && !pending_->job_active);
  return begin_backup(*pending_, pending_cap_.app_consistent);
}

void LibvirtSource::abandon_job() {
  if (!pending_) return;
  if (Status s = release(*pending_); !s.is_ok())
    spdlog::warn("domain {}: ending the abandoned backup job: {}", opt_.domain, s.to_string());
  pending_.reset();
}

Result<Capture> LibvirtSource::complete() {
  FERRY_ASSERT(pending_ && pending_->job_active);
  std::shared_ptr<CaptureState> st = std::move(pending_);
  pending_.reset();
  Capture cap = std::move(pending_cap_);
  if (Status s = read_backup_xml(*st); !s.is_ok()) {
    (void)release(*st);
    return s;
  }
  for (const DiskRun& d : st->disks) {
    DiskView v;
    v.name = d.disk.dev;
    v.node = d.disk.index >= 0 ? fmt::format("libvirt-{}-format", d.disk.index) : "";
    v.size_bytes = d.size_bytes;
    v.granularity_bytes = d.granularity_bytes;
    v.full_reason = d.reason;
    v.identity = disk_identity(d.disk);
    v.nbd_socket = nbd_socket();
    v.export_name = d.export_name;
    if (d.reason == FullReason::none) v.dirty_context = "qemu:dirty-bitmap:" + d.export_bitmap;
    cap.disks.push_back(std::move(v));
  }
  active_ = st;
  cap.state = st;
  return cap;
}

Result<Capture> LibvirtSource::capture(std::uint64_t base_rp, std::uint64_t rp_id,
                                       const std::vector<std::string>& receiver_disks) {
  FERRY_TRY(prepare(base_rp, rp_id, receiver_disks));
  if (Status s = start_job(); !s.is_ok()) {
    pending_.reset();
    return s;
  }
  return complete();
}

Status LibvirtSource::freeze() {
  auto secs = std::max<long long>(1, std::chrono::duration_cast<std::chrono::seconds>(opt_.freeze_timeout).count());
  if (virDomainAgentSetResponseTimeout(dom_.get(), static_cast<int>(secs), 0) < 0 ||
      virDomainFSFreeze(dom_.get(), nullptr, 0, 0) < 0)
    return lv::last_error("freezing the file systems of domain " + opt_.domain);
  return Status::ok();
}

Status LibvirtSource::thaw() {
  if (virDomainFSThaw(dom_.get(), nullptr, 0, 0) < 0)
    return lv::last_error("thawing the file systems of domain " + opt_.domain);
  return Status::ok();
}

Status LibvirtSource::suspend() {
  if (virDomainSuspend(dom_.get()) < 0) return lv::last_error("pausing domain " + opt_.domain);
  return Status::ok();
}

Status LibvirtSource::resume() {
  if (virDomainResume(dom_.get()) < 0) return lv::last_error("resuming domain " + opt_.domain);
  return Status::ok();
}

// The pull backup lives until aborted. A job that is already gone ended early (scratch full,
// QEMU error): reads after that instant may have seen new guest data.
Status LibvirtSource::release(CaptureState& st) {
  if (!st.job_active) return Status::ok();
  st.job_active = false;
  std::string xml = lv::take_string(virDomainBackupGetXMLDesc(dom_.get(), 0));
  if (xml.empty()) {
    Status s = lv::last_error("backup of domain " + opt_.domain);
    return Status::error(Errc::external, fmt::format("the backup job of domain {} ended before Ferry "
                         "released it; do not commit RP {} ({})", opt_.domain, st.rp_id, s.message()))
        .set_data_lost();
  }
  if (virDomainAbortJob(dom_.get()) < 0) return lv::last_error("ending the backup of domain " + opt_.domain);
  return wait_job_gone();
}

Status LibvirtSource::release_views(Capture& capture) {
  auto st = std::static_pointer_cast<CaptureState>(capture.state);
  FERRY_ASSERT(st != nullptr);
  return release(*st);
}

Status LibvirtSource::finish(Capture& capture, bool acknowledged) {
  auto st = std::static_pointer_cast<CaptureState>(capture.state);
  FERRY_ASSERT(st != nullptr && !st->finished);
  st->finished = true;
  Status released = release(*st);
  if (!acknowledged) {
    // Not acknowledged is not necessarily not committed: the new checkpoint stays, and the
    // next capture either continues from it (the receiver says it holds this RP: L7) or
    // deletes it, merging its bits into its parent, the ledger's checkpoint (L5). Deleting it
    // here made a lost ack cost a re-send of the whole interval.
    return released;
  }
  acked_config_ = st->vm_config;
  FERRY_TRY(released);
  FERRY_ASSIGN_OR_RETURN(Ledger ledger, load_ledger(ledger_path()));
  for (const DiskRun& d : st->disks)
    ledger[d.disk.dev] = {st->rp_id, d.disk.qcow2() ? st->new_checkpoint : ""};
  FERRY_TRY(write_file_atomic(ledger_path(), ledger_text(ledger, opt_.domain, opt_.group)));
  FERRY_ASSIGN_OR_RETURN(auto checkpoints, list_checkpoints());
  for (const auto& [name, parent] : checkpoints) {
    auto rp = rp_of(prefix_, name);
    if (rp && *rp < st->rp_id) FERRY_TRY(delete_checkpoint(name));
  }
  return Status::ok();
}

Result<lv::Domain> lookup_domain(virConnectPtr conn, const std::string& name) {
  if (virDomainPtr d = virDomainLookupByName(conn, name.c_str())) return lv::Domain(d);
  Status by_name = lv::last_error("domain " + name);
  if (virDomainPtr d = virDomainLookupByUUIDString(conn, name.c_str())) return lv::Domain(d);
  (void)lv::last_error("");
  if (by_name.code() == Errc::not_found)
    return Status::error(Errc::not_found, "no libvirt domain named " + name);
  return by_name;
}

}  // namespace

Result<std::unique_ptr<ChangeSource>> open_libvirt_source(const LibvirtSourceOptions& options) {
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<LibvirtMember> m, open_libvirt_member(options));
  return std::unique_ptr<ChangeSource>(std::move(m));
}

Result<std::unique_ptr<LibvirtMember>> open_libvirt_member(const LibvirtSourceOptions& options) {
  LibvirtSourceOptions opt = options;
  if (opt.group.empty()) opt.group = opt.domain;
  if (opt.domain.empty()) return Status::error(Errc::invalid_argument, "no libvirt domain given");
  if (!valid_group(opt.group))
    return Status::error(Errc::invalid_argument, "group name '" + opt.group +
                         "' must be 1-64 letters, digits, '-' or '_'");
  if (opt.work_dir.empty()) return Status::error(Errc::invalid_argument, "no work dir for domain " + opt.domain);
  if ((opt.work_dir + "/nbd.sock").size() >= sizeof(sockaddr_un{}.sun_path))
    return Status::error(Errc::invalid_argument, "work dir " + opt.work_dir + " is too long for a unix socket path");
  FERRY_TRY(make_dirs(opt.work_dir));
  lv::install_quiet_error_handler();
  lv::Conn conn{virConnectOpen(opt.uri.c_str())};
  if (!conn) {
    Status s = lv::last_error("connecting");
    return Status::error(Errc::disconnected, fmt::format("libvirtd is not reachable at {} ({})", opt.uri, s.message()))
        .set_retryable();
  }
  unsigned long version = 0;
  if (virConnectGetLibVersion(conn.get(), &version) < 0) return lv::last_error("libvirt version at " + opt.uri);
  if (version < kMinLibvirtVersion)
    return Status::error(Errc::unsupported, fmt::format("libvirt at {} is {}.{}.{}; Ferry needs 7.6 or later "
                         "(per-disk incremental backups)", opt.uri, version / 1000000, version / 1000 % 1000, version % 1000));
  FERRY_ASSIGN_OR_RETURN(lv::Domain dom, lookup_domain(conn.get(), opt.domain));
  int active = virDomainIsActive(dom.get());
  if (active < 0) return lv::last_error("domain " + opt.domain);
  if (active == 0) return Status::error(Errc::invalid_argument, "domain " + opt.domain + " is not running");
  std::string xml = lv::take_string(virDomainGetXMLDesc(dom.get(), 0));
  if (xml.empty()) return lv::last_error("XML of domain " + opt.domain);
  FERRY_ASSIGN_OR_RETURN(auto disks, parse_disks(xml, opt.domain));
  for (const LvDisk& d : disks)
    if (!d.qcow2())
      spdlog::warn("domain {} disk {} is {}: it cannot carry a checkpoint, every RP reads it in full",
                   opt.domain, d.dev, d.format);
  return std::unique_ptr<LibvirtMember>(
      new LibvirtSource(std::move(opt), std::move(conn), std::move(dom), std::move(disks)));
}

}  // namespace ferry::cbt
