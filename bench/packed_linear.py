#!/usr/bin/env python3
# The GEMMs behind keel's `pack` inference switch (docs/inference.md): for ViT-S/16's linear shapes at batch 1
# (197 rows) and batch 32 (6304 rows), median time of F.linear against oneDNN's pre-packed linear
# (torch.ops.mkldnn._reorder_linear_weight + _linear_pointwise, the operators keel calls through the dispatcher),
# in bf16 and fp32, and the packed time with each packing batch-size hint (none, 197, 6304).
# Run it with .venv-torch/bin/python (torch 2.14.1, keel's LibTorch); torch 1.13 has no such operators.
#   .venv-torch/bin/python bench/packed_linear.py [THREADS] [ITERS]
import sys
import time

import torch
import torch.nn.functional as F

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 15
torch.set_num_threads(threads)
pack, packed_linear = torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise


def median_ms(f):
    for _ in range(3):
        f()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[iters // 2] * 1e3


print(f"torch {torch.__version__}, {threads} threads, median of {iters}; ms, and packed's gain over F.linear")
with torch.inference_mode():
    for dt in (torch.bfloat16, torch.float32):
        for k, n in ((384, 1152), (384, 384), (384, 1536), (1536, 384)):  # QKV, out_proj, mlp.0, mlp.3
            w, b = torch.randn(n, k).to(dt), torch.randn(n).to(dt)
            hints = {"none": pack(w, None), "197": pack(w, 197), "6304": pack(w, 6304)}
            for rows in (197, 6304):
                x = torch.randn(rows, k).to(dt)
                plain = median_ms(lambda: F.linear(x, w, b))
                packed = {h: median_ms(lambda: packed_linear(x, p, b, "none", [], "")) for h, p in hints.items()}
                best = min(packed.values())
                print(f"{str(dt)[6:]:9s} {rows:5d}x{k}x{n:<5d} F.linear {plain:7.3f}  packed (hint " +
                      " / ".join(f"{h} {v:.3f}" for h, v in packed.items()) + f")  gain {plain / best - 1:+.0%}")
