// `ferry --site URL ...`: the CLI through a remote site's management API (api.h). HTTPS with
// the --tls-* client material (the server's name checked against the URL's host, or
// --tls-server-name), one request per connection, every wait and the reply bounded.
#include <utility>  // before Asio (GCC 12)

#include "api_client.h"

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

namespace ferry::tools {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

constexpr std::size_t kMaxReplyBytes = 8u << 20;
constexpr std::chrono::seconds kRequestTimeout{30};

struct Url {
  bool tls = true;
  std::string host, port;
};

Result<Url> parse_url(const std::string& site) {
  Url u;
  std::string rest;
  if (site.rfind("https://", 0) == 0) {
    rest = site.substr(8);
  } else if (site.rfind("http://", 0) == 0) {
    u.tls = false;
    rest = site.substr(7);
  } else {
    return Status::error(Errc::invalid_argument, "--site " + site + ": give https://HOST:PORT");
  }
  if (!rest.empty() && rest.back() == '/') rest.pop_back();
  if (rest.find('/') != std::string::npos)
    return Status::error(Errc::invalid_argument, "--site " + site + ": no path after HOST:PORT");
  std::size_t colon = rest.rfind(':');
  if (!rest.empty() && rest.front() == '[') {  // [v6]:port
    const auto close = rest.find(']');
    if (close == std::string::npos) return Status::error(Errc::invalid_argument, "--site " + site + ": bad IPv6 host");
    u.host = rest.substr(1, close - 1);
    colon = close + 1 < rest.size() && rest[close + 1] == ':' ? close + 1 : std::string::npos;
  } else {
    u.host = rest.substr(0, colon);
  }
  if (colon == std::string::npos || colon + 1 >= rest.size())
    return Status::error(Errc::invalid_argument, "--site " + site + ": give the port (https://HOST:PORT)");
  u.port = rest.substr(colon + 1);
  if (u.host.empty()) return Status::error(Errc::invalid_argument, "--site " + site + ": no host");
  return u;
}

}  // namespace

Result<SiteReply> site_call(const SiteArgs& site, const std::string& method, const std::string& path,
                            const std::string& body) {
  FERRY_ASSIGN_OR_RETURN(Url url, parse_url(site.url));
  const std::string what = method + " " + site.url + path;
  if (url.tls && !site.tls.given())
    return Status::error(Errc::invalid_argument,
                         "--site " + site.url + ": give --tls-cert, --tls-key and --tls-ca (mutual TLS)");
  std::shared_ptr<const transport::TlsConfig> tls;
  if (url.tls) {
    FERRY_ASSIGN_OR_RETURN(tls, load_tls(site.tls, transport::TlsConfig::Role::client));
  }
  asio::io_context io;
  beast::error_code ec;
  tcp::resolver resolver(io);
  auto endpoints = resolver.resolve(url.host, url.port, ec);
  if (ec) return Status::error(Errc::not_found, what + ": cannot resolve " + url.host + ": " + ec.message());
  http::request<http::string_body> req{
      method == "GET" ? http::verb::get : method == "POST" ? http::verb::post : http::verb::delete_,
      path, 11};
  req.set(http::field::host, url.host);
  req.set(http::field::user_agent, "ferry");
  if (!body.empty()) {
    req.set(http::field::content_type, "application/json");
    req.body() = body;
  }
  req.prepare_payload();
  http::response_parser<http::string_body> parser;
  parser.body_limit(kMaxReplyBytes);
  beast::flat_buffer buffer;
  auto fail = [&](const char* step, const beast::error_code& e) {
    return Status::error(e == beast::error::timeout ? Errc::timeout : Errc::disconnected,
                         what + ": " + step + ": " + e.message());
  };
  if (!url.tls) {
    beast::tcp_stream stream(io);
    stream.expires_after(kRequestTimeout);
    stream.connect(endpoints, ec);
    if (ec) return fail("connect", ec);
    http::write(stream, req, ec);
    if (ec) return fail("send", ec);
    http::read(stream, buffer, parser, ec);
    if (ec) return fail("reply", ec);
  } else {
    auto& ctx = *static_cast<asio::ssl::context*>(tls->native());
    beast::ssl_stream<beast::tcp_stream> stream(io, ctx);
    const std::string name = site.tls.server_name.empty() ? url.host : site.tls.server_name;
    SSL* ssl = stream.native_handle();
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl);
    beast::error_code not_ip;
    asio::ip::make_address(name, not_ip);
    if (!not_ip) {
      X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str());
    } else {
      X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS |
                                                 X509_CHECK_FLAG_NEVER_CHECK_SUBJECT);
      X509_VERIFY_PARAM_set1_host(param, name.c_str(), name.size());
      SSL_set_tlsext_host_name(ssl, name.c_str());
    }
    beast::get_lowest_layer(stream).expires_after(kRequestTimeout);
    beast::get_lowest_layer(stream).connect(endpoints, ec);
    if (ec) return fail("connect", ec);
    stream.handshake(asio::ssl::stream_base::client, ec);
    if (ec) return fail("TLS handshake", ec);
    http::write(stream, req, ec);
    if (ec) return fail("send", ec);
    http::read(stream, buffer, parser, ec);
    if (ec) return fail("reply", ec);
  }
  SiteReply r;
  r.status = parser.get().result_int();
  r.body = parser.get().body();
  r.doc = nlohmann::json::parse(r.body, nullptr, /*allow_exceptions=*/false);
  if (r.doc.is_discarded())
    return Status::error(Errc::protocol, what + ": the reply (HTTP " + std::to_string(r.status) + ") is not JSON");
  if (r.status >= 400)
    return Status::error(r.status == 404 ? Errc::not_found : Errc::invalid_argument,
                         what + ": HTTP " + std::to_string(r.status) + ": " +
                             r.doc.value("error", std::string("(no message)")));
  return r;
}

