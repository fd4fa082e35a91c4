#include "doctor.h"

#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/statvfs.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>

#include "config.h"
#include "ferry/site/receiver.h"
#include "receive_config.h"
#include "ferry/site/store_check.h"
#include "ferry/transport/codec.h"
#include "ferry/transport/connection.h"
#include "ferry/transport/wire.h"

namespace ferry::tools {
namespace {

using Clock = std::chrono::system_clock;

CheckResult ok(std::string name, std::string detail) {
  return {std::move(name), CheckStatus::ok, std::move(detail), {}};
}
CheckResult failed(std::string name, std::string detail, std::string fix) {
  return {std::move(name), CheckStatus::fail, std::move(detail), std::move(fix)};
}
CheckResult skipped(std::string name, std::string why) {
  return {std::move(name), CheckStatus::skip, std::move(why), {}};
}

std::string human_bytes(std::uint64_t b) {
  char buf[32];
  if (b >= (1ull << 30)) std::snprintf(buf, sizeof buf, "%.1f GiB", b / double(1ull << 30));
  else std::snprintf(buf, sizeof buf, "%.1f MiB", b / double(1ull << 20));
  return buf;
}

// --- TLS material ---------------------------------------------------------------------------

struct X509Free { void operator()(X509* x) const { X509_free(x); } };
struct BioFree { void operator()(BIO* b) const { BIO_free(b); } };

// The certificates of a PEM file whose notAfter falls before `limit`: "subject (notAfter)".
Result<std::vector<std::string>> expiring(const std::string& path, std::time_t limit) {
  std::unique_ptr<BIO, BioFree> bio(BIO_new_file(path.c_str(), "r"));
  if (!bio) return Status::error(Errc::not_found, "cannot read " + path);
  std::vector<std::string> out;
  for (;;) {
    std::unique_ptr<X509, X509Free> x(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (!x) break;
    if (X509_cmp_time(X509_get0_notAfter(x.get()), &limit) > 0) continue;
    char subject[256];
    X509_NAME_oneline(X509_get_subject_name(x.get()), subject, sizeof subject);
    std::unique_ptr<BIO, BioFree> mem(BIO_new(BIO_s_mem()));
    ASN1_TIME_print(mem.get(), X509_get0_notAfter(x.get()));
    char* text = nullptr;
    const long n = BIO_get_mem_data(mem.get(), &text);
    out.push_back(std::string(subject) + " (notAfter " + std::string(text, std::size_t(n)) + ")");
  }
  return out;
}

CheckResult check_tls(const DoctorArgs& a, transport::TlsConfig::Role role) {
  if (!a.tls.given()) return skipped("tls", "no TLS material given (--tls-* or tls_* in --config)");
  auto loaded = load_tls(a.tls, role);
  if (!loaded.is_ok())
    return failed("tls", loaded.status().message(),
                  "renew or replace the named file (docs/security.md: issuing certificates); "
                  "keys must be mode 0600");
  const std::time_t limit = Clock::to_time_t(Clock::now()) + std::time_t(a.tls_warn_days * 86400);
  std::vector<std::string> soon;
  for (const std::string& f : {a.tls.cert, a.tls.ca}) {
    auto e = expiring(f, limit);
    if (!e.is_ok()) return failed("tls", e.status().message(), "check the path");
    for (const std::string& s : *e) soon.push_back(f + ": " + s);
  }
  if (!soon.empty()) {
    std::string d = "expires within " + std::to_string(int(a.tls_warn_days)) + " days: ";
    for (std::size_t i = 0; i < soon.size(); ++i) d += (i ? "; " : "") + soon[i];
    return failed("tls", d, "renew the certificate now and reload (SIGHUP the receiver, "
                            "restart the agent)");
  }
  return ok("tls", "certificate, key and CA load, chain and dates valid for more than " +
                       std::to_string(int(a.tls_warn_days)) + " days");
}

// --- receiver and clock -----------------------------------------------------------------------

void check_receiver(const DoctorArgs& a, std::vector<CheckResult>& out) {
  if (a.to.empty()) {
    out.push_back(skipped("receiver", "no receiver address (--to or --config)"));
    out.push_back(skipped("clock", "no receiver to compare with"));
    return;
  }
  auto ep = transport::parse_endpoint(a.to);
  if (!ep.is_ok()) {
    out.push_back(failed("receiver", ep.status().message(), "give --to HOST:PORT"));
    out.push_back(skipped("clock", "no receiver reached"));
    return;
  }
  transport::ConnectionOptions co;
  co.connect_timeout = std::chrono::milliseconds(5000);
  co.handshake_timeout = std::chrono::milliseconds(5000);
  if (a.tls.given()) {
    auto tls = load_tls(a.tls, transport::TlsConfig::Role::client);
    if (!tls.is_ok()) {
      out.push_back(failed("receiver", "not tried: the TLS material does not load",
                           "fix the tls check first"));
      out.push_back(skipped("clock", "no receiver reached"));
      return;
    }
    co.tls = *tls;
    co.tls_server_name = a.tls.server_name;
  }
  const auto t0 = Clock::now();
  auto conn = transport::Connection::connect(*ep, co);
  Result<transport::ProbeReply> reply = Status::error(Errc::internal, "not sent");
  if (conn.is_ok()) {
    Status s = (*conn)->send(transport::MsgType::probe, transport::encode(transport::Probe{}));
    if (s.is_ok()) s = (*conn)->flush();
    auto f = s.is_ok() ? (*conn)->receive(std::chrono::milliseconds(5000)) : Result<transport::Frame>(s);
    if (!f.is_ok())
      reply = f.status();
    else if (f->type != transport::MsgType::probe_reply)
      reply = Status::error(Errc::protocol, std::string("the receiver answered ") +
                                                transport::msg_type_name(f->type) +
                                                " (a release without the probe?)");
    else
      reply = transport::decode_probe_reply(f->payload);
    (*conn)->close();
  }
  const auto t1 = Clock::now();
  if (!conn.is_ok() || !reply.is_ok()) {
    const Status& why = conn.is_ok() ? reply.status() : conn.status();
    out.push_back(failed(
        "receiver", ep->to_string() + ": " + why.message(),
        a.tls.given() ? "start `ferry receive` there (systemctl start ferry-receive), open the "
                        "port, and check that both certificates chain to each other's CA and "
                        "the receiver's names " + (a.tls.server_name.empty() ? ep->host : a.tls.server_name)
                      : "start `ferry receive` there (systemctl start ferry-receive) and open the port"));
    out.push_back(skipped("clock", "no receiver reached"));
    return;
  }
  if (reply->status != transport::WireStatus::ok) {
    out.push_back(failed("receiver", ep->to_string() + " refused the probe: " + reply->message,
                         "run the same Ferry release on both ends"));
    out.push_back(skipped("clock", "no receiver reached"));
    return;
  }
  const double rtt = std::chrono::duration<double>(t1 - t0).count();
  const double mid = std::chrono::duration<double>((t0 + (t1 - t0) / 2).time_since_epoch()).count();
  const double offset = double(reply->receiver_unix_ns) / 1e9 - mid;
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s answered (protocol %u%s, %.1f ms)", ep->to_string().c_str(),
                unsigned(reply->version), a.tls.given() ? ", mutual TLS" : ", plaintext",
                rtt * 1000);
  out.push_back(ok("receiver", buf));
  std::snprintf(buf, sizeof buf, "the receiver's clock is %.3f s %s this host's (measured to "
                "within %.3f s)", std::fabs(offset), offset >= 0 ? "ahead of" : "behind", rtt / 2);
  if (std::fabs(offset) - rtt / 2 > a.clock_tolerance_seconds)
    out.push_back(failed("clock", buf,
                         "synchronise both clocks (chrony or systemd-timesyncd against the same "
                         "NTP servers): RP times, RPO and retention ages mix both clocks"));
  else
    out.push_back(ok("clock", buf));
}

// --- store --------------------------------------------------------------------------------------

void check_store(const DoctorArgs& a, std::vector<CheckResult>& out) {
  if (a.store.empty()) {
    out.push_back(skipped("store", "no --store (run the doctor on the receiver's host)"));
    out.push_back(skipped("store-space", "no --store"));
    return;
  }
  auto groups = site::store_groups(a.store);
  if (!groups.is_ok()) {
    out.push_back(failed("store", groups.status().message(), "give the receiver's --store"));
    out.push_back(skipped("store-space", "store not readable"));
    return;
  }
  std::optional<ReceiveConfig> rc;
  if (!a.receive_config.empty()) {
    auto loaded = load_receive_config(a.receive_config);
    if (!loaded.is_ok()) {
      out.push_back(failed("store", loaded.status().message(), "fix --receive-config"));
      out.push_back(skipped("store-space", "receive config unreadable"));
      return;
    }
    rc = std::move(loaded).value();
  }
  std::uint64_t need = 0;
  std::string problems, notes, over_quota;
  for (const std::string& g : *groups) {
    if (!a.group.empty() && g != a.group) continue;
    site::StoreCheck c = site::check_group_store(a.store, g);
    if (rc) c.policy = rc->for_group(g);  // what the receiver applies next, not what it did
    if (const std::uint64_t quota = rc ? rc->quota_for(g) : 0; quota != 0) {
      // The receiver refuses an RP once usage plus the RP's bound (its disks' sizes) passes.
      auto used = site::group_usage_bytes(a.store, g);
      if (used.is_ok() && *used + c.newest_disk_bytes > quota)
        over_quota += (over_quota.empty() ? "" : "; ") +
                      ("group '" + g + "' uses " + human_bytes(*used) + " of its quota " +
                       human_bytes(quota) + ", and a full RP of its disks may add " +
                       human_bytes(c.newest_disk_bytes));
    }
    if (!c.problem.is_ok())
      problems += (problems.empty() ? "" : "; ") + ("group '" + g + "': " + c.problem.to_string());
    for (const std::string& n : c.notes) notes += (notes.empty() ? " (" : "; ") + g + ": " + n;
    // One full RP of every disk (a resync or a first copy can write that much) plus the
    // RPs retention will still add before keep-last is reached, at their mean size.
    std::uint64_t grow = 0;
    if (c.policy.keep_last && *c.policy.keep_last > c.points)
      grow = c.mean_rp_bytes * (*c.policy.keep_last - c.points);
    need += c.newest_disk_bytes + grow;
  }
  if (!notes.empty()) notes += ")";
  const std::string which = a.group.empty() ? std::to_string(groups->size()) + " group(s)"
                                            : "group '" + a.group + "'";
  if (!a.group.empty() && std::find(groups->begin(), groups->end(), a.group) == groups->end())
    out.push_back(failed("store", "group '" + a.group + "' is not in store " + a.store,
                         "check --group and --store"));
  else if (!problems.empty())
    out.push_back(failed("store", problems,
                         "the receiver refuses this group until it is repaired: stop it, keep a "
                         "copy of <store>/<group> for analysis, move the group aside and let the "
                         "source send a full copy (its older RPs are then gone), or restore the "
                         "store from a backup (docs/journal-format.md names the rule)"));
  else
    out.push_back(ok("store", which + " open read-only; state, catalog and journal scan pass" + notes));
  struct statvfs vfs{};
  if (::statvfs(a.store.c_str(), &vfs) != 0) {
    out.push_back(failed("store-space", "statvfs " + a.store + " failed", "check the path"));
    return;
  }
  const std::uint64_t free_bytes = std::uint64_t(vfs.f_bavail) * vfs.f_frsize;
  const std::string d = a.store + ": " + human_bytes(free_bytes) + " free; " + which +
                        " may need " + human_bytes(need) +
                        " (one full copy of every disk plus the RPs retention still adds)";
  if (free_bytes < need)
    out.push_back(failed("store-space", d,
                         "grow or free the store's file system, or keep fewer RPs "
                         "(receive.toml keep-last / keep-within) and run ferry prune"));
  else if (!over_quota.empty())
    out.push_back(failed("store-space", over_quota + " (RPs that would pass the quota are refused)",
                         "raise the group's quota in receive.toml ([group.NAME] quota) and "
                         "SIGHUP the receiver, or keep fewer RPs"));
  else
    out.push_back(ok("store-space", d));
}

// --- the agent's config ---------------------------------------------------------------------

// Fills what the command line left empty from the target of agent.toml that --domain or
// --group names (or its only target).
Status apply_config(DoctorArgs& a) {
  FERRY_ASSIGN_OR_RETURN(AgentConfig cfg, load_agent_config(a.config));
  const TargetConfig* t = nullptr;
  for (const TargetConfig& c : cfg.targets)
    if ((!a.group.empty() && c.group == a.group) || (!a.domain.empty() && c.domain == a.domain))
      t = &c;
  if (t == nullptr && a.group.empty() && a.domain.empty() && cfg.targets.size() == 1)
    t = &cfg.targets[0];
  if (t == nullptr)
    return Status::error(Errc::not_found, a.config + ": no target for " +
                                              (a.group.empty() && a.domain.empty()
                                                   ? std::string("(several targets: give --group)")
                                                   : "--group/--domain given"));
  if (a.group.empty()) a.group = t->group;
  if (a.domain.empty() && t->kind == TargetKind::libvirt_domain) a.domain = t->domain;
  if (a.uri.empty()) a.uri = t->uri;
  if (a.to.empty()) a.to = t->to;
  if (!a.tls.given()) {
    a.tls.cert = t->tls_cert;
    a.tls.key = t->tls_key;
    a.tls.ca = t->tls_ca;
    a.tls.server_name = t->tls_server_name;
  }
  return Status::ok();
}

const char* status_name(CheckStatus s) {
  switch (s) {
    case CheckStatus::ok: return "ok";
    case CheckStatus::fail: return "fail";
    default: return "skip";
  }
}

int cmd_doctor(DoctorArgs a) {
  if (!a.config.empty()) {
    if (Status s = apply_config(a); !s.is_ok()) {
      std::fprintf(stderr, "ferry doctor: --config: %s\n", s.message().c_str());
      return 2;
    }
  }
  if (a.uri.empty()) a.uri = "qemu:///system";
  std::vector<CheckResult> checks;
  check_libvirt(a, checks);
  check_receiver(a, checks);
  checks.push_back(check_tls(a, a.to.empty() && !a.store.empty() ? transport::TlsConfig::Role::server
                                                                  : transport::TlsConfig::Role::client));
  check_store(a, checks);
  std::size_t failures = 0, skipped = 0;
  for (const CheckResult& c : checks) {
    failures += c.status == CheckStatus::fail;
    skipped += c.status == CheckStatus::skip;
  }
  if (skipped == checks.size()) {
    std::fprintf(stderr, "ferry doctor: nothing to check: give --domain, --to, --store, --tls-* "
                         "or --config\n");
    return 2;
  }
  if (a.json) {
    nlohmann::json out = {{"ok", failures == 0}, {"checks", nlohmann::json::array()}};
    for (const CheckResult& c : checks)
      out["checks"].push_back({{"name", c.name}, {"status", status_name(c.status)},
                               {"detail", c.detail}, {"fix", c.fix}});
    std::printf("%s\n", out.dump(2).c_str());
  } else {
    for (const CheckResult& c : checks) {
      std::printf("%-4s  %-12s %s\n", status_name(c.status), c.name.c_str(), c.detail.c_str());
      if (!c.fix.empty()) std::printf("      %-12s fix: %s\n", "", c.fix.c_str());
    }
    if (failures == 0)
      std::printf("all well\n");
    else
      std::printf("%zu problem(s)\n", failures);
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

std::function<bool(int& rc)> add_doctor_command(CLI::App& app) {
  auto a = std::make_shared<DoctorArgs>();
  auto* doc = app.add_subcommand(
      "doctor", "Check this host, the receiver and the store; name what is wrong and the fix");
  auto* dom = doc->add_option("--domain", a->domain, "libvirt domain to check");
  auto* grp = doc->add_option("--group", a->group, "Group to check (in --config and --store)");
  (void)dom, (void)grp;
  doc->add_option("--uri", a->uri, "libvirt connection URI (default qemu:///system)");
  doc->add_option("--config", a->config, "Agent config (agent.toml): the target's domain, "
                                         "receiver and TLS material");
  doc->add_option("--to", a->to, "Receiver ADDR:PORT to probe");
  doc->add_option("--store", a->store, "Receiver store directory (on the receiver's host)");
  doc->add_option("--receive-config", a->receive_config,
                  "Receiver config (receive.toml): each group's retention and quota");
  doc->add_option("--tls-cert", a->tls.cert, "PEM certificate chain (mutual TLS 1.3)");
  doc->add_option("--tls-key", a->tls.key, "PEM private key of --tls-cert");
  doc->add_option("--tls-ca", a->tls.ca, "PEM CA bundle");
  doc->add_option("--tls-server-name", a->tls.server_name,
                  "Name the receiver's certificate must carry (default: the host in --to)");
  doc->add_flag("--json", a->json, "JSON output: each check's name, status, detail, fix");
  return [doc, a](int& rc) {
    if (!doc->parsed()) return false;
    if (Status s = check_tls_args(a->tls); !s.is_ok()) {
      std::fprintf(stderr, "ferry doctor: %s\n", s.message().c_str());
      rc = 2;
      return true;
    }
    rc = cmd_doctor(*a);
    return true;
  };
}

}  // namespace ferry::tools
