"""Distributed checkpoints (torch.distributed.checkpoint, tiltflow/training/sharded_checkpoint.py) on 2 CPU
processes (torchrun, gloo) and on one:

- a checkpoint saved on 2 ranks loads on 2 fresh ranks and on one process (no process group) with exactly the
  parameters, optimiser state (moments, step counts, hyperparameters), EMA, step and skip count the 2 ranks
  held, and the steps after it give the same losses as the 2 ranks' own continuation (a toy state,
  dcp_toy.py, whose sharded arithmetic equals the unsharded one, so every comparison is bitwise);
- the real loop (gmm world, stage 2): a run on 2 ranks interrupted and resumed on 2 equals a straight run bit
  for bit (training state, final weights, metrics.jsonl but its timings); a checkpoint one process wrote
  (FileCheckpointer) resumes on 2 ranks;
- bad checkpoints say what is wrong: a rank's shard file missing or truncated, a checkpoint of other models
  (sizes, roles sharing a module), DCP metadata holding a pickled payload (refused, never run); an
  interrupted write's leftovers are ignored and removed; a failed write keeps the previous checkpoint.

Killing a 2-rank job inside the write: tests/reliability/test_kill_resume_distributed.py."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dcp_toy import MORE, SAVED_AT, SKIPPED, build, snapshot, step
from train_jobs import torchrun_train

from tiltflow.cli import main
from tiltflow.config.loader import ConfigError
from tiltflow.distributed import LOCAL
from tiltflow.storage import UnsafeFileError, load
from tiltflow.training import sharded_checkpoint
from tiltflow.training.checkpointing import CheckpointError
from tiltflow.training.sharded_checkpoint import FOLDER, ShardedCheckpointer, read_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

TORCHRUN = Path(sys.executable).with_name("torchrun")
TOY = Path(__file__).with_name("dcp_toy.py")


def torchrun(cwd: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("TILTFLOW_FAULT", None)
    cmd = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun") or "torchrun", "--standalone",
           "--nproc-per-node", "2", *args]
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def assert_same(got: object, want: object, where: str = "") -> None:
    """Nested dicts, lists and tensors equal bit for bit (same keys, shapes, dtypes and values)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, sorted(map(str, got)), sorted(map(str, want)))
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where  # type: ignore[arg-type]
        for i, (a, b) in enumerate(zip(got, want)):  # type: ignore[call-overload]
            assert_same(a, b, f"{where}[{i}]")
    elif torch.is_tensor(want):
        assert torch.is_tensor(got) and not hasattr(got, "device_mesh"), where
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), where
    else:
        assert got == want, (where, got, want)


# ---- the toy state: 2 ranks -> 2 ranks and 2 ranks -> 1 process -----------------------------------------
LAYOUTS = ("separate", "shared")


@pytest.fixture(scope="module")
def saved_layouts(tmp_path_factory) -> dict[str, Path]:
    """The toy saved on 2 ranks after SAVED_AT steps in each layout (one torchrun job saves both, one after the
    other, each from a freshly built state), with the reference: the whole state then and the losses of the MORE
    steps after it. "shared": one module, the two optimisers sharing out its layers."""
    folders = {layout: tmp_path_factory.mktemp(layout) for layout in LAYOUTS}
    torchrun(folders["separate"], str(TOY), "save", *(a for layout in LAYOUTS for a in (str(folders[layout]), layout)))
    return folders


@pytest.fixture(params=LAYOUTS)
def saved(request, saved_layouts) -> tuple[Path, bool]:
    """One layout's checkpoint saved on 2 ranks (saved_layouts) and whether it is the shared layout."""
    return saved_layouts[request.param], request.param == "shared"


@pytest.fixture(scope="module")
def resumed_on_two(saved_layouts) -> dict[str, Path]:
    """Each layout's checkpoint loaded on 2 fresh ranks (another torchrun job than the one that saved it; one job
    for both layouts, each into a freshly built state) and MORE steps run: resumed.pt next to reference.pt."""
    torchrun(saved_layouts["separate"], str(TOY), "resume",
             *(a for layout in LAYOUTS for a in (str(saved_layouts[layout]), layout)))
    return saved_layouts


