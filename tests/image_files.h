// Test helpers that write real JPEG (TurboJPEG) and PNG (libpng) files and ImageNet-layout folders.
#pragma once
#include <png.h>
#include <turbojpeg.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace keel::test {

// A smooth RGB test pattern (HWC) that differs with `seed`, so classes are distinguishable.
inline std::vector<uint8_t> pattern_rgb(int w, int h, int seed) {
  std::vector<uint8_t> px(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y) {
    for (int x = 0; x < w; ++x) {
      uint8_t* p = &px[(static_cast<size_t>(y) * w + x) * 3];
      p[0] = static_cast<uint8_t>((x * 255) / std::max(1, w - 1));
      p[1] = static_cast<uint8_t>((y * 255) / std::max(1, h - 1));
      p[2] = static_cast<uint8_t>(seed * 53 + (x + y) / 4);
    }
  }
  return px;
}

// Writes HWC RGB pixels as a quality-90 4:2:0 JPEG.
inline void write_jpeg(const std::string& path, const std::vector<uint8_t>& rgb, int w, int h) {
  tjhandle tj = tjInitCompress();
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  if (tjCompress2(tj, rgb.data(), w, 0, h, TJPF_RGB, &buf, &size, TJSAMP_420, 90, 0) != 0) {
    std::string why = tjGetErrorStr2(tj);
    tjDestroy(tj);
    throw std::runtime_error("write_jpeg " + path + ": " + why);
  }
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error("write_jpeg: cannot create " + path);
  std::fwrite(buf, 1, size, f);
  std::fclose(f);
  tjFree(buf);
  tjDestroy(tj);
}

// Writes HWC RGB pixels as an 8-bit RGB PNG.
inline void write_png(const std::string& path, const std::vector<uint8_t>& rgb, int w, int h) {
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = static_cast<png_uint_32>(w);
  img.height = static_cast<png_uint_32>(h);
  img.format = PNG_FORMAT_RGB;
  if (!png_image_write_to_file(&img, path.c_str(), 0, rgb.data(), 0, nullptr)) {
    throw std::runtime_error("write_png " + path + ": " + img.message);
  }
}

// root/{train,val}/class<c>/img<i>.{jpg,png}: `classes` x `per_class` training and `val_per_class`
// evaluation images of varying sizes around w x h; every third one a PNG.
inline void write_image_folder(const std::string& root, int classes, int per_class, int val_per_class, int w = 64,
                               int h = 48) {
  namespace fs = std::filesystem;
  for (const char* split : {"train", "val"}) {
    const int n = std::string(split) == "train" ? per_class : val_per_class;
    for (int c = 0; c < classes; ++c) {
      const fs::path dir = fs::path(root) / split / ("class" + std::to_string(c));
      fs::create_directories(dir);
      for (int i = 0; i < n; ++i) {
        const int iw = w + 8 * (i % 3), ih = h + 4 * (i % 2);
        const auto px = pattern_rgb(iw, ih, c);
        const std::string base = (dir / ("img" + std::to_string(i))).string();
        if (i % 3 == 2) write_png(base + ".png", px, iw, ih);
        else write_jpeg(base + ".jpg", px, iw, ih);
      }
    }
  }
}

}  // namespace keel::test
