"""Numerical faults (issue 11, item 3): a NaN/inf injected into a loss, a gradient or a reward stops the run
with the step, the update, the loss term and the offending tensor named (exit code 1, the last checkpoint
intact). With on_nonfinite: skip the update is skipped instead (no optimiser step, no EMA update), counted
in metrics.jsonl (skipped_updates) and in the checkpoint, up to max_skipped_updates; one more stops the run.

Faults are injected in the test process and the run is a forked child (reliability_helpers.Child), which
inherits them. "At step N" names the iteration that follows the checkpoint of step N (N done before it)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from reliability_helpers import Child, assert_bitwise, assert_same_run, metrics_without_time

from tiltflow.algorithms import ac_dmd, rtdmd
from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.storage import load
from tiltflow.worlds.gmm import runs

NAN = float("nan")


def run(argv: list[str], log: Path) -> tuple[int, str]:
    child = Child(argv, log)
    return child.join(), child.text()


def error_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("error:")]
    assert "Traceback" not in text
    return line


def track_iteration(monkeypatch, algorithm: type) -> dict[str, int]:
    """A cell holding the iteration `algorithm.step` is running (for faults injected at one iteration)."""
    cell = {"it": -1}
    real_step = algorithm.step

    def step(self, it):
        cell["it"] = it
        return real_step(self, it)

    monkeypatch.setattr(algorithm, "step", step)
    return cell


def nan_generator_loss(monkeypatch, at: set[int]) -> None:
    """Stage 1's generator DM loss is NaN at the iterations in `at`."""
    cell = track_iteration(monkeypatch, ac_dmd.ACDMD)
    real = ac_dmd.dm_loss

    def dm_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * NAN) if cell["it"] in at else out

    monkeypatch.setattr(ac_dmd, "dm_loss", dm_loss)


def inf_generator_gradient(monkeypatch, at: int) -> None:
    """A finite loss whose gradient into the generator's first parameter is infinite, at iteration `at`."""
    cell = track_iteration(monkeypatch, ac_dmd.ACDMD)
    real = ac_dmd.dm_loss

    def dm_loss(roles, *args, **kwargs):
        out = real(roles, *args, **kwargs)
        if cell["it"] == at:
            param = roles.generator_params[0]
            handle = param.register_hook(lambda g: (handle.remove(), torch.full_like(g, float("inf")))[1])
        return out

    monkeypatch.setattr(ac_dmd, "dm_loss", dm_loss)


class OneNaNScore:
    """The problem's linear reward, except that sample 5's score is NaN at iteration `at` of stage 2."""

    def __init__(self, inner, cell: dict[str, int], at: int):
        self.inner, self.cell, self.at = inner, cell, at
        self.name, self.differentiable = inner.name, inner.differentiable

    def __call__(self, samples, prompts):
        scores = self.inner(samples, prompts).scores
        if self.cell["it"] == self.at:
            scores = scores.clone()
            scores[5] = NAN
        return RewardOutput(scores)


def nan_reward(monkeypatch, at: int) -> None:
    cell = track_iteration(monkeypatch, rtdmd.RTDMD)
    real = runs.build_rewards

    def build_rewards(spec):
        rs = real(spec)
        return RewardSet([OneNaNScore(r, cell, at) for r in rs.rewards], rs.weights)

    monkeypatch.setattr(runs, "build_rewards", build_rewards)


def test_nan_loss_stops_naming_step_term_and_gradients(monkeypatch, train_args, tmp_path):
    nan_generator_loss(monkeypatch, at={3})
    code, out = run(train_args("ac_dmd", tmp_path / "s1"), tmp_path / "log")
    assert code == 1
    line = error_line(out)
    assert "non-finite generator DM loss = nan, generator gradient norm = nan at step 3 in the generator update" \
        in line
    assert "non-finite gradients in" in line and "on_nonfinite = stop" in line
    assert load(tmp_path / "s1" / "checkpoint.pt")["step"] == 3


def test_inf_gradient_stops_naming_the_parameter(monkeypatch, reference, train_args, tmp_path):
    inf_generator_gradient(monkeypatch, at=2)
    code, out = run(train_args("ac_dmd", tmp_path / "s1"), tmp_path / "log")
    assert code == 1
    line = error_line(out)
    assert "non-finite generator gradient norm = inf at step 2 in the generator update" in line
    assert "loss" not in line.split(" at step")[0]  # the loss was finite: only the gradient is named
    first = next(iter(load(reference["ac_dmd"] / "checkpoint.pt")["model"]["generator"].values()))
    assert "non-finite gradients in 1 of " in line and f"#0 {tuple(first.shape)}" in line
    assert load(tmp_path / "s1" / "checkpoint.pt")["step"] == 2


def test_nan_reward_stops_naming_the_sample(monkeypatch, reference, train_args, tmp_path):
    nan_reward(monkeypatch, at=2)
    code, out = run(train_args("rtdmd", tmp_path / "s2", f"init_from={reference['ac_dmd']}"), tmp_path / "log")
    assert code == 1
    line = error_line(out)
    assert "at step 2 in the generator update" in line
    assert "reward linear scores = nan" in line
    assert "reward linear scores: 1 of 32 entries, first at index 5" in line
    assert load(tmp_path / "s2" / "checkpoint.pt")["step"] == 2


