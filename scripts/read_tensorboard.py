#!/usr/bin/env python3
"""Reads a TensorBoard log directory with TensorBoard's own loader (EventAccumulator) and prints one JSON
line per scalar: {"tag", "step", "value", "wall_time"}. Run with .venv-torch/bin/python (tensorboard from
PyPI, pinned in scripts/requirements-torch.txt); tests/monitor uses it to check keel's event files."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})  # 0 = keep every event
acc.Reload()
for tag in sorted(acc.Tags()["scalars"]):
    for e in acc.Scalars(tag):
        print(json.dumps({"tag": tag, "step": e.step, "value": e.value, "wall_time": e.wall_time}))
