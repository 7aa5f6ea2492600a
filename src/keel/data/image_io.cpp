// Image decoding and crop-resize for loader workers (see image_io.h).
#include "keel/data/image_io.h"

#include <png.h>
#include <turbojpeg.h>

#include <csetjmp>
#include <cstdio>
// libjpeg's API (libjpeg-turbo's libjpeg62, the same library TurboJPEG wraps) for decoding a crop's
// rows and columns only: jpeg_crop_scanline and jpeg_skip_scanlines, which TurboJPEG 2.1 lacks.
#include <jpeglib.h>

extern "C" {
#include <libswscale/swscale.h>
}

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

// The smallest power-of-two DCT scaling denominator d in {8, 4, 2} with 1/d >= min_scale that the
// library offers (those have SIMD IDCTs in libjpeg-turbo), else 1.
int scale_denominator(double min_scale) {
  int n_factors = 0;
  const tjscalingfactor* factors = tjGetScalingFactors(&n_factors);
  for (int d : {8, 4, 2}) {
    if (1.0 / d + 1e-12 < min_scale) continue;
    for (int i = 0; i < n_factors; ++i) {
      if (factors[i].num == 1 && factors[i].denom == d) return d;
    }
  }
  return 1;
}

// Adobe-inverted CMYK (c' = 255 - c, as Photoshop and PIL write it) -> RGB or luma with PIL's
// cmyk2rgb on the true values: r = (255 - k) - (c * (255 - k)) / 255 = k' - muldiv255(255 - c', k').
void cmyk_to(const uint8_t* cmyk, size_t n, int channels, uint8_t* out) {
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = &cmyk[4 * i];
    const int nk = p[3];
    const int r = nk - muldiv255(255 - p[0], nk), g = nk - muldiv255(255 - p[1], nk),
              b = nk - muldiv255(255 - p[2], nk);
    if (channels == 3) {
      out[3 * i] = static_cast<uint8_t>(r);
      out[3 * i + 1] = static_cast<uint8_t>(g);
      out[3 * i + 2] = static_cast<uint8_t>(b);
    } else {
      out[i] = luma(r, g, b);
    }
  }
}

