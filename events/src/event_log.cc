#include "ferry/events/event_log.h"

#include "flusher.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

namespace ferry::events {
namespace {

constexpr const char* kCurrent = "events.jsonl";
constexpr const char* kPrevious = "events.1.jsonl";
constexpr const char* kLock = "events.lock";

// Held while appending or rotating, across processes.
class FileLock {
 public:
  explicit FileLock(int fd) : fd_(fd) { ok_ = fd_ >= 0 && ::flock(fd_, LOCK_EX) == 0; }
  ~FileLock() {
    if (ok_) (void)::flock(fd_, LOCK_UN);
  }
  bool ok() const { return ok_; }

 private:
  int fd_;
  bool ok_ = false;
};

nlohmann::json to_json(const Event& e) {
  nlohmann::json j;
  j["time"] = format_time_us(e.time_us);
  j["group"] = e.group;
  j["kind"] = e.kind;
  j["rp"] = e.rp;
  j["disk"] = e.disk;
  j["priority"] = static_cast<int>(e.priority);
  j["message"] = e.message;
  nlohmann::json f = nlohmann::json::object();
  for (const Field& x : e.fields) {
    if (const auto* n = std::get_if<std::int64_t>(&x.value))
      f[x.key] = *n;
    else
      f[x.key] = std::get<std::string>(x.value);
  }
  j["fields"] = std::move(f);
  return j;
}

std::string dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Parses "YYYY-MM-DDTHH:MM:SS[.ffffff](Z|+hh:mm|-hh:mm)" into unix microseconds.
Result<std::int64_t> parse_rfc3339(std::string_view s) {
  auto bad = [&] {
    return Status::error(Errc::invalid_argument,
                         "'" + std::string(s) + "' is not an RFC 3339 time (2026-12-08T02:50:00Z) "
                         "nor an age like 90s, 10m, 2h, 3d");
  };
  int Y, M, D, h, m, sec, n = 0;
  const std::string str(s);
  if (std::sscanf(str.c_str(), "%4d-%2d-%2d%*1[Tt ]%2d:%2d:%2d%n", &Y, &M, &D, &h, &m, &sec, &n) != 6 ||
      n != 19)
    return bad();
  if (M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || m > 59 || sec > 60) return bad();
  std::size_t i = 19;
  std::int64_t frac_us = 0;
  if (i < str.size() && str[i] == '.') {
    ++i;
    int digits = 0;
    while (i < str.size() && std::isdigit(static_cast<unsigned char>(str[i]))) {
      if (digits < 6) frac_us = frac_us * 10 + (str[i] - '0');
      ++digits, ++i;
    }
    if (digits == 0) return bad();
    for (; digits < 6; ++digits) frac_us *= 10;
  }
  std::int64_t offset_s = 0;
  if (i < str.size() && (str[i] == 'Z' || str[i] == 'z')) {
    ++i;
  } else if (i + 6 == str.size() && (str[i] == '+' || str[i] == '-') && str[i + 3] == ':') {
    int oh = 0, om = 0;
    if (std::sscanf(str.c_str() + i + 1, "%2d:%2d", &oh, &om) != 2 || oh > 23 || om > 59)
      return bad();
    offset_s = (oh * 3600 + om * 60) * (str[i] == '+' ? 1 : -1);
    i += 6;
  } else {
    return bad();
  }
  if (i != str.size()) return bad();
  std::tm tm{};
  tm.tm_year = Y - 1900;
  tm.tm_mon = M - 1;
  tm.tm_mday = D;
  tm.tm_hour = h;
  tm.tm_min = m;
  tm.tm_sec = sec;
  const std::int64_t t = ::timegm(&tm);
  return (t - offset_s) * 1000000 + frac_us;
}

}  // namespace

std::int64_t unix_now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string format_time_us(std::int64_t unix_us) {
  const std::time_t secs = static_cast<std::time_t>(unix_us / 1000000);
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  char buf[48];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ", tm.tm_year + 1900,
                tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                static_cast<int>(unix_us % 1000000));
  return buf;
}

std::string to_json_line(const Event& e) {
  nlohmann::json j = to_json(e);
  std::string line = dump(j);
  if (line.size() <= kMaxLineBytes) return line;
  // Too long: shorten the free text, then every string field, until it fits.
  for (std::size_t cap : {1024u, 256u, 64u}) {
    if (j["message"].get<std::string>().size() > cap)
      j["message"] = j["message"].get<std::string>().substr(0, cap) + "...";
    for (auto& [k, v] : j["fields"].items())
      if (v.is_string() && v.get<std::string>().size() > cap)
        v = v.get<std::string>().substr(0, cap) + "...";
    line = dump(j);
    if (line.size() <= kMaxLineBytes) return line;
  }
  j["fields"] = nlohmann::json::object({{"truncated", true}});
  j["group"] = j["group"].get<std::string>().substr(0, 256);
  j["disk"] = j["disk"].get<std::string>().substr(0, 256);
  j["kind"] = j["kind"].get<std::string>().substr(0, 64);
  line = dump(j);
  FERRY_ASSERT(line.size() <= kMaxLineBytes);
  return line;
}

