// The rewrite of a protected VM's libvirt domain XML into the definition of a test-failover
// domain at the recovery site (docs/failover.md). A pure function over XML text (libxml2, no
// libvirt connection, no file system), so every rule is unit-tested (tools/test/vm_xml_test.cc).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::tools {

struct VmXmlRewrite {
  std::string name_suffix = "-test";  // the domain is named <source name><suffix>
  std::string uuid;                   // the new domain's UUID (36 characters)
  // Disk target (vda, ...) -> the qcow2 overlay it runs on, and the NBD unix socket its
  // backing export serves. Every disk of the RP must have an entry; a <disk device='disk'>
  // of the XML without one is dropped (not replicated) and reported.
  // The backing is the NBD export on nbd_socket (test failover) or, when backing_file is
  // set, that raw file (failover: the replica image, read-only from then on).
  struct Disk {
    std::string overlay;
    std::string nbd_socket;
    std::string backing_file;
  };
  std::map<std::string, Disk> disks;
  // Source network (or bridge) name -> the one to use here; unmapped NICs are removed.
  std::map<std::string, std::string> network_map;
  // Character devices (serial, console, channel, parallel) whose source names a host path of
  // the source are moved into this directory (the path's file name, prefixed by its index).
  std::string chardev_dir;
};

struct VmXmlResult {
  std::string xml;
  std::string source_name;  // the source's <name>
  std::string name;         // the new domain's name
  // Old host path -> new path, for each character device moved into chardev_dir.
  std::map<std::string, std::string> chardev_paths;
  // Host files the definition still needs here (direct kernel boot, firmware): the caller
  // checks they exist before defining the domain.
  std::vector<std::string> required_paths;
  // One line per change a user should know of (a NIC removed, a disk dropped, ...).
  std::vector<std::string> notes;
};

// Errors (invalid_argument, naming what is wrong): not XML, not a <domain>, no <name>, a
// name or UUID that is not valid, a disk of `r.disks` that the XML does not have.
Result<VmXmlResult> rewrite_vm_xml(const std::string& source_xml, const VmXmlRewrite& r);

}  // namespace ferry::tools