// libjpeg error manager: errors longjmp back to the decode with the library's message; warnings
// (a truncated or corrupt stream) are errors too, as decode() treats TurboJPEG's.
struct JpegErrors {
  jpeg_error_mgr pub;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

[[noreturn]] void jpeg_error_exit(j_common_ptr c) {
  auto* e = reinterpret_cast<JpegErrors*>(c->err);
  (*c->err->format_message)(c, e->message);
  std::longjmp(e->jump, 1);
}

void jpeg_emit_message(j_common_ptr c, int level) {
  if (level < 0) jpeg_error_exit(c);
}

// A window of a JPEG decoded DCT-scaled by 1/denom: rows [y0, y0 + h) and at least columns
// [x0, x0 + w) of the scaled image (libjpeg widens the columns to whole iMCUs). Plain C on purpose:
// longjmp out of libjpeg must not skip C++ destructors, so nothing here has one.
struct RegionJob {
  const uint8_t* data;
  size_t size;
  int denom;
  J_COLOR_SPACE space;
  int x0, y0, w, h;          // wanted, scaled coordinates
  uint8_t* out;              // room for h + 1 rows of the whole scaled width x components (the last: scratch)
  int out_x, out_w, comps;   // what was decoded: first column, columns, components per pixel
};

bool decode_region_c(RegionJob* job, JpegErrors* err) {
  jpeg_decompress_struct ci;
  std::memset(&ci, 0, sizeof ci);
  ci.err = jpeg_std_error(&err->pub);
  err->pub.error_exit = jpeg_error_exit;
  err->pub.emit_message = jpeg_emit_message;
  if (setjmp(err->jump)) {
    jpeg_destroy_decompress(&ci);
    return false;
  }
  jpeg_create_decompress(&ci);
  jpeg_mem_src(&ci, job->data, static_cast<unsigned long>(job->size));
  jpeg_read_header(&ci, TRUE);
  // libjpeg's defaults, as TurboJPEG's decode with flags 0 (and PIL): accurate integer IDCT, fancy upsampling.
  ci.scale_num = 1;
  ci.scale_denom = static_cast<unsigned int>(job->denom);
  ci.out_color_space = job->space;
  ci.dct_method = JDCT_ISLOW;
  ci.do_fancy_upsampling = TRUE;
  jpeg_start_decompress(&ci);
  JDIMENSION xoff = static_cast<JDIMENSION>(job->x0), width = static_cast<JDIMENSION>(job->w);
  if (xoff > 0 || width < ci.output_width) jpeg_crop_scanline(&ci, &xoff, &width);
  if (job->y0 > 0) jpeg_skip_scanlines(&ci, static_cast<JDIMENSION>(job->y0));
  const size_t row_bytes = static_cast<size_t>(ci.output_width) * ci.output_components;
  for (int r = 0; r < job->h; ++r) {
    JSAMPROW row = job->out + r * row_bytes;
    if (jpeg_read_scanlines(&ci, &row, 1) != 1) {
      std::snprintf(err->message, sizeof err->message, "no scanline %d (image has %u)", job->y0 + r, ci.output_height);
      jpeg_destroy_decompress(&ci);
      return false;
    }
  }
  // The rest is still entropy-decoded (no IDCT, no colour conversion) and the last row read: a file
  // truncated or corrupt below the crop fails here as it does in decode(), so whether a file is
  // readable never depends on the crop drawn. (Skipping straight to the end would not do: libjpeg-turbo
  // then marks the image done without reading the rest.) Measured: 0.34 ms per bench image against
  // 0.31 ms stopping after the crop and 0.42 ms for the full decode.
  if (ci.output_scanline + 1 < ci.output_height) {
    jpeg_skip_scanlines(&ci, ci.output_height - 1 - ci.output_scanline);
  }
  if (ci.output_scanline < ci.output_height) {
    JSAMPROW row = job->out + job->h * row_bytes;
    jpeg_read_scanlines(&ci, &row, 1);
  }
  jpeg_finish_decompress(&ci);
  job->out_x = static_cast<int>(xoff);
  job->out_w = static_cast<int>(ci.output_width);
  job->comps = ci.output_components;
  jpeg_destroy_decompress(&ci);
  return true;
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
    out.origin_x = out.origin_y = 0;
    out.image_width = out.width;
    out.image_height = out.height;
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
  const int denom = scale_denominator(min_scale);
  const int num = 1;
  const tjscalingfactor sf{num, denom};
  const int sw = TJSCALED(w, sf), sh = TJSCALED(h, sf);
  out.width = out.image_width = sw;
  out.height = out.image_height = sh;
  out.origin_x = out.origin_y = 0;
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
  cmyk_to(cmyk_.data(), static_cast<size_t>(sw) * sh, channels, out.data.data());
  return 1.0 / denom;
}

CropBox ImageDecoder::decode_crop(const uint8_t* data, size_t size, int channels, double min_scale, CropBox box,
                                  Pixels& out) {
  if (channels != 1 && channels != 3) {
    throw std::invalid_argument("ImageDecoder: channels must be 1 or 3, got " + std::to_string(channels));
  }
  const ImageFormat fmt = sniff_format(data, size);
  if (fmt != ImageFormat::kJpeg) {
    // PNG (or an error): the whole image; the box only scales (by 1).
    decode(data, size, channels, min_scale, out);
    return box;
  }
  if (!tj_) tj_ = tjInitDecompress();
  int w = 0, h = 0, subsamp = 0, colorspace = 0;
  if (tjDecompressHeader3(static_cast<tjhandle>(tj_), data, static_cast<unsigned long>(size), &w, &h, &subsamp,
                          &colorspace) != 0) {
    tj_fail(tj_, "JPEG header: ");
  }
  check_pixels("JPEG", w, h);
  const int denom = scale_denominator(min_scale);
  const tjscalingfactor sf{1, denom};
  const int sw = TJSCALED(w, sf), sh = TJSCALED(h, sf);
  // The box in scaled pixels, rounded and clamped exactly as crop_resize_to_chw will.
  const double fx = static_cast<double>(sw) / w, fy = static_cast<double>(sh) / h;
  const int x0 = std::clamp(static_cast<int>(std::lround(box.x * fx)), 0, sw - 1);
  const int y0 = std::clamp(static_cast<int>(std::lround(box.y * fy)), 0, sh - 1);
  const int bw = std::clamp(static_cast<int>(std::lround(box.w * fx)), 1, sw - x0);
  const int bh = std::clamp(static_cast<int>(std::lround(box.h * fy)), 1, sh - y0);
  // Two spare columns each side: libjpeg-turbo's fancy (h2v1/h2v2) upsampling replicates the
  // chroma at a cropped window's edge where the full decode has the real neighbour. Measured on
  // 2,400 windows at 1/1 to 1/8: with the margin, every pixel of the box equals the full decode's.
  const int left = std::max(0, x0 - 2), right = std::min(sw, x0 + bw + 2);
  const bool cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
  const int comps = cmyk ? 4 : channels;
  std::vector<uint8_t>& raw = cmyk ? cmyk_ : out.data;
  raw.resize(static_cast<size_t>(sw) * (bh + 1) * comps);  // the widest the window can become, + a spare row
  RegionJob job{data, size, denom, cmyk ? JCS_CMYK : (channels == 3 ? JCS_RGB : JCS_GRAYSCALE),
                left, y0, right - left, bh, raw.data(), 0, 0, 0};
  JpegErrors err;
  if (!decode_region_c(&job, &err)) {
    throw std::runtime_error(std::string("JPEG decode failed: ") + err.message);
  }
  if (job.comps != comps) {
    throw std::runtime_error("JPEG decode failed: " + std::to_string(job.comps) + " components decoded, expected " +
                             std::to_string(comps));
  }
  out.width = job.out_w;
  out.height = bh;
  out.channels = channels;
  out.origin_x = job.out_x;
  out.origin_y = y0;
  out.image_width = sw;
  out.image_height = sh;
  const size_t n = static_cast<size_t>(job.out_w) * bh;
  if (cmyk) {
    out.data.resize(n * channels);
    cmyk_to(cmyk_.data(), n, channels, out.data.data());
  } else {
    out.data.resize(n * channels);
  }
  return {static_cast<double>(x0 - job.out_x), 0.0, static_cast<double>(bw), static_cast<double>(bh)};
}

namespace {

// A thread's swscale context, kept while the sizes repeat (sws_getCachedContext re-initialises it
// only when they change: every random-resized crop, where the set-up is ~50 us against a ~1 ms decode).
struct Scaler {
  SwsContext* ctx = nullptr;
  ~Scaler() { sws_freeContext(ctx); }
};

// Rows of a plane padded to 32 bytes, so swscale's SIMD loads start aligned on every row.
inline int aligned_stride(int w) { return (w + 31) & ~31; }

// Resizes the w x h window at (x0, y0) of src to out_w x out_h, each channel into its own plane:
// channel c at dst + c * dst_plane, rows dst_stride apart. One GRAY8 -> GRAY8 swscale pass per
// plane with SWS_BILINEAR: a triangle filter widened by the ratio when shrinking (antialiased, as
// PIL's BILINEAR that torchvision uses) and no colour conversion (swscale would take RGB through
// YUV). Interleaved sources are first split into aligned planes, the window only.
void resize_window_to_planes(const Pixels& src, int x0, int y0, int w, int h, int out_w, int out_h, uint8_t* dst,
                             size_t dst_plane, int dst_stride, std::vector<uint8_t>& scratch) {
  const int W = src.width, C = src.channels;
  const uint8_t* origin = src.data.data() + (static_cast<size_t>(y0) * W + x0) * C;
  const int stride = aligned_stride(w);
  const size_t plane = static_cast<size_t>(stride) * h;
  const uint8_t* planes[3] = {origin, nullptr, nullptr};
  int src_stride = W;
  if (C > 1 || (w == out_w && h == out_h)) {
    // Interleaved -> planar (or the identity case: the window copied straight into dst).
    const bool direct = w == out_w && h == out_h;
    if (!direct) scratch.resize(plane * C);
    uint8_t* split[3] = {nullptr, nullptr, nullptr};
    for (int c = 0; c < C; ++c) planes[c] = split[c] = direct ? dst + c * dst_plane : scratch.data() + c * plane;
    const size_t out_stride = direct ? static_cast<size_t>(dst_stride) : static_cast<size_t>(stride);
    for (int y = 0; y < h; ++y) {
      const uint8_t* row = origin + static_cast<size_t>(y) * W * C;
      if (C == 1) {
        std::memcpy(split[0] + y * out_stride, row, static_cast<size_t>(w));
        continue;
      }
      // One pass over the row for all three planes (C is 3 here).
      uint8_t* p0 = split[0] + y * out_stride;
      uint8_t* p1 = split[1] + y * out_stride;
      uint8_t* p2 = split[2] + y * out_stride;
      for (int x = 0; x < w; ++x) {
        p0[x] = row[3 * x];
        p1[x] = row[3 * x + 1];
        p2[x] = row[3 * x + 2];
      }
    }
    if (direct) return;
    src_stride = stride;
  }
  thread_local Scaler scaler;
  scaler.ctx = sws_getCachedContext(scaler.ctx, w, h, AV_PIX_FMT_GRAY8, out_w, out_h, AV_PIX_FMT_GRAY8,
                                    SWS_BILINEAR | SWS_ACCURATE_RND, nullptr, nullptr, nullptr);
  if (!scaler.ctx) {
    throw std::runtime_error("swscale: no scaler for " + std::to_string(w) + "x" + std::to_string(h) + " -> " +
                             std::to_string(out_w) + "x" + std::to_string(out_h));
  }
  for (int c = 0; c < C; ++c) {
    const uint8_t* in[4] = {planes[c], nullptr, nullptr, nullptr};
    const int in_stride[4] = {src_stride, 0, 0, 0};
    uint8_t* out[4] = {dst + c * dst_plane, nullptr, nullptr, nullptr};
    const int out_stride[4] = {dst_stride, 0, 0, 0};
    if (sws_scale(scaler.ctx, in, in_stride, 0, h, out, out_stride) != out_h) {
      throw std::runtime_error("swscale failed (" + std::to_string(w) + "x" + std::to_string(h) + " -> " +
                               std::to_string(out_w) + "x" + std::to_string(out_h) + ")");
    }
  }
}

}  // namespace

void crop_resize_to_chw(const Pixels& src, CropBox box, int out_w, int out_h, uint8_t* dst,
                        std::vector<uint8_t>& scratch) {
  const int W = src.width, H = src.height;
  const int x0 = std::clamp(static_cast<int>(std::lround(box.x)), 0, W - 1);
  const int y0 = std::clamp(static_cast<int>(std::lround(box.y)), 0, H - 1);
  const int w = std::clamp(static_cast<int>(std::lround(box.w)), 1, W - x0);
  const int h = std::clamp(static_cast<int>(std::lround(box.h)), 1, H - y0);
  // Straight into the CHW planes of the batch buffer: no intermediate image.
  resize_window_to_planes(src, x0, y0, w, h, out_w, out_h, dst, static_cast<size_t>(out_w) * out_h, out_w, scratch);
}

namespace {
// The calling thread's resized image of resize_center_crop_to_chw, reused between calls.
std::vector<uint8_t>& resized_buffer() {
  thread_local std::vector<uint8_t> resized;
  return resized;
}
}  // namespace

size_t resize_buffer_bytes() { return resized_buffer().capacity(); }

void trim_resize_buffer(size_t max_bytes) {
  if (resized_buffer().capacity() > max_bytes) std::vector<uint8_t>().swap(resized_buffer());
}

void resize_center_crop_to_chw(const Pixels& src, const CenterCrop& cc, uint8_t* dst, std::vector<uint8_t>& scratch) {
  // The whole image resized into planes (after the split planes in `scratch`), then the centre window kept.
  const int C = src.channels, stride = aligned_stride(cc.resized_w);
  const size_t plane = static_cast<size_t>(stride) * cc.resized_h;
  std::vector<uint8_t>& resized = resized_buffer();
  resized.resize(plane * C);
  resize_window_to_planes(src, 0, 0, src.width, src.height, cc.resized_w, cc.resized_h, resized.data(), plane, stride,
                          scratch);
  const size_t out_plane = static_cast<size_t>(cc.size) * cc.size;
  for (int c = 0; c < C; ++c) {
    for (int y = 0; y < cc.size; ++y) {
      std::memcpy(dst + c * out_plane + static_cast<size_t>(y) * cc.size,
                  resized.data() + c * plane + static_cast<size_t>(cc.top + y) * stride + cc.left, cc.size);
    }
  }
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
