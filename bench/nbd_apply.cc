// nbd-apply: writes a change file into a disk through an NBD export of the QEMU that runs it,
// so QEMU's dirty bitmaps see every write (the bench writes the same change files into the
// qemu-storage-daemon that Ferry reads and into the libvirt domain that virtnbdbackup reads).
// Change file: records of {u64 offset, u64 length (little endian), length bytes}.
//
//   nbd-apply NBD_URI CHANGE_FILE
#include <fcntl.h>
#include <libnbd.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 3) { std::fprintf(stderr, "usage: nbd-apply NBD_URI CHANGE_FILE\n"); return 2; }
  nbd_handle* h = nbd_create();
  if (!h || nbd_connect_uri(h, argv[1]) == -1) { std::fprintf(stderr, "%s\n", nbd_get_error()); return 1; }
  FILE* f = std::fopen(argv[2], "rb");
  if (!f) { std::perror(argv[2]); return 1; }
  std::vector<char> buf;
  std::uint64_t hdr[2], records = 0, bytes = 0;
  while (std::fread(hdr, sizeof hdr, 1, f) == 1) {
    buf.resize(hdr[1]);
    if (std::fread(buf.data(), 1, buf.size(), f) != buf.size()) { std::fprintf(stderr, "short record\n"); return 1; }
    if (nbd_pwrite(h, buf.data(), buf.size(), hdr[0], 0) == -1) { std::fprintf(stderr, "%s\n", nbd_get_error()); return 1; }
    ++records;
    bytes += hdr[1];
  }
  if (nbd_flush(h, 0) == -1) { std::fprintf(stderr, "%s\n", nbd_get_error()); return 1; }
  nbd_shutdown(h, 0);
  nbd_close(h);
  std::printf("{\"records\": %llu, \"bytes\": %llu}\n", (unsigned long long)records, (unsigned long long)bytes);
  return 0;
}
