// Groups whose base RP is images the store did not receive: a seed (`ferry seed`, an existing
// disk adopted as the group's starting point) and the recovery site's reset at failback
// (`ferry failback`: the images brought to the failed-over VM's final state in place, the
// group's RPs replaced by one new base RP). docs/failover.md, "Failback".
//
// Both write only the state file (catalog, docs/journal-format.md) of a group whose journal
// holds no RP above the base: such a store opens like any other (R7 and R20 have nothing to
// compare, R13 checks the images' sizes). Its base disks carry no identity and the base no
// source, so the first source to send is not taken for a second one (C5.source), and every
// disk of its first RP is a resync (the sender finds no change tracking for the base).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::site {

struct BaseImage {
  std::string name;             // the disk's name (a store name)
  std::uint64_t size_bytes = 0; // = the size of <dir>/replica/<name>.img
};

// Writes the state of a new group `group` into `group_dir` (a directory being built, not yet
// published; replica/<name>.img already there): base RP `rp_id` made of `disks`, an empty
// journal. fdatasyncs what it writes; the caller renames the directory into the store.
Status write_seed_state(const std::string& group_dir, const std::string& group,
                        std::uint64_t rp_id, const std::vector<BaseImage>& disks,
                        std::uint64_t created_unix_ns);

// The RP id above every RP group `group` of `root` ever held (its base, every journal RP of
// every journal generation present, pruned ids): the number a reset base takes, so that no
// source's change tracking can name it. Read-only.
Result<std::uint64_t> next_unused_rp(const std::string& root, const std::string& group);

// The recovery site's half of failback, after the replica images were brought to the final
// state in place (qemu-img commit of the failover overlays): under the group lock (Errc::busy
// when held: the caller waits), the state names base RP `rp_id` made of `disks` in a new,
// empty journal generation; the old generations are removed. The base RP keeps the VM
// definition in force at the group's newest RP. Idempotent: a state that names rp_id already
// only has the old generations removed. A crash leaves the old state (every RP as before; the
// images hold the final state, which the caller's record knows) or the new one.
Status reset_to_base(const std::string& root, const std::string& group, std::uint64_t rp_id,
                     const std::vector<BaseImage>& disks, std::uint64_t created_unix_ns);

}  // namespace ferry::site
