// The VM's definition in force at an RP, resolved over a group's chain (vm_config.h).
#include "ferry/site/vm_config.h"

#include "chain.h"

namespace ferry::site {
namespace {

// The state file keeps the base RP's begin payload in a piece of at most 256 KiB (catalog.h
// kMaxCatalogBytes): the largest begin payload (journal.cc encode_begin: 30 fixed bytes,
// per disk a name, size and flag, the tail's version, source name and per-disk identity,
// then the definition's length and bytes) must fit it, or a store could not name its base.
constexpr std::size_t kMaxBeginPayloadBytes =
    30 + journal::kMaxDisks * (2 + journal::kMaxNameBytes + 9) + 1 + 2 +
    journal::kMaxNameBytes + journal::kMaxDisks * 18 + 4 + kMaxVmConfigBytes;
static_assert(kMaxBeginPayloadBytes <= (256u << 10));
static_assert(kMaxCatalogBytes >= 72 + 2 * (256u << 10));

// The newest begin record at or below `rp_id` that carries a definition: the RP's own in a
// store written by a receiver that copies it forward, an older RP's otherwise. Only RPs the
// chain still holds (the base and the journal's) can answer.
VmConfigAt resolve(const Chain& chain, std::uint64_t rp_id) {
  VmConfigAt out;
  out.rp_id = rp_id;
  for (auto it = chain.rps.rbegin(); it != chain.rps.rend(); ++it) {
    if (it->info.rp_id > rp_id || it->begin.vm_config.empty()) continue;
    out.from_rp = it->info.rp_id;
    out.xml = it->begin.vm_config;
    return out;
  }
  if (chain.catalog.base_rp != 0 && chain.catalog.base_rp <= rp_id &&
      !chain.catalog.base_begin.vm_config.empty()) {
    out.from_rp = chain.catalog.base_rp;
    out.xml = chain.catalog.base_begin.vm_config;
  }
  return out;
}

Status not_offered(const Chain& chain, const std::string& group, std::uint64_t rp_id) {
  const bool pruned = rp_id < chain.catalog.base_rp || chain.catalog.is_pruned(rp_id) ||
                      (chain.catalog.target_rp != 0 && rp_id < chain.catalog.target_rp) ||
                      (rp_id < chain.newest() && chain.begin_of(rp_id) == nullptr);
  if (pruned)
    return Status::error(Errc::not_found, "RP " + std::to_string(rp_id) + " of group " + group +
                                              " was pruned (see ferry points)");
  return Status::error(Errc::not_found, "RP " + std::to_string(rp_id) + " of group " + group +
                                            " is not committed (newest: " +
                                            std::to_string(chain.newest()) + ")");
}

}  // namespace

Result<VmConfigAt> vm_config_at(const std::string& store_root, const std::string& group,
                                std::uint64_t rp_id) {
  ReaderGate gate;
  FERRY_ASSIGN_OR_RETURN(Chain chain, load_chain_gated(*real_storage(), store_root, group, gate));
  if (rp_id == 0) rp_id = chain.newest();
  if (rp_id == 0)
    return Status::error(Errc::not_found, "group " + group + " has no recovery point yet");
  if (!chain.offered(rp_id)) return not_offered(chain, group, rp_id);
  return resolve(chain, rp_id);
}

Result<std::vector<VmConfigAt>> vm_configs(const std::string& store_root,
                                           const std::string& group) {
  ReaderGate gate;
  FERRY_ASSIGN_OR_RETURN(Chain chain, load_chain_gated(*real_storage(), store_root, group, gate));
  std::vector<VmConfigAt> out;
  for (const RpInfo& p : chain.points()) out.push_back(resolve(chain, p.rp_id));
  return out;
}

}  // namespace ferry::site
