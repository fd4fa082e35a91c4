// TEMPORARY: stands in for cbt/src/libvirt_source.cc until that file is committed, so that
// `ferry` links meanwhile. tools/meson.build compiles this file only while
// cbt/src/libvirt_source.cc does not exist; delete it (and its lines there) once it does.
// Weak, so that should both ever be linked the real definition wins over this one.
#include "ferry/cbt/libvirt_source.h"

namespace ferry::cbt {

__attribute__((weak)) Result<std::unique_ptr<ChangeSource>> open_libvirt_source(
    const LibvirtSourceOptions&) {
  return Status::error(Errc::unsupported, "libvirt source not built");
}

}  // namespace ferry::cbt
