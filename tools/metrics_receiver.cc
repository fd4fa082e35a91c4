// The receiver's metrics (metrics.h): counters from the receiver's hooks, gauges read at
// scrape time from Receiver::status() and the store's read-only views (the same ones
// `ferry points` uses: safe while the receiver runs, no group lock).
#include <chrono>
#include <nlohmann/json.hpp>

#include "ferry/site/receiver.h"
#include "ferry/site/rp_times.h"
#include "ferry/site/store.h"
#include "metrics.h"

namespace ferry::tools {
namespace {

using metrics::Kind;

void describe_receiver(metrics::Registry& r) {
  r.describe("ferry_receiver_rps_total", Kind::counter, "RPs committed");
  r.describe("ferry_receiver_refused_rps_total", Kind::counter, "RPs refused, by the kind of the reason");
  r.describe("ferry_received_bytes_total", Kind::counter, "Frame bytes received for committed RPs");
  r.describe("ferry_stored_bytes_total", Kind::counter, "Disk bytes committed (data and zero ranges)");
  r.describe("ferry_rp_stage_duration_seconds", Kind::histogram,
             "Time an RP spent in each receiver stage (receive, durable, ack, apply)",
             metrics::duration_buckets_seconds());
  r.describe("ferry_group_state", Kind::gauge, "1 for the group's state (ok, failing, apply_pending, failed_over)");
  r.describe("ferry_last_committed_rp", Kind::gauge, "Id of the newest committed RP");
  r.describe("ferry_last_applied_rp", Kind::gauge, "Id of the RP the replica images hold (the oldest kept)");
  r.describe("ferry_last_rp_timestamp_seconds", Kind::gauge, "Unix time of the newest RP (its capture on the source)");
  r.describe("ferry_rpo_seconds", Kind::gauge, "Age of the newest committed RP: now minus its capture time");
  r.describe("ferry_source_connected", Kind::gauge, "1 while a source serves the group");
  r.describe("ferry_failed_attempts", Kind::gauge, "Failed attempts of the group's open failure or apply episode");
  r.describe("ferry_apply_lag_seconds", Kind::gauge, "How long the replica's pending apply has failed (0: none)");
  r.describe("ferry_kept_rps", Kind::gauge, "RPs the group offers (restore, export, failover)");
  r.describe("ferry_prune_pending_rps", Kind::gauge, "Offered RPs retention removes at its next pass");
  r.describe("ferry_pinned_rps", Kind::gauge, "RPs held by a reader: exports, restores and test failovers in progress");
  r.describe("ferry_journal_bytes", Kind::gauge, "Bytes of the kept RPs' records in the journal");
  r.describe("ferry_store_bytes", Kind::gauge, "Allocated bytes of the group's store (replica images and journal)");
  r.describe("ferry_failed_over", Kind::gauge, "1 while the group is failed over (RPs refused until failback)");
}

std::uint64_t now_unix_ns() {
  return std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count());
}

}  // namespace

ReceiverMetrics::ReceiverMetrics(metrics::Registry& reg, std::string store_root)
    : reg_(reg), root_(std::move(store_root)) {
  describe_receiver(reg_);
  reg_.add_collector([this](metrics::Registry& r) { collect(r); });
}

void ReceiverMetrics::attach(const site::Receiver* receiver) {
  std::lock_guard lock(mu_);
  receiver_ = receiver;
}

void ReceiverMetrics::rp_committed(const site::RpReceived& r) {
  const metrics::Labels gl{{"group", r.group}};
  reg_.add("ferry_receiver_rps_total", gl);
  reg_.add("ferry_received_bytes_total", gl, double(r.wire_bytes));
  reg_.add("ferry_stored_bytes_total", gl, double(r.logical_bytes));
  const std::pair<const char*, double> stages[] = {{"receive", r.receive_seconds},
                                                    {"durable", r.durable_seconds},
                                                    {"ack", r.ack_seconds},
                                                    {"apply", r.apply_seconds}};
  for (const auto& [name, secs] : stages)
    reg_.observe("ferry_rp_stage_duration_seconds", {{"group", r.group}, {"stage", name}}, secs);
}

