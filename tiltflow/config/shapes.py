"""The `shapes` world's run config (WORLDS.md 2): the world's own models (text encoder, pixel-space SD3
teacher, CLIP reward model) and how the `teacher` stage trains them; and, for the distillation stages,
where those models live, the LoRA roles, the prompts, the rewards and the evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tiltflow.config.diffusers import TextToImageRunConfig
from tiltflow.config.schema import join_path, require, require_lr, require_min


@dataclass
class ShapesModelSpec:
    """Sizes of the world's models. The teacher is a diffusers SD3Transformer2DModel on pixels (3 channels)."""

    resolution: int = 32  # 32, or 64
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    clip_hidden: int = 64  # reward model: vision and text widths
    clip_layers: int = 2
    clip_heads: int = 2
    clip_patch: int = 4
    clip_projection: int = 64

    def validate(self, path: str) -> None:
        require(self.resolution in (32, 64), join_path(path, "resolution"), f"got {self.resolution}, expected 32 or 64")
        require(self.resolution % (self.patch_size * 2) == 0, join_path(path, "patch_size"),
                f"{self.resolution} is not a multiple of 2 x patch_size {self.patch_size}")
        require(self.resolution % self.clip_patch == 0, join_path(path, "clip_patch"),
                f"{self.resolution} is not a multiple of {self.clip_patch}")
        require_min(self, path, 1, "num_layers", "num_heads", "head_dim", "text_hidden", "text_layers", "text_heads",
                    "clip_hidden", "clip_layers", "clip_heads", "clip_projection")
        require(self.text_hidden % self.text_heads == 0, join_path(path, "text_heads"), "must divide text_hidden")
        require(self.clip_hidden % self.clip_heads == 0, join_path(path, "clip_heads"), "must divide clip_hidden")


@dataclass
class TeacherTrainSpec:
    """Flow matching (METHOD.md 1) on rendered images with caption dropout (the empty caption) for CFG."""

    num_iters: int = 20000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_iters: int = 500
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    num_images: int = 100000  # rendered once into the run directory (data.npy), cycled through
    time_limit_s: float = 540.0  # one call stops (after a checkpoint) past this; call again to resume
    # At the time limit: "pause" (checkpoint; the next call resumes) or "finish" (also export the EMA teacher
    # as it stands, so one call always yields a teacher; num_iters is then an upper bound).
    on_time_limit: Literal["pause", "finish"] = "pause"
    checkpoint_every: int = 1000
    log_every: int = 100
    # A teacher folder (a diffusers SD3Transformer2DModel of the same sizes, e.g. checkpoints/shapes/teacher) to
    # start from instead of a fresh initialisation: more training for a committed teacher whose optimiser state
    # was not kept. Model and EMA start from its weights, the optimiser and the warm-up afresh, at step 0. Checked
    # when the teacher trains (not at config load: a finished run's config.yaml still loads elsewhere).
    init_from: str | None = None

    def validate(self, path: str) -> None:
        require_lr(self.lr, join_path(path, "lr"))
        require(0 <= self.caption_dropout < 1, join_path(path, "caption_dropout"), "expected in [0, 1)")
        require(0 < self.ema_decay < 1, join_path(path, "ema_decay"), "expected in (0, 1)")
        require_min(self, path, 1, "num_iters", "batch_size", "num_images", "checkpoint_every", "log_every")
        require(self.time_limit_s > 0, join_path(path, "time_limit_s"), "expected > 0")


@dataclass
class RewardModelTrainSpec:
    """Contrastive CLIP training on rendered (image, caption) pairs plus hard-negative captions."""

    num_iters: int = 3000
    batch_size: int = 256
    lr: float = 5e-4
    num_hard_negatives: int = 3  # per image: wrong colour, count, shape or position
    num_images: int = 50000
    checkpoint_every: int = 500
    log_every: int = 100

    def validate(self, path: str) -> None:
        require_lr(self.lr, join_path(path, "lr"))
        require_min(self, path, 1, "num_iters", "batch_size", "num_images", "checkpoint_every", "log_every")
        require_min(self, path, 0, "num_hard_negatives")


@dataclass
class ShapesRewardChoice:
    """'clip' (the trained reward model through CLIPScore, differentiable), 'verifier' (pass = 1, not) or
    'verifier_partial' (the fraction of the caption's checks met, 1 exactly on a pass; not differentiable)."""

    name: Literal["clip", "verifier", "verifier_partial"] = "clip"
    weight: float = 1.0


@dataclass
class ShapesEvalSpec:
    every: int = 0  # steps between evaluations during distillation (0: only at the end)
    num_per_prompt: int = 2
    prompt_set: Literal["train", "test"] = "test"
    max_prompts: int = 0  # 0: all prompts of the set
    teacher_steps: int = 50  # the teacher's many-step sampler (Euler, CFG)
    batch_size: int = 64


@dataclass
class ShapesRunConfig(TextToImageRunConfig):
    world: Literal["shapes"] = "shapes"
    run_dir: str = "runs/shapes/default"
    device: str = "cpu"
    models_dir: str | None = None  # the teacher stage's run directory (text_encoder/, teacher/, reward_model/)
    model: ShapesModelSpec = field(default_factory=ShapesModelSpec)
    teacher: TeacherTrainSpec = field(default_factory=TeacherTrainSpec)
    reward_model: RewardModelTrainSpec = field(default_factory=RewardModelTrainSpec)
    guidance_scale: float = 3.0  # the teacher's CFG scale inside distillation and in its many-step samples
    prompt_set: Literal["train", "test"] = "train"  # the prompts the distillation draws from (or prompt_file)
    rewards: list[ShapesRewardChoice] = field(default_factory=lambda: [ShapesRewardChoice()])
    eval: ShapesEvalSpec = field(default_factory=ShapesEvalSpec)

    def validate(self, path: str) -> None:
        super().validate(path)
        require(self.stage == "teacher" or bool(self.models_dir), "models_dir", f"stage {self.stage!r} needs the "
                "teacher stage's run directory (it holds text_encoder/, teacher/ and reward_model/)")
        require(self.guidance_scale >= 0, "guidance_scale", f"got {self.guidance_scale}, expected >= 0")
        names = [r.name for r in self.rewards]
        require(len(set(names)) == len(names), "rewards", f"got {names}, expected each reward once")
        require(bool(names), "rewards", "expected at least one reward")
        if self.stage != "teacher":
            self.check_reward_bp("clip" in names, "rewards")
