// Opens the change source of a target: QMP or libvirt. The only caller of open_libvirt_source
// in tools/, so the libvirt dependency stays in one place.
#include "agent.h"

#include "ferry/cbt/libvirt_source.h"
#include "ferry/cbt/qmp_source.h"
#include "tools.h"

namespace ferry::tools {

Result<std::unique_ptr<cbt::ChangeSource>> open_target_source(const TargetConfig& t,
                                                               const std::string& state_dir) {
  FERRY_ASSERT(!t.group.empty());
  const std::string work_dir = state_dir + "/" + t.group;
  if (t.kind == TargetKind::libvirt_domain) {
    cbt::LibvirtGroupOptions lo;  // one domain: exactly open_libvirt_source()
    lo.uri = t.uri;
    lo.domains = t.domains.empty() ? std::vector<std::string>{t.domain} : t.domains;
    lo.boot_order = t.boot_order;
    lo.vm_names = t.vm_names;
    lo.group = t.group;
    lo.work_dir = work_dir;
    lo.quiesce = t.quiesce;
    lo.max_pause = std::chrono::milliseconds(t.max_pause_ms);
    return cbt::open_libvirt_group_source(lo);
  }
  cbt::QmpSourceOptions qo;
  qo.qmp_socket = t.qmp_socket;
  qo.group = t.group;
  for (const auto& d : t.disks) qo.disks.push_back({d.node, d.name});
  qo.work_dir = work_dir;
  return cbt::open_qmp_source(qo);
}

std::string target_source_name(const TargetConfig& t) {
  if (t.kind == TargetKind::libvirt_domain) return host_name() + ":" + t.uri + "/" + t.domain;
  return host_name() + ":" + t.qmp_socket;
}

}  // namespace ferry::tools
