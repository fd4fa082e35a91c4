// Human-readable sizes for messages and progress lines. One owner, so every tool and every
// refusal prints a size the same way (tests grep for "20.0 TiB").
#pragma once

#include <cstdint>
#include <string>

namespace ferry {

// "512 B", "1.5 KiB", "20.0 TiB": binary units from B to EiB, one decimal above bytes.
std::string human_bytes(std::uint64_t bytes);
// "20.0 TiB (21990232555520 bytes)": readable and exact, for refusals an operator acts on.
std::string human_bytes_exact(std::uint64_t bytes);

}  // namespace ferry
