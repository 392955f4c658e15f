"""A small conditional velocity MLP: the analytic world's teacher, generator and fake score."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SigmaEmbedding(nn.Module):
    """Fixed Fourier features of sigma in [0, 1]."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sigma embedding dim must be even, got {dim}")
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, sigma: Tensor) -> Tensor:
        ang = sigma[:, None] * self.freqs[None, :]
        return torch.cat([ang.sin(), ang.cos()], dim=1)


class VelocityMLP(nn.Module):
    """v(x, sigma, c) for x in R^d and a class condition c in 0..num_prompts (num_prompts = no prompt)."""

    def __init__(self, dim: int, num_prompts: int, hidden: int = 256, depth: int = 4, embed: int = 64):
        super().__init__()
        self.dim, self.num_prompts = dim, num_prompts
        self.sigma_embed = SigmaEmbedding(embed)
        self.cond_embed = nn.Embedding(num_prompts + 1, embed)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * embed, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        h = torch.cat([x, self.sigma_embed(sigma.to(x.dtype)), self.cond_embed(cond)], dim=1)
        return self.net(h)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        return self(x, sigma, cond)
