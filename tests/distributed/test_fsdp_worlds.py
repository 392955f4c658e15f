"""The diffusers world (tiny random SD3) and the shapes world (its tiny trained models) under FSDP2 on 2 CPU
processes (torchrun, gloo): training runs, rank 0 alone writes each run file, every rank gathers the sharded
weights for the export, and with parallel.same_data_on_every_rank the export equals the one-process export.

Tolerance, derived as in test_fsdp.py before any number was seen: both ranks train on rank 0's data, so the
reduced gradient is (g + g) / 2 = g exactly; what may differ from one process is the float32 arithmetic order
on the sharded parameters (the clipping norm, AdamW on DTensors): 8 ulps of the largest magnitude per update,
over every generator and fake update of the run (num_iters * (1 + n_fake) at most). An exported LoRA is the
trained A and B times alpha / rank (a power of two here), so the same bound holds on its own magnitude.

Evaluation with several ranks: every rank evaluates the whole prompt set with the same seeds (the sharded
generator's forwards are collectives), so the metrics are identical on every rank; the test compares the
metrics that train() returns on rank 0 and on rank 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from write_audit import WRITE_AUDIT

from tiltflow.training.spine import train
from tiltflow.worlds.registry import load_run_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(),
                                                   reason="torch.distributed is not available")]

TORCHRUN = Path(sys.executable).with_name("torchrun")
U32 = 2.0**-24  # float32 unit roundoff

# train(cfg) on every rank, for each run's overrides in turn (one run after the other on the same ranks); each
# rank's returned metrics and the files it opened for writing during that run (an audit hook on Python's open,
# plus safetensors' save_file, which writes from Rust) go to rank<r>.json next to the run dir.
SCRIPT = WRITE_AUDIT + """
from tiltflow.training.spine import train
from tiltflow.worlds.registry import load_run_config
for overrides in json.loads(sys.argv[2]):
    cfg = load_run_config(None, overrides, default_world=sys.argv[1])
    start, out = len(writes), {}
    try:
        out = train(cfg, progress=False)
    finally:
        with open(os.path.join(os.path.dirname(os.path.abspath(cfg.run_dir)), f"rank{os.environ['RANK']}.json"),
                  "w") as f:
            json.dump({"metrics": {k: v for k, v in out.items() if isinstance(v, (int, float))},
                       "writes": writes[start:]}, f)
from tiltflow.distributed.launch import finish_process
finish_process(0)
"""

DIFFUSERS = ["world=diffusers", "model.family=sd3", "model.random_weights=true", "model.arch=tiny_sd3",
             "model.resolution=32", "device=cpu", "prompts=[a red cat, a blue dog]", "lora.rank=4", "lora.alpha=8",
             "checkpoint_every=1", "log_every=1", "sample.batch_size=2", "sample.num_per_prompt=1"]
STAGES = ["stage1.num_iters=2", "stage1.batch_size=2", "stage1.n_fake=1", "stage2.num_iters=2",
          "stage2.num_prompts=1", "stage2.group_size=2", "stage2.ema_every=1"]
UPDATES = 2 * (1 + 1)  # num_iters * (1 generator + n_fake fake updates), the same for both stages here


def torchrun(tmp_path: Path, world: str, *overrides: str, ok: bool = True) -> dict[int, dict]:
    """Train on 2 gloo ranks; returns each rank's final metrics and the run files it opened for writing
    (relative to the run directory, in order). With ok=False the run must fail: returns its output."""
    return torchrun_runs(tmp_path, world, list(overrides), ok=ok)[0]


def torchrun_runs(tmp_path: Path, world: str, *runs: list[str], ok: bool = True) -> list[dict[int, dict]]:
    """Several runs (their overrides, each with its own run_dir in its own parent directory) in one torchrun
    job, one after the other on the same 2 gloo ranks (one start of fresh interpreters for all); returns each
    run's record as torchrun() does."""
    script = tmp_path / "train_on_ranks.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun") or "torchrun", "--standalone",
           "--nproc-per-node", "2", str(script), world, json.dumps([list(r) for r in runs])]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300 * len(runs),
                         start_new_session=True)
    if not ok:
        assert out.returncode != 0
        return [{"output": out.stdout + out.stderr}]  # type: ignore[dict-item]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = []
    for overrides in runs:
        run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir="))).resolve()
        ranks = {}
        for r in range(2):
            rec = json.loads((run_dir.parent / f"rank{r}.json").read_text())
            rec["writes"] = [str(Path(w).relative_to(run_dir)) for w in rec["writes"]
                             if Path(w).is_relative_to(run_dir)]
            ranks[r] = rec
        records.append(ranks)
    return records


