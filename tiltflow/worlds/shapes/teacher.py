"""The `teacher` stage of the shapes world: builds the text encoder, trains the CLIP reward model, then the
pixel-space SD3 teacher by flow matching (METHOD.md 1: x_sigma = (1 - sigma) x0 + sigma eps, target
v = eps - x0, sigma logit-normal as SD3 trains) with caption dropout for CFG. Every call stops after a
checkpoint once teacher.time_limit_s has passed, and the next call resumes; RNG is reseeded from
(seed, step), so an interrupted run follows the same data and noise as an uninterrupted one."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tiltflow.config.loader import ConfigError
from tiltflow.config.shapes import ShapesRunConfig
from tiltflow.flow.conventions import interpolate
from tiltflow.flow.rng import to_device
from tiltflow.storage import load, save_atomic
from tiltflow.worlds.shapes.data import image_pool
from tiltflow.worlds.shapes.models import ShapesAdapter, load_transformer, new_transformer
from tiltflow.worlds.shapes.scene import prompt_sets
from tiltflow.worlds.shapes.text import TextEncoder, build_text_encoder


def step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


def lr_at(step: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / max(1, warmup))


def train_world_models(cfg: ShapesRunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Text encoder, reward model, teacher, in that order; each resumes or is skipped when done."""
    from tiltflow.worlds.shapes.cards import record_call, write_cards
    from tiltflow.worlds.shapes.reward_model import train_reward_model

    start = cfg.teacher.init_from
    if start is not None and not (Path(start) / "config.json").is_file():  # before any model or data is made
        raise ConfigError("teacher.init_from", f"{start!r} is not a teacher folder (no config.json); expected a "
                          "folder such as checkpoints/shapes/teacher")
    started, t0 = time.time(), time.monotonic()
    deadline = t0 + cfg.teacher.time_limit_s
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    if not (Path(cfg.run_dir) / "text_encoder" / "config.json").is_file():  # built, not trained
        m = cfg.model
        build_text_encoder(Path(cfg.run_dir) / "text_encoder", seed=cfg.seed, hidden_size=m.text_hidden,
                           num_layers=m.text_layers, num_heads=m.text_heads)
    out: dict[str, Any] = {}
    for name, train in (("reward_model", train_reward_model), ("teacher", train_teacher)):
        exported = (Path(cfg.run_dir) / name / "config.json").is_file()  # by an earlier call: done
        out.update({f"{name}/finished": 1.0} if exported else train(cfg, deadline, progress=progress))
        if out[f"{name}/finished"] != 1.0:  # the teacher waits for the reward model
            break
    out["finished"] = float(out.get("teacher/finished", 0.0) == 1.0)
    record_call(Path(cfg.run_dir), cfg.device, started, time.monotonic() - t0)
    if out["finished"] == 1.0:
        write_cards(Path(cfg.run_dir), cfg)
        print("teacher finished; model cards written into text_encoder/, reward_model/ and teacher/ (README.md)")
    else:
        print(f"time limit ({cfg.teacher.time_limit_s:.0f} s) reached; run the same command again to resume")
    return out


