#!/usr/bin/python3
# Golden learning-rate values from torch.optim.lr_scheduler (Debian's /usr/bin/python3 with python3-torch):
# OneCycleLR, LinearLR + CosineAnnealingLR (keel's warmup_cosine), StepLR, MultiStepLR, ExponentialLR, ReduceLROnPlateau, and LinearLR warm-up chained with each.
# Prints C++ initializer lists pasted into tests/train/test_schedule.cpp. Every run uses base lr 1.0, so the
# learning rate printed is keel's lr factor.
import torch
from torch.optim import lr_scheduler as S


def sgd():
    """A one-parameter SGD optimizer with base lr 1 (what every schedule scales)."""
    p = torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([p], lr=1.0)


def lrs(opt, sched, total):
    """The lr before each of `total` optimizer steps, the scheduler stepped after each."""
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def onecycle(total, pct, start, final):
    """OneCycleLR's lr before each of `total` steps."""
    opt = sgd()
    s = S.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=pct, div_factor=1.0 / start,
                     final_div_factor=start / final, anneal_strategy="cos", cycle_momentum=False)
    return lrs(opt, s, total)


def warmup_cosine(total, warmup, start, final):
    """SequentialLR: LinearLR(start -> 1 over `warmup` steps), then CosineAnnealingLR(1 -> final) to the last step."""
    opt = sgd()
    s = S.SequentialLR(opt, [S.LinearLR(opt, start_factor=start, end_factor=1.0, total_iters=warmup),
                             S.CosineAnnealingLR(opt, T_max=total - 1 - warmup, eta_min=final)], milestones=[warmup])
    return lrs(opt, s, total)


def per_step_chained(total, make):
    """Schedulers stepped every optimizer step through ChainedScheduler (keel's interval = "step")."""
    opt = sgd()
    s = S.ChainedScheduler(make(opt))
    return lrs(opt, s, total)


def per_epoch(epochs, steps_per_epoch, warmup_steps, start, make, metrics=None):
    """The usual PyTorch pattern: LinearLR warm-up stepped per optimizer step, the decay scheduler
    (or ReduceLROnPlateau fed metrics[epoch]) stepped at each epoch end (keel's interval = "epoch")."""
    opt = sgd()
    warm = S.LinearLR(opt, start_factor=start, end_factor=1.0, total_iters=warmup_steps) if warmup_steps else None
    decay = make(opt)
    out = []
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if warm:
                warm.step()
        if metrics is None:
            decay.step()
        else:
            decay.step(metrics[e])
    return out


def show(name, desc, vals):
    print("// " + name + ": torch " + torch.__version__ + " " + desc)
    print("const std::vector<double> " + name + " = {" + ", ".join(repr(v) for v in vals) + "};")


show("kOneCycle", "OneCycleLR(total_steps=40, pct_start=0.15, start 0.04, final 0.001)", onecycle(40, 0.15, 0.04, 0.001))
show("kWarmupCosine", "SequentialLR([LinearLR(0.05, total_iters=9), CosineAnnealingLR(T_max=30, eta_min=0.01)], milestones=[9]), 40 steps",
     warmup_cosine(40, 9, 0.05, 0.01))
show("kStepEpoch", "StepLR(step_size=3, gamma=0.5) per epoch, 5 steps/epoch, 12 epochs",
     per_epoch(12, 5, 0, 1.0, lambda o: S.StepLR(o, step_size=3, gamma=0.5)))
show("kStepWarmup", "ChainedScheduler([LinearLR(0.1, total_iters=8), StepLR(step_size=10, gamma=0.5)]) per step, 40 steps",
     per_step_chained(40, lambda o: [S.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=8),
                                     S.StepLR(o, step_size=10, gamma=0.5)]))
show("kMultiStepWarmup", "LinearLR(0.25, total_iters=6) per step + MultiStepLR([2, 5, 5, 8], gamma=0.3) per epoch, 4 steps/epoch, 10 epochs",
     per_epoch(10, 4, 6, 0.25, lambda o: S.MultiStepLR(o, milestones=[2, 5, 5, 8], gamma=0.3)))
show("kExponentialWarmup", "ChainedScheduler([LinearLR(0.2, total_iters=10), ExponentialLR(gamma=0.95)]) per step, 30 steps",
     per_step_chained(30, lambda o: [S.LinearLR(o, start_factor=0.2, end_factor=1.0, total_iters=10),
                                     S.ExponentialLR(o, gamma=0.95)]))
show("kExponentialEpoch", "ExponentialLR(gamma=0.8) per epoch, 3 steps/epoch, 8 epochs",
     per_epoch(8, 3, 0, 1.0, lambda o: S.ExponentialLR(o, gamma=0.8)))

metric_min = [1.0, 0.9, 0.895, 0.894, 0.8, 0.85, 0.81, 0.805, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75, 0.76, 0.77, 0.78, 0.79, 0.8]
show("kPlateauMinRel", "ReduceLROnPlateau(mode=min, factor=0.5, patience=1, threshold=0.01, rel, cooldown=1, "
     "min_lr=0.1) per epoch on " + repr(metric_min) + ", LinearLR(0.1, total_iters=4) warm-up, 3 steps/epoch",
     per_epoch(19, 3, 4, 0.1, lambda o: S.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=1, threshold=0.01,
                                                           threshold_mode="rel", cooldown=1, min_lr=0.1),
               metric_min))
metric_max = [0.5, 0.55, 0.58, 0.7, 0.65, 0.75, 0.79, 0.9, 0.9, 0.95]
show("kPlateauMaxAbs", "ReduceLROnPlateau(mode=max, factor=0.3, patience=0, threshold=0.05, abs, cooldown=0, min_lr=0.25) per "
     "epoch on " + repr(metric_max) + ", LinearLR(0.5, total_iters=10) warm-up (a reduction to min_lr during it), 2 steps/epoch",
     per_epoch(10, 2, 10, 0.5, lambda o: S.ReduceLROnPlateau(o, mode="max", factor=0.3, patience=0, threshold=0.05,
                                                            threshold_mode="abs", cooldown=0, min_lr=0.25), metric_max))
