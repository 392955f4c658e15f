"""FSDP2 across 2 CPU processes (torchrun, gloo) on the tiny gmm problem: sharding reproduces one process,
a checkpoint saved on 2 ranks resumes on 1 exactly, and both ranks write one set of run files.

With parallel.same_data_on_every_rank both ranks train on rank 0's data, so the gradient every rank
reduces is (g + g) / 2 = g exactly; what may differ from one process is the order of float32 arithmetic
on the sharded parameters (the norm for clipping, AdamW on DTensors), a few ulps per update."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_jobs import torchrun_train

from tiltflow.cli import main
from tiltflow.storage import load

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(),
                                                   reason="torch.distributed is not available")]

TORCHRUN = Path(sys.executable).with_name("torchrun")
U32 = 2.0**-24  # float32 unit roundoff


def torchrun(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --standalone: a local rendezvous on a free port (several tests and sessions may run at once).
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun") or "torchrun", "--standalone",
           "--nproc-per-node", "2", "-m", "tiltflow.cli", "train", *args]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_states(a: dict, b: dict, num_updates: int) -> None:
    """Each update may round differently by a few ulps of the parameter (different arithmetic order on
    shards): allow 8 ulps per update of the largest magnitude."""
    for role in a:
        for k in a[role]:
            scale = float(a[role][k].abs().max()) + 1.0
            diff = float((a[role][k] - b[role][k]).abs().max())
            assert diff <= 8 * num_updates * U32 * scale, (role, k, diff)


# data_parallel=ddp: whole parameters on each rank, gradients all-reduced (FSDP2 over a (2 x 1) mesh); with two
# micro-batches per update, so that the gradient sync is skipped on the first. The FSDP stage 2 decodes the reward
# back-propagation term in chunks of 5 (stage2.bp_chunk; the ddp case keeps the whole batch).
@pytest.mark.parametrize(("stage", "data_parallel"), [("ac_dmd", "fsdp"), ("rtdmd", "fsdp"), ("rtdmd", "ddp")])
def test_two_ranks_reproduce_one_process_and_resume_on_one(stage, data_parallel, tiny_yaml, teacher_run, tmp_path):
    common = [f"--config={tiny_yaml}", f"stage={stage}", f"teacher_run={teacher_run}", "stage2.ema_every=1",
              "stage1.num_iters=3", "stage2.num_iters=3", f"parallel.data_parallel={data_parallel}",
              *(["stage2.accumulation=2"] if data_parallel == "ddp" else []),
              *(["stage2.bp_chunk=5"] if (stage, data_parallel) == ("rtdmd", "fsdp") else [])]
    assert main(["train", *common, f"run_dir={tmp_path / 'one'}"]) == 0
    # One torchrun job (train_jobs.py) trains `two` (3 steps on 2 ranks), then `mix` (the same, stopped after 2
    # steps with its sharded checkpoint), one run after the other on the same 2 ranks.
    torchrun_train(tmp_path, [*common, f"run_dir={tmp_path / 'two'}", "parallel.same_data_on_every_rank=true"],
                   [*common, f"run_dir={tmp_path / 'mix'}", "parallel.same_data_on_every_rank=true",
                    "stage1.num_iters=2", "stage2.num_iters=2"])
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]  # rank 0 alone writes metrics.jsonl
    key = "gen_dm_loss" if stage == "ac_dmd" else "reward_total"
    assert one[0][key] == two[0][key]  # step 1: same weights, same data, exact all-gathers
    updates = 3 * (1 + 2)  # generator and fake updates per network over the run (at most)
    assert_close_states(load(tmp_path / "one" / "final.pt"), load(tmp_path / "two" / "final.pt"), updates)

    # Saved on 2 ranks after 2 steps, resumed on 1 process for the third: the same run as `one`.
    assert load(tmp_path / "mix" / "checkpoint.pt")["sharded"]
    assert main(["train", *common, f"run_dir={tmp_path / 'mix'}"]) == 0
    assert [r["step"] for r in records(tmp_path / "mix")] == [1, 2, 3]
    assert_close_states(load(tmp_path / "one" / "final.pt"), load(tmp_path / "mix" / "final.pt"), updates)


# Stage 2 (rtdmd) with each rank's own data: the same run (2 iterations, the EMA every step) and the same checks are
# in test_dcp_checkpoint.py::test_two_ranks_interrupted_and_resumed_equal_a_straight_run (its run before the resume).
# nonfinite_check=step: every rank reads its updates' values once, at the end of the step, and the ranks agree
# there (one collective a step, the same number on every rank): the run must not hang.
@pytest.mark.parametrize(("stage", "check"), [("ac_dmd", "update"), ("ac_dmd", "step")])
def test_two_ranks_with_their_own_data_train(stage, check, tiny_yaml, teacher_run, tmp_path):
    """Each rank draws its own prompts and noise (the random stop and SubGRPO's steps are shared, so every
    rank runs the same sharded passes): the run trains and agrees on one set of weights."""
    torchrun(tmp_path, f"--config={tiny_yaml}", f"stage={stage}", f"teacher_run={teacher_run}",
             f"run_dir={tmp_path / 'own'}", "stage1.num_iters=2", "stage2.num_iters=2", "stage2.ema_every=1",
             f"nonfinite_check={check}")
    final = load(tmp_path / "own" / "final.pt")
    init = load(teacher_run / "teacher.pt")["model"]
    assert any(not torch.equal(final["generator_raw"][k], init[k]) for k in init)
    assert [r["step"] for r in records(tmp_path / "own")] == [1, 2]


def advantages_on_this_rank(out: str) -> None:
    """In the 2 ranks' default process group (the two_gloo_ranks job): this rank's half of the global batch
    (whole groups) through RTDMD.advantages, saved to out/advantages_rank<r>.pt."""
    import torch.distributed as dist

    from tiltflow.algorithms.rtdmd import RTDMD
    from tiltflow.config.schema import Stage2Config
    from tiltflow.distributed import TorchComm

    rank, world = dist.get_rank(), dist.get_world_size()
    scores, group = _global_batch()
    n = scores.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    fake_self = SimpleNamespace(cfg=Stage2Config(), comm=TorchComm(),
                                task=SimpleNamespace(rewards=SimpleNamespace(names=["r"], weights=[1.0])))
    rollout = SimpleNamespace(group=group[mine])
    adv = RTDMD.advantages(fake_self, rollout, SimpleNamespace(per_reward={"r": scores[mine]}))
    torch.save(adv, f"{out}/advantages_rank{rank}.pt")


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 groups of 6 samples (each rank holds 2 whole groups), rewards of different spreads per group."""
    g = torch.Generator().manual_seed(0)
    group = torch.arange(4).repeat_interleave(6)
    return torch.randn(24, generator=g) * (1 + group), group


