#include "ferry/site/store_check.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "chain.h"
#include "ferry/site/store.h"

namespace ferry::site {
namespace {

std::uint64_t now_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

// The recovery scan of the group's journal, read-only: what an open would refuse.
Status scan_journal(const std::string& root, const std::string& group, const Chain& chain,
                    std::vector<std::string>& notes) {
  Storage& st = *real_storage();
  const Paths paths(root, group);
  FERRY_ASSIGN_OR_RETURN(auto limit, distrust_limit(st, paths, group_id_of(group)));
  if (limit) notes.push_back("a failed sync left a 'distrust' marker: the receiver cuts the "
                             "journal back at its next open (R18)");
  FERRY_ASSIGN_OR_RETURN(journal::ScanResult scan,
                         journal::scan(st, chain.journal_dir, group_id_of(group),
                                       journal::ScanMode::recover, limit));
  for (const std::string& n : scan.notes) notes.push_back(n);
  if (scan.tail_dirty)
    notes.push_back("the journal has bytes past its last commit (an RP being written, or a "
                    "torn tail the receiver cuts at its next open: R1)");
  const std::uint64_t newest = scan.committed.empty() ? 0 : scan.committed.back().info.rp_id;
  if (newest < chain.newest())
    return Status::error(Errc::corrupt,
                         "the journal's recovery scan ends at RP " + std::to_string(newest) +
                             " but the read-only load sees RP " + std::to_string(chain.newest()));
  return Status::ok();
}

}  // namespace

StoreCheck check_group_store(const std::string& root, const std::string& group) {
  StoreCheck c;
  c.group = group;
  auto rep = explain_points(root, group, now_ns());
  if (!rep.is_ok()) {
    c.problem = rep.status();
    return c;
  }
  c.points = rep->points.size();
  c.policy = rep->policy;
  for (const PrunePoint& p : rep->points) c.store_bytes += p.store_bytes;
  if (rep->points.size() > 1)
    c.mean_rp_bytes = (c.store_bytes - rep->points.front().store_bytes) / (rep->points.size() - 1);
  if (!rep->points.empty())
    for (const RpDiskInfo& d : rep->points.back().info.disks) c.newest_disk_bytes += d.size_bytes;
  ReaderGate gate;
  auto chain = load_chain_gated(*real_storage(), root, group, gate);
  if (!chain.is_ok()) {
    c.problem = chain.status();
    return c;
  }
  c.problem = scan_journal(root, group, *chain, c.notes);
  return c;
}

Result<std::vector<std::string>> store_groups(const std::string& root) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(root, ec)) {
    std::error_code e2;
    if (e.is_directory(e2) && std::filesystem::exists(e.path() / "journal", e2))
      out.push_back(e.path().filename().string());
  }
  if (ec) return Status::from_errno(ec.value(), "list store directory " + root);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace ferry::site
