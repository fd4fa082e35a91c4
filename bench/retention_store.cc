// retention-store: the chosen retention layout (layout 2: replica images hold the oldest kept
// RP, newer RPs are forward deltas in the journal) measured through the store itself
// (GroupStore: real files, the io_uring journal, real fdatasync), docs/benchmarks.md,
// "Retention (issue 11)". Printed figures, no pass/fail.
//
// Two configurations on the same seeded workload, each on a fresh store:
//   prune    keep-last K (default 20): the base moves forward after every RP once K are kept;
//   history  keep-last 100000: nothing is dropped, the images hold RP 1 and the journal grows
//            (closest to the cost of keeping everything).
// Workload: a sparse disk (--disk-gib 4); RP 1 is full, --full-mib (1024) of data in 1 MiB
// regions spread over the disk; then --rps (200) incremental RPs of --rp-mib (32) in distinct
// 64 KiB blocks at random offsets. Payloads are incompressible (a PRNG), stored with
// RecordCodec::none, each record's hash the xxh3-128 of its block, as a receiver stores them.
// After each commit the retention step runs: prune(policy, now, false), the very call
// apply_committed() makes with the store's own policy (site/src/store.cc), called directly so
// its PruneReport (compacted bytes) is known.
//
// Then the receiver's memory with a long history: --small-rps (1000) RPs of --small-blocks
// (16) blocks under keep-last 1000, the store closed, and re-opened (recovery) in a fresh
// process (this binary exec'ed with --reopen): open time and VmHWM, --reopen-repeats times.
//
// What is timed: ingest = begin_rp .. commit_rp returns (the RP durable; payloads are built
// before); commit = the commit_rp call alone; retention = the prune() call. Store size is the
// allocated bytes (st_blocks) of journal/ and replica/, against the bound of
// docs/journal-format.md: image allocated bytes + journal bytes of the RPs above the base +
// one segment + 64 KiB.
//
//   retention-store [--dir DIR] [--disk-gib 4] [--full-mib 1024] [--rps 200] [--rp-mib 32]
//                   [--keep 20] [--history-keep 100000] [--every 50] [--small-rps 1000]
//                   [--small-blocks 16] [--reopen-repeats 3] [--seed 1] [--out FILE]
//                   [--no-history] [--no-small] [--no-tiered] [--tiered-rps 600]
//                   [--tiered-rp-mib 4] [--tiered-hot-mib 64]
//   retention-store --reopen ROOT GROUP     (internal: one timed open, prints one line)
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <numeric>
#include <string>
#include <unordered_set>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/site/store.h"

using namespace ferry;
using namespace ferry::site;

namespace {
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr std::uint32_t kBlockBytes = 64u << 10;   // Ferry's block
constexpr std::uint64_t kRegionBytes = 1u << 20;   // the full RP's layout granularity
constexpr std::uint64_t kBoundSlackBytes = 64u << 10;  // "a few KiB" of the bound, generous
constexpr const char* kGroup = "bench";

[[noreturn]] void die(const std::string& what, const Status& s) {
  std::fprintf(stderr, "retention-store: %s: %s\n", what.c_str(), s.to_string().c_str());
  std::exit(1);
}
[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "retention-store: %s\n", what.c_str());
  std::exit(1);
}
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
std::uint64_t wall_ns() {
  return std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count());
}

std::uint64_t status_kib(const char* key) {
  FILE* f = std::fopen("/proc/self/status", "r");
  char line[256];
  std::uint64_t v = 0;
  const std::size_t n = std::strlen(key);
  while (f && std::fgets(line, sizeof line, f))
    if (std::strncmp(line, key, n) == 0) v = std::strtoull(line + n, nullptr, 10);
  if (f) std::fclose(f);
  return v;
}
void reset_hwm() {  // VmHWM := VmRSS (Linux >= 4.0)
  FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f) std::fputs("5", f), std::fclose(f);
}

// splitmix64: incompressible, reproducible payloads and offsets.
struct Rng {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  void fill(char* p, std::size_t len) {
    for (std::size_t i = 0; i + 8 <= len; i += 8) {
      std::uint64_t v = next();
      std::memcpy(p + i, &v, 8);
    }
  }
};

