"""The demo's report: report.md with the comparison table, scatter plots of every method's samples
over the p_tilde density contours, and metric curves read from each method's metrics.jsonl."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import yaml

from tiltflow import __version__
from tiltflow.config.schema import RunConfig
from tiltflow.worlds.gmm.evaluate import Reference
from tiltflow.worlds.gmm.plots import metric_curves, scatter_over_density
from tiltflow.worlds.gmm.runs import read_curves
from tiltflow.worlds.gmm.world import build_gmm, exact_target

CURVE_KEYS = ["eval_reward_mean", "eval_mode_tv", "eval_energy_distance", "eval_energy_to_base"]
COLUMNS = ["reward_mean", "mode_tv", "energy_distance", "energy_to_base", "kl_estimate", "kl_base_estimate"]


def _extent(samples: list[torch.Tensor]) -> tuple[float, float, float, float]:
    pts = torch.cat(samples)
    lo, hi = pts.quantile(0.005, dim=0), pts.quantile(0.995, dim=0)
    pad = 0.15 * (hi - lo)
    return float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])


def _scatter(out: Path, cfg: RunConfig, samples: dict[str, list[torch.Tensor]], ref: Reference) -> list[str]:
    gmm = build_gmm(cfg.problem)
    files = []
    for c in range(gmm.num_prompts):
        base = gmm.mixture(c)
        tgt = exact_target(base, cfg.problem, cfg.stage2.beta) if cfg.problem.dim == 2 else None
        log_density = tgt.log_prob if tgt is not None else None
        panels = [("p_tilde (reference)", ref.prompts[c].target.numpy())]
        panels += [(name, s[c].numpy()) for name, s in samples.items()]
        path = out / f"samples_prompt{c}.png"
        scatter_over_density(path, panels, log_density, _extent([ref.prompts[c].target, ref.prompts[c].base]),
                             ncols=4, title=f"prompt {c}: samples over the p_tilde density (dims 0, 1)")
        files.append(path.name)
    return files


def _curves(out: Path, methods: list[str], summary: dict[str, float]) -> str | None:
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name in methods:
        path = out / name / "metrics.jsonl"
        if not path.exists():
            continue
        per = read_curves(path, CURVE_KEYS)
        if per:  # the teacher's own run logs training losses only
            curves[name] = per
    if not curves:
        return None
    groups = _stage_groups(out, curves)
    lo, hi = sorted((summary["reward_base"], summary["reward_target"]))
    span = hi - lo
    refs = {"eval_reward_mean": summary["reward_target"], "eval_energy_distance": summary["energy_noise_floor"]}
    ylims = {"eval_reward_mean": (lo - span, hi + span), "eval_mode_tv": (0.0, 1.0),
             "eval_energy_distance": (0.0, 2 * summary["energy_base"]),
             "eval_energy_to_base": (0.0, 2 * summary["energy_base"])}
    metric_curves(out / "curves.png", curves, CURVE_KEYS, references=refs, ylims=ylims, groups=groups)
    return "curves.png"


def _stage_groups(out: Path, curves: dict[str, dict[str, list[tuple[float, float]]]]) -> dict[str, list[str]]:
    """One row of curve panels per stage, so runs of different lengths get their own step axis: a run whose
    config.yaml has no init_from distils the teacher (stage 1); one that starts from a student tilts it
    (stage 2). Runs of one stage with different lengths get separate rows too."""
    rows: dict[tuple[int, int], list[str]] = {}
    for name, per in curves.items():
        cfg_path = out / name / "config.yaml"
        tree = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
        stage = 2 if (tree or {}).get("init_from") else 1
        last = int(max((step for points in per.values() for step, _ in points), default=0))
        rows.setdefault((stage, last), []).append(name)
    kind = {1: "stage 1, distillation", 2: "stage 2, tilting"}
    return {f"{kind[st]} ({steps} steps)": names for (st, steps), names in sorted(rows.items())}


# Which rows target p_tilde exactly, in plain words (METHOD.md 5.6).
ROW_NOTES = {
    "teacher": "- teacher, teacher_4step, dmd2, ac_dmd: samplers of the untilted p (the teacher, or students "
               "distilled from it). They are not meant to reach p_tilde; they show where stage 2 starts.\n",
    "grpo_only": "- grpo_only, bp_only, dm_bp: the reward terms alone or DM plus reward back-propagation at the "
                 "reference weights. Not exact: no beta is realised; with an unbounded reward grpo_only and bp_only "
                 "run away.\n",
    "rtdmd_reference": "- rtdmd_reference: the paper's reference weights (DM toward the teacher at weight 0.001, "
                       "normalised GRPO advantages, a small reward back-propagation term). Not exact: beta enters "
                       "only implicitly, so it settles at some tilt of its own (on a bounded reward: at an "
                       "effective beta), and with an unbounded reward nothing holds it back.\n",
    "rtdmd_fullchain": "- rtdmd_fullchain: DM toward the teacher through the whole chain plus beta times the unbiased "
                       "reward gradient (what rtdmd_exact meant before 2026-12-02). Not exact: DM compares diffused "
                       "levels, so its fixed point over-tilts by a factor F (3.98 for a Gaussian of width 0.3 under "
                       "the score form) or, with the normalised DM direction, by a factor that depends on the data's "
                       "scale and dimension; it misses p_tilde.\n",
    "rtdmd_exact": "- rtdmd_exact: DM toward the diffused tilted target, the teacher's denoiser replaced by the tilted "
                   "one (no reward terms). Exact: p_tilde is its fixed point for any tau-weighting and "
                   "normalisation, up to the teacher's errors, the fake score's tracking and, for the "
                   "importance-sampling estimators, the posterior sampler's error.\n",
}


def write_report(out: Path, cfg: RunConfig, results: dict[str, dict[str, float]],
                 samples: dict[str, list[torch.Tensor]], ref: Reference, timings: dict[str, float],
                 total_s: float) -> Path:
    any_res = next(iter(results.values()))
    lines = ["# tiltflow demo: the gmm world", "",
             f"Problem: d = {cfg.problem.dim}, {len(cfg.problem.prompts)} prompts, rewards "
             f"{[r.type for r in cfg.problem.rewards]}, beta = {cfg.stage2.beta}, teacher = {cfg.teacher.kind}, "
             f"{cfg.sampler.num_steps}-step CPS sampler (eta = {cfg.sampler.eta}).", "",
             f"Targets: E_p_tilde[r] = {any_res['reward_target']:.4f}, E_p[r] = {any_res['reward_base']:.4f}; "
             f"energy distance p vs p_tilde = {any_res['energy_base']:.4f}; noise floor (two independent "
             f"p_tilde sets) = {any_res['energy_noise_floor']:.4f}; mode TV floor = "
             f"{any_res['mode_tv_noise_floor']:.4f}; KL floor = {any_res['kl_noise_floor']:.4f}.", "",
             "| method | " + " | ".join(COLUMNS) + " | time (s) |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in COLUMNS) + f" | {timings.get(name, 0):.1f} |")
    lines += ["", "mode_tv, energy_distance and kl_estimate compare with p_tilde (lower is better); energy_to_base "
              "and kl_base_estimate compare with the untilted p (what stage 1 should match).", ""]
    notes = [ROW_NOTES[name] for name in results if name in ROW_NOTES]
    if notes:
        lines += ["**Which rows are exact.** Only rtdmd_exact has p_tilde as its fixed point; every other row "
                  "is either meant to match p or settles somewhere else, for the reason given:", "", *notes]
    for f in _scatter(out, cfg, samples, ref):
        lines += [f"![{f}]({f})", ""]
    curves = _curves(out, list(results), any_res)
    if curves:
        lines += ["## Metric curves over training (EMA generator)", "",
                  "One row per stage (stage 1 distils the teacher, stage 2 tilts the stage-1 student; they "
                  "train for different numbers of steps). Dashed: E_p_tilde[r] and the energy noise floor. The "
                  "y-axes are clipped (reward to the base-to-target span on either side, distances to twice "
                  "the untilted distance); values beyond them are drawn on the edge as triangles joined by a "
                  "dotted line, and each panel lists how far they went.", "", f"![curves]({curves})", ""]
    lines += ["## Provenance", "", f"tiltflow {__version__}, torch {torch.__version__}, python "
              f"{platform.python_version()}, {platform.machine()}, {torch.get_num_threads()} torch threads; seed "
              f"{cfg.seed}; total wall time {total_s:.1f} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