def test_skip_leaves_the_generator_and_its_ema_untouched_and_counts(monkeypatch, reference, train_args, tmp_path):
    """on_nonfinite: skip, a NaN generator loss at iteration 2: that update changes neither the generator,
    nor its optimiser state, nor the EMA; the fake-score updates of the iteration still happen; the
    iterations before are the reference run's, bit for bit; the run finishes and reports one skip."""
    nan_generator_loss(monkeypatch, at={2})
    run_dir = tmp_path / "s1"
    code, out = run(train_args("ac_dmd", run_dir, "on_nonfinite=skip", "max_skipped_updates=1",
                               "checkpoint_keep=6"), tmp_path / "log")
    assert code == 0, out
    assert "update skipped (1 of at most 1)" in out
    before, after = (load(run_dir / f"checkpoint-step{s:08d}.pt") for s in (2, 3))
    assert_bitwise(after["model"]["generator"], before["model"]["generator"], "generator")
    assert_bitwise(after["algo"]["gen_opt"], before["algo"]["gen_opt"], "generator optimiser")
    assert_bitwise(after["algo"]["ema"], before["algo"]["ema"], "ema")
    assert any(not torch.equal(a, b) for a, b in zip(after["model"]["fake"].values(),
                                                     before["model"]["fake"].values()))  # fake updates ran
    assert after["skipped_updates"] == 1

    records = metrics_without_time(run_dir)
    want = metrics_without_time(reference["ac_dmd"])
    for got, ref_record in zip(records[:2], want[:2]):
        assert {k: v for k, v in got.items() if k != "skipped_updates"} == ref_record
    assert [r["skipped_updates"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert json.loads((run_dir / "final_metrics.json").read_text())  # the run finished


@pytest.mark.parametrize("fault", ["loss", "reward"])
def test_skip_stops_past_the_limit(fault, monkeypatch, reference, train_args, tmp_path):
    if fault == "loss":
        nan_generator_loss(monkeypatch, at={1, 2, 3, 4, 5})
        argv = train_args("ac_dmd", tmp_path / "run")
    else:
        nan_reward(monkeypatch, at=1)
        argv = train_args("rtdmd", tmp_path / "run", f"init_from={reference['ac_dmd']}")
    limit = 2 if fault == "loss" else 0
    code, out = run([*argv, "on_nonfinite=skip", f"max_skipped_updates={limit}"], tmp_path / "log")
    assert code == 1
    line = error_line(out)
    stop_at = 1 + limit  # iterations 1, 2 skipped, the third skip (iteration 3) is one too many
    assert f"at step {stop_at} in the generator update" in line
    assert f"{limit + 1} updates skipped, more than max_skipped_updates = {limit}; stopping" in line


# nonfinite_check: step (issue 8: no host wait between updates): the values are read once, at the end of the
# step; a non-finite update is found there, the run stops before that step is logged or saved.
STEP_CHECK = "nonfinite_check=step"


def test_step_check_changes_nothing_in_a_clean_run(reference, train_args, tmp_path):
    for stage, extra in (("ac_dmd", []), ("rtdmd", [f"init_from={reference['ac_dmd']}"])):
        code, out = run(train_args(stage, tmp_path / stage, STEP_CHECK, *extra), tmp_path / f"{stage}.log")
        assert code == 0, out
        assert_same_run(tmp_path / stage, reference[stage])


def test_step_check_stops_at_the_end_of_the_step_naming_the_update(monkeypatch, train_args, tmp_path):
    nan_generator_loss(monkeypatch, at={3})
    code, out = run(train_args("ac_dmd", tmp_path / "s1", STEP_CHECK), tmp_path / "log")
    assert code == 1
    line = error_line(out)
    assert "non-finite generator DM loss = nan, generator gradient norm = nan at step 3 in the generator update" \
        in line and "found at the end of the step" in line and "on_nonfinite = stop" in line
    # the NaN step (the 4th iteration) was neither logged nor saved: the checkpoint is that of step 3, intact
    assert load(tmp_path / "s1" / "checkpoint.pt")["step"] == 3
    assert [r["step"] for r in metrics_without_time(tmp_path / "s1")][-1] == 3


def test_step_check_names_the_sample_of_a_nan_reward(monkeypatch, reference, train_args, tmp_path):
    nan_reward(monkeypatch, at=2)
    code, out = run(train_args("rtdmd", tmp_path / "s2", STEP_CHECK, f"init_from={reference['ac_dmd']}"),
                    tmp_path / "log")
    assert code == 1
    line = error_line(out)
    assert "at step 2 in the generator update" in line and "found at the end of the step" in line
    assert "reward linear scores: 1 of 32 entries, first at index 5" in line
    assert load(tmp_path / "s2" / "checkpoint.pt")["step"] == 2


def test_step_check_cannot_skip(train_args, tmp_path, capsys):
    from tiltflow.cli import main

    assert main(train_args("ac_dmd", tmp_path / "s1", STEP_CHECK, "on_nonfinite=skip")) == 2
    err = capsys.readouterr().err
    assert "nonfinite_check" in err and "on_nonfinite: stop" in err
    assert not (tmp_path / "s1").exists()