void ReceiverMetrics::rp_refused(const std::string& group, const Status& why) {
  reg_.add("ferry_receiver_refused_rps_total", {{"group", group}, {"kind", errc_name(why.code())}});
}

void ReceiverMetrics::collect(metrics::Registry& r) {
  std::vector<site::GroupStatus> groups;
  {
    std::lock_guard lock(mu_);
    if (receiver_ == nullptr) return;
    groups = receiver_->status();
  }
  const std::uint64_t now = now_unix_ns();
  r.clear("ferry_group_state");  // a group leaves its old state's series
  for (const site::GroupStatus& g : groups) {
    const metrics::Labels l{{"group", g.group}};
    r.set("ferry_group_state", {{"group", g.group}, {"state", site::group_state_name(g.state)}}, 1);
    r.set("ferry_last_committed_rp", l, double(g.last_committed_rp));
    r.set("ferry_last_applied_rp", l, double(g.last_applied_rp));
    r.set("ferry_source_connected", l, g.source.empty() ? 0 : 1);
    r.set("ferry_failed_attempts", l, double(g.failed_attempts));
    r.set("ferry_failed_over", l, g.state == site::GroupState::failed_over ? 1 : 0);
    r.set("ferry_apply_lag_seconds", l,
          g.state == site::GroupState::apply_pending && g.failing_since_unix_ns
              ? double(now - std::min(now, g.failing_since_unix_ns)) / 1e9 : 0);
    std::uint64_t newest_unix_ns = g.last_commit_unix_ns;
    if (auto rep = site::explain_points(root_, g.group, now); rep.is_ok()) {
      std::uint64_t journal = 0, prune = 0, pinned = 0;
      for (const site::PrunePoint& p : rep->points) {
        journal += p.store_bytes;
        prune += p.keep ? 0 : 1;
        pinned += p.pinned ? 1 : 0;
      }
      if (!rep->points.empty()) newest_unix_ns = rep->points.back().info.created_unix_ns;
      r.set("ferry_kept_rps", l, double(rep->points.size()));
      r.set("ferry_prune_pending_rps", l, double(prune));
      r.set("ferry_pinned_rps", l, double(pinned));
      r.set("ferry_journal_bytes", l, double(journal));
    }
    if (auto used = site::group_usage_bytes(root_, g.group); used.is_ok())
      r.set("ferry_store_bytes", l, double(*used));
    if (newest_unix_ns != 0) {
      r.set("ferry_last_rp_timestamp_seconds", l, double(newest_unix_ns) / 1e9);
      r.set("ferry_rpo_seconds", l, double(now - std::min(now, newest_unix_ns)) / 1e9);
    }
  }
}

void annotate_points_stages(const std::string& store, const std::string& group, nlohmann::json& points) {
  auto times = site::read_rp_times(store, group);
  if (!times.is_ok()) return;  // monitoring data: the listing stands without it
  auto s = [](std::uint64_t us) { return double(us) / 1e6; };
  for (nlohmann::json& p : points) {
    auto it = times->find(p.value("rp_id", std::uint64_t(0)));
    if (it == times->end()) continue;
    const site::RpTimesRecord& r = it->second;
    nlohmann::json stages{{"receiver", {{"receive", s(r.receive_us)}, {"durable", s(r.durable_us)},
                                        {"ack", s(r.ack_us)}, {"apply", s(r.apply_us)}}}};
    if (r.source)
      stages["source"] = {{"slot", s(r.source->slot_us)}, {"capture", s(r.source->capture_us)},
                          {"read", s(r.source->read_us)}, {"hash_compress", s(r.source->hash_compress_us)},
                          {"send", s(r.source->send_us)}};
    p["stages"] = std::move(stages);
  }
}

}  // namespace ferry::tools
