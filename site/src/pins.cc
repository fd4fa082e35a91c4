#include "pins.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <utility>

namespace ferry::site {
namespace {

std::atomic<std::uint64_t> g_pin_counter{0};

}  // namespace

Result<ReaderGate> ReaderGate::take(const std::string& group_dir, int op) {
  const std::string path = group_dir + "/READERS";
  ReaderGate g;
  g.fd_.reset(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!g.fd_.valid() && (errno == EACCES || errno == EROFS || errno == EPERM))
    return ReaderGate();  // a read-only store: nobody prunes it from here
  if (!g.fd_.valid()) return Status::from_errno(errno, "open " + path);
  while (::flock(g.fd_.get(), op) != 0)
    if (errno != EINTR) return Status::from_errno(errno, "flock " + path);
  return g;
}

Result<ReaderGate> ReaderGate::shared(const std::string& group_dir) {
  return take(group_dir, LOCK_SH);
}

Result<ReaderGate> ReaderGate::exclusive(const std::string& group_dir) {
  return take(group_dir, LOCK_EX);
}

Result<Pin> Pin::create(const std::string& group_dir, std::uint64_t rp_id, std::uint64_t base_rp,
                        std::uint64_t journal_gen) {
  const std::string dir = group_dir + "/pins";
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    if (errno == EACCES || errno == EROFS || errno == EPERM) return Pin();  // read-only store
    return Status::from_errno(errno, "create " + dir);
  }
  Pin p;
  p.path_ = dir + "/" + std::to_string(rp_id) + "." + std::to_string(base_rp) + ".g" +
            std::to_string(journal_gen) + "." + std::to_string(::getpid()) + "." + std::to_string(g_pin_counter++) + ".pin";
  p.fd_.reset(::open(p.path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644));
  if (!p.fd_.valid()) {
    if (errno == EACCES || errno == EROFS || errno == EPERM) return Pin();
    return Status::from_errno(errno, "create pin " + p.path_);
  }
  if (::flock(p.fd_.get(), LOCK_EX) != 0) return Status::from_errno(errno, "flock " + p.path_);
  return p;
}

Pin::Pin(Pin&& o) noexcept : path_(std::exchange(o.path_, {})), fd_(std::move(o.fd_)) {}

Pin& Pin::operator=(Pin&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::exchange(o.path_, {});
    fd_ = std::move(o.fd_);
  }
  return *this;
}

Pin::~Pin() { release(); }

void Pin::release() {
  if (!path_.empty() && fd_.valid()) ::unlink(path_.c_str());
  path_.clear();
  fd_.reset();
}

Result<std::vector<LivePin>> live_pins(const std::string& group_dir, bool remove_stale) {
  std::vector<LivePin> out;
  const std::string dir = group_dir + "/pins";
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return out;
    return Status::from_errno(errno, "open " + dir);
  }
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) names.emplace_back(e->d_name);
  ::closedir(d);
  for (const auto& n : names) {
    unsigned long long rp = 0, base = 0, gen = 0, pid = 0, k = 0;
    int used = 0;
    const bool named =
        (std::sscanf(n.c_str(), "%llu.%llu.g%llu.%llu.%llu.pin%n", &rp, &base, &gen, &pid, &k,
                     &used) == 5 &&
         static_cast<std::size_t>(used) == n.size()) ||
        // a pin of a build before journal generations: generation 0
        (std::sscanf(n.c_str(), "%llu.%llu.%llu.%llu.pin%n", &rp, &base, &pid, &k, &used) == 4 &&
         static_cast<std::size_t>(used) == n.size() && (gen = 0, true));
    if (!named) continue;
    const std::string path = dir + "/" + n;
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) continue;  // removed meanwhile by its owner
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) == 0) {
      if (remove_stale) ::unlink(path.c_str());  // its owner is gone
      continue;
    }
    if (errno != EWOULDBLOCK) return Status::from_errno(errno, "flock " + path);
    out.push_back(LivePin{rp, base, gen});
  }
  return out;
}

}  // namespace ferry::site