def assert_written_once_by_rank0(ranks: dict[int, dict], names: list[str]) -> None:
    # Each rank writes its own shards of the distributed checkpoint (checkpoint-dcp/; rank 0 commits it);
    # every other run file is rank 0's alone.
    others = [w for w in ranks[1]["writes"] if not w.startswith("checkpoint-dcp/")]
    assert others == [], others  # rank 1 writes nothing else into the run directory
    assert any(w.endswith("/__1_0.distcp") for w in ranks[1]["writes"]), ranks[1]["writes"]
    counts = {n: ranks[0]["writes"].count(n) for n in names}
    assert counts == dict.fromkeys(names, 1), counts


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], num_updates: int) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)  # a full tensor, not a shard
        scale = float(a[k].abs().max()) + 1.0
        diff = float((a[k] - b[k]).abs().max())
        assert diff <= 8 * num_updates * U32 * scale, (k, diff)


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_lora_loads(folder: Path, want: dict[str, torch.Tensor]) -> None:
    """Stock diffusers loads the exported LoRA, and the adapter it builds holds the exported weights."""
    from peft.utils import get_peft_model_state_dict

    from tiltflow.models.adapters.sd3 import SD3Adapter
    from tiltflow.models.export import LORA_WEIGHT_NAME

    assert sorted(p.name for p in folder.iterdir()) == [LORA_WEIGHT_NAME]
    pipe = SD3Adapter.random("tiny_sd3", seed=0).pipe
    pipe.load_lora_weights(str(folder), adapter_name="exported")
    got = get_peft_model_state_dict(pipe.transformer, adapter_name="exported")
    assert set(got) == set(want)
    assert all(torch.equal(got[k].float(), want[k]) for k in want)


DIFFUSERS_FILES = ["config.yaml", "resolved.json", "final.safetensors", "export_lora/pytorch_lora_weights.safetensors",
                   "samples/00000.png", "samples/00001.png", "samples/index.jsonl", "samples/grid.png"]


def check_diffusers_run(one: Path, two: Path, ranks: dict[int, dict]) -> None:
    assert_written_once_by_rank0(ranks, DIFFUSERS_FILES)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert steps(two) == steps(one) == [1, 2]  # rank 0 alone logs
    assert json.loads((two / "resolved.json").read_text()) == json.loads((one / "resolved.json").read_text())
    index = [json.loads(line) for line in (two / "samples" / "index.jsonl").read_text().splitlines()]
    assert [r["file"] for r in index] == ["00000.png", "00001.png"]
    from PIL import Image

    for name in ("00000.png", "00001.png", "grid.png"):
        Image.open(two / "samples" / name).verify()
    final_one, final_two = load_file(str(one / "final.safetensors")), load_file(str(two / "final.safetensors"))
    assert_close(final_one, final_two, UPDATES)
    lora_one = load_file(str(one / "export_lora" / "pytorch_lora_weights.safetensors"))
    lora_two = load_file(str(two / "export_lora" / "pytorch_lora_weights.safetensors"))
    assert_close(lora_one, lora_two, UPDATES)
    assert any(float(v.abs().max()) > 0 for k, v in lora_two.items() if "lora_B" in k)  # it trained
    check_lora_loads(two / "export_lora", {k.removeprefix("transformer."): v for k, v in lora_two.items()})


# The one-process and 2-rank runs are shared with test_fsdp_checkpointing.py and test_dcp_checkpoint.py
# (conftest.DiffusersRuns: each trained once per session, then only read).
def test_diffusers_stage1_on_two_ranks(diffusers_runs):
    two, ranks = diffusers_runs.two("ac_dmd")
    check_diffusers_run(diffusers_runs.one("ac_dmd"), two, ranks)


def test_diffusers_stage2_on_two_ranks(diffusers_runs):
    """Stage 2 from the one-process stage-1 run (init_from), in one process and on 2 ranks."""
    two, ranks = diffusers_runs.two("rtdmd")
    check_diffusers_run(diffusers_runs.one("rtdmd"), two, ranks)


# ---- the shapes world ------------------------------------------------------------------------------------
SHAPES = ["world=shapes", "device=cpu", "log_every=1", "checkpoint_every=1",
          "model.num_layers=1", "model.num_heads=2", "model.head_dim=8", "model.text_hidden=16", "model.text_layers=1",
          "model.clip_hidden=16", "model.clip_layers=1", "model.clip_projection=16",
          "teacher.num_iters=2", "teacher.batch_size=8", "teacher.num_images=32", "teacher.log_every=1",
          "reward_model.num_iters=1", "reward_model.batch_size=8", "reward_model.num_images=32",
          "reward_model.log_every=1", "eval.max_prompts=4", "eval.num_per_prompt=1", "eval.batch_size=4",
          "lora.rank=2", "lora.alpha=2"]


