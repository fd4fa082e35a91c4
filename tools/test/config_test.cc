// Unit tests of the agent config parser: one case per rule, each checking the message names
// the file, the line and the key.
#include <catch2/catch.hpp>
#include <string>

#include "config.h"

using ferry::tools::AgentConfig;
using ferry::tools::parse_agent_config;
using ferry::tools::TargetKind;

namespace {

constexpr const char* kQmp = R"([[qmp]]
socket = "/run/q.sock"
disks = ["n0=vda", "n1"]
to = "10.0.0.5:7000"
group = "vm1"
interval_seconds = 60
)";

// The error message of parsing `text`, which must fail.
std::string error_of(const std::string& text) {
  auto r = parse_agent_config(text, "agent.toml");
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == ferry::Errc::invalid_argument);
  return r.status().message();
}

void check_error(const std::string& text, const std::string& where_key,
                 const std::string& what) {
  const std::string m = error_of(text);
  INFO(m);
  CHECK(m.rfind(where_key, 0) == 0);  // starts with "agent.toml:LINE: key"
  CHECK(m.find(what) != std::string::npos);
}

}  // namespace

TEST_CASE("a full config parses with defaults filled in", "[config]") {
  auto r = parse_agent_config(std::string(R"(state_dir = "/srv/ferry"
status_socket = "/run/ferry/a.sock"
log_level = "debug"

[[domain]]
name = "web1"
to = "[::1]:7000"
interval_seconds = 300
quiesce = true

[[domain]]
name = "db"
uri = "qemu+ssh://h/system"
group = "db-group"
to = "replica.example:7001"
interval_seconds = 30
rpo_alert_seconds = 45

)") + kQmp, "agent.toml");
  REQUIRE(r.is_ok());
  const AgentConfig& c = *r;
  CHECK(c.state_dir == "/srv/ferry");
  CHECK(c.status_socket == "/run/ferry/a.sock");
  CHECK(c.log_level == "debug");
  REQUIRE(c.targets.size() == 3);
  CHECK(c.targets[0].kind == TargetKind::libvirt_domain);
  CHECK(c.targets[0].group == "web1");  // defaults to the domain name
  CHECK(c.targets[0].uri == "qemu:///system");
  CHECK(c.targets[0].quiesce);
  CHECK(c.targets[0].rpo_alert_seconds == 900);  // 3 x interval
  CHECK(c.targets[0].line == 5);
  CHECK(c.targets[1].group == "db-group");
  CHECK(c.targets[1].rpo_alert_seconds == 45);
  CHECK(c.targets[2].kind == TargetKind::qmp);
  REQUIRE(c.targets[2].disks.size() == 2);
  CHECK(c.targets[2].disks[0].node == "n0");
  CHECK(c.targets[2].disks[0].name == "vda");
  CHECK(c.targets[2].disks[1].name == "n1");  // NAME defaults to NODE
}

TEST_CASE("defaults of the global keys", "[config]") {
  auto r = parse_agent_config("", "agent.toml");
  REQUIRE(r.is_ok());
  CHECK(r->state_dir == "/var/lib/ferry");
  CHECK(r->status_socket == "/run/ferry/agent.sock");
  CHECK(r->log_level == "info");
  CHECK(r->event_log_bytes == ferry::tools::kDefaultEventLogBytes);
  CHECK(r->targets.empty());
}

TEST_CASE("event_log_bytes: bytes per event log file, bounded", "[config]") {
  auto r = parse_agent_config("event_log_bytes = 65536\n", "agent.toml");
  REQUIRE(r.is_ok());
  CHECK(r->event_log_bytes == 65536);
  check_error("event_log_bytes = 100\n", "agent.toml:1: event_log_bytes", "");
  check_error("event_log_bytes = \"4M\"\n", "agent.toml:1: event_log_bytes", "");
}

TEST_CASE("syntax errors name the line and column", "[config]") {
  const std::string m = error_of("state_dir = \"/x\"\nbad = = 3\n");
  INFO(m);
  CHECK(m.rfind("agent.toml:2:", 0) == 0);
}

TEST_CASE("unknown keys are refused, at top level and in targets", "[config]") {
  check_error("state_dirr = \"/x\"\n", "agent.toml:1: state_dirr", "unknown key");
  check_error(std::string(kQmp) + "quiesce = true\n", "agent.toml:7: quiesce", "unknown key");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 1\nsocket = \"/s\"\n",
              "agent.toml:5: socket", "unknown key");
  check_error("[ferry]\nx = 1\n", "agent.toml:1: ferry", "unknown key");
}

