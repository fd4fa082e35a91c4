// ferry seed (failback.h): an existing disk image becomes a new group's base RP without being
// sent. docs/failover.md, "Failback", step 1.
//
// Crash-safe: the group is built in <store>/.<group>.seeding (images, state, seed.json),
// every file fsynced, then one rename publishes it; a run cut short leaves only that
// temporary directory, which the next run removes.
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "failback.h"
#include "failover_util.h"
#include "ferry/base/fd.h"
#include "ferry/base/kill_point.h"
#include "ferry/site/seed.h"
#include "ferry/transport/rules.h"

namespace ferry::tools {
namespace {

using namespace failover_util;
namespace fs = std::filesystem;
using nlohmann::json;

int fail(const std::string& msg) {
  std::fprintf(stderr, "ferry seed: %s\n", msg.c_str());
  return 1;
}

Status fsync_path(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return Status::from_errno(errno, "open " + path);
  if (::fsync(fd.get()) != 0) return Status::from_errno(errno, "fsync " + path);
  return Status::ok();
}

}  // namespace

Result<ImageInfo> image_info(const std::string& file) {
  std::string out;
  FERRY_ASSIGN_OR_RETURN(int rc, run_command({"qemu-img", "info", "-U", "--output=json", file}, out));
  if (rc != 0) return Status::error(Errc::invalid_argument, "qemu-img info " + file + ": " + out);
  json j = json::parse(out, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("format") || !j.contains("virtual-size"))
    return Status::error(Errc::external, "qemu-img info " + file + ": unexpected output");
  ImageInfo i;
  i.format = j["format"].get<std::string>();
  i.virtual_size = j["virtual-size"].get<std::uint64_t>();
  i.allocated = j.value("actual-size", std::uint64_t{0});
  if (j.contains("backing-filename"))
    return Status::error(Errc::invalid_argument,
                         file + " has a backing file (" + j["backing-filename"].get<std::string>() +
                             "): seed from a standalone image (qemu-img convert it first)");
  if (i.format != "raw" && i.format != "qcow2")
    return Status::error(Errc::invalid_argument,
                         file + " is " + i.format + ": ferry seed takes raw or qcow2 images");
  if (i.format == "qcow2" && j.contains("format-specific") &&
      j["format-specific"].contains("data"))
    for (const auto& b : j["format-specific"]["data"].value("bitmaps", json::array()))
      i.bitmaps.push_back(b.value("name", ""));
  return i;
}

Result<FileStamp> file_stamp(const std::string& file) {
  struct stat sb {};
  if (::stat(file.c_str(), &sb) != 0) return Status::from_errno(errno, "stat " + file);
  FileStamp s;
  s.size = static_cast<std::uint64_t>(sb.st_size);
  s.mtime_ns = static_cast<std::uint64_t>(sb.st_mtim.tv_sec) * 1000000000ull +
               static_cast<std::uint64_t>(sb.st_mtim.tv_nsec);
  s.inode = sb.st_ino;
  s.dev = sb.st_dev;
  return s;
}

json stamp_json(const FileStamp& s) {
  return {{"file_bytes", s.size}, {"mtime_ns", s.mtime_ns}, {"inode", s.inode}, {"dev", s.dev}};
}

int cmd_seed(const SeedArgs& a) try {
  if (!transport::valid_store_name(a.group))
    return fail("bad group name '" + a.group + "': " + std::string(transport::kStoreNameRule));
  if (a.disks.empty()) return fail("give at least one --disk NAME=FILE");
  struct Item {
    std::string name, file;
    ImageInfo info;
    FileStamp stamp;
  };
  std::vector<Item> items;
  std::set<std::string> names;
  for (const auto& d : a.disks) {
    const auto eq = d.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == d.size())
      return fail("--disk '" + d + "': expected NAME=FILE");
    Item it;
    it.name = d.substr(0, eq);
    it.file = fs::absolute(d.substr(eq + 1)).lexically_normal().string();
    if (!transport::valid_store_name(it.name))
      return fail("bad disk name '" + it.name + "': " + std::string(transport::kStoreNameRule));
    if (!names.insert(it.name).second) return fail("disk '" + it.name + "' is given twice");
    if (::access(it.file.c_str(), R_OK) != 0)
      return fail("disk '" + it.name + "': cannot read " + it.file + ": " + std::strerror(errno));
    auto st = file_stamp(it.file);
    if (!st.is_ok()) return fail("disk '" + it.name + "': " + st.status().message());
    it.stamp = *st;
    auto info = image_info(it.file);
    if (!info.is_ok()) return fail("disk '" + it.name + "': " + info.status().message());
    it.info = *info;
    items.push_back(it);
  }
  const std::string store = fs::absolute(a.store).lexically_normal().string();
  if (!fs::is_directory(store)) return fail("store " + store + " is not a directory");
  const std::string group_dir = store + "/" + a.group;
  if (fs::exists(group_dir))
    return fail("group '" + a.group + "' exists in store " + store +
                ": ferry seed makes a new group only (remove the group first to seed it again)");
  const std::string tmp = store + "/." + a.group + ".seeding";
  std::error_code ec;
  fs::remove_all(tmp, ec);  // a run cut short
  std::uint64_t need = 0;
  for (const auto& it : items)
    need += it.info.allocated != 0 ? it.info.allocated : it.info.virtual_size;
  struct statvfs vs {};
  if (::statvfs(store.c_str(), &vs) == 0 &&
      static_cast<std::uint64_t>(vs.f_bavail) * vs.f_frsize < need + (64ull << 20))
    return fail("no space in " + store + ": the images need about " +
                std::to_string((need + (1u << 20) - 1) >> 20) + " MiB plus a 64 MiB margin, " +
                std::to_string(static_cast<std::uint64_t>(vs.f_bavail) * vs.f_frsize >> 20) +
                " MiB are free; nothing was written");
  fs::create_directories(tmp + "/replica", ec);
  if (ec) return fail("create " + tmp + ": " + ec.message());
  auto cleanup = [&] { fs::remove_all(tmp, ec); };
  json disks = json::object();
  std::vector<site::BaseImage> base;
  for (const auto& it : items) {
    const std::string img = tmp + "/replica/" + it.name + ".img";
    std::string out;
    // Sparse: runs of zeros become holes (-S 4k is qemu-img's default for convert).
    auto rc = run_command({"qemu-img", "convert", "-f", it.info.format, "-O", "raw", "-S",
                           "4k", it.file, img},
                          out);
    if (!rc.is_ok() || *rc != 0) {
      cleanup();
      const bool nospace = out.find("No space") != std::string::npos;
      return fail(std::string(nospace ? "no space: " : "") + "copying disk '" + it.name +
                  "' from " + it.file + ": " + (rc.is_ok() ? out : rc.status().message()) +
                  "; nothing was written");
    }
    auto after = file_stamp(it.file);
    if (!after.is_ok() || !(*after == it.stamp)) {
      cleanup();
      return fail("disk '" + it.name + "': " + it.file +
                  " changed while it was copied; shut the VM that uses it off and seed again");
    }
    if (Status s = fsync_path(img); !s.is_ok()) {
      cleanup();
      return fail(s.to_string());
    }
    base.push_back({it.name, it.info.virtual_size});
    disks[it.name] = {{"file", it.file}, {"format", it.info.format},
                      {"size_bytes", it.info.virtual_size}, {"stamp", stamp_json(it.stamp)}};
  }
  const std::uint64_t now = now_unix_ns();
  const json rec = {{"version", 1}, {"rp_id", kSeedRp}, {"created_unix_ns", now}, {"disks", disks}};
  Status s = write_atomic(tmp + "/" + kSeedRecord, rec.dump(2));
  if (s.is_ok()) s = site::write_seed_state(tmp, a.group, kSeedRp, base, now);
  if (s.is_ok()) s = fsync_dir(tmp + "/replica");
  if (s.is_ok()) s = fsync_dir(tmp);
  if (!s.is_ok()) {
    cleanup();
    return fail(s.to_string() + "; nothing was written");
  }
  FERRY_KILL_POINT("seed.before_publish");
  if (::rename(tmp.c_str(), group_dir.c_str()) != 0) {
    const int e = errno;
    cleanup();
    return fail("publish " + group_dir + ": " + std::strerror(e));
  }
  if (Status f = fsync_dir(store); !f.is_ok()) return fail(f.to_string());
  std::printf("seeded group %s in %s: base RP %llu (not sent; no source holds it)\n",
              a.group.c_str(), store.c_str(), (unsigned long long)kSeedRp);
  for (const auto& it : items)
    std::printf("  disk %s: %s (%s, %llu bytes) -> %s/replica/%s.img\n", it.name.c_str(),
                it.file.c_str(), it.info.format.c_str(),
                (unsigned long long)it.info.virtual_size, group_dir.c_str(), it.name.c_str());
  std::printf("the first RP a source sends to it is a resync: only blocks that differ travel\n");
  return 0;
} catch (const std::exception& e) {
  return fail(std::string("unexpected: ") + e.what());
}

}  // namespace ferry::tools
