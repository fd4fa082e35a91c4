// Where each RP's time went (explainable RPO, docs/operations.md), kept at the receiver with
// the RP: the source's stages (from rp_end's times extension, feature rp_times) and the
// receiver's own (receive, durable, ack, apply).
//
// Stored in a side file per group, <store>/<group>/rp-times, not in the journal: it is
// monitoring data, so it must never be able to fail, slow or change the format of what C1/C2
// protect. One text line per RP, appended after the RP's apply pass, without fsync (a crash
// may lose the newest lines; an RP without a line simply shows no stages). Bounded: when the
// file passes kMaxRpTimesFileBytes it is rewritten (write + rename) with its newest half, so
// it follows retention by age without reading the catalog. `ferry points --json` joins it
// with the RPs the store still offers.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "ferry/base/status.h"

namespace ferry::site {

inline constexpr std::uint64_t kMaxRpTimesFileBytes = 256u << 10;  // ~2,000 RPs

struct RpTimesRecord {
  std::uint64_t rp_id = 0;
  // The source's stages in microseconds (absent: an older source, no rp_times).
  struct Source {
    std::uint64_t slot_us = 0, capture_us = 0, read_us = 0, hash_compress_us = 0, send_us = 0;
    bool operator==(const Source&) const = default;
  };
  std::optional<Source> source;
  std::uint64_t receive_us = 0, durable_us = 0, ack_us = 0, apply_us = 0;
  bool operator==(const RpTimesRecord&) const = default;
};

std::string encode_rp_times_line(const RpTimesRecord& r);  // one line, '\n'-terminated
Result<RpTimesRecord> decode_rp_times_line(const std::string& line);

// Appends the record to the group's file, trimming it when over its bound. Best effort by
// design: the caller logs a failure and goes on.
Status append_rp_times(const std::string& root, const std::string& group, const RpTimesRecord& r);
// Every readable record by RP id (a bad line is skipped); empty when there is no file.
Result<std::map<std::uint64_t, RpTimesRecord>> read_rp_times(const std::string& root,
                                                             const std::string& group);

}  // namespace ferry::site
