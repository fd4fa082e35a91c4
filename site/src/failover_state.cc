// The failover marker of a group (failover_state.h). Plain POSIX I/O: it is a few hundred
// bytes written once or twice per failover, read by the receiver at hello and rp_begin.
#include "ferry/site/failover_state.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <ctime>
#include <sstream>

#include "ferry/base/fd.h"

namespace ferry::site {
namespace {

std::string iso_minute(std::uint64_t unix_ns) {
  const std::time_t t = static_cast<std::time_t>(unix_ns / 1000000000ull);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%MZ", &tm);
  return buf;
}

Status sync_dir(const std::string& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return Status::from_errno(errno, "open " + dir);
  if (::fsync(fd.get()) != 0) return Status::from_errno(errno, "fsync " + dir);
  return Status::ok();
}

}  // namespace

Result<std::optional<FailoverState>> read_failover_state(const std::string& group_dir) {
  const std::string path = group_dir + "/" + kFailoverStateFile;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT) return std::optional<FailoverState>();
    return Status::from_errno(errno, "open " + path);
  }
  char buf[kMaxFailoverStateBytes];
  std::size_t got = 0;
  while (got < sizeof buf) {
    const ssize_t n = ::read(fd.get(), buf + got, sizeof buf - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::from_errno(errno, "read " + path);
    if (n == 0) break;
    got += static_cast<std::size_t>(n);
  }
  FailoverState s;
  std::istringstream in(std::string(buf, got));
  for (std::string line; std::getline(in, line);) {
    const auto eq = line.find('=');
    if (eq == std::string::npos) continue;
    const std::string k = line.substr(0, eq), v = line.substr(eq + 1);
    try {
      if (k == "rp") s.rp_id = std::stoull(v);
      if (k == "since_unix_ns") s.since_unix_ns = std::stoull(v);
    } catch (const std::exception&) {
      // A damaged number: the group is still failed over (fail safe), the RP unknown.
    }
    if (k == "domain") s.domain = v;
  }
  return std::optional<FailoverState>(std::move(s));
}

Status write_failover_state(const std::string& group_dir, const FailoverState& s) {
  const std::string path = group_dir + "/" + kFailoverStateFile, tmp = path + ".tmp";
  const std::string text = "ferry-failover=1\nrp=" + std::to_string(s.rp_id) +
                           "\nsince_unix_ns=" + std::to_string(s.since_unix_ns) +
                           "\ndomain=" + s.domain + "\n";
  if (text.size() > kMaxFailoverStateBytes)
    return Status::error(Errc::invalid_argument, "failover state of " + group_dir + " too large");
  {
    UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd.valid()) return Status::from_errno(errno, "create " + tmp);
    if (::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size()))
      return Status::from_errno(errno ? errno : EIO, "write " + tmp);
    if (::fsync(fd.get()) != 0) return Status::from_errno(errno, "fsync " + tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Status::from_errno(errno, "rename " + tmp);
  return sync_dir(group_dir);
}

bool failed_over(const std::string& group_dir) {
  struct stat st {};
  const std::string path = group_dir + "/" + kFailoverStateFile;
  if (::stat(path.c_str(), &st) == 0) return true;
  return errno != ENOENT;  // cannot tell: refuse rather than write under a running VM
}

std::string failover_refusal(const std::string& group, const FailoverState& s) {
  std::string at = s.rp_id != 0 ? "at RP " + std::to_string(s.rp_id) : "(RP being chosen)";
  std::string when = s.since_unix_ns != 0 ? " on " + iso_minute(s.since_unix_ns) : "";
  return "group '" + group + "' was failed over " + at + when +
         " (ferry failover); it accepts no RPs until failback";
}

std::optional<std::string> failover_refusal_for(const std::string& group_dir,
                                                const std::string& group) {
  if (!failed_over(group_dir)) return std::nullopt;
  auto s = read_failover_state(group_dir);
  if (!s.is_ok() || !s->has_value())
    return failover_refusal(group, FailoverState{});  // present (or unreadable): refuse
  return failover_refusal(group, **s);
}

}  // namespace ferry::site
