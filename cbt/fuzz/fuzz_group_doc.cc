// libFuzzer target for the group document (ferry/cbt/group_doc.h, docs/fuzzing.md): the
// bytes a source sent as an RP's VM definition, which the receiver keeps as they came and
// `ferry vm-config --vm`, `ferry points --json` and both failovers parse.
//
// Any input: group_doc_of and parse_group_doc never crash, hang or throw. An accepted group
// document passes check_group_doc, and written back (group_doc_text) and parsed again it has
// the same group, VMs, disks and boot order: what the reader accepts, the writer can say.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "ferry/cbt/group_doc.h"

namespace {
using namespace ferry::cbt;

bool same(const GroupDoc& a, const GroupDoc& b) {
  if (a.group != b.group || a.boot_order != b.boot_order || a.vms.size() != b.vms.size())
    return false;
  for (std::size_t i = 0; i < a.vms.size(); ++i)
    if (a.vms[i].name != b.vms[i].name || a.vms[i].disks != b.vms[i].disks) return false;
  return true;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size > (256u << 10)) return 0;  // the rp_begin limit is 224 KiB
  const std::string text(reinterpret_cast<const char*>(data), size);
  (void)group_doc_of(text);
  auto doc = parse_group_doc(text);
  if (!doc.is_ok()) return 0;
  if (!check_group_doc(*doc).is_ok()) std::abort();
  auto again = parse_group_doc(group_doc_text(*doc));
  if (!again.is_ok() || !same(*doc, *again)) std::abort();
  return 0;
}
