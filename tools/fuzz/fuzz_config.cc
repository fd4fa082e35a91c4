// libFuzzer target for the agent config parser (tools/config.cc, docs/fuzzing.md).
//
// Any input: parse_agent_config never crashes, hangs or throws, and a refusal names the file.
// An accepted config must hold every bound of config.h, and mean the same after a round
// trip: written back as TOML by the small emitter below and parsed again, it gives the same
// AgentConfig (source lines aside). So what the parser accepts, it accepts for a reason it
// can say again.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <string_view>

#include "../config.h"

namespace {

using ferry::tools::AgentConfig;
using ferry::tools::TargetConfig;
using ferry::tools::TargetKind;
namespace t = ferry::tools;

constexpr const char* kFile = "fuzz.toml";

// A TOML basic string: quotes, backslashes and control characters escaped (the parser
// rejects controls below 0x20 in values, but DEL is allowed and must be escaped).
std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04X", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string emit(const AgentConfig& cfg) {
  std::string out;
  out += "state_dir = " + quoted(cfg.state_dir) + "\n";
  out += "status_socket = " + quoted(cfg.status_socket) + "\n";
  out += "log_level = " + quoted(cfg.log_level) + "\n";
  if (!cfg.metrics.empty()) out += "metrics = " + quoted(cfg.metrics) + "\n";
  for (const TargetConfig& tc : cfg.targets) {
    if (tc.kind == TargetKind::libvirt_domain) {
      if (tc.domains.size() > 1) {  // a protection group
        out += "[[domain]]\nnames = [";
        for (std::size_t i = 0; i < tc.domains.size(); ++i) out += (i ? ", " : "") + quoted(tc.domains[i]);
        out += "]\n";
      } else {
        out += "[[domain]]\nname = " + quoted(tc.domain) + "\n";
      }
      if (!tc.boot_order.empty()) {
        out += "boot_order = [";
        for (std::size_t i = 0; i < tc.boot_order.size(); ++i)
          out += (i ? ", " : "") + quoted(tc.boot_order[i]);
        out += "]\n";
      }
      out += "max_pause_ms = " + std::to_string(tc.max_pause_ms) + "\nuri = " + quoted(tc.uri) +
             "\nquiesce = " + (tc.quiesce ? "true" : "false") + "\n";
    } else {
      out += "[[qmp]]\nsocket = " + quoted(tc.qmp_socket) + "\ndisks = [";
      for (std::size_t i = 0; i < tc.disks.size(); ++i)
        out += (i ? ", " : "") + quoted(tc.disks[i].node + "=" + tc.disks[i].name);
      out += "]\n";
    }
    out += "to = " + quoted(tc.to) + "\ngroup = " + quoted(tc.group) +
           "\ninterval_seconds = " + std::to_string(tc.interval_seconds) +
           "\nrpo_alert_seconds = " + std::to_string(tc.rpo_alert_seconds) + "\n";
  }
  return out;
}

bool same(const AgentConfig& a, const AgentConfig& b) {
  if (a.state_dir != b.state_dir || a.status_socket != b.status_socket ||
      a.log_level != b.log_level || a.metrics != b.metrics || a.targets.size() != b.targets.size())
    return false;
  for (std::size_t i = 0; i < a.targets.size(); ++i) {
    const TargetConfig& x = a.targets[i];
    const TargetConfig& y = b.targets[i];
    if (!x.same_source(y) || x.interval_seconds != y.interval_seconds ||
        x.rpo_alert_seconds != y.rpo_alert_seconds)
      return false;
  }
  return true;
}

bool name_ok(const std::string& s) {
  return !s.empty() && s.size() <= t::kMaxNameBytes && s[0] != '.' && s[0] != '-';
}

// Every bound config.h promises for an accepted config.
void check_bounds(const AgentConfig& cfg) {
  FERRY_ASSERT(!cfg.state_dir.empty() && cfg.state_dir[0] == '/' &&
               cfg.state_dir.size() <= t::kMaxPathBytes);
  FERRY_ASSERT(!cfg.status_socket.empty() && cfg.status_socket[0] == '/' &&
               cfg.status_socket.size() <= t::kMaxSocketPathBytes);
  static const std::set<std::string> kLevels = {"debug", "info", "warn", "error"};
  FERRY_ASSERT(kLevels.count(cfg.log_level) == 1);
  FERRY_ASSERT(cfg.targets.size() <= t::kMaxTargets);
  std::set<std::string> groups;
  for (const TargetConfig& tc : cfg.targets) {
    FERRY_ASSERT_MSG(groups.insert(tc.group).second, "two targets share a group");
    FERRY_ASSERT(name_ok(tc.group));
    FERRY_ASSERT(t::check_endpoint_syntax(tc.to).is_ok());
    FERRY_ASSERT(tc.interval_seconds >= 1 && tc.interval_seconds <= t::kMaxIntervalSeconds);
    FERRY_ASSERT(tc.rpo_alert_seconds >= 1 && tc.rpo_alert_seconds <= t::kMaxRpoAlertSeconds);
    if (tc.kind == TargetKind::qmp) {
      FERRY_ASSERT(!tc.qmp_socket.empty() && tc.qmp_socket[0] == '/' &&
                   tc.qmp_socket.size() <= t::kMaxSocketPathBytes);
      FERRY_ASSERT(!tc.disks.empty() && tc.disks.size() <= t::kMaxDisksPerTarget);
      for (const auto& d : tc.disks) FERRY_ASSERT(name_ok(d.node) && name_ok(d.name));
    } else {
      FERRY_ASSERT(!tc.domains.empty() && tc.domains.size() <= t::kMaxDomainsPerGroup);
      for (const auto& d : tc.domains) FERRY_ASSERT(!d.empty() && d.size() <= t::kMaxNameBytes);
      FERRY_ASSERT(tc.domains.size() == 1 || !tc.group.empty());
      FERRY_ASSERT(tc.boot_order.empty() || tc.boot_order.size() == tc.domains.size());
      FERRY_ASSERT(tc.max_pause_ms >= 1 && tc.max_pause_ms <= t::kMaxPauseMs);
      FERRY_ASSERT(!tc.uri.empty() && tc.uri.size() <= t::kMaxUriBytes);
      FERRY_ASSERT(tc.disks.empty());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  auto cfg = t::parse_agent_config(in, kFile);
  if (!cfg.is_ok()) {
    FERRY_ASSERT_MSG(cfg.status().message().rfind(kFile, 0) == 0,
                     "a refusal does not start with the file name");
    return 0;
  }
  check_bounds(*cfg);
  std::string again_text = emit(*cfg);
  auto again = t::parse_agent_config(again_text, kFile);
  if (!again.is_ok()) {
    std::fprintf(stderr, "re-emitted config refused: %s\n--- emitted ---\n%s\n",
                 again.status().to_string().c_str(), again_text.c_str());
    FERRY_ASSERT_MSG(false, "an accepted config, written back, is refused");
  }
  FERRY_ASSERT_MSG(same(*cfg, *again), "an accepted config means something else written back");
  return 0;
}
