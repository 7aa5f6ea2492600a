// Image decoding (JPEG through TurboJPEG with DCT-domain scaling, PNG through libpng) and
// crop-and-resize (FFmpeg's libswscale) into uint8 CHW samples: the per-image work of loader workers.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace keel::data {

// Encoded formats keel reads, recognised by their first bytes (never by the file extension).
enum class ImageFormat { kUnknown, kJpeg, kPng };
ImageFormat sniff_format(const uint8_t* data, size_t size);

// Decoded pixels, interleaved HWC uint8 with 1 (gray) or 3 (RGB) channels.
struct Pixels {
  int width = 0, height = 0, channels = 0;
  std::vector<uint8_t> data;  // reused between decodes (the image folder releases it after a huge image)
  // Where these pixels lie in the (DCT-scaled) image: the whole of it after decode(), a window
  // after decode_crop().
  int origin_x = 0, origin_y = 0, image_width = 0, image_height = 0;
};

// A region of an image in its full-resolution pixel coordinates.
struct CropBox {
  double x = 0, y = 0, w = 0, h = 0;
};

// Per-thread decoder (one TurboJPEG handle, reused buffers); not thread-safe, cheap to keep.
class ImageDecoder {
 public:
  ImageDecoder();
  ~ImageDecoder();
  ImageDecoder(const ImageDecoder&) = delete;
  ImageDecoder& operator=(const ImageDecoder&) = delete;

  // Full-resolution width and height from the header. Throws std::runtime_error with the
  // decoder's reason (not a JPEG/PNG, corrupt header).
  void header(const uint8_t* data, size_t size, int* width, int* height);

  // Decodes to `channels` (1: gray/luma, 3: RGB) into out. Gray sources are replicated to RGB,
  // CMYK/YCCK JPEGs (Adobe-inverted, as Photoshop and PIL write them) are converted to RGB as
  // PIL does, alpha is dropped (as PIL's convert("RGB")). `min_scale` in (0, 1]: a JPEG may be
  // decoded DCT-scaled by the smallest factor in {1/8, 1/4, 1/2} that is >= min_scale (the
  // factors libjpeg-turbo's SIMD IDCT covers); the scale used is returned (1 for PNG). Throws
  // std::runtime_error with the decoder's reason on corrupt or truncated data (a truncated JPEG
  // is an error, as in PIL, not a gray-filled image).
  double decode(const uint8_t* data, size_t size, int channels, double min_scale, Pixels& out);

  // What crop_resize_to_chw needs of `box` (full-resolution coordinates), as decode() would give
  // it, but a JPEG decodes only the box's rows and (whole-iMCU) columns: libjpeg's
  // jpeg_skip_scanlines / jpeg_crop_scanline (rows outside are entropy-decoded only, so a corrupt
  // or truncated file fails whatever the box). Returns the box in out's pixel coordinates (whole
  // pixels); those pixels equal decode()'s. PNG: decode() and the box unchanged.
  CropBox decode_crop(const uint8_t* data, size_t size, int channels, double min_scale, CropBox box, Pixels& out);

  // Bytes this decoder keeps allocated between images (its CMYK staging buffer).
  size_t buffer_bytes() const { return cmyk_.capacity(); }
  // Releases that buffer when it holds more than max_bytes (grown for one huge image).
  void trim(size_t max_bytes) {
    if (cmyk_.capacity() > max_bytes) std::vector<uint8_t>().swap(cmyk_);
  }

 private:
  void* tj_;  // tjhandle
  std::vector<uint8_t> cmyk_;
};

// Crops `box` of `src` (src's pixel coordinates, rounded to whole pixels, clamped inside) and
// resizes the crop alone to out_w x out_h with a triangle filter (bilinear, antialiased when
// shrinking, like PIL's BILINEAR), writing planar CHW uint8 to dst: torchvision's crop-then-resize
// (RandomResizedCrop). `scratch` (the split colour planes) is reused between calls.
void crop_resize_to_chw(const Pixels& src, CropBox box, int out_w, int out_h, uint8_t* dst,
                        std::vector<uint8_t>& scratch);

// torchvision's eval geometry Resize(resize) + CenterCrop(size) on a width x height image.
struct CenterCrop {
  int resized_w = 0, resized_h = 0;  // the whole image resized so its shorter side is `resize`
  int left = 0, top = 0, size = 0;   // the kept window of the resized image
  CropBox box;                       // that window in the original image's coordinates
};
CenterCrop center_crop(int width, int height, int resize, int size);

// Resizes the whole of `src` to cc.resized_w x cc.resized_h and keeps the centre window (as
// torchvision does, so edge pixels are filtered with their real neighbours), as CHW into dst.
// `src` may be a DCT-scaled decode: the resize then starts from fewer pixels.
void resize_center_crop_to_chw(const Pixels& src, const CenterCrop& cc, uint8_t* dst,
                               std::vector<uint8_t>& scratch);
// Bytes the calling thread's resize_center_crop_to_chw keeps allocated between calls (the resized image).
size_t resize_buffer_bytes();
// Releases that buffer when it holds more than max_bytes.
void trim_resize_buffer(size_t max_bytes);

// torchvision's RandomResizedCrop.get_params on a width x height image, drawing from a
// splitmix64 stream seeded by `seed`: 10 tries of area fraction in scale, log-uniform aspect in
// ratio, then the centre fallback. Same seed -> same box on every platform.
CropBox random_resized_crop_box(int width, int height, double scale_lo, double scale_hi, double ratio_lo,
                                double ratio_hi, uint64_t seed);


// Mixes several 64-bit values into one well-spread seed (splitmix64 finaliser chain).
uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c = 0);

// Reads a whole file into `out` (reusing its capacity). Throws std::runtime_error naming the
// path and the system's reason when it cannot be opened or read.
void read_file(const std::string& path, std::vector<uint8_t>& out);

}  // namespace keel::data
