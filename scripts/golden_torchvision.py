#!/usr/bin/python3
# Golden values for keel's state-dict loading: torchvision ResNets' state dicts + input + logits.
# Run with /usr/bin/python3 (Debian's python3-torch / python3-torchvision); the python3 on PATH has no torch.
# Usage: /usr/bin/python3 scripts/golden_torchvision.py OUTDIR [MODEL ...]   (default: resnet18 resnet50)
# Writes OUTDIR/<name>.pt  (torch.save(model.state_dict()): an OrderedDict with _metadata)
#        OUTDIR/<name>_io.pt  ({'x': input (2,3,64,64), 'logits': eval-mode output (2,1000)})
import os
import sys

import torch
import torchvision


def golden(name: str, outdir: str) -> None:
    """Builds torchvision `name` seeded, randomises BatchNorm, saves its state dict, input and logits."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=1000)
    # Fresh BatchNorm is the identity in eval mode; non-trivial values make the test read its buffers.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
    torch.save(model.state_dict(), os.path.join(outdir, f"{name}.pt"))
    torch.save({"x": x, "logits": logits}, os.path.join(outdir, f"{name}_io.pt"))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"logits abs max {logits.abs().max().item():.4g}")


def main() -> int:
    if len(sys.argv) < 2:
        print(f"usage: {sys.argv[0]} OUTDIR [MODEL ...]", file=sys.stderr)
        return 2
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in sys.argv[2:] or ["resnet18", "resnet50"]:
        golden(name, outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
