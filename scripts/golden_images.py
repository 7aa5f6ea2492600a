#!/usr/bin/python3
"""Golden values for keel's image decoding and eval crop: small JPEG/PNG fixtures cut from
python3-skimage's sample photographs, and what PIL + torchvision make of them.

Run with Debian's /usr/bin/python3 (python3-pil, python3-skimage, python3-torchvision):
    /usr/bin/python3 scripts/golden_images.py tests/data/fixtures/images
Writes <name>.{jpg,png}, <name>.<ext>.rgb (PIL's decode, .convert("RGB"), raw HWC bytes) and
<name>.<ext>.eval.rgb (torchvision Resize(40) + CenterCrop(32), bilinear, raw HWC bytes).
"""
import os
import sys

import numpy as np
from PIL import Image
from skimage import data
from torchvision import transforms

out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/fixtures/images"
os.makedirs(out, exist_ok=True)

astronaut = Image.fromarray(data.astronaut()).crop((120, 40, 312, 184)).resize((96, 72), Image.BILINEAR)
coffee = Image.fromarray(data.coffee()).resize((256, 192), Image.BILINEAR)
alpha = Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (72, 1)))

images = {
    "rgb.jpg": (astronaut, {"quality": 90}),
    "gray.jpg": (astronaut.convert("L"), {"quality": 90}),
    "cmyk.jpg": (astronaut.convert("CMYK"), {"quality": 90}),
    "rgba.png": (Image.merge("RGBA", (*astronaut.split(), alpha)), {}),
    "gray.png": (astronaut.convert("L"), {}),
    "palette.png": (astronaut.quantize(64), {}),
    "big.jpg": (coffee, {"quality": 90}),  # 256x192: eval at 40/32 decodes it DCT-scaled by 1/4
}
evaluate = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32)])  # bilinear on PIL images
for name, (img, kw) in images.items():
    path = os.path.join(out, name)
    img.save(path, **kw)
    decoded = Image.open(path).convert("RGB")
    if name != "big.jpg":
        open(path + ".rgb", "wb").write(decoded.tobytes())
    open(path + ".eval.rgb", "wb").write(evaluate(decoded).tobytes())
    print(name, decoded.size, Image.open(path).mode)
