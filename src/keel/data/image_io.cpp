// Image decoding and crop-resize for loader workers (see image_io.h).
#include "keel/data/image_io.h"

#include <png.h>
#include <turbojpeg.h>

// stb_image_resize compiled here (static, private to this file) rather than from Debian's libstb.so,
// which is built with assertions on: its sanity check on the sum of downsampling weights
// (`total < 1.1f`) fires for ordinary ratios such as 72 -> 40 with the triangle filter, although
// the very next line normalises the weights by that sum. Without the assertion the result is the
// normalised filter, as in any NDEBUG build of stb.
#define STB_IMAGE_RESIZE_IMPLEMENTATION
#define STB_IMAGE_RESIZE_STATIC
#define STBIR_ASSERT(x) ((void)0)
#include <stb/stb_image_resize.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace keel::data {
namespace {

// Next value of a splitmix64 stream (Steele et al.; the same on every platform).
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Uniform double in [0, 1) from the top 53 bits.
double uniform01(uint64_t& state) { return static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53; }

// Uniform integer in [lo, hi) (hi > lo); the modulo bias is below 2^-40 for image-sized ranges.
int64_t uniform_int(uint64_t& state, int64_t lo, int64_t hi) {
  return lo + static_cast<int64_t>(splitmix64(state) % static_cast<uint64_t>(hi - lo));
}

// PIL's MULDIV255: a * b / 255 rounded, in integers.
inline int muldiv255(int a, int b) {
  const int t = a * b + 128;
  return ((t >> 8) + t) >> 8;
}

// PIL's luma (ITU-R 601-2, fixed point) for RGB -> L.
inline uint8_t luma(int r, int g, int b) {
  return static_cast<uint8_t>((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16);
}

std::string tj_reason(void* tj) { return tjGetErrorStr2(static_cast<tjhandle>(tj)); }

// A TurboJPEG 2.1 handle is left mid-stream by an error and then fails on the next good file
// ("Bogus Huffman table definition"): replace it before reporting any error.
[[noreturn]] void tj_fail(void*& tj, const std::string& what) {
  std::string reason = what + tj_reason(tj);
  tjDestroy(static_cast<tjhandle>(tj));
  tj = tjInitDecompress();
  throw std::runtime_error(reason);
}

// Refuses sizes that no dataset image has but a corrupt header or a decompression bomb claims: the
// decode would otherwise allocate width x height x channels bytes (60000^2 x 3 = 10.8 GB) before
// reading a pixel. The limit is PIL's decompression-bomb error threshold (2 x Image.MAX_IMAGE_PIXELS).
constexpr int64_t kMaxPixels = 178956970;
void check_pixels(const char* what, int w, int h) {
  const int64_t n = static_cast<int64_t>(w) * h;
  if (w <= 0 || h <= 0 || n > kMaxPixels) {
    throw std::runtime_error(std::string(what) + ": header claims " + std::to_string(w) + "x" + std::to_string(h) +
                             " pixels; keel decodes 1 to " + std::to_string(kMaxPixels) +
                             " (PIL's decompression-bomb limit): a corrupt header or a decompression bomb");
  }
}

// Decodes a PNG to RGBA8 with libpng's simplified API, then keeps RGB or the luma.
void decode_png(const uint8_t* data, size_t size, int channels, Pixels& out) {
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_memory(&img, data, size)) {
    throw std::runtime_error(std::string("PNG decode failed: ") + img.message);
  }
  img.format = PNG_FORMAT_RGBA;  // every colour type, bit depth and palette -> 8-bit RGBA
  const int w = static_cast<int>(img.width), h = static_cast<int>(img.height);
  if (static_cast<int64_t>(img.width) * img.height > kMaxPixels || w <= 0 || h <= 0) {
    png_image_free(&img);
    check_pixels("PNG", static_cast<int>(std::min<png_uint_32>(img.width, INT32_MAX)),
                 static_cast<int>(std::min<png_uint_32>(img.height, INT32_MAX)));
  }
  std::vector<uint8_t> rgba(PNG_IMAGE_SIZE(img));
  if (!png_image_finish_read(&img, nullptr, rgba.data(), 0, nullptr)) {
    throw std::runtime_error(std::string("PNG decode failed: ") + img.message);
  }
  out.width = w;
  out.height = h;
  out.channels = channels;
  out.data.resize(static_cast<size_t>(w) * h * channels);
  const size_t n = static_cast<size_t>(w) * h;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = &rgba[4 * i];
    if (channels == 3) {
      std::memcpy(&out.data[3 * i], p, 3);  // alpha dropped, as PIL's convert("RGB")
    } else {
      out.data[i] = luma(p[0], p[1], p[2]);
    }
  }
}

}  // namespace

