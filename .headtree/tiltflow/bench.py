"""`tiltflow bench`: seconds, images/s, peak memory, MFU and efficiency of one stage-1 cycle (AC-DMD,
METHOD.md 4), one stage-2 iteration (RTDMD, METHOD.md 5) and 4-step inference, on a full-size (or tiny)
architecture with random weights, through the training spine's own model preparation (issue 8, item 4).

Efficiency is measured, not assumed: during each timed iteration every transformer, VAE-decode and reward
pass is counted by kind (role, batch, with or without gradient; a backward is counted when gradient reaches
the pass's output), then one pass of each kind is run alone at the same shapes, and efficiency =
sum(count x GPU kernel time alone) / wall time. A pass's GPU kernel time is the union of its kernels' intervals
under torch.profiler (`*_kernel_s`), not the CUDA-event time around it (`forward_s`, `forward_backward_s`):
when the host launches kernels slower than the GPU runs them, the event time counts the host's overhead too,
and `efficiency_wall` (the same ratio with event times, what this bench called efficiency before 2026-12-02)
would call a host-bound iteration efficient. On the CPU both are perf_counter time. MFU counts the same
passes' FLOPs (torch.utils.flop_counter on one pass of each kind, recomputation excluded). What the CPU
cannot measure (peak memory, MFU without --peak-tflops, device busy time) is None.

Under torchrun (WORLD_SIZE > 1) it runs as training does (issue 12): the process group of
tiltflow.distributed.launch.init_distributed (NCCL on CUDA, one GPU per LOCAL_RANK; gloo on the CPU), the
spine's apply_parallel_plan (FSDP2 of the generator and the fake score, the teacher per --shard-teacher), and
each rank's own prompts and noise (the algorithms' rank-aware streams). Each timed iteration sits between two
barriers and is timed on rank 0 (so it is the slowest rank's); peak memory is gathered from every rank;
images/s counts the images of all ranks; --profile also sums the time spent in collectives (COLLECTIVE_NAMES).
Only rank 0 writes the JSON and the profile summaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from tiltflow.algorithms.ac_dmd import ACDMD
from tiltflow.algorithms.rtdmd import RTDMD
from tiltflow.config.loader import UsageError
from tiltflow.config.schema import (
    STAGE_PRESETS,
    FakeConfig,
    ParallelConfig,
    SamplerConfig,
    Stage1Config,
    Stage2Config,
)
from tiltflow.distributed import LOCAL, Comm
from tiltflow.distributed.fsdp import DYNAMO_LIMITS
from tiltflow.distributed.launch import init_distributed
from tiltflow.distributed.state import barrier, gather_objects, is_main_process
from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.models.arch import ARCH_DIR, load_arch
from tiltflow.models.base import cfg_conditions
from tiltflow.models.lora import LoraSettings, RoleModels, build_roles
from tiltflow.models.roles import Roles
from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.sampling import NoisePlan, sample
from tiltflow.training.spine import apply_parallel_plan, build_train_state
from tiltflow.worlds.diffusers_world import DiffusersTask, MeanBrightness, adapter_class

ARCHS = sorted(p.stem for p in ARCH_DIR.glob("*.json"))
# The teacher's CFG scale per architecture (METHOD.md 4.4); FLUX.1-dev takes it as its guidance input.
GUIDANCE = {"sd3_medium": 7.0, "sd35_medium": 4.5, "flux1_dev": 3.5, "flux2_klein_4b": 4.0, "flux2_klein_9b": 4.0,
            "tiny_sd3": 4.5, "tiny_flux1": 3.5, "tiny_flux2": 4.0, "narrow_sd35": 4.5}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # bf16 dense, by GPU name
PROMPTS = [f"a photo of a {c} {o} on a {b} street" for c in ("red", "blue", "green") for o in ("cat", "car")
           for b in ("small", "large")]
STAGES = ("1", "2", "infer", "all")
TIME_KEY = {"1": "cycle_s", "2": "iter_s", "infer": "latency_s"}  # a run's seconds per repeat, by stage
# --profile under several ranks: an op or kernel is a collective when its lower-cased name contains one of
# these (NCCL kernels, gloo and c10d ops, FSDP2's all-gather / reduce-scatter regions, broadcasts).
COLLECTIVE_NAMES = ("nccl", "gloo", "all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce",
                    "broadcast")


# ---- counting the passes an iteration runs -------------------------------------------------------------
class PassLog:
    """Passes by kind (component, name, batch, grad) while on; a backward counts when gradient reaches the
    pass's output (a tensor hook), so it is what autograd ran, not what the algorithm was meant to run."""

    def __init__(self) -> None:
        self.on = False
        self.calls: Counter = Counter()
        self.backwards: Counter = Counter()

    def record(self, component: str, name: str, batch: int, out: Tensor) -> Tensor:
        if self.on:
            kind = (component, name, batch, bool(out.requires_grad))
            self.calls[kind] += 1
            if out.requires_grad:
                out.register_hook(lambda grad, kind=kind: self.backwards.update([kind]))
        return out

    @contextlib.contextmanager
    def counting(self) -> Any:
        self.calls, self.backwards, self.on = Counter(), Counter(), True
        try:
            yield self
        finally:
            self.on = False


class CountedRole:
    """A role backbone whose passes are logged."""

    def __init__(self, role: Any, name: str, log: PassLog):
        self.role, self.name, self.log = role, name, log

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        return self.log.record("transformer", self.name, x.shape[0], self.role.velocity(x, sigma, cond))

    def cfg_conditions(self, cond: Any, uncond: Any) -> Any:
        """As the role does CFG: one pass at batch 2B (then counted as one pass of that batch) or two."""
        return cfg_conditions(self.role, cond, uncond)


class CountedReward:
    def __init__(self, reward: Any, log: PassLog):
        self.reward, self.log = reward, log
        self.name, self.differentiable = reward.name, reward.differentiable

    def __call__(self, samples: Tensor, prompts: Any) -> RewardOutput:
        out = self.reward(samples, prompts)
        self.log.record("reward", self.name, samples.shape[0], out.scores)
        return out


