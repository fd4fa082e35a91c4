// The libvirt checks of `ferry doctor`: cbt's read-only diagnosis, as check results.
#include "doctor.h"
#include "ferry/cbt/libvirt_diagnose.h"

namespace ferry::tools {

void check_libvirt(const DoctorArgs& a, std::vector<CheckResult>& out) {
  if (a.domain.empty()) {
    for (const char* c : {"libvirt", "disk-format", "checkpoints", "nbd"})
      out.push_back({c, CheckStatus::skip, "no --domain (or a [[domain]] target in --config)", {}});
    return;
  }
  for (cbt::LibvirtFinding& f : cbt::diagnose_libvirt(a.uri, a.domain, a.group)) {
    out.push_back({f.check,
                   f.skipped ? CheckStatus::skip : f.ok ? CheckStatus::ok : CheckStatus::fail,
                   std::move(f.detail), std::move(f.fix)});
  }
}

}  // namespace ferry::tools
