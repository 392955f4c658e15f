"""The real-backbone world's run config (WORLDS.md 3): which diffusers model, its LoRA roles, prompts,
rewards and sampling settings, on top of the shared RunConfig."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tiltflow.config.schema import RunConfig, require, require_min


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
    guidance_scale: float = 4.5  # the teacher's standard CFG scale; FLUX.1-dev: its guidance input (one pass)
    student_guidance: float | None = None  # FLUX.1-dev: guidance input of generator and fake (null = guidance_scale)
    family_shift: bool = True  # the sampler's shift is the family's (SD3: 3; FLUX: exp(mu) at this resolution)
    # Scaled-dot-product attention kernel: auto (the fastest that works for the family here: FLUX.1-dev
    # never gets cuDNN, whose backward fails on torch 2.11 / cuDNN 9.19), default, cudnn, flash, efficient, math.
    attention_backend: Literal["auto", "default", "cudnn", "flash", "efficient", "math"] = "auto"

    def validate(self, path: str) -> None:
        if self.random_weights:
            require(bool(self.arch), f"{path}.arch", "random_weights needs an architecture name (e.g. sd35_medium)")
        else:
            require(bool(self.source), f"{path}.source", "give a hub id or local folder, or set random_weights: true")
        require(self.resolution % 16 == 0, f"{path}.resolution", f"got {self.resolution}, expected a multiple of 16")
        require_min(self, path, 0, "guidance_scale")


@dataclass
class LoraSpec:
    layout: Literal["shared", "separate"] = "shared"
    finetune: Literal["lora", "full"] = "lora"
    rank: int = 32
    alpha: float = 64.0

    def validate(self, path: str) -> None:
        require(not (self.layout == "shared" and self.finetune == "full"), f"{path}.finetune",
                "full fine-tuning needs layout: separate")
        require_min(self, path, 1, "rank")


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
class TextToImageRunConfig(RunConfig):
    """What the text-to-image worlds' run configs (diffusers, shapes) share: the LoRA roles, a prompt file,
    the sampling settings, and their checkpoint and log defaults."""

    checkpoint_every: int = 100
    log_every: int = 1
    lora: LoraSpec = field(default_factory=LoraSpec)
    # One prompt per line. Diffusers: added to `prompts`; shapes: instead of prompt_set, captions in the world's
    # vocabulary.
    prompt_file: str | None = None
    sample: SampleSpec = field(default_factory=SampleSpec)


# Differentiability of the rewards the registry knows by name (None: a user factory, known once built).
_DIFFERENTIABLE = {"brightness": True, "clip_score": True, "pickscore": True, "hpsv2": True, "aesthetic": True,
                   "imagereward": False, "remote": False}


@dataclass
class DiffusersRunConfig(TextToImageRunConfig):
    world: Literal["diffusers"] = "diffusers"
    run_dir: str = "runs/diffusers"
    device: str = "cuda"
    model: ModelSpec = field(default_factory=ModelSpec)
    prompts: list[str] = field(default_factory=list)
    rewards: list[RewardChoice] = field(default_factory=lambda: [RewardChoice()])

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.stage != "teacher", "stage", "the diffusers world has no teacher stage: its teacher is the "
                "pretrained model.source; choose one of ac_dmd, dmd2, rtdmd, rtdmd_exact, grpo_only, bp_only, dm_bp")
        require(bool(self.prompts or self.prompt_file), "prompts",
                "give prompts (a list) or prompt_file (one prompt per line)")
        require(not self.model.family_shift or self.sampler.shift == 1.0, "sampler.shift", f"got {self.sampler.shift} "
                "while model.family_shift is true (the family's own shift is used); set model.family_shift: false "
                "to use sampler.shift")
        for i, c in enumerate(self.rewards):
            require(c.name in _DIFFERENTIABLE or ":" in c.name, f"rewards[{i}].name", f"unknown reward {c.name!r}; "
                    f"known: {', '.join(sorted(_DIFFERENTIABLE))}, or 'package.module:factory'")
        # A reward whose differentiability is unknown here (a user factory) is checked when it is built.
        known = [_DIFFERENTIABLE.get(c.name) for c in self.rewards]
        if all(k is not None for k in known):
            self.check_reward_bp(any(known), "rewards")
