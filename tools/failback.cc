// ferry failback at the recovery site (failback.h; docs/failover.md, "Failback").
//
// The steps, each idempotent, recorded in <group>/failback/record.json (a crash anywhere,
// then the same command again, finishes the job; `failback.*` kill points sit between them):
//   1. checks that change nothing: the group is failed over (phase running), libvirtd
//      answers, the failed-over domain exists;
//   2. the record (the lock against a second run, and what the steps below need);
//   3. the domain shut down (virDomainShutdown, waited for --shutdown-timeout; --force
//      pauses it instead);
//   4. its final RP to the main site: the shut-off domain started paused for the pull
//      backup (`ferry protect --once` as a child), then destroyed;
//   5. the failover overlays committed into the replica images (`qemu-img commit -d`: only
//      the VM's writes are copied, and the overlay stays whole, so a second commit after a
//      crash writes the same bytes);
//   6. the store reset (site::reset_to_base): one new base RP above every RP the group had,
//      the old journal dropped; the number is chosen once and kept in the record;
//   7. the domain undefined, the failover directory removed, the marker removed (the group
//      accepts RPs again), the record removed.
// A protection group failed over as a whole goes the same way with every VM of the failover
// record: down in reverse boot order, one final RP of all of them (`--vm-name` keeps the
// group's disk names whatever the failed-over domains are called), every domain undefined.
#include "failback.h"

#include <fcntl.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <thread>

#include "failover.h"
#include "failover_util.h"
#include "ferry/base/kill_point.h"
#include "ferry/site/failover_state.h"
#include "ferry/site/seed.h"

