#include "ferry/site/image_store.h"

namespace ferry::site {
namespace {

class FileImages final : public ImageStore {
 public:
  FileImages(std::shared_ptr<Storage> st, std::string dir) : st_(std::move(st)), dir_(std::move(dir)) {}

  Result<std::unique_ptr<StorageFile>> open(const std::string& disk, bool create) override {
    if (!create && !st_->exists(describe(disk)))
      return Status::error(Errc::not_found, "replica image " + describe(disk) + " is missing");
    return st_->open(describe(disk), OpenFlags{.create = create, .read_only = !create});
  }
  bool exists(const std::string& disk) override { return st_->exists(describe(disk)); }
  Status remove(const std::string& disk) override { return st_->remove(describe(disk)); }
  Result<std::vector<std::string>> disks() override {
    FERRY_ASSIGN_OR_RETURN(auto names, st_->list_dir(dir_));
    std::vector<std::string> out;
    for (const auto& n : names)
      if (n.size() > 4 && n.compare(n.size() - 4, 4, ".img") == 0) out.push_back(n.substr(0, n.size() - 4));
    return out;
  }
  Status sync() override { return st_->sync_dir(dir_); }
  std::string describe(const std::string& disk) const override { return dir_ + "/" + disk + ".img"; }

 private:
  std::shared_ptr<Storage> st_;
  std::string dir_;
};

}  // namespace

std::unique_ptr<ImageStore> file_images(std::shared_ptr<Storage> storage, std::string replica_dir) {
  return std::make_unique<FileImages>(std::move(storage), std::move(replica_dir));
}

}  // namespace ferry::site
