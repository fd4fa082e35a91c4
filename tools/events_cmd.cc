#include "events_cmd.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <filesystem>

#include "doctor.h"
#include "ferry/site/store.h"
#include "tools.h"

namespace ferry::tools {
namespace {

struct EventsArgs {
  std::string group, since, store, work_dir;
  bool json = false;
};

nlohmann::json event_json(const events::Event& e) {
  nlohmann::json f = nlohmann::json::object();
  for (const events::Field& x : e.fields) {
    if (const auto* n = std::get_if<std::int64_t>(&x.value))
      f[x.key] = *n;
    else
      f[x.key] = std::get<std::string>(x.value);
  }
  return {{"time", events::format_time_us(e.time_us)}, {"group", e.group}, {"kind", e.kind},
          {"rp", e.rp}, {"disk", e.disk}, {"priority", int(e.priority)},
          {"message", e.message}, {"fields", std::move(f)}};
}

int cmd_events(const EventsArgs& a) {
  std::int64_t since_us = 0;
  if (!a.since.empty()) {
    auto s = events::parse_since(a.since, events::unix_now_us());
    if (!s.is_ok()) {
      std::fprintf(stderr, "ferry events: --since: %s\n", s.status().message().c_str());
      return 2;
    }
    since_us = *s;
  }
  const std::string dir =
      !a.store.empty()
          ? events::receiver_events_dir(a.store, a.group)
          : events::source_events_dir(a.work_dir.empty() ? default_state_dir() : a.work_dir,
                                      a.group);
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    std::fprintf(stderr, "ferry events: group '%s' has no event log at %s (wrong --store or "
                 "--work-dir, or no RP taken yet)\n", a.group.c_str(), dir.c_str());
    return 1;
  }
  auto r = events::read_events(dir, since_us);
  if (!r.is_ok()) {
    std::fprintf(stderr, "ferry events: %s\n", r.status().to_string().c_str());
    return 1;
  }
  for (const std::string& n : r->notes) std::fprintf(stderr, "ferry events: %s: %s\n", dir.c_str(), n.c_str());
  if (a.json) {
    nlohmann::json out = {{"group", a.group}, {"dir", dir}, {"events", nlohmann::json::array()},
                          {"notes", r->notes}};
    for (const events::Event& e : r->events) out["events"].push_back(event_json(e));
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  for (const events::Event& e : r->events)
    std::printf("%s  %-14s %6s %-8s %s\n", events::format_time_us(e.time_us).c_str(),
                e.kind.c_str(), e.rp ? std::to_string(e.rp).c_str() : "-",
                e.disk.empty() ? "-" : e.disk.c_str(), e.message.c_str());
  return 0;
}

}  // namespace

void emit_store_event(const std::string& store, events::Event e) {
  auto log = events::EventLog::open({.dir = events::receiver_events_dir(store, e.group)});
  if (!log.is_ok()) {
    spdlog::warn("event {} of group '{}' not written: {}", e.kind, e.group,
                 log.status().to_string());
    return;
  }
  (*log)->emit(std::move(e));
}

void emit_prune_events(const std::string& store, const std::string& group,
                       const site::PruneReport& report) {
  for (const site::PrunePoint& p : report.points)
    if (!p.keep)
      emit_store_event(store, {.group = group, .kind = "rp_pruned", .rp = p.info.rp_id,
                               .message = "RP " + std::to_string(p.info.rp_id) + " of group '" +
                                          group + "' pruned by ferry prune (" +
                                          report.policy.describe() + ")",
                               .fields = {{"by", std::string("ferry prune")},
                                          {"policy", report.policy.describe()}}});
}

std::function<bool(int& rc)> add_events_commands(CLI::App& app) {
  auto a = std::make_shared<EventsArgs>();
  auto* ev = app.add_subcommand("events", "Show a group's event log (RPs, bitmaps, errors)");
  ev->add_option("--group", a->group, "Group name")->required();
  ev->add_option("--since", a->since, "Only events at or after T: RFC 3339, or an age (90s, 10m, 2h, 3d)");
  ev->add_flag("--json", a->json, "JSON output");
  auto* store = ev->add_option("--store", a->store, "Receiver store directory (the receiver's log)");
  auto* work = ev->add_option("--work-dir", a->work_dir,
                              "Source state directory (the agent's state_dir, replicate/protect "
                              "--state-dir; default /var/lib/ferry)");
  store->excludes(work);
  auto run_doctor = add_doctor_command(app);
  return [ev, a, run_doctor](int& rc) {
    if (ev->parsed()) {
      rc = cmd_events(*a);
      return true;
    }
    return run_doctor(rc);
  };
}

}  // namespace ferry::tools
