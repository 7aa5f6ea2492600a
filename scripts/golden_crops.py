#!/usr/bin/python3
"""Golden values for keel's training crop (ImageDecoder::decode_crop + crop_resize_to_chw): torchvision's
resized_crop on PIL images (RandomResizedCrop's crop-then-resize, bilinear with PIL's antialiasing) of
the fixtures scripts/golden_images.py wrote.

Run with Debian's /usr/bin/python3 (python3-pil, python3-torchvision):
    /usr/bin/python3 scripts/golden_crops.py tests/data/fixtures/images
Writes <name>.crops.rgb: for each box of BOXES (top, left, height, width; the test has the same list),
the 32 x 32 RGB result as raw HWC bytes, one after the other.
"""
import os
import sys

from PIL import Image
import torchvision.transforms.functional as F

out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/fixtures/images"
# Shrinking (by up to 5x), enlarging, and boxes on every border; 96x72 and 256x192 images.
BOXES = {
    "rgb.jpg": [(0, 0, 72, 96), (10, 20, 40, 50), (50, 70, 22, 26), (5, 0, 16, 12)],
    "cmyk.jpg": [(3, 4, 60, 80)],
    "rgba.png": [(12, 30, 48, 60)],
    "big.jpg": [(0, 0, 192, 256), (40, 60, 150, 160), (100, 200, 92, 56)],
}
for name, boxes in BOXES.items():
    img = Image.open(os.path.join(out, name)).convert("RGB")
    with open(os.path.join(out, name + ".crops.rgb"), "wb") as f:
        for top, left, h, w in boxes:
            f.write(F.resized_crop(img, top, left, h, w, [32, 32], F.InterpolationMode.BILINEAR).tobytes())
print("wrote", len(BOXES), "files")
