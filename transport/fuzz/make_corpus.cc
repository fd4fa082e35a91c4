// Writes the seed corpus of fuzz_wire: one valid frame per message kind, so the fuzzer starts
// from inputs that pass the header and checksum checks. Usage: transport_make_corpus DIR
#include <cstdio>
#include <string>

#include "ferry/transport/wire.h"

using namespace ferry::transport;

namespace {

bool write(const std::string& dir, const char* name, MsgType type, const std::string& payload) {
  std::string path = dir + "/" + name;
  std::string frame = encode_frame(type, payload);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return false;
  bool ok = std::fwrite(frame.data(), 1, frame.size(), f) == frame.size();
  return std::fclose(f) == 0 && ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  std::string dir = argv[1];
  Hello hello;
  hello.group = "vm-web-01";
  hello.source_name = "host-a";
  hello.disks = {{"vda", 1ull << 30, 65536}, {"vdb", 1ull << 20, 4096}};
  HelloReply reply;
  reply.message = "ok";
  reply.last_committed_rp = 7;
  reply.last_committed_unix_ns = 1700000000000000000ull;
  reply.disks = {{"vda", 1ull << 30}};
  RpBegin begin{8, 7, 1700000000000000001ull, kRpFlagAppConsistent,
                {{0, DiskMode::resync, 1ull << 30}, {1, DiskMode::full, 1ull << 20}}};
  // Disk identities (feature bit 3, rp_begin flags bits 1 and 2).
  HelloReply reply_ident = reply;
  reply_ident.features = kFeatureHashList | kFeatureDiskIdentity;
  reply_ident.held_source = "host-a:/run/qsd.qmp";
  reply_ident.disks = {{"vda", 1ull << 30, {{1, 2}, false}}, {"vdb", 0, {}}};
  RpBegin begin_ident = begin;
  begin_ident.flags |= kRpFlagIdentities | kRpFlagTakeOver;
  begin_ident.disks[0].identity = {{3, 4}, false};
  begin_ident.disks[1].identity = {{5, 6}, true};
  RpBegin begin_vm = begin_ident;  // feature vm_config (bit 4): the domain XML follows
  begin_vm.flags |= kRpFlagVmConfig;
  begin_vm.vm_config = "<domain type='qemu'><name>vm</name><devices/></domain>";
  DataFrame data;
  data.group_id = group_id_of("vm-web-01");
  data.rp_id = 8;
  data.seq = 3;
  data.offset_bytes = 65536;
  data.payload = std::string(64, 'b');
  data.length_bytes = 64;
  data.hash = ferry::xxh3_128(data.payload.data(), data.payload.size());
  DataFrame zero = data;
  zero.kind = BlockKind::zero;
  zero.payload.clear();
  zero.hash = {};
  zero.length_bytes = 65536;
  DataFrame zero_range = zero;  // feature zero_ranges: a whole empty disk in a few frames
  zero_range.length_bytes = kMaxZeroRangeBytes;
  DataFrame packed = data;
  packed.codec = Codec::zstd;
  packed.payload = std::string("\x28\xb5\x2f\xfd", 4);
  bool ok = write(dir, "hello", MsgType::hello, encode(hello)) &&
            write(dir, "hello_reply", MsgType::hello_reply, encode(reply)) &&
            write(dir, "rp_begin", MsgType::rp_begin, encode(begin)) &&
            write(dir, "hello_reply_ident", MsgType::hello_reply, encode(reply_ident)) &&
            write(dir, "rp_begin_ident", MsgType::rp_begin, encode(begin_ident)) &&
            write(dir, "rp_begin_vm_config", MsgType::rp_begin, encode(begin_vm)) &&
            write(dir, "data", MsgType::data, encode(data)) &&
            write(dir, "data_zero", MsgType::data, encode(zero)) &&
            write(dir, "data_zero_range", MsgType::data, encode(zero_range)) &&
            write(dir, "data_zstd", MsgType::data, encode(packed)) &&
            write(dir, "rp_end", MsgType::rp_end, encode(RpEnd{8, 3, 3 * 65536})) &&
            write(dir, "rp_ack", MsgType::rp_ack, encode(RpAck{8, WireStatus::diverged, "base"})) &&
            write(dir, "rp_end_times", MsgType::rp_end,
                  encode(RpEnd{9, 3, 3 << 16, SourceTimes{1000, 2000, 3000, 4000, 5000}})) &&
            write(dir, "rp_ack_times", MsgType::rp_ack,
                  encode(RpAck{9, WireStatus::ok, "", RpTimes{1500000, 20000}})) &&
            write(dir, "error", MsgType::error, encode(ErrorMsg{WireStatus::busy, "busy"})) &&
            write(dir, "hash_request", MsgType::hash_request,
                  encode(HashRequest{0, 65536, 64ull << 20, 64ull << 20})) &&
            write(dir, "hash_list", MsgType::hash_list,
                  encode(HashList{0, 65536, 64ull << 20, {{1, 2}, {3, 4}, {5, 6}}})) &&
            write(dir, "points_request", MsgType::points_request,
                  encode(PointsRequest{"web01"})) &&
            write(dir, "points_reply", MsgType::points_reply,
                  encode(PointsReply{WireStatus::ok, "", true, {{1, 2, 3, 0}, {4, 5, 6, 4096}}})) &&
            write(dir, "points_reply_forbidden", MsgType::points_reply,
                  encode(PointsReply{WireStatus::forbidden, "may not manage", false, {}})) &&
            write(dir, "hello_reply_forbidden", MsgType::hello_reply,
                  encode(HelloReply{.status = WireStatus::forbidden, .message = "no"})) &&
            write(dir, "probe", MsgType::probe, encode(Probe{})) &&
            write(dir, "probe_reply", MsgType::probe_reply,
                  encode(ProbeReply{kProtocolVersion, WireStatus::ok, 1765162200000000000ull, ""}));
  if (!ok) std::perror(dir.c_str());
  return ok ? 0 : 1;
}
