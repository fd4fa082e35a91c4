// Unit tests of the access map (access.h: rules A1-A4) and of its TOML form in receive.toml
// ([[access]], [quota], [group.NAME] quota): one case per rule, each message naming
// file:line: key.
#include <catch2/catch.hpp>
#include <string>

#include "access.h"
#include "ferry/transport/tls.h"
#include "receive_config.h"

using namespace ferry::tools;

namespace {

std::string error_of(const std::string& text) {
  auto r = parse_receive_config(text, "receive.toml");
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == ferry::Errc::invalid_argument);
  return r.status().message();
}

void check_error(const std::string& text, const std::string& where, const std::string& what) {
  std::string m = error_of(text);
  INFO(m);
  CHECK(m.rfind(where, 0) == 0);
  CHECK_THAT(m, Catch::Contains(what));
}

constexpr const char* kMap = R"(
[[access]]
identity = "uri:spiffe://ferry/source-a"
write = ["A", "web01", "db-*"]

[[access]]
identity = "uri:spiffe://ferry/admin"
manage = ["*"]

[[access]]
identity = "dns:Backup.Example"
write = ["backup"]
manage = ["backup"]

[[access]]
identity = "ip:0:0:0:0:0:0:0:1"
write = ["local-*"]

[[access]]
identity = "sha256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
write = ["pinned"]

[quota]
default = "1T"

[group.A]
quota = "200G"

[group.free]
quota = 0
)";

AccessMap map_of(const char* text) {
  auto r = parse_receive_config(text, "receive.toml");
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  return r->access;
}

}  // namespace

TEST_CASE("identities are checked and normalised", "[access]") {
  CHECK(normalise_identity("uri:spiffe://ferry/a").value() == "uri:spiffe://ferry/a");
  CHECK(normalise_identity("DNS:Host.Example").value() == "dns:host.example");
  CHECK(normalise_identity("ip:::1").value() == "ip:::1");
  CHECK(normalise_identity("ip:0:0:0:0:0:0:0:1").value() == "ip:::1");
  CHECK(normalise_identity("ip:127.0.0.1").value() == "ip:127.0.0.1");
  CHECK(normalise_identity(std::string("sha256:") + std::string(64, 'A')).value() ==
        std::string("sha256:") + std::string(64, 'a'));
  for (const char* bad : {"", "spiffe://x", "uri:", "email:a@b", "ip:300.1.1.1", "ip:host",
                          "dns:a b", "dns:a_b", "sha256:abc", "uri:a\tb", "uri:caf\xc3\xa9"}) {
    INFO(bad);
    CHECK(normalise_identity(bad).status().code() == ferry::Errc::invalid_argument);
  }
  CHECK(normalise_identity("uri:" + std::string(kMaxIdentityBytes, 'x')).status().message().find(
            "longer than") != std::string::npos);
}

TEST_CASE("group patterns: a name, a prefix with '*', or '*'", "[access]") {
  for (const char* ok : {"web01", "db-*", "*", ".*", "a.b_c-d"}) {
    INFO(ok);
    CHECK(check_group_pattern(ok).is_ok());
  }
  for (const char* bad : {"", "**", "a*b", "*a", ".", "..", "a/b", "a b", "db-?"}) {
    INFO(bad);
    CHECK_FALSE(check_group_pattern(bad).is_ok());
  }
  CHECK(pattern_matches("db-*", "db-1"));
  CHECK(pattern_matches("db-*", "db-"));
  CHECK_FALSE(pattern_matches("db-*", "db"));
  CHECK_FALSE(pattern_matches("db-*", "xdb-1"));
  CHECK(pattern_matches("*", "anything"));
  CHECK(pattern_matches("web01", "web01"));
  CHECK_FALSE(pattern_matches("web01", "web011"));
}

TEST_CASE("A2: an empty map refuses everything", "[access]") {
  AccessDecision d = decide(AccessMap{}, {"uri:spiffe://ferry/source-a"}, "A", Right::write);
  CHECK_FALSE(d.allowed);
  CHECK(d.rule == "A2");
  CHECK_THAT(d.message, Catch::Contains("identity uri:spiffe://ferry/source-a may not write "
                                        "group 'A'"));
  CHECK_THAT(d.message, Catch::Contains("access map is empty"));
}

