// Test failover at the recovery site (docs/failover.md): a libvirt domain booted from a
// recovery point on throwaway qcow2 overlays over the RP's exports, while replication into the
// group goes on. Nothing the test VM writes reaches the store: the exports are read-only
// (`ferry export`, which pins the RP), the writes land in the overlays.
//
// The run is recorded in <store>/<group>/tests/running.json before anything is created and
// after each thing created, so `--stop` (also after a crash of either command) finds and
// removes all of it; each step of the stop is idempotent and the record goes last.
#include "events_cmd.h"
#include "failover.h"
#include "api_client.h"
#include "failover_real.h"
#include "failover_util.h"

#include <fcntl.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <openssl/evp.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <thread>

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

constexpr auto kExportReadyTimeout = std::chrono::seconds(30);
constexpr auto kExportStopTimeout = std::chrono::seconds(15);
constexpr std::size_t kMaxRecordBytes = 1u << 20;    // running.json
constexpr std::size_t kMaxResultsBytes = 16u << 20;  // results.jsonl: read for ferry points
constexpr std::size_t kMaxDomainXmlBytes = site::kMaxVmConfigBytes;

int fail(const std::string& msg) {
  std::fprintf(stderr, "ferry failover test: %s\n", msg.c_str());
  return 1;
}

// --- files ----------------------------------------------------------------------------------
struct Paths {
  std::string tests, running, results;
  Paths(const std::string& store, const std::string& group)
      : tests(store + "/" + group + "/tests"),
        running(tests + "/running.json"),
        results(tests + "/results.jsonl") {}
};

Status append_line(const std::string& path, const std::string& line) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (!fd.valid()) return Status::from_errno(errno, "open " + path);
  const std::string l = line + "\n";
  if (::write(fd.get(), l.data(), l.size()) != static_cast<ssize_t>(l.size()))
    return Status::from_errno(errno ? errno : EIO, "write " + path);
  if (::fsync(fd.get()) != 0) return Status::from_errno(errno, "fsync " + path);
  return Status::ok();
}

std::string sha256_hex(const std::string& s) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  EVP_Digest(s.data(), s.size(), md, &n, EVP_sha256(), nullptr);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < n; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

// --- processes ------------------------------------------------------------------------------
// A pid alone can be reused: the record keeps the process's start time (field 22 of
// /proc/PID/stat) with it, and only a process with both is signalled.
std::uint64_t process_start_ticks(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto paren = s.rfind(')');
  if (paren == std::string::npos) return 0;
  std::istringstream in(s.substr(paren + 2));
  std::string field;
  for (int i = 3; i <= 22 && in >> field; ++i)
    if (i == 22) return std::stoull(field);
  return 0;
}

bool same_process(pid_t pid, std::uint64_t start_ticks) {
  return pid > 0 && start_ticks != 0 && process_start_ticks(pid) == start_ticks;
}

