// ferry demo: a live replication on this machine with embedded defaults.
//
// Starts qemu-storage-daemon with a qcow2 disk in a temporary directory and a writable FUSE
// export of its block node (so every write goes through QEMU's block layer and its dirty
// bitmap, as a guest's would), a receiver on loopback (in this process, real TCP), and a
// writer that changes the disk between recovery points. Each RP's source content is recorded
// as per-block xxh3 digests; at the end every RP is restored from the store and compared.
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ferry/base/fd.h"
#include "ferry/base/hash.h"
#include "ferry/base/log.h"
#include "ferry/cbt/qmp_source.h"
#include "ferry/site/receiver.h"
#include "ferry/site/store.h"
#include "ferry/source/sender.h"
#include "ferry/transport/connection.h"
#include "tools.h"

namespace ferry::tools {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
constexpr std::uint32_t kDigestBlock = 64 * 1024;

// A child process, killed and reaped on destruction.
class Child {
 public:
  static Result<Child> spawn(const std::vector<std::string>& argv, const std::string& log_path) {
    pid_t pid = fork();
    if (pid < 0) return Status::from_errno(errno, "fork");
    if (pid == 0) {
      int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      sigset_t none;
      sigemptyset(&none);
      pthread_sigmask(SIG_SETMASK, &none, nullptr);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
    return Child(pid);
  }
  Child(Child&& o) noexcept : pid_(std::exchange(o.pid_, -1)) {}
  ~Child() { stop(); }
  bool running() {
    if (pid_ < 0) return false;
    int st = 0;
    if (waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    return true;
  }
  void stop() {
    if (pid_ < 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 100 && running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (pid_ >= 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

 private:
  explicit Child(pid_t pid) : pid_(pid) {}
  pid_t pid_;
};

int run_cmd(const std::string& cmd) { return std::system(cmd.c_str()); }

// Deterministic content generator: a mix of what real disks hold.
class Writer {
 public:
  Writer(int fd, std::uint64_t size, std::uint64_t seed) : fd_(fd), size_(size), rng_(seed), shadow_(size, 0) {}

  // Writes `count` pieces of `min..max` bytes at random (unaligned) offsets; returns bytes.
  Result<std::uint64_t> round(int count, std::uint32_t min_len, std::uint32_t max_len) {
    std::uint64_t total = 0;
    std::vector<char> buf;
    for (int i = 0; i < count; ++i) {
      std::uint32_t len = min_len + static_cast<std::uint32_t>(rng_() % (max_len - min_len + 1));
      std::uint64_t off = rng_() % (size_ - len);
      if (rng_() % 3 == 0) off &= ~std::uint64_t(4095);  // some aligned, most not
      buf.resize(len);
      fill(buf);
      const char* p = buf.data();
      std::size_t left = len;
      std::uint64_t at = off;
      while (left > 0) {
        ssize_t w = ::pwrite(fd_, p, left, static_cast<off_t>(at));
        if (w < 0) return Status::from_errno(errno, "write to the FUSE export");
        p += w;
        at += static_cast<std::uint64_t>(w);
        left -= static_cast<std::size_t>(w);
      }
      std::memcpy(shadow_.data() + off, buf.data(), len);
      total += len;
    }
    if (::fsync(fd_) != 0) return Status::from_errno(errno, "fsync the FUSE export");
    return total;
  }

  std::vector<Hash128> digests() const { return digest_of(shadow_.data(), shadow_.size()); }

  static std::vector<Hash128> digest_of(const char* p, std::uint64_t size) {
    std::vector<Hash128> out;
    for (std::uint64_t at = 0; at < size; at += kDigestBlock)
      out.push_back(xxh3_128(p + at, std::min<std::uint64_t>(kDigestBlock, size - at)));
    return out;
  }
  const std::vector<char>& shadow() const { return shadow_; }

 private:
  void fill(std::vector<char>& b) {
    switch (rng_() % 4) {
      case 0:  // zeros over whatever was there
        std::fill(b.begin(), b.end(), 0);
        break;
      case 1: {  // text
        static const char* words[] = {"ferry ", "journal ", "bitmap ", "replica ", "recovery ",
                                      "point ", "qemu ", "block\n"};
        for (std::size_t i = 0; i < b.size();) {
          const char* w = words[rng_() % 8];
          for (; *w && i < b.size(); ++w) b[i++] = *w;
        }
        break;
      }
      case 2:  // random (incompressible)
        for (auto& c : b) c = static_cast<char>(rng_());
        break;
      default: {  // structured binary: small integers, like tables and executables
        for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<char>((i * 7 + rng_() % 4) & 0x3f);
      }
    }
  }
  int fd_;
  std::uint64_t size_;
  std::mt19937_64 rng_;
  std::vector<char> shadow_;
};

Status wait_until(const std::function<bool()>& ready, int timeout_ms, const std::string& what) {
  auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (Clock::now() < deadline) {
    if (ready()) return Status::ok();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return Status::error(Errc::timeout, what);
}

Result<std::vector<Hash128>> digest_file(const std::string& path, std::uint64_t size) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return Status::from_errno(errno, "open " + path);
  std::vector<char> buf(kDigestBlock);
  std::vector<Hash128> out;
  for (std::uint64_t at = 0; at < size; at += kDigestBlock) {
    std::size_t len = static_cast<std::size_t>(std::min<std::uint64_t>(kDigestBlock, size - at));
    ssize_t r = ::pread(fd.get(), buf.data(), len, static_cast<off_t>(at));
    if (r != static_cast<ssize_t>(len)) return Status::error(Errc::io, "short read of " + path);
    out.push_back(xxh3_128(buf.data(), len));
  }
  return out;
}

struct DemoEnv {
  std::string dir;
  bool keep = false;
  std::optional<Child> qsd;
  std::string fuse_path;
  ~DemoEnv() {
    qsd.reset();
    if (!fuse_path.empty()) run_cmd("umount -l '" + fuse_path + "' 2>/dev/null");
    if (!keep && !dir.empty()) {
      std::error_code ec;
      fs::remove_all(dir, ec);
    }
  }
};

Status check_tools() {
  for (const char* t : {"qemu-storage-daemon", "qemu-img"})
    if (run_cmd(std::string("command -v ") + t + " >/dev/null 2>&1") != 0)
      return Status::error(Errc::unsupported, std::string(t) + " is not installed (apt-get install qemu-system-common qemu-utils)");
  if (::access("/dev/fuse", R_OK | W_OK) != 0)
    return Status::error(Errc::unsupported, "/dev/fuse is not usable (the demo writes through a FUSE export)");
  return Status::ok();
}

int demo_fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "ferry demo: %s: %s\n", what.c_str(), s.to_string().c_str());
  return 1;
}

}  // namespace

int run_demo(const DemoArgs& args, const char* /*argv0*/) {
  init_logging("demo");
  if (Status s = check_tools(); !s.is_ok()) return demo_fail("prerequisites", s);
  DemoEnv env;
  if (!args.keep_dir.empty()) {
    env.dir = args.keep_dir;
    env.keep = true;
    if (Status s = make_dirs(env.dir); !s.is_ok()) return demo_fail("--keep", s);
  } else {
    char tmpl[] = "/tmp/ferry-demo-XXXXXX";
    if (!mkdtemp(tmpl)) return demo_fail("temporary directory", Status::from_errno(errno, "mkdtemp"));
    env.dir = tmpl;
  }
  const std::uint64_t size = std::uint64_t(args.disk_mib) << 20;
  const std::string image = env.dir + "/disk.qcow2", qmp = env.dir + "/qmp.sock";
  env.fuse_path = env.dir + "/disk.fuse";
  std::printf("ferry demo: working in %s\n", env.dir.c_str());
  if (run_cmd("qemu-img create -q -f qcow2 '" + image + "' " + std::to_string(size)) != 0)
    return demo_fail("qemu-img create", Status::error(Errc::external, "failed"));
  { UniqueFd f(::open(env.fuse_path.c_str(), O_CREAT | O_WRONLY, 0644)); }
  auto qsd = Child::spawn({"qemu-storage-daemon",
                           "--blockdev", "driver=file,filename=" + image + ",node-name=file0",
                           "--blockdev", "driver=qcow2,file=file0,node-name=disk0",
                           "--export", "type=fuse,id=fuse0,node-name=disk0,mountpoint=" + env.fuse_path + ",writable=on",
                           "--chardev", "socket,id=qmp0,path=" + qmp + ",server=on,wait=off",
                           "--monitor", "chardev=qmp0"},
                          env.dir + "/qsd.log");
  if (!qsd.is_ok()) return demo_fail("start qemu-storage-daemon", qsd.status());
  env.qsd.emplace(std::move(qsd).value());
  Status up = wait_until([&] {
    struct stat st{};
    return ::stat(env.fuse_path.c_str(), &st) == 0 && std::uint64_t(st.st_size) == size &&
           ::access(qmp.c_str(), F_OK) == 0;
  }, 15000, "qemu-storage-daemon did not come up (see " + env.dir + "/qsd.log)");
  if (!up.is_ok()) return demo_fail("qemu-storage-daemon", up);

  // The receiver, in this process, on a loopback port the kernel picks.
  site::ReceiverOptions ro;
  ro.store.root = env.dir + "/store";
  auto receiver = site::Receiver::create(ro);
  if (!receiver.is_ok()) return demo_fail("receiver", receiver.status());
  site::Receiver* r = receiver->get();
  auto server = transport::Server::listen({"127.0.0.1", 0}, {}, [r](transport::Connection& c) { r->serve(c); });
  if (!server.is_ok()) return demo_fail("listen on loopback", server.status());

  cbt::QmpSourceOptions qo;
  qo.qmp_socket = qmp;
  qo.group = "demo";
  qo.disks = {{"disk0", "disk0"}};
  qo.work_dir = env.dir + "/source";
  auto source = cbt::open_qmp_source(qo);
  if (!source.is_ok()) return demo_fail("QMP source", source.status());
  source::SenderOptions so;
  so.to = {"127.0.0.1", (*server)->port()};
  so.group = "demo";
  so.source_name = "demo";
  so.disk_names = {"disk0"};

  UniqueFd fd(::open(env.fuse_path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return demo_fail("open FUSE export", Status::from_errno(errno, env.fuse_path));
  Writer writer(fd.get(), size, 20261129);
  std::vector<std::vector<Hash128>> expected;
  std::vector<std::uint64_t> rp_ids;
  std::uint64_t written = 0, data_sent = 0, zero_sent = 0, wire = 0;
  double rp_seconds = 0;
  for (int i = 0; i < args.rps; ++i) {
    // The first RP carries an initial fill; later ones scattered small and large writes.
    auto w = i == 0 ? writer.round(64, 64 << 10, 1 << 20) : writer.round(300, 512, 256 << 10);
    if (!w.is_ok()) return demo_fail("writer", w.status());
    written += *w;
    expected.push_back(writer.digests());
    auto rp = source::take_recovery_point(**source, so);
    if (!rp.is_ok()) return demo_fail("recovery point " + std::to_string(i + 1), rp.status());
    for (const auto& d : rp->disks) {
      data_sent += d.data_bytes;
      zero_sent += d.zero_bytes;
    }
    wire += rp->wire_bytes;
    rp_seconds += rp->total_seconds;
    rp_ids.push_back(rp->rp_id);
    std::printf("  %s\n", source::describe(*rp).c_str());
  }
  // The source itself must equal what the writer believes it wrote.
  auto src = digest_file(env.fuse_path, size);
  if (!src.is_ok()) return demo_fail("read the source back", src.status());
  int mismatches = (*src == expected.back()) ? 0 : 1;
  if (mismatches) std::printf("  source differs from the writer's record\n");
  for (std::size_t i = 0; i < rp_ids.size(); ++i) {
    std::string out = env.dir + "/restore-" + std::to_string(rp_ids[i]) + ".img";
    Status s = site::restore_point(ro.store.root, "demo", rp_ids[i], "disk0", out);
    if (!s.is_ok()) return demo_fail("restore RP " + std::to_string(rp_ids[i]), s);
    auto got = digest_file(out, size);
    if (!got.is_ok()) return demo_fail("read restored image", got.status());
    std::size_t bad = 0;
    for (std::size_t b = 0; b < got->size(); ++b) bad += !((*got)[b] == expected[i][b]);
    std::printf("  restore of RP %llu: %s\n", (unsigned long long)rp_ids[i],
                bad ? (std::to_string(bad) + " blocks differ").c_str() : "identical to the source at that point");
    mismatches += bad != 0;
    std::error_code ec;
    fs::remove(out, ec);
  }
  (*server)->stop();
  std::printf("ferry demo: %zu RPs; the writer changed %s through QEMU; sent %s of data blocks "
              "and %s of zero ranges (unallocated space of the first, full RP included) as %s on "
              "the wire; %.1f s in RPs (%.0f MB/s of blocks); check: %s\n",
              rp_ids.size(), human_bytes(written).c_str(), human_bytes(data_sent).c_str(),
              human_bytes(zero_sent).c_str(), human_bytes(wire).c_str(), rp_seconds,
              rp_seconds > 0 ? double(data_sent + zero_sent) / 1e6 / rp_seconds : 0.0,
              mismatches ? "FAILED" : "every RP restored byte-identical to the source at that point");
  return mismatches ? 1 : 0;
}

}  // namespace ferry::tools
