#!/usr/bin/python3
"""Generates an ImageNet-layout JPEG folder from the real photographs python3-skimage ships.

Run with Debian's /usr/bin/python3 (python3-skimage, python3-pil; scripts/setup.sh installs them):
    /usr/bin/python3 scripts/make_jpeg_folder.py OUT [--classes 10] [--train 50] [--val 10] [--seed 0]
Writes OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg: class k takes its own sample photograph,
and each image is a random crop of it (30-100% of each side, mirrored half the time) scaled so
its sides are ImageNet-like (shorter side 300-400 px, longer side up to 500 px), saved as
quality-90 JPEG. Deterministic: the same arguments write the same bytes. Not committed to git;
tests and benchmarks generate it into their build or tmp directory.
"""
import argparse
import os
import random

import numpy as np
from PIL import Image
from skimage import data

# Colour photographs shipped in skimage/data (the gray ones are converted to RGB).
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "immunohistochemistry",
          "hubble_deep_field", "retina", "camera", "coins", "moon", "page", "text", "clock", "horse"]


def photo(name):
    """One sample photograph as an RGB PIL image."""
    arr = getattr(data, name)()
    if arr.dtype != np.uint8:
        arr = (255 * (arr.astype(np.float64) / max(1, arr.max()))).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert("RGB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train", type=int, default=50, help="training images per class")
    ap.add_argument("--val", type=int, default=10, help="validation images per class")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    names = [n for n in PHOTOS if hasattr(data, n)]
    if a.classes > len(names):
        raise SystemExit(f"--classes {a.classes}: only {len(names)} sample photographs available")
    rng = random.Random(a.seed)
    total = 0
    for k, name in enumerate(names[: a.classes]):
        src = photo(name)
        for split, n in (("train", a.train), ("val", a.val)):
            d = os.path.join(a.out, split, f"{k:02d}_{name}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                w, h = src.size
                cw, ch = int(w * rng.uniform(0.3, 1.0)), int(h * rng.uniform(0.3, 1.0))
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                img = src.crop((x, y, x + cw, y + ch))
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                short = rng.randint(300, 400)
                scale = short / min(cw, ch)
                tw, th = round(cw * scale), round(ch * scale)
                if max(tw, th) > 500:  # keep the longer side ImageNet-like too
                    f = 500 / max(tw, th)
                    tw, th = round(tw * f), round(th * f)
                img.resize((tw, th), Image.BILINEAR).save(os.path.join(d, f"{i:05d}.jpg"), quality=90)
                total += 1
    print(f"make_jpeg_folder: {total} JPEGs in {a.out} ({a.classes} classes x {a.train} train + {a.val} val)")


if __name__ == "__main__":
    main()
