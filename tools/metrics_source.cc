// The source's metrics (metrics.h) and the /metrics server both ends use.
#include <chrono>

#include "ferry/source/sender.h"
#include "ferry/transport/connection.h"
#include "metrics.h"

namespace ferry::tools {
namespace {

using metrics::Kind;

std::uint64_t now_unix_ns() {
  return std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count());
}

void describe_source(metrics::Registry& r) {
  r.describe("ferry_rpo_seconds", Kind::gauge,
             "Age of the newest acknowledged RP: now minus the start of its capture");
  r.describe("ferry_rpo_alert_seconds", Kind::gauge, "The RPO threshold (rpo_alert_seconds, --rpo-alert)");
  r.describe("ferry_rpo_exceeded", Kind::gauge, "1 when the RPO is over its threshold (or unknown past it)");
  r.describe("ferry_last_rp_timestamp_seconds", Kind::gauge,
             "Unix time of the newest acknowledged RP (its capture start)");
  r.describe("ferry_last_rp_id", Kind::gauge, "Id of the newest acknowledged RP");
  r.describe("ferry_rps_total", Kind::counter, "RPs acknowledged by the receiver");
  r.describe("ferry_errors_total", Kind::counter, "Failed RPs, by the kind of their error");
  r.describe("ferry_retries_total", Kind::counter, "RPs started after a failed one");
  r.describe("ferry_rp_stage_duration_seconds", Kind::histogram,
             "Time an RP spent in each stage (slot, capture, read, hash_compress, send, durable, finish)",
             metrics::duration_buckets_seconds());
  r.describe("ferry_rp_duration_seconds", Kind::histogram, "Time of a whole RP, connect to acknowledgement",
             metrics::duration_buckets_seconds());
  r.describe("ferry_changed_bytes_total", Kind::counter, "Bytes the change tracking marked changed");
  r.describe("ferry_read_bytes_total", Kind::counter, "Bytes read from the point-in-time views");
  r.describe("ferry_zero_bytes_total", Kind::counter, "Changed bytes sent as zero ranges (never read, or read and found zero)");
  r.describe("ferry_data_bytes_total", Kind::counter, "Changed bytes sent as data (before compression)");
  r.describe("ferry_payload_bytes_total", Kind::counter, "Data payload bytes on the wire (after compression)");
  r.describe("ferry_sent_bytes_total", Kind::counter, "Every byte sent to the receiver for acknowledged RPs");
  r.describe("ferry_skipped_blocks_total", Kind::counter, "Resync blocks equal on both ends, not sent");
  r.describe("ferry_compression_ratio", Kind::gauge, "Data bytes over payload bytes of the newest RP");
  r.describe("ferry_receiver_connected", Kind::gauge, "1 when the last attempt reached the receiver's hello");
  r.describe("ferry_rp_in_progress", Kind::gauge, "1 while an RP runs");
  r.describe("ferry_rp_progress_bytes", Kind::gauge, "Bytes of the running RP's disks gone through");
  r.describe("ferry_rp_progress_total_bytes", Kind::gauge, "Bytes the running RP goes through (0: not known ahead: an incremental)");
}

}  // namespace

Result<std::unique_ptr<metrics::HttpServer>> serve_metrics(const std::string& listen,
                                                           metrics::Registry& reg) {
  auto ep = transport::parse_endpoint(listen, /*allow_port_zero=*/true);
  if (!ep.is_ok()) return ep.status();
  std::vector<metrics::Route> routes;
  routes.push_back({"GET", "/metrics", [&reg](const metrics::HttpRequest&) {
                      return metrics::HttpResponse{200, "text/plain; version=0.0.4; charset=utf-8",
                                                   reg.render()};
                    }});
  auto server = metrics::HttpServer::start(ep->host, ep->port, std::move(routes));
  if (!server.is_ok()) return std::move(server).status().with_context("--metrics " + listen);
  return server;
}

SourceMetrics::SourceMetrics(metrics::Registry& reg) : reg_(reg) {
  describe_source(reg_);
  reg_.add_collector([this](metrics::Registry& r) { collect(r); });
}

void SourceMetrics::target(const std::string& group, double rpo_alert_seconds) {
  std::lock_guard lock(mu_);
  Group& g = groups_[group];
  g.alert_seconds = rpo_alert_seconds;
  if (g.watched_since_unix_ns == 0) g.watched_since_unix_ns = now_unix_ns();
}

void SourceMetrics::forget(const std::string& group) {
  std::lock_guard lock(mu_);
  groups_.erase(group);
}

void SourceMetrics::receiver_state(const std::string& group, std::uint64_t rp_id, std::uint64_t unix_ns) {
  reg_.set("ferry_receiver_connected", {{"group", group}}, 1);
  std::lock_guard lock(mu_);
  Group& g = groups_[group];
  if (g.last_rp_id == 0 && rp_id != 0) {  // a restarted agent: the receiver's word until ours
    g.last_rp_id = rp_id;
    g.last_rp_unix_ns = unix_ns;
  }
}

void SourceMetrics::rp_started(const std::string& group) {
  bool retry = false;
  {
    std::lock_guard lock(mu_);
    Group& g = groups_[group];
    retry = g.failing;
    g.running = true;
    g.running_since_unix_ns = now_unix_ns();
    g.done_bytes = g.total_bytes = 0;
  }
  if (retry) reg_.add("ferry_retries_total", {{"group", group}});
}

void SourceMetrics::progress(const std::string& group, std::uint64_t done, std::uint64_t total) {
  std::lock_guard lock(mu_);
  Group& g = groups_[group];
  g.done_bytes = done;
  g.total_bytes = total;
}

