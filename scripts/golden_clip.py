#!/usr/bin/python3
# Golden values for keel's gradient clipping (tests/train/test_step.cpp, Clip.*): PyTorch's
# clip_grad_value_ and clip_grad_norm_ on fixed gradients, alone and in the order users write them
# (value first, then norm). Run with Debian's /usr/bin/python3 (torch 1.13); prints C++ initialisers.
import torch


def grads():
    # Two parameters' gradients, fixed values (no RNG): one large-valued, one small.
    return [torch.linspace(-3.0, 5.0, 12).reshape(3, 4), torch.tensor([0.5, -7.0, 2.0, 0.25])]


def run(value, norm):
    ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads()]
    for p, g in zip(ps, grads()):
        p.grad = g.clone()
    total = None
    if value > 0:
        torch.nn.utils.clip_grad_value_(ps, value)
    if norm > 0:
        total = float(torch.nn.utils.clip_grad_norm_(ps, norm))
    return [p.grad for p in ps], total


for name, value, norm in [("value", 1.5, 0.0), ("norm", 0.0, 4.0), ("both", 1.5, 2.0)]:
    out, total = run(value, norm)
    flat = torch.cat([g.flatten() for g in out]).tolist()
    print(f"// {name}: clip_value {value}, clip_norm {norm}; norm seen by clip_grad_norm_: {total!r}")
    print("{" + ", ".join(f"{v!r}f" for v in flat) + "},")
