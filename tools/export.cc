// ferry export: one disk of a group at one RP over NBD, served by nbdkit with Ferry's plugin
// (tools/nbdkit/ferry-plugin.cc). This process checks the arguments (opening the read view,
// so an unknown group, RP or disk is refused before anything serves), runs nbdkit in the
// foreground as its child, prints where it serves once nbdkit is ready, and stops it on
// SIGINT/SIGTERM. nbdkit dies with it (--exit-with-parent) should this process be killed.
#include <arpa/inet.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "events_cmd.h"
#include "ferry/site/read_view.h"
#include "ferry/transport/connection.h"
#include "ferry/transport/tls.h"
#include "tools.h"

#ifndef FERRY_PLUGIN_INSTALL_DIR
#define FERRY_PLUGIN_INSTALL_DIR "/usr/local/lib/ferry"
#endif

namespace ferry::tools {
namespace {

constexpr const char* kPluginName = "nbdkit-ferry-plugin.so";
constexpr auto kReadyTimeout = std::chrono::seconds(10);
// How long nbdkit may take to exit after SIGTERM before it is killed: an export must stop
// when asked, even if nbdkit hangs in its exit handlers (seen with a library destructor
// deadlocking on the locale lock in sanitizer builds).
constexpr auto kStopTimeout = std::chrono::seconds(5);

int usage_error(const std::string& msg) {
  std::fprintf(stderr, "ferry export: %s\n", msg.c_str());
  return 1;
}

// $FERRY_NBDKIT_PLUGIN, else next to the ferry binary (a build tree), else the installed one.
std::string find_plugin() {
  if (const char* p = std::getenv("FERRY_NBDKIT_PLUGIN"); p != nullptr && *p != '\0') return p;
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    auto here = exe.parent_path() / kPluginName;
    if (std::filesystem::exists(here, ec)) return here.string();
  }
  return std::string(FERRY_PLUGIN_INSTALL_DIR) + "/" + kPluginName;
}

bool is_loopback(const std::string& host) {
  if (host == "localhost") return true;
  in_addr a4{};
  if (::inet_pton(AF_INET, host.c_str(), &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  in6_addr a6{};
  if (::inet_pton(AF_INET6, host.c_str(), &a6) == 1) return IN6_IS_ADDR_LOOPBACK(&a6);
  return false;
}

// A socket path that answers is busy; a stale socket file is replaced; anything else that
// exists there is refused (never removed).
Status check_socket_path(const std::string& path) {
  if (path.size() >= sizeof(sockaddr_un{}.sun_path))
    return Status::error(Errc::invalid_argument,
                         "socket path " + path + " is too long (at most " +
                             std::to_string(sizeof(sockaddr_un{}.sun_path) - 1) + " bytes)");
  struct stat sb {};
  if (::lstat(path.c_str(), &sb) != 0) return Status::ok();
  if (!S_ISSOCK(sb.st_mode))
    return Status::error(Errc::invalid_argument,
                         "socket path " + path + " exists and is not a socket: choose another");
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return Status::from_errno(errno, "socket");
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, path.c_str(), path.size());
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0)
    return Status::error(Errc::busy, "socket " + path +
                                         " is busy: another server listens on it (stop it or "
                                         "choose another path)");
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return Status::from_errno(errno, "remove stale socket " + path);
  return Status::ok();
}

Status copy_file(const std::string& from, const std::string& to, mode_t mode) {
  std::error_code ec;
  std::filesystem::copy_file(from, to, std::filesystem::copy_options::overwrite_existing, ec);
  if (ec) return Status::error(Errc::io, "copy " + from + " to " + to + ": " + ec.message());
  if (::chmod(to.c_str(), mode) != 0) return Status::from_errno(errno, "chmod " + to);
  return Status::ok();
}

// nbdkit (GnuTLS) reads its TLS files from one directory under fixed names; the copies live
// in the export's private temporary directory (0700, removed when it stops). GnuTLS offers
// TLS 1.2 unless told otherwise, and nbdkit 1.32 has no priority option: a GnuTLS system
// priority file for nbdkit alone turns every version below 1.3 off, as Ferry's own
// connections do.
Status stage_tls(const TlsArgs& tls, const std::string& tmpdir, std::string* priority_file) {
  const std::string dir = tmpdir + "/tls";
  if (::mkdir(dir.c_str(), 0700) != 0) return Status::from_errno(errno, "mkdir " + dir);
  FERRY_TRY(copy_file(tls.ca, dir + "/ca-cert.pem", 0644));
  FERRY_TRY(copy_file(tls.cert, dir + "/server-cert.pem", 0644));
  FERRY_TRY(copy_file(tls.key, dir + "/server-key.pem", 0600));
  if (!tls.crl.empty()) FERRY_TRY(copy_file(tls.crl, dir + "/ca-crl.pem", 0644));
  *priority_file = tmpdir + "/gnutls-tls13-only.conf";
  const std::string text =
      "[overrides]\ndisabled-version = tls1.2\ndisabled-version = tls1.1\n"
      "disabled-version = tls1.0\ndisabled-version = dtls1.2\ndisabled-version = dtls1.0\n";
  FILE* f = std::fopen(priority_file->c_str(), "w");
  if (f == nullptr) return Status::from_errno(errno, "create " + *priority_file);
  const bool ok = std::fputs(text.c_str(), f) >= 0;
  if (std::fclose(f) != 0 || !ok) return Status::from_errno(errno, "write " + *priority_file);
  return Status::ok();
}

std::string describe_exit(int wstatus) {
  if (WIFEXITED(wstatus)) return "exit status " + std::to_string(WEXITSTATUS(wstatus));
  if (WIFSIGNALED(wstatus)) return std::string("signal ") + ::strsignal(WTERMSIG(wstatus));
  return "status " + std::to_string(wstatus);
}

}  // namespace

