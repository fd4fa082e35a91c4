// The /metrics endpoint of `ferry agent`, `ferry protect|replicate --interval` and
// `ferry receive` (--metrics ADDR:PORT, or metrics = "..." in their TOML): what each end
// records into a metrics::Registry, and the HTTP server that serves it. The metric names and
// their meaning are listed in docs/operations.md ("Metrics").
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "ferry/base/status.h"
#include "ferry/metrics/http_server.h"
#include "ferry/metrics/registry.h"
#include "rpo.h"

namespace ferry::source {
struct RpStats;
}
namespace ferry::site {
class Receiver;
struct RpReceived;
}

namespace ferry::tools {

// Serves `reg` as GET /metrics on `listen` (ADDR:PORT; port 0 picks one), bounded
// (metrics::HttpLimits). The error names the address.
Result<std::unique_ptr<metrics::HttpServer>> serve_metrics(const std::string& listen,
                                                           metrics::Registry& reg);

// The source's metrics, per group. Thread-safe: the agent's workers share one.
class SourceMetrics {
 public:
  explicit SourceMetrics(metrics::Registry& reg);
  void target(const std::string& group, double rpo_alert_seconds);
  // A target removed (agent reload): its gauges go at the next scrape; its counters and
  // histograms stay until the process ends, as Prometheus expects of counters.
  void forget(const std::string& group);
  // From the hello reply: the receiver's last committed RP and its time. Seeds the RPO of a
  // restarted agent until its own first RP is acknowledged.
  void receiver_state(const std::string& group, std::uint64_t rp_id, std::uint64_t unix_ns);
  void rp_started(const std::string& group);
  void progress(const std::string& group, std::uint64_t done_bytes, std::uint64_t total_bytes);
  void rp_done(const std::string& group, const source::RpStats& s, std::uint64_t rp_unix_ns);
  void rp_failed(const std::string& group, const Status& why);
  // The alert line for status (empty: within the threshold).
  std::string alert(const std::string& group) const;

 private:
  struct Group {
    double alert_seconds = 0;
    std::uint64_t watched_since_unix_ns = 0;
    std::uint64_t last_rp_id = 0;
    std::uint64_t last_rp_unix_ns = 0;
    bool failing = false;
    std::string last_error;
    std::vector<Stage> last_stages;
    std::uint64_t last_wire_bytes = 0;
    bool running = false;
    std::uint64_t running_since_unix_ns = 0;
    std::uint64_t done_bytes = 0, total_bytes = 0;
  };
  void collect(metrics::Registry& reg);
  RpoInputs inputs_locked(const Group& g, std::uint64_t now_ns) const;

  metrics::Registry& reg_;
  mutable std::mutex mu_;
  std::map<std::string, Group> groups_;
};

// The receiver's metrics: counters fed by the receiver's hooks (ReceiverOptions
// on_rp_committed / on_rp_refused), gauges read at scrape time from its status and the store.
class ReceiverMetrics {
 public:
  ReceiverMetrics(metrics::Registry& reg, std::string store_root);
  void attach(const site::Receiver* receiver);  // before the first scrape; null: detach
  void rp_committed(const site::RpReceived& r);
  void rp_refused(const std::string& group, const Status& why);

 private:
  void collect(metrics::Registry& reg);
  metrics::Registry& reg_;
  const std::string root_;
  std::mutex mu_;
  const site::Receiver* receiver_ = nullptr;
};

}  // namespace ferry::tools

namespace ferry::source {
struct SenderOptions;
}
namespace ferry::tools {
// `ferry points --json`: adds to each RP of `points` its "stages" (seconds) from the group's
// rp-times side file (site/rp_times.h): "source" (slot, capture, read, hash_compress, send as
// of rp_end) and "receiver" (receive, durable, ack, apply). RPs without a record get none.
void annotate_points_stages(const std::string& store, const std::string& group, nlohmann::json& points);

// Wires `m` into one RP's sender options: the receiver's state from the hello and the
// progress (a progress callback already set still runs).
void instrument(SourceMetrics& m, source::SenderOptions& so);
}  // namespace ferry::tools
