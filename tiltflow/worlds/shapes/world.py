"""`world: shapes` for the training spine (WORLDS.md 2): the `teacher` stage trains the world's models
(text encoder, CLIP reward model, pixel-space SD3 teacher); the distillation stages (AC-DMD, RTDMD and the
baselines, METHOD.md 4-6) run over LoRA roles on that teacher, exactly as the diffusers world does, with
the CLIP reward and/or the verifier as rewards. A stage's run directory holds what the diffusers world's
does (final.safetensors with export/ weights) plus final_metrics.json, final_grid.png and export_transformer/: the
student as a stock diffusers SD3Transformer2DModel folder in fp16, as the teacher's (a LoRA run's LoRA folded
into the teacher's weights), which `SD3Transformer2DModel.from_pretrained` reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiltflow.config.schema import STAGE1_STAGES
from tiltflow.config.shapes import ShapesRunConfig
from tiltflow.distributed.state import barrier, in_process_group, is_main_process
from tiltflow.eval.prompts import PromptFileError
from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.models.ema import EMA
from tiltflow.models.export import save_transformer_folder
from tiltflow.sampling import NoisePlan, sample
from tiltflow.worlds.base import WorldSetup, text_sample_settings
from tiltflow.worlds.diffusers_world import (
    DiffusersTask,
    build_lora_roles,
    device_fault_describer,
    export_run,
    read_final,
    read_prompt_file,
    sampling_models,
    write_final,
    write_pngs,
)
from tiltflow.worlds.shapes.evaluate import eval_prompts, evaluate_samples, write_eval, write_marked_grid
from tiltflow.worlds.shapes.models import ShapesAdapter, euler_sample
from tiltflow.worlds.shapes.rewards import build_rewards
from tiltflow.worlds.shapes.scene import VocabularyError, parse, prompt_sets


class CaptionError(VocabularyError, PromptFileError):
    """A given caption (a prompt file's, or --text) outside the shapes vocabulary: the user's input, so the
    command reports it in one line with exit code 2; the message names the caption and the unknown word."""


def read_prompts(cfg: ShapesRunConfig) -> list[str]:
    """The distillation prompts: a built-in set, or a file of captions in the world's vocabulary (checked)."""
    if cfg.prompt_file is None:
        return [s.text for s in prompt_sets()[cfg.prompt_set]]
    return check_prompts(read_prompt_file(cfg.prompt_file), f"prompt_file {cfg.prompt_file}")


def check_prompts(prompts: Sequence[str], source: str = "") -> list[str]:
    for i, p in enumerate(prompts):
        try:
            parse(p)
        except VocabularyError as e:
            where = f"{source}, caption {i + 1}: " if source else ""
            raise CaptionError(f"{where}{e}") from None
    return list(prompts)


def build_models(cfg: ShapesRunConfig, init_state: dict[str, Tensor] | None) -> tuple[ShapesAdapter, Any]:
    assert cfg.models_dir is not None
    adapter = ShapesAdapter.load(cfg.models_dir, cfg.device)
    return adapter, build_lora_roles(adapter, cfg.lora, init_state)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], num_steps: int, device: torch.device) -> Any:
    """A NoisePlan whose sample i depends only on seeds[i] (so index.jsonl's seed reproduces it)."""
    plans = [NoisePlan.fresh(1, shape, num_steps, torch.Generator().manual_seed(int(s)), device=device) for s in seeds]
    steps = [None if p is None else torch.cat([pl.steps[k] for pl in plans]) for k, p in enumerate(plans[0].steps)]
    return NoisePlan(init=torch.cat([p.init for p in plans]), steps=steps)


def few_step(models: Any, adapter: ShapesAdapter, sampler: Any, prompts: list[str], seeds: Sequence[int],
             eta: float | None = None) -> Tensor:
    sigmas = few_step_sigmas(sampler.num_steps, sampler.shift)
    cond = adapter.encode(prompts)
    plan = seeded_noise(seeds, adapter.latent_shape(adapter.resolution, adapter.resolution), sampler.num_steps,
                        adapter.device)
    role = models.generator_role
    with torch.no_grad():
        return sample(lambda x, s: role.velocity(x, s, cond), sigmas, plan,
                      eta=sampler.eta if eta is None else eta).final


