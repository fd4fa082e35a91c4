// The access map's decision (access.h). Pure: the fuzzer builds this file.
#include "access.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cctype>

#include "ferry/transport/rules.h"
#include "ferry/transport/tls.h"

namespace ferry::tools {
namespace {

Status bad(std::string_view text, const std::string& what) {
  std::string shown(text.substr(0, 96));
  for (char& c : shown)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  return Status::error(Errc::invalid_argument,
                       "'" + shown + (text.size() > 96 ? "...'" : "'") + " " + what);
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool printable(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) {
    auto u = static_cast<unsigned char>(c);
    return u > 0x20 && u < 0x7f;  // no space, no control, ASCII: SANs are IA5 strings
  });
}

Result<std::string> normalise_ip(std::string_view text, std::string_view value) {
  const std::string v(value);
  unsigned char buf[16];
  char out[INET6_ADDRSTRLEN];
  if (inet_pton(AF_INET, v.c_str(), buf) == 1 && inet_ntop(AF_INET, buf, out, sizeof out))
    return "ip:" + std::string(out);
  if (inet_pton(AF_INET6, v.c_str(), buf) == 1 && inet_ntop(AF_INET6, buf, out, sizeof out))
    return "ip:" + std::string(out);
  return bad(text, "is not an IP address (ip:192.0.2.7 or ip:2001:db8::7)");
}

}  // namespace

const char* right_name(Right r) { return r == Right::write ? "write" : "manage"; }

Result<std::string> normalise_identity(std::string_view text) {
  if (text.size() > kMaxIdentityBytes)
    return bad(text, "is longer than " + std::to_string(kMaxIdentityBytes) + " bytes");
  const std::size_t colon = text.find(':');
  const std::string kind = colon == std::string_view::npos ? std::string() : lower(text.substr(0, colon));
  const std::string_view value = colon == std::string_view::npos ? "" : text.substr(colon + 1);
  if (kind != "uri" && kind != "dns" && kind != "ip" && kind != "sha256")
    return bad(text, "is not an identity: write uri:VALUE, dns:NAME, ip:ADDRESS or sha256:HEX "
                     "(the SPKI digest)");
  if (value.empty()) return bad(text, "has an empty " + kind + " value");
  if (!printable(value)) return bad(text, "contains a space, a control or a non-ASCII character");
  if (kind == "uri") return "uri:" + std::string(value);
  if (kind == "dns") {
    const std::string name = lower(value);
    if (name.size() > 253 || name.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789.-*") !=
                                 std::string::npos)
      return bad(text, "is not a DNS name (letters, digits, '.', '-', at most 253)");
    return "dns:" + name;
  }
  if (kind == "ip") return normalise_ip(text, value);
  const std::string hex = lower(value);
  if (hex.size() != 64 || hex.find_first_not_of("0123456789abcdef") != std::string::npos)
    return bad(text, "is not a SHA-256 digest (64 hex digits of the certificate's SPKI: "
                     "openssl x509 -pubkey -noout | openssl pkey -pubin -outform DER | "
                     "sha256sum)");
  return "sha256:" + hex;
}

Status check_group_pattern(std::string_view pattern) {
  if (pattern == "*") return Status::ok();
  const bool prefix = !pattern.empty() && pattern.back() == '*';
  const std::string_view name = prefix ? pattern.substr(0, pattern.size() - 1) : pattern;
  // A prefix may be "." or ".." (".*" matches ".hidden" names); a whole name may not.
  const bool ok = transport::valid_store_name(name) ||
                  (prefix && (name == "." || name == ".."));
  if (!ok)
    return bad(pattern, std::string("is not a group pattern: a group name (") +
                            transport::kStoreNameRule + "), a prefix ending in '*', or '*'");
  return Status::ok();
}

bool pattern_matches(std::string_view pattern, std::string_view group) {
  if (!pattern.empty() && pattern.back() == '*')
    return group.substr(0, pattern.size() - 1) == pattern.substr(0, pattern.size() - 1);
  return pattern == group;
}

std::vector<std::string> identities_of(const transport::PeerIdentity& peer) {
  std::vector<std::string> out;
  auto add = [&out](std::string_view kind, const std::string& value) {
    auto n = normalise_identity(std::string(kind) + ":" + value);
    if (n.is_ok() && std::find(out.begin(), out.end(), *n) == out.end()) out.push_back(*n);
  };
  for (const auto& u : peer.uris) add("uri", u);
  for (const auto& d : peer.dns_names) add("dns", d);
  for (const auto& i : peer.ips) add("ip", i);
  if (!peer.spki_sha256.empty()) {
    auto n = normalise_identity(peer.spki_sha256);  // already "sha256:..."
    if (n.is_ok()) out.push_back(*n);
  }
  return out;
}

AccessDecision decide(const AccessMap& map, const std::vector<std::string>& identities,
                      std::string_view group, Right right) {
  AccessDecision d;
  const std::string what = std::string(right_name(right)) + " group '" + std::string(group) + "'";
  if (map.empty()) {
    d.rule = "A2";
    d.identity = identities.empty() ? std::string() : identities.front();
    d.message = "identity " + (d.identity.empty() ? std::string("(none)") : d.identity) +
                " may not " + what + ": the receiver's access map is empty ([[access]] in "
                "receive.toml), so it refuses every peer";
    return d;
  }
  const AccessEntry* known = nullptr;  // an entry naming one of the peer's identities
  for (const AccessEntry& e : map.entries) {
    if (std::find(identities.begin(), identities.end(), e.identity) == identities.end()) continue;
    if (known == nullptr) known = &e;
    const auto& patterns = right == Right::write ? e.write : e.manage;
    for (const std::string& p : patterns) {
      if (!pattern_matches(p, group)) continue;
      d.allowed = true;
      d.rule = "A3";
      d.identity = e.identity;
      return d;
    }
  }
  d.rule = "A4";
  d.identity = known != nullptr ? known->identity
                                : (identities.empty() ? std::string() : identities.front());
  d.message = "identity " + (d.identity.empty() ? std::string("(none)") : d.identity) +
              " may not " + what +
              (known != nullptr ? std::string()
                                : std::string(" (no [[access]] entry names any identity of this peer)"));
  return d;
}

}  // namespace ferry::tools