TEST_CASE("wrong types are refused", "[config]") {
  check_error("state_dir = 3\n", "agent.toml:1: state_dir", "must be a string");
  check_error("log_level = true\n", "agent.toml:1: log_level", "must be a string");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = \"60\"\n",
              "agent.toml:4: interval_seconds", "must be an integer");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 6.5\n",
              "agent.toml:4: interval_seconds", "must be an integer");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 6\nquiesce = 1\n",
              "agent.toml:5: quiesce", "true or false");
  check_error("[[qmp]]\nsocket = \"/s\"\ndisks = \"n0\"\nto = \"h:1\"\ngroup = \"g\"\n"
              "interval_seconds = 5\n",
              "agent.toml:3: disks", "must be an array");
  check_error("[[qmp]]\nsocket = \"/s\"\ndisks = [1]\nto = \"h:1\"\ngroup = \"g\"\n"
              "interval_seconds = 5\n",
              "agent.toml:3: disks", "\"NODE=NAME\" string");
  check_error("domain = \"web\"\n", "agent.toml:1: domain", "[[domain]]");
  check_error("[domain]\nname = \"web\"\n", "agent.toml:1: domain", "[[domain]]");
}

TEST_CASE("missing required keys are named", "[config]") {
  check_error("[[domain]]\nto = \"h:1\"\ninterval_seconds = 60\n", "agent.toml:1: name",
              "missing");
  check_error("[[domain]]\nname = \"a\"\ninterval_seconds = 60\n", "agent.toml:1: to",
              "missing");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\n", "agent.toml:1: interval_seconds",
              "missing");
  check_error("\n[[qmp]]\nsocket = \"/s\"\ndisks = [\"n\"]\nto = \"h:1\"\ninterval_seconds = 5\n",
              "agent.toml:2: group", "missing");
  check_error("[[qmp]]\nsocket = \"/s\"\nto = \"h:1\"\ngroup = \"g\"\ninterval_seconds = 5\n",
              "agent.toml:1: disks", "missing");
  check_error("[[qmp]]\ndisks = [\"n\"]\nto = \"h:1\"\ngroup = \"g\"\ninterval_seconds = 5\n",
              "agent.toml:1: socket", "missing");
}

TEST_CASE("duplicate groups, QMP sockets and domains are refused", "[config]") {
  std::string two = std::string(kQmp) + "\n" + kQmp;
  check_error(two, "agent.toml:8: group", "used by two targets");
  std::string same_socket = std::string(kQmp) + "\n" + kQmp;
  same_socket.replace(same_socket.rfind("vm1"), 3, "vm2");
  check_error(same_socket, "agent.toml:8: socket", "serves one client");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 60\n"
              "[[qmp]]\nsocket = \"/s\"\ndisks = [\"n\"]\nto = \"h:1\"\ngroup = \"a\"\n"
              "interval_seconds = 5\n",
              "agent.toml:5: group", "'a' is used by two targets");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 60\n"
              "[[domain]]\nname = \"a\"\ngroup = \"b\"\nto = \"h:1\"\ninterval_seconds = 60\n",
              "agent.toml:5: name", "listed twice");
}

TEST_CASE("bad endpoints are refused", "[config]") {
  for (const char* to : {"nohost", ":7000", "h:", "h:0", "h:65536", "h:70x", "::1:7000",
                         "[::1]7000", "[::1]:", "h o:1", "[::1"}) {
    INFO(to);
    check_error(std::string("[[domain]]\nname = \"a\"\nto = \"") + to +
                    "\"\ninterval_seconds = 60\n",
                "agent.toml:3: to", to);
  }
  for (const char* to : {"h:1", "10.0.0.1:65535", "[fe80::1%eth0]:7000", "a-b.c_d:80"}) {
    INFO(to);
    CHECK(ferry::tools::check_endpoint_syntax(to).is_ok());
  }
}

TEST_CASE("values out of bounds are refused", "[config]") {
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 0\n",
              "agent.toml:4: interval_seconds", "from 1 to");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 999999999\n",
              "agent.toml:4: interval_seconds", "from 1 to");
  check_error("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 9\n"
              "rpo_alert_seconds = -1\n",
              "agent.toml:5: rpo_alert_seconds", "from 1 to");
  check_error("log_level = \"loud\"\n", "agent.toml:1: log_level", "not one of");
  check_error("state_dir = \"relative/dir\"\n", "agent.toml:1: state_dir", "absolute");
  check_error("status_socket = \"/" + std::string(200, 's') + "\"\n",
              "agent.toml:1: status_socket", "longer than 107");
  check_error("[[domain]]\nname = \"" + std::string(65, 'n') +
                  "\"\nto = \"h:1\"\ninterval_seconds = 9\n",
              "agent.toml:2: name", "longer than 64");
  check_error("state_dir = \"\"\n", "agent.toml:1: state_dir", "empty");
  check_error("state_dir = \"/a\\u0001b\"\n", "agent.toml:1: state_dir", "control character");
}

