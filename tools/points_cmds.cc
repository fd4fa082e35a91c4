// ferry points, prune and restore: the store's RPs listed, pruned by hand and restored
// (moved out of ferry.cc, which keeps the CLI's wiring).
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "events_cmd.h"
#include "failback.h"
#include "failover.h"
#include "ferry/site/retention.h"
#include "ferry/site/store.h"
#include "ferry/transport/connection.h"
#include "ferry/transport/rules.h"
#include "ferry/transport/wire.h"
#include "metrics.h"
#include "tools.h"

namespace ferry::tools {
namespace {

// ---- points / restore ------------------------------------------------------------------------
nlohmann::json point_json(const site::PrunePoint& p) {
  const site::RpInfo& i = p.info;
  nlohmann::json disks = nlohmann::json::array();
  for (const auto& d : i.disks)
    disks.push_back({{"name", d.name}, {"size_bytes", d.size_bytes}, {"full", d.full},
                     {"changed_bytes", d.changed_bytes}, {"zero_bytes", d.zero_bytes},
                     {"stored_bytes", d.stored_bytes},
                     {"mode", d.full ? "full" : d.resync ? "resync" : "incremental"},
                     {"identity", d.identity == Hash128{} ? "" : d.identity.hex()}});
  return {{"rp_id", i.rp_id}, {"base_rp", i.base_rp}, {"created_unix_ns", i.created_unix_ns},
          {"committed_unix_ns", i.committed_unix_ns}, {"app_consistent", (i.flags & 1u) != 0},
          {"store_bytes", p.store_bytes}, {"keep", p.keep},
          {"rule", site::keep_rule_name(p.rule)}, {"pinned", p.pinned}, {"disks", disks}};
}

// One line per RP: when it was taken, its bytes in the store, the rule that keeps it (or
// "prune" when the policy would drop it at the next pass) and whether a reader pins it.
void print_points(const site::PruneReport& rep, bool decided) {
  std::printf("%-8s %-24s %-6s %12s %14s  %-12s %s\n", "RP", "CREATED (UTC)", "DISKS",
              "CHANGED", "IN STORE", decided ? "VERDICT" : "KEPT BY", "PINNED");
  for (const auto& p : rep.points) {
    std::uint64_t changed = 0;
    for (const auto& d : p.info.disks) changed += d.changed_bytes;
    const std::string rule = p.keep ? site::keep_rule_name(p.rule)
                                    : std::string(decided ? "remove" : "prune next");
    std::printf("%-8llu %-24s %-6zu %12s %14s  %-12s %s\n", (unsigned long long)p.info.rp_id,
                format_time_ns(p.info.created_unix_ns).c_str(), p.info.disks.size(),
                human_bytes(changed).c_str(),
                p.info.rp_id == rep.base_before ? "(replica)" : human_bytes(p.store_bytes).c_str(),
                rule.c_str(), p.pinned ? "yes" : "no");
  }
}

std::uint64_t wall_now_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

}  // namespace

Result<nlohmann::json> points_json(const std::string& store, const std::string& group) {
  FERRY_ASSIGN_OR_RETURN(auto rep, site::explain_points(store, group, wall_now_ns()));
  nlohmann::json arr = nlohmann::json::array();
  for (const auto& p : rep.points) arr.push_back(point_json(p));
  annotate_points_json(store, group, arr);  // VM config and test failovers (failover.cc)
  annotate_role_json(store, group, arr);    // the group's role (failback.cc)
  annotate_points_stages(store, group, arr);  // explainable RPO (metrics_receiver.cc)
  return arr;
}

int cmd_points(const std::string& store, const std::string& group, bool json) {
  if (json) {
    auto arr = points_json(store, group);
    if (!arr.is_ok()) return fail("points of group '" + group + "'", arr.status());
    std::cout << arr->dump(2) << "\n";
    return 0;
  }
  auto rep = site::explain_points(store, group, wall_now_ns());
  if (!rep.is_ok()) return fail("points of group '" + group + "'", rep.status());
  std::printf("group %s: %zu recovery point(s); retention %s; the replica images hold RP %llu\n",
              group.c_str(), rep->points.size(), rep->policy.describe().c_str(),
              (unsigned long long)rep->base_before);
  print_points(*rep, false);
  print_points_tests(store, group);
  print_group_role(store, group);
  return 0;
}

// `ferry points --to`: the same list from a running receiver, over the wire (points_request;
// needs the manage right on the group when the receiver runs TLS).
int cmd_points_remote(const std::string& to, const std::string& group, const TlsArgs& tls,
                      bool json) {
  const std::string what = "points of group '" + group + "' at " + to;
  auto ep = transport::parse_endpoint(to);
  if (!ep.is_ok()) return fail("--to", ep.status());
  if (!transport::valid_store_name(group))
    return fail("--group", Status::error(Errc::invalid_argument,
                                         "'" + group + "' is not a valid group name (" +
                                             transport::kStoreNameRule + ")"));
  transport::ConnectionOptions co;
  auto config = load_tls(tls, transport::TlsConfig::Role::client);
  if (!config.is_ok()) return fail("TLS material", config.status());
  co.tls = *config;
  co.tls_server_name = tls.server_name;
  auto conn = transport::Connection::connect(*ep, co);
  if (!conn.is_ok()) return fail(what, conn.status());
  if (Status s = (*conn)->send(transport::MsgType::points_request,
                               transport::encode(transport::PointsRequest{group}));
      !s.is_ok())
    return fail(what, s);
  auto f = (*conn)->receive(std::chrono::milliseconds(60000));
  if (!f.is_ok()) return fail(what, f.status());
  if (f->type == transport::MsgType::error) {
    auto e = transport::decode_error(f->payload);
    return fail(what, Status::error(Errc::external, "receiver refused the request: " +
                                                        (e.is_ok() ? e->message : "?")));
  }
  if (f->type != transport::MsgType::points_reply)
    return fail(what, Status::error(Errc::protocol, std::string("expected points_reply, got ") +
                                                        transport::msg_type_name(f->type)));
  auto r = transport::decode_points_reply(f->payload);
  if (!r.is_ok()) return fail(what, r.status());
  if (r->status != transport::WireStatus::ok)
    return fail(what, Status::error(transport::errc_of(r->status),
                                    std::string("receiver refused") +
                                        (r->status == transport::WireStatus::forbidden
                                             ? " (not authorised)" : "") + ": " + r->message));
  if (json) {
    nlohmann::json arr = nlohmann::json::array();
    for (const auto& p : r->points)
      arr.push_back({{"rp_id", p.rp_id}, {"created_unix_ns", p.created_unix_ns},
                     {"committed_unix_ns", p.committed_unix_ns}, {"store_bytes", p.store_bytes}});
    std::cout << arr.dump(2) << "\n";
    return 0;
  }
  std::printf("group %s at %s: %zu recovery point(s)%s\n", group.c_str(), to.c_str(),
              r->points.size(), r->truncated ? " (the newest; older ones left out)" : "");
  std::printf("%-8s %-24s %14s\n", "RP", "CREATED (UTC)", "IN STORE");
  for (const auto& p : r->points)
    std::printf("%-8llu %-24s %14s\n", (unsigned long long)p.rp_id,
                format_time_ns(p.created_unix_ns).c_str(),
                p.store_bytes == 0 ? "(replica)" : human_bytes(p.store_bytes).c_str());
  return 0;
}

// `ferry prune`: retention by hand. It takes the group's lock, so it refuses a group a
// running receiver holds (the receiver prunes by its own policy after every commit).
int cmd_prune(const std::string& store, const std::string& group, const site::RetentionPolicy& policy,
              bool dry_run, bool json) {
  site::StoreOptions so;
  so.root = store;
  auto st = site::GroupStore::open(so, group, /*create=*/false);
  if (!st.is_ok()) {
    if (st.status().code() == Errc::busy)
      return fail("prune of group '" + group + "'",
                  Status::error(Errc::busy, st.status().message() +
                                                ": a running receiver holds it and prunes it by "
                                                "its own policy; stop it, or change its policy "
                                                "(receive.toml, SIGHUP)"));
    return fail("prune of group '" + group + "'", st.status());
  }
  auto rep = (*st)->prune(policy, wall_now_ns(), dry_run);
  if (!rep.is_ok()) return fail("prune of group '" + group + "'", rep.status());
  if (!dry_run) emit_prune_events(store, group, *rep);
  if (json) {
    nlohmann::json arr = nlohmann::json::array();
    for (const auto& p : rep->points) arr.push_back(point_json(p));
    nlohmann::json doc{{"group", group}, {"dry_run", dry_run},
                       {"policy", rep->policy.describe()}, {"removed", rep->removed},
                       {"removed_bytes", rep->removed_bytes},
                       {"compacted_bytes", rep->compacted_bytes},
                       {"rewritten_bytes", rep->rewritten_bytes},
                       {"replica_rp_before", rep->base_before},
                       {"replica_rp_after", rep->base_after}, {"points", arr}};
    std::cout << doc.dump(2) << "\n";
    return 0;
  }
  std::printf("group %s: retention %s%s\n", group.c_str(), rep->policy.describe().c_str(),
              dry_run ? " (dry run: nothing removed)" : "");
  print_points(*rep, true);
  std::printf("%s %llu RP(s), %s of journal; %zu kept%s\n", dry_run ? "would remove" : "removed",
              (unsigned long long)rep->removed, human_bytes(rep->removed_bytes).c_str(),
              rep->points.size() - static_cast<std::size_t>(rep->removed),
              dry_run ? "" : (", replica images now at RP " + std::to_string(rep->base_after)).c_str());
  if (rep->rewritten_bytes != 0)
    std::printf("journal rewritten: the kept RPs now take %s (the RPs pruned between them are "
                "gone)\n", human_bytes(rep->rewritten_bytes).c_str());
  return 0;
}

// --point N or latest (0 for the read view); CLI11 has already refused anything else.
std::uint64_t parse_point(const std::string& point) {
  return point == "latest" ? 0 : std::stoull(point);
}

int cmd_restore(const std::string& store, const std::string& group, const std::string& point,
                const std::string& disk, const std::string& out) {
  // On a terminal: bytes done of the disk's size, the rate and the ETA.
  const auto progress = isatty(STDERR_FILENO) ? progress_printer() : nullptr;
  Status s = site::restore_point(store, group, parse_point(point), disk, out, progress);
  if (progress) std::fprintf(stderr, "\n");
  if (!s.is_ok()) return fail("restore of disk '" + disk + "' at RP " + point, s);
  return 0;
}

}  // namespace ferry::tools
