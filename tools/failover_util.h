// What `ferry failover test` (failover.cc) and `ferry failover` (failover_real.cc) share:
// libvirt handles and errors, bounded and atomic file I/O, a random UUID, a child command,
// the --network-map option. Tools-private.
#pragma once

#include <libvirt/libvirt.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ferry/base/status.h"

namespace ferry::tools::failover_util {

std::uint64_t now_unix_ns();

// libvirt: RAII owners, errors mapped once (cbt/src/libvirt_api.h has the same owners,
// private to cbt/).
struct ConnClose {
  void operator()(virConnectPtr c) const { virConnectClose(c); }
};
struct DomainFree {
  void operator()(virDomainPtr d) const { virDomainFree(d); }
};
using Conn = std::unique_ptr<virConnect, ConnClose>;
using Domain = std::unique_ptr<virDomain, DomainFree>;

// The last libvirt error as a Status naming `what` (and the error cleared).
Status libvirt_error(const std::string& what);
// Opens `uri` with libvirt's own error printing off; Errc::disconnected when unreachable.
Result<Conn> connect_libvirt(const std::string& uri);

// The whole file, refused when larger than max_bytes (read bounded, not trusting its size).
Result<std::string> read_file_bounded(const std::string& path, std::size_t max_bytes);
// A bounded file holding one JSON object (the records of failover, test failover and
// failback); Errc::corrupt naming the file as `what` ("a failover record") when it is not one.
Result<nlohmann::json> read_json_object(const std::string& path, std::size_t max_bytes,
                                        const std::string& what);
Status fsync_dir(const std::string& dir);
// tmp + fsync + rename + fsync dir: a crash leaves the old file or the new one.
Status write_atomic(const std::string& path, const std::string& text);

Result<std::string> random_uuid();  // version 4, text form
// Runs argv to completion; its stdout and stderr come back in `output` (at most 64 KiB).
Result<int> run_command(const std::vector<std::string>& argv, std::string& output);
// --network-map SRC=DST, each SRC once.
Result<std::map<std::string, std::string>> parse_network_map(const std::vector<std::string>& v);

}  // namespace ferry::tools::failover_util
