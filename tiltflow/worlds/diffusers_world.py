"""The real-backbone world (WORLDS.md section 3): a Task over a diffusers adapter, the run config, and the
`train` / `sample` entry points that `tiltflow train|sample --config configs/<family>/*.yaml` calls.

Stage 1 (AC-DMD, METHOD.md 4) and stage 2 (RTDMD, METHOD.md 5) run the same algorithm classes as the
analytic world; only the backbone, the prompts and the rewards change. A run directory holds
config.yaml, resolved.json (derived values such as the sampler shift), metrics.jsonl, checkpoint.pt
(resumed by default), final.safetensors (EMA generator + fake weights) and export_lora/ (a LoRA that
stock diffusers pipelines load with `load_lora_weights`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from tiltflow.config.loader import ConfigError, load_config, to_yaml
from tiltflow.config.schema import STAGE1_STAGES, STAGE_PRESETS, SamplerConfig, Stage1Config, Stage2Config
from tiltflow.rewards.base import RewardOutput, RewardSet

FAMILIES = ("sd3", "flux1", "flux2")
STAGES = ("ac_dmd", "dmd2", "rtdmd", "rtdmd_exact", "grpo_only", "bp_only", "dm_bp")


@dataclass
class ModelSpec:
    """Which backbone: a hub id or local folder (`source`), or an architecture with random weights."""

    family: Literal["sd3", "flux1", "flux2"] = "sd3"
    source: str = ""
    generator_init: str | None = None  # FLUX.2: the step-distilled model ("random" with random_weights)
    random_weights: bool = False
    arch: str | None = None  # with random_weights: tiltflow/models/arch/<arch>.json
    resolution: int = 512
    base_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    autocast: bool = True
    max_sequence_length: int | None = None  # null = the family's (SD3 256, FLUX 512)
    embed_cache_dir: str | None = None
    teacher_cfg: float = 4.5  # standard CFG scale; FLUX.1-dev: the guidance input (one pass)
    student_guidance: float | None = None  # FLUX.1-dev: guidance input of generator and fake (null = teacher_cfg)
    family_shift: bool = True  # the sampler's shift is the family's (SD3: 3; FLUX: exp(mu) at this resolution)
    gradient_checkpointing: bool = False

    def validate(self, path: str) -> None:
        if self.random_weights:
            if not self.arch:
                raise ConfigError(f"{path}.arch", "random_weights needs an architecture name (e.g. sd35_medium)")
        elif not self.source:
            raise ConfigError(f"{path}.source", "give a hub id or local folder, or set random_weights: true")
        if self.resolution % 16:
            raise ConfigError(f"{path}.resolution", f"got {self.resolution}, expected a multiple of 16")
        if self.teacher_cfg < 0:
            raise ConfigError(f"{path}.teacher_cfg", f"got {self.teacher_cfg}, expected >= 0")


@dataclass
class LoraSpec:
    layout: Literal["shared", "separate"] = "shared"
    finetune: Literal["lora", "full"] = "lora"
    rank: int = 32
    alpha: float = 64.0

    def validate(self, path: str) -> None:
        if self.layout == "shared" and self.finetune == "full":
            raise ConfigError(f"{path}.finetune", "full fine-tuning needs layout: separate")
        if self.rank < 1:
            raise ConfigError(f"{path}.rank", f"got {self.rank}, expected >= 1")


@dataclass
class RewardChoice:
    """A reward by name: 'brightness' (a differentiable stub) or any name tiltflow.rewards.registry knows."""

    name: str = "brightness"
    weight: float = 1.0
    options: Any = None  # keyword arguments of the reward's factory (a mapping)


@dataclass
class SampleSpec:
    batch_size: int = 4
    num_per_prompt: int = 1
    seed: int = 0
    eta: float | None = None  # null = sampler.eta
    weights: Literal["final", "base"] = "final"  # "base": the untrained generator init (a 4-step baseline)


@dataclass
class DiffusersRunConfig:
    world: Literal["diffusers"] = "diffusers"
    stage: Literal["ac_dmd", "dmd2", "rtdmd", "rtdmd_exact", "grpo_only", "bp_only", "dm_bp"] = "ac_dmd"
    seed: int = 0
    run_dir: str = "runs/diffusers"
    init_from: str | None = None  # stage 2: the stage-1 run directory (its final.safetensors)
    device: str = "cuda"
    checkpoint_every: int = 100
    log_every: int = 1
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    rewards: list[RewardChoice] = field(default_factory=lambda: [RewardChoice()])
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    sample: SampleSpec = field(default_factory=SampleSpec)

    def validate(self, path: str) -> None:
        if not self.prompts and not self.prompt_file:
            raise ConfigError("prompts", "give prompts (a list) or prompt_file (one prompt per line)")
        if self.model.family_shift and self.sampler.shift != 1.0:
            raise ConfigError("sampler.shift", f"got {self.sampler.shift} while model.family_shift is true (the "
                              "family's own shift is used); set model.family_shift: false to use sampler.shift")


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> DiffusersRunConfig:
    """Strict load: file, dotted overrides, stage presets (e.g. dmd2, grpo_only) applied first."""
    return load_config(DiffusersRunConfig, path, overrides, presets=STAGE_PRESETS, preset_key="stage")


# ---- rewards ------------------------------------------------------------------------------------------
class MeanBrightness:
    """Stub differentiable reward: mean pixel value in [0, 1] (until real scorers are configured)."""

    name = "brightness"
    differentiable = True

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> RewardOutput:
        return RewardOutput(scores=samples.float().mean(dim=(1, 2, 3)))


def build_rewards(choices: Sequence[RewardChoice], device: torch.device) -> RewardSet:
    rewards, weights = [], []
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
        weights.append(c.weight)
    return RewardSet(rewards, weights)


# ---- the task -----------------------------------------------------------------------------------------
def read_prompts(cfg: DiffusersRunConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompt_file:
        p = Path(cfg.prompt_file)
        if not p.is_file():
            raise ConfigError("prompt_file", f"{str(p)!r} does not exist")
        prompts += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("prompt_file", f"{cfg.prompt_file!r} holds no prompts")
    return prompts


class DiffusersTask:
    """What ACDMD / RTDMD need from a world, over one adapter (algorithms.common.Task)."""

    def __init__(self, adapter: Any, prompts: Sequence[str], rewards: RewardSet, cfg_scale: float, resolution: int):
        self.adapter = adapter
        self.prompts = list(prompts)
        self.rewards = rewards
        self.cfg_scale = cfg_scale
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


# ---- building the pieces ------------------------------------------------------------------------------
def build_adapter(spec: ModelSpec, device: str | torch.device, seed: int = 0) -> Any:
    from tiltflow.models.adapters.flux import FluxAdapter
    from tiltflow.models.adapters.flux2 import Flux2Adapter
    from tiltflow.models.adapters.sd3 import SD3Adapter

    cls = {"sd3": SD3Adapter, "flux1": FluxAdapter, "flux2": Flux2Adapter}[spec.family]
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "got 'cuda' but no CUDA device is visible; set device: cpu")
    kw: dict[str, Any] = {"device": dev, "base_dtype": spec.base_dtype, "autocast": spec.autocast,
                          "embed_cache_dir": spec.embed_cache_dir}
    if spec.max_sequence_length:
        kw["max_sequence_length"] = spec.max_sequence_length
    if spec.family == "flux1":
        kw["guidance"] = spec.teacher_cfg
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


def _read_final(run_dir: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(run_dir) / "final.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: is {str(run_dir)!r} a finished stage run?")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def _stage1_weights(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor] | None:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return sub or None


def build_models(cfg: DiffusersRunConfig, init_state: dict[str, Tensor] | None) -> tuple[Any, Any]:
    """(adapter, RoleModels). `init_state` (a final.safetensors) starts the generator from its stage-1
    weights and the fake score from its fake weights."""
    from tiltflow.models.lora import LoraSettings, build_roles

    adapter = build_adapter(cfg.model, cfg.device, cfg.seed)
    stage1 = None
    if init_state is not None:  # the stage-1 generator = its own init plus its trained weights
        stage1 = _stage1_weights(init_state, "export/")
    models = build_roles(adapter, layout=cfg.lora.layout, finetune=cfg.lora.finetune,
                         lora=LoraSettings(cfg.lora.rank, cfg.lora.alpha),
                         generator_base=build_generator_base(cfg.model, adapter, cfg.seed),
                         stage1_generator=stage1, student_guidance=cfg.model.student_guidance,
                         gradient_checkpointing=cfg.model.gradient_checkpointing)
    if init_state is not None:
        models.load_trainable_state(init_state, roles=("fake",))
    return adapter, models


def _pipeline_cls(adapter: Any) -> Any:
    import diffusers

    return getattr(diffusers, adapter.pipeline_class)


def generator_export(cfg: DiffusersRunConfig, models: Any, init_state: dict[str, Tensor] | None
                     ) -> tuple[dict[str, Tensor], int]:
    """The whole generator as weights for stock diffusers: one scale-1 LoRA (the stage-1 LoRA, if any,
    plus this stage's), or the full state dict when fine-tuning fully (rank 0)."""
    from tiltflow.models.export import combine_lora_states
    from tiltflow.models.lora import GENERATOR, lora_state

    if cfg.lora.finetune == "full":
        return models.generator_weights(), 0
    parts = [(lora_state(models.generator, GENERATOR), cfg.lora.alpha / cfg.lora.rank)]
    stage1 = _stage1_weights(init_state, "export/") if init_state is not None else None
    if stage1 is not None:
        parts.insert(0, (stage1, 1.0))
    return combine_lora_states(parts)


def save_final(cfg: DiffusersRunConfig, adapter: Any, models: Any, init_state: dict[str, Tensor] | None) -> Path:
    from safetensors.torch import save_file

    from tiltflow.models.export import save_lora

    run_dir = Path(cfg.run_dir)
    export, rank = generator_export(cfg, models, init_state)
    state = {k: v.float().cpu().contiguous() for k, v in models.trainable_state().items()}
    state.update({f"export/{k}": v.contiguous() for k, v in export.items()})
    meta = {"family": cfg.model.family, "stage": cfg.stage, "finetune": cfg.lora.finetune, "export_rank": str(rank)}
    save_file(state, str(run_dir / "final.safetensors"), metadata=meta)
    if rank > 0:
        save_lora(export, rank, run_dir / "export_lora", _pipeline_cls(adapter))
    return run_dir / "final.safetensors"


def train(cfg: DiffusersRunConfig, progress: bool = True) -> dict[str, float]:
    """Run stage 1 (ac_dmd, dmd2) or stage 2 (rtdmd and its baselines) into cfg.run_dir (resumes)."""
    from tiltflow.algorithms.ac_dmd import ACDMD
    from tiltflow.algorithms.rtdmd import RTDMD
    from tiltflow.flow.conventions import few_step_sigmas
    from tiltflow.training.loop import LoopHooks, run_loop

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    stage1 = cfg.stage in STAGE1_STAGES
    init_state = _read_final(cfg.init_from)[0] if (not stage1 and cfg.init_from) else None
    adapter, models = build_models(cfg, init_state)
    sampler = resolved_sampler(cfg, adapter)
    cfg_scale = 1.0 if cfg.model.family == "flux1" else cfg.model.teacher_cfg  # FLUX.1: guidance input
    task = DiffusersTask(adapter, read_prompts(cfg), build_rewards(cfg.rewards, adapter.device), cfg_scale,
                         cfg.model.resolution)
    resolved = {"sampler_shift": sampler.shift, "sigmas": few_step_sigmas(sampler.num_steps, sampler.shift),
                "sample_shape": list(task.sample_shape), "teacher_cfg_passes": 2 if cfg_scale != 1.0 else 1}
    (run_dir / "resolved.json").write_text(json.dumps(resolved, indent=1) + "\n")
    roles = models.roles()
    algo: Any = (ACDMD(cfg.stage1, sampler, task, roles, cfg.seed) if stage1
                 else RTDMD(cfg.stage2, sampler, task, roles, cfg.seed))
    hooks = LoopHooks(model_state=models.trainable_state, load_model_state=models.load_trainable_state)
    num_iters = cfg.stage1.num_iters if stage1 else cfg.stage2.num_iters
    run_loop(algo, hooks, run_dir=run_dir, num_iters=num_iters, checkpoint_every=cfg.checkpoint_every,
             log_every=cfg.log_every, eval_every=0, desc=f"{cfg.model.family} {cfg.stage}", progress=progress)
    algo.ema.copy_to(roles.generator_params)  # the final generator is the EMA one
    save_final(cfg, adapter, models, init_state)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return json.loads(lines[-1]) if lines else {}


@torch.no_grad()
def sample(cfg: DiffusersRunConfig, prompts: Sequence[str], out_dir: str | Path) -> list[Path]:
    """Few-step samples of the run's final generator (or of the untrained init with sample.weights:
    base) as PNG files plus index.jsonl (prompt of each file)."""
    from PIL import Image

    from tiltflow.flow.conventions import few_step_sigmas
    from tiltflow.sampling import NoisePlan
    from tiltflow.sampling import sample as run_sampler

    init_state = None if cfg.sample.weights == "base" else _read_final(cfg.run_dir)[0]
    if cfg.lora.finetune == "lora":  # one transformer suffices to sample: the LoRA sits on the shared base
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, layout="shared"))
    adapter, models = build_models(cfg, init_state)
    sampler = resolved_sampler(cfg, adapter)
    sigmas = few_step_sigmas(sampler.num_steps, sampler.shift)
    eta = sampler.eta if cfg.sample.eta is None else cfg.sample.eta
    shape = adapter.latent_shape(cfg.model.resolution, cfg.model.resolution)
    todo = [p for p in prompts for _ in range(cfg.sample.num_per_prompt)]
    g = torch.Generator().manual_seed(cfg.sample.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with (out / "index.jsonl").open("w") as index:
        for start in range(0, len(todo), cfg.sample.batch_size):
            batch = todo[start:start + cfg.sample.batch_size]
            cond = adapter.encode(batch)
            plan = NoisePlan.fresh(len(batch), shape, sampler.num_steps, g, device=adapter.device)
            x = run_sampler(lambda x, s, c=cond: models.generator_role.velocity(x, s, c), sigmas, plan, eta=eta).final
            images = (adapter.decode(x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for j, (prompt, img) in enumerate(zip(batch, images)):
                path = out / f"{start + j:05d}.png"
                Image.fromarray(img).save(path)
                index.write(json.dumps({"file": path.name, "prompt": prompt}) + "\n")
                paths.append(path)
    from tiltflow.eval.report import write_grid

    write_grid([str(p) for p in paths[:64]], out / "grid.png", captions=todo[:64])
    return paths


def cli_train(config: str | Path | None, overrides: Sequence[str], dry_run: bool = False) -> int:
    """`tiltflow train --config configs/<family>/<stage>.yaml [key=value ...]`."""
    cfg = load_run_config(config, overrides)
    if dry_run:
        print(to_yaml(cfg), end="")
        return 0
    metrics = train(cfg)
    print(f"{cfg.stage} finished in {cfg.run_dir}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                                   if isinstance(v, float)))
    return 0


def cli_sample(config: str | Path | None, overrides: Sequence[str], prompts: Sequence[str],
               out_dir: str | Path) -> int:
    """`tiltflow sample --config configs/<family>/sample.yaml --out DIR [--prompt P ...]`."""
    cfg = load_run_config(config, overrides)
    paths = sample(cfg, list(prompts) or read_prompts(cfg), out_dir)
    print(f"wrote {len(paths)} images, index.jsonl and a captioned grid.png to {out_dir}")
    return 0
