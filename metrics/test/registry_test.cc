#include <catch2/catch.hpp>

#include "ferry/metrics/registry.h"

using namespace ferry::metrics;

TEST_CASE("format_value: integers plain, fractions shortest, specials by name") {
  CHECK(format_value(0) == "0");
  CHECK(format_value(42) == "42");
  CHECK(format_value(-3) == "-3");
  CHECK(format_value(0.1) == "0.1");
  CHECK(format_value(2.5) == "2.5");
  CHECK(format_value(1.0 / 0.0) == "+Inf");
  CHECK(format_value(-1.0 / 0.0) == "-Inf");
  CHECK(format_value(0.0 / 0.0) == "NaN");
}

TEST_CASE("label values and help text are escaped") {
  CHECK(escape_label_value("a\"b\\c\nd") == "a\\\"b\\\\c\\nd");
  CHECK(escape_help("x\\y\nz\"") == "x\\\\y\\nz\"");
}

TEST_CASE("names follow Prometheus's rules") {
  CHECK(valid_metric_name("ferry_rpo_seconds"));
  CHECK(valid_metric_name("a:b_c9"));
  CHECK_FALSE(valid_metric_name("9a"));
  CHECK_FALSE(valid_metric_name("a-b"));
  CHECK_FALSE(valid_metric_name(""));
  CHECK(valid_label_name("group"));
  CHECK_FALSE(valid_label_name("__name"));
  CHECK_FALSE(valid_label_name("a:b"));
}

TEST_CASE("counters, gauges and histograms render with HELP and TYPE, sorted by name") {
  Registry r;
  r.describe("ferry_sent_bytes_total", Kind::counter, "Bytes sent");
  r.describe("ferry_rpo_seconds", Kind::gauge, "RPO");
  r.describe("ferry_stage_seconds", Kind::histogram, "Stage time", {1, 10});
  r.add("ferry_sent_bytes_total", {{"group", "vm1"}}, 100);
  r.add("ferry_sent_bytes_total", {{"group", "vm1"}}, 23);
  r.set("ferry_rpo_seconds", {{"group", "vm\"1"}}, 4.5);
  r.observe("ferry_stage_seconds", {{"group", "vm1"}, {"stage", "send"}}, 0.5);
  r.observe("ferry_stage_seconds", {{"group", "vm1"}, {"stage", "send"}}, 5);
  r.observe("ferry_stage_seconds", {{"group", "vm1"}, {"stage", "send"}}, 50);
  const std::string text = r.render();
  const std::string want =
      "# HELP ferry_rpo_seconds RPO\n"
      "# TYPE ferry_rpo_seconds gauge\n"
      "ferry_rpo_seconds{group=\"vm\\\"1\"} 4.5\n"
      "# HELP ferry_sent_bytes_total Bytes sent\n"
      "# TYPE ferry_sent_bytes_total counter\n"
      "ferry_sent_bytes_total{group=\"vm1\"} 123\n"
      "# HELP ferry_stage_seconds Stage time\n"
      "# TYPE ferry_stage_seconds histogram\n"
      "ferry_stage_seconds_bucket{group=\"vm1\",stage=\"send\",le=\"1\"} 1\n"
      "ferry_stage_seconds_bucket{group=\"vm1\",stage=\"send\",le=\"10\"} 2\n"
      "ferry_stage_seconds_bucket{group=\"vm1\",stage=\"send\",le=\"+Inf\"} 3\n"
      "ferry_stage_seconds_sum{group=\"vm1\",stage=\"send\"} 55.5\n"
      "ferry_stage_seconds_count{group=\"vm1\",stage=\"send\"} 3\n"
      "# HELP ferry_metrics_dropped_series_total Series not kept because the registry was at its bound\n"
      "# TYPE ferry_metrics_dropped_series_total counter\n"
      "ferry_metrics_dropped_series_total 0\n";
  CHECK(text == want);
}

TEST_CASE("a family without series is not rendered; collectors run at each render") {
  Registry r;
  r.describe("ferry_empty", Kind::gauge, "nothing");
  r.describe("ferry_live", Kind::gauge, "live");
  int calls = 0;
  r.add_collector([&calls](Registry& reg) {
    ++calls;
    reg.clear("ferry_live");
    reg.set("ferry_live", {}, calls);
  });
  CHECK(r.render().find("ferry_empty") == std::string::npos);
  CHECK(r.render().find("ferry_live 2\n") != std::string::npos);
}

TEST_CASE("set_total never goes back; the series bound drops and counts") {
  Registry r;
  r.describe("ferry_x_total", Kind::counter, "x");
  r.set_total("ferry_x_total", {}, 10);
  r.set_total("ferry_x_total", {}, 7);
  CHECK(r.render().find("ferry_x_total 10\n") != std::string::npos);
  r.describe("ferry_many", Kind::gauge, "many");
  for (std::size_t i = 0; i < kMaxSeries + 5; ++i) r.set("ferry_many", {{"i", std::to_string(i)}}, 1);
  const std::string text = r.render();
  CHECK(text.find("ferry_metrics_dropped_series_total 6\n") != std::string::npos);
  r.clear("ferry_many");
  r.set("ferry_many", {{"i", "new"}}, 1);
  CHECK(r.render().find("ferry_many{i=\"new\"} 1\n") != std::string::npos);
}

TEST_CASE("long label values are cut") {
  Registry r;
  r.describe("ferry_g", Kind::gauge, "g");
  r.set("ferry_g", {{"group", std::string(1000, 'a')}}, 1);
  CHECK(r.render().find(std::string(kMaxLabelValueBytes, 'a') + "\"}") != std::string::npos);
}