class CountedTask(DiffusersTask):
    """The task, its passes counted. encode_every_batch: the prompts of every batch go through the text
    encoders, cache bypassed (the empty prompt of CFG is still encoded once), counted as text_encode passes."""

    def __init__(self, *args: Any, log: PassLog, encode_every_batch: bool = False, **kw: Any):
        super().__init__(*args, **kw)
        self.log, self.encode_every_batch = log, encode_every_batch

    def encode(self, prompts: Any) -> dict[str, Tensor]:
        if not self.encode_every_batch:
            return super().encode(prompts)
        out = self.adapter.encode_uncached(prompts)
        self.log.record("text_encode", "prompts", len(prompts), next(iter(out.values())))
        return out

    def decode(self, x: Tensor) -> Tensor:
        return self.log.record("vae_decode", "vae", x.shape[0], super().decode(x))


# ---- building the models as the spine does -------------------------------------------------------------
@dataclasses.dataclass
class Built:
    adapter: Any
    models: RoleModels
    task: CountedTask  # its PassLog (task.log) counts the passes of every role, reward and decode
    roles: Roles  # counted
    sampler: SamplerConfig
    resolution: int
    comm: Comm  # the ranks (LOCAL in a single process); the algorithms draw their data through it
    grad_sync: Any  # apply_parallel_plan's gradient-sync hook (FSDP2: reduce-scatter on the last micro-batch)


