// ChangeSource over QMP: dirty bitmaps, image fleecing and NBD exports in QEMU or
// qemu-storage-daemon. The bitmap life cycle and the healing table are in healing.h and
// docs/change-tracking.md.
//
// Every temporary object Ferry creates in QEMU (scratch and overlay nodes, backup jobs,
// exports, the NBD server's socket) carries the prefix "ferry-<hash of group>-", so a source
// that was killed mid-RP leaves nothing a new source cannot find and remove.
#include "ferry/cbt/qmp_source.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "ferry/base/fd.h"
#include "ferry/base/hash.h"
#include "ferry/base/kill_point.h"
#include "ferry/base/log.h"
#include "healing.h"
#include "qmp_client.h"

namespace ferry::cbt {

const char* full_reason_name(FullReason r) {
  switch (r) {
    case FullReason::none: return "incremental";
    case FullReason::first_rp: return "first_rp";
    case FullReason::no_bitmap: return "no_bitmap";
    case FullReason::bitmap_inconsistent: return "bitmap_inconsistent";
    case FullReason::bitmap_busy: return "bitmap_busy";
    case FullReason::new_disk: return "new_disk";
    case FullReason::no_checkpoint: return "no_checkpoint";
    case FullReason::new_identity: return "new_identity";
  }
  return "unknown";
}

namespace {

constexpr std::size_t kMaxDisks = 64;
constexpr std::size_t kMaxGroupNameBytes = 64;
constexpr std::uint32_t kDefaultGranularityBytes = 64 * 1024;
constexpr std::uint32_t kMinGranularityBytes = 512;             // QEMU's bounds
constexpr std::uint64_t kMaxGranularityBytes = 1ull << 31;

const char* const kRequiredCommands[] = {
    "transaction", "blockdev-backup", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
    "block-dirty-bitmap-merge", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
    "nbd-server-start", "nbd-server-stop", "block-export-add", "block-export-del",
    "blockdev-add", "blockdev-del", "blockdev-create", "query-named-block-nodes",
    "query-block-exports", "query-jobs", "job-cancel", "job-dismiss", "block-job-cancel"};

struct NodeInfo {
  std::string format;
  bool qcow2_v2 = false;  // compat 0.10: no persistent bitmaps
  std::uint64_t size_bytes = 0;
  std::uint32_t cluster_bytes = 0;
  std::vector<BitmapState> bitmaps;
};
using NodeMap = std::map<std::string, NodeInfo>;

// One disk's part of a capture: what was decided and which temporary objects exist.
struct DiskRun {
  std::size_t index = 0;
  QmpDisk disk;
  FullReason reason = FullReason::none;
  std::uint64_t size_bytes = 0;
  std::uint32_t granularity_bytes = 0;
  bool persistent = false;
  Hash128 identity;  // from the node's tag bitmap
  std::string scratch_path, scratch_node, overlay_node, create_job, backup_job, export_id,
      export_name;
  bool scratch_file = false, scratch_added = false, overlay_added = false, job_started = false,
       export_added = false;
  bool incremental() const { return reason == FullReason::none; }
};

struct CaptureState {
  std::uint64_t base_rp = 0, rp_id = 0;
  std::vector<DiskRun> disks;
  std::string nbd_socket;
  bool nbd_started = false;  // by us: stopped in release_views
  bool bitmaps_switched = false;  // the capture transaction ran
  bool finished = false;
};

json action(const char* type, json data) { return {{"type", type}, {"data", std::move(data)}}; }

// QMP replies are parsed here; nlohmann exceptions (a field of the wrong type) end here too.
Result<NodeMap> parse_nodes(const json& reply) {
  try {
    NodeMap nodes;
    for (const json& n : reply) {
      NodeInfo info;
      info.format = n.value("drv", std::string());
      const json& image = n.value("image", json::object());
      info.size_bytes = image.value("virtual-size", std::uint64_t{0});
      info.cluster_bytes = image.value("cluster-size", std::uint32_t{0});
      const json& fs = image.value("format-specific", json::object());
      info.qcow2_v2 = fs.value("data", json::object()).value("compat", std::string()) == "0.10";
      for (const json& b : n.value("dirty-bitmaps", json::array())) {
        info.bitmaps.push_back({b.value("name", std::string()), b.value("recording", false),
                                b.value("busy", false), b.value("inconsistent", false),
                                b.value("granularity", std::uint32_t{0})});
      }
      nodes[n.value("node-name", std::string())] = std::move(info);
    }
    return nodes;
  } catch (const json::exception& e) {
    return Status::error(Errc::protocol,
                         fmt::format("unexpected query-named-block-nodes reply: {}", e.what()));
  }
}

Result<std::vector<std::string>> string_field_list(const json& reply, const char* field,
                                                   const char* command) {
  try {
    std::vector<std::string> out;
    for (const json& x : reply) out.push_back(x.value(field, std::string()));
    return out;
  } catch (const json::exception& e) {
    return Status::error(Errc::protocol, fmt::format("unexpected {} reply: {}", command, e.what()));
  }
}

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }

bool unix_socket_listening(const std::string& path) {
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) return false;
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  return fd.valid() && ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
}

