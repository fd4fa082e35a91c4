#include "qsd_harness.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include <fmt/format.h>

#include "ferry/base/fd.h"

extern char** environ;

namespace ferry::cbt::test {
namespace {

constexpr auto kStartTimeout = std::chrono::seconds(20);
constexpr auto kQmpTimeout = std::chrono::milliseconds(20000);

Result<pid_t> spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&fa, 1, 2);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) return Status::from_errno(rc, "spawn " + argv[0]);
  return pid;
}

Status run_wait(const std::vector<std::string>& argv, const std::string& log_path) {
  FERRY_ASSIGN_OR_RETURN(pid_t pid, spawn(argv, log_path));
  int st = 0;
  if (::waitpid(pid, &st, 0) < 0) return Status::from_errno(errno, "waitpid " + argv[0]);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
    return Status::error(Errc::external, fmt::format("{} failed (status {}), see {}", argv[0], st,
                                                     log_path));
  return Status::ok();
}

bool is_mounted(const std::string& path) {
  std::ifstream m("/proc/self/mounts");
  std::string dev, mnt, rest;
  while (m >> dev >> mnt && std::getline(m, rest))
    if (mnt == path) return true;
  return false;
}

bool on_path(const std::string& exe) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  for (std::size_t at = 0; at <= dirs.size();) {
    std::size_t colon = dirs.find(':', at);
    if (colon == std::string::npos) colon = dirs.size();
    if (::access((dirs.substr(at, colon - at) + "/" + exe).c_str(), X_OK) == 0) return true;
    at = colon + 1;
  }
  return false;
}

}  // namespace

bool Qsd::available() {
  return on_path("qemu-storage-daemon") && on_path("qemu-img") &&
         ::access("/dev/fuse", R_OK | W_OK) == 0;
}

std::string Qsd::image_path(const QsdDisk& d) const {
  return dir_ + "/" + d.node + (d.qcow2 ? ".qcow2" : ".raw");
}

