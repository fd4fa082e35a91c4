// Metrics in the Prometheus text exposition format (version 0.0.4).
//
// A Registry holds families (counter, gauge, histogram), each with a HELP line and a fixed
// kind, and their series by label set. Hot paths update series (add, set, observe); live
// state that is cheaper to read at scrape time (an RPO that grows by itself, a store's size)
// comes from collectors, run by render() before the text is made. Everything is bounded:
// at most kMaxSeries series per registry (a new series beyond that is dropped and counted in
// ferry_metrics_dropped_series_total), label values cut to kMaxLabelValueBytes. Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace ferry::metrics {

inline constexpr std::size_t kMaxSeries = 4096;
inline constexpr std::size_t kMaxLabelValueBytes = 256;

enum class Kind : std::uint8_t { counter = 0, gauge = 1, histogram = 2 };
const char* kind_name(Kind k);  // "counter" / "gauge" / "histogram"

// Label name -> value; names must be valid Prometheus label names (asserted).
using Labels = std::vector<std::pair<std::string, std::string>>;

// Bucket upper bounds for durations in seconds: 0.1 s to 1 h.
std::vector<double> duration_buckets_seconds();

// The text format's pieces, public for the unit tests.
std::string escape_label_value(const std::string& v);  // \\, \" and \n escaped
std::string escape_help(const std::string& v);         // \\ and \n escaped
std::string format_value(double v);                    // +Inf, -Inf, NaN, or shortest decimal
bool valid_metric_name(const std::string& name);       // [a-zA-Z_:][a-zA-Z0-9_:]*
bool valid_label_name(const std::string& name);        // [a-zA-Z_][a-zA-Z0-9_]*, no "__"

class Registry {
 public:
  using Collector = std::function<void(Registry&)>;

  // Declares a family. Its name and help are fixed; declaring it again with the same kind is
  // a no-op (asserted: same kind). Histograms take their buckets here (ascending; +Inf added).
  void describe(const std::string& name, Kind kind, const std::string& help,
                std::vector<double> buckets = {});
  // Counters: add a non-negative delta. Gauges: set. Counters fed from a total kept
  // elsewhere use set_total (never decreases what was shown; asserted non-negative).
  void add(const std::string& name, const Labels& labels, double delta = 1);
  void set(const std::string& name, const Labels& labels, double value);
  void set_total(const std::string& name, const Labels& labels, double value);
  void observe(const std::string& name, const Labels& labels, double value);
  // Removes every series of `name` (a gauge whose label sets come and go, e.g. per group
  // state): a collector calls it before setting the current ones.
  void clear(const std::string& name);

  void add_collector(Collector c);
  // Runs the collectors, then renders every family that has a series, sorted by name.
  std::string render();

 private:
  struct Series {
    double value = 0;                   // counter or gauge
    std::vector<std::uint64_t> counts;  // histogram: per bucket (not cumulative)
    double sum = 0;
    std::uint64_t count = 0;
  };
  struct Family {
    Kind kind = Kind::gauge;
    std::string help;
    std::vector<double> buckets;
    std::map<std::string, Series> series;  // key: the rendered label set "{a=\"x\"}"
  };
  Series* series_locked(const std::string& name, Kind kind, const Labels& labels);

  std::mutex mu_;
  std::map<std::string, Family> families_;
  std::size_t series_count_ = 0;
  std::uint64_t dropped_series_ = 0;
  std::vector<Collector> collectors_;
  std::mutex render_mu_;  // one render at a time (collectors are not re-entrant)
};

}  // namespace ferry::metrics