bool valid_group(const std::string& g) {
  if (g.empty() || g.size() > kMaxGroupNameBytes) return false;
  for (char c : g)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_')) return false;
  return true;
}

class QmpSource final : public ChangeSource {
 public:
  QmpSource(QmpSourceOptions opt, std::unique_ptr<QmpClient> qmp)
      : opt_(std::move(opt)), qmp_(std::move(qmp)) {
    prefix_ = fmt::format("ferry-{:08x}-",
                          static_cast<std::uint32_t>(xxh3_64(opt_.group.data(), opt_.group.size())));
  }

  Status probe();
  std::vector<std::string> disk_names() const override {
    std::vector<std::string> out;
    for (const auto& d : opt_.disks) out.push_back(d.name);
    return out;
  }
  Result<Capture> capture(std::uint64_t base_rp, std::uint64_t rp_id,
                          const std::vector<std::string>& receiver_disks) override;
  Status release_views(Capture& capture) override;
  Status finish(Capture& capture, bool acknowledged) override;

 private:
  Result<json> run(std::string_view cmd, const json& args) {
    return qmp_->execute(cmd, args, opt_.qmp_timeout);
  }
  Result<NodeMap> query_nodes();
  Status check_nodes_exist(const NodeMap& nodes) const;
  void clean_leftovers();
  Status read_identities(const NodeMap& nodes, CaptureState& st);
  Status heal(const NodeMap& nodes, std::uint64_t base_rp,
              const std::vector<std::string>& receiver_disks, CaptureState& st);
  Status prepare_overlay(DiskRun& d);
  Status switch_bitmaps(CaptureState& st);
  Status start_nbd_server(CaptureState& st);
  Status export_views(CaptureState& st);
  Status release(CaptureState& st);
  Status release_disk(DiskRun& d);
  Status restore_bitmaps(CaptureState& st);
  Status wait_job_gone(const std::string& job_id);
  Status delete_export(const std::string& id);
  std::string own_nbd_socket() const { return opt_.work_dir + "/" + prefix_ + "nbd.sock"; }

  QmpSourceOptions opt_;
  std::unique_ptr<QmpClient> qmp_;
  std::string prefix_;
  std::weak_ptr<CaptureState> active_;  // temporary names are per group: one capture at a time
};

Result<NodeMap> QmpSource::query_nodes() {
  FERRY_ASSIGN_OR_RETURN(json reply, run("query-named-block-nodes", {{"flat", true}}));
  return parse_nodes(reply);
}

Status QmpSource::check_nodes_exist(const NodeMap& nodes) const {
  for (const QmpDisk& d : opt_.disks) {
    if (!nodes.count(d.node))
      return Status::error(Errc::not_found,
                           fmt::format("block node '{}' (disk '{}') does not exist in QEMU at {}",
                                       d.node, d.name, opt_.qmp_socket));
  }
  return Status::ok();
}