Result<std::unique_ptr<Qsd>> Qsd::start(std::vector<QsdDisk> disks) {
  std::unique_ptr<Qsd> q(new Qsd);
  char tmpl[] = "/tmp/ferry-cbt-XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) return Status::from_errno(errno, "mkdtemp");
  q->dir_ = tmpl;
  q->disks_ = std::move(disks);
  for (const QsdDisk& d : q->disks_) {
    FERRY_TRY(run_wait({"qemu-img", "create", "-q", "-f", d.qcow2 ? "qcow2" : "raw",
                        q->image_path(d), std::to_string(d.size_bytes)},
                       q->dir_ + "/qemu-img.log"));
    UniqueFd mp(::open(q->fuse_path(d.node).c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    if (!mp.valid()) return Status::from_errno(errno, "create FUSE mountpoint");
  }
  FERRY_TRY(q->launch());
  return q;
}

Status Qsd::launch() {
  std::vector<std::string> argv = {"qemu-storage-daemon"};
  for (const QsdDisk& d : disks_) {
    if (d.qcow2) {
      argv.insert(argv.end(), {"--blockdev", fmt::format("driver=file,node-name={}-file,"
                                                         "filename={}", d.node, image_path(d)),
                               "--blockdev", fmt::format("driver=qcow2,node-name={},file={}-file",
                                                         d.node, d.node)});
    } else {
      argv.insert(argv.end(), {"--blockdev", fmt::format("driver=file,node-name={},filename={}",
                                                         d.node, image_path(d))});
    }
    argv.insert(argv.end(), {"--export", fmt::format("type=fuse,id=fuse-{},node-name={},"
                                                     "mountpoint={},writable=on",
                                                     d.node, d.node, fuse_path(d.node))});
  }
  argv.insert(argv.end(),
              {"--chardev", fmt::format("socket,id=qmp0,path={},server=on,wait=off", qmp_socket()),
               "--monitor", "chardev=qmp0", "--chardev",
               fmt::format("socket,id=qmp1,path={}/test-qmp.sock,server=on,wait=off", dir_),
               "--monitor", "chardev=qmp1"});
  ::unlink(qmp_socket().c_str());
  ::unlink((dir_ + "/test-qmp.sock").c_str());
  FERRY_ASSIGN_OR_RETURN(pid_, spawn(argv, dir_ + "/qsd.log"));
  auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  for (;;) {
    auto m = QmpClient::connect(dir_ + "/test-qmp.sock", kQmpTimeout);
    if (m) {
      monitor_ = std::move(*m);
      break;
    }
    int st = 0;
    if (::waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      return Status::error(Errc::external, "qemu-storage-daemon exited at start, see " + dir_ +
                                               "/qsd.log");
    }
    if (std::chrono::steady_clock::now() > deadline)
      return Status::error(Errc::timeout, "qemu-storage-daemon did not start, see " + dir_);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (const QsdDisk& d : disks_)
    if (!is_mounted(fuse_path(d.node)))
      return Status::error(Errc::external, "FUSE export not mounted at " + fuse_path(d.node));
  return Status::ok();
}

void Qsd::kill_and_unmount(bool graceful) {
  if (pid_ > 0) {
    if (graceful && monitor_) (void)monitor_->execute("quit", kQmpTimeout);
    monitor_.reset();
    if (!graceful) ::kill(pid_, SIGKILL);
    // A clean quit should end within seconds; never wait forever.
    for (int i = 0; i < 500; ++i) {
      int st = 0;
      if (::waitpid(pid_, &st, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }
  monitor_.reset();
  for (const QsdDisk& d : disks_)
    if (is_mounted(fuse_path(d.node))) ::umount2(fuse_path(d.node).c_str(), MNT_DETACH);
}

Status Qsd::restart_clean() {
  kill_and_unmount(true);
  return launch();
}

Status Qsd::restart_killed() {
  kill_and_unmount(false);
  return launch();
}

Qsd::~Qsd() {
  kill_and_unmount(false);
  if (!dir_.empty() && std::getenv("FERRY_KEEP_TEST_DIR") == nullptr) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

Status Qsd::write(const std::string& node, std::uint64_t offset_bytes, const std::string& data) {
  UniqueFd fd(::open(fuse_path(node).c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return Status::from_errno(errno, "open " + fuse_path(node));
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::pwrite(fd.get(), data.data() + done, data.size() - done,
                         static_cast<off_t>(offset_bytes + done));
    if (n <= 0) return Status::from_errno(n < 0 ? errno : EIO, "pwrite " + fuse_path(node));
    done += static_cast<std::size_t>(n);
  }
  if (::fsync(fd.get()) != 0) return Status::from_errno(errno, "fsync " + fuse_path(node));
  return Status::ok();
}

Status Qsd::write_zeroes(const std::string& node, std::uint64_t offset_bytes,
                         std::uint64_t length) {
  UniqueFd fd(::open(fuse_path(node).c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return Status::from_errno(errno, "open " + fuse_path(node));
  if (::fallocate(fd.get(), FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset_bytes),
                  static_cast<off_t>(length)) != 0)
    return Status::from_errno(errno, "fallocate ZERO_RANGE " + fuse_path(node));
  if (::fsync(fd.get()) != 0) return Status::from_errno(errno, "fsync " + fuse_path(node));
  return Status::ok();
}

Result<std::vector<std::string>> Qsd::nodes_with_prefix(const std::string& prefix) {
  FERRY_ASSIGN_OR_RETURN(json nodes, monitor_->execute("query-named-block-nodes",
                                                       {{"flat", true}}, kQmpTimeout));
  std::vector<std::string> out;
  for (const json& n : nodes) {
    std::string name = n.value("node-name", std::string());
    if (name.rfind(prefix, 0) == 0) out.push_back(name);
  }
  return out;
}

}  // namespace ferry::cbt::test