ImageFormat sniff_format(const uint8_t* d, size_t n) {
  if (n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return ImageFormat::kJpeg;
  static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (n >= 8 && std::memcmp(d, png_sig, 8) == 0) return ImageFormat::kPng;
  return ImageFormat::kUnknown;
}

// Names what was found when the bytes are neither JPEG nor PNG.
static std::string unknown_format_reason(const uint8_t* d, size_t n) {
  if (n == 0) return "empty file (0 bytes)";
  char hex[64];
  std::snprintf(hex, sizeof hex, "%02x %02x %02x %02x", n > 0 ? d[0] : 0, n > 1 ? d[1] : 0, n > 2 ? d[2] : 0,
                n > 3 ? d[3] : 0);
  return "not a JPEG or PNG file (" + std::to_string(n) + " bytes, starting " + hex +
         "; expected ff d8 ff or 89 50 4e 47)";
}

ImageDecoder::ImageDecoder() : tj_(tjInitDecompress()) {
  if (!tj_) throw std::runtime_error(std::string("tjInitDecompress failed: ") + tjGetErrorStr2(nullptr));
}

ImageDecoder::~ImageDecoder() {
  if (tj_) tjDestroy(static_cast<tjhandle>(tj_));
}

void ImageDecoder::header(const uint8_t* data, size_t size, int* width, int* height) {
  switch (sniff_format(data, size)) {
    case ImageFormat::kJpeg: {
      int subsamp = 0, colorspace = 0;
      if (!tj_) tj_ = tjInitDecompress();
      if (tjDecompressHeader3(static_cast<tjhandle>(tj_), data, static_cast<unsigned long>(size), width, height,
                              &subsamp, &colorspace) != 0) {
        tj_fail(tj_, "JPEG header: ");
      }
      return;
    }
    case ImageFormat::kPng: {
      png_image img;
      std::memset(&img, 0, sizeof img);
      img.version = PNG_IMAGE_VERSION;
      if (!png_image_begin_read_from_memory(&img, data, size)) {
        throw std::runtime_error(std::string("PNG header: ") + img.message);
      }
      *width = static_cast<int>(img.width);
      *height = static_cast<int>(img.height);
      png_image_free(&img);
      return;
    }
    default:
      throw std::runtime_error(unknown_format_reason(data, size));
  }
}

double ImageDecoder::decode(const uint8_t* data, size_t size, int channels, double min_scale, Pixels& out) {
  if (channels != 1 && channels != 3) {
    throw std::invalid_argument("ImageDecoder: channels must be 1 or 3, got " + std::to_string(channels));
  }
  const ImageFormat fmt = sniff_format(data, size);
  if (fmt == ImageFormat::kPng) {
    decode_png(data, size, channels, out);
    return 1.0;
  }
  if (fmt != ImageFormat::kJpeg) throw std::runtime_error(unknown_format_reason(data, size));

  if (!tj_) tj_ = tjInitDecompress();
  auto* tj = static_cast<tjhandle>(tj_);
  int w = 0, h = 0, subsamp = 0, colorspace = 0;
  if (tjDecompressHeader3(tj, data, static_cast<unsigned long>(size), &w, &h, &subsamp, &colorspace) != 0) {
    tj_fail(tj_, "JPEG header: ");
  }
  check_pixels("JPEG", w, h);
  // The smallest power-of-two factor still >= min_scale; only those the library offers.
  int num = 1, denom = 1;
  int n_factors = 0;
  const tjscalingfactor* factors = tjGetScalingFactors(&n_factors);
  for (int d : {8, 4, 2}) {
    if (1.0 / d + 1e-12 < min_scale) continue;
    bool offered = false;
    for (int i = 0; i < n_factors; ++i) offered |= factors[i].num == 1 && factors[i].denom == d;
    if (offered) {
      denom = d;
      break;
    }
  }
  const tjscalingfactor sf{num, denom};
  const int sw = TJSCALED(w, sf), sh = TJSCALED(h, sf);
  out.width = sw;
  out.height = sh;
  out.channels = channels;
  out.data.resize(static_cast<size_t>(sw) * sh * channels);
  const bool cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
  // Flags 0: accurate integer IDCT and fancy upsampling, libjpeg's defaults (and PIL's). Any
  // warning (a truncated or corrupt stream) makes tjDecompress2 return -1: treated as an error.
  if (!cmyk) {
    if (tjDecompress2(tj, data, static_cast<unsigned long>(size), out.data.data(), sw, 0, sh,
                      channels == 3 ? TJPF_RGB : TJPF_GRAY, 0) != 0) {
      tj_fail(tj_, "JPEG decode failed: ");
    }
    return 1.0 / denom;
  }
  cmyk_.resize(static_cast<size_t>(sw) * sh * 4);
  if (tjDecompress2(tj, data, static_cast<unsigned long>(size), cmyk_.data(), sw, 0, sh, TJPF_CMYK, 0) != 0) {
    tj_fail(tj_, "JPEG decode failed: ");
  }
  // Stored values are Adobe-inverted (c' = 255 - c); PIL's cmyk2rgb on the true values gives
  // r = (255 - k) - (c * (255 - k)) / 255 = k' - muldiv255(255 - c', k').
  const size_t n = static_cast<size_t>(sw) * sh;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = &cmyk_[4 * i];
    const int nk = p[3];
    const int r = nk - muldiv255(255 - p[0], nk), g = nk - muldiv255(255 - p[1], nk),
              b = nk - muldiv255(255 - p[2], nk);
    if (channels == 3) {
      out.data[3 * i] = static_cast<uint8_t>(r);
      out.data[3 * i + 1] = static_cast<uint8_t>(g);
      out.data[3 * i + 2] = static_cast<uint8_t>(b);
    } else {
      out.data[i] = luma(r, g, b);
    }
  }
  return 1.0 / denom;
}

