#!/usr/bin/python3
# PyTorch peer of `keel bench step` (run with Debian's /usr/bin/python3: torch 1.13, the same
# LibTorch version keel builds against). Same model (torchvision resnet18), input, batch,
# threads, channels_last and optimizer (SGD momentum, nesterov, weight decay on >=2-D params).
import json, statistics, sys, time
import torch, torchvision

def measure(precision, size, batch, steps, warmup, threads):
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    m = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last).train()
    decay = [p for p in m.parameters() if p.dim() >= 2]
    no_decay = [p for p in m.parameters() if p.dim() < 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                          lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = m(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t)

if __name__ == "__main__":
    size, batch, steps, warmup, repeats, threads = 64, 64, 10, 3, 3, torch.get_num_threads()
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    res = {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for p in res:
            res[p].append(measure(p, size, batch, steps, warmup, threads))
    med = {p: statistics.median(v) for p, v in res.items()}
    print(json.dumps({"torch": torch.__version__, "images_per_second": med, "ratio_bf16_vs_fp32": med["bf16"] / med["fp32"]}))
