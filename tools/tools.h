// Helpers shared by the ferry subcommands (private to tools/).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace ferry::tools {

struct DemoArgs {
  int rps = 6;
  int disk_mib = 256;
  std::string keep_dir;  // empty: a temporary directory, removed at the end
};
int run_demo(const DemoArgs& args, const char* argv0);

std::string default_state_dir();  // $FERRY_STATE_DIR or /var/lib/ferry
std::string host_name();
std::string human_bytes(std::uint64_t bytes);
std::string format_time_ns(std::uint64_t unix_ns);
// A progress line on stderr: bytes done, rate, and (when total is known) ETA.
std::function<void(std::uint64_t, std::uint64_t)> progress_printer();

}  // namespace ferry::tools