TEST_CASE("A3/A4: a right per group, write and manage apart", "[access]") {
  const AccessMap m = map_of(kMap);
  REQUIRE(m.entries.size() == 5);
  const std::vector<std::string> a{"uri:spiffe://ferry/source-a", "dns:source-a"};
  CHECK(decide(m, a, "A", Right::write).allowed);
  CHECK(decide(m, a, "db-7", Right::write).allowed);
  AccessDecision b = decide(m, a, "B", Right::write);
  CHECK_FALSE(b.allowed);
  CHECK(b.rule == "A4");
  CHECK(b.message == "identity uri:spiffe://ferry/source-a may not write group 'B'");
  // Write does not give manage.
  AccessDecision mg = decide(m, a, "A", Right::manage);
  CHECK_FALSE(mg.allowed);
  CHECK(mg.message == "identity uri:spiffe://ferry/source-a may not manage group 'A'");
  // Manage does not give write.
  const std::vector<std::string> admin{"uri:spiffe://ferry/admin"};
  CHECK(decide(m, admin, "A", Right::manage).allowed);
  CHECK_FALSE(decide(m, admin, "A", Right::write).allowed);
  // DNS names compare case-insensitively (normalised on both sides), IPs as addresses.
  CHECK(decide(m, {"dns:backup.example"}, "backup", Right::write).allowed);
  CHECK(decide(m, {"ip:::1"}, "local-x", Right::write).allowed);
  CHECK(decide(m, {"sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"},
               "pinned", Right::write).allowed);
  // A peer no entry names: its first identity, and why.
  AccessDecision none = decide(m, {"uri:spiffe://ferry/source-b"}, "A", Right::write);
  CHECK_FALSE(none.allowed);
  CHECK_THAT(none.message, Catch::Contains("identity uri:spiffe://ferry/source-b may not write "
                                           "group 'A' (no [[access]] entry"));
  CHECK_FALSE(decide(m, {}, "A", Right::write).allowed);
}

TEST_CASE("identities_of: SANs and the SPKI digest, normalised", "[access]") {
  ferry::transport::PeerIdentity p;
  p.subject = "CN=source-a";
  p.uris = {"spiffe://ferry/source-a"};
  p.dns_names = {"Source-A", "bad name"};
  p.ips = {"0:0:0:0:0:0:0:1"};
  p.spki_sha256 = "sha256:" + std::string(64, 'F');
  auto ids = identities_of(p);
  REQUIRE(ids.size() == 4);
  CHECK(ids[0] == "uri:spiffe://ferry/source-a");
  CHECK(ids[1] == "dns:source-a");
  CHECK(ids[2] == "ip:::1");
  CHECK(ids[3] == "sha256:" + std::string(64, 'f'));
}

TEST_CASE("quotas: per group over the default", "[access]") {
  auto r = parse_receive_config(kMap, "receive.toml");
  REQUIRE(r.is_ok());
  CHECK(r->quota_for("A") == 200ull << 30);
  CHECK(r->quota_for("free") == 0);
  CHECK(r->quota_for("other") == 1ull << 40);
  auto none = parse_receive_config("", "receive.toml");
  REQUIRE(none.is_ok());
  CHECK(none->quota_for("A") == 0);
  CHECK(none->access.empty());
}

TEST_CASE("[[access]] and quota errors name file:line: key", "[access]") {
  check_error("[access]\nidentity = \"uri:x\"\n", "receive.toml:1: access",
              "must be tables, written as [[access]]");
  check_error("[[access]]\nwrite = [\"a\"]\n", "receive.toml:1: identity", "missing (required)");
  check_error("[[access]]\nidentity = \"spiffe://x\"\nwrite = [\"a\"]\n",
              "receive.toml:2: identity", "is not an identity");
  check_error("[[access]]\nidentity = \"uri:x\"\n", "receive.toml:1: access", "grants nothing");
  check_error("[[access]]\nidentity = \"uri:x\"\nwrite = \"a\"\n", "receive.toml:3: write",
              "must be a list of groups");
  check_error("[[access]]\nidentity = \"uri:x\"\nwrite = [\"a\", 3]\n", "receive.toml:3: write",
              "every entry must be a string");
  check_error("[[access]]\nidentity = \"uri:x\"\nmanage = [\"a/b\"]\n", "receive.toml:3: manage",
              "is not a group pattern");
  check_error("[[access]]\nidentity = \"uri:x\"\nwrite = [\"a\"]\nread = [\"a\"]\n",
              "receive.toml:4: read", "unknown key in [[access]] (allowed: identity, write, manage)");
  check_error("[[access]]\nidentity = \"dns:A\"\nwrite = [\"a\"]\n[[access]]\nidentity = \"dns:a\"\n"
              "write = [\"b\"]\n", "receive.toml:4: identity", "already has an [[access]] entry (line 1)");
  check_error("[quota]\ndefault = \"lots\"\n", "receive.toml:2: default", "is not a size");
  check_error("[quota]\nmax = \"1G\"\n", "receive.toml:2: max", "unknown key in [quota]");
  check_error("[group.a]\nquota = -1\n", "receive.toml:2: quota", "must not be negative");
  check_error("[group.a]\nquota = true\n", "receive.toml:2: quota", "must be a size");
  std::string many;
  for (std::size_t i = 0; i <= kMaxAccessEntries; ++i)
    many += "[[access]]\nidentity = \"uri:x" + std::to_string(i) + "\"\nwrite = [\"a\"]\n";
  check_error(many, "receive.toml:1: access", "more than 1024 entries");
}