def train_part(cfg: ShapesRunConfig, name: str, spec: Any, parts: dict[str, Any],
               train_step: Callable[[int], Tensor], export: Callable[[], None], deadline: float, progress: bool, *,
               warmup: int = 0, loss_name: str = "loss",
               extra_row: Callable[[int], dict[str, Any]] = lambda step: {}) -> dict[str, Any]:
    """The training skeleton of the world's teacher and reward model (`name`): resume `parts` (modules and
    optimisers, by key) from <name>_train.pt, call `train_step(step)` (one update; its detached loss, left on
    the device so that the host runs ahead) up to spec.num_iters, append the mean loss since the previous row
    to <name>_metrics.jsonl every spec.log_every steps and checkpoint every spec.checkpoint_every. The losses
    are read (one wait) only there, and checked first: a non-finite one stops the run with its step before
    anything is written, so the last checkpoint on disk is still the good one. Past `deadline` it checkpoints
    and pauses, or (with teacher.on_time_limit "finish", past `warmup` steps) stops early; a finished part is
    checkpointed and `export`ed. Returns <name>/finished and <name>/step."""
    run_dir, label = Path(cfg.run_dir), name.replace("_", " ")
    ckpt = run_dir / f"{name}_train.pt"
    step = 0
    if ckpt.is_file():
        state = load(ckpt)
        for key, part in parts.items():
            part.load_state_dict(state[key])
        step = int(state["step"])

    def checkpoint() -> None:
        save_atomic({**{key: part.state_dict() for key, part in parts.items()}, "step": step}, ckpt)

    t0, losses, read = time.monotonic(), [], []  # losses since the last row: on the device; read: on the host

    def read_losses() -> list[float]:  # the one wait per row or checkpoint
        if len(read) < len(losses):
            values = torch.stack(losses[len(read):]).float().cpu().tolist()
            for i, v in enumerate(values):
                if not math.isfinite(v):
                    bad = step - len(losses) + len(read) + i
                    raise FloatingPointError(f"{label}: non-finite {loss_name} ({v}) at step {bad}; the last "
                                             f"checkpoint ({ckpt}) is from before it and was not overwritten")
            read.extend(values)
        return read

    while step < spec.num_iters:
        losses.append(train_step(step))
        step += 1
        out_of_time = time.monotonic() > deadline
        if step % spec.log_every == 0 or step == spec.num_iters or out_of_time:  # the last row is the last step
            values = read_losses()
            row = {"step": step, "loss": sum(values) / len(values), **extra_row(step),
                   "elapsed_s": time.monotonic() - t0}
            with (run_dir / f"{name}_metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                print(f"{label} step {step}/{spec.num_iters} loss {row['loss']:.4f}", flush=True)
            losses, read = [], []
        if step % spec.checkpoint_every == 0 or out_of_time:
            read_losses()
            checkpoint()
            if out_of_time and step < spec.num_iters:
                # A teacher still in its warm-up is not worth exporting: pause then, whatever on_time_limit says
                # (the reward model can take a whole call's budget; the next call resumes the teacher).
                if cfg.teacher.on_time_limit == "pause" or step < warmup:
                    print(f"time limit reached at {label} step {step} of {spec.num_iters}: paused (checkpoint "
                          f"saved{'; still in its warm-up, so not exported' if step < warmup else ''})")
                    return {f"{name}/finished": 0.0, f"{name}/step": float(step)}
                print(f"time limit reached at step {step} of {spec.num_iters}: exporting the {label} as it stands")
                break
    read_losses()
    checkpoint()
    export()
    return {f"{name}/finished": 1.0, f"{name}/step": float(step)}


def train_teacher(cfg: ShapesRunConfig, deadline: float, *, progress: bool = True) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    final_dir = run_dir / "teacher"
    tc, device = cfg.teacher, torch.device(cfg.device)
    text = TextEncoder(run_dir / "text_encoder", device)
    scenes = prompt_sets()["train"]
    images, captions = image_pool(run_dir / f"data_{cfg.model.resolution}.npz", scenes, tc.num_images,
                                  cfg.model.resolution, cfg.seed)
    pool = torch.from_numpy(images).to(device)  # (N, H, W, 3) uint8
    caption_ids = torch.from_numpy(captions).to(device)
    table = text([s.text for s in scenes] + [""])  # the last row is the empty caption (CFG's uncond)
    empty = len(scenes)

    model = new_transformer(cfg.model, text.hidden_size, cfg.seed).to(device).train()
    if tc.init_from is not None:  # a resumed run's checkpoint replaces these weights in train_part
        start = load_transformer(tc.init_from)
        try:
            model.load_state_dict(start.state_dict())
        except RuntimeError as err:
            raise ValueError(f"teacher.init_from={tc.init_from!r} does not fit the configured model (model.* sizes "
                             f"must match the folder's config.json): {err}") from None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    adapter = ShapesAdapter(model, text, device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def train_step(step: int) -> Tensor:
        # Every draw from the step's CPU generator (the numbers do not depend on the device), copied without a
        # wait (to_device); nothing in the step reads a value back, so the host queues steps ahead of the GPU.
        g = step_generator(cfg.seed, step, 1)
        idx = to_device(torch.randint(pool.shape[0], (tc.batch_size,), generator=g), device)
        x0 = pool[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        drop = to_device(torch.rand(tc.batch_size, generator=g) < tc.caption_dropout, device)
        rows = torch.where(drop, torch.full_like(caption_ids[idx], empty), caption_ids[idx])
        cond = {k: v[rows] for k, v in table.items()}
        sigma = to_device(torch.sigmoid(torch.randn(tc.batch_size, generator=g)), device)  # logit-normal(0, 1)
        eps = to_device(torch.randn(x0.shape, generator=g), device)
        x = interpolate(x0, eps, sigma)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.lr, tc.warmup_iters)
        with autocast:
            v = adapter.forward(model, x, sigma, cond)
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - tc.ema_decay)
        return loss.detach()

    # The EMA teacher is exported as a diffusers folder in fp16 safetensors.
    return train_part(cfg, "teacher", tc, {"model": model, "ema": ema, "optimizer": opt}, train_step,
                      lambda: export_folder(ema, final_dir), deadline, progress, warmup=tc.warmup_iters,
                      loss_name="flow-matching loss",
                      extra_row=lambda step: {"lr": lr_at(step - 1, tc.lr, tc.warmup_iters)})


def export_folder(model: Any, folder: Path, *others: Any) -> None:
    """`model` in fp16 safetensors plus what `others` save_pretrained, written to a temporary folder first."""
    tmp = folder.with_name(folder.name + ".tmp")
    copy.deepcopy(model).half().save_pretrained(str(tmp), safe_serialization=True)
    for other in others:
        other.save_pretrained(str(tmp))
    tmp.replace(folder)
