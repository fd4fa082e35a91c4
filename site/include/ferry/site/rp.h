// The recovery points as the store records them: what an RP holds per disk (RpDiskInfo,
// RpInfo), how it began (RpBeginInfo), the records' kinds and bounds, one verified block
// (BlockRecord). Shared by the store's public API (store.h) and its journal (site-private),
// so the journal does not depend on the store's interface.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/transport/rules.h"

namespace ferry::site {

struct RpDiskInfo {
  std::string name;
  std::uint64_t size_bytes = 0;
  bool full = false;                  // a full copy (not a delta on base_rp)
  std::uint64_t changed_bytes = 0;    // logical bytes carried by the RP (data + zero)
  std::uint64_t zero_bytes = 0;       // of which sent as zero records
  std::uint64_t stored_bytes = 0;     // bytes the RP's records take in the journal
  // From the RP's rp_begin record (not the commit record): how the disk was sent and the
  // identity the source gave it (zero: unknown, an older source or journal).
  bool resync = false;
  Hash128 identity;
  bool identity_ephemeral = false;  // lives only as long as the source's QEMU process
};

struct RpInfo {
  std::uint64_t rp_id = 0;
  std::uint64_t base_rp = 0;
  std::uint64_t created_unix_ns = 0;    // capture time on the source
  std::uint64_t committed_unix_ns = 0;  // when the receiver made it durable
  std::uint32_t flags = 0;              // wire kRpFlag* bits (app-consistent, ...)
  std::vector<RpDiskInfo> disks;
};

struct RpBeginInfo {
  std::uint64_t rp_id = 0;
  std::uint64_t base_rp = 0;
  std::uint64_t created_unix_ns = 0;
  std::uint32_t flags = 0;
  struct Disk {
    std::string name;
    std::uint64_t size_bytes = 0;
    bool full = false;
    bool resync = false;  // a delta on base_rp chosen by digests (C4)
    Hash128 identity;     // zero: unknown (an older source)
    bool identity_ephemeral = false;
  };
  std::vector<Disk> disks;
  std::string source_name;  // who sent the RP (hello.source_name); empty: unknown
  // The VM's definition in force at this RP (libvirt domain XML; at most kMaxVmConfigBytes).
  // The receiver copies the previous RP's into an RP whose source sent none, so every stored
  // RP carries its own and pruning never separates an RP from its definition. Empty: none
  // (an older source, or a source that is not a libvirt domain). vm_config.h resolves it.
  std::string vm_config;
};
// = transport::kMaxVmConfigBytes (checked in receiver.cc): the journal refuses more.
inline constexpr std::uint32_t kMaxVmConfigBytes = 224u << 10;
// RpBeginInfo::flags bit (= transport::kRpFlagTakeOver): the source takes the group over
// from the source that wrote it, so rule C5.source does not apply.
inline constexpr std::uint32_t kRpFlagTakeOver = 1u << 2;

// The largest codec-encoded payload one journal record holds: a 4 MiB block, plus room for a
// zstd frame that came out larger than its block. The wire allows frames up to 8 MiB, so the
// receiver refuses a larger payload as a bad frame before it reaches the store (the journal's
// own limit, journal.h kMaxPayloadBytes, is this value).
inline constexpr std::uint32_t kMaxStoredPayloadBytes = (4u << 20) + (64u << 10);
// Longest zero record (no payload): a zero range as the wire carries it with the zero_ranges
// feature, 4 GiB - 4 MiB (journal.h kMaxZeroRecordBytes). Data records stay at 4 MiB.
inline constexpr std::uint32_t kMaxStoredZeroBytes = 0xffc00000u;

// Group and disk names become file names in the store; the receiver checks them at hello with
// the same rule. Owner: transport/rules.h.
using transport::kMaxStoreNameBytes;
using transport::kStoreNameRule;
using transport::valid_store_name;

enum class RecordKind : std::uint8_t { data = 0, zero = 1 };
enum class RecordCodec : std::uint8_t { none = 0, zstd = 1 };

// One verified block of the open RP. `payload` is codec-encoded; the receiver has already
// decoded it and checked `hash` (xxh3-128 of the decoded bytes) before calling append_block.
struct BlockRecord {
  std::uint64_t rp_id = 0;
  std::uint64_t seq = 0;
  std::uint16_t disk_index = 0;  // index into RpBeginInfo::disks
  RecordKind kind = RecordKind::data;
  RecordCodec codec = RecordCodec::none;
  std::uint64_t offset_bytes = 0;
  std::uint32_t length_bytes = 0;
  Hash128 hash;
  std::string_view payload;  // copied by append_block before it returns
};

}  // namespace ferry::site