Result<Event> from_json_line(std::string_view line) {
  nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
  auto str = [&](const char* k) -> const std::string* {
    auto it = j.find(k);
    return it != j.end() && it->is_string() ? it->get_ptr<const std::string*>() : nullptr;
  };
  if (!j.is_object() || !str("time") || !str("group") || !str("kind"))
    return Status::error(Errc::corrupt, "not an event");
  Event e;
  FERRY_ASSIGN_OR_RETURN(e.time_us, parse_rfc3339(*str("time")));
  e.group = *str("group");
  e.kind = *str("kind");
  if (auto it = j.find("rp"); it != j.end() && it->is_number_unsigned()) e.rp = it->get<std::uint64_t>();
  if (const std::string* d = str("disk")) e.disk = *d;
  if (const std::string* m = str("message")) e.message = *m;
  if (auto it = j.find("priority"); it != j.end() && it->is_number_integer())
    e.priority = static_cast<Priority>(it->get<int>());
  if (auto it = j.find("fields"); it != j.end() && it->is_object())
    for (auto& [k, v] : it->items()) {
      if (v.is_number_integer())
        e.fields.push_back({k, v.get<std::int64_t>()});
      else if (v.is_string())
        e.fields.push_back({k, v.get<std::string>()});
      else
        e.fields.push_back({k, dump(v)});
    }
  return e;
}

Result<std::unique_ptr<EventLog>> EventLog::open(const EventLogOptions& options) {
  if (options.dir.empty()) return Status::error(Errc::invalid_argument, "no event log directory");
  if (options.max_file_bytes < kMinMaxFileBytes)
    return Status::error(Errc::invalid_argument,
                         "event log size " + std::to_string(options.max_file_bytes) +
                             " bytes is below the minimum " + std::to_string(kMinMaxFileBytes));
  FERRY_TRY(make_dirs(options.dir));
  std::unique_ptr<EventLog> log(new EventLog(options));
  log->lock_fd_.reset(::open((options.dir + "/" + kLock).c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!log->lock_fd_.valid())
    return Status::from_errno(errno, "open event log lock " + options.dir + "/" + kLock);
  {
    std::lock_guard lock(log->mu_);
    FERRY_TRY(log->reopen_if_rotated());
  }
  Flusher::instance().add(log.get());
  return log;
}

EventLog::~EventLog() {
  Flusher::instance().remove(this);
  if (fd_.valid() && dirty_) (void)::fdatasync(fd_.get());
}

// Opens events.jsonl unless our descriptor is still it (another process may have rotated);
// a file whose last byte is not a newline (a torn line) gets one, so the next event starts
// on its own line. Called with mu_ and (after open) the file lock held.
Status EventLog::reopen_if_rotated() {
  const std::string path = options_.dir + "/" + kCurrent;
  struct stat by_path{}, ours{};
  if (fd_.valid() && ::stat(path.c_str(), &by_path) == 0 && ::fstat(fd_.get(), &ours) == 0 &&
      by_path.st_ino == ours.st_ino && by_path.st_dev == ours.st_dev)
    return Status::ok();
  if (fd_.valid() && dirty_) (void)::fdatasync(fd_.get());
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0644));
  if (!fd.valid()) return Status::from_errno(errno, "open event log " + path);
  const off_t size = ::lseek(fd.get(), 0, SEEK_END);
  if (size > 0) {
    char last = '\n';
    if (::pread(fd.get(), &last, 1, size - 1) == 1 && last != '\n' &&
        ::write(fd.get(), "\n", 1) != 1)
      return Status::from_errno(errno, "end the torn last line of " + path);
  }
  fd_ = std::move(fd);
  return Status::ok();
}

Status EventLog::rotate() {
  const std::string cur = options_.dir + "/" + kCurrent;
  if (::fdatasync(fd_.get()) != 0) return Status::from_errno(errno, "fdatasync " + cur);
  if (::rename(cur.c_str(), (options_.dir + "/" + kPrevious).c_str()) != 0)
    return Status::from_errno(errno, "rotate " + cur);
  FERRY_TRY(fsync_parent_dir(cur));
  fd_.reset();
  dirty_ = false;
  return reopen_if_rotated();
}

Status EventLog::append(const std::string& line) {
  FileLock flock(lock_fd_.get());
  if (!flock.ok()) return Status::from_errno(errno, "lock the event log in " + options_.dir);
  FERRY_TRY(reopen_if_rotated());
  struct stat st{};
  if (::fstat(fd_.get(), &st) != 0) return Status::from_errno(errno, "stat the event log");
  if (st.st_size > 0 && std::uint64_t(st.st_size) + line.size() > options_.max_file_bytes)
    FERRY_TRY(rotate());
  // After a short write the next event starts on a line of its own (readers skip the torn one).
  if (torn_) {
    if (::write(fd_.get(), "\n", 1) != 1)
      return Status::from_errno(errno, "end a torn line of the event log in " + options_.dir);
    torn_ = false;
  }
  const ssize_t n = ::write(fd_.get(), line.data(), line.size());
  if (n < 0) return Status::from_errno(errno, "write the event log in " + options_.dir);
  dirty_ = true;
  torn_ = std::size_t(n) != line.size();
  if (torn_)  // ENOSPC or a file size limit part way
    return Status::error(Errc::no_space, "short write to the event log in " + options_.dir);
  return Status::ok();
}