@pytest.mark.slow
def test_saved_on_two_ranks_loads_on_one_process_exactly(saved):
    folder, shared = saved
    ref = torch.load(folder / "reference.pt", weights_only=True)
    assert ref["state"]["optim"]["generator"] and ref["state"]["optim"]["fake"]  # moments and steps to compare
    modules, state = build(shard=False, shared=shared)
    before = snapshot(modules, state)
    loaded = ShardedCheckpointer(folder, LOCAL, modules, state).load()
    assert loaded == {"step": SAVED_AT, "skipped_updates": SKIPPED, "model": None, "algo": None}
    assert not torch.equal(before["params"]["generator"]["0.weight"], ref["state"]["params"]["generator"]["0.weight"])
    assert_same(snapshot(modules, state), ref["state"], "loaded on one process")
    assert [step(modules, state, it) for it in range(SAVED_AT, SAVED_AT + MORE)] == ref["losses"]


@pytest.mark.slow
def test_saved_on_two_ranks_resumes_on_two_exactly(saved, resumed_on_two):
    folder, shared = saved
    ref = torch.load(folder / "reference.pt", weights_only=True)
    resumed = torch.load(folder / "resumed.pt", weights_only=True)
    assert resumed["loop"] == {"step": SAVED_AT, "skipped_updates": SKIPPED}
    assert_same(resumed["state"], ref["state"], "loaded on 2 ranks")
    assert resumed["losses"] == ref["losses"]


@pytest.mark.slow
def test_the_format_on_disk(saved):
    """checkpoint.pt is the weights-only commit record; the step directory holds each rank's shard file, DCP's
    metadata and tiltflow.pt; read_checkpoint gives the whole tensors in one process."""
    folder, shared = saved
    record = load(folder / "checkpoint.pt")
    assert record == {"format": "tiltflow-dcp", "sharded": True, "step": SAVED_AT, "dirs": [f"step{SAVED_AT:08d}"]}
    names = sorted(p.name for p in (folder / FOLDER / record["dirs"][0]).iterdir())
    assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "tiltflow.pt"]
    tensors, meta = read_checkpoint(folder)
    assert meta["world_size"] == 2 and meta["loop"] == {"step": SAVED_AT, "skipped_updates": SKIPPED}
    assert meta["roles"] == {"generator": "generator", "fake": "generator" if shared else "fake"}
    ref = torch.load(folder / "reference.pt", weights_only=True)["state"]
    assert torch.equal(tensors["model/generator/0.weight"], ref["params"]["generator"]["0.weight"])
    assert ("model/fake/0.weight" in tensors) is not shared  # one module is written once