std::uint64_t allocated_bytes(const fs::path& dir) {
  std::uint64_t total = 0;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
    struct stat st;
    if (::lstat(e.path().c_str(), &st) == 0 && S_ISREG(st.st_mode))
      total += std::uint64_t(st.st_blocks) * 512;
  }
  return total;
}
void drop_cache(const fs::path& dir) {  // the store's own pages; the VM host's cache stays
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
    if (!e.is_regular_file()) continue;
    int fd = ::open(e.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

struct Stats {
  double median = 0, p10 = 0, p90 = 0, min = 0, max = 0;
};
Stats stats(std::vector<double> v) {
  Stats s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  auto at = [&](double q) { return v[std::size_t(q * double(v.size() - 1) + 0.5)]; };
  s.median = at(0.5), s.p10 = at(0.1), s.p90 = at(0.9), s.min = v.front(), s.max = v.back();
  return s;
}

struct Options {
  std::string dir, out;
  std::uint64_t disk_gib = 4, full_mib = 1024, rps = 200, rp_mib = 32;
  std::uint32_t keep = 20, history_keep = 100000;
  std::uint64_t every = 50, small_rps = 1000, small_blocks = 16, reopen_repeats = 3;
  std::uint64_t seed = 1;
  bool history = true, small = true;
  // tiered: RPs every 10 synthetic minutes of --tiered-rp-mib in a hot region of
  // --tiered-hot-mib, keep-last 6 + keep-hourly 24 + keep-daily 7, with and without the
  // journal rewrite.
  std::uint64_t tiered_rps = 600, tiered_rp_mib = 4, tiered_hot_mib = 64;
  bool tiered = true;
};

// One RP's records, built before the timed part (the sender's and the wire's work).
struct RpData {
  std::vector<std::uint64_t> offsets;
  std::vector<Hash128> hashes;
  std::string bytes;  // block i at i * kBlockBytes
};
RpData make_full(const Options& o) {
  RpData d;
  const std::uint64_t disk = o.disk_gib << 30, regions = (o.full_mib << 20) / kRegionBytes;
  const std::uint64_t stride = disk / regions / kRegionBytes * kRegionBytes;
  if (stride < kRegionBytes) die("--full-mib is larger than the disk");
  for (std::uint64_t r = 0; r < regions; ++r)
    for (std::uint64_t b = 0; b < kRegionBytes; b += kBlockBytes) d.offsets.push_back(r * stride + b);
  return d;  // bytes filled in chunks by ingest (1 GiB is not held at once)
}
RpData make_delta(const Options& o, Rng& rng, std::uint64_t blocks,
                  std::uint64_t region_bytes = 0) {
  RpData d;
  const std::uint64_t disk_blocks = (region_bytes != 0 ? region_bytes : o.disk_gib << 30) / kBlockBytes;
  std::unordered_set<std::uint64_t> seen;
  while (d.offsets.size() < blocks) {
    std::uint64_t b = rng.next() % disk_blocks;
    if (seen.insert(b).second) d.offsets.push_back(b * kBlockBytes);
  }
  d.bytes.resize(blocks * kBlockBytes);
  rng.fill(d.bytes.data(), d.bytes.size());
  for (std::uint64_t i = 0; i < blocks; ++i)
    d.hashes.push_back(xxh3_128(d.bytes.data() + i * kBlockBytes, kBlockBytes));
  return d;
}

struct IngestTimes {
  double ingest_s = 0, commit_s = 0;
};
// begin_rp .. commit_rp for records [0, n) of `d`; `fill` (the full RP) generates payload
// chunks outside the timed part.
IngestTimes ingest(GroupStore& st, const Options& o, std::uint64_t rp_id, const RpData& d,
                   Rng* fill, std::uint64_t created_ns = 0) {
  RpBeginInfo rp{rp_id, rp_id - 1, created_ns != 0 ? created_ns : wall_ns(), 0,
                 {RpBeginInfo::Disk{"vda", o.disk_gib << 30, rp_id == 1}}};
  IngestTimes t;
  std::string chunk;
  std::vector<Hash128> chunk_hashes;
  const std::uint64_t chunk_blocks = 256;  // 16 MiB of the full RP at a time
  double untimed = 0;
  const auto t0 = Clock::now();
  if (Status s = st.begin_rp(rp); !s.is_ok()) die("begin_rp " + std::to_string(rp_id), s);
  std::uint64_t logical = 0;
  for (std::uint64_t i = 0; i < d.offsets.size(); ++i) {
    const char* p;
    Hash128 h;
    if (fill) {
      if (i % chunk_blocks == 0) {
        const auto g0 = Clock::now();
        chunk.resize(chunk_blocks * kBlockBytes);
        fill->fill(chunk.data(), chunk.size());
        chunk_hashes.clear();
        for (std::uint64_t k = 0; k < chunk_blocks; ++k)
          chunk_hashes.push_back(xxh3_128(chunk.data() + k * kBlockBytes, kBlockBytes));
        untimed += seconds_since(g0);
      }
      p = chunk.data() + (i % chunk_blocks) * kBlockBytes;
      h = chunk_hashes[i % chunk_blocks];
    } else {
      p = d.bytes.data() + i * kBlockBytes;
      h = d.hashes[i];
    }
    BlockRecord b;
    b.rp_id = rp_id;
    b.seq = i;
    b.codec = RecordCodec::none;
    b.offset_bytes = d.offsets[i];
    b.length_bytes = kBlockBytes;
    b.hash = h;
    b.payload = std::string_view(p, kBlockBytes);
    if (Status s = st.append_block(b); !s.is_ok()) die("append_block", s);
    logical += kBlockBytes;
  }
  const auto c0 = Clock::now();
  auto info = st.commit_rp(rp_id, d.offsets.size(), logical);
  if (!info.is_ok()) die("commit_rp " + std::to_string(rp_id), info.status());
  t.commit_s = seconds_since(c0);
  t.ingest_s = seconds_since(t0) - untimed;
  return t;
}

Result<std::unique_ptr<GroupStore>> open_store(const std::string& root, std::uint32_t keep,
                                               bool create) {
  StoreOptions so;
  so.root = root;
  so.retention.keep_last = keep;
  return GroupStore::open(so, kGroup, create);
}

struct Sample {  // store size after an RP
  std::uint64_t rp = 0, kept = 0, base = 0, images = 0, journal = 0, kept_journal = 0, bound = 0;
};
Sample measure(GroupStore& st, const fs::path& group_dir, std::uint64_t rp,
               std::uint64_t segment_bytes) {
  Sample s;
  s.rp = rp;
  auto pts = st.points();
  s.kept = pts.size();
  std::uint64_t base = pts.empty() ? 0 : pts.front().rp_id;  // the oldest kept is the base
  s.base = base;
  for (const auto& p : pts)
    if (p.rp_id > base)
      for (const auto& d : p.disks) s.kept_journal += d.stored_bytes;
  s.images = allocated_bytes(group_dir / "replica");
  s.journal = allocated_bytes(group_dir / "journal");
  s.bound = s.images + s.kept_journal + segment_bytes + kBoundSlackBytes;
  return s;
}

struct Reopen {
  double open_s = 0;
  std::uint64_t hwm_kib = 0, base_hwm_kib = 0, points = 0;
};
std::string self_exe() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) die("readlink /proc/self/exe");
  return std::string(buf, std::size_t(n));
}
// One open in a fresh process: this binary exec'ed with --reopen (its VmHWM is its own).
Reopen reopen_in_child(const std::string& root) {
  drop_cache(fs::path(root) / kGroup);
  std::string cmd = "'" + self_exe() + "' --reopen '" + root + "' " + kGroup;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) die("popen " + cmd);
  Reopen r;
  char line[512] = {};
  bool got = std::fgets(line, sizeof line, p) != nullptr;
  int rc = ::pclose(p);
  unsigned long long hwm = 0, base = 0, pts = 0;
  if (!got || rc != 0 || std::sscanf(line, "%lf %llu %llu %llu", &r.open_s, &hwm, &base, &pts) != 4)
    die("--reopen child failed (" + std::to_string(rc) + "): " + line);
  r.hwm_kib = hwm, r.base_hwm_kib = base, r.points = pts;
  return r;
}
int reopen_main(const std::string& root, const std::string& group) {
  const std::uint64_t base = status_kib("VmHWM:");
  StoreOptions so;
  so.root = root;
  so.retention.keep_last = kMaxRetentionCount;  // open never prunes; set for clarity
  const auto t0 = Clock::now();
  auto st = GroupStore::open(so, group, false);
  const double secs = seconds_since(t0);
  if (!st.is_ok()) die("reopen", st.status());
  std::printf("%.6f %llu %llu %zu\n", secs, (unsigned long long)status_kib("VmHWM:"),
              (unsigned long long)base, (*st)->points().size());
  return 0;
}

