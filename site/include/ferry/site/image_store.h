// The replica images of one group: the only way the store, its compaction and its readers
// touch them. Today a directory of sparse raw files (`<group>/replica/<disk>.img`) on the
// storage seam; a block-device backend (Ceph RBD: one image per disk) is one more
// implementation of this interface, with the journal and the rest of the store unchanged.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ferry/base/status.h"
#include "ferry/site/storage.h"

namespace ferry::site {

class ImageStore {
 public:
  virtual ~ImageStore() = default;
  // The image of `disk`; created empty when `create` and missing (Errc::not_found else).
  // pread/pwrite/truncate/punch_hole/datasync/size/next_data on the result.
  virtual Result<std::unique_ptr<StorageFile>> open(const std::string& disk, bool create) = 0;
  virtual bool exists(const std::string& disk) = 0;
  virtual Status remove(const std::string& disk) = 0;
  virtual Result<std::vector<std::string>> disks() = 0;  // the disks that have an image
  // Makes created and removed images durable (the directory entries, for files).
  virtual Status sync() = 0;
  virtual std::string describe(const std::string& disk) const = 0;  // for messages: a path
};

// Sparse raw files `<replica_dir>/<disk>.img` through `storage`.
std::unique_ptr<ImageStore> file_images(std::shared_ptr<Storage> storage, std::string replica_dir);

}  // namespace ferry::site
