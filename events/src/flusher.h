// The event logs' fdatasync, batched: one thread per process for every open log (a receiver
// keeps one log per group), started on first use. A log that was written is synced
// kSyncInterval after the write that woke the thread; everything written meanwhile shares
// that sync.
#pragma once

#include <condition_variable>
#include <mutex>
#include <set>

namespace ferry::events {

class EventLog;

class Flusher {
 public:
  static Flusher& instance();
  void add(EventLog* log);
  // After it returns the thread never touches `log` again (waits for a sync of it to end).
  void remove(EventLog* log);
  void wake();  // something was written

 private:
  Flusher() = default;
  void loop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::set<EventLog*> logs_;
  EventLog* busy_ = nullptr;  // being synced, without mu_
  bool pending_ = false;
};

}  // namespace ferry::events
