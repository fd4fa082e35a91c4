// The checks every strict TOML config of ours makes (tools/config.cc, tools/receive_config.cc):
// a value of the right type and bounds, or an error naming "file:line: key: what is wrong".
// Private to tools/; header-only so that a fuzz target can build a parser on its own.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <toml++/toml.h>

#include "ferry/base/status.h"

namespace ferry::tools {

class TomlChecker {
 public:
  explicit TomlChecker(const std::string& file) : file_(file) {}

  Status error(std::uint32_t line, std::string_view key, const std::string& what) const {
    return Status::error(Errc::invalid_argument, file_ + ":" + std::to_string(line) + ": " +
                                                     std::string(key) + ": " + what);
  }

  static std::uint32_t line_of(const toml::node& n) { return n.source().begin.line; }

  // A string of 1..max_bytes bytes without NUL or control characters.
  Status string(const toml::table& t, std::string_view key, bool required,
                std::size_t max_bytes, std::string* out) const {
    const toml::node* n = t.get(key);
    if (n == nullptr)
      return required ? error(line_of(t), key, "missing (required)") : Status::ok();
    const auto* s = n->as_string();
    if (s == nullptr) return error(line_of(*n), key, "must be a string");
    const std::string& v = s->get();
    if (v.empty()) return error(line_of(*n), key, "must not be empty");
    if (v.size() > max_bytes)
      return error(line_of(*n), key, "longer than " + std::to_string(max_bytes) + " bytes");
    if (std::any_of(v.begin(), v.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20; }))
      return error(line_of(*n), key, "contains a control character");
    *out = v;
    return Status::ok();
  }

  Status integer(const toml::table& t, std::string_view key, bool required, std::int64_t min,
                 std::int64_t max, std::int64_t* out) const {
    const toml::node* n = t.get(key);
    if (n == nullptr)
      return required ? error(line_of(t), key, "missing (required)") : Status::ok();
    const auto* i = n->as_integer();
    if (i == nullptr) return error(line_of(*n), key, "must be an integer");
    if (i->get() < min || i->get() > max)
      return error(line_of(*n), key,
                   "must be from " + std::to_string(min) + " to " + std::to_string(max));
    *out = i->get();
    return Status::ok();
  }

  Status boolean(const toml::table& t, std::string_view key, bool* out) const {
    const toml::node* n = t.get(key);
    if (n == nullptr) return Status::ok();
    const auto* b = n->as_boolean();
    if (b == nullptr) return error(line_of(*n), key, "must be true or false");
    *out = b->get();
    return Status::ok();
  }

  Status only_keys(const toml::table& t, std::initializer_list<std::string_view> allowed,
                   std::string_view where) const {
    for (const auto& [k, v] : t) {
      if (std::find(allowed.begin(), allowed.end(), k.str()) != allowed.end()) continue;
      std::string list;
      for (auto a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
      return error(line_of(v), k.str(),
                   "unknown key in " + std::string(where) + " (allowed: " + list + ")");
    }
    return Status::ok();
  }

  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

}  // namespace ferry::tools
