// The event log: per group, a durable, bounded, rotated log of structured events, on both
// ends (receiver: <store>/<group>/events/; source and agent: <state-dir>/<group>/events/).
//
// Each event is one JSON line {"time": RFC 3339 UTC with microseconds, "group", "kind",
// "rp", "disk", "fields": {...}} in events.jsonl; when appending a line would take the file
// past max_file_bytes it becomes events.1.jsonl (the previous one is dropped), so a group's
// log never exceeds 2 x max_file_bytes plus one line (kMaxLineBytes). Several processes may
// write one group's log (the receiver, `ferry prune`, `ferry export`): an flock on
// events.lock orders their appends and rotations.
//
// Durability rule (docs/operations.md): each event is written with one write() at once, so
// it survives the death of the process; fdatasync is batched: one flusher thread per process
// (for every log it has open) syncs each written file kSyncInterval after a write, and
// rotation and close sync. The RP path never waits for an event's fsync; a power cut may lose
// the events of the last kSyncInterval, never an RP. A line torn by a crash is skipped by readers with a note,
// and the writer starts its next event on a fresh line.
//
// Emitting never fails the caller: an event that cannot be written (or sent to journald) is
// logged at warning and counted (write_failures(), journald_failures()).
//
// The same events go to journald (sd_journal_send) with the fields FERRY_GROUP, FERRY_EVENT,
// FERRY_RP, FERRY_DISK, MESSAGE, PRIORITY and FERRY_<FIELD> for each field.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "ferry/base/fd.h"
#include "ferry/base/status.h"

namespace ferry::events {

// A line longer than this is cut (its fields' values shortened) before it is written.
inline constexpr std::size_t kMaxLineBytes = 4096;
inline constexpr std::uint64_t kDefaultMaxFileBytes = 4ull << 20;
inline constexpr std::uint64_t kMinMaxFileBytes = 4096;
// A reader reads at most this many bytes per file (a log is bounded; a huge file is not ours).
inline constexpr std::uint64_t kMaxReadBytes = 256ull << 20;
inline constexpr std::chrono::milliseconds kSyncInterval{1000};

enum class Priority : std::uint8_t { error = 3, warning = 4, notice = 5, info = 6 };

using FieldValue = std::variant<std::int64_t, std::string>;
struct Field {
  std::string key;  // [a-z0-9_]; journald gets FERRY_<KEY upper-cased>
  FieldValue value;
};

struct Event {
  std::int64_t time_us = 0;  // unix microseconds; 0 at emit(): now
  std::string group;
  std::string kind;       // rp_started, rp_committed, ... (docs/operations.md)
  std::uint64_t rp = 0;   // 0: none
  std::string disk;       // empty: none
  Priority priority = Priority::info;
  std::string message;    // one human line for journald and the text listing
  std::vector<Field> fields;
};

// The line written for an event (no newline); at most kMaxLineBytes.
std::string to_json_line(const Event& e);
// Parses one line; an error when it is not a whole event (a torn line).
Result<Event> from_json_line(std::string_view line);
// "2026-12-08T02:50:00.123456Z"
std::string format_time_us(std::int64_t unix_us);

struct EventLogOptions {
  std::string dir;  // created if missing
  std::uint64_t max_file_bytes = kDefaultMaxFileBytes;
  bool journald = true;
};

class EventLog {
 public:
  static Result<std::unique_ptr<EventLog>> open(const EventLogOptions& options);
  ~EventLog();
  EventLog(const EventLog&) = delete;
  EventLog& operator=(const EventLog&) = delete;

  // Appends the event (and sends it to journald). Never fails; thread-safe.
  void emit(Event e);
  // fdatasync of what was written so far (the flusher does this on its own); emit() does not
  // wait for it.
  Status sync();

  std::uint64_t write_failures() const { return write_failures_.load(); }
  std::uint64_t journald_failures() const { return journald_failures_.load(); }
  const std::string& dir() const { return options_.dir; }

 private:
  explicit EventLog(EventLogOptions options) : options_(std::move(options)) {}
  Status append(const std::string& line);
  Status reopen_if_rotated();
  Status rotate();

  EventLogOptions options_;
  std::mutex mu_;
  UniqueFd fd_, lock_fd_;
  bool dirty_ = false;
  bool torn_ = false;  // the last write was short: the next one starts with a newline
  std::atomic<std::uint64_t> write_failures_{0}, journald_failures_{0};
};

// Sends one event to journald; the negative errno of sd_journal_sendv, or 0.
int send_to_journald(const Event& e);

struct ReadResult {
  std::vector<Event> events;  // oldest first
  std::vector<std::string> notes;  // "events.jsonl line 7: torn or not an event: skipped"
};
// Reads the log in `dir` (events.1.jsonl then events.jsonl), keeping events at or after
// since_us. A missing log reads as empty.
Result<ReadResult> read_events(const std::string& dir, std::int64_t since_us);

// --since: RFC 3339 ("2026-12-08T02:50:00Z", fraction and +hh:mm offsets allowed) or a
// relative age ("90s", "10m", "2h", "3d"; at most 6 digits) before now_us.
Result<std::int64_t> parse_since(std::string_view text, std::int64_t now_us);

std::int64_t unix_now_us();

// Where each end keeps a group's log.
std::string receiver_events_dir(const std::string& store_root, const std::string& group);
std::string source_events_dir(const std::string& work_dir, const std::string& group);

}  // namespace ferry::events
