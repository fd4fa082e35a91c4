// One domain of a protection group: the libvirt source's capture split into the phases the
// group coordinator (group_capture.h) sequences across domains. capture() of a single-domain
// source is prepare() + start_job() + complete(); a group runs prepare() on every domain
// (ledger, healing, decisions: no effect on the guest), then the instant (suspend all, start
// every job, resume all), then complete() on every domain.
#pragma once

#include <memory>

#include "ferry/cbt/libvirt_source.h"
#include "group_capture.h"

namespace ferry::cbt {

class LibvirtMember : public ChangeSource, public GroupMember {
 public:
  // Everything before the backup job; the prepared state waits for start_job().
  virtual Status prepare(std::uint64_t base_rp, std::uint64_t rp_id,
                         const std::vector<std::string>& receiver_disks) = 0;
  // After start_job(): the views of the started job, as capture() returns them.
  virtual Result<Capture> complete() = 0;
  // The definition this capture read (sent or not): the group document needs every VM's.
  virtual const std::string& prepared_config() const = 0;
};

// open_libvirt_source() for a member of a group: the same checks, and the member interface.
Result<std::unique_ptr<LibvirtMember>> open_libvirt_member(const LibvirtSourceOptions& options);

}  // namespace ferry::cbt