// Starts argv as a daemon of its own (a new session, output to log_path): it outlives this
// command. The intermediate child exits at once, so nothing is left to reap here.
Result<pid_t> spawn_daemon(const std::vector<std::string>& argv, const std::string& log_path) {
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) return Status::from_errno(errno, "pipe");
  const pid_t mid = ::fork();
  if (mid < 0) return Status::from_errno(errno, "fork");
  if (mid == 0) {
    ::setsid();
    const pid_t d = ::fork();
    if (d != 0) {
      (void)::write(pipefd[1], &d, sizeof d);
      ::_exit(d < 0 ? 1 : 0);
    }
    const int log = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    const int null = ::open("/dev/null", O_RDONLY);
    if (log >= 0) {
      ::dup2(log, 1);
      ::dup2(log, 2);
    }
    if (null >= 0) ::dup2(null, 0);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    std::fprintf(stderr, "cannot run %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(pipefd[1]);
  pid_t d = -1;
  const ssize_t n = ::read(pipefd[0], &d, sizeof d);
  ::close(pipefd[0]);
  int st = 0;
  ::waitpid(mid, &st, 0);
  if (n != static_cast<ssize_t>(sizeof d) || d <= 0)
    return Status::error(Errc::internal, "could not start " + argv[0]);
  return d;
}

// SIGTERM, then SIGKILL after kExportStopTimeout; true once the process is gone.
bool stop_process(pid_t pid, std::uint64_t start_ticks) {
  if (!same_process(pid, start_ticks)) return true;  // gone already (or the pid reused)
  ::kill(pid, SIGTERM);
  const auto deadline = Clock::now() + kExportStopTimeout;
  while (Clock::now() < deadline) {
    if (!same_process(pid, start_ticks)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::kill(pid, SIGKILL);
  for (int i = 0; i < 250 && same_process(pid, start_ticks); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  return !same_process(pid, start_ticks);
}

std::string tail_of(const std::string& path) {
  auto s = read_file_bounded(path, 1u << 20);
  if (!s.is_ok()) return "";
  return s->size() > 2000 ? s->substr(s->size() - 2000) : *s;
}

std::string self_exe() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("ferry") : p.string();
}

// --- the record of a run -------------------------------------------------------------------
// running.json: {run, group, rp_id, uri, domain, uuid, started_unix_ns, run_dir, socket_dir,
//   state, exports: [{disk, pid, start_ticks, socket, log}], overlays: [path],
//   chardevs: {old: new}, defined: bool}

Result<json> load_running(const Paths& p) {
  return read_json_object(p.running, kMaxRecordBytes, "a test-failover record");
}

Status save_running(const Paths& p, const json& j) { return write_atomic(p.running, j.dump(2)); }

// Removes what the record names, each step idempotent; the record itself is left to the
// caller. `conn` null: libvirt is not reachable, the domain cannot be checked.
// One domain of the run (the record itself for one VM, an entry of rec["vms"] for a group).
Status remove_domain(virConnectPtr conn, const json& vm, bool& found, bool& running) {
  const std::string uuid = vm.value("uuid", "");
  if (uuid.empty() || !vm.value("defined", false)) return Status::ok();
  Domain dom(virDomainLookupByUUIDString(conn, uuid.c_str()));
  if (!dom) {
    virResetLastError();
    return Status::ok();
  }
  found = true;
  const bool active = virDomainIsActive(dom.get()) == 1;
  running = running || active;
  if (active && virDomainDestroy(dom.get()) != 0 && virDomainIsActive(dom.get()) == 1)
    return libvirt_error("destroying the test domain " + vm.value("domain", ""));
  if (virDomainUndefineFlags(dom.get(), VIR_DOMAIN_UNDEFINE_NVRAM |
                                            VIR_DOMAIN_UNDEFINE_MANAGED_SAVE |
                                            VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA |
                                            VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA) != 0 &&
      virDomainUndefine(dom.get()) != 0)
    return libvirt_error("undefining the test domain " + vm.value("domain", ""));
  return Status::ok();
}

Status tear_down(virConnectPtr conn, json& rec, json& result) {
  bool running = false, found = false;
  if (rec.contains("vms")) {  // a group of several VMs
    for (const auto& vm : rec["vms"]) FERRY_TRY(remove_domain(conn, vm, found, running));
  } else {
    FERRY_TRY(remove_domain(conn, rec, found, running));
  }
  result["domain_found"] = found;
  result["domain_running"] = running;
  for (const auto& e : rec.value("exports", json::array())) {
    const pid_t pid = e.value("pid", 0);
    if (!stop_process(pid, e.value("start_ticks", std::uint64_t{0})))
      return Status::error(Errc::internal,
                           "the export of disk " + e.value("disk", "") + " (pid " +
                               std::to_string(pid) + ") did not stop; kill it and run --stop again");
  }
  std::error_code ec;
  for (const auto& o : rec.value("overlays", json::array())) fs::remove(o.get<std::string>(), ec);
  for (const char* dir : {"run_dir", "socket_dir"}) {
    const std::string d = rec.value(dir, "");
    if (!d.empty()) fs::remove_all(d, ec);
    if (ec) return Status::error(Errc::io, "remove " + d + ": " + ec.message());
  }
  return Status::ok();
}

// --- start ---------------------------------------------------------------------------------

std::uint64_t parse_point_arg(const std::string& p) { return p == "latest" ? 0 : std::stoull(p); }

// Waits until the export serves (it prints a line once nbdkit is ready) or fails.
Status wait_export_ready(pid_t pid, std::uint64_t ticks, const std::string& log,
                         const std::string& disk) {
  const auto deadline = Clock::now() + kExportReadyTimeout;
  while (Clock::now() < deadline) {
    if (tail_of(log).find("ferry export: serving") != std::string::npos) return Status::ok();
    if (!same_process(pid, ticks))
      return Status::error(Errc::external,
                           "the export of disk " + disk + " ended before serving:\n" + tail_of(log));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return Status::error(Errc::timeout, "the export of disk " + disk + " was not ready within " +
                                            std::to_string(kExportReadyTimeout.count()) + " s");
}

// Everything after the record exists, per VM in boot order: exports, overlays, the domain.
// On error the caller tears down what the record names.
Status start_run(const FailoverTestArgs& a, const Paths& p, virConnectPtr conn,
                 const std::vector<VmPlan>& plans,
                 const std::map<std::string, std::string>& netmap, json& rec) {
  const std::uint64_t rp = rec["rp_id"];
  const std::string run_dir = rec["run_dir"], sock_dir = rec["socket_dir"];
  const bool group = plans.size() > 1;
  for (std::size_t i = 0; i < plans.size(); ++i) {
    const VmPlan& plan = plans[i];
    json& vm = group ? rec["vms"][i] : rec;
    if (i > 0 && a.boot_delay_s > 0) std::this_thread::sleep_for(std::chrono::seconds(a.boot_delay_s));
    VmXmlRewrite rw;
    rw.name_suffix = a.name_suffix;
    rw.uuid = vm["uuid"];
    rw.network_map = netmap;
    rw.chardev_dir = group ? sock_dir + "/" + std::to_string(i) : sock_dir;
    if (group) {
      std::error_code ec;
      fs::create_directories(rw.chardev_dir, ec);
      ::chmod(rw.chardev_dir.c_str(), 0755);
    }
    for (const auto& [d, target] : plan.disks)
      rw.disks[target] = {run_dir + "/" + d + ".qcow2", sock_dir + "/" + d + ".sock"};
    FERRY_ASSIGN_OR_RETURN(VmXmlResult x, rewrite_vm_xml(plan.xml, rw));
    if (x.name != vm["domain"])
      return Status::error(Errc::internal, "domain name changed between checks");
    for (const auto& path : x.required_paths)
      if (::access(path.c_str(), R_OK) != 0)
        return Status::error(Errc::not_found, "the domain " + x.name + " needs " + path +
                                                  ", which this host does not have (direct kernel "
                                                  "boot or firmware of the source); give a "
                                                  "definition that fits with --domain-xml FILE");
    vm["chardevs"] = x.chardev_paths;
    vm["notes"] = x.notes;
    FERRY_TRY(write_atomic(run_dir + (group ? "/domain-" + x.name + ".xml" : "/domain.xml"), x.xml));

    // One export per disk: `ferry export` (the plugin, read-only, pinning the RP).
    for (const auto& [d, target] : plan.disks) {
      const std::string sock = rw.disks[target].nbd_socket, log = run_dir + "/export-" + d + ".log";
      FERRY_ASSIGN_OR_RETURN(pid_t pid,
                             spawn_daemon({self_exe(), "export", "--store", a.store, "--group",
                                           a.group, "--point", std::to_string(rp), "--disk", d,
                                           "--socket", sock},
                                          log));
      const std::uint64_t ticks = process_start_ticks(pid);
      rec["exports"].push_back({{"disk", d}, {"pid", pid}, {"start_ticks", ticks},
                                {"socket", sock}, {"log", log}});
      FERRY_TRY(save_running(p, rec));
      FERRY_TRY(wait_export_ready(pid, ticks, log, d));
    }
    // The overlays: every write of the test VM lands here, never in the store.
    for (const auto& [d, target] : plan.disks) {
      const std::string overlay = rw.disks[target].overlay;
      rec["overlays"].push_back(overlay);
      FERRY_TRY(save_running(p, rec));
      std::string out;
      FERRY_ASSIGN_OR_RETURN(int rc, run_command({"qemu-img", "create", "-q", "-f", "qcow2", "-b",
                                                  "nbd+unix:///?socket=" + rw.disks[target].nbd_socket,
                                                  "-F", "raw", overlay},
                                                 out));
      if (rc != 0)
        return Status::error(Errc::external,
                             "qemu-img create of the overlay of disk " + d + " failed: " + out);
    }
    vm["defined"] = true;  // before the call: a crash right after it still undefines
    FERRY_TRY(save_running(p, rec));
    Domain dom(virDomainDefineXML(conn, x.xml.c_str()));
    if (!dom) return libvirt_error("defining the test domain " + x.name);
    if (virDomainCreate(dom.get()) != 0) return libvirt_error("starting the test domain " + x.name);
    vm["state"] = "running";
    FERRY_TRY(save_running(p, rec));
  }
  rec["state"] = "running";
  return save_running(p, rec);
}

int start_test(const FailoverTestArgs& a) {
  const Paths p(a.store, a.group);
  auto netmap = parse_network_map(a.network_map);
  if (!netmap.is_ok()) return fail(netmap.status().message());
  if (::access(p.running.c_str(), F_OK) == 0) {
    auto rec = load_running(p);
    return fail("a test failover of group '" + a.group + "' is already running" +
                (rec.is_ok() ? " (domain " + rec->value("domain", "?") + ", RP " +
                                   std::to_string(rec->value("rp_id", 0)) + ")"
                             : std::string()) +
                "; stop it first: ferry failover test --stop --store " + a.store + " --group " +
                a.group);
  }
  // The failed-over VM runs from the replica images: no test VM beside it (failback first).
  if (auto why = site::failover_refusal_for(a.store + "/" + a.group, a.group))
    return fail(*why + ": no test failover while it is failed over (ferry failback brings it "
                "home first)");
  // The RP and its definition: an unknown group, a pruned or unknown RP are refused here.
  auto cfg = site::vm_config_at(a.store, a.group, parse_point_arg(a.point));
  if (!cfg.is_ok()) return fail("group '" + a.group + "': " + cfg.status().message());
  std::string xml = cfg->xml;
  if (!a.domain_xml.empty()) {
    auto f = read_file_bounded(a.domain_xml, kMaxDomainXmlBytes);
    if (!f.is_ok()) return fail("--domain-xml: " + f.status().to_string());
    xml = *f;
  } else if (xml.empty()) {
    return fail("RP " + std::to_string(cfg->rp_id) + " of group '" + a.group +
                "' has no VM config (ferry protect sends it from a libvirt domain; an older "
                "source did not): give one with --domain-xml FILE");
  }
  auto pts = site::list_points(a.store, a.group);
  if (!pts.is_ok()) return fail("group '" + a.group + "': " + pts.status().message());
  std::vector<std::string> disks;
  for (const auto& rp : *pts)
    if (rp.rp_id == cfg->rp_id)
      for (const auto& d : rp.disks) disks.push_back(d.name);
  if (disks.empty()) return fail("RP " + std::to_string(cfg->rp_id) + " holds no disk");

  // The VMs in boot order (a group document's, or the one VM of a plain definition).
  auto plans = plan_vms(xml, disks, a.boot_order);  // group_config.cc
  if (!plans.is_ok()) return fail("RP " + std::to_string(cfg->rp_id) + ": " + plans.status().message());
  auto conn = connect_libvirt(a.uri);
  if (!conn.is_ok()) return fail(conn.status().message());
  // A dry run of the rewrite names each domain (and refuses a bad definition) before anything
  // is created.
  std::vector<std::string> uuids, names, sources;
  for (const VmPlan& plan : *plans) {
    auto uuid = random_uuid();
    if (!uuid.is_ok()) return fail(uuid.status().to_string());
    VmXmlRewrite probe;
    probe.name_suffix = a.name_suffix;
    probe.uuid = *uuid;
    for (const auto& [d, target] : plan.disks) probe.disks[target] = {"/x", "/x"};
    auto named = rewrite_vm_xml(plan.xml, probe);
    if (!named.is_ok())
      return fail((a.domain_xml.empty() ? "the VM config of RP " + std::to_string(cfg->rp_id)
                                        : "--domain-xml " + a.domain_xml) +
                  ": " + named.status().message());
    if (Domain d(virDomainLookupByName(conn->get(), named->name.c_str())); d)
      return fail("a domain named '" + named->name + "' already exists at " + a.uri +
                  " (not this test's): remove it, or choose another --name-suffix");
    virResetLastError();
    uuids.push_back(*uuid);
    names.push_back(named->name);
    sources.push_back(named->source_name);
  }
  const bool group = plans->size() > 1;
  std::string all_names;
  for (const auto& n : names) all_names += (all_names.empty() ? "" : ",") + n;

  std::error_code ec;
  fs::create_directories(p.tests, ec);
  if (ec) return fail("create " + p.tests + ": " + ec.message());
  // The record is the lock: created exclusively, so two starts cannot both run.
  {
    UniqueFd fd(::open(p.running.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!fd.valid())
      return fail(errno == EEXIST ? "a test failover of group '" + a.group +
                                        "' started meanwhile; stop it first with --stop"
                                  : "create " + p.running + ": " + std::strerror(errno));
  }
  const std::uint64_t started = now_unix_ns();
  const std::string run = "run-" + std::to_string(started / 1000000);
  // Sockets live under /tmp: a unix socket path must stay under 108 bytes, store paths may not.
  char tmpl[] = "/tmp/ferry-failover-XXXXXX";
  const char* sock_dir = ::mkdtemp(tmpl);
  json rec = {{"run", run},
              {"group", a.group},
              {"rp_id", cfg->rp_id},
              {"uri", a.uri},
              {"domain", group ? all_names : names[0]},
              {"source_domain", sources[0]},
              {"uuid", group ? std::string() : uuids[0]},
              {"started_unix_ns", started},
              {"run_dir", p.tests + "/" + run},
              {"socket_dir", sock_dir ? sock_dir : ""},
              {"state", "starting"},
              {"defined", false},
              {"exports", json::array()},
              {"overlays", json::array()}};
  if (group) {
    rec["vms"] = json::array();
    for (std::size_t i = 0; i < plans->size(); ++i)
      rec["vms"].push_back({{"domain", names[i]}, {"source_domain", sources[i]},
                            {"uuid", uuids[i]}, {"defined", false}});
  }
  Status s = sock_dir ? Status::ok() : Status::from_errno(errno, "mkdtemp " + std::string(tmpl));
  if (s.is_ok()) s = save_running(p, rec);
  if (s.is_ok() && !fs::create_directories(rec["run_dir"].get<std::string>(), ec) && ec)
    s = Status::error(Errc::io, "create " + rec["run_dir"].get<std::string>() + ": " + ec.message());
  if (s.is_ok()) ::chmod(sock_dir, 0755);  // QEMU connects to the exports' sockets
  if (s.is_ok()) s = start_run(a, p, conn->get(), *plans, *netmap, rec);
  if (!s.is_ok()) {
    json ignored;
    Status t = tear_down(conn->get(), rec, ignored);
    if (t.is_ok()) {
      ::unlink(p.running.c_str());
    } else {
      std::fprintf(stderr, "ferry failover test: cleaning up failed too (%s); run --stop\n",
                   t.to_string().c_str());
    }
    return fail(s.message());
  }
  std::string joined_names;
  for (const auto& n : names) joined_names += (joined_names.empty() ? "" : ",") + n;
  emit_store_event(a.store, {.group = a.group, .kind = "test_failover_started", .rp = cfg->rp_id,
                             .priority = events::Priority::notice,
                             .message = "test failover of group '" + a.group + "' at RP " +
                                        std::to_string(cfg->rp_id) + ": domain(s) " + joined_names +
                                        " started",
                             .fields = {{"domain", joined_names}}});
  for (std::size_t i = 0; i < plans->size(); ++i)
    std::printf("test failover of %s at RP %llu: domain %s (uuid %s) started at %s%s\n",
                sources[i].c_str(), (unsigned long long)cfg->rp_id, names[i].c_str(),
                uuids[i].c_str(), a.uri.c_str(),
                group ? (" (boot " + std::to_string(i + 1) + " of " +
                         std::to_string(plans->size()) + ")").c_str() : "");
  for (const auto& e : rec["exports"])
    std::printf("  disk %s: export pid %d on %s, overlay %s/%s.qcow2\n",
                e["disk"].get<std::string>().c_str(), e["pid"].get<int>(),
                e["socket"].get<std::string>().c_str(), rec["run_dir"].get<std::string>().c_str(),
                e["disk"].get<std::string>().c_str());
  for (const auto& vm : group ? rec["vms"] : json::array({rec}))
    for (const auto& n : vm.value("notes", json::array()))
      std::printf("  note (%s): %s\n", vm.value("domain", "").c_str(), n.get<std::string>().c_str());
  std::printf("stop it with: ferry failover test --stop --store %s --group %s\n", a.store.c_str(),
              a.group.c_str());
  return 0;
}

// --- stop ----------------------------------------------------------------------------------

bool result_recorded(const Paths& p, const std::string& run) {
  auto text = read_file_bounded(p.results, kMaxResultsBytes);
  if (!text.is_ok()) return false;
  std::istringstream in(*text);
  for (std::string line; std::getline(in, line);) {
    json j = json::parse(line, nullptr, false);
    if (j.is_object() && j.value("run", "") == run) return true;
  }
  return false;
}

int stop_test(const FailoverTestArgs& a) {
  const Paths p(a.store, a.group);
  if (::access(p.running.c_str(), F_OK) != 0)
    return fail("no test failover is running for group '" + a.group + "' in store " + a.store);
  struct stat sb {};
  if (::stat(p.running.c_str(), &sb) == 0 && sb.st_size == 0) {
    // A start killed between creating the record (the lock) and its first write: nothing
    // was created yet.
    if (::unlink(p.running.c_str()) != 0 && errno != ENOENT)
      return fail("remove " + p.running + ": " + std::strerror(errno));
    std::printf("a start of a test failover of group %s was interrupted before it created "
                "anything; its empty record is removed\n", a.group.c_str());
    return 0;
  }
  auto rec = load_running(p);
  if (!rec.is_ok()) return fail(rec.status().to_string());
  const std::string uri = rec->value("uri", a.uri);
  auto conn = connect_libvirt(uri);
  if (!conn.is_ok())
    return fail(conn.status().message() + "; nothing was stopped, run --stop again once it is up");
  json result = {{"run", rec->value("run", "")},
                 {"rp_id", rec->value("rp_id", 0)},
                 {"domain", rec->value("domain", "")},
                 {"started_unix_ns", rec->value("started_unix_ns", std::uint64_t{0})}};
  if (Status s = tear_down(conn->get(), *rec, result); !s.is_ok())
    return fail(s.to_string() + " (the record stays: run --stop again)");
  const std::uint64_t stopped = now_unix_ns();
  result["stopped_unix_ns"] = stopped;
  result["duration_s"] =
      double(stopped - result["started_unix_ns"].get<std::uint64_t>()) / 1e9;
  result["started"] = rec->value("state", "") == "running";
  result["boot_result"] = a.boot_result.empty() ? "unknown" : a.boot_result;
  if (!result_recorded(p, result["run"]))
    if (Status s = append_line(p.results, result.dump()); !s.is_ok())
      return fail(s.to_string());
  if (::unlink(p.running.c_str()) != 0 && errno != ENOENT)
    return fail("remove " + p.running + ": " + std::strerror(errno));
  (void)fsync_dir(p.tests);
  emit_store_event(a.store, {.group = a.group, .kind = "test_failover_stopped",
                             .rp = result["rp_id"].get<std::uint64_t>(),
                             .message = "test failover of group '" + a.group + "' stopped",
                             .fields = {{"domain", result["domain"].get<std::string>()},
                                        {"boot_result", a.boot_result}}});
  std::printf("test failover of group %s stopped: domain %s %s, RP %llu tested for %.1f s; "
              "exports stopped, overlays removed\n",
              a.group.c_str(), result["domain"].get<std::string>().c_str(),
              result["domain_running"].get<bool>() ? "was running (destroyed, undefined)"
              : result["domain_found"].get<bool>() ? "was shut off (undefined)"
                                                   : "was already gone",
              (unsigned long long)result["rp_id"].get<std::uint64_t>(),
              result["duration_s"].get<double>());
  return 0;
}

std::vector<json> load_results(const Paths& p) {
  std::vector<json> out;
  auto text = read_file_bounded(p.results, kMaxResultsBytes);
  if (!text.is_ok()) return out;
  std::istringstream in(*text);
  for (std::string line; std::getline(in, line);) {
    json j = json::parse(line, nullptr, false);
    if (j.is_object()) out.push_back(std::move(j));  // a torn last line is skipped
  }
  return out;
}

}  // namespace

int cmd_failover_test(const FailoverTestArgs& a) {
  try {
    return a.stop ? stop_test(a) : start_test(a);
  } catch (const std::exception& e) {  // a record edited by hand (json type errors)
    return fail(std::string("unexpected: ") + e.what());
  }
}

int cmd_vm_config(const std::string& store, const std::string& group, const std::string& point,
                  const std::string& vm) {
  auto cfg = site::vm_config_at(store, group, parse_point_arg(point));
  if (!cfg.is_ok()) {
    std::fprintf(stderr, "ferry vm-config: group '%s': %s\n", group.c_str(),
                 cfg.status().message().c_str());
    return 1;
  }
  if (cfg->xml.empty()) {
    std::fprintf(stderr,
                 "ferry vm-config: RP %llu of group '%s' has no VM config (ferry protect sends "
                 "it from a libvirt domain; an older source did not)\n",
                 (unsigned long long)cfg->rp_id, group.c_str());
    return 1;
  }
  std::string text = cfg->xml;
  if (!vm.empty()) {  // one VM of a group (group_config.cc)
    auto one = vm_domain_xml(cfg->xml, vm);
    if (!one.is_ok()) {
      std::fprintf(stderr, "ferry vm-config: RP %llu of group '%s': %s\n",
                   (unsigned long long)cfg->rp_id, group.c_str(), one.status().message().c_str());
      return 1;
    }
    text = *one;
  }
  std::fwrite(text.data(), 1, text.size(), stdout);
  if (text.back() != '\n') std::fputc('\n', stdout);
  return 0;
}

void annotate_points_json(const std::string& store, const std::string& group, json& points) {
  auto cfgs = site::vm_configs(store, group);
  std::map<std::uint64_t, json> by_rp;
  if (cfgs.is_ok())
    for (const auto& c : *cfgs)
      by_rp[c.rp_id] = c.xml.empty() ? json(nullptr)
                                     : json{{"bytes", c.xml.size()},
                                            {"sha256", sha256_hex(c.xml)},
                                            {"from_rp", c.from_rp},
                                            {"vms", vms_json(c.xml)}};  // group_config.cc
  const Paths p(store, group);
  const auto results = load_results(p);
  auto running = load_running(p);
  auto fo = site::read_failover_state(store + "/" + group);
  for (auto& pt : points) {
    const std::uint64_t rp = pt.value("rp_id", std::uint64_t{0});
    pt["vm_config"] = by_rp.count(rp) ? by_rp[rp] : json(nullptr);
    pt["vms"] = by_rp.count(rp) && !by_rp[rp].is_null() ? by_rp[rp]["vms"] : json::array();
    json tests = json::array();
    for (const auto& r : results)
      if (r.value("rp_id", std::uint64_t{0}) == rp) tests.push_back(r);
    pt["tests"] = tests;
    pt["test_running"] = running.is_ok() && running->value("rp_id", std::uint64_t{0}) == rp;
    pt["failed_over"] = fo.is_ok() && fo->has_value() && (*fo)->rp_id == rp;
  }
}

void print_points_tests(const std::string& store, const std::string& group) {
  const Paths p(store, group);
  // The group's role: protecting (nothing printed, as before) or failed over.
  if (auto fo = site::read_failover_state(store + "/" + group); fo.is_ok() && fo->has_value())
    std::printf("group %s: failed over at RP %llu since %s%s; it accepts no RPs until failback\n",
                group.c_str(), (unsigned long long)(*fo)->rp_id,
                format_time_ns((*fo)->since_unix_ns).c_str(),
                (*fo)->domain.empty() ? " (the failover has not finished: run it again)"
                                      : (" (domain " + (*fo)->domain + ")").c_str());
  for (const auto& r : load_results(p))
    std::printf("RP %llu tested %s for %.1f s (domain %s, %s, boot %s)\n",
                (unsigned long long)r.value("rp_id", std::uint64_t{0}),
                format_time_ns(r.value("started_unix_ns", std::uint64_t{0})).c_str(),
                r.value("duration_s", 0.0), r.value("domain", "?").c_str(),
                r.value("domain_running", false) ? "running at stop" : "not running at stop",
                r.value("boot_result", "unknown").c_str());
  auto running = load_running(p);
  if (running.is_ok())
    std::printf("RP %llu: test failover running since %s (domain %s)\n",
                (unsigned long long)running->value("rp_id", std::uint64_t{0}),
                format_time_ns(running->value("started_unix_ns", std::uint64_t{0})).c_str(),
                running->value("domain", "?").c_str());
}

std::function<bool(int&)> add_failover_commands(CLI::App& app, const CLI::Validator& point_rule,
                                                const SiteArgs* site) {
  auto a = std::make_shared<FailoverTestArgs>();
  auto vc = std::make_shared<FailoverTestArgs>();
  auto* vmc = app.add_subcommand("vm-config", "Print the VM definition (libvirt XML) kept with a recovery point");
  vmc->add_option("--store", vc->store, "Store directory")->required();
  vmc->add_option("--group", vc->group, "Group name")->required();
  vmc->add_option("--point", vc->point, "Recovery point id, or latest")->check(point_rule)
      ->capture_default_str();
  vmc->add_option("--vm", vc->vm, "Print only this VM's domain XML (a group of several VMs)");

  auto* fo = app.add_subcommand(
      "failover", "Fail over to the recovery site: stop the group, start its VM from an RP "
                  "(failover_real.h); `failover test` boots a throwaway copy instead");
  fo->require_subcommand(0, 1);
  auto r = std::make_shared<FailoverArgs>();
  // Not ->required(): `ferry failover test ...` parses its own options (checked below).
  fo->add_option("--store", r->store, "Store directory");
  fo->add_option("--group", r->group, "Group name");
  fo->add_option("--point", r->point, "Recovery point id, or latest (newer RPs are given up)")
      ->check(point_rule)->capture_default_str();
  fo->add_option("--uri", r->uri, "libvirt connection URI")->capture_default_str();
  fo->add_option("--name-suffix", r->name_suffix, "The domain is <vm><suffix> (default: <vm>)");
  fo->add_option("--network-map", r->network_map,
                 "SRC=DST: connect the NICs on network (or bridge) SRC to DST here; unmapped "
                 "NICs are removed");
  fo->add_option("--domain-xml", r->domain_xml, "Use this libvirt XML instead of the RP's");
  fo->add_option("--boot-order", r->boot_order,
                 "A group of several VMs: start them in this order, NAME,NAME,... (default: "
                 "the order stored with the RP)");
  fo->add_option("--boot-delay", r->boot_delay_s,
                 "A group: seconds between starting one VM and the next")->capture_default_str();
  fo->add_option("--lock-timeout", r->lock_timeout_s,
                 "Seconds to wait for a receiver session to release the group")
      ->capture_default_str();
  auto* t = fo->add_subcommand(
      "test", "Boot a recovery point as a throwaway libvirt domain while replication goes on");
  t->add_option("--store", a->store, "Store directory (required unless --site)");
  t->add_option("--group", a->group, "Group name")->required();
  t->add_option("--point", a->point, "Recovery point id, or latest")->check(point_rule)
      ->capture_default_str();
  t->add_option("--uri", a->uri, "libvirt connection URI")->capture_default_str();
  t->add_option("--name-suffix", a->name_suffix, "The test domain is <vm><suffix>")
      ->capture_default_str();
  t->add_option("--network-map", a->network_map,
                "SRC=DST: connect the NICs on network (or bridge) SRC to DST here; unmapped NICs "
                "are removed");
  t->add_option("--domain-xml", a->domain_xml,
                "Use this libvirt XML instead of the RP's VM config");
  t->add_option("--boot-order", a->boot_order,
                "A group of several VMs: start them in this order, NAME,NAME,... (default: the "
                "order stored with the RP)");
  t->add_option("--boot-delay", a->boot_delay_s,
                "A group: seconds between starting one VM and the next")
      ->capture_default_str();
  t->add_flag("--stop", a->stop,
              "Destroy the running test domain, stop its exports, remove its overlays");
  t->add_option("--boot-result", a->boot_result, "With --stop: what the test showed")
      ->check(CLI::IsMember({"ok", "failed"}));
  return [vmc, t, a, vc, fo, r, site](int& rc) {
    if (vmc->parsed()) {
      rc = cmd_vm_config(vc->store, vc->group, vc->point, vc->vm);
      return true;
    }
    if (t->parsed()) {
      if (site && !site->url.empty()) {  // through the site's management API (api_client.h)
        rc = site_failover_test(*site, a->group, a->point, a->stop, a->boot_result);
      } else if (a->store.empty()) {
        std::fprintf(stderr, "ferry failover test: --store is required (or --site URL)\n");
        rc = 2;
      } else {
        rc = cmd_failover_test(*a);
      }
      return true;
    }
    if (fo->parsed()) {
      if (r->store.empty() || r->group.empty()) {
        std::fprintf(stderr, "ferry failover: --store and --group are required\n");
        rc = 1;
      } else {
        rc = cmd_failover(*r);
      }
      return true;
    }
    return false;
  };
}

}  // namespace ferry::tools
