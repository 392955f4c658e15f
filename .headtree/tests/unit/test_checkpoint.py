"""Atomic checkpoints (tiltflow/storage.py): a save either fully replaces the previous file or
leaves it untouched with no temporary file behind; loading is weights-only."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from tiltflow import storage as checkpoint
from tiltflow.storage import load, save_atomic


class Arbitrary:
    """An object a weights-only load must refuse to rebuild."""

    def __init__(self):
        self.payload = [1, 2, 3]


def state(value: float) -> dict:
    return {"step": 3, "model": {"w": torch.full((2, 3), value), "b": torch.arange(3)},
            "algo": {"shadow": [torch.ones(2, dtype=torch.float64)], "decay": 0.99, "name": "ema"}}


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_save_then_replace(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pt"  # the folder is created
    save_atomic(state(1.0), path)
    assert_same(load(path), state(1.0))
    save_atomic(state(2.0), path)
    assert_same(load(path), state(2.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]  # no temporary files


def test_unpicklable_object_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic(state(1.0), path)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_atomic({"step": 4, "fn": lambda x: x}, path)  # torch.save cannot pickle a lambda
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert_same(load(path), state(1.0))


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / "checkpoint.pt"
    save_atomic(state(1.0), path)
    before = path.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # a torn write, then the failure
        raise exc

    monkeypatch.setattr(checkpoint.torch, "save", half_save)
    with pytest.raises(type(exc)):
        save_atomic(state(2.0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_failure_of_first_save_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="no space"):
        save_atomic(state(1.0), tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic(state(1.0), path)
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise PermissionError("rename refused")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        save_atomic(state(2.0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_the_file_is_renamed_into_place(tmp_path, monkeypatch):
    """The final path is only ever produced by os.replace from a temporary file in the same folder."""
    path = tmp_path / "checkpoint.pt"
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((Path(src), Path(dst)))
        assert not Path(dst).exists()  # nothing was written to the final path directly
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", spy)
    save_atomic(state(1.0), path)
    ((src, dst),) = calls
    assert dst == path and src.parent == path.parent and src != path


def test_load_is_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Arbitrary()}, path)  # a plain, full pickle
    with pytest.raises(pickle.UnpicklingError):
        load(path)


def test_load_missing_file_names_it(tmp_path):
    path = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load(path)


def test_load_maps_to_cpu(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic(state(1.0), path)
    assert load(path)["model"]["w"].device.type == "cpu"


# --- resume-by-default in the loop (tiltflow/training/loop.py) ----------------------------------------


class Counter:
    """A toy algorithm: one parameter moved by SGD towards a per-step target; state = the optimiser."""

    def __init__(self):
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.opt = torch.optim.Adam([self.w], lr=0.1)

    def step(self, it: int) -> dict[str, float]:
        target = torch.arange(3.0) * (it + 1)
        loss = ((self.w - target) ** 2).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


def run_counter(run_dir: Path, num_iters: int, stop_at: int | None = None, checkpoint_every: int = 1) -> Counter:
    from tiltflow.training.loop import LoopHooks, run_loop

    run_dir.mkdir(parents=True, exist_ok=True)
    algo = Counter()

    def load_model(s):
        with torch.no_grad():
            algo.w.copy_(s["w"])

    hooks = LoopHooks(model_state=lambda: {"w": algo.w.detach().clone()}, load_model_state=load_model)
    run_loop(algo, hooks, run_dir=run_dir, num_iters=num_iters, checkpoint_every=checkpoint_every, log_every=1,
             eval_every=0, desc="t", progress=False, stop_at=stop_at)
    return algo


def metric_lines(run_dir: Path) -> list[dict]:
    import json

    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loop_stop_and_resume_equals_straight_run(tmp_path):
    straight = run_counter(tmp_path / "a", 4)
    run_counter(tmp_path / "b", 4, stop_at=2)
    assert load(tmp_path / "b" / "checkpoint.pt")["step"] == 2
    resumed = run_counter(tmp_path / "b", 4)
    assert torch.equal(resumed.w, straight.w)
    assert_same(load(tmp_path / "b" / "checkpoint.pt"), load(tmp_path / "a" / "checkpoint.pt"))
    assert metric_lines(tmp_path / "b") == metric_lines(tmp_path / "a")
    assert [r["step"] for r in metric_lines(tmp_path / "b")] == [1, 2, 3, 4]


def test_metrics_log_keeps_records_the_checkpoint_has_seen(tmp_path):
    from tiltflow.training.logger import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    log.truncate_after(2)  # resuming from the checkpoint of step 2 (2 completed iterations)
    assert [r["step"] for r in metric_lines(tmp_path)] == [1, 2]