namespace {

// Resizes a whole-pixel window of src to out_w x out_h into hwc (triangle filter, linear space).
void resize_window(const Pixels& src, int x0, int y0, int w, int h, int out_w, int out_h, std::vector<uint8_t>& hwc) {
  const int W = src.width, C = src.channels;
  const uint8_t* origin = src.data.data() + (static_cast<size_t>(y0) * W + x0) * C;
  hwc.resize(static_cast<size_t>(out_w) * out_h * C);
  if (w == out_w && h == out_h) {
    for (int y = 0; y < h; ++y) {
      std::memcpy(&hwc[static_cast<size_t>(y) * out_w * C], origin + static_cast<size_t>(y) * W * C,
                  static_cast<size_t>(w) * C);
    }
    return;
  }
  if (!stbir_resize_uint8_generic(origin, w, h, W * C, hwc.data(), out_w, out_h, out_w * C, C,
                                  STBIR_ALPHA_CHANNEL_NONE, 0, STBIR_EDGE_CLAMP, STBIR_FILTER_TRIANGLE,
                                  STBIR_COLORSPACE_LINEAR, nullptr)) {
    throw std::runtime_error("stb_image_resize failed (" + std::to_string(w) + "x" + std::to_string(h) + " -> " +
                             std::to_string(out_w) + "x" + std::to_string(out_h) + ")");
  }
}

// Copies the out_w x out_h window at (x0, y0) of an HWC image `width` pixels wide into planar CHW dst.
void hwc_window_to_chw(const uint8_t* hwc, int width, int channels, int x0, int y0, int out_w, int out_h,
                       uint8_t* dst) {
  const size_t plane = static_cast<size_t>(out_w) * out_h;
  for (int y = 0; y < out_h; ++y) {
    const uint8_t* row = hwc + (static_cast<size_t>(y0 + y) * width + x0) * channels;
    for (int x = 0; x < out_w; ++x) {
      for (int c = 0; c < channels; ++c) dst[c * plane + static_cast<size_t>(y) * out_w + x] = row[x * channels + c];
    }
  }
}

}  // namespace

void crop_resize_to_chw(const Pixels& src, CropBox box, int out_w, int out_h, uint8_t* dst,
                        std::vector<uint8_t>& hwc) {
  const int W = src.width, H = src.height;
  const int x0 = std::clamp(static_cast<int>(std::lround(box.x)), 0, W - 1);
  const int y0 = std::clamp(static_cast<int>(std::lround(box.y)), 0, H - 1);
  const int w = std::clamp(static_cast<int>(std::lround(box.w)), 1, W - x0);
  const int h = std::clamp(static_cast<int>(std::lround(box.h)), 1, H - y0);
  resize_window(src, x0, y0, w, h, out_w, out_h, hwc);
  hwc_window_to_chw(hwc.data(), out_w, src.channels, 0, 0, out_w, out_h, dst);
}

