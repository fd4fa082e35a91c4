// Who may do what to which group: the receiver's access map (receive.toml [[access]], see
// packaging/receive.toml.example and docs/security.md).
//
// Pure and small on purpose: no sockets, no Asio, no OpenSSL, so the clang fuzzer builds it
// with the config parser, and every decision is a function of (map, identities, group, right).
//
// An identity is written as "KIND:VALUE", one of
//   uri:spiffe://ferry/source-a    a subjectAltName URI of the peer's certificate
//   dns:source-a.example           a subjectAltName DNS name (compared case-insensitively)
//   ip:192.0.2.7 / ip:2001:db8::7   a subjectAltName IP address (compared as an address)
//   sha256:<64 hex>                the SHA-256 of the certificate's SubjectPublicKeyInfo
// A pattern is a group name ("web01"), a prefix ending in '*' ("db-*"), or "*" (every group).
//
// Decision (rule names appear in refusals and in the tests):
//   A1 a peer without a verified identity (TLS off) is not judged here: the receiver does not
//      call decide() in plaintext mode (loopback or --insecure-plaintext; docs/security.md).
//   A2 an empty map refuses everything: TLS without an access map is a closed door.
//   A3 a right is granted when some entry whose identity the peer presents lists a pattern
//      that matches the group under that right. Rights never imply each other: `write` does
//      not give `manage`, nor the reverse.
//   A4 otherwise refused, naming the identity (the matching one, else the peer's first) and
//      the group: "identity uri:spiffe://ferry/source-a may not write group 'B'".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::transport {
struct PeerIdentity;
}

namespace ferry::tools {

inline constexpr std::size_t kMaxAccessEntries = 1024;
inline constexpr std::size_t kMaxAccessPatterns = 1024;  // per right of one entry
inline constexpr std::size_t kMaxIdentityBytes = 1024;

enum class Right : std::uint8_t { write = 0, manage = 1 };
const char* right_name(Right r);  // "write" / "manage"

struct AccessEntry {
  std::string identity;  // normalised "KIND:VALUE" (normalise_identity)
  std::vector<std::string> write;   // patterns
  std::vector<std::string> manage;  // patterns
  std::uint32_t line = 0;           // where the entry starts in its file (messages only)
  bool operator==(const AccessEntry&) const = default;
};

struct AccessMap {
  std::vector<AccessEntry> entries;
  bool empty() const { return entries.empty(); }
  bool operator==(const AccessMap&) const = default;
};

// Checks "KIND:VALUE" and returns it in the form decide() compares: dns names lowercased,
// IP addresses in inet_ntop's form, SPKI digests lowercased. Error: what is wrong with it.
Result<std::string> normalise_identity(std::string_view text);
// A group name (the store's rule), a name prefix followed by '*', or "*".
Status check_group_pattern(std::string_view pattern);
bool pattern_matches(std::string_view pattern, std::string_view group);

// The identities a verified peer presents, normalised, URIs first then DNS names, IP
// addresses and the SPKI digest (the order refusals pick "the peer's first" from). Entries
// that do not normalise (an odd SAN) are left out: they can match nothing in a checked map.
std::vector<std::string> identities_of(const transport::PeerIdentity& peer);

struct AccessDecision {
  bool allowed = false;
  std::string rule;      // "A2", "A3" or "A4"
  std::string identity;  // the identity the decision is about (may be empty: none presented)
  std::string message;   // the refusal for the peer and the log; empty when allowed
};

AccessDecision decide(const AccessMap& map, const std::vector<std::string>& identities,
                      std::string_view group, Right right);

}  // namespace ferry::tools
