#include "flusher.h"

#include <spdlog/spdlog.h>

#include <thread>
#include <vector>

#include "ferry/events/event_log.h"

namespace ferry::events {

Flusher& Flusher::instance() {
  // Never destroyed: logs may be closed by other static destructors at exit.
  static Flusher* f = [] {
    auto* p = new Flusher();
    std::thread([p] { p->loop(); }).detach();
    return p;
  }();
  return *f;
}

void Flusher::add(EventLog* log) {
  std::lock_guard lock(mu_);
  logs_.insert(log);
}

void Flusher::remove(EventLog* log) {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return busy_ != log; });
  logs_.erase(log);
}

void Flusher::wake() {
  {
    std::lock_guard lock(mu_);
    pending_ = true;
  }
  cv_.notify_all();
}

void Flusher::loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return pending_; });
    pending_ = false;
    lock.unlock();
    std::this_thread::sleep_for(kSyncInterval);  // the batch: later writes share the sync
    lock.lock();
    const std::vector<EventLog*> logs(logs_.begin(), logs_.end());
    for (EventLog* log : logs) {
      if (logs_.count(log) == 0) continue;  // closed meanwhile
      busy_ = log;
      lock.unlock();
      Status s = log->sync();
      if (!s.is_ok()) spdlog::warn("event log: {}", s.to_string());
      lock.lock();
      busy_ = nullptr;
      cv_.notify_all();
    }
  }
}

}  // namespace ferry::events