void EventLog::emit(Event e) {
  if (e.time_us == 0) e.time_us = unix_now_us();
  const std::string line = to_json_line(e) + "\n";
  Status s;
  {
    std::lock_guard lock(mu_);
    s = append(line);
  }
  Flusher::instance().wake();
  if (!s.is_ok()) {
    const std::uint64_t n = ++write_failures_;
    spdlog::warn("event {} of group '{}' not written to the event log ({} failure(s) so far): {}",
                 e.kind, e.group, n, s.to_string());
  }
  if (options_.journald) {
    if (int r = send_to_journald(e); r < 0) {
      // journald not running (no socket) is normal outside systemd: counted, logged once.
      if (++journald_failures_ == 1)
        spdlog::debug("event log: journald not reached ({}); events go to {} only",
                      std::strerror(-r), options_.dir);
    }
  }
}

Status EventLog::sync() {
  UniqueFd dup;
  {
    std::lock_guard lock(mu_);
    if (!fd_.valid() || !dirty_) return Status::ok();
    dirty_ = false;
    // The sync runs on a duplicate without the lock, so emit() never waits for it.
    dup.reset(::dup(fd_.get()));
  }
  if (!dup.valid() || ::fdatasync(dup.get()) != 0) {
    ++write_failures_;
    return Status::from_errno(errno, "fdatasync the event log in " + options_.dir);
  }
  return Status::ok();
}

Result<ReadResult> read_events(const std::string& dir, std::int64_t since_us) {
  ReadResult out;
  for (const char* name : {kPrevious, kCurrent}) {
    const std::string path = dir + "/" + name;
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      if (errno == ENOENT) continue;
      return Status::from_errno(errno, "open " + path);
    }
    struct stat st{};
    if (::fstat(fd.get(), &st) != 0) return Status::from_errno(errno, "stat " + path);
    if (std::uint64_t(st.st_size) > kMaxReadBytes)
      return Status::error(Errc::corrupt, path + " is " + std::to_string(st.st_size) +
                                              " bytes, more than an event log holds");
    std::string data(static_cast<std::size_t>(st.st_size), '\0');
    std::size_t got = 0;
    while (got < data.size()) {
      const ssize_t n = ::pread(fd.get(), data.data() + got, data.size() - got, off_t(got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::from_errno(errno, "read " + path);
      if (n == 0) break;
      got += std::size_t(n);
    }
    data.resize(got);
    std::size_t line_no = 0;
    for (std::size_t at = 0; at < data.size();) {
      const std::size_t nl = data.find('\n', at);
      const bool whole = nl != std::string::npos;
      const std::string_view line(data.data() + at, (whole ? nl : data.size()) - at);
      at = whole ? nl + 1 : data.size();
      ++line_no;
      if (line.empty()) continue;
      auto e = whole ? from_json_line(line) : Result<Event>(Status::error(Errc::corrupt, "torn"));
      if (!e.is_ok()) {
        out.notes.push_back(std::string(name) + " line " + std::to_string(line_no) +
                            (whole ? ": not an event (torn by a crash?): skipped"
                                   : ": torn last line (no newline): skipped"));
        continue;
      }
      if (e->time_us >= since_us) out.events.push_back(std::move(e).value());
    }
  }
  return out;
}

Result<std::int64_t> parse_since(std::string_view text, std::int64_t now_us) {
  if (text.empty()) return Status::error(Errc::invalid_argument, "--since is empty");
  const char unit = text.back();
  const std::string_view digits = text.substr(0, text.size() - 1);
  // At most 6 digits: 999999 days in microseconds still fits an int64.
  const bool relative = !digits.empty() && digits.size() <= 6 &&
                        digits.find_first_not_of("0123456789") == std::string_view::npos;
  if (relative) {
    std::int64_t mult = 0;
    switch (unit) {
      case 's': mult = 1; break;
      case 'm': mult = 60; break;
      case 'h': mult = 3600; break;
      case 'd': mult = 86400; break;
      default: break;
    }
    if (mult != 0) return now_us - std::stoll(std::string(digits)) * mult * 1000000;
  }
  return parse_rfc3339(text);
}

std::string receiver_events_dir(const std::string& store_root, const std::string& group) {
  return store_root + "/" + group + "/events";
}

std::string source_events_dir(const std::string& work_dir, const std::string& group) {
  return work_dir + "/" + group + "/events";
}

}  // namespace ferry::events
