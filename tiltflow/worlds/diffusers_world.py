"""The real-backbone world (WORLDS.md section 3) for the training spine: a Task over a diffusers adapter,
the LoRA role models, the final export, and sampling a finished run (`tiltflow sample --config ...`).

Stage 1 (AC-DMD, METHOD.md 4) and stage 2 (RTDMD, METHOD.md 5) run the same algorithms as the analytic
world; only the backbone, the prompts and the rewards change. A run directory holds config.yaml,
resolved.json (derived values such as the sampler shift), metrics.jsonl, checkpoint.pt (resumed by
default), final.safetensors (EMA generator + fake weights) and export_lora/ (a LoRA that stock diffusers
pipelines load with `load_lora_weights`), or, when the export is full weights (full fine-tuning, or a LoRA
stage 2 on it), export_transformer/ (a bf16 transformer folder that `<Transformer>.from_pretrained` reads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiltflow.config.diffusers import DiffusersRunConfig, LoraSpec, ModelSpec, RewardChoice
from tiltflow.config.loader import ConfigError
from tiltflow.config.schema import STAGE1_STAGES, SamplerConfig
from tiltflow.distributed.state import barrier, full_tensor, is_main_process
from tiltflow.flow.conventions import few_step_sigmas
from tiltflow.models.ema import EMA
from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.worlds.base import WorldSetup, text_sample_settings


# ---- rewards ------------------------------------------------------------------------------------------
class MeanBrightness:
    """Stub differentiable reward: mean pixel value in [0, 1] (until real scorers are configured)."""

    name = "brightness"
    differentiable = True

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> RewardOutput:
        return RewardOutput(scores=samples.float().mean(dim=(1, 2, 3)))


def build_rewards(choices: Sequence[RewardChoice], device: torch.device) -> RewardSet:
    rewards = []
    for i, c in enumerate(choices):
        opts = dict(c.options or {})
        if c.name == "brightness":
            if opts:
                raise ConfigError(f"rewards[{i}].options", "the brightness stub takes no options")
            rewards.append(MeanBrightness())
        else:
            from tiltflow.rewards import registry

            if registry.accepts(c.name, "device") and "device" not in opts:
                opts["device"] = str(device)
            rewards.append(registry.build_reward(c.name, **opts))
    return RewardSet(rewards, [c.weight for c in choices])


# ---- the task -----------------------------------------------------------------------------------------
def read_prompts(cfg: DiffusersRunConfig) -> list[str]:
    prompts = list(cfg.prompts) + (read_prompt_file(cfg.prompt_file) if cfg.prompt_file else [])
    if not prompts:
        raise ConfigError("prompt_file", f"{cfg.prompt_file!r} holds no prompts")
    return prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a text file, one a line (stripped, blank lines skipped); ConfigError("prompt_file")
    for a missing file or one that is not UTF-8 text."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("prompt_file", f"{str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("prompt_file", f"{str(p)!r} is not UTF-8 text (one prompt per line)") from None
    if "\x00" in text:
        raise ConfigError("prompt_file", f"{str(p)!r} holds NUL bytes: expected text, one prompt per line")
    return [line.strip() for line in text.splitlines() if line.strip()]


class DiffusersTask:
    """What ACDMD / RTDMD need from a world, over one adapter (algorithms.common.Task); the shapes world's
    task too."""

    def __init__(self, adapter: Any, prompts: Sequence[str], rewards: RewardSet, guidance_scale: float,
                 resolution: int):
        self.adapter = adapter
        self.prompts = list(prompts)
        if hasattr(adapter, "hold_prompt_set"):  # a fixed prompt set: each prompt encoded once per run
            adapter.hold_prompt_set(self.prompts)
        self.rewards = rewards
        self.guidance_scale = guidance_scale
        self.device = adapter.device
        self.sample_shape = tuple(adapter.latent_shape(resolution, resolution))

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,), generator=generator)
        return [self.prompts[int(i)] for i in idx]

    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        return self.adapter.encode(prompts)

    def encode_uncond(self, n: int) -> dict[str, Tensor]:
        return self.adapter.encode_uncond(n)

    def decode(self, x: Tensor) -> Tensor:
        return self.adapter.decode(x)

    def vae_decoder(self) -> torch.nn.Module | None:
        """The module parallel.compile_vae compiles (None: no VAE, e.g. the shapes world's pixel space)."""
        vae = getattr(self.adapter, "vae", None)
        return getattr(vae, "decoder", None)


# ---- building the pieces ------------------------------------------------------------------------------
def adapter_class(family: str) -> Any:
    """The DiffusersAdapter subclass of a family ("sd3", "flux1", "flux2")."""
    from tiltflow.models.adapters.flux import FluxAdapter
    from tiltflow.models.adapters.flux2 import Flux2Adapter
    from tiltflow.models.adapters.sd3 import SD3Adapter

    return {"sd3": SD3Adapter, "flux1": FluxAdapter, "flux2": Flux2Adapter}[family]


def build_adapter(spec: ModelSpec, device: str | torch.device, seed: int = 0) -> Any:
    cls = adapter_class(spec.family)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "got 'cuda' but no CUDA device is visible; set device: cpu")
    kw: dict[str, Any] = {"device": dev, "base_dtype": spec.base_dtype, "autocast": spec.autocast,
                          "embed_cache_dir": spec.embed_cache_dir, "attention_backend": spec.attention_backend}
    if spec.max_sequence_length:
        kw["max_sequence_length"] = spec.max_sequence_length
    if spec.family == "flux1":
        kw["guidance"] = spec.guidance_scale
    if spec.random_weights:
        return cls.random(spec.arch, seed=seed, **kw)
    return cls.from_pretrained(spec.source, **kw)