# ---- the real loop ----------------------------------------------------------------------------------
def records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.mark.slow
def test_two_ranks_interrupted_and_resumed_equal_a_straight_run(tiny_yaml, teacher_run, tmp_path):
    """Stage 2 on 2 ranks with their own data (each rank's RNG streams), the EMA every step: 4 iterations
    straight, and 2 then 2 more after a resume, agree bit for bit.

    The 2-iteration run is also the stage-2 case of test_fsdp.py::test_two_ranks_with_their_own_data_train (the
    same settings; that test also set stage1.num_iters, which stage 2 does not read): its checks, that the run
    trains (the generator moves off the teacher's weights) and logs steps 1 and 2, are made here."""
    common = ["train", f"--config={tiny_yaml}", "stage=rtdmd", f"teacher_run={teacher_run}", "stage2.ema_every=1",
              "stage2.num_iters=4"]
    # The straight run and the first 2 iterations in one torchrun job (train_jobs.py: one run after the other on
    # the same 2 ranks); the resume below is a job of its own (fresh ranks).
    torchrun_train(tmp_path, [*common[1:], f"run_dir={tmp_path / 'straight'}"],
                   [*common[1:], f"run_dir={tmp_path / 'resumed'}", "stage2.num_iters=2"])
    assert load(tmp_path / "resumed" / "checkpoint.pt")["step"] == 2
    final, init = load(tmp_path / "resumed" / "final.pt"), load(teacher_run / "teacher.pt")["model"]
    assert any(not torch.equal(final["generator_raw"][k], init[k]) for k in init)
    assert [r["step"] for r in records(tmp_path / "resumed")] == [1, 2]
    torchrun(tmp_path, "-m", "tiltflow.cli", *common, f"run_dir={tmp_path / 'resumed'}")
    straight, straight_meta = read_checkpoint(tmp_path / "straight")
    resumed, resumed_meta = read_checkpoint(tmp_path / "resumed")
    assert any(k.startswith("optim/") for k in straight) and any(k.startswith("ema/") for k in straight)
    assert_same(resumed, straight, "checkpoint")
    assert resumed_meta == straight_meta
    assert_same(load(tmp_path / "resumed" / "final.pt"), load(tmp_path / "straight" / "final.pt"), "final")
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")
    assert [r["step"] for r in records(tmp_path / "straight")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_ranks(tiny_yaml, teacher_run, tmp_path):
    """FileCheckpointer's checkpoint.pt (whole tensors) is cut into each rank's shards: 2 steps on one
    process, the third on 2 ranks on rank 0's data, equals 3 steps on one process up to the float32 rounding
    of sharded arithmetic (test_fsdp.py's bound: 8 ulps of the largest magnitude per update)."""
    common = ["train", f"--config={tiny_yaml}", "stage=rtdmd", f"teacher_run={teacher_run}", "stage2.ema_every=1"]
    assert main([*common, f"run_dir={tmp_path / 'one'}", "stage2.num_iters=3"]) == 0
    assert main([*common, f"run_dir={tmp_path / 'mix'}", "stage2.num_iters=2"]) == 0
    assert "format" not in load(tmp_path / "mix" / "checkpoint.pt")  # FileCheckpointer's
    torchrun(tmp_path, "-m", "tiltflow.cli", *common, f"run_dir={tmp_path / 'mix'}", "stage2.num_iters=3",
             "parallel.same_data_on_every_rank=true")
    assert load(tmp_path / "mix" / "checkpoint.pt")["dirs"] == ["step00000003"]
    assert [r["step"] for r in records(tmp_path / "mix")] == [1, 2, 3]
    one, mix = load(tmp_path / "one" / "final.pt"), load(tmp_path / "mix" / "final.pt")
    updates = 3 * (1 + 2)
    for role in one:
        for k in one[role]:
            scale = float(one[role][k].abs().max()) + 1.0
            assert float((one[role][k] - mix[role][k]).abs().max()) <= 8 * updates * 2.0**-24 * scale, (role, k)


# ---- bad checkpoints, interrupted and failed writes (one process) -----------------------------------
def saved_on_one_process(folder: Path, steps: list[int], keep: int = 1, **build_kw) -> dict:
    """The toy saved at each of `steps` (one process, no process group); returns its last state."""
    modules, state = build(shard=False, **build_kw)
    ckpt = ShardedCheckpointer(folder, LOCAL, modules, state, keep=keep)
    for it in range(max(steps)):
        step(modules, state, it)
        if it + 1 in steps:
            ckpt.save({"step": it + 1, "skipped_updates": SKIPPED, "model": None, "algo": None})
            if it + 1 == steps[0]:
                first = snapshot(modules, state)
    return {"last": snapshot(modules, state), "first": first}


def load_into_fresh(folder: Path, warnings: list[str] | None = None, **build_kw) -> tuple[dict, dict]:
    modules, state = build(shard=False, **build_kw)
    ckpt = ShardedCheckpointer(folder, LOCAL, modules, state, warn=warnings.append if warnings is not None else None)
    loaded = ckpt.load()
    return loaded, snapshot(modules, state)


def test_one_process_saves_and_loads_and_keeps_the_newest(tmp_path):
    want = saved_on_one_process(tmp_path, [1, 2, 3], keep=2)
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == ["step00000002", "step00000003"]
    assert load(tmp_path / "checkpoint.pt")["dirs"] == ["step00000003", "step00000002"]
    loaded, got = load_into_fresh(tmp_path)
    assert loaded["step"] == 3
    assert_same(got, want["last"])


@pytest.mark.slow
def test_a_missing_or_truncated_shard_file_names_the_rank(saved, tmp_path):
    folder, shared = saved
    for damage in ("missing", "truncated"):
        copy = tmp_path / damage
        shutil.copytree(folder, copy)
        shard = copy / FOLDER / f"step{SAVED_AT:08d}" / "__1_0.distcp"
        if damage == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[:100])
        seen: list[str] = []
        with pytest.raises(CheckpointError) as err:
            load_into_fresh(copy, seen, shared=shared)
        assert f"__1_0.distcp (rank 1's shards) is {damage}" in str(err.value), err.value
        assert str(err.value).startswith(f"no readable checkpoint in {copy / FOLDER}")
        assert len(seen) == 1 and "cannot be read" in seen[0]


