// Readers pin the RP they read, so retention never removes it under them.
//
// A reader (ReadView: restore, the NBD export) holds, for its life, an flock on a pin file
// `<group>/pins/<rp>.<base>.g<gen>.<pid>.<n>.pin`: the RP it reads, the base RP the store had
// when it opened (it reads the records above that base) and the journal generation it reads
// (catalog.h). Retention keeps every pinned RP, removes journal segments only below the
// oldest pinned base, and a journal generation only once no pin reads it. A pin whose owner died is
// unlocked: the next pruner removes it.
//
// The gate (`<group>/READERS`, flock) orders the two: a reader holds it shared from before
// it writes its pin until it has read the state and the journal; the pruner holds it
// exclusive while it reads the pins and writes its decision, and while it removes segments.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ferry/base/fd.h"
#include "ferry/base/status.h"

namespace ferry::site {

class ReaderGate {
 public:
  ReaderGate() = default;  // not held
  // Blocks until granted. A group directory the caller cannot write (a read-only copy of a
  // store) has no gate file: then the gate is a no-op and says so through held().
  static Result<ReaderGate> shared(const std::string& group_dir);
  static Result<ReaderGate> exclusive(const std::string& group_dir);
  bool held() const { return fd_.valid(); }

 private:
  static Result<ReaderGate> take(const std::string& group_dir, int op);
  UniqueFd fd_;
};

class Pin {
 public:
  static Result<Pin> create(const std::string& group_dir, std::uint64_t rp_id,
                            std::uint64_t base_rp, std::uint64_t journal_gen);
  Pin() = default;
  Pin(Pin&&) noexcept;
  Pin& operator=(Pin&&) noexcept;
  ~Pin();

 private:
  void release();  // removes the pin file, then closes (the flock goes with the close)
  std::string path_;
  UniqueFd fd_;
};

struct LivePin {
  std::uint64_t rp_id = 0;
  std::uint64_t base_rp = 0;
  std::uint64_t journal_gen = 0;
};
// The pins whose owners live; removes the others (unless !remove_stale: a read-only look).
// A pruner calls it with the gate held exclusive.
Result<std::vector<LivePin>> live_pins(const std::string& group_dir, bool remove_stale = true);

}  // namespace ferry::site
