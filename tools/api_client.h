// `ferry --site https://HOST:PORT ...` (api_client.cc): the commands the management API
// covers, run against a remote site's API (api.h, docs/api.yaml) instead of local files:
// points, status, failover test [--stop]. Other commands refuse --site (ferry.cc).
#pragma once

#include <functional>
#include <string>

#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>

#include "ferry/base/status.h"
#include "tools.h"

namespace ferry::tools {

struct SiteArgs {
  std::string url;  // https://HOST:PORT (http:// for a plaintext API on loopback)
  TlsArgs tls;      // client material; server_name: default the URL's host
};

struct SiteReply {
  unsigned status = 0;
  std::string body;
  nlohmann::json doc;
};

// One call; an HTTP error (>= 400) becomes a Status carrying the server's message.
Result<SiteReply> site_call(const SiteArgs& site, const std::string& method, const std::string& path,
                            const std::string& body);

int site_points(const SiteArgs& site, const std::string& group, bool json);
int site_status(const SiteArgs& site, bool json, double rpo_alert_seconds);
// Starts (or stops) the test failover as a job and waits for it; its output and exit code
// are the command's, as if run at the site.
int site_failover_test(const SiteArgs& site, const std::string& group, const std::string& point,
                       bool stop, const std::string& boot_result);

// What `ferry points` was given, for run_site_command.
struct SitePoints {
  bool parsed = false;
  bool local = false;  // --store or --to: not with --site
  TlsArgs tls;         // its own --tls-* (used when the global ones are not given)
  std::string group;
  bool json = false;
};

// `ferry --site URL COMMAND`: runs the commands the API covers (points, status, failover test
// through `run_failover`), refuses the others (exit 2, naming the command).
int run_site_command(CLI::App& app, const SiteArgs& site, const SitePoints& points, bool status_parsed,
                     bool status_json, double status_rpo_alert, const std::function<bool(int&)>& run_failover);

}  // namespace ferry::tools
