// `ferry doctor`'s probe (wire.h: probe -> probe_reply): the receiver's protocol version and
// clock, for any peer that got through the connection's TLS (no group, no right, nothing
// created). test_clock_offset_ms shifts the clock it reports (ReceiverOptions; test-only).
#pragma once

#include <cstdint>
#include <string_view>

#include "ferry/transport/connection.h"

namespace ferry::site {

void serve_probe(transport::Connection& conn, std::string_view payload,
                 std::int64_t test_clock_offset_ms);

}  // namespace ferry::site
