"""The run config: nested strict dataclasses (see configs/gmm/*.yaml for annotated examples).

A `stage` selects the trainer and a preset of settings (STAGE_PRESETS); the file and dotted overrides
are applied on top of the preset, and the resolved config is saved with every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from tiltflow.config.loader import ConfigError


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(path, msg)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_lr(lr: float, path: str) -> None:
    _check(math.isfinite(lr) and lr > 0, path, f"got {lr}, expected a finite value > 0")


def _check_ema_decay(decay: float, path: str) -> None:
    _check(0 <= decay < 1, path, f"got {decay}, expected a value in [0, 1)")


@dataclass
class PromptSpec:
    """One prompt (condition) of the analytic world: a Gaussian mixture in R^dim."""

    weights: list[float] = field(default_factory=list)
    means: list[list[float]] = field(default_factory=list)
    covs: list[list[list[float]]] = field(default_factory=list)

    def validate(self, path: str) -> None:
        k = len(self.weights)
        _check(k > 0, _join(path, "weights"), "need at least one mixture component")
        _check(all(w > 0 for w in self.weights), _join(path, "weights"), f"got {self.weights}, expected all > 0")
        _check(len(self.means) == k, _join(path, "means"),
               f"got {len(self.means)} means, expected {k} (one per weight)")
        _check(len(self.covs) == k, _join(path, "covs"), f"got {len(self.covs)} covariances, expected {k}")
        for i, c in enumerate(self.covs):
            p = f"{_join(path, 'covs')}[{i}]"
            try:
                t = torch.tensor(c, dtype=torch.float64)
            except ValueError:  # ragged rows
                raise ConfigError(p, f"got {c}, expected a square matrix") from None
            _check(t.ndim == 2 and t.shape[0] == t.shape[1], p, f"got shape {tuple(t.shape)}, expected square")
            _check(bool(torch.allclose(t, t.T)), p, "covariance is not symmetric")
            _check(bool(torch.linalg.eigvalsh(t).min() > 0), p, f"covariance {c} is not positive definite")


@dataclass
class RewardSpec:
    """linear: r = a.x; quadratic: r = -(x-b).A(x-b)/2; halfspace: r = 1[a.x >= c] (not differentiable)."""

    type: Literal["linear", "quadratic", "halfspace"] = "linear"
    weight: float = 1.0
    a: list[float] | None = None
    A: list[list[float]] | None = None
    b: list[float] | None = None
    c: float = 0.0

    def validate(self, path: str) -> None:
        if self.type in ("linear", "halfspace"):
            _check(self.a is not None, _join(path, "a"), f"reward type {self.type!r} needs a vector 'a'")
        if self.type == "quadratic":
            _check(self.A is not None and self.b is not None, path, "quadratic reward needs 'A' and 'b'")
            t = torch.tensor(self.A, dtype=torch.float64)
            _check(bool(torch.allclose(t, t.T)) and bool(torch.linalg.eigvalsh(t).min() >= 0),
                   _join(path, "A"), "must be symmetric positive semi-definite")


@dataclass
class ProblemSpec:
    dim: int = 2
    prompts: list[PromptSpec] = field(default_factory=list)
    rewards: list[RewardSpec] = field(default_factory=list)

    def validate(self, path: str) -> None:
        _check(self.dim >= 1, _join(path, "dim"), f"got {self.dim}, expected >= 1")
        _check(len(self.prompts) >= 1, _join(path, "prompts"), "need at least one prompt")
        for i, p in enumerate(self.prompts):
            pp = f"{_join(path, 'prompts')}[{i}]"
            for j, m in enumerate(p.means):
                _check(len(m) == self.dim, f"{pp}.means[{j}]", f"got length {len(m)}, expected dim = {self.dim}")
            for j, c in enumerate(p.covs):
                _check(len(c) == self.dim, f"{pp}.covs[{j}]", f"got {len(c)} rows, expected dim = {self.dim}")
        _check(len(self.rewards) >= 1, _join(path, "rewards"), "need at least one reward")
        for i, r in enumerate(self.rewards):
            rp = f"{_join(path, 'rewards')}[{i}]"
            for name in ("a", "b"):
                vec = getattr(r, name)
                if vec is not None:
                    _check(len(vec) == self.dim, f"{rp}.{name}", f"got length {len(vec)}, expected dim = {self.dim}")
            if r.A is not None:
                shape = (len(r.A), *{len(row) for row in r.A})
                _check(shape == (self.dim, self.dim), f"{rp}.A",
                       f"got shape {shape}, expected (dim, dim) with dim = {self.dim}")


@dataclass
class ModelConfig:
    hidden: int = 256
    depth: int = 4
    embed: int = 64


@dataclass
class TeacherConfig:
    kind: Literal["neural", "analytic"] = "neural"
    cfg_scale: float = 1.0
    train_steps: int = 4000
    batch_size: int = 2048
    lr: float = 2e-3
    cond_dropout: float = 0.1
    sample_steps: int = 64  # many-step teacher sampler (Euler, eta = 0)

    def validate(self, path: str) -> None:
        _check(self.cfg_scale >= 0, _join(path, "cfg_scale"), f"got {self.cfg_scale}, expected >= 0")
        _check_lr(self.lr, _join(path, "lr"))
        _check(0 <= self.cond_dropout < 1, _join(path, "cond_dropout"), "expected a value in [0, 1)")


@dataclass
class SamplerConfig:
    num_steps: int = 4
    shift: float = 1.0
    eta: float = 0.9

    def validate(self, path: str) -> None:
        _check(self.num_steps >= 2, _join(path, "num_steps"), f"got {self.num_steps}, expected >= 2")
        _check(self.shift > 0, _join(path, "shift"), f"got {self.shift}, expected > 0")
        _check(0 <= self.eta <= 1, _join(path, "eta"), f"got {self.eta}, expected a value in [0, 1]")


@dataclass
class FakeConfig:
    """Fake-score objective (METHOD.md 4.2-4.3)."""

    lr: float = 1e-3
    weighting: Literal["none", "clamped"] = "none"
    consistency_gamma: float = 0.01
    consistency_delta_max: float = 0.2
    consistency_two_sample: bool = True

    def validate(self, path: str) -> None:
        _check_lr(self.lr, _join(path, "lr"))


@dataclass
class Stage1Config:
    """AC-DMD (METHOD.md 4); DMD2-style is eta = 1, subinterval = false, consistency_gamma = 0."""

    num_iters: int = 1500
    batch_size: int = 1024
    lr: float = 3e-4
    n_fake: int = 5
    ema_decay: float = 0.99
    grad_clip: float = 1.0
    subinterval: bool = True
    delta: float = 0.01
    tau_min: float = 0.02
    tau_max: float = 0.98
    fake: FakeConfig = field(default_factory=FakeConfig)

    def validate(self, path: str) -> None:
        _check(self.num_iters >= 0, _join(path, "num_iters"), "expected >= 0")
        _check(self.n_fake >= 1, _join(path, "n_fake"), f"got {self.n_fake}, expected >= 1")
        _check_lr(self.lr, _join(path, "lr"))
        _check_ema_decay(self.ema_decay, _join(path, "ema_decay"))
        _check(0 < self.tau_min < self.tau_max <= 1, path, f"need 0 < tau_min < tau_max <= 1, got "
               f"{self.tau_min}, {self.tau_max}")


@dataclass
class Stage2Config:
    """Joint DM + reward (METHOD.md 5). w_pg / w_bp = null mean beta (the exact tilt weighting)."""

    mode: Literal["reference", "exact"] = "reference"
    beta: float = 1.0
    num_iters: int = 600
    num_prompts: int = 32
    group_size: int = 16
    accumulation: int = 1
    num_trained_steps: int = 2  # SubGRPO: stochastic steps with a policy-gradient term; 0 = all of them
    w_dm: float = 0.001
    w_pg: float | None = 1.0
    w_bp: float | None = 1e-4
    advantage: Literal["normalized", "raw"] = "normalized"
    adv_clip: float = 5.0
    ppo_clip: float | None = 1e-5
    logprob_reduction: Literal["sum", "mean"] = "mean"
    bp_loss: Literal["hinge", "linear"] = "hinge"
    bp_margin: float = 3.0
    dm_depth: int = 1  # steps the DM gradient flows back through: 1 = last step (reference), 0 = whole chain
    dm_scaling: Literal["normalized", "kl", "fisher"] = "normalized"
    # How the DM surrogate reduces over dimensions: "mean" over every element (reference) or "sum" over
    # dimensions, mean over the batch (the KL and the log-probs are sums over dimensions, so the exact mode's
    # terms keep their relative size at any dimension). The "kl" scaling is always summed.
    dm_reduction: Literal["mean", "sum"] = "mean"
    dm_tau_min: float = 0.02
    dm_tau_max: float = 0.98
    n_fake: int = 1
    lr: float = 3e-6
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.9
    ema_every: int = 8
    fake: FakeConfig = field(default_factory=FakeConfig)

    def validate(self, path: str) -> None:
        _check(self.beta > 0, _join(path, "beta"), f"got {self.beta}, expected > 0")
        _check(self.group_size >= 2, _join(path, "group_size"),
               f"got {self.group_size}, expected >= 2 (group-relative advantages need a group; with std "
               "normalisation a group of 1 has no spread)")
        _check(self.num_prompts >= 1, _join(path, "num_prompts"), "expected >= 1")
        _check(self.accumulation >= 1, _join(path, "accumulation"), f"got {self.accumulation}, expected >= 1")
        _check(self.ema_every >= 1, _join(path, "ema_every"), f"got {self.ema_every}, expected >= 1")
        _check_lr(self.lr, _join(path, "lr"))
        _check_ema_decay(self.ema_decay, _join(path, "ema_decay"))
        _check(self.dm_depth >= 0, _join(path, "dm_depth"), f"got {self.dm_depth}, expected >= 0 (0 = whole chain)")
        _check(self.num_trained_steps >= 0, _join(path, "num_trained_steps"),
               f"got {self.num_trained_steps}, expected >= 0 (0 = every stochastic step)")
        _check(0 < self.dm_tau_min < self.dm_tau_max <= 1, path,
               f"need 0 < dm_tau_min < dm_tau_max <= 1, got {self.dm_tau_min}, {self.dm_tau_max}")
        for name in ("w_dm", "w_pg", "w_bp"):
            w = getattr(self, name)
            _check(w is None or w >= 0, _join(path, name), f"got {w}, expected >= 0 or null (= beta)")

    def weights(self) -> tuple[float, float, float]:
        """(w_dm, w_pg, w_bp) with null resolved to beta."""
        return (self.w_dm, self.beta if self.w_pg is None else self.w_pg, self.beta if self.w_bp is None else self.w_bp)


@dataclass
class EvalConfig:
    num_samples: int = 4000
    every: int = 100
    reference_pool: int = 200000
    curve_samples: int = 1000
    plots: bool = True  # samples.png and curves.png in every stage's run directory


@dataclass
class RunConfig:
    stage: Literal["teacher", "ac_dmd", "dmd2", "rtdmd", "rtdmd_exact", "grpo_only", "bp_only", "dm_bp"] = "ac_dmd"
    world: Literal["gmm"] = "gmm"
    seed: int = 0
    run_dir: str = "runs/default"
    init_from: str | None = None  # a run directory whose final checkpoint initialises this stage
    teacher_run: str | None = None  # a run directory holding the trained neural teacher
    device: str = "cpu"
    checkpoint_every: int = 200
    log_every: int = 25
    problem: ProblemSpec = field(default_factory=ProblemSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, path: str) -> None:
        for name in ("checkpoint_every", "log_every"):
            _check(getattr(self, name) >= 1, name, f"got {getattr(self, name)}, expected >= 1")
        if self.stage in STAGE2_STAGES:
            k, s2 = self.sampler.num_steps, self.stage2
            _check(s2.num_trained_steps <= k - 1, "stage2.num_trained_steps",
                   f"got {s2.num_trained_steps}, expected <= sampler.num_steps - 1 = {k - 1} (the stochastic steps)")
            _check(s2.dm_depth <= k, "stage2.dm_depth", f"got {s2.dm_depth}, expected <= sampler.num_steps = {k}")
        if self.stage2.mode == "exact" and self.stage in ("rtdmd", "rtdmd_exact"):
            _check(self.stage2.advantage == "raw", "stage2.advantage", "exact mode needs 'raw' advantages")
            _check(self.stage2.ppo_clip is None, "stage2.ppo_clip", "exact mode uses no clipping (null)")


# Stage presets: applied before the file and the overrides (which win). Baselines of METHOD.md 6.
_EXACT = {"mode": "exact", "w_dm": 1.0, "w_pg": None, "w_bp": None, "advantage": "raw", "ppo_clip": None,
          "logprob_reduction": "sum", "bp_loss": "linear", "dm_depth": 0, "dm_scaling": "normalized",
          "dm_reduction": "sum", "num_trained_steps": 0}
STAGE_PRESETS: dict[str, dict] = {
    "dmd2": {"sampler": {"eta": 1.0}, "stage1": {"subinterval": False, "fake": {"consistency_gamma": 0.0}}},
    "rtdmd_exact": {"stage2": dict(_EXACT)},
    "grpo_only": {"stage2": {"w_dm": 0.0, "w_bp": 0.0}},
    "bp_only": {"stage2": {"w_dm": 0.0, "w_pg": 0.0}},
    "dm_bp": {"stage2": {"w_pg": 0.0}},
}
STAGE1_STAGES = ("ac_dmd", "dmd2")
STAGE2_STAGES = ("rtdmd", "rtdmd_exact", "grpo_only", "bp_only", "dm_bp")
