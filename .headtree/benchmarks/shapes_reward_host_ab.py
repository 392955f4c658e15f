"""Side by side, interleaved: the shapes reward model's contrastive loss (with its hard negatives) before and
after the host-side speed-up of commit "Shapes reward model: tokenise each distinct caption once", on a tiny
CLIP (width 16) at batch 256 + 3 hard negatives each, where the host work (negatives, tokenising, the
duplicate-caption mask) dominates as it did on the H200's host. Checks that the losses are bitwise equal.
The old version is read from /tmp/rm_old.py:
    git show 4b33336:tiltflow/worlds/shapes/reward_model.py > /tmp/rm_old.py
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/shapes_reward_host_ab.py
"""

import importlib.util
import time

import numpy as np
import torch

from tiltflow.worlds.registry import load_run_config
from tiltflow.worlds.shapes import reward_model as new
from tiltflow.worlds.shapes.scene import prompt_sets
from tiltflow.worlds.shapes.text import build_tokenizer

spec = importlib.util.spec_from_file_location("rm_old", "/tmp/rm_old.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
cfg = load_run_config(None, ["world=shapes", "device=cpu", "model.clip_hidden=16", "model.clip_layers=1",
                             "model.clip_projection=16", "model.clip_heads=2", "stage=teacher",
                             "run_dir=/tmp/rmab"], default_world="shapes")
tok = build_tokenizer()
model = new.new_clip(cfg, tok)
scenes = prompt_sets()["train"]


def run(mod, step):
    r = np.random.default_rng([0, step, 2])
    batch = [scenes[int(i)] for i in r.integers(len(scenes), size=256)]
    x = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(step)) * 2 - 1
    with torch.no_grad():
        return mod.contrastive_loss(model, x, [s.text for s in batch], mod.negative_texts(batch, 3, r), tok)


for s in range(3):
    a, b = run(old, s), run(new, s)
    print("step", s, float(a), float(b), "equal" if torch.equal(a, b) else f"DIFF {float((a - b).abs()):g}")
times = {"old": [], "new": []}
for _ in range(4):  # interleaved rounds
    for name, mod in (("old", old), ("new", new)):
        t0 = time.perf_counter()
        for k in range(5):
            run(mod, 10 + k)
        times[name].append((time.perf_counter() - t0) / 5)
print({k: [f"{1e3 * t:.0f} ms" for t in v] for k, v in times.items()})
print(f"median old/new = {np.median(times['old']) / np.median(times['new']):.2f}")