# One torchrun job on 2 gloo ranks for the two tests below (one start of fresh interpreters for both): the FSDP
# and replicated layouts of a small net (rank<r>.json), then RTDMD's advantages on each rank's half of a batch
# (advantages_on_this_rank, imported from this file: advantages_rank<r>.pt).
TWO_RANKS = """
import json, sys, torch, torch.distributed as dist
from tiltflow.distributed.fsdp import ShardUnit, fsdp_shard
dist.init_process_group("gloo")
seen = {}
for replicate in (False, True):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    fsdp_shard([ShardUnit(net, list(net))], device_type="cpu", bf16=False, replicate=replicate)
    shapes = [list(p.to_local().shape) for p in net.parameters()]
    net(torch.full((3, 4), float(dist.get_rank()))).square().sum().backward()
    seen[str(replicate)] = {"shapes": shapes, "grad": [float(p.grad.full_tensor().sum()) for p in net.parameters()]}
with open(f"rank{dist.get_rank()}.json", "w") as f:  # one file per rank: no interleaved output
    json.dump(seen, f)
sys.path.insert(0, sys.argv[1])
from test_fsdp import advantages_on_this_rank
advantages_on_this_rank(".")
from tiltflow.distributed.launch import finish_process
finish_process(0)
"""


@pytest.fixture(scope="module")
def two_gloo_ranks(tmp_path_factory) -> Path:
    """The folder the TWO_RANKS job wrote its files to."""
    folder = tmp_path_factory.mktemp("two_gloo_ranks")
    script = folder / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun") or "torchrun", "--standalone",
           "--nproc-per-node", "2", str(script), str(Path(__file__).parent)]
    out = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True, timeout=300,
                         start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return folder


def test_advantages_use_the_global_batch(two_gloo_ranks):
    """2 ranks give each sample the advantage that 1 rank gives it on the whole batch (group means and the
    batch std over every rank's samples, METHOD.md 5.3)."""
    from tiltflow.losses import group_advantages

    scores, group = _global_batch()
    want = group_advantages({"r": scores}, {"r": 1.0}, group, mode="normalized", clip=5.0)
    got = torch.cat([torch.load(two_gloo_ranks / f"advantages_rank{r}.pt") for r in range(2)])
    assert torch.equal(got, want)  # the same arithmetic on the same gathered tensor
    # ...while each rank's local batch alone would standardise differently.
    local = group_advantages({"r": scores[:12]}, {"r": 1.0}, group[:12], mode="normalized", clip=5.0)
    assert not torch.allclose(local, want[:12])


def test_ddp_replicates_whole_parameters_and_all_reduces_gradients(two_gloo_ranks):
    """data_parallel=ddp: each rank holds every parameter whole (FSDP: half of each weight's rows), and both
    layouts reduce the same mean gradient over the ranks' different inputs."""
    ranks = [json.loads((two_gloo_ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["False"]["shapes"] == [[3, 4], [3], [1, 6], [1]]  # sharded: dim 0 split over 2 ranks
        assert seen["True"]["shapes"] == [[6, 4], [6], [2, 6], [2]]  # replicated: whole on each rank
    grads = [seen[layout]["grad"] for seen in ranks for layout in ("False", "True")]
    assert all(g == grads[0] for g in grads), grads  # every rank, both layouts: one reduced gradient
