#include "ferry/metrics/registry.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "ferry/base/status.h"

namespace ferry::metrics {
namespace {

constexpr const char* kDroppedName = "ferry_metrics_dropped_series_total";

// The label set as it appears between the braces: a="x",b="y" (the caller's order).
std::string label_text(const Labels& labels) {
  std::string out;
  for (const auto& [k, v] : labels) {
    FERRY_ASSERT(valid_label_name(k) && k != "le");
    if (!out.empty()) out += ',';
    out += k;
    out += "=\"";
    out += escape_label_value(v.size() > kMaxLabelValueBytes ? v.substr(0, kMaxLabelValueBytes) : v);
    out += '"';
  }
  return out;
}

std::string braces(const std::string& inner) { return inner.empty() ? "" : "{" + inner + "}"; }

}  // namespace

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::counter: return "counter";
    case Kind::gauge: return "gauge";
    case Kind::histogram: return "histogram";
  }
  return "untyped";
}

std::vector<double> duration_buckets_seconds() {
  return {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600};
}

std::string escape_label_value(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string escape_help(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.0f", v);
    return buf;
  }
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  // The shortest form that reads back the same value.
  for (int prec = 1; prec <= 17; ++prec) {
    char b[40];
    std::snprintf(b, sizeof b, "%.*g", prec, v);
    if (std::strtod(b, nullptr) == v) return b;
  }
  return buf;
}

bool valid_metric_name(const std::string& n) {
  if (n.empty()) return false;
  for (std::size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool valid_label_name(const std::string& n) {
  if (n.empty() || n.rfind("__", 0) == 0) return false;
  for (std::size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

void Registry::describe(const std::string& name, Kind kind, const std::string& help,
                        std::vector<double> buckets) {
  FERRY_ASSERT(valid_metric_name(name));
  // Prometheus conventions: counters end in _total, nothing else does.
  const bool total = name.size() > 6 && name.compare(name.size() - 6, 6, "_total") == 0;
  FERRY_ASSERT((kind == Kind::counter) == total);
  FERRY_ASSERT(kind == Kind::histogram || buckets.empty());
  for (std::size_t i = 1; i < buckets.size(); ++i) FERRY_ASSERT(buckets[i - 1] < buckets[i]);
  std::lock_guard lock(mu_);
  auto [it, fresh] = families_.try_emplace(name);
  if (!fresh) {
    FERRY_ASSERT(it->second.kind == kind);
    return;
  }
  it->second.kind = kind;
  it->second.help = help;
  it->second.buckets = std::move(buckets);
}

Registry::Series* Registry::series_locked(const std::string& name, Kind kind, const Labels& labels) {
  auto f = families_.find(name);
  FERRY_ASSERT(f != families_.end() && f->second.kind == kind);  // describe() first
  const std::string key = label_text(labels);
  auto s = f->second.series.find(key);
  if (s != f->second.series.end()) return &s->second;
  if (series_count_ >= kMaxSeries) {
    ++dropped_series_;
    return nullptr;
  }
  ++series_count_;
  Series& fresh = f->second.series[key];
  if (kind == Kind::histogram) fresh.counts.assign(f->second.buckets.size() + 1, 0);
  return &fresh;
}

void Registry::add(const std::string& name, const Labels& labels, double delta) {
  FERRY_ASSERT(delta >= 0);
  std::lock_guard lock(mu_);
  if (Series* s = series_locked(name, Kind::counter, labels)) s->value += delta;
}

void Registry::set(const std::string& name, const Labels& labels, double value) {
  std::lock_guard lock(mu_);
  if (Series* s = series_locked(name, Kind::gauge, labels)) s->value = value;
}

void Registry::set_total(const std::string& name, const Labels& labels, double value) {
  FERRY_ASSERT(value >= 0);
  std::lock_guard lock(mu_);
  if (Series* s = series_locked(name, Kind::counter, labels)) s->value = std::max(s->value, value);
}

void Registry::observe(const std::string& name, const Labels& labels, double value) {
  std::lock_guard lock(mu_);
  Series* s = series_locked(name, Kind::histogram, labels);
  if (s == nullptr) return;
  const auto& b = families_.at(name).buckets;
  std::size_t i = 0;
  while (i < b.size() && value > b[i]) ++i;
  s->counts[i] += 1;
  s->sum += value;
  s->count += 1;
}

void Registry::clear(const std::string& name) {
  std::lock_guard lock(mu_);
  auto f = families_.find(name);
  if (f == families_.end()) return;
  series_count_ -= f->second.series.size();
  f->second.series.clear();
}

void Registry::add_collector(Collector c) {
  std::lock_guard lock(mu_);
  collectors_.push_back(std::move(c));
}

std::string Registry::render() {
  std::lock_guard render_lock(render_mu_);
  std::vector<Collector> collectors;
  {
    std::lock_guard lock(mu_);
    collectors = collectors_;
  }
  for (auto& c : collectors) c(*this);  // they take mu_ themselves
  std::lock_guard lock(mu_);
  std::string out;
  auto header = [&out](const std::string& name, const std::string& help, Kind kind) {
    out += "# HELP " + name + " " + escape_help(help) + "\n";
    out += "# TYPE " + name + " " + kind_name(kind) + "\n";
  };
  for (const auto& [name, f] : families_) {
    if (f.series.empty()) continue;
    header(name, f.help, f.kind);
    for (const auto& [key, s] : f.series) {
      if (f.kind != Kind::histogram) {
        out += name + braces(key) + " " + format_value(s.value) + "\n";
        continue;
      }
      std::uint64_t cumulative = 0;
      const std::string sep = key.empty() ? "" : ",";
      for (std::size_t i = 0; i <= f.buckets.size(); ++i) {
        cumulative += s.counts[i];
        const std::string le = i < f.buckets.size() ? format_value(f.buckets[i]) : "+Inf";
        out += name + "_bucket{" + key + sep + "le=\"" + le + "\"} " + std::to_string(cumulative) + "\n";
      }
      out += name + "_sum" + braces(key) + " " + format_value(s.sum) + "\n";
      out += name + "_count" + braces(key) + " " + std::to_string(s.count) + "\n";
    }
  }
  header(kDroppedName, "Series not kept because the registry was at its bound", Kind::counter);
  out += std::string(kDroppedName) + " " + std::to_string(dropped_series_) + "\n";
  return out;
}

}  // namespace ferry::metrics