def stage1_lora(adapter: Any, transformer: torch.nn.Module, rank: int, seed: int) -> dict[str, Tensor]:
    """A scale-1 LoRA on every target (the stage-1 generator a stage-2 run starts from; values irrelevant)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in adapter.lora_target_modules(transformer):
        m = transformer.get_submodule(name)
        out[f"{name}.lora_A.weight"] = 1e-3 * torch.randn(rank, m.in_features, generator=g)
        out[f"{name}.lora_B.weight"] = 1e-3 * torch.randn(m.out_features, rank, generator=g)
    return out


def build(args: Any, stage2: bool, comm: Comm = LOCAL) -> Built:
    """Random-weight models, LoRA roles, then the spine's plan (activation checkpointing, then per-block
    compile; the teacher's CFG batched or not; several ranks: FSDP2 as training shards) before anything runs
    (torchtitan's order; one process: no sharding)."""
    family = load_arch(args.arch)["family"]
    scale = args.guidance_scale
    extra = {"guidance": scale} if family == "flux1" else {}
    adapter = adapter_class(family).random(args.arch, seed=args.seed, device=args.device,
                                           text_encoders=args.text_encoders,
                                           attention_backend=args.attention_backend, **extra)
    gen_base = adapter.random_transformer(seed=args.seed + 1) if family == "flux2" else None
    gen_init = gen_base if gen_base is not None else adapter.transformer
    s1 = stage1_lora(adapter, gen_init, args.lora_rank, args.seed) if stage2 else None
    models = build_roles(adapter, layout=args.layout, lora=LoraSettings(args.lora_rank, args.lora_alpha),
                         generator_base=gen_base, stage1_generator=s1)
    plan = ParallelConfig(activation_checkpointing=args.activation_checkpointing,
                          activation_checkpointing_every=args.checkpoint_every, batched_cfg=args.batched_cfg,
                          compile=args.compile, cuda_graphs=args.cuda_graphs, shard_teacher=args.shard_teacher,
                          data_parallel=args.data_parallel, mixed_precision=args.mixed_precision is not False,
                          compile_vae=getattr(args, "compile_vae", False))
    plan.validate("parallel")  # e.g. --cuda-graphs without --compile model
    log = PassLog()
    rewards = RewardSet([CountedReward(MeanBrightness(), log)])
    task = CountedTask(adapter, PROMPTS, rewards, 1.0 if family == "flux1" else scale, args.resolution, log=log,
                       encode_every_batch=args.text_encoders)
    grad_sync = apply_parallel_plan(models, plan, comm, device_type=torch.device(args.device).type, task=task)
    for m in {id(m): m for m in (models.teacher, models.generator, models.fake)}.values():
        m.train()
    sampler = SamplerConfig(num_steps=args.num_steps, eta=args.eta,
                            shift=float(adapter.sigma_shift(args.resolution, args.resolution, args.num_steps)))
    plain = models.roles()
    roles = Roles(CountedRole(plain.teacher, "teacher", log), CountedRole(plain.generator, "generator", log),
                  CountedRole(plain.fake, "fake", log), plain.generator_params, plain.fake_params)
    return Built(adapter, models, task, roles, sampler, args.resolution, comm, grad_sync)


def algorithm(stage: str, b: Built, args: Any, *, warmup: bool = False) -> Any:
    """The reference settings (configs/reference), with the optimisers the spine builds; the finite guard
    checks after every update or once per step (--nonfinite-check)."""
    algo = _reference_algorithm(stage, b, args, warmup)
    algo.guard.configure("stop", 0, getattr(args, "nonfinite_check", "update"))
    return algo


def _reference_algorithm(stage: str, b: Built, args: Any, warmup: bool) -> Any:
    lr = 1e-6 if b.adapter.family == "flux2" else 3e-5
    fake = FakeConfig(lr=lr, weighting="clamped", consistency_gamma=0.01, consistency_delta_max=0.2,
                      consistency_grad=args.consistency_grad)
    if stage == "1":
        cfg: Any = Stage1Config(batch_size=args.batch, lr=lr, n_fake=args.n_fake, ema_decay=0.99, fake=fake)
        return ACDMD(cfg, b.sampler, b.task, b.roles, build_train_state(cfg, b.roles), seed=args.seed, comm=b.comm)
    # --dm-target tilted: the exact mode (the rtdmd_exact preset: DM toward the diffused tilted target, no
    # reward terms) with the chosen estimator of the tilted denoiser, instead of the reference weights.
    exact = dict(STAGE_PRESETS["rtdmd_exact"]["stage2"], tilt_estimator=args.tilt_estimator,
                 tilt_num_pairs=args.tilt_num_pairs, tilt_posterior_steps=args.tilt_posterior_steps)
    cfg = Stage2Config(num_prompts=1, group_size=args.batch, accumulation=1 if warmup else args.rollout_batches,
                       bp_chunk=getattr(args, "bp_chunk", 0), fake=dataclasses.replace(fake, lr=3e-6),
                       **(exact if args.dm_target == "tilted" else {}))
    cfg.validate("stage2")
    return RTDMD(cfg, b.sampler, b.task, b.roles, build_train_state(cfg, b.roles), seed=args.seed, comm=b.comm,
                 grad_sync=b.grad_sync)


# ---- timing ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_seconds(fn: Any, device: torch.device, reps: int = 3) -> float:
    """Median time of fn alone after one warm call: CUDA events on GPU, perf_counter elsewhere."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_seconds(fn: Any, device: torch.device) -> float:
    """GPU kernel time of one call of fn (after a warm call): the union of its kernels' intervals under
    torch.profiler, whatever the host does between launches. On the CPU: its perf_counter time."""
    if device.type != "cuda":
        return device_seconds(fn, device, reps=1)
    fn()
    sync(device)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return union_us([(e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == DeviceType.CUDA]) / 1e6


def one_pass(b: Built, kind: tuple, batch: int, backward: bool) -> Any:
    """A callable running one pass of `kind` alone at `batch` (forward; + backward if asked), on fresh
    inputs of the iteration's shapes. Gradient goes to the trainable role weights (transformers) or to the
    input (VAE decode and rewards take gradient from the generator's samples)."""
    component, name, _, grad = kind
    dev = b.task.device
    plain = {"teacher": b.models.teacher_role, "generator": b.models.generator_role, "fake": b.models.fake_role}
    g = torch.Generator().manual_seed(0)
    if component == "text_encode":
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        run = lambda: next(iter(b.adapter.encode_uncached(prompts).values()))  # noqa: E731
    elif component == "transformer":
        x = torch.randn(batch, *b.task.sample_shape, generator=g).to(dev)
        sigma = torch.full((batch,), 0.5, device=dev)
        cond = b.adapter.encode([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
        run = lambda: plain[name].velocity(x, sigma, cond)  # noqa: E731
    elif component == "vae_decode":
        x = torch.randn(batch, *b.task.sample_shape, generator=g).to(dev).requires_grad_(grad)
        run = lambda: b.adapter.decode(x)  # noqa: E731
    else:
        reward = next(r.reward for r in b.task.rewards.rewards if r.name == name)
        res = b.resolution
        images = torch.rand(batch, 3, res, res, generator=g).to(dev).requires_grad_(grad)
        run = lambda: reward(images, PROMPTS[:1] * batch).scores  # noqa: E731
    params = b.models.roles().generator_params + b.models.roles().fake_params

    def fn() -> None:
        with torch.set_grad_enabled(grad):
            out = run()
            if backward:
                out.float().sum().backward()
        for p in params:
            p.grad = None
    return fn


def flops_per_sample(b: Built, kind: tuple, args: Any) -> tuple[int, int]:
    """(forward, backward) FLOPs of one pass of `kind` per sample: counted at batch 1 (the passes have no
    cross-sample work), eager, with activation-checkpoint recomputation off (model FLOPs, not hardware)."""
    from torch.utils.flop_counter import FlopCounterMode

    grad = kind[3]
    stance = torch.compiler.set_stance("force_eager") if compiles_anything(args) else contextlib.nullcontext()
    ac = args.activation_checkpointing and kind[0] == "transformer"
    modules = {id(m): m for m in (b.models.generator, b.models.fake)}.values()
    try:
        if ac:
            for m in modules:
                m.disable_gradient_checkpointing()
        with stance:
            totals = []  # the forward alone, then (with gradient) forward + backward
            for backward in (False, True)[:1 + grad]:
                fn = one_pass(b, kind, 1, backward=backward)  # its inputs (and text encoding) outside the count
                with FlopCounterMode(display=False) as counter:
                    fn()
                totals.append(counter.get_total_flops())
    finally:
        if ac:
            b.models.enable_activation_checkpointing(args.checkpoint_every)
    return totals[0], totals[-1] - totals[0]


def pass_table(b: Built, snaps: list[tuple[Counter, Counter]], args: Any) -> list[dict[str, Any]]:
    """Every kind seen in the timed iterations: its counts per repeat, its time alone and its FLOPs. Several
    ranks: the kinds any rank saw, in one order on every rank (a sharded pass alone is a collective);
    the counts are this rank's. --skip-pass-timing: counts only (times and FLOPs None)."""
    kinds = sorted({k for calls, _ in snaps for k in calls})
    if b.comm.world_size > 1:
        kinds = sorted({tuple(k) for rank_kinds in gather_objects(kinds) for k in rank_kinds})
    rows = []
    for kind in kinds:
        component, name, batch, grad = kind
        row = {"component": component, "name": name, "batch": batch, "grad": grad,
               "calls": [c[kind] for c, _ in snaps], "backwards": [bw[kind] for _, bw in snaps]}
        row.update({f"{m}{t}": None for m in ("forward", "forward_backward") for t in ("_s", "_kernel_s")})
        if args.skip_pass_timing:
            rows.append({**row, "forward_flops": None, "backward_flops": None})
            continue
        f_fwd, f_bwd = flops_per_sample(b, kind, args)
        row.update(forward_flops=f_fwd * batch, backward_flops=f_bwd * batch)
        for m, backward in (("forward", False), ("forward_backward", True))[:1 + grad]:
            fn = one_pass(b, kind, batch, backward=backward)
            row[f"{m}_s"], row[f"{m}_kernel_s"] = device_seconds(fn, b.task.device), kernel_seconds(fn, b.task.device)
        rows.append(row)
    return rows


def needed(rows: list[dict[str, Any]], r: int, time: str = "_kernel_s") -> tuple[float, int]:
    """(seconds, FLOPs) of the passes repeat r ran, each pass at its time alone: its GPU kernel time
    (time="_kernel_s") or the CUDA-event time around it (time="_s")."""
    seconds, flops = 0.0, 0
    for row in rows:
        calls, bw = row["calls"][r], row["backwards"][r]
        seconds += (calls - bw) * row[f"forward{time}"] + bw * (row[f"forward_backward{time}"] or 0.0)
        flops += calls * row["forward_flops"] + bw * row["backward_flops"]
    return seconds, flops


def between_barriers(fn: Any, device: torch.device, *, count_closing: bool = True) -> float:
    """Seconds of fn() with its device work synchronised, between two barriers (several ranks); with
    count_closing the time includes the closing barrier, so that it is the slowest rank's."""
    sync(device)
    barrier()
    t0 = time.perf_counter()
    fn()
    sync(device)
    wall = time.perf_counter() - t0
    barrier()
    return time.perf_counter() - t0 if count_closing else wall


def timed_repeats(fn: Any, b: Built, args: Any) -> tuple[list[float], list[tuple[Counter, Counter]], list]:
    """Wall time and pass counts of each repeat; peak memory over the repeats (CUDA only), one per rank
    (gathered; one in a single process). Several ranks: each repeat starts and ends at a barrier (so its time,
    the one rank 0 measures and reports, is the slowest rank's)."""
    dev = b.task.device
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    walls, snaps = [], []
    for r in range(args.repeats):
        with b.task.log.counting() as log:
            walls.append(between_barriers(lambda r=r: fn(r), dev))
        snaps.append((log.calls, log.backwards))
    peak = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None
    return walls, snaps, gather_objects(peak)


def summarise(key: str, fn: Any, b: Built, args: Any, images: int) -> dict[str, Any]:
    """The timed repeats of fn(repeat) (timed_repeats) and what they give. `images` is one repeat's on one
    rank. Several ranks: images_per_s counts every rank's images (the run's throughput), images_per_s_per_gpu
    one rank's; peak_mem_gib is the largest of peak_mem_gib_per_rank; efficiency and MFU are rank 0's (its
    passes, its wall time: per GPU)."""
    walls, snaps, peaks = timed_repeats(fn, b, args)
    rows = pass_table(b, snaps, args)
    timed = not args.skip_pass_timing
    need = [needed(rows, r) for r in range(len(walls))] if timed else None  # (kernel seconds, FLOPs) per repeat
    eff = [s / w for (s, _), w in zip(need, walls)] if timed else None
    eff_wall = [needed(rows, r, "_s")[0] / w for r, w in enumerate(walls)] if timed else None
    mfu = [f / w / (args.peak_tflops * 1e12) for (_, f), w in zip(need, walls)] if args.peak_tflops and timed else None
    out: dict[str, Any] = {}
    for name, values in ((key, walls), ("efficiency", eff), ("efficiency_wall", eff_wall), ("mfu", mfu)):
        out.update(spread(name, values))
    med = statistics.median(walls)
    world = b.comm.world_size
    peak = max((p for p in peaks if p is not None), default=None)
    out.update(images_per_s=world * images / med, peak_mem_gib=peak,
               needed_kernel_s=[s for s, _ in need] if timed else None,
               flops=[f for _, f in need] if timed else None, passes=rows)
    if world > 1:
        out.update(world_size=world, images_per_s_per_gpu=images / med, peak_mem_gib_per_rank=peaks)
    return out


def spread(name: str, values: list[float] | None) -> dict[str, Any]:
    if values is None:
        return {name: None, f"{name}_min": None, f"{name}_max": None}
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values),
            f"{name}_all": list(values)}


# ---- the benchmarks -------------------------------------------------------------------------------------
def bench_stage(stage: str, b: Built, args: Any) -> dict[str, Any]:
    """Stage 1: one cycle (n_fake fake updates + 1 generator update) per repeat. Stage 2: one iteration
    (rollout_batches rollout batches of 1 prompt x batch samples, then one optimiser step) per repeat."""
    algo = algorithm(stage, b, args)
    warm = algo if stage == "1" or args.rollout_batches == 1 else algorithm(stage, b, args, warmup=True)
    for w in range(args.warmup):
        warm.step(w)
    del warm
    # a repeat's batches: stage 1 n_fake + 1 (the fake updates and the generator update), stage 2 rollout_batches
    field, batches = ("n_fake", args.n_fake + 1) if stage == "1" else ("rollout_batches", args.rollout_batches)
    row = {"stage": stage, field: getattr(args, field),
           **summarise(TIME_KEY[stage], lambda r: algo.step(args.warmup + r), b, args, batches * args.batch)}
    if args.profile:
        row["profile"] = profile(lambda: algo.step(args.warmup + args.repeats), b.task.device, args, f"stage{stage}")
    if args.memory_trace:
        row["memory"] = memory_at_peak(lambda: algo.step(args.warmup + args.repeats + 1), b.task.device, args,
                                       f"stage{stage}")
    return {"batch": args.batch, **row}


def bench_inference(batch: int, b: Built, args: Any) -> dict[str, Any]:
    """4-step sampling by the generator role (noise, 4 CPS steps, VAE decode, uint8 images on the host; text
    embeddings computed beforehand), against the bound: the passes it ran, each timed alone."""
    cond = b.adapter.encode([PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    sigmas = few_step_sigmas(b.sampler.num_steps, b.sampler.shift)
    g = torch.Generator().manual_seed(args.seed + 1_000_003 * b.comm.rank)  # each rank its own noise (rank 0: seed)

    def once(_: int = 0) -> None:
        with torch.no_grad():
            plan = NoisePlan.fresh(batch, b.task.sample_shape, b.sampler.num_steps, g, device=b.task.device)
            x = sample(lambda x, s: b.roles.generator.velocity(x, s, cond), sigmas, plan, eta=b.sampler.eta).final
            (b.task.decode(x) * 255).round().to(torch.uint8).cpu()

    for _ in range(max(args.warmup, 1)):
        once()
    run_once = without_guards(once) if getattr(args, "skip_guard_eval", False) else once
    out = summarise(TIME_KEY["infer"], run_once, b, args, batch)
    # The bound: the passes it ran at their GPU kernel time (bound_wall_s: at their CUDA-event time alone);
    # --skip-pass-timing times no pass alone, so there is no bound (None).
    timed = not args.skip_pass_timing
    bound, bound_wall = (statistics.median(needed(out["passes"], r, t)[0] for r in range(args.repeats))
                         if timed else None for t in ("_kernel_s", "_s"))
    row = {"stage": "infer", "batch": batch, **out, "bound_s": bound, "bound_wall_s": bound_wall,
           "latency_ratio": out["latency_s"] / bound if timed else None,
           "latency_ratio_wall": out["latency_s"] / bound_wall if timed else None}
    if args.profile:
        row["profile"] = profile(run_once, b.task.device, args, f"infer_b{batch}")
    return row


def without_guards(fn: Any) -> Any:
    """fn run under torch.compiler.set_stance(skip_guard_eval_unsafe=True): dynamo checks only the guards that
    tell its cached graphs apart, not whether a recompile is due, so every compiled call skips most of its
    guard evaluation on the host. Safe only once every shape fn runs has been compiled (after the warm-up), with
    nothing else changing between calls; the bench's inference loop meets both."""
    def run(*a: Any) -> Any:
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return fn(*a)
    return run


def profile(fn: Any, device: torch.device, args: Any, label: str, top: int = 20) -> dict[str, Any]:
    """One more run of fn under torch.profiler: the top kernels (ops on CPU) by self time, device busy time
    (the union of kernel intervals) and host gaps = wall - busy; written as markdown next to the JSON (rank
    0). Several ranks: the run starts and ends at a barrier (inside the profile, outside its wall time), and
    `collectives` says how long this rank spent in collectives (see collective_time), with every rank's
    totals gathered."""
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        wall = between_barriers(fn, device, count_closing=False)
    busy, kernels = None, None
    if cuda:
        spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
        kernels, busy = len(spans), union_us(spans) / 1e6
    world = int(torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    coll = collective_time(prof, cuda) if world > 1 else None
    if coll is not None:
        ranks = gather_objects({k: coll[k] for k in ("cpu_s", "device_s")})
        coll.update(cpu_s_per_rank=[r["cpu_s"] for r in ranks], device_s_per_rank=[r["device_s"] for r in ranks])

    def ranked(attr: str) -> list[dict[str, Any]]:  # the top ops or kernels by one of their self times
        avg = sorted(prof.key_averages(), key=lambda a: getattr(a, attr), reverse=True)[:top]
        return [{"name": a.key[:120], "calls": a.count, "self_s": getattr(a, attr) / 1e6} for a in avg]

    rows = ranked("self_device_time_total" if cuda else "self_cpu_time_total")
    summary = {"wall_s": wall, "device_busy_s": busy, "host_gap_s": wall - busy if busy is not None else None,
               "kernels": kernels, "top_by": "self device time" if cuda else "self CPU time", "top": rows}
    if cuda:  # where the host's time goes: launches, syncs (cudaStreamSynchronize, copies to the host), ops
        summary["top_host"] = ranked("self_cpu_time_total")
    if coll is not None:
        summary["collectives"] = coll
    if not is_main_process():
        return summary
    path = args.out.with_name(f"{args.out.stem}.profile_{label}.md")
    lines = [f"# Profile of `{label}` ({args.arch}, batch {args.batch}, {args.resolution} px)", "",
             f"wall {wall:.4f} s; device busy {busy if busy is None else round(busy, 4)} s; host gaps "
             f"{summary['host_gap_s'] if busy is None else round(wall - busy, 4)} s; kernels {kernels}", "",
             f"| op or kernel (top {top} by {summary['top_by']}) | calls | self s |", "|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['calls']} | {r['self_s']:.4f} |" for r in rows]
    if cuda:
        lines += ["", f"| host op (top {top} by self CPU time) | calls | self s |", "|---|---|---|"]
        lines += [f"| `{r['name']}` | {r['calls']} | {r['self_s']:.4f} |" for r in summary["top_host"]]
    if coll is not None:
        lines += ["", f"Collectives (rank 0 of {world}; {coll['counted']}): CPU {coll['cpu_s']:.4f} s, device "
                  f"{fmt(coll['device_s'], '.4f')} s; per rank CPU {[round(v, 4) for v in coll['cpu_s_per_rank']]}",
                  "", "| collective op or kernel | calls | CPU s (total) | device s (total) |", "|---|---|---|---|"]
        lines += [f"| `{r['name']}` | {r['calls']} | {r['cpu_s']:.4f} | {fmt(r['device_s'], '.4f')} |"
                  for r in coll["by_name"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {**summary, "path": str(path)}


def live_at_peak(events: list[dict[str, Any]]) -> tuple[int, dict[int, dict[str, Any]], dict[str, Any] | None]:
    """Replay a CUDA allocator trace (torch.cuda.memory._snapshot()["device_traces"][i]): the largest sum of
    live blocks, the blocks live at that moment (address -> event) and the allocation that reached it. A block
    counts from its `alloc` to its `free_completed` (a free pending on another stream still holds memory);
    blocks allocated before the trace started are not in it."""
    def replay(stop: int) -> tuple[dict[int, dict[str, Any]], int, int]:  # (live after events[:stop], best, its index)
        live: dict[int, dict[str, Any]] = {}
        total = best = 0
        at = -1
        for i, ev in enumerate(events[:stop]):
            if ev["action"] == "alloc":
                live[ev["addr"]] = ev
                total += ev["size"]
                if total > best:
                    best, at = total, i
            elif ev["action"] == "free_completed" and ev["addr"] in live:
                total -= live.pop(ev["addr"])["size"]
        return live, best, at

    _, best, at = replay(len(events))  # first the peak's position, then the blocks live there (no copy per maximum)
    if at < 0:
        return 0, {}, None
    return best, replay(at + 1)[0], events[at]


def frame_label(frames: list[dict[str, Any]]) -> str:
    """Where an allocation came from: the innermost frame of the library that made it (diffusers, peft,
    inductor's generated code, else the innermost non-tiltflow one) <- the innermost tiltflow frame <- the
    innermost frame in tiltflow's algorithms or losses (which update), each where there is one."""
    def short(f: dict[str, Any]) -> str:
        name = f["filename"]
        for root in ("/tiltflow/", "/diffusers/", "/peft/", "/torch/"):
            if root in name:
                name = root.strip("/") + "/" + name.split(root, 1)[1]
                break
        else:
            name = Path(name).name
        return f"{name}:{f['line']} {f['name']}"

    ours = next((f for f in frames if "/tiltflow/" in f["filename"]), None)
    # and which loss or update it serves: the innermost frame of tiltflow's algorithms or losses, if another
    step = next((f for f in frames if any(k in f["filename"] for k in ("/tiltflow/algorithms/", "/tiltflow/losses/"))
                 and f is not ours), None)
    others = [f for f in frames if "/tiltflow/" not in f["filename"] and not f["filename"].startswith("??")]
    lib = next((f for f in others if any(k in f["filename"] for k in ("/diffusers/", "/peft/", "torchinductor"))),
               others[0] if others else None)
    parts = [short(f) for f in (lib, ours, step) if f is not None]
    return " <- ".join(parts) if parts else "(no Python frame)"


def memory_at_peak(fn: Any, device: torch.device, args: Any, label: str, top: int = 25) -> dict[str, Any]:
    """One more run of fn with the CUDA allocator's history recorded (Python stacks): the peak of allocated
    memory within it, split into what was allocated before (weights, optimiser and EMA state, caches) and the
    blocks live at the peak grouped by where they were allocated (frame_label); written as markdown next to
    the JSON. CUDA only (elsewhere: {"skipped": why}, and fn does not run)."""
    if device.type != "cuda":
        return {"skipped": "the allocator trace is CUDA's"}
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        fn()
        sync(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    traces = snap["device_traces"][device.index if device.index is not None else torch.cuda.current_device()]
    best, blocks, peak_event = live_at_peak(traces)
    groups: dict[str, list[int]] = {}
    for ev in blocks.values():
        groups.setdefault(frame_label(ev.get("frames", [])), []).append(ev["size"])
    rows = sorted(({"where": k, "blocks": len(v), "gib": sum(v) / 2**30} for k, v in groups.items()),
                  key=lambda r: -r["gib"])
    gib = 2**30
    summary = {"allocated_before_gib": before / gib, "traced_peak_gib": (before + best) / gib,
               "max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
               "live_at_peak_gib": best / gib, "events": len(traces),
               "peak_reached_at": frame_label(peak_event.get("frames", [])) if peak_event else None,
               "top": rows[:top]}
    if not is_main_process():
        return summary
    path = args.out.with_name(f"{args.out.stem}.memory_{label}.md")
    lines = [f"# Memory at the peak of `{label}` ({args.arch}, batch {args.batch}, {args.resolution} px)", "",
             f"allocated before the run {summary['allocated_before_gib']:.2f} GiB; peak "
             f"{summary['traced_peak_gib']:.2f} GiB from the trace (max_memory_allocated "
             f"{summary['max_memory_allocated_gib']:.2f} GiB); live at "
             f"the peak, allocated during the run: {best / gib:.2f} GiB; {len(traces)} allocator events", "",
             f"The allocation that reached the peak: `{summary['peak_reached_at']}`", "",
             f"| allocated at (library <- tiltflow <- update frame), top {top} | blocks | GiB |", "|---|---|---|"]
    lines += [f"| `{r['where']}` | {r['blocks']} | {r['gib']:.3f} |" for r in rows[:top]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return {**summary, "path": str(path)}


def union_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end] intervals (overlapping or nested ones count once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        total += max(0.0, e - max(s, end))
        end = max(end, e)
    return total


def collective_time(prof: Any, cuda: bool) -> dict[str, Any]:
    """Time this rank spent in collectives during a profiled run: the events whose lower-cased name contains
    one of COLLECTIVE_NAMES and not "barrier". cpu_s: the union of the host intervals of such ops over all
    threads (nested and overlapping ones count once: FSDP::all_gather around c10d::_allgather_base_ around
    gloo's own op, and the gloo worker thread beside the caller's); device_s (CUDA): the union of such
    kernels' intervals (the NCCL kernels), None on the CPU. Waits outside such a region (work.wait() in
    FSDP's own hooks) are not counted. by_name: the matched names with their calls and summed (not unioned)
    times."""
    def hit(name: str) -> bool:  # the bench's own barriers around the profiled run are not the iteration's
        low = name.lower()
        return any(k in low for k in COLLECTIVE_NAMES) and "barrier" not in low

    cpu, dev = [], []
    for e in prof.events():
        if hit(e.name):
            (dev if e.device_type == DeviceType.CUDA else cpu).append((e.time_range.start, e.time_range.end))
    by_name = [{"name": a.key[:120], "calls": a.count, "cpu_s": a.cpu_time_total / 1e6,
                "device_s": a.device_time_total / 1e6 if cuda else None}
               for a in prof.key_averages() if hit(a.key)]
    by_name.sort(key=lambda r: -(r["device_s"] if cuda else r["cpu_s"]))
    return {"counted": "union of intervals of ops/kernels whose name contains any of "
                       + ", ".join(COLLECTIVE_NAMES), "cpu_s": union_us(cpu) / 1e6,
            "device_s": union_us(dev) / 1e6 if cuda else None, "ops": len(cpu), "kernels": len(dev) if cuda else None,
            "by_name": by_name}


# ---- provenance, table, entry point ---------------------------------------------------------------------
def provenance(args: Any) -> dict[str, Any]:
    import diffusers
    import peft
    import transformers

    cuda = args.device.type == "cuda"
    driver = None
    if cuda and shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    return {"command": command(args), "gpu": torch.cuda.get_device_name(args.device) if cuda else None,
            "driver": driver, "cpu": platform.processor() or platform.machine(),
            "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def command(args: Any) -> str:
    """The run as one `tiltflow bench` command with every setting spelled out."""
    parts = ["tiltflow", "bench"]
    for k, v in sorted(vars(args).items()):
        if k in ("func", "verb") or v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag] if v is True else [flag, str(v)]  # a switch, or an option and its value
    for k in ("activation_checkpointing", "batched_cfg", "mixed_precision"):  # switches whose off state counts
        if getattr(args, k, None) is False:
            parts.append("--no-" + k.replace("_", "-"))
    return " ".join(parts)


def fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def table(runs: list[dict[str, Any]]) -> str:
    head = ("| stage | batch | seconds (median, min-max) | images/s | peak GiB | MFU | efficiency (kernel; event) "
            "| latency ratio (kernel; event) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['stage']} | {r.get('batch', '-')} | {r['error'][:60]} | | | | | |")
            continue
        key = TIME_KEY[r["stage"]]
        secs = f"{r[key]:.4g} ({r[key + '_min']:.4g}-{r[key + '_max']:.4g})"
        lines.append(f"| {r['stage']} | {r['batch']} | {secs} | {fmt(r['images_per_s'])} | {fmt(r['peak_mem_gib'])} "
                     f"| {fmt(r['mfu'])} | {fmt(r['efficiency'])}; {fmt(r.get('efficiency_wall'))} "
                     f"| {fmt(r.get('latency_ratio'))}; {fmt(r.get('latency_ratio_wall'))} |")
    return "\n".join(lines)


def compiles_anything(args: Any) -> bool:
    """Whether the run compiles anything (a transformer, or only the VAE decoder)."""
    return args.compile != "none" or bool(getattr(args, "compile_vae", False))


def free(device: torch.device, compiled: bool) -> None:
    if compiled:  # compiled code holds the old models through its guards
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(stage: str, batch: int, fn: Any, *fn_args: Any) -> dict[str, Any]:
    """A run's row, or the error that stopped it (out of memory) so that the other runs still happen. Several
    ranks: the error propagates (the other ranks wait in a collective that will not come; torchrun stops
    them all), and the JSON keeps the runs finished before it."""
    try:
        return fn(*fn_args)
    except torch.OutOfMemoryError as err:
        if torch.distributed.is_initialized():
            raise
        return {"stage": stage, "batch": batch, "error": f"out of memory: {str(err).splitlines()[0][:200]}"}


def run_bench(args: Any) -> int:
    """Run the stages asked, write args.out (after each run) and print the table; 1 if a run failed. Under
    torchrun with WORLD_SIZE > 1: one process group as training's (init_distributed), each rank on its own
    GPU; rank 0 alone writes and prints."""
    if getattr(args, "skip_guard_eval", False) and args.compile != "model":
        raise UsageError(f"--skip-guard-eval needs --compile model, got --compile {args.compile}: with compiled "
                         "blocks torch cannot tell SD3's last block (no context output) from the others once it "
                         "skips guards, and stops with 'Recompilation triggered with skip_guard_eval_unsafe stance'")
    comm = init_distributed(args.device)
    args.device = torch.device(args.device)
    if comm.world_size > 1 and args.device.type == "cuda":
        args.device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK's, set by init_distributed
    if args.peak_tflops is None and args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
        args.peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if args.guidance_scale is None:
        args.guidance_scale = GUIDANCE.get(args.arch, 4.5)
    torch.backends.cuda.matmul.allow_tf32 = True
    report: dict[str, Any] = {
        "provenance": provenance(args), "settings": {k: str(v) for k, v in vars(args).items() if k != "func"},
        "notes": ("random weights; text encoders run on every batch's prompts (--text-encoders; the empty prompt "
                  "encoded once)" if args.text_encoders else "random weights; stub text embeddings (as from the "
                  "text-embedding cache; text encoding not timed)") + "; brightness reward through the full VAE "
                 "decoder; bf16 autocast and bf16 frozen base on CUDA, fp32 LoRA; stage 2 = one iteration of "
                 "rollout_batches rollout batches (the reference accumulates 16)", "runs": []}
    if comm.world_size > 1:
        report["provenance"].update(world_size=comm.world_size, backend=torch.distributed.get_backend(),
                                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", comm.world_size)),
                                    launcher="torchrun", gpu_per_rank=gather_objects(report["provenance"]["gpu"]))
        report["settings"]["world_size"] = str(comm.world_size)
    main = is_main_process()
    stages = ["1", "infer", "2"] if args.stage == "all" else [args.stage]
    dyn = {k: v for k, v in DYNAMO_LIMITS.items() if hasattr(torch._dynamo.config, k)}

    def save(row: dict[str, Any]) -> None:
        report["runs"].append({"arch": args.arch, "layout": args.layout, "resolution": args.resolution, **row})
        if not main:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    with torch._dynamo.config.patch(**dyn):  # several roles per block (compile_blocks: one static graph per shape)
        built: Built | None = None
        for stage in stages:
            if built is None or stage == "2":
                built = None
                free(args.device, compiles_anything(args))
                built = build(args, stage2=stage == "2", comm=comm)
            if stage == "infer":
                for batch in sorted({1, args.batch}):
                    save(guarded("infer", batch, bench_inference, batch, built, args))
            else:
                save(guarded(stage, args.batch, bench_stage, stage, built, args))
    if main:
        print(table(report["runs"]))
        print(f"wrote {args.out}" + (f" (rank 0 of {comm.world_size})" if comm.world_size > 1 else ""))
    barrier()
    return 1 if any("error" in r for r in report["runs"]) else 0


def add_arguments(p: Any) -> None:
    import argparse

    p.add_argument("--arch", required=True, choices=ARCHS, help="architecture (random weights); tiny_* for CPU")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--stage", choices=STAGES, default="all", help="1 (AC-DMD cycle), 2 (RTDMD iteration), infer, "
                   "or all (1, infer, 2)")
    p.add_argument("--batch", type=int, default=9, help="per-GPU batch; stage 2: the group size of one rollout "
                   "batch (1 prompt); infer: batch 1 and this batch")
    p.add_argument("--layout", choices=["shared", "separate"], default="shared")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--checkpoint-every", type=int, default=1, help="with activation checkpointing: recompute "
                   "blocks 0, k, 2k, ... only (as parallel.activation_checkpointing_every)")
    p.add_argument("--attention-backend", default="auto",
                   choices=["auto", "default", "cudnn", "flash", "efficient", "math"])
    p.add_argument("--compile", choices=["none", "blocks", "model"], default="none",
                   help="torch.compile each transformer block, or each transformer whole, before anything runs "
                        "(as parallel.compile)")
    p.add_argument("--cuda-graphs", action="store_true", help="with --compile model on CUDA: replay each "
                   "compiled pass as a CUDA graph (as parallel.cuda_graphs)")
    p.add_argument("--nonfinite-check", choices=["update", "step"], default="update", help="when the NaN/inf "
                   "check reads its values: after every update (a host wait each), or once per step (as "
                   "nonfinite_check)")
    p.add_argument("--compile-vae", action="store_true", help="torch.compile the VAE decoder too, as a CUDA graph "
                   "with --cuda-graphs (as parallel.compile_vae); the bound's decode is the compiled one")
    p.add_argument("--batched-cfg", action=argparse.BooleanOptionalAction, default=False,
                   help="the teacher's CFG as one pass at batch 2B, counted as such (as parallel.batched_cfg, "
                        "which is on by default in training; off here so that pass counts and results stay "
                        "comparable with the earlier two-pass ones)")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations (median, min, max)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--device", default="cuda")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU (default: 989 "
                   "on H100/H200, bf16; otherwise MFU is None unless given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None, help="teacher CFG (default: the arch's)")
    p.add_argument("--eta", type=float, default=0.9)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--n-fake", type=int, default=10, help="stage 1: fake updates per generator update")
    p.add_argument("--consistency-grad", choices=["anchor", "both"], default="anchor",
                   help="stage1.fake.consistency_grad: anchor (default: h(x'_i) as stop-gradient targets, their pass "
                   "without a graph) or both (gradient through h(x'_i) too, as before 2026-12-03)")
    p.add_argument("--bp-chunk", type=int, default=0, help="stage 2: samples decoded with gradient at a time for "
                   "the reward back-propagation term (as stage2.bp_chunk; 0 = the whole group)")
    p.add_argument("--rollout-batches", type=int, default=1, help="stage 2: rollout batches per iteration "
                   "(reference 16)")
    p.add_argument("--dm-target", choices=["teacher", "tilted"], default="teacher",
                   help="stage 2: teacher = the reference recipe (default); tilted = the exact mode (rtdmd_exact: DM "
                        "toward the diffused tilted target, w_pg = w_bp = 0), docs/method.md 5.6")
    p.add_argument("--tilt-estimator", choices=["auto", "split_snis", "shifted_proposal"], default="auto",
                   help="with --dm-target tilted: the tilted denoiser's estimator (auto: shifted_proposal for a "
                        "differentiable reward, else split_snis)")
    p.add_argument("--tilt-num-pairs", type=int, default=4, help="with --dm-target tilted: M (2M posterior draws "
                   "per DM sample)")
    p.add_argument("--tilt-posterior-steps", type=int, default=8, help="with --dm-target tilted: k, reverse-sampler "
                   "steps from tau to 0 (2 M k teacher calls per DM sample)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--lora-alpha", type=float, default=64.0)
    p.add_argument("--profile", action="store_true", help="also profile one more iteration (torch.profiler): "
                   "<out>.profile_<stage>.md; under torchrun also the time spent in collectives")
    p.add_argument("--text-encoders", action="store_true", help="build the text encoders too (random weights, "
                   "full size where the architecture file gives them: sd35_medium) and run them on every batch's "
                   "prompts, cache bypassed, as a trainer without the text-embedding cache does; default: cache-like "
                   "stub embeddings, text encoding not timed")
    p.add_argument("--memory-trace", action="store_true", help="also run one more iteration with the CUDA "
                   "allocator's history recorded: <out>.memory_<stage>.md, the blocks live at its peak by where they "
                   "were allocated")
    p.add_argument("--skip-guard-eval", action="store_true", help="with --compile model: time inference under "
                   "torch.compiler.set_stance(skip_guard_eval_unsafe=True) after the warm-up (dynamo runs only the "
                   "guards that choose among its compiled graphs: less host time per compiled call)")
    p.add_argument("--skip-pass-timing", action="store_true", help="count the passes but do not time each alone "
                   "(efficiency and MFU None; saves the minute it takes on a full-size model, e.g. for scaling runs)")
    p.add_argument("--shard-teacher", action="store_true", help="under torchrun: shard a separate frozen teacher "
                   "too (as parallel.shard_teacher; the shared layout's teacher is the fake's base, sharded anyway)")
    p.add_argument("--data-parallel", choices=["fsdp", "ddp"], default="fsdp", help="under torchrun: shard the "
                   "trainable models (fsdp) or replicate them and all-reduce gradients (ddp; as "
                   "parallel.data_parallel)")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun on CUDA: FSDP2 gathers and computes in bf16, fp32 master weights and "
                        "reductions (as parallel.mixed_precision; default on)")
    p.add_argument("--out", type=Path, required=True, help="JSON file")
