// The cross-VM instant: freeze, suspend, start every job, resume, thaw (group_capture.h).
#include "group_capture.h"

#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "ferry/base/log.h"

namespace ferry::cbt {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kResumeAttempts = 3;
constexpr auto kResumeRetry = std::chrono::milliseconds(100);

// Which members are paused, shared with the watchdog. resume_all() resumes each paused member
// exactly once, whoever calls it first.
class PauseState {
 public:
  explicit PauseState(const std::vector<GroupMember*>& members)
      : members_(members), paused_(members.size(), false) {}

  // False when the watchdog already fired: the caller must not suspend anything more.
  bool begin_suspend() {
    std::lock_guard lock(mu_);
    if (!first_) first_ = Clock::now();
    return !timed_out_;
  }
  void mark_paused(std::size_t i) {
    std::lock_guard lock(mu_);
    paused_[i] = true;
  }
  bool timed_out() {
    std::lock_guard lock(mu_);
    return timed_out_;
  }
  // Resumes every paused member; the first failure to resume is returned (after retries).
  Status resume_all(bool from_watchdog) {
    std::lock_guard lock(mu_);
    if (from_watchdog) timed_out_ = true;
    Status first_error;
    for (std::size_t i = 0; i < members_.size(); ++i) {
      if (!paused_[i]) continue;
      Status s;
      for (int attempt = 0; attempt < kResumeAttempts; ++attempt) {
        s = members_[i]->resume();
        if (s.is_ok()) break;
        std::this_thread::sleep_for(kResumeRetry);
      }
      if (!s) {
        spdlog::error("domain {} could not be resumed and stays PAUSED: {}",
                      members_[i]->member_name(), s.to_string());
        if (first_error.is_ok()) first_error = s;
      }
      paused_[i] = false;
      last_ = Clock::now();
    }
    return first_error;
  }
  std::uint64_t pause_us() {
    std::lock_guard lock(mu_);
    if (!first_ || !last_) return 0;
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(*last_ - *first_).count());
  }

 private:
  const std::vector<GroupMember*>& members_;
  std::mutex mu_;
  std::vector<bool> paused_;
  bool timed_out_ = false;
  std::optional<Clock::time_point> first_, last_;
};

// Resumes the members once max_pause has passed, unless stopped first.
class Watchdog {
 public:
  Watchdog(PauseState& state, std::chrono::milliseconds max_pause)
      : thread_([this, &state, max_pause] {
          std::unique_lock lock(mu_);
          if (cv_.wait_for(lock, max_pause, [this] { return stop_; })) return;
          lock.unlock();
          spdlog::error("the group's domains were paused for {} ms, the limit: resuming them",
                        max_pause.count());
          (void)state.resume_all(true);
        }) {}
  ~Watchdog() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members above exist
};

// Suspends every member, then starts every job at once, one thread per member (bounded by
// the group's size): the pause lasts as long as the slowest start, not their sum. Nothing
// more is suspended or started once the watchdog fired.
Status pause_and_start(const std::vector<GroupMember*>& members, PauseState& pause,
                       std::vector<bool>& started, std::vector<std::uint64_t>& start_us) {
  for (std::size_t i = 0; i < members.size(); ++i) {
    if (!pause.begin_suspend()) return Status::ok();  // the caller reports the timeout
    FERRY_TRY(members[i]->suspend());
    pause.mark_paused(i);
  }
  if (pause.timed_out()) return Status::ok();
  std::vector<Status> results(members.size());
  {
    std::vector<std::jthread> starts;
    starts.reserve(members.size());
    for (std::size_t i = 0; i < members.size(); ++i)
      starts.emplace_back([&members, &results, &start_us, i] {
        const auto t0 = Clock::now();
        results[i] = members[i]->start_job();
        start_us[i] = static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t0).count());
      });
  }  // joined
  Status first;
  for (std::size_t i = 0; i < members.size(); ++i) {
    if (results[i].is_ok()) started[i] = true;
    else if (first.is_ok()) first = results[i];
  }
  return first;
}

}  // namespace

Result<Instant> capture_instant(const std::vector<GroupMember*>& members,
                                const InstantOptions& options) {
  FERRY_ASSERT(!members.empty());
  FERRY_ASSERT(options.max_pause.count() > 0);
  Instant out;
  std::vector<bool> frozen(members.size(), false), started(members.size(), false);
  if (options.quiesce) {
    out.app_consistent = true;
    for (std::size_t i = 0; i < members.size(); ++i) {
      Status s = members[i]->freeze();
      if (s.is_ok()) {
        frozen[i] = true;
        continue;
      }
      spdlog::warn("{}: the RP is crash-consistent across the group, not application-consistent",
                   s.to_string());
      out.app_consistent = false;
    }
  }
  PauseState pause(members);
  Status run, resumed;
  {
    Watchdog dog(pause, options.max_pause);
    out.start_us.assign(members.size(), 0);
    run = pause_and_start(members, pause, started, out.start_us);
    resumed = pause.resume_all(false);
  }
  out.pause_us = pause.pause_us();
  for (std::size_t i = 0; i < members.size(); ++i) {
    if (!frozen[i]) continue;
    if (Status s = members[i]->thaw(); !s.is_ok())
      spdlog::error("THAWING domain {} failed (its file systems may stay frozen): {}",
                    members[i]->member_name(), s.to_string());
  }
  Status failed = run;
  if (pause.timed_out())
    failed = Status::error(Errc::timeout,
                           fmt::format("pause timeout: the group's {} domain(s) were paused "
                                       "longer than {} ms while their backups started; "
                                       "resumed, this RP is not taken",
                                       members.size(), options.max_pause.count()))
                 .set_retryable();
  else if (failed.is_ok() && !resumed.is_ok())
    failed = resumed;
  if (!failed.is_ok()) {
    for (std::size_t i = 0; i < members.size(); ++i)
      if (started[i]) members[i]->abandon_job();
    return failed;
  }
  return out;
}

}  // namespace ferry::cbt
