// Retention's verdict on a group's RPs: what `ferry points` shows and pruning acts on.
#include "chain.h"
#include "pins.h"

namespace ferry::site {

PruneReport judge_points(const Chain& chain, const std::vector<LivePin>& pins,
                         const RetentionPolicy& effective, std::uint64_t now_unix_ns) {
  PruneReport rep;
  rep.policy = effective;
  rep.base_before = rep.base_after = chain.catalog.base_rp;
  std::vector<RpInfo> infos = chain.points();
  std::vector<RetentionPoint> pts;
  for (const auto& info : infos) {
    bool pinned = false;
    for (const auto& p : pins) pinned = pinned || p.rp_id == info.rp_id;
    pts.push_back(RetentionPoint{info.rp_id, info.created_unix_ns, pinned});
  }
  const auto verdicts = decide_retention(effective, pts, now_unix_ns);
  for (std::size_t i = 0; i < verdicts.size(); ++i) {  // both ascending by RP id
    FERRY_ASSERT(verdicts[i].rp_id == infos[i].rp_id);
    PrunePoint p;
    p.info = std::move(infos[i]);
    p.keep = verdicts[i].keep;
    p.rule = verdicts[i].rule;
    p.pinned = pts[i].pinned;
    if (p.info.rp_id != chain.catalog.base_rp)  // the base's blocks are in the images
      for (const auto& d : p.info.disks) p.store_bytes += d.stored_bytes;
    if (!p.keep) {
      rep.removed += 1;
      rep.removed_bytes += p.store_bytes;
    }
    rep.points.push_back(std::move(p));
  }
  return rep;
}

Result<PruneReport> explain_points(const std::string& root, const std::string& group,
                                   std::uint64_t now_unix_ns) {
  ReaderGate gate;
  FERRY_ASSIGN_OR_RETURN(Chain chain, load_chain_gated(*real_storage(), root, group, gate));
  FERRY_ASSIGN_OR_RETURN(auto pins,
                         live_pins(Paths(root, group).group_dir, /*remove_stale=*/false));
  PruneReport rep =
      judge_points(chain, pins, effective_retention(catalog_policy(chain.catalog)), now_unix_ns);
  rep.dry_run = true;
  return rep;
}

}  // namespace ferry::site