TEST_CASE("names and disk specs are checked", "[config]") {
  check_error("[[domain]]\nname = \"a b\"\nto = \"h:1\"\ninterval_seconds = 9\n",
              "agent.toml:2: name", "set group");
  check_error("[[domain]]\nname = \"a\"\ngroup = \"../x\"\nto = \"h:1\"\ninterval_seconds = 9\n",
              "agent.toml:3: group", "letters, digits");
  check_error("[[qmp]]\nsocket = \"/s\"\ndisks = []\nto = \"h:1\"\ngroup = \"g\"\n"
              "interval_seconds = 5\n",
              "agent.toml:3: disks", "at least one");
  check_error("[[qmp]]\nsocket = \"/s\"\ndisks = [\"n=\"]\nto = \"h:1\"\ngroup = \"g\"\n"
              "interval_seconds = 5\n",
              "agent.toml:3: disks", "NODE[=NAME]");
  check_error("[[qmp]]\nsocket = \"/s\"\ndisks = [\"n=a\", \"m=a\"]\nto = \"h:1\"\n"
              "group = \"g\"\ninterval_seconds = 5\n",
              "agent.toml:3: disks", "twice");
  check_error("[[qmp]]\nsocket = \"s\"\ndisks = [\"n\"]\nto = \"h:1\"\ngroup = \"g\"\n"
              "interval_seconds = 5\n",
              "agent.toml:2: socket", "absolute");
}

TEST_CASE("counts and sizes are bounded", "[config]") {
  std::string many;
  for (std::size_t i = 0; i <= ferry::tools::kMaxTargets; ++i)
    many += "[[domain]]\nname = \"d" + std::to_string(i) + "\"\nto = \"h:1\"\ninterval_seconds = 9\n";
  check_error(many, "agent.toml:1025: domain", "more than 256 targets");
  std::string disks = "[[qmp]]\nsocket = \"/s\"\nto = \"h:1\"\ngroup = \"g\"\n"
                      "interval_seconds = 5\ndisks = [";
  for (std::size_t i = 0; i <= ferry::tools::kMaxDisksPerTarget; ++i)
    disks += "\"n" + std::to_string(i) + "\",";
  check_error(disks + "]\n", "agent.toml:6: disks", "more than 64 disks");
  const std::string m = error_of(std::string(ferry::tools::kMaxConfigBytes + 1, '#'));
  CHECK(m.find("larger than") != std::string::npos);
}

TEST_CASE("same_source tells schedule changes from source changes", "[config]") {
  auto a = parse_agent_config(kQmp, "a.toml");
  REQUIRE(a.is_ok());
  auto b = *a;
  b.targets[0].interval_seconds = 5;
  b.targets[0].rpo_alert_seconds = 7;
  b.targets[0].line = 40;
  CHECK(a->targets[0].same_source(b.targets[0]));
  b.targets[0].to = "h:2";
  CHECK_FALSE(a->targets[0].same_source(b.targets[0]));
  auto c = *a;
  c.targets[0].disks.pop_back();
  CHECK_FALSE(a->targets[0].same_source(c.targets[0]));
}

TEST_CASE("load_agent_config names a missing file", "[config]") {
  auto r = ferry::tools::load_agent_config("/nonexistent/ferry/agent.toml");
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().message().find("/nonexistent/ferry/agent.toml") != std::string::npos);
}

