// ImageFolderDataset: one sub-folder per class of JPEG/PNG files (the ImageNet train/val layout).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>
#include "keel/data/dataset.h"

namespace keel::data {

// How an image folder's files become size x size samples.
struct ImageFolderOptions {
  int64_t size = 224;       // output height and width
  int64_t channels = 3;     // 3 = RGB, 1 = luma
  bool train = true;        // true: random-resized-crop region; false: resize shorter side + centre crop
  double scale_lo = 0.08, scale_hi = 1.0;          // RRC area fraction range (torchvision's default)
  double ratio_lo = 3.0 / 4.0, ratio_hi = 4.0 / 3.0;  // RRC aspect ratio range
  int64_t eval_resize = 256;  // eval: the shorter side is scaled to this, then the centre size x size kept
  uint64_t seed = 0;          // RRC boxes are drawn from (seed, epoch, index)
  // Symbolic links are followed when their target lies inside the dataset's folder or inside this one
  // (make_image_folder_split sets it to data.root; empty: the folder only); one leading elsewhere is an
  // error naming it. A link back to a folder the scan is already inside (a loop) is not followed.
  std::string data_root;
};

// Files dir/<class>/**/*.{jpg,jpeg,png} (extension case-insensitive; links as ImageFolderOptions::data_root
// says), classes in sorted name
// order (label = position), files sorted by path. Per sample a worker decodes (TurboJPEG with
// DCT-domain downscaling when the crop is at least twice the output, or libpng), crops and
// resizes (libswscale) to the common size; everything else happens batched on the device.
class ImageFolderDataset : public Dataset {
 public:
  // `classes` empty: the sub-folders of dir. Given (an evaluation split): exactly these
  // sub-folders must exist, so labels agree with the training split. Throws naming dir when
  // it is missing, has no class folders or no image at all, and naming a link that leaves the data root.
  ImageFolderDataset(const std::string& dir, ImageFolderOptions options, std::vector<std::string> classes = {});

  size_t size() const override { return paths_.size(); }
  ImageShape shape() const override { return {opts_.channels, opts_.size, opts_.size}; }
  int64_t num_classes() const override { return static_cast<int64_t>(classes_.size()); }
  int64_t label(size_t index) const override { return labels_.at(index); }
  void read_image(size_t index, uint8_t* dst) const override { read_sample(index, 0, dst); }
  void read_sample(size_t index, int64_t epoch, uint8_t* dst) const override;
  std::string describe(size_t index) const override { return paths_.at(index); }

  const std::vector<std::string>& classes() const { return classes_; }
  const ImageFolderOptions& options() const { return opts_; }

 private:
  std::string dir_;
  ImageFolderOptions opts_;
  std::vector<std::string> classes_;
  std::vector<std::string> paths_;
  std::vector<int64_t> labels_;
};

// A worker's decode buffer (one of five) is kept for the next sample while it holds at most this many
// bytes; one grown for a bigger image is released after that sample.
constexpr size_t kRetainedBufferBytes = size_t{8} << 20;
// So what a thread keeps between samples is at most:
constexpr size_t kRetainedDecodeBytes = 5 * kRetainedBufferBytes;

// Bytes the calling thread's image-folder decode buffers keep allocated between samples (file bytes,
// decoded pixels, colour planes, resized image, CMYK staging).
size_t decode_buffer_bytes();

// A split of the ImageNet layout: root/train for training; root/val (or root/test) for
// evaluation, with the training split's class list. Throws naming the paths tried.
std::unique_ptr<ImageFolderDataset> make_image_folder_split(const std::string& root, ImageFolderOptions options,
                                                            bool train);

}  // namespace keel::data
