// Seeded groups and the failback reset (seed.h): a state file whose base RP is images the
// store did not receive, over an empty journal.
#include "ferry/site/seed.h"

#include <sys/file.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>

#include "chain.h"
#include "ferry/base/fd.h"
#include "ferry/base/kill_point.h"
#include "pins.h"

namespace ferry::site {
namespace {

namespace fs = std::filesystem;

Catalog base_catalog(std::uint64_t rp_id, const std::vector<BaseImage>& disks,
                     std::uint64_t created_unix_ns) {
  FERRY_ASSERT(rp_id != 0 && !disks.empty());
  Catalog c;
  c.base_rp = rp_id;
  c.base_begin.rp_id = rp_id;
  c.base_begin.created_unix_ns = created_unix_ns;
  c.base_info.rp_id = rp_id;
  c.base_info.created_unix_ns = created_unix_ns;
  c.base_info.committed_unix_ns = created_unix_ns;
  for (const auto& d : disks) {
    RpBeginInfo::Disk b;
    b.name = d.name;
    b.size_bytes = d.size_bytes;
    b.full = true;  // identity unknown (zero): no source holds it
    c.base_begin.disks.push_back(b);
    RpDiskInfo i;
    i.name = d.name;
    i.size_bytes = d.size_bytes;
    i.full = true;
    c.base_info.disks.push_back(i);
  }
  return c;
}

// tmp + fdatasync + rename + fsync dir, as the store writes its state.
Status write_state(Storage& st, const std::string& group_dir, const std::string& bytes) {
  const std::string tmp = group_dir + "/state.tmp", path = group_dir + "/state";
  {
    FERRY_ASSIGN_OR_RETURN(auto f, st.open(tmp, OpenFlags{.create = true}));
    FERRY_TRY(f->truncate(0));
    FERRY_TRY(f->pwrite(bytes.data(), bytes.size(), 0));
    FERRY_TRY(f->datasync());
  }
  FERRY_TRY(st.rename(tmp, path));
  return st.sync_dir(group_dir);
}

Status check_images(const std::string& group_dir, const std::vector<BaseImage>& disks) {
  if (disks.empty()) return Status::error(Errc::invalid_argument, "a base RP needs a disk");
  for (const auto& d : disks) {
    FERRY_TRY(check_name("disk", d.name));
    const std::string img = group_dir + "/replica/" + d.name + ".img";
    std::error_code ec;
    const auto size = fs::file_size(img, ec);
    if (ec) return Status::error(Errc::not_found, "image " + img + ": " + ec.message());
    if (size != d.size_bytes)
      return Status::error(Errc::invalid_argument,
                           "image " + img + " has " + std::to_string(size) + " bytes, disk " +
                               d.name + " " + std::to_string(d.size_bytes));
  }
  return Status::ok();
}

}  // namespace

Status write_seed_state(const std::string& group_dir, const std::string& group,
                        std::uint64_t rp_id, const std::vector<BaseImage>& disks,
                        std::uint64_t created_unix_ns) {
  FERRY_TRY(check_name("group", group));
  FERRY_ASSERT(rp_id != 0);
  FERRY_TRY(check_images(group_dir, disks));
  auto st = real_storage();
  FERRY_TRY(st->make_dirs(group_dir + "/journal"));
  FERRY_TRY(st->sync_dir(group_dir));
  return write_state(*st, group_dir,
                     encode_catalog(group_id_of(group),
                                    base_catalog(rp_id, disks, created_unix_ns)));
}

Result<std::uint64_t> next_unused_rp(const std::string& root, const std::string& group) {
  auto st = real_storage();
  ReaderGate gate;
  FERRY_ASSIGN_OR_RETURN(Chain chain, load_chain_gated(*st, root, group, gate));
  std::uint64_t top = std::max(chain.catalog.base_rp, chain.newest());
  if (!chain.catalog.pruned.empty()) top = std::max(top, chain.catalog.pruned.back());
  return top + 1;
}

Status reset_to_base(const std::string& root, const std::string& group, std::uint64_t rp_id,
                     const std::vector<BaseImage>& disks, std::uint64_t created_unix_ns) {
  FERRY_TRY(check_name("group", group));
  FERRY_ASSERT(rp_id != 0);
  Paths paths(root, group);
  FERRY_TRY(check_images(paths.group_dir, disks));
  UniqueFd lock(::open(paths.lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!lock.valid()) return Status::from_errno(errno, "open lock file " + paths.lock);
  if (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK)
      return Status::error(Errc::busy, "group " + group + " is open elsewhere (lock " +
                                           paths.lock + " is held)");
    return Status::from_errno(errno, "flock " + paths.lock);
  }
  auto st = real_storage();
  FERRY_ASSIGN_OR_RETURN(ReaderGate gate, ReaderGate::exclusive(paths.group_dir));
  FERRY_ASSIGN_OR_RETURN(Chain chain, load_chain(*st, root, group));
  std::uint64_t gen = chain.catalog.journal_gen;
  if (chain.catalog.base_rp != rp_id || !chain.rps.empty()) {
    if (rp_id <= std::max(chain.catalog.base_rp, chain.newest()))
      return Status::error(Errc::invalid_argument,
                           "group " + group + ": a reset base RP " + std::to_string(rp_id) +
                               " must lie above every RP the group held (newest RP " +
                               std::to_string(chain.newest()) + ")");
    // The definition in force at the newest RP travels into the new base.
    std::string vm_config = chain.catalog.base_begin.vm_config;
    for (auto it = chain.rps.rbegin(); it != chain.rps.rend(); ++it)
      if (!it->begin.vm_config.empty()) {
        vm_config = it->begin.vm_config;
        break;
      }
    Catalog c = base_catalog(rp_id, disks, created_unix_ns);
    c.base_begin.vm_config = vm_config;
    c.keep_last = chain.catalog.keep_last;
    c.keep_hourly = chain.catalog.keep_hourly;
    c.keep_daily = chain.catalog.keep_daily;
    c.keep_weekly = chain.catalog.keep_weekly;
    c.keep_within_s = chain.catalog.keep_within_s;
    gen = chain.catalog.journal_gen + 1;
    c.journal_gen = gen;
    const std::string jdir = paths.journal_dir_for(gen);
    std::error_code ec;
    fs::remove_all(jdir, ec);  // a reset cut short before its state was written
    FERRY_TRY(st->make_dirs(jdir));
    FERRY_TRY(st->sync_dir(paths.group_dir));
    FERRY_KILL_POINT("failback.before_reset_state");
    FERRY_TRY(write_state(*st, paths.group_dir, encode_catalog(group_id_of(group), c)));
    FERRY_KILL_POINT("failback.after_reset_state");
  }
  // The other generations hold only RPs the new base replaced (R23 removes them at open too).
  FERRY_ASSIGN_OR_RETURN(auto gens, journal_generations(*st, paths));
  for (std::uint64_t g : gens) {
    if (g == gen) continue;
    std::error_code ec;
    fs::remove_all(paths.journal_dir_for(g), ec);
    if (ec)
      return Status::error(Errc::io, "remove " + paths.journal_dir_for(g) + ": " + ec.message());
  }
  return st->sync_dir(paths.group_dir);
}

}  // namespace ferry::site