Status QmpSource::probe() {
  const QemuVersion& v = qmp_->version();
  if (v.major < 7)
    return Status::error(Errc::unsupported,
                         fmt::format("QEMU at {} is {}.{}.{}; Ferry needs 7.0 or later "
                                     "(blockdev-backup fleecing, block-export-add with bitmaps)",
                                     opt_.qmp_socket, v.major, v.minor, v.micro));
  FERRY_ASSIGN_OR_RETURN(json cmds, run("query-commands", json::object()));
  FERRY_ASSIGN_OR_RETURN(auto names, string_field_list(cmds, "name", "query-commands"));
  std::set<std::string> have(names.begin(), names.end());
  std::string missing;
  for (const char* c : kRequiredCommands)
    if (!have.count(c)) missing += std::string(missing.empty() ? "" : ", ") + c;
  if (!missing.empty())
    return Status::error(Errc::unsupported, fmt::format("QEMU at {} lacks the QMP commands {}",
                                                        opt_.qmp_socket, missing));
  FERRY_ASSIGN_OR_RETURN(NodeMap nodes, query_nodes());
  return check_nodes_exist(nodes);
}

Status QmpSource::delete_export(const std::string& id) {
  // hard: a reader still connected must not keep the point-in-time view alive.
  auto r = run("block-export-del", {{"id", id}, {"mode", "hard"}});
  if (!r) return r.status().with_context("export " + id);
  auto ev = qmp_->wait_event(
      "BLOCK_EXPORT_DELETED", [&](const json& d) { return d.value("id", std::string()) == id; },
      opt_.qmp_timeout);
  return ev ? Status::ok() : ev.status().with_context("export " + id);
}

Status QmpSource::wait_job_gone(const std::string& job_id) {
  auto ev = qmp_->wait_event(
      "JOB_STATUS_CHANGE",
      [&](const json& d) {
        return d.value("id", std::string()) == job_id && d.value("status", std::string()) == "null";
      },
      opt_.qmp_timeout);
  return ev ? Status::ok() : ev.status().with_context("job " + job_id);
}

// Removes what a killed source left in QEMU: exports, jobs, nodes, scratch files. Best
// effort: what cannot be removed is logged and makes a later step fail with QEMU's message.
void QmpSource::clean_leftovers() {
  if (auto exports = run("query-block-exports", json::object())) {
    auto ids = string_field_list(*exports, "id", "query-block-exports");
    for (const std::string& id : ids ? *ids : std::vector<std::string>{}) {
      if (!starts_with(id, prefix_)) continue;
      spdlog::warn("group {}: removing leftover NBD export {}", opt_.group, id);
      if (Status s = delete_export(id); !s) spdlog::warn("{}", s.to_string());
    }
  }
  if (auto jobs = run("query-jobs", json::object())) {
    auto ids = string_field_list(*jobs, "id", "query-jobs");
    for (const std::string& id : ids ? *ids : std::vector<std::string>{}) {
      if (!starts_with(id, prefix_)) continue;
      spdlog::warn("group {}: removing leftover job {}", opt_.group, id);
      if (run("job-cancel", {{"id", id}})) (void)wait_job_gone(id);
      else (void)run("job-dismiss", {{"id", id}});  // concluded, waiting to be dismissed
    }
  }
  if (auto nodes = query_nodes()) {
    // Overlays first: they hold the scratch file nodes.
    for (const char* suffix : {"-ovl", "-scr"}) {
      for (const auto& [name, info] : *nodes) {
        if (!starts_with(name, prefix_) || name.find(suffix) == std::string::npos) continue;
        spdlog::warn("group {}: removing leftover node {}", opt_.group, name);
        if (auto r = run("blockdev-del", {{"node-name", name}}); !r)
          spdlog::warn("{}", r.status().to_string());
      }
    }
  }
  if (DIR* dir = ::opendir(opt_.work_dir.c_str())) {
    while (dirent* e = ::readdir(dir)) {
      std::string n = e->d_name;
      if (starts_with(n, prefix_) && n.size() > 6 && n.substr(n.size() - 6) == ".qcow2")
        ::unlink((opt_.work_dir + "/" + n).c_str());
    }
    ::closedir(dir);
  }
}