def evaluate_generator(cfg: ShapesRunConfig, adapter: ShapesAdapter, models: Any,
                       rewards: Any) -> tuple[dict[str, float], Any, list[str]]:
    """The 4-step generator's scores and images on cfg.eval's prompts, with the fixed noise every evaluation of
    a run uses (sample i from seed 10000 + i): (metrics, images, prompts)."""
    prompts = eval_prompts(cfg.eval.prompt_set, cfg.eval.max_prompts, cfg.eval.num_per_prompt)
    seeds = [10_000 + i for i in range(len(prompts))]
    b = cfg.eval.batch_size

    def generate(batch: list[str], k: int) -> Tensor:
        return few_step(models, adapter, cfg.sampler, batch, seeds[k * b:k * b + len(batch)])

    metrics, images = evaluate_samples(generate, prompts, b, rewards, adapter.decode)
    return metrics, images, prompts


class ShapesWorld:
    """`world: shapes`."""

    name = "shapes"
    config_class = ShapesRunConfig

    def train_teacher(self, cfg: ShapesRunConfig, *, progress: bool = True) -> dict[str, Any]:
        import torch.distributed as dist

        from tiltflow.worlds.shapes.teacher import train_world_models

        if in_process_group() and dist.get_world_size() > 1:
            from tiltflow.config.loader import ConfigError

            raise ConfigError("stage", "the shapes world's teacher stage (its own small models) runs in one "
                              f"process, not on {dist.get_world_size()} ranks: launch it without torchrun; the "
                              "distillation stages run on several ranks")
        return train_world_models(cfg, progress=progress)

    def build(self, cfg: ShapesRunConfig, *, progress: bool = True) -> WorldSetup:
        stage1 = cfg.stage in STAGE1_STAGES
        init_state = read_final(cfg.init_from) if (not stage1 and cfg.init_from) else None
        adapter, models = build_models(cfg, init_state)
        assert cfg.models_dir is not None
        rewards = build_rewards(cfg.rewards, cfg.models_dir, adapter.device)
        task = DiffusersTask(adapter, read_prompts(cfg), rewards, cfg.guidance_scale, adapter.resolution)
        run_dir = Path(cfg.run_dir)

        # Under FSDP2 every rank evaluates the whole prompt set with the same seeds: the sharded generator's
        # forwards are collectives, and the metrics come out identical on every rank (rank 0 logs them).
        def evaluate(step: int) -> dict[str, float]:
            return {f"eval_{k}": v for k, v in evaluate_generator(cfg, adapter, models, rewards)[0].items()}

        def finish(ema: EMA) -> dict[str, Any]:
            ema.copy_to(ema.params)  # the final generator is the EMA one
            export, rank = write_final(cfg, models, init_state, world="shapes")  # every rank gathers, rank 0 writes
            # The student as plain weights: the export when it is full weights, else the LoRA folded into its
            # base (gathered when sharded: a collective on every rank).
            student = export if rank == 0 else models.merged_generator_weights()
            if is_main_process():  # a stock diffusers folder, in fp16 as the teacher's
                save_transformer_folder(models.generator, student, run_dir / "export_transformer", torch.float16)
            metrics, images, prompts = evaluate_generator(cfg, adapter, models, rewards)
            if is_main_process():
                write_eval(run_dir, "final", metrics, images, prompts)
            barrier()  # every rank returns once rank 0's files are complete
            return metrics

        return WorldSetup(task, models, cfg.sampler, finish, evaluate if cfg.eval.every else None, cfg.eval.every,
                          device_fault_describer(adapter))

    def export(self, cfg: ShapesRunConfig, *, out: Path, dtype: torch.dtype | None = None) -> Path:
        """The run's student as an SD3Transformer2DModel folder (fp16, as the teacher's, unless `dtype`): what the
        run wrote to export_transformer/, in another dtype or for a run from before that folder existed."""
        return export_run(cfg, build_models, out, dtype or torch.float16)

    def sample(self, cfg: ShapesRunConfig, *, out: Path, texts: Sequence[str] = (), num: int | None = None,
               prompt: int | None = None, seed: int | None = None) -> str:
        """Few-step samples of a finished stage run: PNGs, index.jsonl (file, prompt, seed), a marked grid."""
        cfg = text_sample_settings(cfg, num, prompt, seed)
        prompts = check_prompts(list(texts)) if texts else read_prompts(cfg)
        adapter, models = sampling_models(cfg, build_models)
        todo = [p for p in prompts for _ in range(cfg.sample.num_per_prompt)]
        seeds = [cfg.sample.seed + i for i in range(len(todo))]

        def draw(start: int, batch: list[str]) -> Tensor:
            x = few_step(models, adapter, cfg.sampler, batch, seeds[start:start + len(batch)], cfg.sample.eta)
            return adapter.decode(x)

        out = Path(out)
        _, images = write_pngs(todo, cfg.sample.batch_size, draw, out, lambda i: {"seed": seeds[i]})
        import numpy as np

        write_marked_grid(np.stack(images), todo, out / "grid.png")
        return f"wrote {len(todo)} images, index.jsonl and grid.png (verifier pass/fail marks) to {out}"

    def evaluate_run(self, cfg: ShapesRunConfig, *, num: int, seed: int,
                     out_dir: str | Path | None = None) -> dict[str, Any]:
        """`tiltflow eval --run DIR`. A teacher run: the teacher with eval.teacher_steps Euler steps and CFG
        (guidance_scale), its metrics and grid written to out_dir (default DIR/eval). A stage run: its final
        metrics as the run wrote them, or with out_dir its final 4-step generator evaluated afresh with the
        config's (overridden) eval settings, e.g. eval.num_per_prompt=16, written to out_dir as
        final_<n>pp_metrics.json and final_<n>pp_grid.png. The prompt set, samples per prompt and seeds are
        cfg.eval's (--num and --seed apply to gmm runs only)."""
        run_dir = Path(cfg.run_dir)
        if cfg.stage == "teacher":
            eval_dir = Path(out_dir) if out_dir is not None else run_dir / "eval"
            metrics = evaluate_teacher(cfg, run_dir, num_steps=cfg.eval.teacher_steps,
                                       guidance_scale=cfg.guidance_scale, out_dir=eval_dir,
                                       name=f"teacher_{cfg.eval.teacher_steps}steps_cfg{cfg.guidance_scale:g}")
            # the reward model's pairwise accuracy against hard negatives on renders of the eval captions
            from tiltflow.worlds.shapes.reward_model import hard_negative_accuracy, load_clip_reward

            reward = load_clip_reward(run_dir / "reward_model", device=cfg.device)
            metrics.update(hard_negative_accuracy(reward, prompt_sets()[cfg.eval.prompt_set], cfg.model.resolution))
            (eval_dir / "reward_model_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            return {"samples": str(eval_dir), "reference": "verifier", "metrics": metrics}
        path = run_dir / "final_metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist: is {str(run_dir)!r} a finished stage run?")
        if out_dir is None:
            return {"samples": str(run_dir / "final_grid.png"), "reference": "verifier",
                    "metrics": json.loads(path.read_text())}
        adapter, models = sampling_models(cfg, build_models)
        assert cfg.models_dir is not None
        metrics, images, prompts = evaluate_generator(cfg, adapter, models,
                                                      build_rewards(cfg.rewards, cfg.models_dir, adapter.device))
        name = f"final_{cfg.eval.num_per_prompt}pp"
        write_eval(Path(out_dir), name, metrics, images, prompts)
        return {"samples": str(Path(out_dir) / f"{name}_grid.png"), "reference": "verifier", "metrics": metrics}


