#!/usr/bin/python3
"""Golden values for keel's batched resized crop on the training device (data/augment.h resized_crop):
what torchvision's resized_crop makes of the same float images and boxes.

Run with Debian's /usr/bin/python3 (python3-torch, python3-torchvision):
    /usr/bin/python3 scripts/golden_augment.py tests/data/fixtures/augment
Writes rrc.bin: a little-endian int64 header (N, C, H, W, OUT, then N boxes top, left, height, width),
the uint8 input images (N, C, H, W; pixel = (n * 37 + c * 101 + y * 13 + x * 7 + (x * y) % 11) % 256, also
recomputed by the test) and float32 outputs (N, C, OUT, OUT), first with antialias=True, then False.
"""
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as F

out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/fixtures/augment"
os.makedirs(out, exist_ok=True)

N, C, H, W, OUT = 5, 3, 32, 32, 24
# Boxes that shrink (32 -> 24, 29 -> 24), grow (8 -> 24), stretch one axis, and touch every border.
boxes = [(0, 0, 32, 32), (3, 1, 29, 30), (20, 24, 8, 8), (0, 10, 12, 22), (16, 0, 16, 32)]
n, c, y, x = np.meshgrid(np.arange(N), np.arange(C), np.arange(H), np.arange(W), indexing="ij")
images = ((n * 37 + c * 101 + y * 13 + x * 7 + (x * y) % 11) % 256).astype(np.uint8)
t = torch.from_numpy(images).float()
outs = []
for antialias in (True, False):
    outs.append(torch.stack([F.resized_crop(t[i], *boxes[i], [OUT, OUT], F.InterpolationMode.BILINEAR,
                                            antialias=antialias) for i in range(N)]))
with open(os.path.join(out, "rrc.bin"), "wb") as f:
    f.write(np.array([N, C, H, W, OUT] + [v for b in boxes for v in b], dtype="<i8").tobytes())
    f.write(images.tobytes())
    for o in outs:
        f.write(o.numpy().astype("<f4").tobytes())
print("wrote", os.path.join(out, "rrc.bin"))
