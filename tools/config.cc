// The agent config parser. toml++ throws on syntax errors; that exception is caught here, at
// the edge, and becomes a Status naming file:line:column. Every other rule is checked
// explicitly and reported as "file:line: key: what is wrong".
#include "config.h"
#include "toml_check.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <fstream>
#include <set>
#include <sstream>
#include <toml++/toml.h>

namespace ferry::tools {
namespace {

using Checker = TomlChecker;

bool valid_name(std::string_view s) {
  if (s.empty() || s.size() > kMaxNameBytes || s[0] == '.' || s[0] == '-') return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

Status name_field(const Checker& c, const toml::table& t, std::string_view key, bool required,
                  std::string* out) {
  FERRY_TRY(c.string(t, key, required, kMaxNameBytes, out));
  if (!out->empty() && !valid_name(*out))
    return c.error(Checker::line_of(*t.get(key)), key,
                   "'" + *out + "' must be letters, digits, '.', '_' or '-' (not first)");
  return Status::ok();
}

Status absolute_path(const Checker& c, const toml::table& t, std::string_view key,
                     bool required, std::size_t max_bytes, std::string* out) {
  FERRY_TRY(c.string(t, key, required, max_bytes, out));
  if (!out->empty() && (*out)[0] != '/')
    return c.error(Checker::line_of(*t.get(key)), key, "must be an absolute path");
  return Status::ok();
}

Status endpoint_field(const Checker& c, const toml::table& t, std::string* out) {
  FERRY_TRY(c.string(t, "to", true, 300, out));
  Status s = check_endpoint_syntax(*out);
  if (!s.is_ok()) return c.error(Checker::line_of(*t.get("to")), "to", s.message());
  return Status::ok();
}

Status schedule_fields(const Checker& c, const toml::table& t, TargetConfig* tc) {
  FERRY_TRY(c.integer(t, "interval_seconds", true, 1, kMaxIntervalSeconds, &tc->interval_seconds));
  tc->rpo_alert_seconds = std::min(3 * tc->interval_seconds, kMaxRpoAlertSeconds);
  return c.integer(t, "rpo_alert_seconds", false, 1, kMaxRpoAlertSeconds, &tc->rpo_alert_seconds);
}

Status parse_disks(const Checker& c, const toml::table& t, TargetConfig* tc) {
  const toml::node* n = t.get("disks");
  if (n == nullptr) return c.error(Checker::line_of(t), "disks", "missing (required)");
  const auto* arr = n->as_array();
  const std::uint32_t line = Checker::line_of(*n);
  if (arr == nullptr) return c.error(line, "disks", "must be an array of \"NODE=NAME\" strings");
  if (arr->empty()) return c.error(line, "disks", "must name at least one disk");
  if (arr->size() > kMaxDisksPerTarget)
    return c.error(line, "disks", "more than " + std::to_string(kMaxDisksPerTarget) + " disks");
  for (const auto& e : *arr) {
    const auto* s = e.as_string();
    if (s == nullptr) return c.error(line, "disks", "every entry must be a \"NODE=NAME\" string");
    const std::string& spec = s->get();
    auto eq = spec.find('=');
    DiskSpec d{spec.substr(0, eq), eq == std::string::npos ? spec.substr(0, eq) : spec.substr(eq + 1)};
    if (!valid_name(d.node) || !valid_name(d.name))
      return c.error(line, "disks", "'" + spec + "' is not NODE[=NAME] (names: letters, digits, "
                                     "'.', '_', '-', at most " + std::to_string(kMaxNameBytes) +
                                     " bytes)");
    for (const auto& o : tc->disks)
      if (o.node == d.node || o.name == d.name)
        return c.error(line, "disks", "'" + spec + "' names a node or disk twice");
    tc->disks.push_back(std::move(d));
  }
  return Status::ok();
}

// An array of names (domains of a group, a boot order): each a valid name, none twice.
Status name_list(const Checker& c, const toml::table& t, std::string_view key,
                 std::vector<std::string>* out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return Status::ok();
  const std::uint32_t line = Checker::line_of(*n);
  const auto* arr = n->as_array();
  if (arr == nullptr || arr->empty())
    return c.error(line, key, "must be a non-empty array of domain names");
  if (arr->size() > kMaxDomainsPerGroup)
    return c.error(line, key, "more than " + std::to_string(kMaxDomainsPerGroup) + " domains");
  for (const auto& e : *arr) {
    const auto* s = e.as_string();
    if (s == nullptr || !valid_name(s->get()))
      return c.error(line, key, "every entry must be a domain name (letters, digits, '.', '_', "
                                "'-', at most " + std::to_string(kMaxNameBytes) + " bytes)");
    if (std::find(out->begin(), out->end(), s->get()) != out->end())
      return c.error(line, key, "'" + s->get() + "' is listed twice");
    out->push_back(s->get());
  }
  return Status::ok();
}

// `name = "vm"` (one VM) or `names = ["a", "b"]` with `group` (a protection group captured
// at one instant per RP), `boot_order` and `max_pause_ms` for groups.
Status domain_names(const Checker& c, const toml::table& t, TargetConfig* tc) {
  if (t.get("name") == nullptr && t.get("names") == nullptr)
    return c.error(Checker::line_of(t), "name",
                   "missing (required): name = \"VM\", or names = [...] for a group");
  if (t.get("name") != nullptr && t.get("names") != nullptr)
    return c.error(Checker::line_of(*t.get("names")), "names", "set name or names, not both");
  if (t.get("name") != nullptr) {
    FERRY_TRY(c.string(t, "name", true, kMaxNameBytes, &tc->domain));
    tc->domains = {tc->domain};
  } else {
    FERRY_TRY(name_list(c, t, "names", &tc->domains));
    if (t.get("group") == nullptr)
      return c.error(Checker::line_of(*t.get("names")), "group",
                     "a target of several domains needs group = \"...\"");
    tc->domain = tc->domains.front();
    for (std::size_t i = 1; i < tc->domains.size(); ++i) tc->domain += "," + tc->domains[i];
  }
  FERRY_TRY(name_list(c, t, "boot_order", &tc->boot_order));
  if (!tc->boot_order.empty()) {
    std::vector<std::string> a = tc->boot_order, b = tc->domains;
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    if (a != b)
      return c.error(Checker::line_of(*t.get("boot_order")), "boot_order",
                     "must name every domain of the target exactly once");
  }
  return c.integer(t, "max_pause_ms", false, 1, kMaxPauseMs, &tc->max_pause_ms);
}

Result<TargetConfig> parse_domain(const Checker& c, const toml::table& t) {
  FERRY_TRY(c.only_keys(t, {"name", "names", "boot_order", "max_pause_ms", "uri", "to",
                            "interval_seconds", "quiesce", "group", "rpo_alert_seconds",
                            "tls_server_name"}, "[[domain]]"));
  TargetConfig tc;
  tc.kind = TargetKind::libvirt_domain;
  tc.line = Checker::line_of(t);
  FERRY_TRY(domain_names(c, t, &tc));
  tc.uri = "qemu:///system";
  FERRY_TRY(c.string(t, "uri", false, kMaxUriBytes, &tc.uri));
  FERRY_TRY(endpoint_field(c, t, &tc.to));
  FERRY_TRY(schedule_fields(c, t, &tc));
  FERRY_TRY(c.boolean(t, "quiesce", &tc.quiesce));
  FERRY_TRY(c.string(t, "tls_server_name", false, kMaxServerNameBytes, &tc.tls_server_name));
  tc.group = tc.domain;
  if (t.get("group") != nullptr) {
    FERRY_TRY(name_field(c, t, "group", false, &tc.group));
  } else if (!valid_name(tc.group)) {
    return c.error(Checker::line_of(*t.get("name")), "name",
                   "'" + tc.domain + "' is not a valid group name; set group = \"...\"");
  }
  return tc;
}

Result<TargetConfig> parse_qmp(const Checker& c, const toml::table& t) {
  FERRY_TRY(c.only_keys(t, {"socket", "disks", "to", "group", "interval_seconds",
                            "rpo_alert_seconds", "tls_server_name"}, "[[qmp]]"));
  TargetConfig tc;
  tc.kind = TargetKind::qmp;
  tc.line = Checker::line_of(t);
  FERRY_TRY(absolute_path(c, t, "socket", true, kMaxSocketPathBytes, &tc.qmp_socket));
  FERRY_TRY(parse_disks(c, t, &tc));
  FERRY_TRY(endpoint_field(c, t, &tc.to));
  FERRY_TRY(name_field(c, t, "group", true, &tc.group));
  FERRY_TRY(schedule_fields(c, t, &tc));
  FERRY_TRY(c.string(t, "tls_server_name", false, kMaxServerNameBytes, &tc.tls_server_name));
  return tc;
}

// [[domain]] / [[qmp]]: an array of tables, appended to cfg->targets.
Status parse_targets(const Checker& c, const toml::table& root, std::string_view key,
                     AgentConfig* cfg) {
  const toml::node* n = root.get(key);
  if (n == nullptr) return Status::ok();
  const auto* arr = n->as_array();
  if (arr == nullptr || !arr->is_array_of_tables())
    return c.error(Checker::line_of(*n), key, "must be tables written as [[" + std::string(key) + "]]");
  for (const auto& e : *arr) {
    if (cfg->targets.size() >= kMaxTargets)
      return c.error(Checker::line_of(e), key,
                     "more than " + std::to_string(kMaxTargets) + " targets");
    const toml::table& t = *e.as_table();
    auto tc = key == "domain" ? parse_domain(c, t) : parse_qmp(c, t);
    if (!tc.is_ok()) return tc.status();
    cfg->targets.push_back(std::move(*tc));
  }
  return Status::ok();
}

// Rules across targets: one worker per group, one client per QMP socket, one per domain.
Status check_unique(const Checker& c, const AgentConfig& cfg) {
  std::set<std::string> groups, sockets, domains;
  for (const auto& t : cfg.targets) {
    if (!groups.insert(t.group).second)
      return c.error(t.line, "group", "'" + t.group + "' is used by two targets");
    if (t.kind == TargetKind::qmp && !sockets.insert(t.qmp_socket).second)
      return c.error(t.line, "socket",
                     "'" + t.qmp_socket + "' is used by two targets (a QMP socket serves one client)");
    if (t.kind != TargetKind::libvirt_domain) continue;
    for (const std::string& d : t.domains)
      if (!domains.insert(t.uri + " " + d).second)
        return c.error(t.line, "name", "domain '" + d + "' at " + t.uri + " is listed twice");
  }
  return Status::ok();
}

// tls_cert, tls_key, tls_ca: all three or none (the files themselves are checked when a
// target connects, by TlsConfig::load, so a rotated file is read at the next RP).
Status parse_tls(const Checker& c, const toml::table& root, AgentConfig* cfg) {
  FERRY_TRY(absolute_path(c, root, "tls_cert", false, kMaxPathBytes, &cfg->tls_cert));
  FERRY_TRY(absolute_path(c, root, "tls_key", false, kMaxPathBytes, &cfg->tls_key));
  FERRY_TRY(absolute_path(c, root, "tls_ca", false, kMaxPathBytes, &cfg->tls_ca));
  FERRY_TRY(c.string(root, "tls_server_name", false, kMaxServerNameBytes, &cfg->tls_server_name));
  const int given = int(!cfg->tls_cert.empty()) + int(!cfg->tls_key.empty()) +
                    int(!cfg->tls_ca.empty());
  if (given != 0 && given != 3) {
    const char* key = cfg->tls_cert.empty() ? "tls_cert" : cfg->tls_key.empty() ? "tls_key" : "tls_ca";
    return c.error(Checker::line_of(root), key,
                   "missing: tls_cert, tls_key and tls_ca go together (all three, or none for "
                   "plaintext to a receiver on loopback)");
  }
  if (given == 0 && !cfg->tls_server_name.empty())
    return c.error(Checker::line_of(*root.get("tls_server_name")), "tls_server_name",
                   "given without tls_cert, tls_key and tls_ca");
  for (TargetConfig& t : cfg->targets) {
    if (given == 0 && !t.tls_server_name.empty())
      return c.error(t.line, "tls_server_name", "given without tls_cert, tls_key and tls_ca at "
                                                "the top level");
    t.tls_cert = cfg->tls_cert;
    t.tls_key = cfg->tls_key;
    t.tls_ca = cfg->tls_ca;
    if (t.tls_server_name.empty()) t.tls_server_name = cfg->tls_server_name;
  }
  return Status::ok();
}

Result<AgentConfig> check_root(const Checker& c, const toml::table& root) {
  FERRY_TRY(c.only_keys(root, {"state_dir", "status_socket", "log_level", "domain", "qmp",
                               "tls_cert", "tls_key", "tls_ca", "tls_server_name", "metrics",
                               "event_log_bytes"},
                        "the top level"));
  AgentConfig cfg;
  FERRY_TRY(absolute_path(c, root, "state_dir", false, kMaxPathBytes, &cfg.state_dir));
  FERRY_TRY(absolute_path(c, root, "status_socket", false, kMaxSocketPathBytes, &cfg.status_socket));
  FERRY_TRY(c.string(root, "log_level", false, 16, &cfg.log_level));
  FERRY_TRY(c.string(root, "metrics", false, 300, &cfg.metrics));
  if (!cfg.metrics.empty())
    if (Status s = check_endpoint_syntax(cfg.metrics); !s.is_ok())
      return c.error(Checker::line_of(*root.get("metrics")), "metrics", s.message());
  FERRY_TRY(c.integer(root, "event_log_bytes", false, kMinEventLogBytes, kMaxEventLogBytes,
                      &cfg.event_log_bytes));
  static const char* const kLevels[] = {"debug", "info", "warn", "error"};
  if (std::find(std::begin(kLevels), std::end(kLevels), cfg.log_level) == std::end(kLevels))
    return c.error(Checker::line_of(*root.get("log_level")), "log_level",
                   "'" + cfg.log_level + "' is not one of debug, info, warn, error");
  FERRY_TRY(parse_targets(c, root, "domain", &cfg));
  FERRY_TRY(parse_targets(c, root, "qmp", &cfg));
  FERRY_TRY(check_unique(c, cfg));
  FERRY_TRY(parse_tls(c, root, &cfg));
  return cfg;
}

}  // namespace

const char* target_kind_name(TargetKind kind) {
  return kind == TargetKind::libvirt_domain ? "domain" : "qmp";
}

bool TargetConfig::same_source(const TargetConfig& o) const {
  return kind == o.kind && group == o.group && to == o.to && domain == o.domain &&
         uri == o.uri && quiesce == o.quiesce && domains == o.domains &&
         boot_order == o.boot_order && max_pause_ms == o.max_pause_ms && qmp_socket == o.qmp_socket && disks == o.disks &&
         tls_cert == o.tls_cert && tls_key == o.tls_key && tls_ca == o.tls_ca &&
         tls_server_name == o.tls_server_name;
}

Status check_endpoint_syntax(std::string_view text) {
  const std::string t(text);
  std::string host, port;
  if (!t.empty() && t[0] == '[') {
    auto close = t.find(']');
    if (close == std::string::npos || close + 1 >= t.size() || t[close + 1] != ':')
      return Status::error(Errc::invalid_argument, "'" + t + "' is not [V6]:PORT");
    host = t.substr(1, close - 1);
    port = t.substr(close + 2);
  } else {
    auto colon = t.rfind(':');
    if (colon == std::string::npos || t.find(':') != colon)
      return Status::error(Errc::invalid_argument,
                           "'" + t + "' is not HOST:PORT (IPv6: [ADDR]:PORT)");
    host = t.substr(0, colon);
    port = t.substr(colon + 1);
  }
  if (host.empty() || host.size() > 253)
    return Status::error(Errc::invalid_argument, "'" + t + "' has no host");
  for (char ch : host)
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '.' || ch == '-' || ch == '_' ||
          ch == ':' || ch == '%'))
      return Status::error(Errc::invalid_argument, "'" + t + "': bad character in the host");
  if (port.empty() || port.size() > 5 ||
      !std::all_of(port.begin(), port.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
    return Status::error(Errc::invalid_argument, "'" + t + "': the port must be a number");
  const long p = std::stol(port);
  if (p < 1 || p > 65535)
    return Status::error(Errc::invalid_argument, "'" + t + "': the port must be 1..65535");
  return Status::ok();
}

Result<AgentConfig> parse_agent_config(std::string_view text, const std::string& file_name) {
  const Checker c(file_name);
  if (text.size() > kMaxConfigBytes)
    return Status::error(Errc::invalid_argument,
                         file_name + ": larger than " + std::to_string(kMaxConfigBytes) + " bytes");
  try {
    toml::table root = toml::parse(text, file_name);
    return check_root(c, root);
  } catch (const toml::parse_error& e) {
    const auto& b = e.source().begin;
    return Status::error(Errc::invalid_argument, file_name + ":" + std::to_string(b.line) + ":" +
                                                     std::to_string(b.column) + ": " +
                                                     std::string(e.description()));
  } catch (const std::exception& e) {  // allocation failure and the like: still an edge
    return Status::error(Errc::invalid_argument, file_name + ": " + e.what());
  }
}

Result<AgentConfig> load_agent_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::from_errno(errno, "cannot open config " + path);
  std::string text(kMaxConfigBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (in.bad()) return Status::from_errno(errno, "cannot read config " + path);
  text.resize(static_cast<std::size_t>(in.gcount()));
  return parse_agent_config(text, path);
}

}  // namespace ferry::tools