@pytest.fixture(scope="module")
def shapes_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_models")
    train(load_run_config(None, [*SHAPES, "stage=teacher", f"run_dir={root}"], default_world="shapes"),
          progress=False)
    return root


def test_shapes_stage1_on_two_ranks_with_evaluation(shapes_models, tmp_path):
    """Stage 1 on 2 ranks with evaluation equals 1 process; in the same torchrun job, a LoRA stage 2 on a
    full-fine-tuning stage-1 run (fresh LoRAs on frozen copies of its generator and fake score, the export folded
    into full weights, gathered from the shards) equals its 1-process run too."""
    rewards = "rewards=[{name: clip, weight: 1.0}, {name: verifier, weight: 1.0}]"
    common = [*SHAPES, *STAGES, "stage=ac_dmd", f"models_dir={shapes_models}", "eval.every=1", rewards]
    one, two = tmp_path / "one" / "s1", tmp_path / "two" / "s1"
    train(load_run_config(None, [*common, f"run_dir={one}"], default_world="shapes"), progress=False)
    full = tmp_path / "full" / "s1"
    train(load_run_config(None, [*common, f"run_dir={full}", "lora.finetune=full", "lora.layout=separate",
                                 "eval.every=0"], default_world="shapes"), progress=False)
    on_full = [*SHAPES, *STAGES, "stage=rtdmd", f"models_dir={shapes_models}", rewards, f"init_from={full}",
               "lora.layout=separate"]
    one2, two2 = tmp_path / "one2" / "s2", tmp_path / "two2" / "s2"
    train(load_run_config(None, [*on_full, f"run_dir={one2}"], default_world="shapes"), progress=False)
    ranks, _ = torchrun_runs(tmp_path, "shapes", [*common, f"run_dir={two}", "parallel.same_data_on_every_rank=true"],
                             [*on_full, f"run_dir={two2}", "parallel.same_data_on_every_rank=true"])
    final_one2, final_two2 = load_file(str(one2 / "final.safetensors")), load_file(str(two2 / "final.safetensors"))
    exported = [k for k in final_two2 if k.startswith("export/")]
    assert exported and not any(".lora_" in k for k in exported)  # full weights, the LoRA folded in
    assert all(".lora_" in k for k in final_two2 if k.startswith(("generator/", "fake/")))
    assert_close(final_one2, final_two2, UPDATES)
    assert_written_once_by_rank0(ranks, ["config.yaml", "final.safetensors", "final_metrics.json", "final_grid.png"])
    metrics = ranks[0]["metrics"]
    assert metrics == ranks[1]["metrics"] and "verifier/overall" in metrics  # the same evaluation on both ranks
    assert json.loads((two / "final_metrics.json").read_text()) == metrics
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("eval_verifier/overall" in r for r in rows)
    from PIL import Image

    Image.open(two / "final_grid.png").verify()
    final_one, final_two = load_file(str(one / "final.safetensors")), load_file(str(two / "final.safetensors"))
    assert any(k.startswith("export/") for k in final_two)
    assert_close(final_one, final_two, UPDATES)
    # The student folder (the LoRA folded into the gathered teacher weights) as 1 process's: the float32 weights
    # agree as above (far closer than an fp16 step), and rounding is monotone, so their fp16 roundings differ by
    # at most one fp16 step, taken in the larger value's binade: <= 2^-10 of a value that may be a binade above
    # v's (so 2^-9 |v|), or 2^-24 among subnormals.
    student = "export_transformer/diffusion_pytorch_model.safetensors"
    s_one, s_two = load_file(str(one / student)), load_file(str(two / student))
    assert set(s_one) == set(s_two) and s_one
    for k, v in s_one.items():
        assert torch.all((v.float() - s_two[k].float()).abs() <= 2**-9 * v.float().abs() + 2**-24), k


def test_shapes_teacher_stage_refuses_several_ranks(tmp_path):
    """The teacher stage trains the world's own small models in one process; on 2 ranks it stops at once and
    says so (before it writes any model)."""
    out = torchrun(tmp_path, "shapes", *SHAPES, "stage=teacher", f"run_dir={tmp_path / 'teacher'}", ok=False)
    assert "teacher stage" in out["output"] and "runs in one process" in out["output"]
    assert not (tmp_path / "teacher" / "teacher").exists()
