#!/usr/bin/python3
# PyTorch peer of `keel bench infer`: the same torchvision model and weights (this script writes them, random and
# seeded, for keel's --checkpoint), the same threads, input side and batch sizes. Settings:
#   eager_fp32        model.eval(), torch.inference_mode(), NCHW fp32 (what most inference code does)
#   eager_bf16_cl     + channels_last + bf16 autocast
#   jit_fp32          torch.jit.trace + torch.jit.freeze + torch.jit.optimize_for_inference (oneDNN), fp32
#   jit_bf16          trace under bf16 autocast (JIT autocast pass off) + freeze + optimize_for_inference
# PyTorch's best per metric is the best of these that ran. Prints one JSON object on the last line.
# Usage: /usr/bin/python3 bench/peer_infer.py MODEL WEIGHTS [--load] [--threads N] [--size 224] [--batches 1,32] ...
#   MODEL: resnet50 | vit_s_16 (torchvision VisionTransformer(224, 16, 12, 6, 384, 1536), keel's vit_small_16)
import argparse
import json
import os
import statistics
import time

import torch
import torchvision
from torchvision.models.vision_transformer import VisionTransformer


def build(name: str, size: int, weights=None) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet50":
        m = torchvision.models.resnet50(weights=None)
        with torch.no_grad():  # non-trivial BatchNorm, as trained weights have
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.2, 0.2)
                    mod.running_var.uniform_(0.5, 2.0)
    elif name == "vit_s_16":
        m = VisionTransformer(image_size=size, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384,
                              mlp_dim=1536)
        with torch.no_grad():
            m.heads.head.weight.normal_(0, 0.02)
    else:
        raise SystemExit(f"unknown model {name}")
    if weights is not None:
        m.load_state_dict(weights)
    return m.eval()


def slow_path_attention(m: torch.nn.Module) -> None:
    """torch 1.13's nn.MultiheadAttention fast path (_native_multi_head_attention) fails under CPU bf16 autocast
    ("expected scalar type BFloat16 but found Float"); training mode takes the regular path (dropout is 0)."""
    for mod in m.modules():
        if isinstance(mod, torch.nn.MultiheadAttention):
            mod.train()


def timed(fn, iters: int):
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def measure(fn_for_batch, a):
    """Latency samples (ms) at batch 1, images/s per sweep batch."""
    res = {"latency_ms": {}, "images_per_second": {}}
    f1 = fn_for_batch(1)
    for _ in range(a.warmup):
        f1()
    lat = sorted(timed(f1, a.latency_iters))
    rank = lambda p: lat[min(len(lat) - 1, max(0, -(-p * len(lat) // 100) - 1))]
    res["latency_ms"] = {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": lat[-1], "samples": lat}
    for b in a.batches:
        fb = fn_for_batch(b)
        for _ in range(a.warmup):
            fb()
        t = time.perf_counter()
        for _ in range(a.sweep_iters):
            fb()
        res["images_per_second"][str(b)] = b * a.sweep_iters / (time.perf_counter() - t)
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("weights_out", metavar="WEIGHTS")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--latency-iters", type=int, default=10)
    p.add_argument("--sweep-iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--settings", default="eager_fp32,eager_bf16_cl,jit_fp32,jit_bf16")
    p.add_argument("--load", action="store_true", help="read WEIGHTS (written by an earlier run) instead of writing it")
    a = p.parse_args()
    a.batches = [int(b) for b in a.batches.split(",")]
    torch.set_num_threads(a.threads)
    weights = torch.load(a.weights_out) if a.load else build(a.model, a.size).state_dict()
    if not a.load:
        torch.save(weights, a.weights_out)
    inp = lambda n, cl=False: (torch.randn(n, 3, a.size, a.size).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format))

    def eager(bf16: bool, cl: bool):
        m = build(a.model, a.size, weights)
        if bf16:
            slow_path_attention(m)
        if cl:
            m = m.to(memory_format=torch.channels_last)

        def for_batch(n):
            x = inp(n, cl)

            def f():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    m(x)
            return f
        return for_batch

    def jit(bf16: bool):
        m = build(a.model, a.size, weights)
        if bf16:
            slow_path_attention(m)
        x = inp(1)
        torch._C._jit_set_autocast_mode(False)  # autocast casts are traced into the graph instead
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tm = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, x, check_trace=False)))

        def for_batch(n):
            xn = inp(n)

            def f():
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    tm(xn)
            return f
        return for_batch

    makers = {"eager_fp32": lambda: eager(False, False), "eager_bf16_cl": lambda: eager(True, True),
              "jit_fp32": lambda: jit(False), "jit_bf16": lambda: jit(True)}
    out = {"torch": torch.__version__, "model": a.model, "size": a.size, "threads": torch.get_num_threads(),
           "batches": a.batches, "settings": {}, "errors": {}}
    for s in a.settings.split(","):
        try:
            out["settings"][s] = measure(makers[s](), a)
            r = out["settings"][s]
            print(f"{s:14s} p50 {r['latency_ms']['p50']:8.2f} ms  " +
                  "  ".join(f"b{b} {v:7.1f} img/s" for b, v in r["images_per_second"].items()), flush=True)
        except Exception as e:  # a variant this torch cannot run is reported, not hidden
            out["errors"][s] = f"{type(e).__name__}: {e}"[:500]
            print(f"{s:14s} failed: {out['errors'][s]}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