def test_an_unreadable_newest_checkpoint_falls_back_to_an_older_kept_one(tmp_path):
    want = saved_on_one_process(tmp_path, [1, 2], keep=2)
    (tmp_path / FOLDER / "step00000002" / ".metadata").write_bytes(b"not a pickle")
    seen: list[str] = []
    loaded, got = load_into_fresh(tmp_path, seen)
    assert loaded["step"] == 1
    assert_same(got, want["first"])
    assert len(seen) == 1 and "step00000002 cannot be read (.metadata: UnpicklingError" in seen[0], seen


def test_a_checkpoint_of_other_models_is_refused_with_what_differs(tmp_path):
    saved_on_one_process(tmp_path, [1], hidden=6)
    with pytest.raises(ConfigError, match=r"run_dir.*other models than this run's: 9 tensors differ in size, e.g. "
                                          r"model/generator/0.weight: \(6, 4\) there, \(8, 4\) here"):
        load_into_fresh(tmp_path, hidden=8)
    with pytest.raises(ConfigError, match=r"its roles share modules as \{'generator': 'generator', 'fake': 'fake'\}, "
                                          r"this run's as \{'generator': 'generator', 'fake': 'generator'\}"):
        load_into_fresh(tmp_path, shared=True)


class Payload:
    """Unpickling this with a full pickle load creates `marker`: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_dcp_metadata_holding_a_payload_is_refused_and_never_runs(tmp_path):
    saved_on_one_process(tmp_path, [1])
    marker = tmp_path / "code_ran"
    metadata = tmp_path / FOLDER / "step00000001" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeFileError, match=r"refusing to load .*\.metadata'.* it names pathlib.Path.touch"):
        load_into_fresh(tmp_path)
    with pytest.raises(UnsafeFileError):
        read_checkpoint(tmp_path)
    assert not marker.exists()


def test_an_interrupted_write_is_ignored_and_its_leftovers_removed(tmp_path):
    """What a kill leaves at each point of a write: a half-written temporary directory, a complete step
    directory renamed into place before checkpoint.pt named it, a temporary file of checkpoint.pt. The
    committed checkpoint loads; constructing the checkpointer (rank 0) removes the rest."""
    want = saved_on_one_process(tmp_path, [1])
    step1 = tmp_path / FOLDER / "step00000001"
    half = tmp_path / FOLDER / ".step00000002.tmp"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"\0" * 10)
    shutil.copytree(step1, tmp_path / FOLDER / "step00000002")
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"partial")
    loaded, got = load_into_fresh(tmp_path)
    assert loaded["step"] == 1
    assert_same(got, want["first"])
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == ["step00000001"]
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))


def test_a_failed_write_keeps_the_previous_checkpoint_and_a_retry_recovers(tmp_path, monkeypatch):
    modules, state = build(shard=False)
    step(modules, state, 0)
    ShardedCheckpointer(tmp_path, LOCAL, modules, state).save({"step": 1, "model": None, "algo": None})
    first = snapshot(modules, state)
    step(modules, state, 1)
    real_replace, calls = os.replace, []

    def full_disk(src, dst):  # the commit's rename of the step directory fails once
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(sharded_checkpoint.os, "replace", full_disk)
    with pytest.raises(CheckpointError) as err:
        ShardedCheckpointer(tmp_path, LOCAL, modules, state).save({"step": 2, "model": None, "algo": None})
    assert str(err.value) == (f"cannot write checkpoint {tmp_path / FOLDER / 'step00000002'} (step 2): No space left "
                              "on device; gave up after 1 attempt(s) (checkpoint_retries = 0); the previous checkpoint "
                              "is intact")
    loaded, got = load_into_fresh(tmp_path)
    assert loaded["step"] == 1
    assert_same(got, first)
    calls.clear()
    seen: list[str] = []
    ShardedCheckpointer(tmp_path, LOCAL, modules, state, retries=1, retry_wait_s=0, warn=seen.append).save(
        {"step": 2, "model": None, "algo": None})
    assert len(seen) == 1 and "No space left on device; retrying in 0 s (1/1)" in seen[0]
    assert load_into_fresh(tmp_path)[0]["step"] == 2


def test_an_unreadable_commit_record_falls_back_to_the_newest_step_directory(tmp_path):
    """checkpoint.pt damaged (a disk fault): every step directory was complete before it was renamed into
    place, so the newest one loads, with a warning; the spine still picks the sharded checkpointer."""
    from tiltflow.training.spine import _written_sharded

    want = saved_on_one_process(tmp_path, [1, 2], keep=2)
    with open(tmp_path / "checkpoint.pt", "r+b") as f:
        f.truncate(100)
    assert _written_sharded(tmp_path / "checkpoint.pt")
    seen: list[str] = []
    loaded, got = load_into_fresh(tmp_path, seen)
    assert loaded["step"] == 2
    assert_same(got, want["last"])
    assert len(seen) == 1 and f"checkpoint {tmp_path / 'checkpoint.pt'} cannot be read" in seen[0], seen
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == ["step00000001", "step00000002"]  # kept


# ---- a LoRA world: the shared layout, stage 2 over a frozen stage-1 adapter ----------------------------
@pytest.mark.slow
def test_a_lora_run_saved_on_two_ranks_resumes_on_one_process(diffusers_runs, tmp_path):
    """The diffusers world (tiny random SD3, one transformer carrying the generator's and the fake's adapters
    over the frozen stage-1 one): stage 2 saved on 2 ranks after step 1 resumes on one process for step 2,
    and ends where 2 steps on one process end, within test_fsdp_worlds.py's bound for sharded arithmetic.
    The stage-1 run it starts from and the 2 steps on one process are test_fsdp_worlds.py's one-process runs
    (conftest.DiffusersRuns, trained once per session)."""
    from safetensors.torch import load_file
    from test_fsdp_worlds import UPDATES, assert_close, steps
    from test_fsdp_worlds import torchrun as train_on_two_ranks

    from tiltflow.training.spine import train
    from tiltflow.worlds.registry import load_run_config

    common = diffusers_runs.overrides("rtdmd")  # stage 2, init_from the one-process stage-1 run
    one, mix = diffusers_runs.one("rtdmd"), tmp_path / "mix" / "s2"
    train_on_two_ranks(tmp_path, "diffusers", *common, f"run_dir={mix}", "stage2.num_iters=1",
                       "parallel.same_data_on_every_rank=true")
    tensors, meta = read_checkpoint(mix)
    assert meta["roles"] == {"generator": "generator", "fake": "generator"} and meta["world_size"] == 2
    assert any(".generator." in k for k in tensors) and any(".fake." in k for k in tensors)
    assert not any("generator_stage1" in k for k in tensors)  # the frozen adapter is the stage-1 run's
    train(load_run_config(None, [*common, f"run_dir={mix}"]), progress=False)
    assert steps(mix) == steps(one) == [1, 2]
    assert_close(load_file(str(one / "final.safetensors")), load_file(str(mix / "final.safetensors")), UPDATES)
