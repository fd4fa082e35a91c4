// A source process for the kill-point tests: opens the QMP source of group g1 (node d0 as
// disk0), captures RP 2 on top of RP 1 and finishes it. Run with FERRY_KILL_AT=<point> it
// dies at that point (SIGKILL), leaving QEMU as a crashed source would.
// Usage: cbt_source_child QMP_SOCKET WORK_DIR ACK(0|1)
#include <cstdio>
#include <cstdlib>
#include <string>

#include "ferry/cbt/qmp_source.h"

using namespace ferry;
using namespace ferry::cbt;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s QMP_SOCKET WORK_DIR ACK\n", argv[0]);
    return 2;
  }
  QmpSourceOptions o;
  o.qmp_socket = argv[1];
  o.work_dir = argv[2];
  o.group = "g1";
  o.disks = {{"d0", "disk0"}};
  auto src = open_qmp_source(o);
  if (!src) {
    std::fprintf(stderr, "open: %s\n", src.status().to_string().c_str());
    return 1;
  }
  auto c = (*src)->capture(1, 2, {"disk0"});
  if (!c) {
    std::fprintf(stderr, "capture: %s\n", c.status().to_string().c_str());
    return 1;
  }
  Status s = (*src)->finish(*c, std::string(argv[3]) == "1");
  if (!s) {
    std::fprintf(stderr, "finish: %s\n", s.to_string().c_str());
    return 1;
  }
  return 0;
}