bool persistent_bitmaps(const NodeInfo& info) { return info.format == "qcow2" && !info.qcow2_v2; }

// The identity of each disk is a disabled tag bitmap on its node, so it follows the image
// (persistent on qcow2, like ferry.G.<k>) and not the name given on the command line. A node
// without one gets a new random identity; a node with two is an error (copied by hand?).
Status QmpSource::read_identities(const NodeMap& nodes, CaptureState& st) {
  json actions = json::array();
  std::random_device rd;
  for (DiskRun& d : st.disks) {
    const NodeInfo& info = nodes.at(d.disk.node);
    std::vector<std::string> tags;
    for (const BitmapState& b : info.bitmaps)
      if (auto id = identity_tag(opt_.group, b.name)) {
        d.identity = *id;
        tags.push_back(b.name);
      }
    if (tags.size() > 1)
      return Status::error(Errc::corrupt,
                           fmt::format("disk '{}' (node {}) carries {} identity tags of group {} "
                                       "({}); remove all but one with block-dirty-bitmap-remove",
                                       d.disk.name, d.disk.node, tags.size(), opt_.group,
                                       fmt::join(tags, ", ")));
    if (!tags.empty()) continue;
    while (d.identity == Hash128{}) {
      d.identity.lo = (std::uint64_t(rd()) << 32) | rd();
      d.identity.hi = (std::uint64_t(rd()) << 32) | rd();
    }
    json add = {{"node", d.disk.node}, {"name", identity_tag_name(opt_.group, d.identity)},
                {"disabled", true}};
    if (persistent_bitmaps(info)) add["persistent"] = true;
    actions.push_back(action("block-dirty-bitmap-add", add));
    spdlog::info("group {} disk {} (node {}): new identity {}{}", opt_.group, d.disk.name,
                 d.disk.node, d.identity.hex(),
                 persistent_bitmaps(info) ? "" : " (in QEMU's memory only: not a qcow2 node)");
  }
  if (actions.empty()) return Status::ok();
  auto r = run("transaction", {{"actions", actions}});
  return r ? Status::ok() : r.status().with_context("adding identity tags of group " + opt_.group);
}

// Decides full/incremental per disk and heals leftovers, in one transaction for the group.
Status QmpSource::heal(const NodeMap& nodes, std::uint64_t base_rp,
                       const std::vector<std::string>& receiver_disks, CaptureState& st) {
  json actions = json::array();
  std::set<std::string> held(receiver_disks.begin(), receiver_disks.end());
  for (DiskRun& d : st.disks) {
    const NodeInfo& info = nodes.at(d.disk.node);
    HealPlan plan = plan_healing(opt_.group, base_rp, held.count(d.disk.name) > 0, info.bitmaps);
    d.reason = plan.full_reason;
    d.size_bytes = info.size_bytes;
    d.persistent = persistent_bitmaps(info);
    d.granularity_bytes = kDefaultGranularityBytes;
    if (d.persistent && info.cluster_bytes >= kMinGranularityBytes &&
        info.cluster_bytes <= kMaxGranularityBytes)
      d.granularity_bytes = info.cluster_bytes;
    const std::string base = bitmap_name(opt_.group, base_rp);
    for (const BitmapState& b : info.bitmaps)
      if (d.incremental() && b.name == base) d.granularity_bytes = b.granularity_bytes;
    spdlog::info("group {} disk {} (node {}): {} [{}], merge {}, remove {}", opt_.group,
                 d.disk.name, d.disk.node, full_reason_name(d.reason), plan.rule,
                 plan.merge_into_base.size(), plan.remove.size());
    if (!plan.merge_into_base.empty())
      actions.push_back(action("block-dirty-bitmap-merge", {{"node", d.disk.node},
                                                            {"target", base},
                                                            {"bitmaps", plan.merge_into_base}}));
    if (plan.enable_base)
      actions.push_back(action("block-dirty-bitmap-enable", {{"node", d.disk.node}, {"name", base}}));
    for (const std::string& name : plan.remove)
      actions.push_back(action("block-dirty-bitmap-remove", {{"node", d.disk.node}, {"name", name}}));
  }
  if (actions.empty()) return Status::ok();
  auto r = run("transaction", {{"actions", actions}});
  return r ? Status::ok() : r.status().with_context("healing bitmaps of group " + opt_.group);
}

