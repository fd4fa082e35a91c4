// `ferry points`: the offered RPs of a group and what retention says of each, read-only.
#include "chain.h"
#include "pins.h"

namespace ferry::site {

namespace {

RetentionPolicy policy_of(const Catalog& c) {
  RetentionPolicy p;
  auto count = [](std::uint64_t v) {
    return v == 0 ? std::optional<std::uint32_t>() : std::optional<std::uint32_t>(std::uint32_t(v));
  };
  p.keep_last = count(c.keep_last);
  p.keep_hourly = count(c.keep_hourly);
  p.keep_daily = count(c.keep_daily);
  p.keep_weekly = count(c.keep_weekly);
  if (c.keep_within_s != 0) p.keep_within = std::chrono::seconds(c.keep_within_s);
  return p;
}

}  // namespace

Result<PruneReport> explain_points(const std::string& root, const std::string& group,
                                   std::uint64_t now_unix_ns) {
  ReaderGate gate;
  FERRY_ASSIGN_OR_RETURN(Chain chain, load_chain_gated(*real_storage(), root, group, gate));
  FERRY_ASSIGN_OR_RETURN(auto pins,
                         live_pins(Paths(root, group).group_dir, /*remove_stale=*/false));
  PruneReport rep;
  rep.dry_run = true;
  rep.policy = effective_retention(policy_of(chain.catalog));
  rep.base_before = rep.base_after = chain.catalog.base_rp;
  std::vector<RetentionPoint> pts;
  std::vector<RpInfo> infos = chain.points();
  for (const auto& info : infos) {
    bool pinned = false;
    for (const auto& p : pins) pinned = pinned || p.rp_id == info.rp_id;
    pts.push_back(RetentionPoint{info.rp_id, info.created_unix_ns, pinned});
  }
  auto verdicts = decide_retention(rep.policy, pts, now_unix_ns);
  for (std::size_t i = 0; i < verdicts.size(); ++i) {
    PrunePoint p;
    p.info = infos[i];  // both ascending by RP id
    p.keep = verdicts[i].keep;
    p.rule = verdicts[i].rule;
    p.pinned = pts[i].pinned;
    if (p.info.rp_id != chain.catalog.base_rp)
      for (const auto& d : p.info.disks) p.store_bytes += d.stored_bytes;
    rep.points.push_back(std::move(p));
  }
  return rep;
}

}  // namespace ferry::site
