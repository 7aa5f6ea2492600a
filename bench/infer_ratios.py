#!/usr/bin/env python3
# Ratio table of bench/infer_compare.sh: keel's best setting vs each peer's eager fp32 and best, batch-1 p50 latency
# (peer / keel: above 1 = keel faster) and batch-32 throughput (keel / peer). Needs no torch.
import glob
import json
import os
import sys


def main() -> int:
    d = sys.argv[1] if len(sys.argv) > 1 else "build/bench-infer"
    for keel_path in sorted(glob.glob(os.path.join(d, "keel-*.json"))):
        model = os.path.basename(keel_path)[5:-5]
        k = json.load(open(keel_path))
        ks = {s["setting"]: s for s in k["settings"]}
        kp50 = {n: s["latency_ms"]["p50"] for n, s in ks.items()}
        kb32 = {n: s["images_per_second"]["32"] for n, s in ks.items()}
        kbest_p50 = min(kp50, key=kp50.get)
        kbest_b32 = max(kb32, key=kb32.get)
        print(f"{model} ({k['threads']} threads, {k['device']}): keel " +
              ", ".join(f"{n}: p50 {kp50[n]:.1f} ms, b32 {kb32[n]:.1f} img/s" for n in ks))
        for peer_path in sorted(glob.glob(os.path.join(d, f"peer-{model}-torch*.json"))):
            p = json.load(open(peer_path))
            ps = p["settings"]
            pp50 = {n: s["latency_ms"]["p50"] for n, s in ps.items()}
            pb32 = {n: s["images_per_second"]["32"] for n, s in ps.items()}
            print(f"  torch {p['torch']}: " + ", ".join(f"{n}: p50 {pp50[n]:.1f} ms, b32 {pb32[n]:.1f} img/s"
                                                      for n in ps) +
                  ("" if not p["errors"] else f"; failed: {', '.join(p['errors'])}"))
            if "eager_fp32" in ps:
                print(f"    keel best vs eager fp32:  p50 x{pp50['eager_fp32'] / kp50[kbest_p50]:.2f} ({kbest_p50}),"
                      f" b32 x{kb32[kbest_b32] / pb32['eager_fp32']:.2f} ({kbest_b32})   [target 1.5]")
            if pp50:
                bp, bb = min(pp50, key=pp50.get), max(pb32, key=pb32.get)
                print(f"    keel best vs torch best:  p50 x{pp50[bp] / kp50[kbest_p50]:.2f} ({bp}),"
                      f" b32 x{kb32[kbest_b32] / pb32[bb]:.2f} ({bb})   [target 1.0]")
            if "plain" in ks and "eager_fp32" in ps:
                print(f"    keel plain vs eager fp32 (like for like): p50 x{pp50['eager_fp32'] / kp50['plain']:.2f},"
                      f" b32 x{kb32['plain'] / pb32['eager_fp32']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