// The fleecing target: a qcow2 overlay on a scratch file, backed by the disk node, so the
// backup job's copy-before-write keeps the old data there and reads see the frozen disk.
Status QmpSource::prepare_overlay(DiskRun& d) {
  UniqueFd fd(::open(d.scratch_path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600));
  if (!fd.valid()) return Status::from_errno(errno, "create scratch file " + d.scratch_path);
  d.scratch_file = true;
  fd.reset();
  auto r = run("blockdev-add", {{"driver", "file"}, {"node-name", d.scratch_node},
                                {"filename", d.scratch_path}});
  if (!r) return r.status();
  d.scratch_added = true;
  r = run("blockdev-create", {{"job-id", d.create_job},
                              {"options", {{"driver", "qcow2"}, {"file", d.scratch_node},
                                           {"size", d.size_bytes}}}});
  if (!r) return r.status();
  auto ev = qmp_->wait_event(
      "JOB_STATUS_CHANGE",
      [&](const json& e) {
        return e.value("id", std::string()) == d.create_job &&
               e.value("status", std::string()) == "concluded";
      },
      opt_.qmp_timeout);
  if (!ev) return ev.status().with_context("creating scratch overlay " + d.scratch_path);
  std::string job_error;
  if (auto jobs = run("query-jobs", json::object())) {
    for (const json& j : *jobs)
      if (j.value("id", std::string()) == d.create_job && j.contains("error") && j["error"].is_string())
        job_error = j["error"].get<std::string>();
  }
  (void)run("job-dismiss", {{"id", d.create_job}});
  if (!job_error.empty())
    return Status::error(Errc::external, fmt::format("blockdev-create of {} failed: {}",
                                                     d.scratch_path, job_error));
  r = run("blockdev-add", {{"driver", "qcow2"}, {"node-name", d.overlay_node},
                           {"file", d.scratch_node}, {"backing", d.disk.node}});
  if (!r) return r.status();
  d.overlay_added = true;
  return Status::ok();
}

// The capture instant: for all disks at once, start the new bitmap, freeze the base bitmap
// and start copy-before-write into the overlay.
Status QmpSource::switch_bitmaps(CaptureState& st) {
  json actions = json::array();
  const std::string base = bitmap_name(opt_.group, st.base_rp);
  const std::string next = bitmap_name(opt_.group, st.rp_id);
  for (DiskRun& d : st.disks) {
    json add = {{"node", d.disk.node}, {"name", next}, {"granularity", d.granularity_bytes}};
    if (d.persistent) add["persistent"] = true;
    actions.push_back(action("block-dirty-bitmap-add", add));
    if (d.incremental())
      actions.push_back(action("block-dirty-bitmap-disable", {{"node", d.disk.node}, {"name", base}}));
    actions.push_back(action("blockdev-backup", {{"job-id", d.backup_job},
                                                 {"device", d.disk.node},
                                                 {"target", d.overlay_node},
                                                 {"sync", "none"}}));
  }
  auto r = run("transaction", {{"actions", actions}});
  if (!r) return r.status().with_context("capture transaction of group " + opt_.group);
  st.bitmaps_switched = true;
  for (DiskRun& d : st.disks) d.job_started = true;
  return Status::ok();
}

