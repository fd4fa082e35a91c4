// The receiver config parser (receive_config.h). toml++ throws on syntax errors; that is caught
// here, at the edge, and becomes a Status naming file:line:column. Every other rule is checked
// explicitly, with the agent config's TomlChecker.
#include "receive_config.h"

#include <cerrno>
#include <cstdint>
#include <fstream>

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
    FERRY_TRY(c.only_keys(*g, {"retention"}, "[" + key + "]"));
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
  FERRY_TRY(c.only_keys(root, {"retention", "group"}, "the top level"));
  ReceiveConfig cfg;
  if (const toml::node* r = root.get("retention")) {
    auto parsed = parse_retention(c, *r, "[retention]", "retention");
    if (!parsed.is_ok()) return parsed.status();
    cfg.retention = *parsed;
  }
  if (const toml::node* g = root.get("group")) FERRY_TRY(parse_groups(c, *g, &cfg));
  return cfg;
}

}  // namespace

RetentionPolicy ReceiveConfig::for_group(const std::string& group) const {
  auto it = groups.find(group);
  if (it != groups.end() && !it->second.empty()) return it->second;
  return site::effective_retention(retention);
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
