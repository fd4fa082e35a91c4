// Failback with only the differences (docs/failover.md, "Failback"):
//   ferry seed --store DIR --group G --disk NAME=FILE ...                      (main site)
//   ferry failback --store DR --group G --to MAIN:PORT [--tls-* ...] [--uri URI]
//                  [--state-dir DIR] [--shutdown-timeout S] [--force]          (recovery site)
//   ferry failback --complete --store MAIN --group G [--domain ORIG ...] [--point N|latest]
//                  [--uri URI] [--state-dir DIR] [--boot-delay S]              (main site)
// Tools-private.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/base/status.h"
#include "tools.h"

namespace CLI {
class App;
}  // namespace CLI

namespace ferry::tools {

// The RP a seed's images are (the group's first); seed.json next to the group's state.
inline constexpr std::uint64_t kSeedRp = 1;
inline constexpr const char* kSeedRecord = "seed.json";

struct SeedArgs {
  std::string store, group;
  std::vector<std::string> disks;  // NAME=FILE
};
int cmd_seed(const SeedArgs& a);

struct FailbackArgs {
  std::string store, group;
  std::string to;  // the main site's receiver
  TlsArgs tls;
  std::string uri = "qemu:///system";
  std::string state_dir;  // `ferry protect --state-dir` of the recovery-site VM
  unsigned shutdown_timeout_s = 120;
  unsigned lock_timeout_s = 60;
  bool force = false;
  // --complete (main site)
  bool complete = false;
  std::vector<std::string> domains;  // the original domains (a group: default its VMs' names)
  std::string point = "latest";
  unsigned boot_delay_s = 0;  // seconds between starting one VM of a group and the next
};
int cmd_failback(const FailbackArgs& a);           // failback.cc
int cmd_failback_complete(const FailbackArgs& a);  // failback_complete.cc

// What qemu-img says of an image (seed.cc).
struct ImageInfo {
  std::string format;  // raw or qcow2 (others refused)
  std::uint64_t virtual_size = 0;
  std::uint64_t allocated = 0;
  std::vector<std::string> bitmaps;  // qcow2 persistent bitmaps
};
Result<ImageInfo> image_info(const std::string& file);
// A file's identity and last change: a seed's disk must still be this at failback.
struct FileStamp {
  std::uint64_t size = 0, mtime_ns = 0, inode = 0, dev = 0;
  bool operator==(const FileStamp&) const = default;
};
Result<FileStamp> file_stamp(const std::string& file);

// The group's role at this site (docs/failover.md, "Roles"): "protecting", "test running",
// "failing over", "failed over", "failing back" (a failback at the recovery site under way, or
// a --complete at the main site not finished), "seeded" (a seeded group whose --complete has
// not run) or "failed back". `detail`: one line saying what to do, or empty.
std::string group_role(const std::string& store, const std::string& group, std::string* detail);
// ferry points: the role line (text, when not plain "protecting"/"failed over", which
// failover.cc prints) and "group_role" on every RP (--json); the seed RP gets "seed": true.
void print_group_role(const std::string& store, const std::string& group);
void annotate_role_json(const std::string& store, const std::string& group,
                        nlohmann::json& points);

// Registers `seed` and `failback`; the returned function runs the one parsed (true, its exit
// code in rc), false when neither was.
std::function<bool(int& rc)> add_failback_commands(CLI::App& app);

}  // namespace ferry::tools