Status QmpSource::start_nbd_server(CaptureState& st) {
  if (!opt_.nbd_socket.empty()) {
    st.nbd_socket = opt_.nbd_socket;
    return Status::ok();
  }
  st.nbd_socket = own_nbd_socket();
  if (st.nbd_socket.size() >= sizeof(sockaddr_un::sun_path))
    return Status::error(Errc::invalid_argument,
                         fmt::format("NBD socket path {} is too long for a unix socket; use a "
                                     "shorter work_dir", st.nbd_socket));
  json args = {{"addr", {{"type", "unix"}, {"data", {{"path", st.nbd_socket}}}}}};
  auto r = run("nbd-server-start", args);
  if (!r && unix_socket_listening(st.nbd_socket)) {
    // Our own socket answers: a killed source's server. Take it down and start ours.
    spdlog::warn("group {}: restarting the leftover NBD server on {}", opt_.group, st.nbd_socket);
    (void)run("nbd-server-stop", json::object());
    r = run("nbd-server-start", args);
  }
  if (!r)
    return Status::error(Errc::busy,
                         fmt::format("cannot start an NBD server in QEMU at {} ({}); if QEMU "
                                     "already runs one, pass --nbd-socket PATH to use it",
                                     opt_.qmp_socket, r.status().message()));
  st.nbd_started = true;
  return Status::ok();
}

Status QmpSource::export_views(CaptureState& st) {
  const std::string base = bitmap_name(opt_.group, st.base_rp);
  for (DiskRun& d : st.disks) {
    json args = {{"type", "nbd"}, {"id", d.export_id}, {"node-name", d.overlay_node},
                 {"name", d.export_name}, {"writable", false}};
    if (d.incremental()) args["bitmaps"] = json::array({base});
    auto r = run("block-export-add", args);
    if (!r) return r.status().with_context("exporting disk " + d.disk.name);
    d.export_added = true;
  }
  return Status::ok();
}

Result<Capture> QmpSource::capture(std::uint64_t base_rp, std::uint64_t rp_id,
                                   const std::vector<std::string>& receiver_disks) {
  if (rp_id <= base_rp)
    return Status::error(Errc::invalid_argument,
                         fmt::format("new RP {} must be after base RP {}", rp_id, base_rp));
  if (auto prev = active_.lock(); prev && !prev->finished)
    return Status::error(Errc::busy, fmt::format("group {}: the capture of RP {} is not finished",
                                                 opt_.group, prev->rp_id));
  qmp_->clear_events();  // events of earlier captures (and of others' jobs) are history
  clean_leftovers();
  FERRY_ASSIGN_OR_RETURN(NodeMap nodes, query_nodes());
  FERRY_TRY(check_nodes_exist(nodes));
  auto st = std::make_shared<CaptureState>();
  st->base_rp = base_rp;
  st->rp_id = rp_id;
  for (std::size_t i = 0; i < opt_.disks.size(); ++i) {
    DiskRun d;
    d.index = i;
    d.disk = opt_.disks[i];
    std::string p = prefix_ + std::to_string(i);
    d.scratch_path = opt_.work_dir + "/" + p + ".qcow2";
    d.scratch_node = p + "-scr";
    d.overlay_node = p + "-ovl";
    d.create_job = p + "-create";
    d.backup_job = p + "-fleece";
    d.export_id = p + "-export";
    d.export_name = fmt::format("ferry/{}/{}/{}", opt_.group, rp_id, d.disk.name);
    st->disks.push_back(std::move(d));
  }
  FERRY_TRY(read_identities(nodes, *st));
  FERRY_TRY(heal(nodes, base_rp, receiver_disks, *st));

  Status s;
  for (DiskRun& d : st->disks) {
    s = prepare_overlay(d);
    if (!s) break;
  }
  if (s) s = switch_bitmaps(*st);
  if (s) FERRY_KILL_POINT("source.after_transaction");
  if (s) s = start_nbd_server(*st);
  if (s) s = export_views(*st);
  if (!s) {
    // Leave QEMU as we found it, and put back every dirty bit we froze.
    if (Status r = release(*st); !r) spdlog::warn("cleanup after failed capture: {}", r.to_string());
    if (Status r = restore_bitmaps(*st); !r)
      spdlog::warn("bitmap restore after failed capture: {}", r.to_string());
    return s.with_context(fmt::format("capture of RP {} for group {}", rp_id, opt_.group));
  }

  Capture c;
  c.base_rp = base_rp;
  c.rp_id = rp_id;
  c.created_unix_ns = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::system_clock::now().time_since_epoch()).count());
  for (const DiskRun& d : st->disks) {
    DiskView v;
    v.name = d.disk.name;
    v.node = d.disk.node;
    v.size_bytes = d.size_bytes;
    v.granularity_bytes = d.granularity_bytes;
    v.full_reason = d.reason;
    v.identity = d.identity;
    v.identity_ephemeral = !d.persistent;
    v.nbd_socket = st->nbd_socket;
    v.export_name = d.export_name;
    if (d.incremental()) v.dirty_context = "qemu:dirty-bitmap:" + bitmap_name(opt_.group, base_rp);
    c.disks.push_back(std::move(v));
  }
  c.state = st;
  active_ = st;
  return c;
}

