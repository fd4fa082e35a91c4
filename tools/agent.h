// Private to tools/: opening the change source of a target (the one place that calls
// open_libvirt_source) and the status-socket protocol shared by `ferry agent` and
// `ferry status`.
#pragma once

#include <memory>
#include <string>

#include "config.h"
#include "ferry/cbt/source.h"

namespace ferry::tools {

// The source of one target; its scratch/state lives in state_dir/<group>.
Result<std::unique_ptr<cbt::ChangeSource>> open_target_source(const TargetConfig& target,
                                                               const std::string& state_dir);
// "host:/path/to/qmp.sock" or "host:qemu:///system/domain", for the receiver's logs.
std::string target_source_name(const TargetConfig& target);

// Status socket protocol: the client sends one line, kStatusRequest; the agent answers with
// one JSON document (at most kMaxStatusReplyBytes) and closes the connection.
inline constexpr const char* kStatusRequest = "status\n";
inline constexpr std::size_t kMaxStatusReplyBytes = 4u << 20;
inline constexpr const char* kDefaultStatusSocket = "/run/ferry/agent.sock";

}  // namespace ferry::tools
