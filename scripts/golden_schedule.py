#!/usr/bin/python3
# Golden learning-rate values from torch.optim.lr_scheduler.OneCycleLR (Debian's /usr/bin/python3 with
# python3-torch). Prints a C++ initializer list pasted into tests/train/test_schedule.cpp.
import torch

def onecycle(total, pct, start, final):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=pct,
                                            div_factor=1.0 / start, final_div_factor=start / final,
                                            anneal_strategy="cos", cycle_momentum=False)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out

vals = onecycle(40, 0.15, 0.04, 0.001)
print("// torch", torch.__version__, "OneCycleLR(total_steps=40, pct_start=0.15, start 0.04, final 0.001)")
print("{" + ", ".join(repr(v) for v in vals) + "}")