void resize_center_crop_to_chw(const Pixels& src, const CenterCrop& cc, uint8_t* dst, std::vector<uint8_t>& hwc) {
  resize_window(src, 0, 0, src.width, src.height, cc.resized_w, cc.resized_h, hwc);
  hwc_window_to_chw(hwc.data(), cc.resized_w, src.channels, cc.left, cc.top, cc.size, cc.size, dst);
}

CropBox random_resized_crop_box(int width, int height, double scale_lo, double scale_hi, double ratio_lo,
                                double ratio_hi, uint64_t seed) {
  uint64_t state = seed;
  const double area = static_cast<double>(width) * height;
  const double log_lo = std::log(ratio_lo), log_hi = std::log(ratio_hi);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target = area * (scale_lo + (scale_hi - scale_lo) * uniform01(state));
    const double aspect = std::exp(log_lo + (log_hi - log_lo) * uniform01(state));
    const int w = static_cast<int>(std::lround(std::sqrt(target * aspect)));
    const int h = static_cast<int>(std::lround(std::sqrt(target / aspect)));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      const int64_t i = uniform_int(state, 0, height - h + 1);
      const int64_t j = uniform_int(state, 0, width - w + 1);
      return {static_cast<double>(j), static_cast<double>(i), static_cast<double>(w), static_cast<double>(h)};
    }
  }
  // Fallback: the whole image, its aspect clamped into the ratio range, centred.
  const double in_ratio = static_cast<double>(width) / height;
  int w = width, h = height;
  if (in_ratio < ratio_lo) {
    h = static_cast<int>(std::lround(w / ratio_lo));
  } else if (in_ratio > ratio_hi) {
    w = static_cast<int>(std::lround(h * ratio_hi));
  }
  return {static_cast<double>((width - w) / 2), static_cast<double>((height - h) / 2), static_cast<double>(w),
          static_cast<double>(h)};
}

CenterCrop center_crop(int width, int height, int resize, int size) {
  // torchvision 0.14 Resize(resize): shorter side -> resize, longer -> int(resize * long / short);
  // CenterCrop(size): offsets int(round((resized - size) / 2)) with Python's round-half-even.
  CenterCrop cc;
  cc.size = size;
  cc.resized_w = cc.resized_h = resize;
  if (width <= height) {
    cc.resized_h = static_cast<int>(static_cast<int64_t>(resize) * height / width);
  } else {
    cc.resized_w = static_cast<int>(static_cast<int64_t>(resize) * width / height);
  }
  cc.left = static_cast<int>(std::nearbyint((cc.resized_w - size) / 2.0));
  cc.top = static_cast<int>(std::nearbyint((cc.resized_h - size) / 2.0));
  const double fx = static_cast<double>(width) / cc.resized_w, fy = static_cast<double>(height) / cc.resized_h;
  cc.box = {cc.left * fx, cc.top * fy, size * fx, size * fy};
  return cc;
}

uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c) {
  uint64_t s = a;
  uint64_t x = splitmix64(s) ^ b;
  x = splitmix64(x) ^ c;
  return splitmix64(x);
}

void read_file(const std::string& path, std::vector<uint8_t>& out) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("cannot open (" + std::string(std::strerror(errno)) + ")");
  // Read straight into the reused buffer: no per-file allocation once it is big enough.
  long n = -1;
  if (std::fseek(f, 0, SEEK_END) == 0) n = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  size_t used = 0;
  out.resize(n >= 0 ? static_cast<size_t>(n) + 1 : size_t{1} << 16);  // +1: EOF seen in one read
  for (;;) {
    used += std::fread(out.data() + used, 1, out.size() - used, f);
    if (used < out.size() || std::ferror(f)) break;
    out.resize(out.size() * 2);  // the file grew since ftell, or ftell failed
  }
  out.resize(used);
  const bool error = std::ferror(f) != 0;
  std::fclose(f);
  if (error) throw std::runtime_error("read error (" + std::string(std::strerror(errno)) + ")");
}

}  // namespace keel::data