def build_generator_base(spec: ModelSpec, adapter: Any, seed: int) -> Any:
    if spec.generator_init is None:
        return None
    if spec.random_weights and spec.generator_init == "random":
        return adapter.random_transformer(seed + 1000)
    return adapter.load_transformer(spec.generator_init)


def resolved_sampler(cfg: DiffusersRunConfig, adapter: Any) -> SamplerConfig:
    if not cfg.model.family_shift:
        return cfg.sampler
    res = cfg.model.resolution
    shift = adapter.sigma_shift(res, res, cfg.sampler.num_steps)
    return dataclasses.replace(cfg.sampler, shift=float(shift))


def read_final(run_dir: str | Path) -> dict[str, Tensor]:
    """A finished stage run's final.safetensors."""
    from safetensors.torch import load_file

    path = Path(run_dir) / "final.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: is {str(run_dir)!r} a finished stage run?")
    return load_file(str(path))


def exported_generator(state: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """The generator export (a scale-1 LoRA, or full weights) inside a final.safetensors, if any."""
    sub = {k.removeprefix("export/"): v for k, v in (state or {}).items() if k.startswith("export/")}
    return sub or None


def export_is_full(state: dict[str, Tensor] | None) -> bool:
    """Whether a final.safetensors' generator export holds full weights (a full-fine-tuned run, or a LoRA
    stage 2 on one) rather than a LoRA."""
    export = exported_generator(state)
    return export is not None and not any(".lora_A." in k for k in export)


def _full_weights_copy(template: Any, state: dict[str, Tensor], what: str) -> Any:
    """A frozen copy of `template` (the teacher transformer, its dtype and device) holding `state`."""
    import copy

    module = copy.deepcopy(template)
    missing, unexpected = module.load_state_dict(state, strict=False)
    params = {name for name, _ in module.named_parameters()}
    missing = [k for k in missing if k in params]  # buffers keep the template's
    if missing or unexpected:
        raise ValueError(f"init_from's {what} does not fit this model ({len(missing)} weights missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unknown, e.g. {unexpected[:2]}): is init_from a "
                         "full-fine-tuning stage-1 run of this model?")
    return module.requires_grad_(False)


def build_lora_roles(adapter: Any, lora: LoraSpec, init_state: dict[str, Tensor] | None, **kw: Any) -> Any:
    """RoleModels over `adapter` (tiltflow.models.lora.build_roles). `init_state` (a final.safetensors)
    starts the generator from its stage-1 export (its own init plus its trained weights) and the fake
    score from its fake weights. A LoRA stage 2 from a full-fine-tuning stage-1 run (the reference recipe's
    fresh LoRA on the stage-1 model) puts the generator's and the fake score's fresh LoRAs on frozen copies
    of that run's generator and fake score (layout 'separate'); both start exactly where stage 1 ended."""
    from tiltflow.models.lora import LoraSettings, build_roles

    settings = LoraSettings(lora.rank, lora.alpha)
    fake_state = {k.removeprefix("fake/"): v for k, v in (init_state or {}).items() if k.startswith("fake/")}
    if lora.finetune == "lora" and export_is_full(init_state):
        if lora.layout != "separate":
            raise ConfigError("lora.layout", "init_from is a full-fine-tuning run: a LoRA stage 2 on it puts the "
                              "generator's and the fake score's LoRAs on their own stage-1 weights, which needs "
                              "lora.layout=separate (got shared)")
        template = adapter.transformer
        gen_base = _full_weights_copy(template, exported_generator(init_state) or {}, "generator export")
        fake_base = _full_weights_copy(template, fake_state, "fake score") if fake_state else None
        kw = {**kw, "generator_base": gen_base}
        return build_roles(adapter, layout="separate", finetune="lora", lora=settings, fake_base=fake_base, **kw)
    models = build_roles(adapter, layout=lora.layout, finetune=lora.finetune, lora=settings,
                         stage1_generator=exported_generator(init_state), **kw)
    if fake_state:  # (a sampling run passes the export alone: it needs no fake score)
        models.load_trainable_state(init_state or {}, roles=("fake",))
    return models


def build_models(cfg: DiffusersRunConfig, init_state: dict[str, Tensor] | None) -> tuple[Any, Any]:
    """(adapter, RoleModels), the roles started from `init_state` as build_lora_roles says."""
    adapter = build_adapter(cfg.model, cfg.device, cfg.seed)
    return adapter, build_lora_roles(adapter, cfg.lora, init_state, student_guidance=cfg.model.student_guidance,
                                     generator_base=build_generator_base(cfg.model, adapter, cfg.seed))


def generator_export(cfg: Any, models: Any, init_state: dict[str, Tensor] | None) -> tuple[dict[str, Tensor], int]:
    """The whole generator as weights for stock diffusers: one scale-1 LoRA (the stage-1 LoRA, if any,
    plus this stage's), or the full state dict when fine-tuning fully (rank 0). Reads only cfg.lora."""
    from tiltflow.models.export import combine_lora_states
    from tiltflow.models.lora import GENERATOR, lora_state

    if cfg.lora.finetune == "full":
        return models.generator_weights(), 0
    if export_is_full(init_state):  # a LoRA on a full-fine-tuned stage-1 generator: folded into its weights
        return models.merged_generator_weights(), 0
    parts = [(lora_state(models.generator, GENERATOR), cfg.lora.alpha / cfg.lora.rank)]
    stage1 = exported_generator(init_state)
    if stage1 is not None:
        parts.insert(0, (stage1, 1.0))
    return combine_lora_states(parts)


def write_final(cfg: Any, models: Any, init_state: dict[str, Tensor] | None, **meta: str
                ) -> tuple[dict[str, Tensor], int]:
    """run_dir/final.safetensors: the trainable weights plus the generator export under export/, with
    `meta` and the stage in its metadata. Returns the export and its LoRA rank (0: full weights).
    Under FSDP2 every rank calls this (sharded weights are gathered to full tensors, a collective) and
    rank 0 alone writes the file."""
    from safetensors.torch import save_file

    export, rank = generator_export(cfg, models, init_state)
    state = {k: full_tensor(v).float().cpu().contiguous() for k, v in models.trainable_state().items()}
    state.update({f"export/{k}": v.contiguous() for k, v in export.items()})
    meta.update(stage=cfg.stage, finetune=cfg.lora.finetune, export_rank=str(rank))
    if is_main_process():
        save_file(state, str(Path(cfg.run_dir) / "final.safetensors"), metadata=meta)
    return export, rank


def device_fault_describer(adapter: Any) -> Callable[[BaseException, str], BaseException | None]:
    """WorldSetup.describe_fault over `adapter`: a device fault restated with its model and attention kernel."""
    from tiltflow.models.adapters.attention import describe_failure, is_device_failure

    return lambda err, where: describe_failure(adapter, where, err) if is_device_failure(err) else None


def sampling_models(cfg: Any, build: Callable[[Any, Any], tuple[Any, Any]]) -> tuple[Any, Any]:
    """(adapter, RoleModels) to sample a run: its final generator, or the untrained init with
    sample.weights: base. One transformer suffices to sample: the LoRA sits on the shared base."""
    init_state = None if cfg.sample.weights == "base" else read_final(cfg.run_dir)
    if export_is_full(init_state):  # full weights (full fine-tuning, or a LoRA stage 2 folded into them)
        init_state = {k: v for k, v in (init_state or {}).items() if k.startswith("export/")}
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, finetune="full", layout="separate"))
    elif cfg.lora.finetune == "lora":
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, layout="shared"))
    return build(cfg, init_state)


