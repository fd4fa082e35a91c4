// libFuzzer target for the wire codec: arbitrary bytes go to the frame header decoder, the
// checksum check and every message decoder. Beyond "no crash", it checks that whatever
// decodes is canonical: encoding it again gives back exactly the input bytes, so no field is
// dropped or misread.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "ferry/transport/wire.h"

using namespace ferry::transport;

namespace {

template <class T>
void check_round_trip(const ferry::Result<T>& decoded, std::string_view payload) {
  if (decoded.is_ok()) FERRY_ASSERT_MSG(encode(decoded.value()) == payload, "decode/encode differ");
}

void decode_all(std::string_view payload) {
  ferry::Result<Hello> hello = decode_hello(payload);
  if (hello.is_ok() && hello->version == kProtocolVersion) check_round_trip(hello, payload);
  ferry::Result<HelloReply> reply = decode_hello_reply(payload);
  if (reply.is_ok() && reply->version == kProtocolVersion) check_round_trip(reply, payload);
  check_round_trip(decode_rp_begin(payload), payload);
  check_round_trip(decode_data(payload), payload);
  check_round_trip(decode_data(payload, kFeatureZeroRanges), payload);
  check_round_trip(decode_rp_end(payload), payload);
  check_round_trip(decode_rp_end(payload, kFeatureZeroRanges), payload);
  check_round_trip(decode_rp_end(payload, kFeatureZeroRanges | kFeatureRpTimes), payload);
  check_round_trip(decode_rp_ack(payload), payload);
  check_round_trip(decode_rp_ack(payload, kFeatureRpTimes), payload);
  check_round_trip(decode_error(payload), payload);
  check_round_trip(decode_hash_request(payload), payload);
  check_round_trip(decode_hash_list(payload), payload);
  check_round_trip(decode_points_request(payload), payload);
  check_round_trip(decode_points_reply(payload), payload);
  check_round_trip(decode_probe(payload), payload);
  check_round_trip(decode_probe_reply(payload), payload);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  if (size >= kFrameHeaderBytes) {
    ferry::Result<FrameHeader> header = decode_frame_header(data);
    std::string_view payload = input.substr(kFrameHeaderBytes);
    ferry::Status verified = verify_frame(data, payload);
    if (header.is_ok() && verified.is_ok())
      FERRY_ASSERT_MSG(encode_frame(header->type, payload) == input, "frame re-encodes differently");
    decode_all(payload);
  }
  decode_all(input);
  return 0;
}
