#include "ferry/base/status.h"

#include <cerrno>
#include <cstring>

namespace ferry {

const char* errc_name(Errc code) {
  switch (code) {
    case Errc::ok: return "ok";
    case Errc::io: return "io-error";
    case Errc::no_space: return "no-space";
    case Errc::corrupt: return "corrupt";
    case Errc::protocol: return "protocol-error";
    case Errc::not_found: return "not-found";
    case Errc::invalid_argument: return "invalid-argument";
    case Errc::unsupported: return "unsupported";
    case Errc::diverged: return "diverged";
    case Errc::timeout: return "timeout";
    case Errc::disconnected: return "disconnected";
    case Errc::busy: return "busy";
    case Errc::cancelled: return "cancelled";
    case Errc::external: return "external-error";
    case Errc::internal: return "internal-error";
  }
  return "unknown";
}

Status Status::error(Errc code, std::string message) {
  FERRY_ASSERT(code != Errc::ok);
  Status s;
  s.rep_ = std::make_shared<Rep>(Rep{code, 0, false, false, std::move(message)});
  return s;
}

Status Status::from_errno(int err, std::string context) {
  if (err < 0) err = -err;
  FERRY_ASSERT(err != 0);
  Errc code = Errc::io;
  bool retryable = false;
  switch (err) {
    case ENOSPC:
    case EDQUOT: code = Errc::no_space; retryable = true; break;
    case ENOENT: code = Errc::not_found; break;
    case EINVAL: code = Errc::invalid_argument; break;
    case EOPNOTSUPP: code = Errc::unsupported; break;
    case ETIMEDOUT: code = Errc::timeout; retryable = true; break;
    case EAGAIN:
    case EINTR: retryable = true; break;
    case ECONNRESET:
    case EPIPE:
    case ECONNREFUSED:
    case ECONNABORTED: code = Errc::disconnected; retryable = true; break;
    case EBUSY: code = Errc::busy; retryable = true; break;
    case ECANCELED: code = Errc::cancelled; break;
    default: break;
  }
  Status s;
  s.rep_ = std::make_shared<Rep>(Rep{code, err, retryable, false,
                                     std::move(context) + ": " + std::strerror(err)});
  return s;
}

const std::string& Status::message() const {
  static const std::string kOk = "ok";
  return rep_ ? rep_->message : kOk;
}

Status& Status::set_retryable(bool v) {
  FERRY_ASSERT(rep_);
  rep_ = std::make_shared<Rep>(*rep_);
  rep_->retryable = v;
  return *this;
}

Status& Status::set_data_lost(bool v) {
  FERRY_ASSERT(rep_);
  rep_ = std::make_shared<Rep>(*rep_);
  rep_->data_lost = v;
  return *this;
}

Status Status::with_context(const std::string& context) && {
  if (!rep_) return std::move(*this);
  auto rep = std::make_shared<Rep>(*rep_);
  rep->message = context + ": " + rep->message;
  Status s;
  s.rep_ = std::move(rep);
  return s;
}

Status Status::with_context(const std::string& context) const& {
  Status copy = *this;
  return std::move(copy).with_context(context);
}

std::string Status::to_string() const {
  if (!rep_) return "ok";
  return std::string(errc_name(rep_->code)) + ": " + rep_->message;
}

void assert_fail(const char* expr, const char* file, int line, const char* msg) {
  std::fprintf(stderr, "ferry: assertion failed: %s at %s:%d%s%s\n", expr, file, line,
               msg ? ": " : "", msg ? msg : "");
  std::fflush(stderr);
  std::abort();
}

}  // namespace ferry
