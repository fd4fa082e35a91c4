// nbdkit-ferry-plugin: serves one disk of a Ferry store at one recovery point, read-only,
// through site::ReadView. `ferry export` runs nbdkit with it (docs/operations.md); by hand:
//   nbdkit -r -U SOCK path/to/nbdkit-ferry-plugin.so store=DIR group=G point=N disk=D
// The NBD protocol, TLS, multi-conn, sockets and filters (cow for --overlay) are nbdkit's.
//
// Thread model SERIALIZE_REQUESTS: each connection gets its own ReadView (one journal reader
// and one cached window of pieces, which serialise reads anyway), so requests of one
// connection run one at a time and connections run in parallel. The RP never changes while
// it is served, so every connection sees the same bytes: multi-conn is safe.
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS
#include <nbdkit-plugin.h>

#include <cerrno>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>

#include "ferry/site/read_view.h"

namespace {

using ferry::site::ReadView;

struct Config {
  std::string store, group, disk;
  std::uint64_t point = 0;  // 0: the newest committed RP when the connection opens
};
Config g_config;

int fail_errno(const std::string& what, int err = EIO) {
  nbdkit_error("ferry: %s", what.c_str());
  nbdkit_set_error(err);
  return -1;
}

ReadView* view_of(void* handle) { return static_cast<ReadView*>(handle); }

int ferry_config(const char* key, const char* value) {
  try {
    const std::string k(key);
    if (k == "store") {
      g_config.store = value;
    } else if (k == "group") {
      g_config.group = value;
    } else if (k == "disk") {
      g_config.disk = value;
    } else if (k == "point") {
      const std::string v(value);
      if (v == "latest") {
        g_config.point = 0;
      } else {
        std::size_t used = 0;
        g_config.point = std::stoull(v, &used);
        if (used != v.size() || g_config.point == 0) throw std::invalid_argument(v);
      }
    } else {
      nbdkit_error("ferry: unknown parameter '%s' (store, group, point, disk)", key);
      return -1;
    }
    return 0;
  } catch (const std::exception&) {
    nbdkit_error("ferry: %s='%s' is not valid (point: an RP id or latest)", key, value);
    return -1;
  }
}

int ferry_config_complete() {
  if (g_config.store.empty() || g_config.group.empty() || g_config.disk.empty()) {
    nbdkit_error("ferry: store=, group= and disk= are required (point= defaults to latest)");
    return -1;
  }
  return 0;
}

// The first connection opens the view (a journal scan and a pin); the others clone it, so
// a multi-conn client does not scan the journal once per connection. The first view lives
// as long as the process, and with it the pin.
std::mutex g_first_mu;
std::unique_ptr<ReadView> g_first;

void* ferry_open(int /*readonly*/) {
  try {
    std::lock_guard<std::mutex> g(g_first_mu);
    if (!g_first) {
      auto v = ReadView::open(g_config.store, g_config.group, g_config.point, g_config.disk);
      if (!v.is_ok()) {
        nbdkit_error("ferry: %s", v.status().to_string().c_str());
        return nullptr;
      }
      g_first = std::move(v).value();
    }
    auto v = g_first->clone();
    if (!v.is_ok()) {
      nbdkit_error("ferry: %s", v.status().to_string().c_str());
      return nullptr;
    }
    return v->release();
  } catch (const std::exception& e) {
    nbdkit_error("ferry: open: %s", e.what());
    return nullptr;
  }
}

void ferry_close(void* handle) { delete view_of(handle); }

std::int64_t ferry_get_size(void* handle) {
  return static_cast<std::int64_t>(view_of(handle)->size_bytes());
}

int ferry_can_multi_conn(void*) { return 1; }
int ferry_can_extents(void*) { return 1; }
int ferry_can_cache(void*) { return NBDKIT_CACHE_NONE; }

int ferry_block_size(void*, std::uint32_t* minimum, std::uint32_t* preferred,
                     std::uint32_t* maximum) {
  *minimum = 1;              // any byte range reads
  *preferred = 64u << 10;    // the journal's record size: whole records decode once
  *maximum = 0xffffffffu;
  return 0;
}

int ferry_pread(void* handle, void* buf, std::uint32_t count, std::uint64_t offset,
                std::uint32_t /*flags*/) {
  try {
    auto s = view_of(handle)->pread(buf, count, offset);
    if (!s.is_ok()) return fail_errno(s.to_string());
    return 0;
  } catch (const std::exception& e) {
    return fail_errno(std::string("pread: ") + e.what());
  }
}

int ferry_extents(void* handle, std::uint32_t count, std::uint64_t offset, std::uint32_t flags,
                  struct nbdkit_extents* extents) {
  try {
    ReadView* v = view_of(handle);
    // With NBDKIT_FLAG_REQ_ONE one extent is enough: ask for one window at most.
    std::uint64_t len = count;
    if ((flags & NBDKIT_FLAG_REQ_ONE) != 0)
      len = std::min<std::uint64_t>(len, ReadView::kWindowBytes - offset % ReadView::kWindowBytes);
    auto ex = v->extents(offset, len);
    if (!ex.is_ok()) return fail_errno(ex.status().to_string());
    for (const auto& e : *ex) {
      const std::uint32_t type = e.zero ? (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) : 0;
      if (nbdkit_add_extent(extents, e.offset_bytes, e.length_bytes, type) == -1) return -1;
    }
    return 0;
  } catch (const std::exception& e) {
    return fail_errno(std::string("extents: ") + e.what());
  }
}

// Designated initializers in declaration order; not const: NBDKIT_REGISTER_PLUGIN fills the
// leading fields.
nbdkit_plugin g_plugin = {
    .name = "ferry",
    .longname = "Ferry recovery point",
    .version = "1",
    .description = "One disk of a Ferry store at one recovery point, read-only",
    .config = ferry_config,
    .config_complete = ferry_config_complete,
    .config_help = "store=DIR group=G point=N|latest disk=D",
    .open = ferry_open,
    .close = ferry_close,
    .get_size = ferry_get_size,
    .pread = ferry_pread,
    .can_multi_conn = ferry_can_multi_conn,
    .can_extents = ferry_can_extents,
    .extents = ferry_extents,
    .can_cache = ferry_can_cache,
    .block_size = ferry_block_size,
};

}  // namespace

NBDKIT_REGISTER_PLUGIN(g_plugin)
