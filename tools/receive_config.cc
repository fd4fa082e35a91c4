// The receiver config parser (receive_config.h). toml++ throws on syntax errors; that is caught
// here, at the edge, and becomes a Status naming file:line:column. Every other rule is checked
// explicitly, with the agent config's TomlChecker.
#include "receive_config.h"

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <fstream>
#include <string>

#include "ferry/site/store.h"
#include "toml_check.h"

namespace ferry::tools {
namespace {

using site::RetentionPolicy;

// A name as a message may show it: at most 64 bytes, control characters as '?'.
std::string shown(std::string_view name) {
  std::string out(name.substr(0, 64));
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  return name.size() > 64 ? out + "..." : out;
}

Status count_field(const TomlChecker& c, const toml::table& t, std::string_view key,
                   std::optional<std::uint32_t>* out) {
  if (t.get(key) == nullptr) return Status::ok();
  std::int64_t v = 0;
  FERRY_TRY(c.integer(t, key, false, 1, site::kMaxRetentionCount, &v));
  *out = static_cast<std::uint32_t>(v);
  return Status::ok();
}

Status within_field(const TomlChecker& c, const toml::table& t, RetentionPolicy* p) {
  const toml::node* n = t.get("keep-within");
  if (n == nullptr) return Status::ok();
  if (n->as_string() == nullptr)
    return c.error(TomlChecker::line_of(*n), "keep-within", "must be a string such as \"6h\"");
  auto d = site::parse_retention_duration(n->as_string()->get());
  if (!d.is_ok()) return c.error(TomlChecker::line_of(*n), "keep-within", d.status().message());
  p->keep_within = *d;
  return Status::ok();
}

// A [retention] or [group.NAME.retention] table; `where` names it in messages.
Result<RetentionPolicy> parse_retention(const TomlChecker& c, const toml::node& n,
                                        const std::string& where, std::string_view key) {
  const toml::table* t = n.as_table();
  if (t == nullptr)
    return c.error(TomlChecker::line_of(n), key, "must be a table, written as " + where);
  FERRY_TRY(c.only_keys(*t, {"keep-last", "keep-hourly", "keep-daily", "keep-weekly",
                             "keep-within"}, where));
  RetentionPolicy p;
  FERRY_TRY(count_field(c, *t, "keep-last", &p.keep_last));
  FERRY_TRY(count_field(c, *t, "keep-hourly", &p.keep_hourly));
  FERRY_TRY(count_field(c, *t, "keep-daily", &p.keep_daily));
  FERRY_TRY(count_field(c, *t, "keep-weekly", &p.keep_weekly));
  FERRY_TRY(within_field(c, *t, &p));
  FERRY_ASSERT(site::check_retention(p).is_ok());
  return p;
}

// A size written as a string ("200G", "1.5T", "4096"; binary units) or a plain integer.
Status size_field(const TomlChecker& c, const toml::node& n, std::string_view key,
                  std::uint64_t* out) {
  if (const auto* i = n.as_integer()) {
    if (i->get() < 0) return c.error(TomlChecker::line_of(n), key, "must not be negative");
    *out = static_cast<std::uint64_t>(i->get());
    return Status::ok();
  }
  const auto* s = n.as_string();
  if (s == nullptr)
    return c.error(TomlChecker::line_of(n), key, "must be a size such as \"200G\" (binary units)");
  auto v = parse_byte_size(s->get());
  if (!v.is_ok()) return c.error(TomlChecker::line_of(n), key, v.status().message());
  *out = *v;
  return Status::ok();
}

// A list of group patterns (access.h) under `key` of an [[access]] entry.
Status pattern_list(const TomlChecker& c, const toml::table& t, std::string_view key,
                    std::vector<std::string>* out) {
  const toml::node* n = t.get(key);
  if (n == nullptr) return Status::ok();
  const toml::array* a = n->as_array();
  if (a == nullptr)
    return c.error(TomlChecker::line_of(*n), key, "must be a list of groups, e.g. [\"web01\", \"db-*\"]");
  if (a->size() > kMaxAccessPatterns)
    return c.error(TomlChecker::line_of(*n), key,
                   "more than " + std::to_string(kMaxAccessPatterns) + " patterns");
  for (const toml::node& e : *a) {
    const auto* s = e.as_string();
    if (s == nullptr) return c.error(TomlChecker::line_of(e), key, "every entry must be a string");
    if (Status st = check_group_pattern(s->get()); !st.is_ok())
      return c.error(TomlChecker::line_of(e), key, st.message());
    out->push_back(s->get());
  }
  return Status::ok();
}

// [[access]] entries: one identity each, with the groups it may write and manage.
Status parse_access(const TomlChecker& c, const toml::node& n, ReceiveConfig* cfg) {
  const toml::array* entries = n.as_array();
  if (entries == nullptr || !entries->is_array_of_tables())
    return c.error(TomlChecker::line_of(n), "access", "must be tables, written as [[access]]");
  if (entries->size() > kMaxAccessEntries)
    return c.error(TomlChecker::line_of(n), "access",
                   "more than " + std::to_string(kMaxAccessEntries) + " entries");
  for (const toml::node& e : *entries) {
    const toml::table& t = *e.as_table();
    const std::uint32_t line = TomlChecker::line_of(t);
    FERRY_TRY(c.only_keys(t, {"identity", "write", "manage"}, "[[access]]"));
    AccessEntry entry;
    entry.line = line;
    std::string identity;
    FERRY_TRY(c.string(t, "identity", true, kMaxIdentityBytes, &identity));
    auto normal = normalise_identity(identity);
    if (!normal.is_ok())
      return c.error(TomlChecker::line_of(*t.get("identity")), "identity", normal.status().message());
    entry.identity = *normal;
    for (const AccessEntry& other : cfg->access.entries)
      if (other.identity == entry.identity)
        return c.error(line, "identity", "'" + entry.identity + "' already has an [[access]] entry "
                                         "(line " + std::to_string(other.line) + "): give it one");
    FERRY_TRY(pattern_list(c, t, "write", &entry.write));
    FERRY_TRY(pattern_list(c, t, "manage", &entry.manage));
    if (entry.write.empty() && entry.manage.empty())
      return c.error(line, "access", "the entry for '" + entry.identity +
                                         "' grants nothing: give write = [...] or manage = [...]");
    cfg->access.entries.push_back(std::move(entry));
  }
  return Status::ok();
}

// [quota]: the default quota of every group.
Status parse_quota(const TomlChecker& c, const toml::node& n, ReceiveConfig* cfg) {
  const toml::table* t = n.as_table();
  if (t == nullptr) return c.error(TomlChecker::line_of(n), "quota", "must be a table, written as [quota]");
  FERRY_TRY(c.only_keys(*t, {"default"}, "[quota]"));
  if (const toml::node* d = t->get("default"))
    FERRY_TRY(size_field(c, *d, "default", &cfg->default_quota_bytes));
  return Status::ok();
}

// [group.NAME] tables, each holding only a retention table.
Status parse_groups(const TomlChecker& c, const toml::node& n, ReceiveConfig* cfg) {
  const toml::table* groups = n.as_table();
  if (groups == nullptr)
    return c.error(TomlChecker::line_of(n), "group", "must be tables, written as [group.NAME]");
  for (const auto& [k, v] : *groups) {
    const std::string name(k.str());
    const std::string key = "group." + shown(name);
    const std::uint32_t line = TomlChecker::line_of(v);
    if (!site::valid_store_name(name))
      return c.error(line, key, "'" + shown(name) + "' is not a valid group name (" +
                                    site::kStoreNameRule + ")");
    if (cfg->groups.size() >= kMaxReceiveConfigGroups)
      return c.error(line, key, "more than " + std::to_string(kMaxReceiveConfigGroups) + " groups");
    const toml::table* g = v.as_table();
    if (g == nullptr) return c.error(line, key, "must be a table, written as [" + key + "]");
    FERRY_TRY(c.only_keys(*g, {"retention", "quota"}, "[" + key + "]"));
    if (const toml::node* q = g->get("quota")) {
      std::uint64_t bytes = 0;
      FERRY_TRY(size_field(c, *q, "quota", &bytes));
      cfg->quotas.emplace(name, bytes);
    }
    RetentionPolicy p;
    if (const toml::node* r = g->get("retention")) {
      auto parsed = parse_retention(c, *r, "[" + key + ".retention]", "retention");
      if (!parsed.is_ok()) return parsed.status();
      p = *parsed;
    }
    cfg->groups.emplace(name, p);
  }
  return Status::ok();
}

Result<ReceiveConfig> check_root(const TomlChecker& c, const toml::table& root) {
  FERRY_TRY(c.only_keys(root, {"retention", "group", "access", "quota", "metrics", "api"}, "the top level"));
  ReceiveConfig cfg;
  FERRY_TRY(c.string(root, "metrics", false, 300, &cfg.metrics));
  FERRY_TRY(c.string(root, "api", false, 300, &cfg.api));
  if (const toml::node* r = root.get("retention")) {
    auto parsed = parse_retention(c, *r, "[retention]", "retention");
    if (!parsed.is_ok()) return parsed.status();
    cfg.retention = *parsed;
  }
  if (const toml::node* g = root.get("group")) FERRY_TRY(parse_groups(c, *g, &cfg));
  if (const toml::node* a = root.get("access")) FERRY_TRY(parse_access(c, *a, &cfg));
  if (const toml::node* q = root.get("quota")) FERRY_TRY(parse_quota(c, *q, &cfg));
  return cfg;
}

}  // namespace

RetentionPolicy ReceiveConfig::for_group(const std::string& group) const {
  auto it = groups.find(group);
  if (it != groups.end() && !it->second.empty()) return it->second;
  return site::effective_retention(retention);
}

std::uint64_t ReceiveConfig::quota_for(const std::string& group) const {
  auto it = quotas.find(group);
  return it != quotas.end() ? it->second : default_quota_bytes;
}

Result<std::uint64_t> parse_byte_size(const std::string& text) {
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = text.substr(used);
  if (unit.size() > 1 && (unit.ends_with("iB") || unit.ends_with("B")))
    unit = unit.substr(0, unit.size() - (unit.ends_with("iB") ? 2 : 1));
  const std::string units = "KMGTPE";
  std::size_t pos = unit.size() == 1 ? units.find(char(std::toupper(unit[0]))) : std::string::npos;
  if (used == 0 || !(v >= 0) || (!unit.empty() && pos == std::string::npos))
    return Status::error(Errc::invalid_argument,
                         "'" + text.substr(0, 64) + "' is not a size (a number with an optional K, "
                         "M, G, T, P or E suffix, binary: 16T = 16 TiB)");
  double bytes = v;
  for (std::size_t i = 0; !unit.empty() && i <= pos; ++i) bytes *= 1024;
  if (bytes >= 18446744073709551615.0)
    return Status::error(Errc::invalid_argument, "'" + text.substr(0, 64) + "' is larger than 16 EiB");
  return static_cast<std::uint64_t>(bytes);
}

ReceiveConfig with_flags(ReceiveConfig config, const RetentionPolicy& flags) {
  if (config.retention.empty()) config.retention = flags;
  return config;
}

Result<ReceiveConfig> parse_receive_config(std::string_view text, std::string_view file_name) {
  const std::string file(file_name);
  if (text.size() > kMaxReceiveConfigBytes)
    return Status::error(Errc::invalid_argument, file + ": larger than " +
                                                     std::to_string(kMaxReceiveConfigBytes) +
                                                     " bytes");
  try {
    const TomlChecker c(file);
    toml::table root = toml::parse(text, file_name);
    return check_root(c, root);
  } catch (const toml::parse_error& e) {
    const auto& b = e.source().begin;
    return Status::error(Errc::invalid_argument, file + ":" + std::to_string(b.line) + ":" +
                                                     std::to_string(b.column) + ": " +
                                                     std::string(e.description()));
  } catch (const std::exception& e) {  // allocation failure and the like: still an edge
    return Status::error(Errc::invalid_argument, file + ": " + e.what());
  }
}

Result<ReceiveConfig> load_receive_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::from_errno(errno, "cannot open config " + path);
  std::string text(kMaxReceiveConfigBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (in.bad()) return Status::from_errno(errno, "cannot read config " + path);
  text.resize(static_cast<std::size_t>(in.gcount()));
  return parse_receive_config(text, path);
}

}  // namespace ferry::tools
