"""Group-relative advantages and SubGRPO step selection (METHOD.md 5.2-5.3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def _group_mean(x: Tensor, group: Tensor, num_groups: int) -> Tensor:
    sums = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, group, x)
    counts = torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, group, torch.ones_like(x))
    return (sums / counts)[group]


def group_advantages(rewards: Mapping[str, Tensor], weights: Mapping[str, float], group: Tensor, *,
                     mode: str = "normalized", clip: float | None = 5.0, eps: float = 1e-4) -> Tensor:
    """Advantages (B,) for samples whose group index is `group` (B,) (values 0 .. num_groups - 1).

    normalized: per reward (r - group mean) / (batch std + eps), weighted sum, re-standardised over the
      batch, clipped to [-clip, clip].
    raw: sum_i w_i (r_i - mean of the OTHER members of the group). The leave-one-out mean keeps the
      estimator unbiased: with the plain group mean, E[A grad log pi] is (G - 1)/G of the true gradient.
    """
    if mode not in ("normalized", "raw"):
        raise ValueError(f"advantage mode must be 'normalized' or 'raw', got {mode!r}")
    num_groups = int(group.max()) + 1
    sizes = torch.bincount(group, minlength=num_groups).to(next(iter(rewards.values())).dtype)[group]
    if bool((sizes < 2).any()):
        raise ValueError("group advantages need at least 2 samples per group")
    terms = []
    for name, r in rewards.items():
        centred = r - _group_mean(r, group, num_groups)
        if mode == "normalized":
            a = centred / (r.std() + eps) if r.numel() > 1 else centred
        else:
            a = centred * sizes / (sizes - 1)
        terms.append(weights[name] * a)
    total = sum(terms[1:], terms[0])  # in reward order, from the first term (not from 0)
    if mode == "normalized":
        std = total.std()
        total = (total - total.mean()) / (std + eps)
        if clip is not None:
            total = total.clamp(-clip, clip)
    return total.detach()


def subgrpo_steps(num_stochastic: int, num_trained: int, generator: torch.Generator) -> list[int]:
    """Choose which stochastic steps get the policy-gradient term this iteration (same on every rank
    when the generator is seeded from (seed, iteration))."""
    if not 1 <= num_trained <= num_stochastic:
        raise ValueError(f"num_trained_steps must lie in [1, {num_stochastic}], got {num_trained}")
    perm = torch.randperm(num_stochastic, generator=generator)
    return sorted(int(i) for i in perm[:num_trained])


def group_index(num_prompts: int, group_size: int, device: torch.device | str = "cpu") -> Tensor:
    """[0]*G + [1]*G + ...: the group of each sample when each prompt is repeated G times."""
    return torch.arange(num_prompts, device=device).repeat_interleave(group_size)


__all__: Sequence[str] = ["group_advantages", "group_index", "subgrpo_steps"]
