"""The exact mode (rtdmd_exact: DM toward the diffused tilted target, METHOD.md 5.6) on the diffusers
backbones, tiny random-weight models on the CPU (issue 10, item 6): a world run through the training spine,
and `tiltflow bench --dm-target tilted`, whose counted passes show the estimator's structure: no teacher pass
at the rollout batch, the teacher's reverse sampler at 2M x the batch (k steps, two CFG passes each), the
reward of the 2M posterior draws, and no policy-gradient or reward back-propagation term."""

from __future__ import annotations

import json

import pytest
import torch

from tiltflow.cli import main

B, M, K_POST, K = 2, 1, 2, 4


@pytest.mark.parametrize("family,arch", [("sd3", "tiny_sd3"),
                                         pytest.param("flux1", "tiny_flux1", marks=pytest.mark.slow)])
def test_world_run_in_the_exact_mode(tmp_path, family, arch):
    from tiltflow.training.spine import train
    from tiltflow.worlds.registry import load_run_config

    common = ["world=diffusers", f"model.family={family}", "model.random_weights=true", f"model.arch={arch}",
              "model.resolution=32", "model.guidance_scale=3.0", "device=cpu", "prompts=[a red cat, a blue dog]",
              "lora.rank=4", "lora.alpha=8", "checkpoint_every=1", "log_every=1"]
    s1 = load_run_config(None, common + ["stage=ac_dmd", f"run_dir={tmp_path}/s1", "stage1.num_iters=1",
                                         "stage1.batch_size=2", "stage1.n_fake=1", "stage1.ema_decay=0.0"])
    train(s1, progress=False)
    s2 = load_run_config(None, common + ["stage=rtdmd_exact", f"run_dir={tmp_path}/s2", f"init_from={tmp_path}/s1",
                                         "stage2.num_iters=2", "stage2.num_prompts=1", f"stage2.group_size={B}",
                                         f"stage2.tilt_num_pairs={M}", f"stage2.tilt_posterior_steps={K_POST}",
                                         "stage2.lr=1e-2", "stage2.ema_decay=0.0", "stage2.ema_every=1"])
    assert s2.stage2.dm_target == "tilted" and s2.stage2.weights()[1:] == (0.0, 0.0)
    final = train(s2, progress=False)
    recs = [json.loads(line) for line in (tmp_path / "s2" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*recs)
    assert "dm_loss" in keys and not keys & {"pg_loss", "bp_loss"}, keys
    ess = [r["tilt_ess"] for r in recs if "tilt_ess" in r]  # the brightness reward is differentiable:
    assert ess and all(1.0 <= e <= 2 * M + 1e-4 for e in ess)  # shifted proposal, (sum w)^2 / sum w^2 in [1, 2M]
    assert all(torch.isfinite(torch.tensor(float(v))) for k, v in final.items() if isinstance(v, float))


def _bench(tmp_path, arch, *extra):
    out = tmp_path / f"{arch}.json"
    rc = main(["bench", "--arch", arch, "--resolution", "32", "--stage", "2", "--batch", str(B), "--num-steps",
               str(K), "--repeats", "1", "--warmup", "1", "--device", "cpu", "--out", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())["runs"][0]


@pytest.mark.slow
@pytest.mark.parametrize("arch,cfg_passes", [("tiny_sd3", 2), ("tiny_flux1", 1)])  # FLUX.1-dev: guidance input
def test_bench_times_the_exact_mode_with_the_estimators_structure(tmp_path, arch, cfg_passes):
    run = _bench(tmp_path, arch, "--dm-target", "tilted", "--tilt-num-pairs", str(M), "--tilt-posterior-steps",
                 str(K_POST))
    assert run["iter_s"] > 0 and "error" not in run
    c = {(p["component"], p["name"], p["batch"], p["grad"]): (p["calls"], p["backwards"]) for p in run["passes"]}
    n = 2 * M * B
    assert c[("transformer", "teacher", n, False)] == ([K_POST * cfg_passes], [0])  # the reverse sampler
    assert not any(k[1] == "teacher" and k[2] == B for k in c)  # the teacher's own DM pass is gone
    assert c[("reward", "brightness", n, False)] == ([1], [0])  # weights of the 2M posterior draws
    # DM through the whole chain (rtdmd_exact's dm_depth 0): K generator steps with gradient, no PG pass.
    assert c[("transformer", "generator", B, True)] == ([K], [K])
    assert "--dm-target tilted" in json.loads((tmp_path / f"{arch}.json").read_text())["provenance"]["command"]
    ref = _bench(tmp_path, arch)  # the reference recipe: the teacher's DM pass at the batch, no sampler
    cr = {(p["component"], p["name"], p["batch"], p["grad"]) for p in ref["passes"]}
    assert ("transformer", "teacher", B, False) in cr and ("transformer", "teacher", n, False) not in cr