def export_run(cfg: Any, build: Callable[[Any, Any], tuple[Any, Any]], out: str | Path, dtype: torch.dtype) -> Path:
    """`tiltflow export --run DIR --out DIR`: a finished run's final generator, its LoRA (if any) merged into its
    own base (the teacher, or model.generator_init's transformer), as a folder that the generator's transformer
    class reads with `from_pretrained`. Built as sampling builds it, so the export is what `tiltflow sample` draws
    from."""
    from tiltflow.models.export import save_transformer_folder

    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, weights="final"))
    _, models = sampling_models(cfg, build)
    return save_transformer_folder(models.generator, models.merged_generator_weights(), out, dtype)


class DiffusersWorld:
    """`world: diffusers`: SD3, SD3.5, FLUX.1-dev and FLUX.2-klein through their diffusers adapters."""

    name = "diffusers"
    config_class = DiffusersRunConfig

    def build(self, cfg: DiffusersRunConfig, *, progress: bool = True) -> WorldSetup:
        import diffusers

        from tiltflow.models.export import save_lora, save_transformer_folder

        stage1 = cfg.stage in STAGE1_STAGES
        prompts = read_prompts(cfg)  # bad input fails before any model loads
        init_state = read_final(cfg.init_from) if (not stage1 and cfg.init_from) else None
        adapter, models = build_models(cfg, init_state)
        sampler = resolved_sampler(cfg, adapter)
        # The CFG scale of the teacher's velocity: FLUX.1-dev takes its guidance as an input (one pass).
        scale = 1.0 if cfg.model.family == "flux1" else cfg.model.guidance_scale
        task = DiffusersTask(adapter, prompts, build_rewards(cfg.rewards, adapter.device), scale,
                             cfg.model.resolution)
        guidance = "two passes" if not cfg.parallel.batched_cfg else "one pass at twice the batch"
        resolved = {"sampler_shift": sampler.shift, "sigmas": few_step_sigmas(sampler.num_steps, sampler.shift),
                    "sample_shape": list(task.sample_shape),
                    "teacher_guidance": "none (one pass)" if scale == 1.0 else guidance}
        run_dir = Path(cfg.run_dir)
        if is_main_process():
            (run_dir / "resolved.json").write_text(json.dumps(resolved, indent=1) + "\n")

        def finish(ema: EMA) -> dict[str, Any]:
            # Under FSDP2 every rank gathers the weights and samples (collectives); rank 0 writes.
            ema.copy_to(ema.params)  # the final generator is the EMA one
            export, rank = write_final(cfg, models, init_state, family=cfg.model.family)
            if rank > 0 and is_main_process():  # a LoRA that stock diffusers pipelines load
                save_lora(export, rank, run_dir / "export_lora", getattr(diffusers, adapter.pipeline_class))
            elif is_main_process():  # full weights: a transformer folder that from_pretrained reads, in bf16
                save_transformer_folder(models.generator, export, run_dir / "export_transformer", torch.bfloat16)
            # What a person looks at first: the final generator on the first prompts (samples/grid.png).
            write_samples(cfg, adapter, models.generator_role, sampler, task.prompts[:4], run_dir / "samples")
            barrier()  # every rank returns once rank 0's files are complete (metrics.jsonl included)
            lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
            return json.loads(lines[-1]) if lines else {}

        return WorldSetup(task, models, sampler, finish, describe_fault=device_fault_describer(adapter))

    def export(self, cfg: DiffusersRunConfig, *, out: Path, dtype: torch.dtype | None = None) -> Path:
        """The run's generator as a transformer folder (bf16 unless `dtype`): see export_run."""
        return export_run(cfg, build_models, out, dtype or torch.bfloat16)

    def sample(self, cfg: DiffusersRunConfig, *, out: Path, texts: Sequence[str] = (), num: int | None = None,
               prompt: int | None = None, seed: int | None = None) -> str:
        """`tiltflow sample --config configs/<family>/sample.yaml --out DIR`: PNGs, index.jsonl, grid.png."""
        cfg = text_sample_settings(cfg, num, prompt, seed)
        paths = sample(cfg, list(texts) or read_prompts(cfg), out)
        return f"wrote {len(paths)} images, index.jsonl and a captioned grid.png to {out}"


