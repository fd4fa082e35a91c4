// A small synchronous QMP client over a unix socket (private to cbt/).
//
// One command at a time: execute() writes the command with a fresh id and reads lines until
// the reply with that id arrives; events read meanwhile are queued (bounded) for
// wait_event(). Every read has a deadline; lines and the event queue are bounded so a
// misbehaving peer cannot make us allocate without limit.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "ferry/base/fd.h"
#include "ferry/base/status.h"

namespace ferry::cbt {

using json = nlohmann::json;

struct QemuVersion {
  int major = 0;
  int minor = 0;
  int micro = 0;
};

class QmpClient {
 public:
  static constexpr std::size_t kMaxLineBytes = 32u << 20;  // query-named-block-nodes can be big
  static constexpr std::size_t kMaxQueuedEvents = 1024;

  // Connects, reads the greeting and negotiates capabilities (qmp_capabilities).
  static Result<std::unique_ptr<QmpClient>> connect(const std::string& socket_path,
                                                     std::chrono::milliseconds timeout);

  // Runs `command`; returns QMP's "return" value. A QMP error becomes Errc::external with the
  // command name and QEMU's own description.
  Result<json> execute(std::string_view command, const json& arguments,
                       std::chrono::milliseconds timeout);
  Result<json> execute(std::string_view command, std::chrono::milliseconds timeout) {
    return execute(command, json::object(), timeout);
  }

  // Returns the first event called `name` whose "data" satisfies `match` (queued or new),
  // removing it from the queue. Errc::timeout when none arrives in time.
  using EventMatch = std::function<bool(const json& data)>;
  Result<json> wait_event(std::string_view name, const EventMatch& match,
                          std::chrono::milliseconds timeout);

  // Forgets queued events: called before a new sequence of commands whose events matter.
  void clear_events() { events_.clear(); }

  const QemuVersion& version() const { return version_; }
  const std::string& socket_path() const { return socket_path_; }

 private:
  using Clock = std::chrono::steady_clock;
  QmpClient(UniqueFd fd, std::string socket_path)
      : fd_(std::move(fd)), socket_path_(std::move(socket_path)) {}
  Result<json> read_message(Clock::time_point deadline);
  Status fill(Clock::time_point deadline);
  Status write_all(const std::string& data, Clock::time_point deadline);
  void queue_event(json event);

  UniqueFd fd_;
  std::string socket_path_;
  std::string rbuf_;
  std::deque<json> events_;
  std::uint64_t next_id_ = 1;
  std::uint64_t events_dropped_ = 0;
  QemuVersion version_;
};

}  // namespace ferry::cbt
