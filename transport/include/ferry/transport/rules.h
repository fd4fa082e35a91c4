// The rules both ends of the wire apply: this header is their one owner. The source, the
// receiver, the store and the tools refer here instead of keeping a copy (docs/ARCHITECTURE.md,
// "Modules and dependencies"). Pure: no sockets, no zstd, so every target may include it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/hash.h"
#include "ferry/base/status.h"
#include "ferry/transport/wire.h"

namespace ferry::transport {

// --- block size ----------------------------------------------------------------------------
// A block (a disk's bitmap granularity in hello, a resync's digest unit, a journal record's
// bound) is a power of two in [kMinBlockBytes, kMaxBlockBytes (wire.h)].
inline constexpr std::uint32_t kMinBlockBytes = 512;
bool block_bytes_valid(std::uint64_t block_bytes);
// "<block_bytes>, must be a power of two in [512, 4194304]": the refusal's words.
std::string block_bytes_rule(std::uint64_t block_bytes);

// --- compression -----------------------------------------------------------------------------
inline constexpr int kDefaultZstdLevel = 1;  // fast: zstd -1 keeps up with loopback and NVMe

// --- names -----------------------------------------------------------------------------------
// Group and disk names become file names in the receiver's store: [A-Za-z0-9._-],
// 1..255 characters, not "." or "..". The receiver checks them at hello, the store at open.
bool valid_store_name(std::string_view name);
inline constexpr const char* kStoreNameRule = "[A-Za-z0-9._-], 1..255 characters, not . or ..";
inline constexpr std::size_t kMaxStoreNameBytes = 255;
static_assert(kMaxStoreNameBytes == kMaxNameBytes, "a name the wire carries fits the store");

// --- errors on the wire ----------------------------------------------------------------------
// The one place an error becomes a wire status (the receiver's hello_reply, rp_ack, error)...
WireStatus wire_status_of(const Status& s);
// ...and the way back on the source, for the codes it acts on: the five storage and divergence
// codes map back to themselves, anything else is Errc::external.
Errc errc_of(WireStatus s);
// A refusal the source retries later (storage full or failing, a frame to resend).
bool wire_status_retryable(WireStatus s);

// --- two sources, one group (rule C5.source) -------------------------------------------------
// Who writes a group and the identities of its disks: the receiver's last RP (held) or the
// source's capture (offered). The source checks the rule before it sends, the store at
// rp_begin; both call this.
struct SourceClaim {
  struct Disk {
    std::string name;
    Hash128 identity;  // zero: unknown (an older source)
    bool identity_ephemeral = false;
  };
  std::string source_name;  // empty: unknown
  std::vector<Disk> disks;
};
// Every disk `offered` carries an identity, none equals an identity of `held`, and at least one
// disk of the same name is held with another identity stored with its image (not ephemeral).
// A swap of names, an older source or a raw disk whose QEMU restarted is not a second source.
bool second_source(const SourceClaim& held, const SourceClaim& offered);
// The refusal: names the group, both sources and their disks' identities, and the fix.
std::string second_source_message(const std::string& group, const SourceClaim& held,
                                  const SourceClaim& offered);

}  // namespace ferry::transport
