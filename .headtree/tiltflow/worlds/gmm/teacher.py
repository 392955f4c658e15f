"""The neural teacher of the analytic world: a VelocityMLP trained by flow matching on samples of
p(x | c), with condition dropout so that CFG is available (WORLDS.md 1)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from tiltflow.config.gmm import ModelConfig, TeacherConfig
from tiltflow.flow.conventions import interpolate
from tiltflow.flow.rng import step_generator
from tiltflow.models.mlp import VelocityMLP
from tiltflow.worlds.gmm.mixture import ConditionalGMM


def make_mlp(dim: int, num_prompts: int, cfg: ModelConfig) -> VelocityMLP:
    return VelocityMLP(dim, num_prompts, hidden=cfg.hidden, depth=cfg.depth, embed=cfg.embed)


def train_teacher(gmm: ConditionalGMM, cfg: TeacherConfig, model_cfg: ModelConfig, seed: int,
                  progress: bool = True) -> tuple[VelocityMLP, list[tuple[int, float]]]:
    """Flow matching: x_sigma = (1 - sigma) x0 + sigma eps, regress v on eps - x0. Returns (model, losses)."""
    torch.manual_seed(seed)
    model = make_mlp(gmm.dim, gmm.num_prompts, model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, cfg.train_steps) / max(cfg.train_steps, 1))))
    gmm32 = gmm.to(torch.float32)
    curve: list[tuple[int, float]] = []
    for it in tqdm(range(cfg.train_steps), desc="teacher", disable=None if progress else True, leave=False):
        g = step_generator(seed, it, "teacher")
        cond = torch.randint(gmm.num_prompts, (cfg.batch_size,), generator=g)
        x0, _ = gmm32.sample(cond, g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_dropout
        cond = torch.where(drop, torch.full_like(cond, gmm.num_prompts), cond)
        # Unconditional rows must see data from the unconditional mixture: the uniform mixture over
        # prompts, which a randomly drawn prompt's sample already is.
        sigma = torch.rand(cfg.batch_size, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = ((model(interpolate(x0, eps, sigma), sigma, cond) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if it % 100 == 0 or it == cfg.train_steps - 1:
            curve.append((it + 1, float(loss.detach())))
    model.requires_grad_(False)
    return model.eval(), curve
