// Test driver for the libvirt source: one RP per run, as the engine would do it, with the
// result as one JSON line on stdout so test/libvirt_source_test.py can check it against the
// guest's own write log.
//
//   libvirt_source_probe DOMAIN WORK_DIR BASE_RP NEW_RP [options]
//     --receiver-disks a,b   disks the receiver holds (default: every disk when BASE_RP > 0)
//     --no-ack               finish(acknowledged=false)
//     --quiesce              freeze file systems through the guest agent
//     --out DIR              write each view's data extents into DIR/<disk>.img (sparse)
//     --uri URI              libvirt URI (default qemu:///system)
//     --hold-file PATH       after capture, create PATH and wait until it is removed
//
// Output: {"ok":true,"app_consistent":..,"disks":[{"name","full_reason","size","granularity",
// "extents":[[offset,length,zero],..]}]} or {"ok":false,"errc":..,"message":..}.
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "ferry/base/fd.h"
#include "ferry/base/log.h"
#include "ferry/cbt/libvirt_source.h"
#include "ferry/cbt/reader.h"

using namespace ferry;
using json = nlohmann::json;

namespace {

constexpr std::uint64_t kRangeBytes = 64ull << 20;  // extents are asked for in 64 MiB ranges
constexpr std::uint32_t kAlignBytes = 4096;
constexpr std::uint32_t kReadBytes = 1u << 20;

int fail(const Status& s) {
  std::printf("%s\n", json{{"ok", false}, {"errc", errc_name(s.code())}, {"message", s.message()},
                           {"data_lost", s.data_lost()}}.dump().c_str());
  return 1;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (start <= s.size() && !s.empty()) {
    std::size_t comma = s.find(',', start);
    out.push_back(s.substr(start, comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

// Reads every data extent of one view into out_path (when given); returns the extents.
Result<json> read_view(const cbt::DiskView& view, const std::string& out_path) {
  FERRY_ASSIGN_OR_RETURN(auto reader, cbt::open_nbd_reader(view));
  UniqueFd out;
  if (!out_path.empty()) {
    out.reset(::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!out.valid()) return Status::from_errno(errno, "open " + out_path);
    if (::ftruncate(out.get(), static_cast<off_t>(reader->size_bytes())) != 0)
      return Status::from_errno(errno, "truncate " + out_path);
  }
  json extents = json::array();
  std::vector<char> buf(kReadBytes);
  for (std::uint64_t off = 0; off < reader->size_bytes(); off += kRangeBytes) {
    FERRY_ASSIGN_OR_RETURN(auto exts, reader->extents(off, kRangeBytes, kAlignBytes));
    for (const cbt::Extent& e : exts) {
      extents.push_back({e.offset_bytes, e.length_bytes, e.zero});
      if (e.zero || !out.valid()) continue;
      for (std::uint64_t pos = e.offset_bytes; pos < e.offset_bytes + e.length_bytes; pos += kReadBytes) {
        auto len = static_cast<std::uint32_t>(std::min<std::uint64_t>(kReadBytes, e.offset_bytes + e.length_bytes - pos));
        Status result = Status::error(Errc::internal, "read never completed");
        bool done = false;
        FERRY_TRY(reader->submit_read(pos, len, buf.data(), [&](Status s) { result = s; done = true; }));
        while (!done) FERRY_TRY(reader->poll(1000).status());
        FERRY_TRY(result);
        if (::pwrite(out.get(), buf.data(), len, static_cast<off_t>(pos)) != static_cast<ssize_t>(len))
          return Status::from_errno(errno, "write " + out_path);
      }
    }
  }
  return extents;
}

}  // namespace

int main(int argc, char** argv) {
  init_logging("libvirt_source_probe");
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s DOMAIN WORK_DIR BASE_RP NEW_RP [options]\n", argv[0]);
    return 2;
  }
  cbt::LibvirtSourceOptions opt;
  opt.domain = argv[1];
  opt.work_dir = argv[2];
  std::uint64_t base = std::stoull(argv[3]), rp = std::stoull(argv[4]);
  bool ack = true, receivers_given = false;
  std::string out_dir, hold_file;
  std::vector<std::string> receiver_disks;
  for (int i = 5; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--no-ack") ack = false;
    else if (a == "--quiesce") opt.quiesce = true;
    else if (a == "--out") out_dir = next();
    else if (a == "--uri") opt.uri = next();
    else if (a == "--hold-file") hold_file = next();
    else if (a == "--receiver-disks") { receiver_disks = split(next()); receivers_given = true; }
    else { std::fprintf(stderr, "unknown option %s\n", a.c_str()); return 2; }
  }
  auto source = cbt::open_libvirt_source(opt);
  if (!source) return fail(source.status());
  if (!receivers_given && base > 0) receiver_disks = (*source)->disk_names();
  auto cap = (*source)->capture(base, rp, receiver_disks);
  if (!cap) return fail(cap.status());
  json disks = json::array();
  for (const cbt::DiskView& v : cap->disks) {
    auto extents = read_view(v, out_dir.empty() ? "" : out_dir + "/" + v.name + ".img");
    if (!extents) {
      (void)(*source)->finish(*cap, false);
      return fail(extents.status());
    }
    disks.push_back({{"name", v.name}, {"full_reason", cbt::full_reason_name(v.full_reason)},
                     {"size", v.size_bytes}, {"granularity", v.granularity_bytes},
                     {"dirty_context", v.dirty_context}, {"extents", *extents}});
  }
  if (!hold_file.empty()) {
    // The test inspects or disturbs the live job here (a second backup, ...).
    UniqueFd f(::open(hold_file.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644));
    while (::access(hold_file.c_str(), F_OK) == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (Status s = (*source)->release_views(*cap); !s) {
    (void)(*source)->finish(*cap, false);
    return fail(s);
  }
  if (Status s = (*source)->finish(*cap, ack); !s) return fail(s);
  std::printf("%s\n", json{{"ok", true}, {"app_consistent", cap->app_consistent}, {"disks", disks}}.dump().c_str());
  return 0;
}
