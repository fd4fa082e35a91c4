// The management API of `ferry receive` (--api ADDR:PORT or api = "..." in receive.toml): a
// small REST/JSON API on the bounded HTTP server (metrics/http_server.h), described in
// docs/api.yaml, for a central console and for `ferry --site URL` (api_client.cc).
//
// Who may call: over mutual TLS (the wire's certificates) a client whose certificate identity
// holds the `manage` right for the group in the access map (access.h); a client without a
// certificate gets 401, one without the right 403. Plaintext (loopback, or the receiver's
// --insecure-plaintext) carries no identity and is not judged (rule A1, docs/security.md).
//
// What a call does runs the CLI's own code: the listings call the functions `ferry points`
// and `ferry status` use; the recovery actions spawn `ferry export`, `ferry failover test`
// and `ferry failover` exactly as an operator would, as jobs (GET /v1/jobs/{id}) whose
// output is kept bounded. Errors are JSON {"error": "...", "status": N}.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "access.h"
#include "ferry/metrics/http_server.h"

namespace ferry::site {
class Receiver;
}

namespace ferry::tools {

inline constexpr std::size_t kApiMaxBodyBytes = 16u << 10;
inline constexpr std::size_t kApiMaxRunningJobs = 8;
inline constexpr std::size_t kApiMaxKeptJobs = 64;
inline constexpr std::size_t kApiMaxOutputBytes = 16u << 10;  // per stream of a job, its tail

// A JSON error response: {"error": message, "status": status}.
metrics::HttpResponse api_error(unsigned status, const std::string& message);
metrics::HttpResponse api_json(unsigned status, const nlohmann::json& doc);

// The request body as a JSON object whose keys are all in `allowed`: an empty body is {}; not
// JSON, not an object or an unknown key: the message for a 400.
Result<nlohmann::json> api_body(const metrics::HttpRequest& req, const std::vector<std::string>& allowed);

// The caller's right on `group` (empty group: "some group"): empty when allowed, else the
// 401/403 response. Plaintext requests are allowed (A1).
std::optional<metrics::HttpResponse> api_authorize(const metrics::HttpRequest& req,
                                                   const AccessMap& map, const std::string& group);

// Jobs: `ferry` subcommands run as children of this process, at most kApiMaxRunningJobs at a
// time; the newest kApiMaxKeptJobs are kept for GET /v1/jobs/{id}. A child gets the default
// signal mask, /dev/null as stdin, and only its pipes; its stdout and stderr are kept to their
// last kApiMaxOutputBytes. Destroying the table stops (SIGTERM) and reaps every child.
class JobTable {
 public:
  explicit JobTable(std::string ferry_binary);
  ~JobTable();
  // Starts `ferry args...` for `group` as a job of `kind` ("export", "failover-test", ...).
  // Errc::busy when kApiMaxRunningJobs run; the id otherwise.
  Result<std::string> start(const std::string& group, const std::string& kind,
                            std::vector<std::string> args);
  // The job as JSON (id, group, kind, argv, state running|succeeded|failed, exit_code,
  // stdout, stderr, started/finished unix ns); null when unknown.
  nlohmann::json get(const std::string& id, std::string* group) const;
  // SIGTERM to the running jobs of `kind` for `group`; how many.
  std::size_t stop(const std::string& group, const std::string& kind);
  bool running(const std::string& group, const std::string& kind) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

struct ReceiverApi {
  std::string store;
  std::string listen;  // for the status document
  std::uint64_t max_disk_bytes = 0;
  const site::Receiver* receiver = nullptr;
  std::function<AccessMap()> access;  // the access map in force (SIGHUP reloads it)
  JobTable* jobs = nullptr;
};

// The receiver's status document (`ferry status --socket`, GET /v1/status): each group's
// state, role and RPO.
nlohmann::json receiver_status_doc(const site::Receiver& r, const std::string& listen,
                                   const std::string& store, std::uint64_t max_disk_bytes);

// The receiver's routes (docs/api.yaml lists the same; api_routes_test checks it).
std::vector<metrics::Route> receiver_api_routes(const ReceiverApi& api);

// Starts the API on `listen` (ADDR:PORT): TLS when `tls` is given, else plaintext, which the
// caller allows only on loopback or with --insecure-plaintext.
Result<std::unique_ptr<metrics::HttpServer>> serve_api(const std::string& listen,
                                                       std::vector<metrics::Route> routes,
                                                       std::shared_ptr<const transport::TlsConfig> tls);

// What `ferry receive` keeps for its API while it runs; members go in reverse: the server
// first, then what its routes read, then the jobs (their children stopped and reaped).
struct ReceiverApiService {
  std::unique_ptr<JobTable> jobs;
  std::unique_ptr<ReceiverApi> api;
  std::unique_ptr<metrics::HttpServer> server;  // null: no API asked for
};

// Starts the receiver's API on `listen` (empty: none) under the wire's rule: TLS when `tls`,
// else only on a loopback address unless `insecure_plaintext`. Jobs run this same binary.
Result<ReceiverApiService> start_receiver_api(const std::string& listen, bool tls_on, bool insecure_plaintext,
                                              std::shared_ptr<const transport::TlsConfig> tls,
                                              ReceiverApi api);

}  // namespace ferry::tools