namespace {

int site_fail(const std::string& cmd, const Status& s) {
  std::fprintf(stderr, "ferry %s: %s\n", cmd.c_str(), s.message().c_str());
  return 1;
}

// Polls the job until it ends (or `timeout`), then prints its output as the CLI would have.
int wait_job(const SiteArgs& site, const std::string& cmd, const nlohmann::json& started) {
  const std::string href = started.value("href", "");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(30);
  for (;;) {
    auto r = site_call(site, "GET", href, "");
    if (!r.is_ok()) return site_fail(cmd, r.status());
    const nlohmann::json& job = r->doc;
    if (job.value("state", "") != "running") {
      std::fputs(job.value("stdout", "").c_str(), stdout);
      std::fputs(job.value("stderr", "").c_str(), stderr);
      return job["exit_code"].is_number() ? job["exit_code"].get<int>() : 1;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "ferry %s: job %s still runs at %s; ask GET %s\n", cmd.c_str(),
                   job.value("id", "?").c_str(), site.url.c_str(), href.c_str());
      return 1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
}

}  // namespace

int site_points(const SiteArgs& site, const std::string& group, bool json) {
  auto r = site_call(site, "GET", "/v1/groups/" + group + "/points", "");
  if (!r.is_ok()) return site_fail("points", r.status());
  if (json) {
    std::cout << r->doc.dump(2) << "\n";
    return 0;
  }
  std::printf("group %s at %s: %zu recovery point(s)\n", group.c_str(), site.url.c_str(), r->doc.size());
  std::printf("%10s  %-20s  %s\n", "RP", "CREATED (unix s)", "KEEP");
  for (const auto& p : r->doc)
    std::printf("%10llu  %-20.3f  %s\n", (unsigned long long)p.value("rp_id", 0ull),
                double(p.value("created_unix_ns", 0ull)) / 1e9, p.value("keep", true) ? "yes" : "no");
  return 0;
}

int site_status(const SiteArgs& site, bool json, double rpo_alert_seconds) {
  auto r = site_call(site, "GET", "/v1/status", "");
  if (!r.is_ok()) return site_fail("status", r.status());
  return print_status_doc(r->doc, json, rpo_alert_seconds, site.url);
}

int site_failover_test(const SiteArgs& site, const std::string& group, const std::string& point,
                       bool stop, const std::string& boot_result) {
  nlohmann::json body = nlohmann::json::object();
  if (stop) {
    if (!boot_result.empty()) body["boot_result"] = boot_result;
  } else {
    body["point"] = point.empty() ? "latest" : point;
  }
  auto r = site_call(site, stop ? "DELETE" : "POST", "/v1/groups/" + group + "/failover-test", body.dump());
  if (!r.is_ok()) return site_fail("failover test", r.status());
  return wait_job(site, "failover test", r->doc);
}

int run_site_command(CLI::App& app, const SiteArgs& site, const SitePoints& points, bool status_parsed,
                     bool status_json, double status_rpo_alert, const std::function<bool(int&)>& run_failover) {
  if (Status st = check_tls_args(site.tls); !st.is_ok()) {
    std::fprintf(stderr, "ferry --site: %s\n", st.message().c_str());
    return 2;
  }
  if (points.parsed) {
    if (points.local) {
      std::fprintf(stderr, "ferry points: --site goes without --store and --to\n");
      return 2;
    }
    SiteArgs s2 = site;
    if (!s2.tls.given() && points.tls.given()) s2.tls = points.tls;  // ferry --site U points --tls-*
    return site_points(s2, points.group, points.json);
  }
  if (status_parsed) return site_status(site, status_json, status_rpo_alert);
  bool test = false;
  for (CLI::App* sub : app.get_subcommands())
    if (sub->get_name() == "failover")
      test = sub->get_subcommands().size() == 1 && sub->get_subcommands()[0]->get_name() == "test";
  int rc = 2;
  if (test && run_failover(rc)) return rc;  // failover.cc sends `failover test` to the site
  const auto subs = app.get_subcommands();
  std::fprintf(stderr,
               "ferry %s: not available with --site (the management API runs points, status and "
               "failover test at a site); run it at the site itself\n",
               subs.empty() ? "" : subs[0]->get_name().c_str());
  return 2;
}

}  // namespace ferry::tools