@torch.no_grad()
def sample(cfg: DiffusersRunConfig, prompts: Sequence[str], out_dir: str | Path) -> list[Path]:
    """Few-step samples of the run's final generator (or of the untrained init with sample.weights:
    base) as PNG files plus index.jsonl (prompt of each file) and a captioned grid.png."""
    adapter, models = sampling_models(cfg, build_models)
    return write_samples(cfg, adapter, models.generator_role, resolved_sampler(cfg, adapter), prompts, out_dir)


@torch.no_grad()
def write_samples(cfg: DiffusersRunConfig, adapter: Any, generator: Any, sampler: SamplerConfig,
                  prompts: Sequence[str], out_dir: str | Path) -> list[Path]:
    """cfg.sample.num_per_prompt images of each prompt by `generator` in sampler.num_steps CPS steps. A
    sharded generator samples on every rank (its forwards gather the weights: a collective); every rank
    draws the same noise for the same prompts, and rank 0 alone writes the files."""
    from tiltflow.eval.report import write_grid
    from tiltflow.sampling import NoisePlan
    from tiltflow.sampling import sample as run_sampler

    sigmas = few_step_sigmas(sampler.num_steps, sampler.shift)
    eta = sampler.eta if cfg.sample.eta is None else cfg.sample.eta
    shape = adapter.latent_shape(cfg.model.resolution, cfg.model.resolution)
    todo = [p for p in prompts for _ in range(cfg.sample.num_per_prompt)]
    g = torch.Generator().manual_seed(cfg.sample.seed)

    def draw(start: int, batch: list[str]) -> Tensor:
        cond = adapter.encode(batch)
        plan = NoisePlan.fresh(len(batch), shape, sampler.num_steps, g, device=adapter.device)
        return adapter.decode(run_sampler(lambda x, s: generator.velocity(x, s, cond), sigmas, plan, eta=eta).final)

    paths, _ = write_pngs(todo, cfg.sample.batch_size, draw, Path(out_dir))
    if is_main_process():
        write_grid([str(p) for p in paths[:64]], Path(out_dir) / "grid.png", captions=todo[:64])
    return paths


def write_pngs(prompts: Sequence[str], batch_size: int, draw: Callable[[int, list[str]], Tensor], out: Path,
               extra: Callable[[int], dict[str, Any]] = lambda i: {}) -> tuple[list[Path], list[Any]]:
    """Sample i of `prompts` as out/<i>.png plus a line {"file", "prompt", **extra(i)} of out/index.jsonl,
    batch_size at a time (draw(start, batch) -> images in [0, 1] of prompts[start:start + len(batch)]). Every
    rank draws; rank 0 alone writes. Returns the paths and the uint8 (H, W, 3) images."""
    from PIL import Image

    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    images: list[Any] = []
    with (out / "index.jsonl").open("w") if main else contextlib.nullcontext() as index:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            pixels = (draw(start, batch) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for j, (prompt, img) in enumerate(zip(batch, pixels)):
                path = out / f"{start + j:05d}.png"
                if index is not None:
                    Image.fromarray(img).save(path)
                    index.write(json.dumps({"file": path.name, "prompt": prompt, **extra(start + j)}) + "\n")
                paths.append(path)
                images.append(img)
    return paths, images