def evaluate_teacher(cfg: ShapesRunConfig, models_dir: str | Path, *, num_steps: int, guidance_scale: float,
                     out_dir: Path, name: str) -> dict[str, float]:
    """The teacher's many-step Euler samples with CFG on cfg.eval's prompt set: verifier and reward scores,
    written to out_dir/<name>_metrics.json and <name>_grid.png."""
    adapter = ShapesAdapter.load(models_dir, cfg.device)
    rewards = build_rewards(cfg.rewards, models_dir, adapter.device)
    prompts = eval_prompts(cfg.eval.prompt_set, cfg.eval.max_prompts, cfg.eval.num_per_prompt)
    shape = adapter.latent_shape(adapter.resolution, adapter.resolution)

    def generate(batch: list[str], k: int) -> Tensor:
        g = torch.Generator().manual_seed(20_000 + k)
        return euler_sample(adapter.velocity, adapter.encode(batch), adapter.encode_uncond(len(batch)),
                            guidance_scale, shape, num_steps, g, adapter.device)

    metrics, images = evaluate_samples(generate, prompts, cfg.eval.batch_size, rewards, adapter.decode)
    metrics.update({"num_steps": float(num_steps), "guidance_scale": float(guidance_scale)})
    write_eval(out_dir, name, metrics, images, prompts)
    return metrics
