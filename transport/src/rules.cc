#include "ferry/transport/rules.h"

#include <fmt/format.h>

#include <bit>

namespace ferry::transport {

bool block_bytes_valid(std::uint64_t block_bytes) {
  return block_bytes >= kMinBlockBytes && block_bytes <= kMaxBlockBytes &&
         std::has_single_bit(block_bytes);
}

std::string block_bytes_rule(std::uint64_t block_bytes) {
  return fmt::format("{}, must be a power of two in [{}, {}]", block_bytes, kMinBlockBytes,
                     kMaxBlockBytes);
}

bool valid_store_name(std::string_view s) {
  if (s.empty() || s.size() > kMaxStoreNameBytes || s == "." || s == "..") return false;
  for (char c : s) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

WireStatus wire_status_of(const Status& s) {
  switch (s.code()) {
    case Errc::diverged: return WireStatus::diverged;
    case Errc::no_space: return WireStatus::no_space;
    case Errc::io: return WireStatus::io_error;
    case Errc::corrupt: return WireStatus::corrupt;
    case Errc::protocol: return WireStatus::bad_request;
    case Errc::busy: return WireStatus::busy;
    case Errc::invalid_argument:
    case Errc::unsupported:
    case Errc::not_found: return WireStatus::bad_request;
    default: return WireStatus::internal;
  }
}

Errc errc_of(WireStatus s) {
  switch (s) {
    case WireStatus::diverged: return Errc::diverged;
    case WireStatus::no_space: return Errc::no_space;
    case WireStatus::io_error: return Errc::io;
    case WireStatus::corrupt: return Errc::corrupt;
    case WireStatus::busy: return Errc::busy;
    // forbidden (the access map said no) has no Errc of its own: external, never retried,
    // with the receiver's message naming the identity and the group.
    default: return Errc::external;
  }
}

bool wire_status_retryable(WireStatus s) {
  return s == WireStatus::no_space || s == WireStatus::io_error || s == WireStatus::corrupt;
}

namespace {

std::string identities_text(const SourceClaim& c) {
  std::string out;
  for (const auto& d : c.disks)
    out += (out.empty() ? "" : ", ") + d.name + "=" +
           (d.identity == Hash128{} ? std::string("unknown") : d.identity.hex());
  return out;
}

}  // namespace

bool second_source(const SourceClaim& held, const SourceClaim& offered) {
  bool comparable = false;
  for (const auto& o : offered.disks) {
    if (o.identity == Hash128{}) return false;  // an older source: nothing to compare
    for (const auto& h : held.disks) {
      if (h.identity == o.identity) return false;  // one disk is still ours (maybe renamed)
      if (h.name == o.name && !(h.identity == Hash128{}) && !h.identity_ephemeral &&
          !o.identity_ephemeral)
        comparable = true;
    }
  }
  // Ephemeral identities (a raw disk's in-memory tag) change at every QEMU restart, so only
  // an identity stored with the image proves that another source writes the group.
  return comparable;
}

std::string second_source_message(const std::string& group, const SourceClaim& held,
                                  const SourceClaim& offered) {
  const std::string who = held.source_name.empty() ? "(unknown)" : held.source_name;
  return "group '" + group + "' is written by source '" + who + "' (disks " +
         identities_text(held) + "), but source '" + offered.source_name + "' offers disks " +
         identities_text(offered) +
         ": two sources use one group name. Give one of them another --group, or run the "
         "source that should own the group with --take-over (`ferry replicate` or `ferry "
         "protect`; its next RP is then a resync or full copy)";
}

}  // namespace ferry::transport
