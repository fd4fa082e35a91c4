// A protection group of several libvirt domains: one ChangeSource over one LibvirtMember per
// domain, captured at one instant (group_capture.h), with the group document as the RP's VM
// definition (ferry/cbt/group_doc.h).
#include <algorithm>
#include <chrono>
#include <set>

#include <fmt/format.h>

#include "ferry/base/log.h"
#include "ferry/cbt/group_doc.h"
#include "ferry/cbt/libvirt_source.h"
#include "libvirt_member.h"

namespace ferry::cbt {
namespace {

constexpr std::size_t kMaxStoreName = 255;
constexpr std::size_t kMaxGroupDisks = 64;  // a group's disks in one RP (the journal's bound)

// Disk names become store file names: [A-Za-z0-9._-] (transport/rules.h).
bool store_name_ok(const std::string& n) {
  if (n.empty() || n.size() > kMaxStoreName || n == "." || n == "..") return false;
  return std::all_of(n.begin(), n.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_';
  });
}

struct GroupState {
  std::vector<Capture> parts;  // one per member, in member order
  std::string doc;             // the group document at this capture (empty: unreadable)
};

class GroupSource final : public ChangeSource {
 public:
  GroupSource(LibvirtGroupOptions opt, std::vector<std::unique_ptr<LibvirtMember>> members)
      : opt_(std::move(opt)), members_(std::move(members)) {
    for (const auto& m : members_) raw_.push_back(m.get());
  }

  std::vector<std::string> disk_names() const override {
    std::vector<std::string> out;
    for (std::size_t i = 0; i < members_.size(); ++i)
      for (const std::string& d : members_[i]->disk_names())
        out.push_back(group_disk_name(opt_.vm_names[i], d));
    return out;
  }

  Result<Capture> capture(std::uint64_t base_rp, std::uint64_t rp_id,
                          const std::vector<std::string>& receiver_disks) override;

  Status release_views(Capture& capture) override {
    auto st = std::static_pointer_cast<GroupState>(capture.state);
    FERRY_ASSERT(st != nullptr && st->parts.size() == members_.size());
    Status first;
    for (std::size_t i = 0; i < members_.size(); ++i)
      if (Status s = members_[i]->release_views(st->parts[i]); !s.is_ok() && first.is_ok())
        first = s;
    return first;
  }

  Status finish(Capture& capture, bool acknowledged) override {
    auto st = std::static_pointer_cast<GroupState>(capture.state);
    FERRY_ASSERT(st != nullptr && st->parts.size() == members_.size());
    Status first;
    for (std::size_t i = 0; i < members_.size(); ++i)
      if (Status s = members_[i]->finish(st->parts[i], acknowledged); !s.is_ok() && first.is_ok())
        first = s;
    if (acknowledged && first.is_ok()) acked_doc_ = st->doc;
    return first;
  }

 private:
  // The receiver's disks of member i, by the member's own names.
  std::vector<std::string> member_disks(std::size_t i, const std::vector<std::string>& held) const {
    const std::string prefix = opt_.vm_names[i] + ".";
    std::vector<std::string> out;
    for (const std::string& n : held)
      if (n.size() > prefix.size() && n.compare(0, prefix.size(), prefix) == 0)
        out.push_back(n.substr(prefix.size()));
    return out;
  }
  std::string document() const;
  void abandon_all() {
    for (GroupMember* m : raw_) m->abandon_job();
  }

  LibvirtGroupOptions opt_;
  std::vector<std::unique_ptr<LibvirtMember>> members_;
  std::vector<GroupMember*> raw_;
  std::string acked_doc_;
};

// Every VM's definition read by prepare(); empty when one could not be read (the RP goes
// without a definition, as a single VM's does).
std::string GroupSource::document() const {
  GroupDoc doc;
  doc.group = opt_.group;
  for (const std::string& b : opt_.boot_order)  // by domain name: the group's names
    for (std::size_t i = 0; i < opt_.domains.size(); ++i)
      if (opt_.domains[i] == b) doc.boot_order.push_back(opt_.vm_names[i]);
  for (std::size_t i = 0; i < members_.size(); ++i) {
    GroupVm vm;
    vm.name = opt_.vm_names[i];
    vm.domain_xml = members_[i]->prepared_config();
    if (vm.domain_xml.empty()) return "";
    for (const std::string& d : members_[i]->disk_names())
      vm.disks.push_back({group_disk_name(vm.name, d), d});
    doc.vms.push_back(std::move(vm));
  }
  if (Status s = check_group_doc(doc); !s.is_ok()) {
    spdlog::warn("group {}: {}; the RP goes without the VMs' definitions", opt_.group, s.to_string());
    return "";
  }
  return group_doc_text(doc);
}

Result<Capture> GroupSource::capture(std::uint64_t base_rp, std::uint64_t rp_id,
                                     const std::vector<std::string>& receiver_disks) {
  for (std::size_t i = 0; i < members_.size(); ++i) {
    if (Status s = members_[i]->prepare(base_rp, rp_id, member_disks(i, receiver_disks)); !s.is_ok()) {
      abandon_all();
      return s;
    }
  }
  auto st = std::make_shared<GroupState>();
  st->doc = document();
  InstantOptions io;
  io.quiesce = opt_.quiesce;
  io.max_pause = opt_.max_pause;
  // The RP's time is the instant's (the members' prepare ran before it).
  const auto at_ns = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                                    std::chrono::system_clock::now().time_since_epoch())
                                                    .count());
  auto instant = capture_instant(raw_, io);
  if (!instant.is_ok()) {
    abandon_all();
    return instant.status();
  }
  std::string starts;
  for (std::size_t i = 0; i < members_.size(); ++i)
    starts += fmt::format("{}{} {:.1f} ms", i ? ", " : "", opt_.domains[i],
                          instant->start_us[i] / 1000.0);
  spdlog::info("group {} RP {}: {} domains paused for {:.1f} ms for the cross-VM instant{} "
               "(backup begin: {})",
               opt_.group, rp_id, members_.size(), instant->pause_us / 1000.0,
               instant->app_consistent ? " (file systems frozen)" : "", starts);
  for (std::size_t i = 0; i < members_.size(); ++i) {
    auto part = members_[i]->complete();
    if (!part.is_ok()) {
      for (std::size_t j = 0; j < i; ++j) (void)members_[j]->finish(st->parts[j], false);
      for (std::size_t j = i + 1; j < members_.size(); ++j) members_[j]->abandon_job();
      return part.status();
    }
    st->parts.push_back(std::move(*part));
  }
  Capture cap;
  cap.base_rp = base_rp;
  cap.rp_id = rp_id;
  cap.created_unix_ns = at_ns;
  cap.app_consistent = instant->app_consistent;
  cap.vms_paused = true;
  cap.pause_us = instant->pause_us;
  if (st->doc != acked_doc_) cap.vm_config = st->doc;
  for (std::size_t i = 0; i < members_.size(); ++i)
    for (DiskView v : st->parts[i].disks) {
      v.name = group_disk_name(opt_.vm_names[i], v.name);
      cap.disks.push_back(std::move(v));
    }
  cap.state = st;
  return cap;
}

