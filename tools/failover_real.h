// Failover proper (docs/failover.md, "Failover"):
//   ferry failover --store DIR --group G [--point N|latest] [--uri URI] [--name-suffix S]
//                  [--network-map SRC=DST ...] [--domain-xml FILE] [--lock-timeout SECONDS]
// Stops the group accepting RPs (a durable marker, site/include/ferry/site/failover_state.h),
// compacts the replica images forward to the RP (the store's own compaction), puts a qcow2
// overlay over each image (the image is read-only from then on), and defines and starts the
// VM's domain from the RP's definition. Every step is idempotent and recorded in
// <store>/<group>/failover/record.json, so the same command again finishes a run cut short.
#pragma once

#include <string>
#include <vector>

namespace ferry::tools {

struct FailoverArgs {
  std::string store, group;
  std::string point = "latest";
  std::string uri = "qemu:///system";
  std::string name_suffix;               // the domain is <vm><suffix>; default: the VM's name
  std::vector<std::string> network_map;  // SRC=DST
  std::string domain_xml;                // a definition to use instead of the RP's
  unsigned lock_timeout_s = 60;          // waiting for a receiver session to let go
  // A group of several VMs: the order to start them (NAME,NAME,...; default: the RP's, kept
  // in the record so that a rerun uses the same) and seconds between one start and the next.
  std::string boot_order;
  unsigned boot_delay_s = 0;
};
int cmd_failover(const FailoverArgs& a);

}  // namespace ferry::tools