Status QmpSource::release_disk(DiskRun& d) {
  Status first;
  auto note = [&](Status s) {
    if (!s) {
      spdlog::warn("group {} disk {}: {}", opt_.group, d.disk.name, s.to_string());
      // The error that invalidates the RP wins over mere clean-up trouble.
      if (first || (s.data_lost() && !first.data_lost())) first = std::move(s);
    }
  };
  if (d.export_added) {
    note(delete_export(d.export_id));
    d.export_added = false;
  }
  if (d.job_started) {
    auto r = run("block-job-cancel", {{"device", d.backup_job}, {"force", true}});
    if (r) {
      note(wait_job_gone(d.backup_job));
    } else {
      // The copy-before-write job ended on its own (an error in QEMU): reads after that
      // instant may have seen new guest data, so the view was not a point in time.
      note(Status::error(Errc::external,
                         fmt::format("fleecing job {} of disk {} ended before the view was "
                                     "released ({}); data read through it may not be "
                                     "point-in-time: do not commit this RP",
                                     d.backup_job, d.disk.name, r.status().message()))
               .set_data_lost());
    }
    d.job_started = false;
  }
  if (d.overlay_added) {
    auto r = run("blockdev-del", {{"node-name", d.overlay_node}});
    if (!r) note(r.status().with_context("node " + d.overlay_node));
    d.overlay_added = false;
  }
  if (d.scratch_added) {
    auto r = run("blockdev-del", {{"node-name", d.scratch_node}});
    if (!r) note(r.status().with_context("node " + d.scratch_node));
    d.scratch_added = false;
  }
  if (d.scratch_file) {
    if (::unlink(d.scratch_path.c_str()) != 0 && errno != ENOENT)
      note(Status::from_errno(errno, "unlink " + d.scratch_path));
    d.scratch_file = false;
  }
  return first;
}

Status QmpSource::release(CaptureState& st) {
  Status first;
  for (DiskRun& d : st.disks) {
    Status s = release_disk(d);
    if (!s && (first || (s.data_lost() && !first.data_lost()))) first = s;
  }
  if (st.nbd_started) {
    auto r = run("nbd-server-stop", json::object());
    if (!r && first) first = r.status();
    st.nbd_started = false;
  }
  return first;
}

