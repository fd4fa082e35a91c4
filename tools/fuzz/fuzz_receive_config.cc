// libFuzzer target for the receiver's config parser (tools/receive_config.cc) and the access
// map it holds (tools/access.cc), docs/fuzzing.md.
//
// Any input: parse_receive_config never crashes, hangs or throws, and a refusal names the
// file. An accepted config holds every bound (at most kMaxAccessEntries entries, identities
// normalised and unique, every pattern valid) and means the same after a round trip: its
// access map and quotas, written back as TOML and parsed again, give the same entries (lines
// aside). Every entry's own identity is allowed exactly the groups its patterns match (rule
// A3), and an identity no entry names is refused (A4). The raw input is also tried as one
// identity: normalising is idempotent.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <string_view>

#include "../access.h"
#include "../receive_config.h"

namespace {

namespace t = ferry::tools;
constexpr const char* kFile = "fuzz.toml";

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04X", u);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string list(const std::vector<std::string>& v) {
  std::string out = "[";
  for (std::size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + quoted(v[i]);
  return out + "]";
}

std::string emit(const t::ReceiveConfig& c) {
  std::string out;
  for (const t::AccessEntry& e : c.access.entries) {
    out += "[[access]]\nidentity = " + quoted(e.identity) + "\n";
    if (!e.write.empty()) out += "write = " + list(e.write) + "\n";
    if (!e.manage.empty()) out += "manage = " + list(e.manage) + "\n";
  }
  out += "[quota]\ndefault = " + std::to_string(c.default_quota_bytes & 0x7fffffffffffffffull) + "\n";
  for (const auto& [g, q] : c.quotas)
    out += "[group." + quoted(g) + "]\nquota = " + std::to_string(q & 0x7fffffffffffffffull) + "\n";
  return out;
}

bool same_entries(const t::AccessMap& a, const t::AccessMap& b) {
  if (a.entries.size() != b.entries.size()) return false;
  for (std::size_t i = 0; i < a.entries.size(); ++i) {
    const auto& x = a.entries[i];
    const auto& y = b.entries[i];
    if (x.identity != y.identity || x.write != y.write || x.manage != y.manage) return false;
  }
  return true;
}

void check_accepted(const t::ReceiveConfig& c) {
  FERRY_ASSERT(c.access.entries.size() <= t::kMaxAccessEntries);
  std::set<std::string> ids;
  for (const t::AccessEntry& e : c.access.entries) {
    auto again = t::normalise_identity(e.identity);
    FERRY_ASSERT_MSG(again.is_ok() && *again == e.identity, "identity not normalised");
    FERRY_ASSERT_MSG(ids.insert(e.identity).second, "identity listed twice");
    FERRY_ASSERT(!e.write.empty() || !e.manage.empty());
    FERRY_ASSERT(e.write.size() <= t::kMaxAccessPatterns && e.manage.size() <= t::kMaxAccessPatterns);
    for (const auto* pats : {&e.write, &e.manage}) {
      for (const std::string& p : *pats) {
        FERRY_ASSERT_MSG(t::check_group_pattern(p).is_ok(), "invalid pattern accepted");
        // A3: the entry's own identity gets a group its pattern matches.
        std::string g = p == "*" ? "any" : (p.back() == '*' ? p.substr(0, p.size() - 1) + "x" : p);
        if (g == "." || g == "..") continue;
        auto d = t::decide(c.access, {e.identity}, g,
                           pats == &e.write ? t::Right::write : t::Right::manage);
        FERRY_ASSERT_MSG(d.allowed && d.rule == "A3", "an entry's own pattern was refused");
      }
    }
  }
  // A4: an identity no entry names is refused, whatever the group.
  auto d = t::decide(c.access, {"uri:fuzz-nobody-" + std::to_string(ids.size())}, "g", t::Right::write);
  FERRY_ASSERT(!d.allowed && (d.rule == "A2" || d.rule == "A4") && !d.message.empty());
  // Round trip of what this file adds: the access map and the quotas.
  auto back = t::parse_receive_config(emit(c), kFile);
  FERRY_ASSERT_MSG(back.is_ok(), "the emitted config does not parse");
  FERRY_ASSERT_MSG(same_entries(back->access, c.access), "access map differs after a round trip");
  for (const auto& [g, q] : c.quotas)
    FERRY_ASSERT(back->quota_for(g) == (q & 0x7fffffffffffffffull));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto id = t::normalise_identity(text);
  if (id.is_ok()) {
    auto again = t::normalise_identity(*id);
    FERRY_ASSERT_MSG(again.is_ok() && *again == *id, "normalise_identity is not idempotent");
  }
  auto r = t::parse_receive_config(text, kFile);
  if (!r.is_ok()) {
    FERRY_ASSERT_MSG(r.status().message().rfind(kFile, 0) == 0, "a refusal must name the file");
    return 0;
  }
  check_accepted(*r);
  return 0;
}
