// failover_util.h says what this is.
#include "failover_util.h"

#include <fcntl.h>
#include <libvirt/virterror.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "ferry/base/fd.h"

namespace ferry::tools::failover_util {

namespace fs = std::filesystem;

Status libvirt_error(const std::string& what) {
  const char* m = virGetLastErrorMessage();
  Status s = Status::error(Errc::external, what + ": " + (m ? m : "unknown libvirt error"));
  virResetLastError();
  return s;
}

Result<Conn> connect_libvirt(const std::string& uri) {
  virSetErrorFunc(nullptr, [](void*, virErrorPtr) {});
  Conn c(virConnectOpen(uri.c_str()));
  if (!c) {
    Status s = libvirt_error("libvirtd not reachable at " + uri);
    return Status::error(Errc::disconnected, s.message());
  }
  return c;
}

Result<std::string> read_file_bounded(const std::string& path, std::size_t max_bytes) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::from_errno(errno ? errno : ENOENT, "open " + path);
  std::string s;
  s.resize(max_bytes + 1);
  f.read(s.data(), static_cast<std::streamsize>(s.size()));
  s.resize(static_cast<std::size_t>(f.gcount()));
  if (s.size() > max_bytes)
    return Status::error(Errc::invalid_argument, path + " is larger than " +
                                                     std::to_string(max_bytes) + " bytes");
  return s;
}

Result<nlohmann::json> read_json_object(const std::string& path, std::size_t max_bytes,
                                        const std::string& what) {
  FERRY_ASSIGN_OR_RETURN(std::string text, read_file_bounded(path, max_bytes));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return Status::error(Errc::corrupt, path + " is not " + what);
  return j;
}

Status fsync_dir(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return Status::from_errno(errno, "open " + dir);
  if (::fsync(fd.get()) != 0) return Status::from_errno(errno, "fsync " + dir);
  return Status::ok();
}

// tmp + fsync + rename + fsync dir: a crash leaves the old file or the new one.
Status write_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd.valid()) return Status::from_errno(errno, "create " + tmp);
    if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()))
      return Status::from_errno(errno ? errno : EIO, "write " + tmp);
    if (::fsync(fd.get()) != 0) return Status::from_errno(errno, "fsync " + tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Status::from_errno(errno, "rename " + tmp);
  return fsync_dir(fs::path(path).parent_path().string());
}

Result<std::string> random_uuid() {
  unsigned char b[16];
  UniqueFd fd(::open("/dev/urandom", O_RDONLY | O_CLOEXEC));
  if (!fd.valid() || ::read(fd.get(), b, sizeof b) != static_cast<ssize_t>(sizeof b))
    return Status::from_errno(errno ? errno : EIO, "read /dev/urandom");
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);
  char out[37];
  std::snprintf(out, sizeof out,
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
                b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
                b[14], b[15]);
  return std::string(out);
}

// Runs argv to completion; its stdout and stderr come back in `output` (bounded).
Result<int> run_command(const std::vector<std::string>& argv, std::string& output) {
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) return Status::from_errno(errno, "pipe");
  const pid_t pid = ::fork();
  if (pid < 0) return Status::from_errno(errno, "fork");
  if (pid == 0) {
    ::dup2(pipefd[1], 1);
    ::dup2(pipefd[1], 2);
    std::vector<char*> args;
    for (const auto& x : argv) args.push_back(const_cast<char*>(x.c_str()));
    args.push_back(nullptr);
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "cannot run %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(pipefd[1]);
  char buf[4096];
  ssize_t n;
  while ((n = ::read(pipefd[0], buf, sizeof buf)) > 0)
    if (output.size() < 64 * 1024) output.append(buf, static_cast<std::size_t>(n));
  ::close(pipefd[0]);
  int st = 0;
  while (::waitpid(pid, &st, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
}

Result<std::map<std::string, std::string>> parse_network_map(const std::vector<std::string>& v) {
  std::map<std::string, std::string> m;
  for (const auto& s : v) {
    const auto eq = s.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == s.size())
      return Status::error(Errc::invalid_argument,
                           "--network-map '" + s + "': expected SRC=DST (network or bridge names)");
    if (!m.emplace(s.substr(0, eq), s.substr(eq + 1)).second)
      return Status::error(Errc::invalid_argument,
                           "--network-map names '" + s.substr(0, eq) + "' twice");
  }
  return m;
}

std::uint64_t now_unix_ns() {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::system_clock::now().time_since_epoch())
                                        .count());
}

}  // namespace ferry::tools::failover_util
