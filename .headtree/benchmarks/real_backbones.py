"""Full-size real backbones with random weights (WORLDS.md section 3): time and peak GPU memory of one
stage-1 iteration (AC-DMD, METHOD.md 4) and one stage-2 rollout batch (RTDMD, METHOD.md 5) at the
reference per-GPU batch, for the shared and the separate LoRA layouts.

Random weights measure speed and memory only. Text encoders are not built: prompts map to stub
embeddings of the real shapes (in real runs they come from the text-embedding cache). The reward is the
differentiable brightness stub, so the pathwise term still back-propagates through the full VAE decoder.

    python benchmarks/real_backbones.py --arch sd35_medium flux2_klein_4b --out results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tiltflow.algorithms.ac_dmd import ACDMD
from tiltflow.algorithms.rtdmd import RTDMD
from tiltflow.config.schema import FakeConfig, ParallelConfig, SamplerConfig, Stage1Config, Stage2Config
from tiltflow.distributed import LOCAL
from tiltflow.models.lora import LoraSettings, build_roles
from tiltflow.rewards.base import RewardSet
from tiltflow.training.spine import apply_parallel_plan, build_train_state
from tiltflow.worlds.diffusers_world import DiffusersTask, MeanBrightness

# Reference settings (METHOD.md 4.4, 5.5): teacher CFG per family, LoRA 32/64, eta 0.9, 4 steps, n_fake 10.
FAMILY = {"sd3_medium": ("sd3", 7.0), "sd35_medium": ("sd3", 4.5), "flux1_dev": ("flux1", 3.5),
          "flux2_klein_4b": ("flux2", 4.0), "flux2_klein_9b": ("flux2", 4.0),
          "tiny_sd3": ("sd3", 4.5), "tiny_flux1": ("flux1", 3.5), "tiny_flux2": ("flux2", 4.0)}  # tiny: CPU smoke
PROMPTS = [f"a photo of a {c} {o} on a {b} street" for c in ("red", "blue", "green") for o in ("cat", "car")
           for b in ("small", "large")]


def adapter_class(family: str) -> Any:
    from tiltflow.models.adapters.flux import FluxAdapter
    from tiltflow.models.adapters.flux2 import Flux2Adapter
    from tiltflow.models.adapters.sd3 import SD3Adapter

    return {"sd3": SD3Adapter, "flux1": FluxAdapter, "flux2": Flux2Adapter}[family]


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 2)


def timed(fn: Any) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    metrics = fn()
    if cuda:
        torch.cuda.synchronize()
    return {"time_s": round(time.perf_counter() - t0, 3),
            "peak_mem_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
            "finite": all(v == v for v in metrics.values() if isinstance(v, float))}


def bench_one(arch: str, layout: str, args: argparse.Namespace) -> dict[str, Any]:
    family, guidance_scale = FAMILY[arch]
    cls = adapter_class(family)
    extra = {"guidance": guidance_scale} if family == "flux1" else {}
    adapter = cls.random(arch, seed=0, device=args.device, text_encoders=False,
                         attention_backend=args.attention_backend, **extra)
    gen_base = adapter.random_transformer(seed=1) if family == "flux2" else None  # the distilled init
    models = build_roles(adapter, layout=layout, lora=LoraSettings(32, 64.0), generator_base=gen_base)
    # The training spine's model preparation (activation checkpointing, then sharding: none on one GPU).
    apply_parallel_plan(models, ParallelConfig(activation_checkpointing=args.gradient_checkpointing), LOCAL)
    for m in {id(t): t for t in (models.teacher, models.generator, models.fake)}.values():
        m.train()
    res = args.resolution
    task = DiffusersTask(adapter, PROMPTS, RewardSet([MeanBrightness()]), 1.0 if family == "flux1" else guidance_scale,
                         res)
    sampler = SamplerConfig(num_steps=4, shift=adapter.sigma_shift(res, res, 4), eta=0.9)
    lr = 1e-6 if family == "flux2" else 3e-5
    fake = FakeConfig(lr=lr, weighting="clamped", consistency_gamma=0.01, consistency_delta_max=0.2)
    s1 = Stage1Config(num_iters=1, batch_size=args.stage1_batch, lr=lr, n_fake=args.n_fake, ema_decay=0.99,
                      fake=fake)
    s2 = Stage2Config(num_iters=1, num_prompts=1, group_size=args.stage2_group, accumulation=1,
                      fake=dataclasses.replace(fake, lr=3e-6))
    mem = gib(torch.cuda.memory_allocated()) if args.device == "cuda" else None
    out: dict[str, Any] = {"arch": arch, "layout": layout, "model_mem_gib": mem,
                           "attention_backend": getattr(adapter, "attention_backend", "default"),
                           "trainable_params": sum(p.numel() for p in models.roles().generator_params)}
    roles = models.roles()

    def algo(cls: Any, stage_cfg: Any) -> Any:  # optimisers built as the spine builds them
        return cls(stage_cfg, sampler, task, roles, build_train_state(stage_cfg, roles), seed=0)

    warm = algo(ACDMD, dataclasses.replace(s1, n_fake=1))
    out["warmup_s"] = timed(functools.partial(warm.step, 0))["time_s"]  # kernels, allocator, cuBLAS handles
    out["stage1"] = timed(lambda: algo(ACDMD, s1).step(1))
    out["stage2_rollout_batch"] = timed(lambda: algo(RTDMD, s2).step(0))
    return out


def environment() -> dict[str, Any]:
    import diffusers
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return {"gpu": gpu, "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["sd35_medium", "flux2_klein_4b"], choices=sorted(FAMILY))
    p.add_argument("--layouts", nargs="+", default=["shared", "separate"], choices=["shared", "separate"])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--stage1-batch", type=int, default=4, help="stage-1 samples per GPU (reference 4)")
    p.add_argument("--stage2-group", type=int, default=8,
                   help="stage-2 samples per GPU per rollout batch (a group of 24 over 3 GPUs; 16 batches/iter)")
    p.add_argument("--n-fake", type=int, default=10)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--attention-backend", default="auto",
                   choices=["auto", "default", "cudnn", "flash", "efficient", "math"])
    p.add_argument("--repeat", type=int, default=1, help="measure each (arch, layout) this many times, interleaved")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for the tiny_* smoke architectures")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("real_backbones: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    report: dict[str, Any] = {"command": " ".join(["python", "benchmarks/real_backbones.py", *(argv or sys.argv[1:])]),
                              **environment(), "settings": {k: str(v) for k, v in vars(args).items()},
                              "notes": "random weights; stub text embeddings; brightness reward; bf16 autocast, "
                                       "bf16 frozen base, fp32 LoRA; stage2 = one of the 16 rollout batches "
                                       "of a reference iteration", "results": []}
    for arch in [a for _ in range(args.repeat) for a in args.arch]:
        for layout in args.layouts:
            print(f"== {arch} / {layout}", flush=True)
            try:
                row = bench_one(arch, layout, args)
            except torch.OutOfMemoryError as err:
                row = {"arch": arch, "layout": layout, "error": f"out of memory: {str(err)[:200]}"}
            print(json.dumps(row), flush=True)
            report["results"].append(row)
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # written after each row
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