struct ConfigResult {
  std::string name;
  std::uint32_t keep = 0;
  double full_ingest_s = 0, full_retention_s = 0;
  std::uint64_t full_compacted = 0;
  std::vector<double> ingest_s, commit_s, retention_s;
  double compact_s = 0;  // retention calls that compacted
  std::uint64_t compacted_bytes = 0, compact_calls = 0, removed = 0;
  std::vector<Sample> samples;
  std::uint64_t hwm_kib = 0;
  Reopen reopen;
  double wall_s = 0;
};

ConfigResult run_config(const Options& o, const std::string& name, std::uint32_t keep) {
  ConfigResult r;
  r.name = name;
  r.keep = keep;
  const std::string root = o.dir + "/" + name;
  fs::remove_all(root);
  fs::create_directories(root);
  const fs::path group_dir = fs::path(root) / kGroup;
  reset_hwm();
  const auto w0 = Clock::now();
  auto st = open_store(root, keep, true);
  if (!st.is_ok()) die("open " + root, st.status());
  GroupStore& s = **st;
  StoreOptions defaults;
  RetentionPolicy policy;
  policy.keep_last = keep;
  Rng rng{o.seed};
  std::fprintf(stderr, "[%s] keep-last %u: full RP of %llu MiB\n", name.c_str(), keep,
               (unsigned long long)o.full_mib);
  auto retain = [&](double* secs) {
    const auto t0 = Clock::now();
    auto rep = s.prune(policy, wall_ns(), false);
    *secs = seconds_since(t0);
    if (!rep.is_ok()) die("prune", rep.status());
    return *rep;
  };
  {
    RpData full = make_full(o);
    r.full_ingest_s = ingest(s, o, 1, full, &rng).ingest_s;
    r.full_compacted = retain(&r.full_retention_s).compacted_bytes;
  }
  const std::uint64_t blocks = (o.rp_mib << 20) / kBlockBytes;
  for (std::uint64_t i = 1; i <= o.rps; ++i) {
    const std::uint64_t id = i + 1;
    RpData d = make_delta(o, rng, blocks);
    IngestTimes t = ingest(s, o, id, d, nullptr);
    r.ingest_s.push_back(t.ingest_s);
    r.commit_s.push_back(t.commit_s);
    double rs = 0;
    PruneReport rep = retain(&rs);
    r.retention_s.push_back(rs);
    r.removed += rep.removed;
    if (rep.compacted_bytes > 0) r.compact_s += rs, r.compacted_bytes += rep.compacted_bytes, ++r.compact_calls;
    if (i % o.every == 0 || i == o.rps) {
      r.samples.push_back(measure(s, group_dir, i, defaults.segment_bytes));
      const Sample& m = r.samples.back();
      std::fprintf(stderr, "[%s] %llu RPs: store %.2f GiB, bound %.2f GiB\n", name.c_str(),
                   (unsigned long long)i, double(m.images + m.journal) / (1 << 30),
                   double(m.bound) / (1 << 30));
    }
  }
  r.wall_s = seconds_since(w0);
  r.hwm_kib = status_kib("VmHWM:");
  st->reset();
  r.reopen = reopen_in_child(root);
  return r;
}

