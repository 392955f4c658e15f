"""How much of a stage-2 policy-gradient step is signal (issue 9): the GRPO gradient of K independent rollout
batches from one generator, and from them the size of its mean against its noise (`--term bp`: the same for the
reward back-propagation term, for comparison).

With g_1..g_K the generator's policy-gradient gradients of K independent batches of n samples each (same
parameters), the mean gradient mu and the per-batch noise covariance Sigma are estimated without bias by

    |mu|^2   = mean over pairs i != j of g_i . g_j
    tr Sigma = mean over i of |g_i|^2 - |mu|^2

so one batch's gradient is signal-to-noise |mu|^2 / tr Sigma, and a batch of n* = n tr Sigma / |mu|^2 samples
would make the mean as large as the noise (SNR 1). Also printed: the mean cosine between two batches' gradients.

    python benchmarks/shapes_pg_snr.py --batches 12 --out RESULT.json

The generator is the stage-2 start: `--config` (a shapes stage-2 config; its rewards, advantages and SubGRPO
settings) with `init_from` = `--run` (default the committed AC-DMD student), its fresh LoRA still zero.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch


def from_gram(gram: torch.Tensor) -> dict[str, float]:
    """|mu|^2, tr Sigma (per batch), their ratio and the mean pairwise cosine from the K x K Gram matrix of K >= 2
    gradient vectors."""
    k = gram.shape[0]
    off = gram[~torch.eye(k, dtype=torch.bool)]
    mu2 = float(off.mean())
    trace = float(gram.diagonal().mean()) - mu2
    norms = gram.diagonal().sqrt()
    cos = off / (norms[:, None] * norms[None, :])[~torch.eye(k, dtype=torch.bool)]
    return {"mean_sq": mu2, "noise_trace": trace, "snr_per_batch": mu2 / trace if trace > 0 else float("nan"),
            "mean_pairwise_cosine": float(cos.mean()), "batches": float(k)}


def gram_of(grads: list[torch.Tensor]) -> torch.Tensor:
    """The K x K matrix of the gradients' dot products, in float64."""
    g = torch.stack([x.double() for x in grads])
    return g @ g.T


def snr_of_gram(gram: torch.Tensor) -> dict[str, float]:
    """from_gram, plus (K >= 3) the jackknife standard error of snr_per_batch over batches."""
    out = from_gram(gram)
    k = gram.shape[0]
    if k >= 3:
        keep = [[j for j in range(k) if j != i] for i in range(k)]
        loo = torch.tensor([from_gram(gram[idx][:, idx])["snr_per_batch"] for idx in keep], dtype=torch.float64)
        out["snr_per_batch_jackknife_se"] = float(((k - 1) / k * ((loo - loo.mean()) ** 2).sum()).sqrt())
    return out


def signal_and_noise(grads: list[torch.Tensor]) -> dict[str, float]:
    """snr_of_gram of the gradients' Gram matrix."""
    return snr_of_gram(gram_of(grads))


def main(argv: list[str] | None = None) -> int:
    from shapes_common import stage2_start, write_result

    from tiltflow.algorithms.rtdmd import RTDMD
    from tiltflow.flow.rng import streams
    from tiltflow.training.spine import build_train_state

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/shapes/grpo_partial.yaml"))
    p.add_argument("--run", type=Path, default=Path("checkpoints/shapes/ac_dmd_s0"), help="the stage-1 run")
    p.add_argument("--batches", type=int, default=12, help="independent rollout batches (K >= 2)")
    p.add_argument("--term", choices=["pg", "bp"], default="pg", help="the policy-gradient term (default) or, for "
                   "comparison, the reward back-propagation term through the last step (a differentiable reward)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here too")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. stage2.group_size=16")
    args = p.parse_args(argv)
    if args.batches < 2:
        p.error(f"--batches must be at least 2, got {args.batches}")
    cfg, setup = stage2_start(args.config, args.run, args.device, args.seed, args.overrides)
    roles = setup.models.roles()
    algo = RTDMD(cfg.stage2, setup.sampler, setup.task, roles, build_train_state(cfg.stage2, roles), seed=cfg.seed)
    params = [q for q in roles.generator_params if q.requires_grad]
    grads = []
    for it in range(args.batches):
        ro = algo.rollout(it, streams(cfg.seed, it, "stage2"))
        scores = setup.task.rewards(setup.task.decode(ro.traj.final), ro.batch.prompts)
        for q in params:
            q.grad = None
        if args.term == "pg":
            algo.policy_loss(ro, algo.advantages(ro, scores)).loss.backward()
        else:
            algo.reward_bp_term(algo.last_step(ro), ro.batch.prompts).loss.backward()
        grads.append(torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1)
                                for q in params]).detach().clone())
        print(f"batch {it + 1}/{args.batches}: |g| {grads[-1].norm():.3e}", flush=True)
    n = cfg.stage2.num_prompts * cfg.stage2.group_size
    gram = gram_of(grads)  # every estimate below reads this one matrix
    stats = snr_of_gram(gram)
    stats["samples_per_batch"] = float(n)
    # None: no signal measurable in K batches (the estimate of |mu|^2 came out <= 0)
    stats["samples_for_snr_1"] = n / stats["snr_per_batch"] if stats["snr_per_batch"] > 0 else None
    k, half = len(grads), len(grads) // 2
    halves = [snr_of_gram(gram[i:j, i:j]) for i, j in ((0, half), (half, k))] if k >= 4 else []
    print(json.dumps(stats), flush=True)
    write_result(args.out, {"config": str(args.config), "generator": str(args.run), "term": args.term,
                            "overrides": args.overrides, **stats,
                            "halves_snr_per_batch": [h["snr_per_batch"] for h in halves] or None,  # its stability
                            "pairs": len(list(itertools.combinations(range(len(grads)), 2))), "gram": gram.tolist()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
