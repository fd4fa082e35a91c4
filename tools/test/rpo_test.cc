#include <catch2/catch.hpp>

#include "ferry/source/sender.h"
#include "rpo.h"

using namespace ferry::tools;

TEST_CASE("rp_stages lists the source's stages in order") {
  ferry::source::RpStats s;
  s.slot_seconds = 0.1;
  s.capture_seconds = 0.2;
  s.read_seconds = 0.3;
  s.hash_compress_seconds = 0.4;
  s.send_seconds = 71;
  s.durable_seconds = 0.5;
  s.finish_seconds = 0.6;
  auto st = rp_stages(s);
  REQUIRE(st.size() == 7);
  CHECK(st[0].name == "slot");
  CHECK(st[4].name == "send");
  CHECK(st[4].seconds == 71);
  CHECK(st[6].name == "finish");
}

TEST_CASE("the alert names the slowest stage and why") {
  RpoInputs in;
  in.rpo_seconds = 95;
  in.alert_seconds = 60;
  in.last_stages = {{"capture", 2}, {"read", 10}, {"send", 71}, {"durable", 1}};
  in.last_wire_bytes = 85'200'000;
  CHECK(rpo_alert(in) == "RPO 95 s > 60 s: send 71 s at 1.2 MB/s, link-bound");
  in.last_stages = {{"read", 40}, {"send", 5}};
  CHECK(rpo_alert(in) == "RPO 95 s > 60 s: read 40 s, source-read-bound (the disks or the NBD export)");
  in.last_stages = {{"durable", 3.3}};
  CHECK(rpo_alert(in) == "RPO 95 s > 60 s: durable 3.3 s, receiver-bound (journal write and fdatasync)");
}

TEST_CASE("within the threshold: no alert; a failed RP or none yet: said so") {
  RpoInputs in;
  in.rpo_seconds = 30;
  in.alert_seconds = 60;
  in.last_stages = {{"send", 20}};
  CHECK(rpo_alert(in).empty());
  in.rpo_seconds = 61;
  in.last_error = "disconnected: receiver gone";
  CHECK(rpo_alert(in) == "RPO 61 s > 60 s: the last RP failed: disconnected: receiver gone");
  RpoInputs none;
  none.alert_seconds = 60;
  none.watched_seconds = 10;
  CHECK(rpo_alert(none).empty());
  none.watched_seconds = 70;
  CHECK(rpo_alert(none) == "RPO unknown > 60 s: no RP acknowledged yet");
  none.running_seconds = 65;
  CHECK(rpo_alert(none) == "RPO unknown > 60 s: the first RP is running for 65 s");
}

TEST_CASE("attribute_transfer: send first, then hash_compress, the rest read; they add up") {
  ferry::source::RpStats s;
  s.transfer_seconds = 10;
  ferry::source::attribute_transfer(s, 7, 2);
  CHECK(s.send_seconds == 7);
  CHECK(s.hash_compress_seconds == 2);
  CHECK(s.read_seconds == 1);
  // A send channel blocked the whole time leaves nothing to the others.
  ferry::source::attribute_transfer(s, 12, 5);
  CHECK(s.send_seconds == 10);
  CHECK(s.hash_compress_seconds == 0);
  CHECK(s.read_seconds == 0);
  // Workers busier than what is left are cut to it.
  ferry::source::attribute_transfer(s, 4, 9);
  CHECK(s.send_seconds == 4);
  CHECK(s.hash_compress_seconds == 6);
  CHECK(s.read_seconds == 0);
  ferry::source::attribute_transfer(s, 0, 0);
  CHECK(s.read_seconds == 10);
}