struct SmallResult {
  std::vector<double> ingest_s, retention_s;
  std::vector<Reopen> reopens;
  std::uint64_t journal = 0, points = 0, hwm_kib = 0;
};
SmallResult run_small(const Options& o) {
  SmallResult r;
  const std::string root = o.dir + "/small";
  fs::remove_all(root);
  fs::create_directories(root);
  const std::uint32_t keep = std::uint32_t(o.small_rps);
  reset_hwm();
  auto st = open_store(root, keep, true);
  if (!st.is_ok()) die("open " + root, st.status());
  RetentionPolicy policy;
  policy.keep_last = keep;
  Rng rng{o.seed + 7};
  std::fprintf(stderr, "[small] %llu RPs of %llu blocks, keep-last %u\n",
               (unsigned long long)o.small_rps, (unsigned long long)o.small_blocks, keep);
  for (std::uint64_t id = 1; id <= o.small_rps; ++id) {
    RpData d = make_delta(o, rng, o.small_blocks);
    // RP 1 is "full" with 16 blocks: the rest of the disk reads as zeros.
    r.ingest_s.push_back(ingest(**st, o, id, d, nullptr).ingest_s);
    const auto t0 = Clock::now();
    auto rep = (*st)->prune(policy, wall_ns(), false);
    if (!rep.is_ok()) die("prune", rep.status());
    r.retention_s.push_back(seconds_since(t0));
  }
  r.points = (*st)->points().size();
  r.hwm_kib = status_kib("VmHWM:");
  st->reset();
  r.journal = allocated_bytes(fs::path(root) / kGroup / "journal");
  for (std::uint64_t i = 0; i < o.reopen_repeats; ++i) r.reopens.push_back(reopen_in_child(root));
  return r;
}

