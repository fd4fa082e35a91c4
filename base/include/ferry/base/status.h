// Errors as values: Status and Result<T>.
//
// Expected failures (EIO, ENOSPC, a peer gone, a bad frame, a failed QMP command) travel as a
// [[nodiscard]] Status or Result<T> carrying a code, the errno if any, whether retrying can
// help, and whether the failure means data covered by it must be treated as lost (a failed
// fsync). Programmer errors are FERRY_ASSERTs, which abort in every build type.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <variant>

namespace ferry {

enum class Errc : std::uint16_t {
  ok = 0,
  io,                // an I/O call failed (EIO and friends)
  no_space,          // ENOSPC / EDQUOT
  corrupt,           // a checksum or structural check failed on stored data
  protocol,          // a peer broke the wire protocol (bad frame, bad version, garbage)
  not_found,         // a named thing (VM, disk, node, RP, file) does not exist
  invalid_argument,  // the caller (user or config) asked for something impossible
  unsupported,       // the environment lacks a feature (kernel, QEMU, file system)
  diverged,          // the replica and the source disagree on their common base (C5)
  timeout,
  disconnected,      // the peer closed or reset the connection
  busy,              // a resource is in use (a job already runs, a lock is held)
  cancelled,         // stopped on request (SIGTERM, shutdown)
  external,          // an outside system (QEMU, libvirt, NBD server) reported an error
  internal,
};

const char* errc_name(Errc code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // ok
  static Status ok() { return Status(); }
  static Status error(Errc code, std::string message);
  // Maps an errno value to a code (ENOSPC -> no_space, ...) and keeps the errno.
  static Status from_errno(int err, std::string context);

  bool is_ok() const { return rep_ == nullptr; }
  explicit operator bool() const { return is_ok(); }
  Errc code() const { return rep_ ? rep_->code : Errc::ok; }
  int sys_errno() const { return rep_ ? rep_->sys_errno : 0; }
  bool retryable() const { return rep_ && rep_->retryable; }
  bool data_lost() const { return rep_ && rep_->data_lost; }
  const std::string& message() const;

  Status& set_retryable(bool v = true);
  Status& set_data_lost(bool v = true);
  // Prefixes the message with "context: ", keeping code and flags.
  Status with_context(const std::string& context) &&;
  Status with_context(const std::string& context) const&;

  // "code: message" (plus errno name where there is one).
  std::string to_string() const;

 private:
  struct Rep {
    Errc code;
    int sys_errno;
    bool retryable;
    bool data_lost;
    std::string message;
  };
  std::shared_ptr<Rep> rep_;  // null means ok; shared so Status copies are cheap
};

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT
    if (std::get<Status>(v_).is_ok()) {
      std::fprintf(stderr, "ferry: Result constructed from an ok Status\n");
      std::abort();
    }
  }
  bool is_ok() const { return v_.index() == 0; }
  explicit operator bool() const { return is_ok(); }
  Status status() const { return is_ok() ? Status() : std::get<Status>(v_); }
  T& value() & { check(); return std::get<T>(v_); }
  const T& value() const& { check(); return std::get<T>(v_); }
  T&& value() && { check(); return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  void check() const {
    if (!is_ok()) {
      std::fprintf(stderr, "ferry: value() on error Result: %s\n",
                   std::get<Status>(v_).to_string().c_str());
      std::abort();
    }
  }
  std::variant<T, Status> v_;
};

[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const char* msg);

}  // namespace ferry

// Bugs, not errors: on in every build type.
#define FERRY_ASSERT(cond)                                                      \
  do {                                                                          \
    if (!(cond)) [[unlikely]] ::ferry::assert_fail(#cond, __FILE__, __LINE__, nullptr); \
  } while (0)
#define FERRY_ASSERT_MSG(cond, msg)                                             \
  do {                                                                          \
    if (!(cond)) [[unlikely]] ::ferry::assert_fail(#cond, __FILE__, __LINE__, (msg)); \
  } while (0)

#define FERRY_CONCAT_INNER(a, b) a##b
#define FERRY_CONCAT(a, b) FERRY_CONCAT_INNER(a, b)

// Returns the Status from the enclosing function if `expr` (a Status) is an error.
#define FERRY_TRY(expr)                                  \
  do {                                                   \
    ::ferry::Status ferry_try_s_ = (expr);               \
    if (!ferry_try_s_.is_ok()) return ferry_try_s_;      \
  } while (0)

// FERRY_ASSIGN_OR_RETURN(auto x, make_x()); returns the error Status on failure.
#define FERRY_ASSIGN_OR_RETURN(lhs, expr)                                  \
  auto FERRY_CONCAT(ferry_r_, __LINE__) = (expr);                          \
  if (!FERRY_CONCAT(ferry_r_, __LINE__).is_ok())                           \
    return FERRY_CONCAT(ferry_r_, __LINE__).status();                      \
  lhs = std::move(FERRY_CONCAT(ferry_r_, __LINE__)).value()
