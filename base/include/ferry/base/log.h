// Logging: spdlog, one process-wide logger writing to stderr (journald picks it up under
// systemd). Levels: FERRY_LOG=debug|info|warn|error overrides the default (info).
#pragma once

#include <spdlog/spdlog.h>

namespace ferry {
// Sets the pattern and level once at start-up; `component` names the process role.
void init_logging(const char* component);
}  // namespace ferry
