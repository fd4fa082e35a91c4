#include "receiver_probe.h"

#include <spdlog/spdlog.h>

#include <chrono>

#include "ferry/transport/codec.h"
#include "ferry/transport/wire.h"

namespace ferry::site {

void serve_probe(transport::Connection& conn, std::string_view payload,
                 std::int64_t test_clock_offset_ms) {
  auto q = transport::decode_probe(payload);
  if (!q.is_ok()) {
    spdlog::error("{}: bad probe: {}", conn.peer(), q.status().message());
    conn.close_with_error(transport::WireStatus::bad_request, "bad probe: " + q.status().message());
    return;
  }
  transport::ProbeReply r;
  if (q->version != transport::kProtocolVersion) {
    r.status = transport::WireStatus::bad_version;
    r.message = "protocol version " + std::to_string(q->version) +
                " is not supported (this receiver speaks version " +
                std::to_string(transport::kProtocolVersion) + ")";
  }
  const auto now = std::chrono::system_clock::now() +
                   std::chrono::milliseconds(test_clock_offset_ms);
  r.receiver_unix_ns = static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count());
  spdlog::debug("{}: probe answered", conn.peer());
  (void)conn.send(transport::MsgType::probe_reply, transport::encode(r));
  (void)conn.flush();
}

}  // namespace ferry::site