Status check_options(const LibvirtGroupOptions& o) {
  if (o.domains.empty()) return Status::error(Errc::invalid_argument, "no libvirt domain given");
  if (o.group.empty())
    return Status::error(Errc::invalid_argument, "a group of several domains needs a group name");
  if (o.domains.size() > kMaxGroupVms)
    return Status::error(Errc::invalid_argument,
                         fmt::format("{} domains, a group holds at most {}", o.domains.size(),
                                     kMaxGroupVms));
  std::set<std::string> seen;
  for (const std::string& d : o.domains) {
    if (!seen.insert(d).second)
      return Status::error(Errc::invalid_argument, "domain '" + d + "' is listed twice");
    if (!store_name_ok(d + ".x"))
      return Status::error(Errc::invalid_argument,
                           "domain name '" + d + "' cannot name disks of a group ('" + d +
                               ".<target>' must be [A-Za-z0-9._-]); use the domain's name, "
                               "not its UUID, or rename it");
  }
  if (!o.vm_names.empty()) {
    if (o.vm_names.size() != o.domains.size())
      return Status::error(Errc::invalid_argument, "one group name per domain is needed");
    std::set<std::string> names;
    for (const std::string& n : o.vm_names) {
      if (!names.insert(n).second)
        return Status::error(Errc::invalid_argument, "two domains of the group are named '" + n + "'");
      if (!store_name_ok(n + ".x"))
        return Status::error(Errc::invalid_argument,
                             "VM name '" + n + "' cannot name disks of a group ('" + n +
                                 ".<target>' must be [A-Za-z0-9._-])");
    }
  }
  std::set<std::string> boot(o.boot_order.begin(), o.boot_order.end());
  if (!o.boot_order.empty() && (boot != seen || boot.size() != o.boot_order.size()))
    return Status::error(Errc::invalid_argument,
                         "the boot order must name every domain of the group exactly once");
  if (o.max_pause.count() <= 0)
    return Status::error(Errc::invalid_argument, "the longest pause must be positive");
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<ChangeSource>> open_libvirt_group_source(const LibvirtGroupOptions& options) {
  LibvirtSourceOptions lo;
  lo.uri = options.uri;
  lo.freeze_timeout = options.freeze_timeout;
  if (options.domains.size() == 1) {  // today's single-VM source, unchanged
    lo.domain = options.domains.front();
    lo.group = options.group;
    lo.work_dir = options.work_dir;
    lo.quiesce = options.quiesce;
    return open_libvirt_source(lo);
  }
  FERRY_TRY(check_options(options));
  LibvirtGroupOptions opt = options;
  if (opt.boot_order.empty()) opt.boot_order = opt.domains;
  if (opt.vm_names.empty()) opt.vm_names = opt.domains;
  std::vector<std::unique_ptr<LibvirtMember>> members;
  std::set<std::string> disks;
  for (std::size_t i = 0; i < opt.domains.size(); ++i) {
    const std::string& d = opt.domains[i];
    lo.domain = d;
    lo.group = opt.group;
    lo.work_dir = opt.work_dir + "/" + d;
    lo.quiesce = false;  // the group freezes every domain at once
    auto m = open_libvirt_member(lo);
    if (!m.is_ok()) return m.status();
    for (const std::string& t : (*m)->disk_names()) {
      const std::string name = group_disk_name(opt.vm_names[i], t);
      if (!store_name_ok(name))
        return Status::error(Errc::invalid_argument,
                             "disk '" + name + "' of the group is not a valid store name "
                             "([A-Za-z0-9._-], at most 255 characters)");
      if (!disks.insert(name).second)
        return Status::error(Errc::invalid_argument, "two disks of the group are named " + name);
    }
    if (disks.size() > kMaxGroupDisks)
      return Status::error(Errc::invalid_argument,
                           fmt::format("the group's domains have {} disks together (with {}), "
                                       "more than the {} an RP holds", disks.size(), d,
                                       kMaxGroupDisks));
    members.push_back(std::move(*m));
  }
  return std::unique_ptr<ChangeSource>(new GroupSource(std::move(opt), std::move(members)));
}

}  // namespace ferry::cbt