TEST_CASE("tls_cert, tls_key, tls_ca: all three or none, copied into every target", "[config]") {
  const std::string target = "[[qmp]]\nsocket = \"/run/q.qmp\"\ndisks = [\"n=vda\"]\n"
                             "to = \"replica.example:7000\"\ngroup = \"g\"\ninterval_seconds = 60\n";
  auto ok = ferry::tools::parse_agent_config(
      "tls_cert = \"/etc/ferry/s.pem\"\ntls_key = \"/etc/ferry/s.key\"\ntls_ca = \"/etc/ferry/ca.pem\"\n"
      "tls_server_name = \"replica.example\"\n" + target +
      "tls_server_name = \"other.example\"\n", "agent.toml");
  INFO(ok.status().to_string());
  REQUIRE(ok.is_ok());
  REQUIRE(ok->targets.size() == 1);
  CHECK(ok->targets[0].tls_cert == "/etc/ferry/s.pem");
  CHECK(ok->targets[0].tls_key == "/etc/ferry/s.key");
  CHECK(ok->targets[0].tls_ca == "/etc/ferry/ca.pem");
  CHECK(ok->targets[0].tls_server_name == "other.example");
  auto plain = ferry::tools::parse_agent_config(target, "agent.toml");
  REQUIRE(plain.is_ok());
  CHECK(plain->targets[0].tls_cert.empty());

  auto half = ferry::tools::parse_agent_config("tls_cert = \"/etc/ferry/s.pem\"\n" + target,
                                               "agent.toml");
  REQUIRE_FALSE(half.is_ok());
  CHECK_THAT(half.status().message(), Catch::Contains("tls_key"));
  CHECK_THAT(half.status().message(), Catch::Contains("go together"));
  auto rel = ferry::tools::parse_agent_config(
      "tls_cert = \"s.pem\"\ntls_key = \"/s.key\"\ntls_ca = \"/ca.pem\"\n" + target, "agent.toml");
  REQUIRE_FALSE(rel.is_ok());
  CHECK_THAT(rel.status().message(), Catch::Contains("agent.toml:1: tls_cert: must be an absolute path"));
  auto stray = ferry::tools::parse_agent_config(target + "tls_server_name = \"x\"\n", "agent.toml");
  REQUIRE_FALSE(stray.is_ok());
  CHECK_THAT(stray.status().message(), Catch::Contains("tls_server_name"));
}

TEST_CASE("metrics: an ADDR:PORT, absent by default", "[config]") {
  auto r = parse_agent_config("metrics = \"127.0.0.1:9464\"\n", "agent.toml");
  REQUIRE(r.is_ok());
  CHECK(r->metrics == "127.0.0.1:9464");
  CHECK(parse_agent_config("", "agent.toml")->metrics.empty());
  check_error("metrics = \"127.0.0.1\"\n", "agent.toml:1: metrics", "HOST:PORT");
  check_error("metrics = 9464\n", "agent.toml:1: metrics", "string");
}

TEST_CASE("a [[domain]] target of several domains is a protection group", "[config]") {
  auto r = parse_agent_config("[[domain]]\nnames = [\"db\", \"web\"]\ngroup = \"app\"\n"
                              "boot_order = [\"web\", \"db\"]\nmax_pause_ms = 800\n"
                              "to = \"h:1\"\ninterval_seconds = 60\n",
                              "agent.toml");
  REQUIRE(r.is_ok());
  const auto& t = r->targets.at(0);
  CHECK(t.domains == std::vector<std::string>{"db", "web"});
  CHECK(t.domain == "db,web");
  CHECK(t.group == "app");
  CHECK(t.boot_order == std::vector<std::string>{"web", "db"});
  CHECK(t.max_pause_ms == 800);
  auto one = parse_agent_config("[[domain]]\nname = \"a\"\nto = \"h:1\"\ninterval_seconds = 60\n",
                                "agent.toml");
  REQUIRE(one.is_ok());
  CHECK(one->targets.at(0).domains == std::vector<std::string>{"a"});
  CHECK(one->targets.at(0).max_pause_ms == ferry::tools::kDefaultMaxPauseMs);

  const std::string tail = "to = \"h:1\"\ninterval_seconds = 60\n";
  check_error("[[domain]]\nnames = [\"a\", \"b\"]\n" + tail, "agent.toml:2: group", "needs group");
  check_error("[[domain]]\nname = \"a\"\nnames = [\"a\", \"b\"]\ngroup = \"g\"\n" + tail,
              "agent.toml:3: names", "not both");
  check_error("[[domain]]\nnames = [\"a\", \"a\"]\ngroup = \"g\"\n" + tail, "agent.toml:2: names",
              "listed twice");
  check_error("[[domain]]\nnames = []\ngroup = \"g\"\n" + tail, "agent.toml:2: names", "non-empty");
  check_error("[[domain]]\nnames = [\"a\", \"b\"]\ngroup = \"g\"\nboot_order = [\"a\"]\n" + tail,
              "agent.toml:4: boot_order", "every domain");
  check_error("[[domain]]\nnames = [\"a\", \"b\"]\ngroup = \"g\"\nmax_pause_ms = 0\n" + tail,
              "agent.toml:4: max_pause_ms", "");
  check_error("[[domain]]\nnames = [\"a\", \"b\"]\ngroup = \"g\"\n" + tail +
                  "[[domain]]\nname = \"b\"\n" + tail,
              "agent.toml:6: name", "listed twice");
}