namespace ferry::tools {
namespace {

using namespace failover_util;
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

int fail(const std::string& msg) {
  std::fprintf(stderr, "ferry failback: %s\n", msg.c_str());
  return 1;
}

Result<json> load_json(const std::string& path) {
  return read_json_object(path, 1u << 20, "a JSON object");
}

// Runs argv with stdout and stderr into files; the exit code (128 + signal when killed).
Result<int> run_logged(const std::vector<std::string>& argv, const std::string& out_path,
                       const std::string& err_path) {
  const pid_t pid = ::fork();
  if (pid < 0) return Status::from_errno(errno, "fork");
  if (pid == 0) {
    int o = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int e = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (o < 0 || e < 0) ::_exit(126);
    ::dup2(o, 1);
    ::dup2(e, 2);
    std::vector<char*> args;
    for (const auto& x : argv) args.push_back(const_cast<char*>(x.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

std::string self_exe() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("ferry") : p.string();
}

std::string tail_of(const std::string& path, std::size_t n) {
  auto t = read_file_bounded(path, 64u << 20);
  if (!t.is_ok()) return "";
  return t->size() > n ? t->substr(t->size() - n) : *t;
}

// The <name> of a domain XML ("" when it has none).
std::string xml_name(const std::string& xml) {
  const auto b = xml.find("<name>"), e = xml.find("</name>");
  return b != std::string::npos && e != std::string::npos && e > b ? xml.substr(b + 6, e - b - 6)
                                                                   : "";
}

int domain_state(virDomainPtr d) {
  int state = 0, reason = 0;
  if (virDomainGetState(d, &state, &reason, 0) != 0) return -1;
  return state;
}

// Step 3: shut off, or paused with --force. Returns "shutoff" or "paused".
Result<std::string> bring_down(virDomainPtr d, const std::string& name, const FailbackArgs& a) {
  int s = domain_state(d);
  if (s == VIR_DOMAIN_SHUTOFF) return std::string("shutoff");
  if (s == VIR_DOMAIN_PAUSED && a.force) return std::string("paused");
  if (s != VIR_DOMAIN_PAUSED && virDomainShutdown(d) != 0)
    return libvirt_error("shutting down domain " + name);
  const auto deadline = Clock::now() + std::chrono::seconds(a.shutdown_timeout_s);
  while (Clock::now() < deadline) {
    if (domain_state(d) == VIR_DOMAIN_SHUTOFF) return std::string("shutoff");
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  if (domain_state(d) == VIR_DOMAIN_SHUTOFF) return std::string("shutoff");
  if (!a.force)
    return Status::error(Errc::timeout,
                         "domain " + name + " did not shut down within " +
                             std::to_string(a.shutdown_timeout_s) +
                             " s (--shutdown-timeout): shut its guest down, or run again with "
                             "--force to pause it and take the final RP of the paused VM; "
                             "nothing else was changed");
  if (domain_state(d) != VIR_DOMAIN_PAUSED && virDomainSuspend(d) != 0)
    return libvirt_error("pausing domain " + name);
  return std::string("paused");
}

}  // namespace

int cmd_failback(const FailbackArgs& a) try {
  const auto t0 = Clock::now();
  const std::string store = fs::absolute(a.store).lexically_normal().string();
  const std::string gdir = store + "/" + a.group;
  const std::string fo_dir = gdir + "/failover", fb_dir = gdir + "/failback";
  const std::string fb_record = fb_dir + "/record.json";
  if (!fs::is_directory(gdir + "/replica") && !fs::is_directory(gdir + "/journal"))
    return fail("unknown group '" + a.group + "' in store " + store);
  json rec;
  const bool resuming = fs::exists(fb_record);
  if (resuming) {
    auto r = load_json(fb_record);
    if (!r.is_ok()) return fail(r.status().to_string());
    rec = *r;
  } else {
    auto marker = site::read_failover_state(gdir);
    if (!marker.is_ok()) return fail(marker.status().to_string());
    auto fo = load_json(fo_dir + "/record.json");
    if (!marker->has_value() || !fo.is_ok())
      return fail("group '" + a.group + "' is not failed over (no " + gdir + "/" +
                  site::kFailoverStateFile + "): failback brings a failed-over group home; "
                  "nothing was changed");
    if (fo->value("phase", "") != "running")
      return fail("the failover of group '" + a.group + "' was cut short (phase " +
                  fo->value("phase", "?") + "): finish it first with ferry failover --store " +
                  a.store + " --group " + a.group + "; nothing was changed");
    rec = {{"group", a.group}, {"to", a.to}, {"uri", a.uri},
           {"domain", fo->value("domain", "")}, {"uuid", fo->value("uuid", "")},
           {"failover_rp", fo->value("rp_id", 0)}, {"overlays", (*fo)["overlays"]},
           {"chardev_dir", fo->value("chardev_dir", "")}, {"phase", "started"},
           {"started_unix_ns", now_unix_ns()}};
    // The original VM's name: what --complete needs at the main site.
    {
      std::string xml = fo->value("source_xml", "");
      rec["source_domain"] = xml_name(xml);
    }
    // A protection group: every VM in the failover's boot order, with its original name (the
    // group's name of it: the prefix of its disks, which the final RP must keep).
    if (fo->contains("vms") && (*fo)["vms"].is_array() && (*fo)["vms"].size() > 1) {
      auto plans = plan_vms(fo->value("source_xml", ""), {}, fo->value("boot_order", ""));
      if (!plans.is_ok() || plans->size() != (*fo)["vms"].size())
        return fail("the failover record of group '" + a.group + "' does not match its VM "
                    "definition; nothing was changed");
      json vms = json::array();
      std::string originals;
      for (std::size_t i = 0; i < plans->size(); ++i) {
        const json& v = (*fo)["vms"][i];
        vms.push_back({{"domain", v.value("domain", "")}, {"uuid", v.value("uuid", "")},
                       {"vm", xml_name((*plans)[i].xml)}});
        originals += (i ? "," : "") + vms.back()["vm"].get<std::string>();
      }
      rec["vms"] = vms;
      rec["source_domain"] = originals;
    }
  }
  if (!resuming && a.to.empty()) return fail("--to MAIN:PORT is required");
  const std::string to = a.to.empty() ? rec.value("to", "") : a.to;
  // The VMs in boot order (one for a single VM).
  struct Vm {
    std::string name, uuid, vm;
    Domain dom;
  };
  std::vector<Vm> vms;
  if (rec.contains("vms")) {
    for (const auto& v : rec["vms"])
      vms.push_back({v.value("domain", ""), v.value("uuid", ""), v.value("vm", ""), Domain(nullptr)});
  } else {
    vms.push_back({rec.value("domain", ""), rec.value("uuid", ""), "", Domain(nullptr)});
  }
  const bool group = vms.size() > 1;
  std::string names;  // for messages
  for (const auto& v : vms) names += (names.empty() ? "" : ",") + v.name;
  std::string phase = rec.value("phase", "started");

  auto conn = connect_libvirt(a.uri);
  if (!conn.is_ok())
    return fail(conn.status().message() + (resuming ? "; the failback stays where it was: run "
                                                      "the same command again once libvirtd is up"
                                                    : "; nothing was changed"));
  for (auto& v : vms) {
    v.dom.reset(virDomainLookupByUUIDString(conn->get(), v.uuid.c_str()));
    if (!v.dom) virResetLastError();
    if (!v.dom && phase == "started")
      return fail("the failed-over domain " + v.name + " (uuid " + v.uuid + ") is not defined at " +
                  a.uri + "; nothing was changed");
  }
  if (!resuming) {
    std::error_code ec;
    fs::create_directories(fb_dir, ec);
    if (ec) return fail("create " + fb_dir + ": " + ec.message());
    if (Status s = write_atomic(fb_record, rec.dump(2)); !s.is_ok()) return fail(s.to_string());
  }
  auto save = [&](const std::string& ph) -> Status {
    phase = ph;
    rec["phase"] = ph;
    return write_atomic(fb_record, rec.dump(2));
  };
  FERRY_KILL_POINT("failback.after_record");

  // Steps 3 and 4: down, final RP, destroyed.
  if (phase == "started") {
    // Every VM down, in reverse boot order; then each shut-off one started paused (the pull
    // backup needs a running QEMU; the guests never run), so the final RP is one instant of
    // the VMs as they stopped.
    if (!rec.contains("paused_for_final_rp") || !rec["paused_for_final_rp"].is_object())
      rec["paused_for_final_rp"] = json::object();
    std::vector<std::string> how(vms.size());
    for (std::size_t k = vms.size(); k-- > 0;) {
      Vm& v = vms[k];
      // A run cut short after it started the domain paused for the final RP: it never ran.
      const bool ours_paused = rec["paused_for_final_rp"].value(v.name, false) &&
                               domain_state(v.dom.get()) == VIR_DOMAIN_PAUSED;
      auto h = ours_paused ? Result<std::string>(std::string("paused"))
                           : bring_down(v.dom.get(), v.name, a);
      if (!h.is_ok()) {
        if (!resuming) fs::remove_all(fb_dir);
        std::string down;  // a group's VMs later in boot order, stopped before this one
        for (std::size_t j = k + 1; j < vms.size(); ++j) down += (down.empty() ? "" : ",") + vms[j].name;
        return fail(h.status().message() +
                    (down.empty() ? "" : " (but " + down + " shut down already; the same "
                                         "command again goes on with them as they are)"));
      }
      how[k] = *h;
    }
    FERRY_KILL_POINT("failback.after_shutdown");
    for (std::size_t k = 0; k < vms.size(); ++k) {
      if (how[k] != "shutoff") continue;
      rec["paused_for_final_rp"][vms[k].name] = true;
      if (Status s = save("started"); !s.is_ok()) return fail(s.to_string());
      if (virDomainCreateWithFlags(vms[k].dom.get(), VIR_DOMAIN_START_PAUSED) != 0)
        return fail(libvirt_error("starting domain " + vms[k].name + " paused for its final RP")
                        .message() + " (run the same command again)");
    }
    // The group's RP under the group's own VM names: disks <vm>.<target> as seeded, whatever
    // the failed-over domains are called (--vm-name DOMAIN=VM).
    std::vector<std::string> argv = {self_exe(), "protect", "--to", to, "--group", a.group,
                                     "--once", "--uri", a.uri};
    for (const auto& v : vms) argv.insert(argv.end(), {"--domain", v.name});
    if (group)
      for (const auto& v : vms)
        if (!v.vm.empty() && v.vm != v.name) argv.insert(argv.end(), {"--vm-name", v.name + "=" + v.vm});
    if (!a.state_dir.empty()) argv.insert(argv.end(), {"--state-dir", a.state_dir});
    if (!a.tls.cert.empty()) argv.insert(argv.end(), {"--tls-cert", a.tls.cert});
    if (!a.tls.key.empty()) argv.insert(argv.end(), {"--tls-key", a.tls.key});
    if (!a.tls.ca.empty()) argv.insert(argv.end(), {"--tls-ca", a.tls.ca});
    if (!a.tls.server_name.empty())
      argv.insert(argv.end(), {"--tls-server-name", a.tls.server_name});
    const std::string out = fb_dir + "/final-rp.out", err = fb_dir + "/final-rp.log";
    auto rc = run_logged(argv, out, err);
    if (!rc.is_ok() || *rc != 0)
      return fail("the final RP of " + names + " to " + to + " failed (" +
                  (rc.is_ok() ? "exit " + std::to_string(*rc) : rc.status().message()) + "): " +
                  tail_of(err, 1500) + "\nthe domains are left paused; run the same command again "
                  "(log: " + err + ")");
    std::string printed = tail_of(out, 200);
    while (!printed.empty() && (printed.back() == '\n' || printed.back() == ' ')) printed.pop_back();
    const auto nl = printed.rfind('\n');
    const std::string last = nl == std::string::npos ? printed : printed.substr(nl + 1);
    rec["final_rp"] = last.empty() ? 0 : std::stoull(last);
    rec["final_rp_log"] = err;
    // "RP n (base 0)": the main site held nothing of the group (not seeded, never sent to):
    // the final RP was a full copy, and --complete will refuse the unseeded group.
    if (tail_of(err, 64u << 10).find("(base 0)") != std::string::npos)
      std::fprintf(stderr, "ferry failback: warning: the main site held no RP of group '%s': "
                   "the final RP %llu was a full copy. ferry failback --complete needs the "
                   "group seeded from the original disks (ferry seed) before the VM replicates "
                   "home; without it, write the disks with ferry restore\n",
                   a.group.c_str(), (unsigned long long)rec["final_rp"].get<std::uint64_t>());
    for (auto& v : vms)
      if (virDomainIsActive(v.dom.get()) == 1 && virDomainDestroy(v.dom.get()) != 0)
        return fail(libvirt_error("destroying domain " + v.name).message() +
                    " (its final RP was sent; run the same command again)");
    if (Status s = save("final_rp"); !s.is_ok()) return fail(s.to_string());
    FERRY_KILL_POINT("failback.after_final_rp");
  }
  for (auto& v : vms)
    if (v.dom && virDomainIsActive(v.dom.get()) == 1 && phase != "started") {
      // A run cut short between the final RP and the destroy: the VM never ran on from there.
      if (virDomainDestroy(v.dom.get()) != 0)
        return fail(libvirt_error("destroying domain " + v.name).message());
    }

  // Step 5: the overlays into the images.
  std::vector<site::BaseImage> disks;
  for (const auto& [disk, o] : rec["overlays"].items()) {
    const std::string overlay = o.value("overlay", ""), image = o.value("backing", "");
    if (phase == "final_rp") {
      std::string out;
      auto rc = run_command({"qemu-img", "commit", "-q", "-d", "-f", "qcow2", overlay}, out);
      if (!rc.is_ok() || *rc != 0)
        return fail("qemu-img commit of disk " + disk + " (" + overlay + " into " + image +
                    "): " + (rc.is_ok() ? out : rc.status().message()) +
                    " (run the same command again)");
      UniqueFd fd(::open(image.c_str(), O_RDWR | O_CLOEXEC));
      if (!fd.valid() || ::fdatasync(fd.get()) != 0) return fail("fdatasync " + image);
    }
    std::error_code ec;
    const auto size = fs::file_size(image, ec);
    if (ec) return fail("image " + image + ": " + ec.message());
    disks.push_back({disk, size});
  }
  if (phase == "final_rp") {
    if (Status s = save("committed"); !s.is_ok()) return fail(s.to_string());
    FERRY_KILL_POINT("failback.after_commit");
  }

  // Step 6: the store's RPs replaced by one base RP above all of them.
  if (phase == "committed") {
    if (!rec.contains("new_base_rp")) {
      auto next = site::next_unused_rp(store, a.group);
      if (!next.is_ok()) return fail(next.status().to_string());
      rec["new_base_rp"] = *next;
      if (Status s = save("committed"); !s.is_ok()) return fail(s.to_string());
    }
    const auto deadline = Clock::now() + std::chrono::seconds(a.lock_timeout_s);
    for (;;) {
      Status s = site::reset_to_base(store, a.group, rec["new_base_rp"].get<std::uint64_t>(),
                                     disks, now_unix_ns());
      if (s.is_ok()) break;
      if (s.code() != Errc::busy || Clock::now() >= deadline)
        return fail(s.to_string() + " (run the same command again)");
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    if (Status s = save("reset"); !s.is_ok()) return fail(s.to_string());
  }

  // Step 7: the domain, the failover's files, the marker.
  if (phase == "reset") {
    for (auto& v : vms)
      if (v.dom && virDomainUndefineFlags(v.dom.get(), VIR_DOMAIN_UNDEFINE_NVRAM |
                                                          VIR_DOMAIN_UNDEFINE_MANAGED_SAVE |
                                                          VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA |
                                                          VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA) != 0)
        return fail(libvirt_error("undefining domain " + v.name).message() +
                    " (run the same command again)");
    FERRY_KILL_POINT("failback.after_undefine");
    std::error_code ec;
    const std::string chr = rec.value("chardev_dir", "");
    if (!chr.empty() && chr.rfind("/tmp/ferry-failover-", 0) == 0) fs::remove_all(chr, ec);
    fs::remove_all(fo_dir, ec);
    if (ec) return fail("remove " + fo_dir + ": " + ec.message());
    if (::unlink((gdir + "/" + site::kFailoverStateFile).c_str()) != 0 && errno != ENOENT)
      return fail("remove the failover marker: " + std::string(std::strerror(errno)));
    if (Status s = fsync_dir(gdir); !s.is_ok()) return fail(s.to_string());
    FERRY_KILL_POINT("failback.after_marker_removed");
  }
  const std::uint64_t final_rp = rec.value("final_rp", 0ull);
  const std::uint64_t base = rec.value("new_base_rp", 0ull);
  std::error_code ec;
  fs::remove_all(fb_dir, ec);
  (void)fsync_dir(gdir);

  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("failback of group %s at the recovery site done in %.2f s%s\n", a.group.c_str(),
              secs, resuming ? " (a run cut short, finished)" : "");
  std::printf("  domain%s %s: shut down, final RP %llu sent to %s, undefined\n",
              group ? "s" : "", names.c_str(),
              (unsigned long long)final_rp, to.c_str());
  for (const auto& d : disks)
    std::printf("  disk %s: the VM's writes committed into %s/replica/%s.img (%llu bytes)\n",
                d.name.c_str(), gdir.c_str(), d.name.c_str(), (unsigned long long)d.size_bytes);
  std::printf("  store: RPs up to RP %llu replaced by base RP %llu (the final state); group %s "
              "accepts RPs again\n",
              (unsigned long long)(base - 1), (unsigned long long)base, a.group.c_str());
  std::string domains_arg;
  {
    std::string orig = rec.value("source_domain", std::string("<original domain>"));
    std::stringstream in(orig);
    for (std::string n; std::getline(in, n, ',');) domains_arg += " --domain " + n;
  }
  std::printf("now at the main site: ferry failback --complete --store <main store> --group %s"
              "%s --point %llu\n",
              a.group.c_str(), domains_arg.c_str(), (unsigned long long)final_rp);
  return 0;
} catch (const std::exception& e) {
  return fail(std::string("unexpected: ") + e.what());
}

std::string group_role(const std::string& store, const std::string& group, std::string* detail) {
  const std::string gdir = store + "/" + group;
  std::string d;
  std::string role = "protecting";
  if (auto fb = load_json(gdir + "/failback/record.json"); fb.is_ok()) {
    role = "failing back";
    d = "a failback is under way (phase " + fb->value("phase", std::string("?")) +
        "): run ferry failback --store " + store + " --group " + group + " again to finish it";
  } else if (fs::exists(gdir + "/" + site::kFailoverStateFile)) {
    auto fo = load_json(gdir + "/failover/record.json");
    role = fo.is_ok() && fo->value("phase", "") == "running" ? "failed over" : "failing over";
  } else if (auto c = load_json(gdir + "/failback-complete.json"); c.is_ok()) {
    const bool done = c->value("phase", "") == "done";
    role = done ? "failed back" : "failing back";
    d = done ? "failed back at RP " + std::to_string(c->value("rp_id", 0ull)) + " into domain " +
                   c->value("domain", std::string("?"))
             : "ferry failback --complete is under way (phase " +
                   c->value("phase", std::string("?")) + "): run it again to finish it";
  } else if (fs::exists(gdir + "/" + kSeedRecord)) {
    role = "seeded";
    d = "base RP " + std::to_string(kSeedRp) + " adopted from the original disks (ferry seed); "
        "ferry failback --complete brings them to an RP";
  } else if (fs::exists(gdir + "/tests/running.json")) {
    role = "test running";
  }
  if (detail) *detail = d;
  return role;
}

void print_group_role(const std::string& store, const std::string& group) {
  std::string detail;
  const std::string role = group_role(store, group, &detail);
  if (!detail.empty()) std::printf("group %s: %s: %s\n", group.c_str(), role.c_str(), detail.c_str());
}

void annotate_role_json(const std::string& store, const std::string& group, json& points) {
  const std::string role = group_role(store, group, nullptr);
  const bool seeded = fs::exists(store + "/" + group + "/" + kSeedRecord);
  for (auto& p : points) {
    p["group_role"] = role;
    if (seeded && p.value("rp_id", 0ull) == kSeedRp) p["seed"] = true;
  }
}

std::function<bool(int& rc)> add_failback_commands(CLI::App& app) {
  auto seed_args = std::make_shared<SeedArgs>();
  auto* seed = app.add_subcommand(
      "seed", "Make an existing disk image a new group's starting point, without sending it");
  seed->add_option("--store", seed_args->store, "Store directory")->required();
  seed->add_option("--group", seed_args->group, "Group name (new)")->required();
  seed->add_option("--disk", seed_args->disks, "NAME=FILE (raw or qcow2), once per disk")
      ->required();
  auto fb = std::make_shared<FailbackArgs>();
  auto* f = app.add_subcommand(
      "failback", "Bring a failed-over group home: at the recovery site, then --complete at the "
                  "main site");
  f->add_option("--store", fb->store, "Store directory")->required();
  f->add_option("--group", fb->group, "Group name")->required();
  f->add_option("--to", fb->to, "The main site's receiver ADDR:PORT (recovery site)");
  f->add_option("--tls-cert", fb->tls.cert, "PEM certificate chain (as ferry protect)");
  f->add_option("--tls-key", fb->tls.key, "PEM private key of --tls-cert");
  f->add_option("--tls-ca", fb->tls.ca, "PEM CA bundle that signs the receiver's certificate");
  f->add_option("--tls-server-name", fb->tls.server_name, "Name the receiver's certificate carries");
  f->add_option("--uri", fb->uri, "libvirt connection URI")->capture_default_str();
  f->add_option("--state-dir", fb->state_dir, "ferry protect's state directory");
  f->add_option("--shutdown-timeout", fb->shutdown_timeout_s, "Seconds to wait for the VM to "
                "shut down")->capture_default_str();
  f->add_option("--lock-timeout", fb->lock_timeout_s, "Seconds to wait for the group lock")
      ->capture_default_str();
  f->add_flag("--force", fb->force, "Pause the VM when it does not shut down in time");
  f->add_flag("--complete", fb->complete, "At the main site: bring the original disks to the "
              "final RP and start the original domain");
  f->add_option("--domain", fb->domains, "The original domain (--complete); repeat for each VM "
                "of a protection group (default: the group's VMs at the RP)");
  f->add_option("--boot-delay", fb->boot_delay_s, "Seconds between starting one VM of a group "
                "and the next (--complete)")->capture_default_str();
  f->add_option("--point", fb->point, "RP to bring the original disks to (--complete): N or "
                "latest")->capture_default_str();
  return [seed, seed_args, f, fb](int& rc) {
    if (seed->parsed()) {
      rc = cmd_seed(*seed_args);
      return true;
    }
    if (f->parsed()) {
      if (Status s = check_tls_args(fb->tls); !s.is_ok()) {
        std::fprintf(stderr, "ferry failback: %s\n", s.message().c_str());
        rc = 2;
        return true;
      }
      rc = fb->complete ? cmd_failback_complete(*fb) : cmd_failback(*fb);
      return true;
    }
    return false;
  };
}

}  // namespace ferry::tools
