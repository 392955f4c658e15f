"""How different the samples of one stage-2 group are, drawn the way a rollout draws them (issue 9).

A stage-2 rollout (METHOD.md 5.2, SubGRPO) gives the G samples of a prompt the same initial noise and the same noise
on the stochastic steps it does not train this iteration; only the trained steps get fresh noise per sample. So the
differences inside a group, which are all the policy gradient sees, come from those steps alone.
`benchmarks/shapes_group_signal.py` measured groups of independent samples (`tiltflow sample`); this measures both
ways side by side, from the same generator and captions: for each, how many groups the pass/fail verifier and the
graded score (verifier_partial) separate, and the spread of the graded score inside a group against across groups.

    python benchmarks/shapes_rollout_spread.py --captions benchmarks/results/shapes_group_signal_captions.txt \\
        --out RESULT.json

The generator is the stage-2 start: `--config` (a shapes stage-2 config) with `init_from` = `--run` (default the
committed AC-DMD student), its fresh LoRA still zero; sampler and num_trained_steps from the config.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def group_stats(verdicts: np.ndarray, graded: np.ndarray) -> dict[str, float]:
    """Per-group statistics of (groups, G) pass/fail verdicts and graded scores."""
    within = graded.std(axis=1)
    return {"groups": float(len(graded)), "all_fail": float((verdicts.max(axis=1) == 0).sum()),
            "pass_fail_spread": float((verdicts.std(axis=1) > 0).sum()),
            "graded_spread": float((within > 0).sum()),
            "graded_within_group_std": float(within.mean()),
            "graded_across_group_std": float(graded.mean(axis=1).std()),
            "pass_rate": float(verdicts.mean()), "graded_mean": float(graded.mean())}


def draw_groups(velocity: Callable[[Any], Callable], sigmas: Any, shape: tuple[int, ...], prompts: list[str],
                group: int, mode: str, num_trained: int, eta: float, seed: int, decode: Callable) -> np.ndarray:
    """uint8 images (P*G, H, W, 3) of `group` samples per prompt, noise as a rollout draws it (mode "rollout")
    or independent (mode "independent")."""
    from tiltflow.flow.rng import step_generator
    from tiltflow.losses import subgrpo_steps
    from tiltflow.sampling import NoisePlan, sample
    from tiltflow.worlds.shapes.verifier import to_uint8

    out = []
    for it, start in enumerate(range(0, len(prompts), 8)):  # 8 prompts a batch, as the shapes configs draw them
        chunk = [p for p in prompts[start:start + 8] for _ in range(group)]
        g = step_generator(seed, it, mode)
        if mode == "rollout":
            trained = set(subgrpo_steps(len(sigmas) - 2, num_trained, g))
            keys = [k // group for k in range(len(chunk))]
            plan = NoisePlan.subgrpo(keys, shape, len(sigmas) - 1, trained, g, seed=seed, iteration=it)
        else:
            plan = NoisePlan.fresh(len(chunk), shape, len(sigmas) - 1, g)
        with torch.no_grad():
            traj = sample(velocity(chunk), sigmas, plan, eta=eta)
        out.append(to_uint8(decode(traj.final)))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    from shapes_common import stage2_start, write_result

    from tiltflow.algorithms.common import Batch
    from tiltflow.flow.conventions import few_step_sigmas
    from tiltflow.worlds.shapes.scene import parse
    from tiltflow.worlds.shapes.verifier import check, detect, partial_credit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=Path, required=True, help="a caption file in the world's vocabulary")
    p.add_argument("--config", type=Path, default=Path("configs/shapes/rtdmd_partial.yaml"))
    p.add_argument("--run", type=Path, default=Path("checkpoints/shapes/ac_dmd_s0"), help="the stage-1 run")
    p.add_argument("--group", type=int, default=8, help="samples per caption (G)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here too")
    args = p.parse_args(argv)
    prompts = [line.strip() for line in args.captions.read_text().splitlines() if line.strip()]
    cfg, setup = stage2_start(args.config, args.run, args.device, args.seed)
    task, generator = setup.task, setup.models.roles().generator
    sigmas = few_step_sigmas(cfg.sampler.num_steps, cfg.sampler.shift)
    num_trained = cfg.stage2.num_trained_steps or cfg.sampler.num_steps - 1

    def velocity(chunk: list[str]) -> Callable:
        cond = Batch.of(task, chunk).cond
        return lambda x, sig: generator.velocity(x, sig, cond)

    result: dict[str, Any] = {}
    for mode in ("rollout", "independent"):
        images = draw_groups(velocity, sigmas, tuple(task.sample_shape), prompts, args.group, mode, num_trained,
                             cfg.sampler.eta, args.seed, task.decode)
        verdicts, graded = [], []
        for text, image in zip([q for q in prompts for _ in range(args.group)], images):
            scene, found = parse(text), detect(image)
            verdicts.append(float(check(scene, found).passed))
            graded.append(partial_credit(scene, found))
        shape = (len(prompts), args.group)
        stats = group_stats(np.array(verdicts).reshape(shape), np.array(graded).reshape(shape))
        pixels = images.reshape(*shape, -1).astype(np.float32) / 255
        stats["pixel_within_group_std"] = float(pixels.std(axis=1).mean())
        result[mode] = stats
        print(mode, json.dumps(stats), flush=True)
    write_result(args.out, {"captions": str(args.captions), "group_size": args.group, "generator": str(args.run),
                            "config": str(args.config), "num_trained_steps": num_trained, "eta": cfg.sampler.eta,
                            **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
