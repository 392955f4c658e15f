"""The `gmm` world's run config: the problem (a conditional Gaussian mixture and its rewards), the
velocity MLP, the neural teacher and the evaluation against the exact reward-tilted target (WORLDS.md 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from tiltflow.config.loader import ConfigError
from tiltflow.config.schema import RunConfig, join_path, require, require_lr, require_min, resolve_tilt_estimator


@dataclass
class PromptSpec:
    """One prompt (condition) of the analytic world: a Gaussian mixture in R^dim."""

    weights: list[float] = field(default_factory=list)
    means: list[list[float]] = field(default_factory=list)
    covs: list[list[list[float]]] = field(default_factory=list)

    def validate(self, path: str) -> None:
        k = len(self.weights)
        require(k > 0, join_path(path, "weights"), "need at least one mixture component")
        require(all(w > 0 for w in self.weights), join_path(path, "weights"), f"got {self.weights}, expected all > 0")
        require(len(self.means) == k, join_path(path, "means"),
               f"got {len(self.means)} means, expected {k} (one per weight)")
        require(len(self.covs) == k, join_path(path, "covs"), f"got {len(self.covs)} covariances, expected {k}")
        for i, c in enumerate(self.covs):
            p = f"{join_path(path, 'covs')}[{i}]"
            try:
                t = torch.tensor(c, dtype=torch.float64)
            except ValueError:  # ragged rows
                raise ConfigError(p, f"got {c}, expected a square matrix") from None
            require(t.ndim == 2 and t.shape[0] == t.shape[1], p, f"got shape {tuple(t.shape)}, expected square")
            require(bool(torch.allclose(t, t.T)), p, "covariance is not symmetric")
            require(bool(torch.linalg.eigvalsh(t).min() > 0), p, f"covariance {c} is not positive definite")


@dataclass
class RewardSpec:
    """linear: r = a.x; quadratic: r = -(x-b).A(x-b)/2; halfspace: r = 1[a.x >= c] (not differentiable);
    tanh: r = tanh(a.x - c) (bounded, differentiable)."""

    type: Literal["linear", "quadratic", "halfspace", "tanh"] = "linear"
    weight: float = 1.0
    a: list[float] | None = None
    A: list[list[float]] | None = None
    b: list[float] | None = None
    c: float = 0.0

    def validate(self, path: str) -> None:
        if self.type in ("linear", "halfspace", "tanh"):
            require(self.a is not None, join_path(path, "a"), f"reward type {self.type!r} needs a vector 'a'")
        if self.type == "quadratic":
            require(self.A is not None and self.b is not None, path, "quadratic reward needs 'A' and 'b'")
            t = torch.tensor(self.A, dtype=torch.float64)
            require(t.ndim == 2 and t.shape[0] == t.shape[1], join_path(path, "A"),
                    f"got shape {tuple(t.shape)}, expected a square matrix")
            require(bool(torch.allclose(t, t.T)) and bool(torch.linalg.eigvalsh(t).min() >= 0),
                    join_path(path, "A"), "must be symmetric positive semi-definite")


@dataclass
class ProblemSpec:
    dim: int = 2
    prompts: list[PromptSpec] = field(default_factory=list)
    rewards: list[RewardSpec] = field(default_factory=list)

    def validate(self, path: str) -> None:
        require(self.dim >= 1, join_path(path, "dim"), f"got {self.dim}, expected >= 1")
        require(len(self.prompts) >= 1, join_path(path, "prompts"), "need at least one prompt")
        for i, p in enumerate(self.prompts):
            pp = f"{join_path(path, 'prompts')}[{i}]"
            for j, m in enumerate(p.means):
                require(len(m) == self.dim, f"{pp}.means[{j}]", f"got length {len(m)}, expected dim = {self.dim}")
            for j, c in enumerate(p.covs):
                require(len(c) == self.dim, f"{pp}.covs[{j}]", f"got {len(c)} rows, expected dim = {self.dim}")
        require(len(self.rewards) >= 1, join_path(path, "rewards"), "need at least one reward")
        for i, r in enumerate(self.rewards):
            rp = f"{join_path(path, 'rewards')}[{i}]"
            for name in ("a", "b"):
                vec = getattr(r, name)
                if vec is not None:
                    require(len(vec) == self.dim, f"{rp}.{name}", f"got length {len(vec)}, expected dim = {self.dim}")
            if r.A is not None:
                shape = (len(r.A), *{len(row) for row in r.A})
                require(shape == (self.dim, self.dim), f"{rp}.A",
                       f"got shape {shape}, expected (dim, dim) with dim = {self.dim}")


@dataclass
class ModelConfig:
    hidden: int = 256
    depth: int = 4
    embed: int = 64


@dataclass
class TeacherConfig:
    kind: Literal["neural", "analytic"] = "neural"
    guidance_scale: float = 1.0
    train_steps: int = 4000
    batch_size: int = 2048
    lr: float = 2e-3
    cond_dropout: float = 0.1
    sample_steps: int = 64  # many-step teacher sampler (Euler, eta = 0)

    def validate(self, path: str) -> None:
        require_min(self, path, 0, "guidance_scale")
        require_lr(self.lr, join_path(path, "lr"))
        require(0 <= self.cond_dropout < 1, join_path(path, "cond_dropout"), "expected a value in [0, 1)")



@dataclass
class EvalConfig:
    num_samples: int = 4000
    every: int = 100
    reference_pool: int = 200000
    curve_samples: int = 1000
    plots: bool = True  # samples.png and curves.png in every stage's run directory


@dataclass
class GMMRunConfig(RunConfig):
    world: Literal["gmm"] = "gmm"
    teacher_run: str | None = None  # a run directory holding the trained neural teacher
    problem: ProblemSpec = field(default_factory=ProblemSpec)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, path: str) -> None:
        super().validate(path)
        self.check_reward_bp(any(r.type != "halfspace" for r in self.problem.rewards), "problem.rewards")
        if self.stage2.dm_target == "tilted":
            # 'auto' is resolved here, so the run directory's config.yaml names the estimator that ran.
            rewards = self.problem.rewards
            types = ", ".join(r.type for r in rewards)
            self.stage2.tilt_estimator = resolve_tilt_estimator(  # type: ignore[assignment]
                self.stage2.tilt_estimator, linear=all(r.type == "linear" for r in rewards),
                differentiable=all(r.type != "halfspace" for r in rewards), rewards=f"problem.rewards ({types})")
