#include "ferry/site/rp_times.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <sstream>
#include <vector>

#include "ferry/base/fd.h"

namespace ferry::site {
namespace {

constexpr const char* kHeader = "ferry-rp-times 1\n";
constexpr std::size_t kMaxLineBytes = 256;

std::string path_of(const std::string& root, const std::string& group) {
  return root + "/" + group + "/rp-times";
}

Status write_all(int fd, const std::string& s, const std::string& path) {
  std::size_t at = 0;
  while (at < s.size()) {
    ssize_t n = ::write(fd, s.data() + at, s.size() - at);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::from_errno(errno, "write " + path);
    at += std::size_t(n);
  }
  return Status::ok();
}

Result<std::string> read_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return Status::from_errno(errno, "open " + path);
  std::string out;
  char buf[16384];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::from_errno(errno, "read " + path);
    if (n == 0) break;
    out.append(buf, std::size_t(n));
    if (out.size() > 2 * kMaxRpTimesFileBytes)  // never read more than twice the bound
      return Status::error(Errc::corrupt, path + " is larger than " +
                                              std::to_string(2 * kMaxRpTimesFileBytes) + " bytes");
  }
  return out;
}

// Keeps the newest half of the lines (by position: lines are appended in RP order).
Status trim(const std::string& path, const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);)
    if (!l.empty() && l.rfind("ferry-rp-times", 0) != 0) lines.push_back(l);
  std::string out = kHeader;
  for (std::size_t i = lines.size() / 2; i < lines.size(); ++i) out += lines[i] + "\n";
  const std::string tmp = path + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd.valid()) return Status::from_errno(errno, "create " + tmp);
  FERRY_TRY(write_all(fd.get(), out, tmp));
  if (::rename(tmp.c_str(), path.c_str()) != 0) return Status::from_errno(errno, "rename " + tmp);
  return Status::ok();
}

}  // namespace

std::string encode_rp_times_line(const RpTimesRecord& r) {
  char buf[kMaxLineBytes];
  int n;
  if (r.source)
    n = std::snprintf(buf, sizeof buf, "%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu\n",
                      (unsigned long long)r.rp_id, (unsigned long long)r.source->slot_us,
                      (unsigned long long)r.source->capture_us, (unsigned long long)r.source->read_us,
                      (unsigned long long)r.source->hash_compress_us,
                      (unsigned long long)r.source->send_us, (unsigned long long)r.receive_us,
                      (unsigned long long)r.durable_us, (unsigned long long)r.ack_us,
                      (unsigned long long)r.apply_us);
  else
    n = std::snprintf(buf, sizeof buf, "%llu - - - - - %llu %llu %llu %llu\n",
                      (unsigned long long)r.rp_id, (unsigned long long)r.receive_us,
                      (unsigned long long)r.durable_us, (unsigned long long)r.ack_us,
                      (unsigned long long)r.apply_us);
  FERRY_ASSERT(n > 0 && std::size_t(n) < sizeof buf);
  return std::string(buf, std::size_t(n));
}

Result<RpTimesRecord> decode_rp_times_line(const std::string& line) {
  auto bad = [&line](const std::string& why) {
    return Status::error(Errc::corrupt, "rp-times line '" + line.substr(0, 80) + "': " + why);
  };
  if (line.size() > kMaxLineBytes) return bad("too long");
  std::istringstream in(line);
  std::vector<std::string> f;
  for (std::string w; in >> w;) f.push_back(w);
  if (f.size() != 10) return bad("not 10 fields");
  auto num = [](const std::string& s, std::uint64_t* v) {
    if (s.empty() || s.size() > 20) return false;
    std::uint64_t x = 0;
    for (char c : s) {
      if (c < '0' || c > '9') return false;
      const std::uint64_t d = std::uint64_t(c - '0');
      if (x > (UINT64_MAX - d) / 10) return false;
      x = x * 10 + d;
    }
    *v = x;
    return true;
  };
  RpTimesRecord r;
  if (!num(f[0], &r.rp_id)) return bad("rp_id");
  if (f[1] != "-") {
    RpTimesRecord::Source s;
    if (!num(f[1], &s.slot_us) || !num(f[2], &s.capture_us) || !num(f[3], &s.read_us) ||
        !num(f[4], &s.hash_compress_us) || !num(f[5], &s.send_us))
      return bad("source stages");
    r.source = s;
  } else if (f[2] != "-" || f[3] != "-" || f[4] != "-" || f[5] != "-") {
    return bad("source stages half given");
  }
  if (!num(f[6], &r.receive_us) || !num(f[7], &r.durable_us) || !num(f[8], &r.ack_us) ||
      !num(f[9], &r.apply_us))
    return bad("receiver stages");
  return r;
}

Status append_rp_times(const std::string& root, const std::string& group, const RpTimesRecord& r) {
  const std::string path = path_of(root, group);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (!fd.valid()) return Status::from_errno(errno, "open " + path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return Status::from_errno(errno, "stat " + path);
  std::string line = (st.st_size == 0 ? std::string(kHeader) : std::string()) + encode_rp_times_line(r);
  FERRY_TRY(write_all(fd.get(), line, path));
  if (std::uint64_t(st.st_size) + line.size() <= kMaxRpTimesFileBytes) return Status::ok();
  fd.reset();
  FERRY_ASSIGN_OR_RETURN(std::string text, read_file(path));
  return trim(path, text);
}

Result<std::map<std::uint64_t, RpTimesRecord>> read_rp_times(const std::string& root,
                                                             const std::string& group) {
  std::map<std::uint64_t, RpTimesRecord> out;
  const std::string path = path_of(root, group);
  if (::access(path.c_str(), F_OK) != 0) return out;
  FERRY_ASSIGN_OR_RETURN(std::string text, read_file(path));
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) {
    if (l.empty() || l.rfind("ferry-rp-times", 0) == 0) continue;
    auto r = decode_rp_times_line(l);
    if (r.is_ok()) out[r->rp_id] = *r;
  }
  return out;
}

}  // namespace ferry::site