// --- the table ------------------------------------------------------------------------------
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}
double mb(std::uint64_t bytes) { return double(bytes) / 1e6; }
double gib(std::uint64_t bytes) { return double(bytes) / double(1ull << 30); }

std::string table(const Options& o, const std::vector<ConfigResult>& cs, const SmallResult* sm,
                  const std::string& fs_line, double load0, double load1) {
  std::string t;
  const double rp_mb = mb(o.rp_mib << 20);
  t += fmt("retention-store: %llu GiB sparse disk, full RP 1 of %llu MiB, then %llu RPs of %llu MiB "
           "(%llu distinct random 64 KiB blocks, incompressible, codec none), seed %llu\n",
           (unsigned long long)o.disk_gib, (unsigned long long)o.full_mib, (unsigned long long)o.rps,
           (unsigned long long)o.rp_mib, (unsigned long long)((o.rp_mib << 20) / kBlockBytes),
           (unsigned long long)o.seed);
  t += fmt("store: %s; load average %.2f at the start, %.2f at the end\n", fs_line.c_str(), load0, load1);
  t += "cells: median (p10-p90) over the RPs of the run\n\n";
  auto row = [&](const std::string& label, auto cell) {
    t += fmt("%-44s", label.c_str());
    for (const auto& c : cs) t += fmt("| %-28s", cell(c).c_str());
    t += "\n";
  };
  row("figure", [](const ConfigResult& c) {
    return c.name + " (keep-last " + std::to_string(c.keep) + ")";
  });
  row("full RP 1: ingest s (MB/s)", [&](const ConfigResult& c) {
    return fmt("%.2f (%.0f)", c.full_ingest_s, mb(o.full_mib << 20) / c.full_ingest_s);
  });
  row("full RP 1: retention s (compacted MB)", [&](const ConfigResult& c) {
    return fmt("%.2f (%.0f)", c.full_retention_s, mb(c.full_compacted));
  });
  row("ingest to durable per RP, s", [](const ConfigResult& c) {
    Stats s = stats(c.ingest_s);
    return fmt("%.3f (%.3f-%.3f)", s.median, s.p10, s.p90);
  });
  row("  MB/s of changed data", [&](const ConfigResult& c) {
    Stats s = stats(c.ingest_s);
    return fmt("%.0f (%.0f-%.0f)", rp_mb / s.median, rp_mb / s.p90, rp_mb / s.p10);
  });
  row("  of which commit_rp call, ms", [](const ConfigResult& c) {
    Stats s = stats(c.commit_s);
    return fmt("%.1f (%.1f-%.1f)", s.median * 1e3, s.p10 * 1e3, s.p90 * 1e3);
  });
  row("retention (apply_committed) per RP, ms", [](const ConfigResult& c) {
    Stats s = stats(c.retention_s);
    return fmt("%.1f (p90 %.1f)", s.median * 1e3, s.p90 * 1e3);
  });
  row("  calls that compacted / RPs removed", [](const ConfigResult& c) {
    return fmt("%llu / %llu", (unsigned long long)c.compact_calls, (unsigned long long)c.removed);
  });
  row("  compaction MB/s (bytes / their time)", [](const ConfigResult& c) {
    return c.compact_calls ? fmt("%.0f (%.0f MB in %.1f s)", mb(c.compacted_bytes) / c.compact_s,
                                 mb(c.compacted_bytes), c.compact_s)
                           : std::string("n/a (none)");
  });
  row("sustained per RP (ingest+retention), MB/s", [&](const ConfigResult& c) {
    std::vector<double> v;
    for (std::size_t i = 0; i < c.ingest_s.size(); ++i) v.push_back(c.ingest_s[i] + c.retention_s[i]);
    Stats s = stats(v);
    return fmt("%.0f (%.0f-%.0f)", rp_mb / s.median, rp_mb / s.p90, rp_mb / s.p10);
  });
  row("peak RSS (VmHWM), MiB", [](const ConfigResult& c) {
    return fmt("%.0f", double(c.hwm_kib) / 1024);
  });
  row("re-open in a fresh process: s / VmHWM MiB", [](const ConfigResult& c) {
    return fmt("%.3f / %.0f", c.reopen.open_s, double(c.reopen.hwm_kib) / 1024);
  });
  row("wall of the configuration, s", [](const ConfigResult& c) { return fmt("%.0f", c.wall_s); });
  t += "\nstore size (du of journal/ + replica/) against the bound (images allocated + journal\n"
       "bytes of the RPs above the base + one 64 MiB segment + 64 KiB), GiB:\n\n";
  t += fmt("%-10s %-8s %5s %6s %8s %8s %8s %8s %8s %7s\n", "config", "after RP", "kept", "base",
           "images", "journal", "store", "kept jn", "bound", "ratio");
  for (const auto& c : cs)
    for (const auto& s : c.samples)
      t += fmt("%-10s %-8llu %5llu %6llu %8.2f %8.2f %8.2f %8.2f %8.2f %7.2f\n", c.name.c_str(),
               (unsigned long long)s.rp, (unsigned long long)s.kept, (unsigned long long)s.base,
               gib(s.images), gib(s.journal), gib(s.images + s.journal), gib(s.kept_journal),
               gib(s.bound), double(s.images + s.journal) / double(s.bound));
  if (cs.size() == 2 && !cs[0].samples.empty() && !cs[1].samples.empty()) {
    const Sample &a = cs[0].samples.back(), &b = cs[1].samples.back();
    auto med_sum = [](const ConfigResult& c) {
      return stats(c.ingest_s).median + stats(c.retention_s).median;
    };
    t += fmt("\n%s / %s: store x%.2f, sustained time per RP x%.2f, ingest x%.2f, retention x%.2f\n",
             cs[0].name.c_str(), cs[1].name.c_str(),
             double(a.images + a.journal) / double(b.images + b.journal),
             med_sum(cs[0]) / med_sum(cs[1]), stats(cs[0].ingest_s).median / stats(cs[1].ingest_s).median,
             stats(cs[0].retention_s).median / stats(cs[1].retention_s).median);
  }
  if (sm) {
    Stats in = stats(sm->ingest_s), re = stats(sm->retention_s);
    std::vector<double> os, hw;
    for (const auto& r : sm->reopens) os.push_back(r.open_s), hw.push_back(double(r.hwm_kib) / 1024);
    Stats so = stats(os), sh = stats(hw);
    t += fmt("\nreceiver memory with history: %llu RPs of %llu x 64 KiB, keep-last %llu, %llu kept, "
             "journal %.1f MiB\n",
             (unsigned long long)o.small_rps, (unsigned long long)o.small_blocks,
             (unsigned long long)o.small_rps, (unsigned long long)sm->points, mb(sm->journal) * 1e6 / (1 << 20));
    t += fmt("  ingest per RP %.1f ms (%.1f-%.1f), retention per RP %.2f ms (p90 %.2f); writer VmHWM %.0f MiB\n",
             in.median * 1e3, in.p10 * 1e3, in.p90 * 1e3, re.median * 1e3, re.p90 * 1e3,
             double(sm->hwm_kib) / 1024);
    t += fmt("  re-open (recovery) in a fresh process, %zu runs, store pages dropped: %.3f s "
             "(%.3f-%.3f), VmHWM %.1f MiB (%.1f-%.1f; the binary alone %.1f MiB)\n",
             sm->reopens.size(), so.median, so.min, so.max, sh.median, sh.min, sh.max,
             sm->reopens.empty() ? 0.0 : double(sm->reopens[0].base_hwm_kib) / 1024);
  }
  return t;
}

