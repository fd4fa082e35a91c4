// Helpers shared by the store tests: a temp dir, a deterministic RP workload and the model of
// what each disk must hold at each committed RP (the oracle).
#pragma once

#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "ferry/base/bytes.h"
#include "ferry/base/hash.h"
#include "ferry/site/store.h"

namespace ferry::site {
std::uint64_t group_id_of(const std::string& group);  // site/src/chain.h
}

namespace ferry::site::test {

class TempDir {
 public:
  explicit TempDir(const char* base = "/tmp") {
    std::string tmpl = std::string(base) + "/ferry-store-XXXXXX";
    char* p = ::mkdtemp(tmpl.data());
    if (p == nullptr) std::abort();
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void spit(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

// One block as the test feeds it; the payload is built from a seed.
struct TestBlock {
  std::uint16_t disk = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  RecordKind kind = RecordKind::data;
  RecordCodec codec = RecordCodec::none;
  std::uint64_t seed = 0;
};

struct TestRp {
  RpBeginInfo begin;
  std::vector<TestBlock> blocks;
};

// Compressible but not trivial contents: runs of a seeded byte pattern.
inline std::string block_bytes(std::uint64_t seed, std::uint32_t length) {
  std::string s(length, '\0');
  std::mt19937_64 rng(seed);
  for (std::size_t i = 0; i < s.size(); i += 8) {
    std::uint64_t v = (i % 64 == 0 || (rng() & 3) == 0) ? rng() : (seed * 0x9e3779b97f4a7c15ull);
    for (std::size_t j = 0; j < 8 && i + j < s.size(); ++j) s[i + j] = static_cast<char>(v >> (8 * j));
  }
  return s;
}

inline std::string zstd_encode(const std::string& raw) {
  std::string out(ZSTD_compressBound(raw.size()), '\0');
  std::size_t n = ZSTD_compress(out.data(), out.size(), raw.data(), raw.size(), 1);
  if (ZSTD_isError(n)) std::abort();
  out.resize(n);
  return out;
}

// Disk name -> image, per committed RP.
using Images = std::map<std::string, std::string>;

class Model {
 public:
  // Applies an RP to the model and records the result under its id.
  void apply(const TestRp& rp) {
    Images next = at_.empty() ? Images{} : at_.rbegin()->second;
    Images cur;
    for (const auto& d : rp.begin.disks) {
      std::string img = d.full ? std::string() : next[d.name];
      img.resize(d.size_bytes, '\0');
      cur[d.name] = std::move(img);
    }
    for (const auto& b : rp.blocks) {
      std::string& img = cur[rp.begin.disks[b.disk].name];
      if (b.kind == RecordKind::zero)
        std::fill(img.begin() + b.offset, img.begin() + b.offset + b.length, '\0');
      else
        img.replace(b.offset, b.length, block_bytes(b.seed, b.length));
    }
    for (auto& [name, img] : cur) next[name] = std::move(img);
    // Only the RP's disks exist at the RP (the others keep their images on the replica).
    Images at;
    for (const auto& d : rp.begin.disks) at[d.name] = next[d.name];
    at_[rp.begin.rp_id] = std::move(at);
    all_ = std::move(next);
  }
  const Images& at(std::uint64_t rp) const { return at_.at(rp); }
  bool has(std::uint64_t rp) const { return at_.count(rp) != 0; }

 private:
  std::map<std::uint64_t, Images> at_;
  Images all_;
};

// Appends the RP's blocks and commits it. Any error is returned as is.
inline Result<RpInfo> feed_rp(GroupStore& store, const TestRp& rp) {
  FERRY_TRY(store.begin_rp(rp.begin));
  std::uint64_t seq = 0, bytes = 0;
  for (const auto& b : rp.blocks) {
    std::string raw = b.kind == RecordKind::data ? block_bytes(b.seed, b.length) : std::string();
    std::string payload = b.codec == RecordCodec::zstd ? zstd_encode(raw) : raw;
    BlockRecord r;
    r.rp_id = rp.begin.rp_id;
    r.seq = seq++;
    r.disk_index = b.disk;
    r.kind = b.kind;
    r.codec = b.codec;
    r.offset_bytes = b.offset;
    r.length_bytes = b.length;
    r.hash = b.kind == RecordKind::data ? xxh3_128(raw.data(), raw.size()) : Hash128{};
    r.payload = payload;
    FERRY_TRY(store.append_block(r));
    bytes += b.length;
  }
  return store.commit_rp(rp.begin.rp_id, seq, bytes);
}

inline RpBeginInfo::Disk disk(const std::string& name, std::uint64_t size, bool full) {
  return RpBeginInfo::Disk{name, size, full};
}

// A small deterministic 3-RP run over two disks: a full RP, an incremental one with
// overwrites and zeros, and one where disk a grows and disk b shrinks. Used by the crash,
// power-cut and I/O-error tests.
inline std::vector<TestRp> small_run() {
  std::vector<TestRp> rps(3);
  rps[0].begin = {1, 0, 1000, 0, {disk("a", 40000, true), disk("b", 16384, true)}};
  rps[0].blocks = {{0, 0, 8192, RecordKind::data, RecordCodec::zstd, 11},
                   {0, 8192, 8192, RecordKind::data, RecordCodec::none, 12},
                   {0, 32768, 7232, RecordKind::data, RecordCodec::zstd, 13},
                   {1, 0, 16384, RecordKind::data, RecordCodec::none, 14}};
  rps[1].begin = {2, 1, 2000, 0, {disk("a", 40000, false), disk("b", 16384, false)}};
  rps[1].blocks = {{0, 4096, 8192, RecordKind::data, RecordCodec::zstd, 21},
                   {0, 32768, 7232, RecordKind::zero, RecordCodec::none, 0},
                   {1, 8192, 4096, RecordKind::data, RecordCodec::none, 22}};
  rps[2].begin = {3, 2, 3000, 0, {disk("a", 45000, false), disk("b", 8192, false)}};
  rps[2].blocks = {{0, 40000, 5000, RecordKind::data, RecordCodec::none, 31},
                   {1, 0, 4096, RecordKind::zero, RecordCodec::none, 0},
                   {0, 0, 4096, RecordKind::data, RecordCodec::zstd, 32}};
  return rps;
}

// The small run and three more RPs, for retention: overwrites and a zero record (RP 4),
// disk b dropped and a full disk c added (RP 5), a full RP of a smaller disk a (RP 6). With
// keep-last 2 every apply prunes and compacts; the base image set changes twice.
inline std::vector<TestRp> pruning_run() {
  std::vector<TestRp> rps = small_run();
  rps.resize(6);
  rps[3].begin = {4, 3, 4000, 0, {disk("a", 45000, false), disk("b", 8192, false)}};
  rps[3].blocks = {{0, 4096, 4096, RecordKind::zero, RecordCodec::none, 0},
                   {0, 20000, 6000, RecordKind::data, RecordCodec::zstd, 41},
                   {1, 4096, 4096, RecordKind::data, RecordCodec::none, 42}};
  rps[4].begin = {5, 4, 5000, 0, {disk("a", 45000, false), disk("c", 12288, true)}};
  rps[4].blocks = {{0, 36864, 8136, RecordKind::data, RecordCodec::none, 51},
                   {1, 0, 12288, RecordKind::data, RecordCodec::zstd, 52}};
  rps[5].begin = {6, 5, 6000, 0, {disk("a", 32768, true), disk("c", 12288, false)}};
  rps[5].blocks = {{0, 0, 16384, RecordKind::data, RecordCodec::zstd, 61},
                   {1, 4096, 4096, RecordKind::zero, RecordCodec::none, 0}};
  return rps;
}

inline Model model_of(const std::vector<TestRp>& rps) {
  Model m;
  for (const auto& rp : rps) m.apply(rp);
  return m;
}

// Compares every disk of RP `rp` through restore and, when check_replica, on the replica
// images too. Layout 2: the images hold the base RP (last_applied_rp(), the oldest kept RP),
// so asking for the images of any other RP is itself a failure. Returns "" or what differs.
inline std::string check_rp(GroupStore& store, const Model& model, std::uint64_t rp,
                            const std::string& root, const std::string& scratch,
                            bool check_replica) {
  if (check_replica && store.last_applied_rp() != rp)
    return "replica images hold RP " + std::to_string(store.last_applied_rp()) + ", not RP " +
           std::to_string(rp);
  for (const auto& [name, img] : model.at(rp)) {
    if (check_replica) {
      std::string got = slurp(root + "/" + store.group() + "/replica/" + name + ".img");
      if (got != img) return "replica " + name + " differs from RP " + std::to_string(rp);
    }
    std::string out = scratch + "/restore-" + name + "-" + std::to_string(rp);
    Status s = store.restore(rp, name, out);
    if (!s.is_ok()) return "restore RP " + std::to_string(rp) + " " + name + ": " + s.to_string();
    if (slurp(out) != img) return "restore of " + name + " at RP " + std::to_string(rp) + " differs";
    ::unlink(out.c_str());
  }
  return "";
}

// Layout 2's truth: the images equal the model at last_applied_rp() (when not 0 and no
// compaction is pending), and every
// offered RP restores byte-identical to the model. `expect_offered` (when not empty) is the
// exact list of RP ids points() must offer. Returns "" or what differs.
inline std::string check_store(GroupStore& store, const Model& model, const std::string& root,
                               const std::string& scratch,
                               const std::vector<std::uint64_t>& expect_offered = {}) {
  std::vector<std::uint64_t> offered;
  for (const auto& p : store.points()) offered.push_back(p.rp_id);
  if (!expect_offered.empty() && offered != expect_offered) {
    std::string got, want;
    for (auto r : offered) got += " " + std::to_string(r);
    for (auto r : expect_offered) want += " " + std::to_string(r);
    return "offered RPs" + got + ", expected" + want;
  }
  const std::uint64_t base = store.last_applied_rp();
  // While a compaction is pending (R19) the base RP is no longer offered and its images may
  // be half written: only the offered RPs are checked.
  if (base != 0 && store.apply_error().is_ok()) {
    if (offered.empty() || offered.front() != base)
      return "the base RP " + std::to_string(base) + " is not the oldest offered RP";
    std::string why = check_rp(store, model, base, root, scratch, true);
    if (!why.empty()) return why;
  }
  for (auto r : offered) {
    if (!model.has(r)) return "RP " + std::to_string(r) + " offered but never committed";
    std::string why = check_rp(store, model, r, root, scratch, false);
    if (!why.empty()) return why;
  }
  return "";
}

// Images at the newest RP: retention keeps only it and compacts every commit onto it.
inline RetentionPolicy keep_newest_only() {
  RetentionPolicy p;
  p.keep_last = 1;
  return p;
}

// The state file of layout 1 (the release before retention), written by hand as store.cc's
// encode_small_file did: magic "FSTA" u32, version 1 u16, 0 u16, group id u64, the applied
// RP u64, the RP being applied u64, xxh3-64 of the 32 bytes before.
inline std::string legacy_state(const std::string& group, std::uint64_t applied_rp,
                                std::uint64_t applying_rp) {
  std::string s;
  ByteWriter w(s);
  w.u32(0x41545346);
  w.u16(1);
  w.u16(0);
  w.u64(group_id_of(group));
  w.u64(applied_rp);
  w.u64(applying_rp);
  w.u64(xxh3_64(s.data(), s.size()));
  return s;
}

// Turns a layout 2 store (its journal) into what layout 1 left: the state file version 1 at
// RP `rp`, the images of every disk of RP `rp` written from the model.
inline void make_layout1(const std::string& root, const std::string& group, const Model& model,
                         std::uint64_t rp) {
  const std::string g = root + "/" + group;
  std::filesystem::remove_all(g + "/replica");
  std::filesystem::create_directories(g + "/replica");
  for (const auto& [name, img] : model.at(rp)) spit(g + "/replica/" + name + ".img", img);
  spit(g + "/state", legacy_state(group, rp, 0));
}

// Two disks; overwrites, zero blocks, unaligned sizes and offsets, zstd and raw payloads,
// a resize in both directions, a full RP of one disk after incrementals.
inline std::vector<TestRp> life_cycle_rps() {
  constexpr std::uint32_t kB = 65536;
  std::vector<TestRp> rps(5);
  rps[0].begin = {1, 0, 1, 0, {disk("vda", 16 * kB + 1000, true), disk("vdb", 8 * kB, true)}};
  for (std::uint32_t i = 0; i < 16; ++i)
    rps[0].blocks.push_back({0, i * std::uint64_t(kB), kB, RecordKind::data,
                             i % 2 ? RecordCodec::zstd : RecordCodec::none, 100 + i});
  rps[0].blocks.push_back({0, 16 * kB, 1000, RecordKind::data, RecordCodec::zstd, 200});
  for (std::uint32_t i = 0; i < 8; i += 2)
    rps[0].blocks.push_back({1, i * std::uint64_t(kB), kB, RecordKind::data, RecordCodec::zstd,
                             300 + i});
  rps[1].begin = {2, 1, 2, 0, {disk("vda", 16 * kB + 1000, false), disk("vdb", 8 * kB, false)}};
  rps[1].blocks = {{0, 3 * kB, kB, RecordKind::zero, RecordCodec::none, 0},
                   {0, 5 * kB + 512, 4096, RecordKind::data, RecordCodec::none, 401},
                   {0, 16 * kB, 1000, RecordKind::data, RecordCodec::none, 402},
                   {1, 2 * kB, kB, RecordKind::data, RecordCodec::zstd, 403},
                   {0, 5 * kB, kB, RecordKind::data, RecordCodec::zstd, 404},  // overwrites 401
                   {0, 5 * kB + 8192, 4096, RecordKind::zero, RecordCodec::none, 0}};
  rps[2].begin = {3, 2, 3, 0, {disk("vda", 20 * kB, false), disk("vdb", 6 * kB + 4096, false)}};
  rps[2].blocks = {{0, 19 * kB, kB, RecordKind::data, RecordCodec::zstd, 501},
                   {1, 6 * kB, 4096, RecordKind::data, RecordCodec::none, 502}};
  rps[3].begin = {4, 3, 4, 0, {disk("vda", 12 * kB, true), disk("vdb", 6 * kB + 4096, false)}};
  rps[3].blocks = {{0, 0, kB, RecordKind::data, RecordCodec::zstd, 601},
                   {0, 7 * kB, kB, RecordKind::data, RecordCodec::none, 602}};
  rps[4].begin = {5, 4, 5, 0, {disk("vda", 16 * kB, false), disk("vdb", 6 * kB + 4096, false)}};
  rps[4].blocks = {{0, 14 * kB, kB, RecordKind::data, RecordCodec::none, 701},
                   {1, 0, kB, RecordKind::zero, RecordCodec::none, 0}};
  return rps;
}

}  // namespace ferry::site::test