void SourceMetrics::rp_done(const std::string& group, const source::RpStats& s, std::uint64_t rp_unix_ns) {
  const metrics::Labels gl{{"group", group}};
  std::uint64_t data = 0, payload = 0;
  for (const source::DiskStats& d : s.disks) {
    const metrics::Labels dl{{"group", group}, {"disk", d.name}};
    reg_.add("ferry_changed_bytes_total", dl, double(d.extent_bytes));
    reg_.add("ferry_read_bytes_total", dl, double(d.read_bytes));
    reg_.add("ferry_zero_bytes_total", dl, double(d.zero_bytes));
    reg_.add("ferry_data_bytes_total", dl, double(d.data_bytes));
    reg_.add("ferry_payload_bytes_total", dl, double(d.payload_bytes));
    reg_.add("ferry_skipped_blocks_total", dl, double(d.resync_compared_blocks - d.resync_sent_blocks));
    data += d.data_bytes;
    payload += d.payload_bytes;
  }
  reg_.add("ferry_sent_bytes_total", gl, double(s.wire_bytes));
  reg_.add("ferry_rps_total", gl);
  reg_.set("ferry_compression_ratio", gl, payload ? double(data) / double(payload) : 1.0);
  const std::vector<Stage> stages = rp_stages(s);
  for (const Stage& st : stages)
    reg_.observe("ferry_rp_stage_duration_seconds", {{"group", group}, {"stage", st.name}}, st.seconds);
  reg_.observe("ferry_rp_duration_seconds", gl, s.total_seconds);
  std::lock_guard lock(mu_);
  Group& g = groups_[group];
  g.last_rp_id = s.rp_id;
  g.last_rp_unix_ns = rp_unix_ns;
  g.failing = false;
  g.last_error.clear();
  g.last_stages = stages;
  g.last_wire_bytes = s.wire_bytes;
  g.running = false;
}

void SourceMetrics::rp_failed(const std::string& group, const Status& why) {
  if (why.code() == Errc::cancelled) {  // stopped on request: not an error
    std::lock_guard lock(mu_);
    groups_[group].running = false;
    return;
  }
  reg_.add("ferry_errors_total", {{"group", group}, {"kind", errc_name(why.code())}});
  if (why.code() == Errc::disconnected || why.code() == Errc::timeout)
    reg_.set("ferry_receiver_connected", {{"group", group}}, 0);
  std::lock_guard lock(mu_);
  Group& g = groups_[group];
  g.failing = true;
  g.last_error = why.to_string();
  g.running = false;
}

RpoInputs SourceMetrics::inputs_locked(const Group& g, std::uint64_t now_ns) const {
  RpoInputs in;
  if (g.last_rp_id != 0) in.rpo_seconds = double(now_ns - std::min(now_ns, g.last_rp_unix_ns)) / 1e9;
  in.alert_seconds = g.alert_seconds;
  in.last_stages = g.last_stages;
  in.last_wire_bytes = g.last_wire_bytes;
  in.last_error = g.last_error;
  in.watched_seconds = double(now_ns - std::min(now_ns, g.watched_since_unix_ns)) / 1e9;
  if (g.running) in.running_seconds = double(now_ns - std::min(now_ns, g.running_since_unix_ns)) / 1e9;
  return in;
}

std::string SourceMetrics::alert(const std::string& group) const {
  std::lock_guard lock(mu_);
  auto it = groups_.find(group);
  if (it == groups_.end() || it->second.alert_seconds <= 0) return "";
  return rpo_alert(inputs_locked(it->second, now_unix_ns()));
}

void SourceMetrics::collect(metrics::Registry& r) {
  const std::uint64_t now = now_unix_ns();
  std::lock_guard lock(mu_);
  // The gauges are set from the groups present now, so a removed target's go.
  for (const char* name : {"ferry_rpo_seconds", "ferry_last_rp_timestamp_seconds", "ferry_last_rp_id",
                           "ferry_rpo_alert_seconds", "ferry_rpo_exceeded", "ferry_rp_in_progress",
                           "ferry_rp_progress_bytes", "ferry_rp_progress_total_bytes"})
    r.clear(name);
  for (const auto& [name, g] : groups_) {
    const metrics::Labels l{{"group", name}};
    const RpoInputs in = inputs_locked(g, now);
    if (in.rpo_seconds) {
      r.set("ferry_rpo_seconds", l, *in.rpo_seconds);
      r.set("ferry_last_rp_timestamp_seconds", l, double(g.last_rp_unix_ns) / 1e9);
      r.set("ferry_last_rp_id", l, double(g.last_rp_id));
    }
    if (g.alert_seconds > 0) {
      r.set("ferry_rpo_alert_seconds", l, g.alert_seconds);
      r.set("ferry_rpo_exceeded", l, rpo_alert(in).empty() ? 0 : 1);
    }
    r.set("ferry_rp_in_progress", l, g.running ? 1 : 0);
    r.set("ferry_rp_progress_bytes", l, double(g.done_bytes));
    r.set("ferry_rp_progress_total_bytes", l, double(g.total_bytes));
  }
}

}  // namespace ferry::tools

namespace ferry::tools {

void instrument(SourceMetrics& m, source::SenderOptions& so) {
  const std::string group = so.group;
  so.on_receiver_state = [&m, group](std::uint64_t rp, std::uint64_t ns) { m.receiver_state(group, rp, ns); };
  so.progress = [&m, group, inner = so.progress](std::uint64_t done, std::uint64_t total) {
    m.progress(group, done, total);
    if (inner) inner(done, total);
  };
  m.rp_started(group);
}

}  // namespace ferry::tools