struct TieredResult {
  std::string name;
  std::uint64_t rewrites = 0, rewritten_bytes = 0, removed = 0;
  double rewrite_s = 0;
  std::vector<double> retention_s;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> journal;  // (RP, journal bytes)
  std::uint64_t kept = 0, max_journal = 0;
};
TieredResult run_tiered(const Options& o, bool rewrite) {
  TieredResult r;
  r.name = rewrite ? "tiered" : "no-rewrite";
  const std::string root = o.dir + "/" + r.name;
  fs::remove_all(root);
  fs::create_directories(root);
  std::uint64_t now = 1767225600ull * 1'000'000'000ull;  // 2026-01-01 00:00 UTC
  StoreOptions so;
  so.root = root;
  so.retention.keep_last = 6;
  so.retention.keep_hourly = 24;
  so.retention.keep_daily = 7;
  so.clock = [&now] { return now; };
  if (!rewrite) so.rewrite_min_garbage_bytes = UINT64_MAX;
  auto st = GroupStore::open(so, kGroup, true);
  if (!st.is_ok()) die("open " + root, st.status());
  Rng rng{o.seed + 11};
  const std::uint64_t blocks = (o.tiered_rp_mib << 20) / kBlockBytes;
  std::fprintf(stderr, "[%s] %llu RPs of %llu MiB every 10 min in a %llu MiB region, %s\n",
               r.name.c_str(), (unsigned long long)o.tiered_rps,
               (unsigned long long)o.tiered_rp_mib, (unsigned long long)o.tiered_hot_mib,
               so.retention.describe().c_str());
  for (std::uint64_t id = 1; id <= o.tiered_rps; ++id) {
    now += 600ull * 1'000'000'000ull;
    RpData d = make_delta(o, rng, blocks, o.tiered_hot_mib << 20);
    ingest(**st, o, id, d, nullptr, now);
    const auto t0 = Clock::now();
    auto rep = (*st)->prune(so.retention, now, false);
    const double secs = seconds_since(t0);
    if (!rep.is_ok()) die("prune", rep.status());
    r.retention_s.push_back(secs);
    r.removed += rep->removed;
    if (rep->rewritten_bytes != 0) {
      ++r.rewrites;
      r.rewritten_bytes += rep->rewritten_bytes;
      r.rewrite_s += secs;
    }
    std::uint64_t journal = 0;
    for (const auto& e : fs::directory_iterator(fs::path(root) / kGroup))
      if (e.path().filename().string().rfind("journal", 0) == 0) journal += allocated_bytes(e.path());
    r.max_journal = std::max(r.max_journal, journal);
    if (id % 100 == 0 || id == o.tiered_rps) {
      r.journal.push_back({id, journal});
      std::fprintf(stderr, "[%s] %llu RPs: journal %.2f GiB, %zu kept\n", r.name.c_str(),
                   (unsigned long long)id, gib(journal), (*st)->points().size());
    }
  }
  r.kept = (*st)->points().size();
  return r;
}