int cmd_export(const ExportArgs& a) {
  if (!a.socket.empty() && !a.listen.empty())
    return usage_error("give --socket PATH or --listen ADDR:PORT, not both");
  std::string host;
  std::uint16_t port = 0;
  if (a.socket.empty()) {
    auto ep = transport::parse_endpoint(a.listen.empty() ? "127.0.0.1:10809" : a.listen);
    if (!ep.is_ok()) return usage_error("--listen: " + ep.status().to_string());
    if (!is_loopback(ep->host) && !a.tls.given())
      return usage_error("refusing to serve on " + ep->host +
                         ": not a loopback address, and an export off this host needs mutual "
                         "TLS: give --tls-cert, --tls-key and --tls-ca (docs/security.md), or "
                         "use --listen 127.0.0.1:PORT or --socket PATH");
    host = ep->host;
    port = ep->port;
  }
  // The TLS material is checked as the receiver checks its own (key mode, key matching the
  // certificate, the certificate valid and signed by the CA, the CRL readable) before
  // anything serves; nbdkit (GnuTLS) then does the handshakes.
  if (a.tls.given()) {
    auto cfg = transport::TlsConfig::load(transport::TlsConfig::Role::server, a.tls.files());
    if (!cfg.is_ok()) return usage_error("--tls-*: " + cfg.status().to_string());
  }
  // Opening the view is the check: group, RP and disk exist (errors name them). "latest" is
  // resolved here, so every connection of this export reads the same RP. The view stays open
  // as long as this process serves: its pin keeps retention off the RP even while no client
  // is connected (nbdkit's own views pin it only while connections last).
  auto view = site::ReadView::open(a.store, a.group, a.point, a.disk);
  if (!view.is_ok())
    return usage_error("disk '" + a.disk + "' of group '" + a.group + "' at RP " +
                       (a.point == 0 ? std::string("latest") : std::to_string(a.point)) + ": " +
                       view.status().to_string());
  const std::uint64_t rp = (*view)->rp_id();
  const std::uint64_t size = (*view)->size_bytes();
  const std::unique_ptr<site::ReadView> pin = std::move(view).value();
  if (!a.socket.empty()) {
    Status s = check_socket_path(a.socket);
    if (!s.is_ok()) return usage_error(s.to_string());
  }
  const std::string plugin = find_plugin();
  if (::access(plugin.c_str(), R_OK) != 0)
    return usage_error("nbdkit plugin " + plugin + " not found: build it (meson, with " +
                       "nbdkit-plugin-dev installed) or set FERRY_NBDKIT_PLUGIN");

  char tmpl[] = "/tmp/ferry-export-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return usage_error(std::string("mkdtemp: ") + strerror(errno));
  const std::string tmpdir = tmpl;
  const std::string pidfile = tmpdir + "/nbdkit.pid";
  struct TmpDirOwner {
    std::string dir;
    ~TmpDirOwner() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } tmp_owner{tmpdir};

  const char* nbdkit_env = std::getenv("FERRY_NBDKIT");
  std::vector<std::string> args = {nbdkit_env != nullptr && *nbdkit_env ? nbdkit_env : "nbdkit",
                                   "--foreground", "--exit-with-parent", "-P", pidfile};
  std::string uri;
  const std::string scheme = a.tls.given() ? "nbds" : "nbd";
  if (!a.socket.empty()) {
    args.insert(args.end(), {"-U", a.socket});
    uri = scheme + "+unix:///?socket=" + a.socket;
  } else {
    args.insert(args.end(), {"-i", host, "-p", std::to_string(port)});
    uri = scheme + "://" + (host.find(':') != std::string::npos ? "[" + host + "]" : host) +
          ":" + std::to_string(port) + "/";
  }
  std::string gnutls_priority_file;
  if (a.tls.given()) {
    Status s = stage_tls(a.tls, tmpdir, &gnutls_priority_file);
    if (!s.is_ok()) return usage_error(s.to_string());
    args.insert(args.end(), {"--tls=require", "--tls-verify-peer",
                             "--tls-certificates=" + tmpdir + "/tls"});
  }
  // --overlay: nbdkit's cow filter keeps writes in a throwaway overlay in front of the plugin
  // (which stays read-only); without it the export is read-only (-r).
  if (a.overlay)
    args.push_back("--filter=cow");
  else
    args.push_back("-r");
  args.insert(args.end(), {plugin, "store=" + a.store, "group=" + a.group,
                           "point=" + std::to_string(rp), "disk=" + a.disk});

  sigset_t stop, old;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  ::sigprocmask(SIG_BLOCK, &stop, &old);
#ifdef FERRY_ASAN_RUNTIME
  // Sanitizer builds only (tools/meson.build): the instrumented plugin needs ASan's runtime
  // loaded first in the uninstrumented nbdkit; nbdkit's own leaks are not ours to report.
  // Set before fork (the child only execs), so nbdkit inherits it and ferry is unaffected.
  ::setenv("LD_PRELOAD", FERRY_ASAN_RUNTIME, 1);
  const char* asan = std::getenv("ASAN_OPTIONS");
  const std::string opts = std::string(asan ? asan : "") + (asan && *asan ? ":" : "") +
                           "detect_leaks=0";
  ::setenv("ASAN_OPTIONS", opts.c_str(), 1);
#endif
  const pid_t child = ::fork();
  if (child < 0) return usage_error(std::string("fork: ") + strerror(errno));
  if (child == 0) {
    ::sigprocmask(SIG_SETMASK, &old, nullptr);
    if (!gnutls_priority_file.empty())
      ::setenv("GNUTLS_SYSTEM_PRIORITY_FILE", gnutls_priority_file.c_str(), 1);
    std::vector<char*> argv;
    for (auto& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    std::fprintf(stderr, "ferry export: cannot run %s: %s (install the nbdkit package)\n",
                 argv[0], strerror(errno));
    ::_exit(127);
  }
  bool ready = false, stopping = false, killed = false;
  const auto deadline = std::chrono::steady_clock::now() + kReadyTimeout;
  std::chrono::steady_clock::time_point stop_deadline{};
  int wstatus = 0;
  for (;;) {
    const pid_t w = ::waitpid(child, &wstatus, WNOHANG);
    if (w == child) break;
    if (!ready && !stopping && ::access(pidfile.c_str(), F_OK) == 0) {
      ready = true;
      emit_store_event(a.store, {.group = a.group, .kind = "rp_exported", .rp = rp, .disk = a.disk,
                                 .message = "RP " + std::to_string(rp) + " of group '" + a.group +
                                            "': disk " + a.disk + " exported on " + uri,
                                 .fields = {{"uri", uri}, {"overlay", std::int64_t(a.overlay)}}});
      std::printf("ferry export: serving disk %s of group %s at RP %llu (%llu bytes%s) on %s\n",
                  a.disk.c_str(), a.group.c_str(), (unsigned long long)rp,
                  (unsigned long long)size, a.overlay ? ", writable overlay" : ", read-only",
                  uri.c_str());
      std::fflush(stdout);
    }
    if (!ready && !stopping && std::chrono::steady_clock::now() > deadline) {
      std::fprintf(stderr, "ferry export: nbdkit was not ready within %lld s; stopping it\n",
                   (long long)kReadyTimeout.count());
      ::kill(child, SIGTERM);
      stopping = true;
      stop_deadline = std::chrono::steady_clock::now() + kStopTimeout;
    }
    if (stopping && !killed && std::chrono::steady_clock::now() > stop_deadline) {
      std::fprintf(stderr, "ferry export: nbdkit did not exit within %lld s of SIGTERM; killed\n",
                   (long long)kStopTimeout.count());
      ::kill(child, SIGKILL);
      killed = true;
    }
    timespec ts{0, 10'000'000};
    const int sig = ::sigtimedwait(&stop, nullptr, &ts);
    if (sig > 0 && !stopping) {
      ::kill(child, SIGTERM);
      stopping = true;
      stop_deadline = std::chrono::steady_clock::now() + kStopTimeout;
    }
  }
  // A killed nbdkit leaves its socket behind.
  if (killed && !a.socket.empty()) ::unlink(a.socket.c_str());
  ::sigprocmask(SIG_SETMASK, &old, nullptr);
  const bool clean = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) == 0
                                        : WIFSIGNALED(wstatus) && (WTERMSIG(wstatus) == SIGTERM ||
                                                                   (killed && WTERMSIG(wstatus) == SIGKILL));
  if (stopping && ready && clean) return 0;
  std::fprintf(stderr, "ferry export: nbdkit %s (%s)\n",
               ready ? "stopped on its own" : "failed before serving",
               describe_exit(wstatus).c_str());
  return 1;
}

}  // namespace ferry::tools
