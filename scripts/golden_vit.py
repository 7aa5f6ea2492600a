#!/usr/bin/python3
# Golden values for keel's Vision Transformers: torchvision VisionTransformer state dicts (random, seeded),
# inputs and logits (fp32 and under bf16 autocast). Run with /usr/bin/python3 (Debian's torch + torchvision).
# Usage: /usr/bin/python3 scripts/golden_vit.py OUTDIR CASE...
#   vit_b_16   torchvision.models.vit_b_16 at 224, 2 images
#   tiny_c1    ViT-Tiny/16 layout (12 layers, 3 heads, 192 wide) at 64 px, 1 input channel, 10 classes, 3 images
#   interp     the tiny_c1 model saved at 64 px, its state dict put through torchvision's interpolate_embeddings
#              to 96 px, and the logits of a 96 px model with that state (keel must give them from the 64 px file)
# Writes OUTDIR/<case>.pt (torch.save(model.state_dict())) and OUTDIR/<case>_io.pt
# ({'x', 'logits', 'logits_bf16'}).
import os
import sys

import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings


def randomise(model: torch.nn.Module) -> None:
    """torchvision zero-initialises the head and class token and leaves LayerNorms at (1, 0): make them non-trivial."""
    with torch.no_grad():
        model.class_token.normal_(0, 0.02)
        model.heads.head.weight.normal_(0, 0.02)
        model.heads.head.bias.uniform_(-0.1, 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
            if isinstance(m, torch.nn.MultiheadAttention):
                m.in_proj_bias.uniform_(-0.05, 0.05)
                m.out_proj.bias.uniform_(-0.05, 0.05)


def tiny(image_size: int) -> VisionTransformer:
    m = VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
                          mlp_dim=768, num_classes=10)
    m.conv_proj = torch.nn.Conv2d(1, 192, kernel_size=16, stride=16)  # 1 input channel (Fashion-MNIST-like)
    return m


def logits_of(model: torch.nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        fp32 = model(x)
        # torch 1.13's nn.MultiheadAttention fast path (_native_multi_head_attention, taken in eval mode) fails under
        # CPU bf16 autocast ("expected scalar type BFloat16 but found Float"); in training mode it takes the regular
        # path, which is the same computation here (dropout 0).
        for m in model.modules():
            if isinstance(m, torch.nn.MultiheadAttention):
                m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
        model.eval()
    return fp32, bf16


def save(outdir: str, case: str, state: dict, x: torch.Tensor, fp32: torch.Tensor, bf16: torch.Tensor) -> None:
    torch.save(state, os.path.join(outdir, f"{case}.pt"))
    torch.save({"x": x, "logits": fp32, "logits_bf16": bf16}, os.path.join(outdir, f"{case}_io.pt"))
    print(f"{case}: logits {tuple(fp32.shape)} abs max {fp32.abs().max().item():.4g}, "
          f"bf16 autocast vs fp32 max diff {(bf16 - fp32).abs().max().item():.3g}")


def main() -> int:
    if len(sys.argv) < 3:
        print(f"usage: {sys.argv[0]} OUTDIR CASE...", file=sys.stderr)
        return 2
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for case in sys.argv[2:]:
        torch.manual_seed(0)
        if case == "vit_b_16":
            model = torchvision.models.vit_b_16(weights=None)
            randomise(model)
            torch.manual_seed(1)
            x = torch.randn(2, 3, 224, 224)
            save(outdir, case, model.state_dict(), x, *logits_of(model, x))
        elif case == "tiny_c1":
            model = tiny(64)
            randomise(model)
            torch.manual_seed(1)
            x = torch.randn(3, 1, 64, 64)
            save(outdir, case, model.state_dict(), x, *logits_of(model, x))
        elif case == "interp":
            model = tiny(64)
            randomise(model)
            state = model.state_dict()
            big = tiny(96)
            big.load_state_dict(interpolate_embeddings(96, 16, dict(state), "bicubic"))
            torch.manual_seed(1)
            x = torch.randn(3, 1, 96, 96)
            save(outdir, case, state, x, *logits_of(big, x))  # the 64 px state, the 96 px model's logits
        else:
            print(f"unknown case {case}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
