// libFuzzer target: the image decoders (JPEG through TurboJPEG and, for training crops, libjpeg's
// crop decode; PNG through libpng) and the crop-resize (libswscale) that follows them in the loader.
// Any input must decode or throw std::runtime_error.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "keel/data/image_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static keel::data::ImageDecoder decoder;  // reused across inputs, as a loader worker does
  keel::data::Pixels px;
  std::vector<uint8_t> scratch, chw(3 * 16 * 16);
  for (int channels : {3, 1}) {
    try {
      int w = 0, h = 0;
      decoder.header(data, size, &w, &h);
      const double scale = decoder.decode(data, size, channels, channels == 3 ? 1.0 : 0.25, px);
      (void)scale;
      if (px.width > 0 && px.height > 0) {
        keel::data::crop_resize_to_chw(px, {0, 0, static_cast<double>(px.width), static_cast<double>(px.height)}, 16,
                                       16, chw.data(), scratch);
      }
    } catch (const std::runtime_error&) {
    }
    try {
      // The training path: only the box's rows and columns, DCT-scaled when the box allows.
      int w = 0, h = 0;
      decoder.header(data, size, &w, &h);
      const keel::data::CropBox box{w / 4.0, h / 3.0, w / 2.0, h / 2.0};
      const keel::data::CropBox local = decoder.decode_crop(data, size, channels, channels == 3 ? 1.0 : 0.25, box, px);
      if (px.width > 0 && px.height > 0) keel::data::crop_resize_to_chw(px, local, 16, 16, chw.data(), scratch);
    } catch (const std::runtime_error&) {
    }
  }
  return 0;
}