std::string tiered_table(const Options& o, const TieredResult& a, const TieredResult& b) {
  std::string t = fmt("\ntiered retention: %llu RPs of %llu MiB (distinct random 64 KiB blocks in a "
                      "%llu MiB region) every 10 synthetic minutes, keep-last 6, keep-hourly 24, "
                      "keep-daily 7; journal allocated bytes (all generations):\n\n",
                      (unsigned long long)o.tiered_rps, (unsigned long long)o.tiered_rp_mib,
                      (unsigned long long)o.tiered_hot_mib);
  t += fmt("%-10s %14s %14s %7s\n", "after RP", a.name.c_str(), b.name.c_str(), "ratio");
  for (std::size_t i = 0; i < a.journal.size() && i < b.journal.size(); ++i)
    t += fmt("%-10llu %12.2f G %12.2f G %7.2f\n", (unsigned long long)a.journal[i].first,
             gib(a.journal[i].second), gib(b.journal[i].second),
             double(a.journal[i].second) / double(b.journal[i].second));
  Stats ra = stats(a.retention_s), rb = stats(b.retention_s);
  t += fmt("kept RPs at the end: %llu / %llu; peak journal %.2f / %.2f GiB\n",
           (unsigned long long)a.kept, (unsigned long long)b.kept, gib(a.max_journal),
           gib(b.max_journal));
  t += fmt("rewrites: %llu, %.0f MB written in %.1f s (%.0f MB/s); retention per RP %.1f ms "
           "(p90 %.1f, max %.0f) vs %.1f ms without\n",
           (unsigned long long)a.rewrites, mb(a.rewritten_bytes), a.rewrite_s,
           a.rewrite_s > 0 ? mb(a.rewritten_bytes) / a.rewrite_s : 0.0, ra.median * 1e3,
           ra.p90 * 1e3, ra.max * 1e3, rb.median * 1e3);
  return t;
}

