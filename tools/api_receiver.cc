// The receiver's management API routes (api.h, docs/api.yaml). Listings call the functions
// behind `ferry status --socket` and `ferry points --json`; recovery actions spawn the CLI
// (`ferry export`, `ferry failover test [--stop]`, `ferry failover`) as jobs.
#include <sys/stat.h>

#include <chrono>
#include <nlohmann/json.hpp>

#include "api.h"
#include "failback.h"
#include "ferry/base/log.h"
#include "ferry/transport/connection.h"
#include "ferry/site/receiver.h"
#include "ferry/site/store.h"
#include "metrics.h"
#include "tools.h"

namespace ferry::tools {
namespace {

using metrics::HttpRequest;
using metrics::HttpResponse;

std::uint64_t now_unix_ns() {
  return std::uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count());
}

// The group of a request: a valid name (404 otherwise: no such group can exist), the caller's
// right (401/403), then the group in the store (404).
std::optional<HttpResponse> check_group(const ReceiverApi& api, const HttpRequest& req,
                                        std::string* group) {
  *group = req.params.at("group");
  const std::string& g = *group;
  if (g.find('*') != std::string::npos || !check_group_pattern(g).is_ok())
    return api_error(404, "no group '" + g.substr(0, 64) + "': not a valid group name");
  if (auto refused = api_authorize(req, api.access(), g)) return refused;
  struct stat st {};
  if (::stat((api.store + "/" + g).c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return api_error(404, "no group '" + g + "' in the store " + api.store);
  return std::nullopt;
}

bool may_manage(const HttpRequest& req, const AccessMap& map, const std::string& group) {
  return !api_authorize(req, map, group).has_value();
}

std::string text_of(const nlohmann::json& body, const char* key, const std::string& fallback) {
  if (!body.contains(key)) return fallback;
  const nlohmann::json& v = body.at(key);
  return v.is_string() ? v.get<std::string>() : std::to_string(v.get<std::uint64_t>());
}

HttpResponse job_started(const std::string& id) {
  return api_json(202, {{"job", id}, {"href", "/v1/jobs/" + id}});
}

HttpResponse start_job(const ReceiverApi& api, const std::string& group, const std::string& kind,
                       std::vector<std::string> args) {
  auto id = api.jobs->start(group, kind, std::move(args));
  if (!id.is_ok())
    return api_error(id.status().code() == Errc::busy ? 503 : 500, id.status().message());
  return job_started(*id);
}

// 409 when the group is failed over or failing over: no test, export or second failover
// from the API (the CLI says the same).
std::optional<HttpResponse> refuse_failed_over(const ReceiverApi& api, const std::string& group) {
  const std::string role = group_role(api.store, group, nullptr);
  if (role == "failed over" || role == "failing over")
    return api_error(409, "group '" + group + "' is " + role + "; fail back first (docs/failover.md)");
  return std::nullopt;
}

HttpResponse status(const ReceiverApi& api, const HttpRequest& req) {
  const AccessMap map = api.access();
  if (auto refused = api_authorize(req, map, "")) return *refused;
  nlohmann::json doc = receiver_status_doc(*api.receiver, api.listen, api.store, api.max_disk_bytes);
  nlohmann::json kept = nlohmann::json::array();
  for (nlohmann::json& g : doc["groups"])
    if (may_manage(req, map, g.value("group", ""))) kept.push_back(std::move(g));
  doc["groups"] = std::move(kept);
  return api_json(200, doc);
}

HttpResponse groups(const ReceiverApi& api, const HttpRequest& req) {
  HttpResponse r = status(api, req);
  if (r.status != 200) return r;
  return api_json(200, {{"groups", nlohmann::json::parse(r.body)["groups"]}});
}

HttpResponse group(const ReceiverApi& api, const HttpRequest& req) {
  std::string g;
  if (auto refused = check_group(api, req, &g)) return *refused;
  nlohmann::json doc = receiver_status_doc(*api.receiver, api.listen, api.store, api.max_disk_bytes);
  for (nlohmann::json& j : doc["groups"])
    if (j.value("group", "") == g) return api_json(200, j);
  // In the store but no session since the start: what the store says.
  return api_json(200, {{"group", g}, {"state", "idle"}, {"role", group_role(api.store, g, nullptr)}});
}

HttpResponse points(const ReceiverApi& api, const HttpRequest& req) {
  std::string g;
  if (auto refused = check_group(api, req, &g)) return *refused;
  auto doc = points_json(api.store, g);
  if (!doc.is_ok())
    return api_error(doc.status().code() == Errc::not_found ? 404 : 500, doc.status().message());
  return api_json(200, *doc);
}

HttpResponse export_start(const ReceiverApi& api, const HttpRequest& req) {
  std::string g;
  if (auto refused = check_group(api, req, &g)) return *refused;
  auto body = api_body(req, {"point", "disk", "socket", "listen"});
  if (!body.is_ok()) return api_error(400, body.status().message());
  if (!body->contains("disk")) return api_error(400, "'disk' is required (the disk's name in the group)");
  if (body->contains("socket") == body->contains("listen"))
    return api_error(400, "give one of 'socket' (a unix socket path) or 'listen' (ADDR:PORT)");
  if (auto busy = refuse_failed_over(api, g)) return *busy;
  std::vector<std::string> args{"export", "--store", api.store, "--group", g,
                                "--point", text_of(*body, "point", "latest"),
                                "--disk", text_of(*body, "disk", "")};
  if (body->contains("socket")) args.insert(args.end(), {"--socket", text_of(*body, "socket", "")});
  if (body->contains("listen")) args.insert(args.end(), {"--listen", text_of(*body, "listen", "")});
  return start_job(api, g, "export", std::move(args));
}

HttpResponse export_stop(const ReceiverApi& api, const HttpRequest& req) {
  std::string g;
  if (auto refused = check_group(api, req, &g)) return *refused;
  const std::size_t n = api.jobs->stop(g, "export");
  if (n == 0) return api_error(409, "no export of group '" + g + "' started through the API runs");
  return api_json(200, {{"stopped", n}});
}

HttpResponse test_start(const ReceiverApi& api, const HttpRequest& req) {
  std::string g;
  if (auto refused = check_group(api, req, &g)) return *refused;
  auto body = api_body(req, {"point", "uri", "name_suffix", "network_map"});
  if (!body.is_ok()) return api_error(400, body.status().message());
  if (auto busy = refuse_failed_over(api, g)) return *busy;
  if (api.jobs->running(g, "failover-test"))
    return api_error(409, "a test failover of group '" + g + "' is starting already");
  std::vector<std::string> args{"failover", "test", "--store", api.store, "--group", g,
                                "--point", text_of(*body, "point", "latest")};
  for (const auto& [key, flag] : {std::pair{"uri", "--uri"}, {"name_suffix", "--name-suffix"},
                                  {"network_map", "--network-map"}})
    if (body->contains(key)) args.insert(args.end(), {flag, text_of(*body, key, "")});
  return start_job(api, g, "failover-test", std::move(args));
}

HttpResponse test_stop(const ReceiverApi& api, const HttpRequest& req) {
  std::string g;
  if (auto refused = check_group(api, req, &g)) return *refused;
  auto body = api_body(req, {"uri", "boot_result"});
  if (!body.is_ok()) return api_error(400, body.status().message());
  std::vector<std::string> args{"failover", "test", "--stop", "--store", api.store, "--group", g};
  if (body->contains("uri")) args.insert(args.end(), {"--uri", text_of(*body, "uri", "")});
  if (body->contains("boot_result"))
    args.insert(args.end(), {"--boot-result", text_of(*body, "boot_result", "")});
  return start_job(api, g, "failover-test-stop", std::move(args));
}

HttpResponse failover(const ReceiverApi& api, const HttpRequest& req) {
  std::string g;
  if (auto refused = check_group(api, req, &g)) return *refused;
  auto body = api_body(req, {"point", "uri", "name_suffix", "network_map"});
  if (!body.is_ok()) return api_error(400, body.status().message());
  if (auto busy = refuse_failed_over(api, g)) return *busy;
  if (api.jobs->running(g, "failover")) return api_error(409, "a failover of group '" + g + "' runs already");
  std::vector<std::string> args{"failover", "--store", api.store, "--group", g,
                                "--point", text_of(*body, "point", "latest")};
  for (const auto& [key, flag] : {std::pair{"uri", "--uri"}, {"name_suffix", "--name-suffix"},
                                  {"network_map", "--network-map"}})
    if (body->contains(key)) args.insert(args.end(), {flag, text_of(*body, key, "")});
  return start_job(api, g, "failover", std::move(args));
}

HttpResponse job(const ReceiverApi& api, const HttpRequest& req) {
  std::string g;
  nlohmann::json doc = api.jobs->get(req.params.at("id"), &g);
  // Unknown, or another group's job: the same 404 (a job id says nothing to a stranger).
  if (doc.is_null() || (req.tls && !may_manage(req, api.access(), g))) {
    if (auto refused = api_authorize(req, api.access(), ""); refused && refused->status == 401)
      return *refused;
    return api_error(404, "no job '" + req.params.at("id").substr(0, 64) + "'");
  }
  return api_json(200, doc);
}

}  // namespace

nlohmann::json receiver_status_doc(const site::Receiver& r, const std::string& listen,
                                   const std::string& store, std::uint64_t max_disk_bytes) {
  const std::uint64_t now_ns = now_unix_ns();
  nlohmann::json groups = nlohmann::json::array();
  for (const site::GroupStatus& g : r.status()) {
    nlohmann::json j{{"group", g.group}, {"state", site::group_state_name(g.state)},
                     {"last_committed_rp", g.last_committed_rp},
                     {"last_applied_rp", g.last_applied_rp},
                     {"last_commit_unix_ns", g.last_commit_unix_ns}, {"source", g.source},
                     {"cause", g.cause}, {"last_error", g.last_error},
                     {"failing_since_unix_ns", g.failing_since_unix_ns},
                     {"failed_attempts", g.failed_attempts},
                     {"next_reopen_seconds", g.next_reopen_in_ms / 1000.0}};
    j["role"] = group_role(store, g.group, nullptr);  // docs/failover.md, "Roles"
    j["failing_seconds"] = g.failing_since_unix_ns
                               ? nlohmann::json(double(now_ns - std::min(now_ns, g.failing_since_unix_ns)) / 1e9)
                               : nlohmann::json(nullptr);
    // The RPO as the metrics define it: the age of the newest committed RP's capture.
    std::uint64_t newest = g.last_commit_unix_ns;
    if (auto rep = site::explain_points(store, g.group, now_ns); rep.is_ok() && !rep->points.empty())
      newest = rep->points.back().info.created_unix_ns;
    j["rpo_seconds"] = newest ? nlohmann::json(double(now_ns - std::min(now_ns, newest)) / 1e9)
                              : nlohmann::json(nullptr);
    groups.push_back(std::move(j));
  }
  return {{"receiver", {{"listen", listen}, {"store", store}, {"max_disk_bytes", max_disk_bytes},
                        {"pid", ::getpid()}, {"unix_ns", now_ns}}},
          {"groups", std::move(groups)}};
}

std::vector<metrics::Route> receiver_api_routes(const ReceiverApi& api) {
  auto h = [&api](HttpResponse (*f)(const ReceiverApi&, const HttpRequest&)) {
    return [&api, f](const HttpRequest& req) { return f(api, req); };
  };
  return {
      {"GET", "/v1/status", h(status)},
      {"GET", "/v1/groups", h(groups)},
      {"GET", "/v1/groups/{group}", h(group)},
      {"GET", "/v1/groups/{group}/points", h(points)},
      {"POST", "/v1/groups/{group}/export", h(export_start)},
      {"DELETE", "/v1/groups/{group}/export", h(export_stop)},
      {"POST", "/v1/groups/{group}/failover-test", h(test_start)},
      {"DELETE", "/v1/groups/{group}/failover-test", h(test_stop)},
      {"POST", "/v1/groups/{group}/failover", h(failover)},
      {"GET", "/v1/jobs/{id}", h(job)},
  };
}

Result<ReceiverApiService> start_receiver_api(const std::string& listen, bool tls_on, bool insecure_plaintext,
                                              std::shared_ptr<const transport::TlsConfig> tls,
                                              ReceiverApi api) {
  ReceiverApiService svc;
  if (listen.empty()) return svc;
  FERRY_ASSIGN_OR_RETURN(auto ep, transport::parse_endpoint(listen, /*allow_port_zero=*/true));
  if (!tls_on && !loopback_host(ep.host) && !insecure_plaintext)
    return Status::error(Errc::invalid_argument,
                         listen + " is not a loopback address and no TLS material is given: give "
                                  "--tls-cert, --tls-key and --tls-ca, or --insecure-plaintext");
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return Status::from_errno(errno, "readlink /proc/self/exe");
  svc.jobs = std::make_unique<JobTable>(std::string(self, std::size_t(n)));
  svc.api = std::make_unique<ReceiverApi>(std::move(api));
  svc.api->jobs = svc.jobs.get();
  FERRY_ASSIGN_OR_RETURN(svc.server, serve_api(listen, receiver_api_routes(*svc.api), std::move(tls)));
  spdlog::info("management API on {}://{} (port {})", tls_on ? "https" : "http", listen, svc.server->port());
  return svc;
}

}  // namespace ferry::tools