// A capture that failed before anything was sent: fold the new bitmap back into the base one
// so QEMU is left as before the capture. Full disks keep "ferry.G.<new>" as it is (the base
// bitmap does not exist). An RP that was sent but not acknowledged keeps both (finish()).
Status QmpSource::restore_bitmaps(CaptureState& st) {
  if (!st.bitmaps_switched) return Status::ok();
  const std::string base = bitmap_name(opt_.group, st.base_rp);
  const std::string next = bitmap_name(opt_.group, st.rp_id);
  json actions = json::array();
  for (const DiskRun& d : st.disks) {
    if (!d.incremental()) continue;
    actions.push_back(action("block-dirty-bitmap-enable", {{"node", d.disk.node}, {"name", base}}));
    actions.push_back(action("block-dirty-bitmap-merge", {{"node", d.disk.node}, {"target", base},
                                                          {"bitmaps", json::array({next})}}));
    actions.push_back(action("block-dirty-bitmap-remove", {{"node", d.disk.node}, {"name", next}}));
  }
  st.bitmaps_switched = false;
  if (actions.empty()) return Status::ok();
  auto r = run("transaction", {{"actions", actions}});
  return r ? Status::ok() : r.status().with_context("merging back bitmaps of group " + opt_.group);
}

Status QmpSource::release_views(Capture& capture) {
  FERRY_ASSERT(capture.state != nullptr);
  auto* st = static_cast<CaptureState*>(capture.state.get());
  return release(*st);
}

Status QmpSource::finish(Capture& capture, bool acknowledged) {
  FERRY_ASSERT(capture.state != nullptr);
  auto* st = static_cast<CaptureState*>(capture.state.get());
  FERRY_ASSERT_MSG(!st->finished, "finish() called twice for one capture");
  st->finished = true;
  Status released = release(*st);
  FERRY_KILL_POINT("source.before_bitmap_cleanup");
  Status s;
  if (acknowledged) {
    json actions = json::array();
    const std::string base = bitmap_name(opt_.group, st->base_rp);
    for (const DiskRun& d : st->disks)
      if (d.incremental())
        actions.push_back(action("block-dirty-bitmap-remove", {{"node", d.disk.node}, {"name", base}}));
    st->bitmaps_switched = false;
    if (!actions.empty()) {
      auto r = run("transaction", {{"actions", actions}});
      if (!r) s = r.status().with_context("removing base bitmaps of group " + opt_.group);
    }
  } else {
    // Not acknowledged does not mean not committed: the receiver may hold either RP now.
    // Both bitmaps stay as the capture left them (base frozen, new recording) and the next
    // capture picks by the receiver's answer (healing.h): base -> new is merged into it (H6),
    // new -> base is stale (H7). Merging here instead would make a lost ack cost a full read.
    st->bitmaps_switched = false;
  }
  FERRY_KILL_POINT("source.after_bitmap_cleanup");
  // A failed bitmap step is healed by the next capture (healing.h): report it all the same.
  if (!s) return s;
  return released;
}

}  // namespace

Result<std::unique_ptr<ChangeSource>> open_qmp_source(const QmpSourceOptions& options) {
  if (!valid_group(options.group))
    return Status::error(Errc::invalid_argument,
                         fmt::format("group name '{}' must be 1-{} letters, digits, '-' or '_'",
                                     options.group, kMaxGroupNameBytes));
  if (options.disks.empty() || options.disks.size() > kMaxDisks)
    return Status::error(Errc::invalid_argument,
                         fmt::format("group {} has {} disks (1-{} allowed)", options.group,
                                     options.disks.size(), kMaxDisks));
  std::set<std::string> names, nodes;
  for (const QmpDisk& d : options.disks) {
    if (!names.insert(d.name).second || !nodes.insert(d.node).second)
      return Status::error(Errc::invalid_argument,
                           fmt::format("disk '{}' (node '{}') listed twice", d.name, d.node));
  }
  if (options.work_dir.empty())
    return Status::error(Errc::invalid_argument, "QMP source needs a work_dir");
  FERRY_TRY(make_dirs(options.work_dir));
  auto qmp = QmpClient::connect(options.qmp_socket, options.qmp_timeout);
  if (!qmp) return qmp.status().with_context("QMP socket " + options.qmp_socket);
  auto src = std::make_unique<QmpSource>(options, std::move(*qmp));
  FERRY_TRY(src->probe());
  return std::unique_ptr<ChangeSource>(std::move(src));
}

}  // namespace ferry::cbt