std::string fs_of(const std::string& dir) {
  std::string cmd = "findmnt -n -o SOURCE,FSTYPE,OPTIONS -T '" + dir + "' 2>/dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  char buf[512] = {};
  if (p) {
    if (!std::fgets(buf, sizeof buf, p)) buf[0] = 0;
    ::pclose(p);
  }
  std::string s(buf);
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s.empty() ? "?" : s;
}
double load1() {
  double l[3] = {};
  return ::getloadavg(l, 3) > 0 ? l[0] : -1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--reopen") return reopen_main(argv[2], argv[3]);
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    auto num = [&]() { return std::strtoull(next().c_str(), nullptr, 10); };
    if (a == "--dir") o.dir = next();
    else if (a == "--out") o.out = next();
    else if (a == "--disk-gib") o.disk_gib = num();
    else if (a == "--full-mib") o.full_mib = num();
    else if (a == "--rps") o.rps = num();
    else if (a == "--rp-mib") o.rp_mib = num();
    else if (a == "--keep") o.keep = std::uint32_t(num());
    else if (a == "--history-keep") o.history_keep = std::uint32_t(num());
    else if (a == "--every") o.every = num();
    else if (a == "--small-rps") o.small_rps = num();
    else if (a == "--small-blocks") o.small_blocks = num();
    else if (a == "--reopen-repeats") o.reopen_repeats = num();
    else if (a == "--seed") o.seed = num();
    else if (a == "--no-history") o.history = false;
    else if (a == "--no-small") o.small = false;
    else if (a == "--no-tiered") o.tiered = false;
    else if (a == "--tiered-rps") o.tiered_rps = num();
    else if (a == "--tiered-rp-mib") o.tiered_rp_mib = num();
    else if (a == "--tiered-hot-mib") o.tiered_hot_mib = num();
    else die("unknown option " + a + " (see the comment at the top of bench/retention_store.cc)");
  }
  if (o.rps == 0 || o.every == 0 || o.keep == 0 || o.history_keep == 0 || o.small_rps == 0 ||
      o.small_blocks == 0 || o.rp_mib == 0 || o.full_mib == 0 || o.small_rps > kMaxRetentionCount)
    die("counts must be at least 1 (and --small-rps at most 1000000)");
  bool own_dir = o.dir.empty();
  if (own_dir) {
    char tmpl[] = "/var/tmp/ferry-retention-store-XXXXXX";
    if (!::mkdtemp(tmpl)) die("mkdtemp in /var/tmp");
    o.dir = tmpl;
  }
  fs::create_directories(o.dir);
  const double l0 = load1();
  std::vector<ConfigResult> cs;
  cs.push_back(run_config(o, "prune", o.keep));
  fs::remove_all(o.dir + "/prune");  // the history run gets the disk to itself
  if (o.history) {
    cs.push_back(run_config(o, "history", o.history_keep));
    fs::remove_all(o.dir + "/history");
  }
  SmallResult sm;
  if (o.small) {
    sm = run_small(o);
    fs::remove_all(o.dir + "/small");
  }
  std::string t = table(o, cs, o.small ? &sm : nullptr, fs_of(o.dir), l0, load1());
  if (o.tiered) {
    TieredResult a = run_tiered(o, true);
    fs::remove_all(o.dir + "/tiered");
    TieredResult b = run_tiered(o, false);
    fs::remove_all(o.dir + "/no-rewrite");
    t += tiered_table(o, a, b);
  }
  if (own_dir) fs::remove_all(o.dir);
  std::fputs(t.c_str(), stdout);
  if (!o.out.empty()) {
    FILE* f = std::fopen(o.out.c_str(), "w");
    if (!f || std::fputs(t.c_str(), f) < 0 || std::fclose(f) != 0) die("write " + o.out);
  }
  return 0;
}
