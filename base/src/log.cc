#include "ferry/base/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>

namespace ferry {

void init_logging(const char* component) {
  auto logger = spdlog::stderr_color_mt(component);
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e %n %^%l%$: %v");
  spdlog::set_default_logger(logger);
  spdlog::level::level_enum level = spdlog::level::info;
  if (const char* env = std::getenv("FERRY_LOG"); env && *env)
    level = spdlog::level::from_str(env);
  spdlog::set_level(level);
  spdlog::flush_on(spdlog::level::warn);
}

}  // namespace ferry
