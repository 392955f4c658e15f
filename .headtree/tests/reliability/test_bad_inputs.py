"""Bad inputs (issue 11, item 4), through `tiltflow.cli.main` as a user meets them: each gets exit code 2 and
one line on stderr that names the problem (the file and line, the config key, what was given and what was
expected), and no traceback."""

from __future__ import annotations

import pytest
import torch

from tiltflow.cli import main
from tiltflow.rewards.base import RewardOutput, RewardSet
from tiltflow.worlds.gmm import runs


def one_error_line(capsys, ignore: str = "\0") -> str:
    """The one line tiltflow printed (lines starting with `ignore`, a third-party library's warnings, aside)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(ignore)]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["stage1.nonsense=1"], "config error at 'stage1.nonsense': unknown key; valid keys here are"),
    (["seed=abc"], "config error at 'seed': got 'abc', expected an integer"),
    (["stage1.lr=fast"], "config error at 'stage1.lr': got 'fast', expected a number"),
    (["sampler.eta=2"], "config error at 'sampler.eta': got 2.0, expected a value in [0, 1]"),
    (["checkpoint_keep=0"], "config error at 'checkpoint_keep': got 0, expected >= 1"),
    (["on_nonfinite=ignore"], "config error at 'on_nonfinite': got 'ignore', expected one of 'stop' | 'skip'"),
    (["problem.rewards=[{type: magic, a: [1, 0]}]"],
     "config error at 'problem.rewards[0].type': got 'magic', expected one of 'linear' | 'quadratic' | 'halfspace'"),
    (["stage1"], "override must look like 'dotted.key=value'"),
])
def test_config_errors_are_one_line(overrides, expected, tiny_yaml, capsys, tmp_path):
    code = main(["train", "--config", str(tiny_yaml), f"run_dir={tmp_path}", *overrides])
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith("error: ") and expected in line, line


def test_malformed_yaml_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: ac_dmd\nstage1:\n  lr: [0.1,\n  n_fake: 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    line = one_error_line(capsys)
    assert f"malformed YAML in {str(bad)!r} line" in line


def test_binary_config_file(capsys, tmp_path):
    bad = tmp_path / "weights.yaml"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    assert main(["train", "--config", str(bad)]) == 2
    assert str(bad) in one_error_line(capsys)


def test_missing_init_from_folder(tiny_yaml, teacher_run, capsys, tmp_path):
    missing = tmp_path / "no_such_stage1_run"
    assert main(["train", "--config", str(tiny_yaml), "stage=rtdmd", f"run_dir={tmp_path / 'run'}",
                 f"teacher_run={teacher_run}", f"init_from={missing}"]) == 2
    assert str(missing / "final.pt") in one_error_line(capsys)


@pytest.mark.slow
def test_missing_model_folder_of_a_diffusers_run(capsys, tmp_path):
    """A local model folder that does not exist (imports diffusers: slow)."""
    pytest.importorskip("diffusers")
    from pathlib import Path

    config = Path(__file__).parents[2] / "configs" / "sd3" / "ac_dmd.yaml"
    # Prompts inline: the reference config's prompt file is the user's to provide (a missing one is its own
    # one-line error, checked before any model loads).
    assert main(["train", "--config", str(config), f"model.source={tmp_path / 'no_model'}", "device=cpu",
                 f"run_dir={tmp_path / 'run'}", "prompt_file=null", "prompts=[a red cat]"]) == 2
    line = one_error_line(capsys, ignore="[transformers]")  # its torchvision notices
    assert str(tmp_path / "no_model") in line and "does not exist" in line


# ---- prompt files, through `tiltflow eval --generator ... --prompts FILE` ------------------------------
class ConstantReward:
    name, differentiable = "constant", False

    def __call__(self, samples, prompts):
        return RewardOutput(torch.zeros(samples.shape[0]))


def make_constant_reward() -> ConstantReward:
    return ConstantReward()


def generate(prompts):  # never reached: the prompt file is refused first
    raise AssertionError("generate called")


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("empty.txt", b"", "holds no prompts"),
    ("comments.txt", b"# only a comment\n\n", "holds no prompts"),
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", ":1: not valid UTF-8"),
    ("nul.txt", b"a cat\nabc\x00def\n", ":2: holds a NUL byte; is this a binary file?"),
    ("bad.jsonl", b'{"prompt": "a cat"}\n{"prompt": "a dog",\n', ":2: not valid JSON"),
    ("list.jsonl", b'["a cat"]\n', ":1: expected a JSON object, got list"),
    ("noprompt.jsonl", b'{"tag": "single_object"}\n', ":1: the object needs a non-empty string 'prompt'"),
])
def test_bad_prompt_files(name, data, expected, capsys, tmp_path):
    path = tmp_path / name
    path.write_bytes(data)
    code = main(["eval", "--generator", "test_bad_inputs:generate", "--prompts", str(path),
                 "--reward", "test_bad_inputs:make_constant_reward", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    line = one_error_line(capsys)
    assert str(path) in line and expected in line, line


def test_unknown_reward(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = main(["eval", "--generator", "test_bad_inputs:generate", "--prompts", str(prompts),
                 "--reward", "no_such_reward", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "unknown reward 'no_such_reward'; known rewards: clip_score" in one_error_line(capsys)


# ---- a reward that returns the wrong thing, inside a training run ------------------------------------
class WrongReward:
    differentiable = True

    def __init__(self, name: str, make):
        self.name, self.make = name, make

    def __call__(self, samples, prompts):
        return RewardOutput(self.make(samples))


@pytest.mark.parametrize(("make", "expected"), [
    (lambda x: x.sum(dim=1, keepdim=True), "returned scores of shape (32, 1), expected (32,)"),
    (lambda x: x.sum(dim=1)[:-1], "returned scores of shape (31,), expected (32,)"),
    (lambda x: (x.sum(dim=1) > 0).long(), "returned scores of dtype torch.int64, expected a floating-point dtype"),
    (lambda x: x.sum(dim=1).tolist(), "returned RewardOutput with scores of type list, expected a RewardOutput"),
])
def test_reward_of_the_wrong_shape_or_dtype(make, expected, reference, tiny_yaml, teacher_run, monkeypatch, capsys,
                                            tmp_path):
    monkeypatch.setattr(runs, "build_rewards", lambda spec: RewardSet([WrongReward("wrong", make)]))
    code = main(["train", "--config", str(tiny_yaml), "stage=rtdmd", f"run_dir={tmp_path / 'run'}",
                 f"teacher_run={teacher_run}", f"init_from={reference['ac_dmd']}", "stage2.num_iters=1"])
    assert code == 2
    line = one_error_line(capsys)
    assert f"reward 'wrong' {expected}" in line, line
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # stopped in the first step
