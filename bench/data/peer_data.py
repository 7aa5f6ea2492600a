#!/usr/bin/python3
"""Peer for `keel bench data`: the same input pipeline written the usual PyTorch way.

torchvision ImageFolder (PIL decode) + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor +
Normalize, torch DataLoader with worker processes, pin_memory when CUDA is available (as a user
would). Run with Debian's /usr/bin/python3 (python3-torch, python3-torchvision, python3-pil):
    /usr/bin/python3 bench/data/peer_data.py ROOT --workers 2 --batch 64 --batches 20 --warmup 3
Prints one JSON line: {"images_per_second": ..., ...} for `batches` batches after `warmup`.
"""
import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root", help="ImageNet-layout folder; ROOT/train is read")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the main process (0 = cores)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epoch", type=int, default=0, help="seed offset, like keel's epoch")
    a = ap.parse_args()
    torch.set_num_threads(a.threads or os.cpu_count())
    torch.manual_seed(a.epoch)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(a.size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(os.path.join(a.root, "train"), transform=tf)
    loader = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers,
                        pin_memory=torch.cuda.is_available(), drop_last=False,
                        persistent_workers=a.workers > 0)
    images, counted, k = 0, 0, 0
    t0 = time.perf_counter()
    while counted < a.batches:
        for x, y in loader:
            k += 1
            if k == a.warmup:
                t0 = time.perf_counter()
            elif k > a.warmup:
                images += x.shape[0]
                counted += 1
                if counted == a.batches:
                    break
    s = time.perf_counter() - t0
    print(json.dumps({"images_per_second": images / s, "images": images, "seconds": s, "workers": a.workers,
                      "batch": a.batch, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
