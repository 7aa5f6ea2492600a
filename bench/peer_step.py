#!/usr/bin/env python3
# PyTorch peer of `keel bench step` / `keel bench infer`. Run it with the Python whose torch matches the
# LibTorch keel was built against: .venv-torch/bin/python (torch 2.14.1, keel's default build) or Debian's
# /usr/bin/python3 (torch 1.13, keel's build-debian/). Same model (torchvision), input, batch, threads,
# channels_last and optimizer (SGD momentum 0.9, nesterov, weight decay 5e-4 on >=2-D params only) as keel.
# --device cuda: the same on the GPU (autocast fp16/bf16; fp16 with torch.amp.GradScaler, as keel's loss scaler),
# timed between torch.cuda.synchronize() calls, for `keel bench step --device cuda` (scripts/gpu-check.sh).
import argparse, json, statistics, time
import torch, torchvision

def measure(a, precision):
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    m = getattr(torchvision.models, a.model)(num_classes=10).to(dev, memory_format=torch.channels_last)
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.batch,), device=dev)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = lambda: torch.autocast(dev.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if a.mode == "infer":
        m.eval()
        def step():
            with torch.inference_mode(), autocast():
                m(x)
    else:
        m.train()
        decay = [p for p in m.parameters() if p.dim() >= 2]
        no_decay = [p for p in m.parameters() if p.dim() < 2]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                              lr=0.01, momentum=0.9, nesterov=True)
        scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None  # (torch >= 2.3; fp16 is CUDA)
        def step():
            opt.zero_grad()
            with autocast():
                out = m(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    for _ in range(a.warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    return a.steps * a.batch / (time.perf_counter() - t)

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("threads", nargs="?", type=int, default=2)
    p.add_argument("--mode", choices=["train", "infer"], default="train")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    a = p.parse_args()
    res = {pr: [] for pr in a.precisions.split(",")}
    for _ in range(a.repeats):
        for pr in res:
            res[pr].append(measure(a, pr))
    med = {pr: statistics.median(v) for pr, v in res.items()}
    out = {"torch": torch.__version__, "device": a.device, "mode": a.mode, "model": a.model, "images_per_second": med, "samples": res}
    if "fp32" in med and "bf16" in med:
        out["ratio_bf16_vs_fp32"] = med["bf16"] / med["fp32"]
    print(json.dumps(out))
