// `ferry doctor` (docs/operations.md, "ferry doctor"): checks what Ferry needs on this host
// and at the receiver, names what is wrong and the fix. Each check is skipped when what it
// needs was not given (a domain, a receiver address, a store, TLS material).
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "tools.h"

namespace CLI {
class App;
}  // namespace CLI

namespace ferry::tools {

enum class CheckStatus : std::uint8_t { ok, fail, skip };

struct CheckResult {
  std::string name;  // "libvirt", "disk-format", "checkpoints", "receiver", "clock", "tls", ...
  CheckStatus status = CheckStatus::ok;
  std::string detail;
  std::string fix;  // empty unless failed
};

struct DoctorArgs {
  std::string domain, group, uri, config, to, store;
  std::string receive_config;  // receive.toml: each group's retention and quota
  TlsArgs tls;
  bool json = false;
  // The largest clock difference between source and receiver that passes (beyond half the
  // round trip, which bounds the measurement's error).
  double clock_tolerance_seconds = 1.0;
  double tls_warn_days = 30;
};

// The libvirt checks (doctor_libvirt.cc): libvirtd reachable, the domain's disks able to
// carry checkpoints, Ferry's checkpoints and the disks' bitmaps consistent.
void check_libvirt(const DoctorArgs& a, std::vector<CheckResult>& out);

// Registers `doctor` on `app`; the returned function runs it when parsed.
std::function<bool(int& rc)> add_doctor_command(CLI::App& app);

}  // namespace ferry::tools
