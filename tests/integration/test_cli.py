"""`tiltflow <verb>` (tiltflow/cli.py): help, dry runs, config errors as exit code 2, and a tiny
train -> sample -> eval round trip on CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tiltflow.cli import main

VERBS = ["train", "sample", "eval", "demo"]


def exit_code(argv: list[str]) -> int:
    """main(argv) as a process would see it: the return value, or the SystemExit code."""
    try:
        return main(argv)
    except SystemExit as e:
        return 0 if e.code is None else e.code if isinstance(e.code, int) else 1


def test_help(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: tiltflow" in out and all(v in out for v in VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(verb, capsys):
    assert exit_code([verb, "--help"]) == 0
    assert f"usage: tiltflow {verb}" in capsys.readouterr().out


def test_no_verb_is_a_usage_error(capsys):
    assert exit_code([]) == 2
    assert "usage" in capsys.readouterr().err


def test_help_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "tiltflow.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: tiltflow" in proc.stdout


def test_dry_run_prints_resolved_config_with_overrides(tiny_yaml, capsys):
    assert main(["train", "--config", str(tiny_yaml), "--dry-run", "stage2.beta=0.25", "stage=grpo_only"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["stage2"]["beta"] == 0.25
    assert printed["stage2"]["w_dm"] == 0.0 and printed["stage2"]["w_bp"] == 0.0  # the stage preset
    assert printed["model"] == {"hidden": 32, "depth": 2, "embed": 8}  # the file
    assert printed["eval"]["every"] == 0


def test_demo_dry_run_uses_the_default_problem(capsys):
    assert main(["demo", "--dry-run", "stage2.beta=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert len(printed["problem"]["prompts"]) == 3 and printed["stage2"]["beta"] == 2.0


@pytest.mark.parametrize(
    ("override", "fragment"),
    [("stage2.betaa=1", "stage2.betaa"), ("stage2.num_iters=abc", "stage2.num_iters"),
     ("stage2.group_size=1", "stage2.group_size")],
)
def test_config_error_exits_2_and_names_the_key(tiny_yaml, override, fragment, capsys):
    assert main(["train", "--config", str(tiny_yaml), "--dry-run", override]) == 2
    captured = capsys.readouterr()
    assert fragment in captured.err and captured.out == ""


def test_missing_config_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["train", "--config", str(missing), "--dry-run"]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_yaml, teacher_run):
    """A 3-iteration ac_dmd run made through `tiltflow train`."""
    run_dir = tmp_path_factory.mktemp("cli_run")
    assert main(["train", "--config", str(tiny_yaml), f"run_dir={run_dir}", f"teacher_run={teacher_run}"]) == 0
    return run_dir


def test_train_writes_a_run_directory(trained_run, capsys):
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "final.pt"):
        assert (trained_run / name).is_file()


def test_train_teacher_stage(tiny_yaml, tmp_path, capsys):
    assert main(["train", "--config", str(tiny_yaml), "stage=teacher", f"run_dir={tmp_path}",
                 "teacher.train_steps=5"]) == 0
    assert (tmp_path / "teacher.pt").is_file()
    assert "teacher written to" in capsys.readouterr().out
    # A teacher run is a run like the others: plots, final metrics, and `sample --run` samples the teacher.
    for name in ("config.yaml", "metrics.jsonl", "final_metrics.json"):
        assert (tmp_path / name).is_file(), name
    out = tmp_path / "teacher_samples.npy"
    assert main(["sample", "--run", str(tmp_path), "--num", "7", "--out", str(out)]) == 0
    assert np.load(out).shape == (7, 2)
    assert "Euler steps" in capsys.readouterr().out


def test_sample_writes_array(trained_run, tmp_path, capsys):
    out = tmp_path / "nested" / "x.npy"
    assert main(["sample", "--run", str(trained_run), "--num", "50", "--prompt", "1", "--out", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (50, 2) and np.isfinite(x).all()
    # Same seed, same samples; another prompt, other samples.
    out2 = tmp_path / "y.npy"
    assert main(["sample", "--run", str(trained_run), "--num", "50", "--prompt", "1", "--out", str(out2)]) == 0
    np.testing.assert_array_equal(np.load(out2), x)
    assert main(["sample", "--run", str(trained_run), "--num", "50", "--prompt", "0", "--out", str(out2)]) == 0
    assert not np.array_equal(np.load(out2), x)


@pytest.mark.parametrize("prompt", ["2", "-1"])
def test_sample_out_of_range_prompt(trained_run, tmp_path, prompt, capsys):
    out = tmp_path / "x.npy"
    # A usage error: exit code 2, like argparse's own and every config error (one convention, see --help).
    assert main(["sample", "--run", str(trained_run), "--num", "5", "--prompt", prompt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--prompt {prompt} out of range" in err and "0..1" in err
    assert not out.exists()


def test_sample_prompt_file_is_for_text_worlds(trained_run, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    assert main(["sample", "--run", str(trained_run), "--prompts", str(tmp_path / "p.txt"), "--out",
                 str(tmp_path / "x.npy")]) == 2
    assert "--prompts: the gmm world samples from condition indices" in capsys.readouterr().err


def test_sample_from_unfinished_run_exits_2(trained_run, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text((trained_run / "config.yaml").read_text())  # but no final.pt
    assert main(["sample", "--run", str(tmp_path), "--out", str(tmp_path / "x.npy")]) == 2
    assert "final.pt" in capsys.readouterr().err


def test_eval_prints_metrics_json(trained_run, capsys):
    assert main(["eval", "--run", str(trained_run), "--num", "200"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("reward_mean", "mode_tv", "energy_distance", "kl_estimate"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["mode_tv"] <= 1.0


def test_eval_without_run_needs_the_image_options(capsys):
    # --reward and --out belong to image evaluation; `eval --run DIR` must not need them.
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "--reward" in err and "--out" in err and "--run" in err


def test_train_non_finite_loss_exits_1(tiny_yaml, teacher_run, tmp_path, monkeypatch, capsys):
    from tiltflow.worlds.gmm import runs

    class NaNTeacher:
        def velocity(self, x, sigma, cond):
            return x * float("nan")

    monkeypatch.setattr(runs, "teacher_backbone", lambda cfg, gmm, net: NaNTeacher())
    assert main(["train", "--config", str(tiny_yaml), f"run_dir={tmp_path}", f"teacher_run={teacher_run}"]) == 1
    assert "non-finite generator DM loss" in capsys.readouterr().err


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: ac_dmd\nseed: a: b\n")  # "mapping values are not allowed here", line 2
    assert main(["train", "--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert str(bad) in err[0] and "line 2" in err[0] and "<unicode string>" not in err[0]


def test_missing_run_directory_is_a_usage_error(tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x.npy")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err


def test_help_states_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "exit codes: 0 success, 2 usage/config/input error, 1 failure while running" in capsys.readouterr().out


def test_diffusers_bad_prompt_file_and_unknown_reward_fail_before_any_model_loads(tmp_path, capsys):
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01 not text")
    common = ["--config", str(tiny_diffusers_yaml(tmp_path)), f"run_dir={tmp_path / 'run'}"]
    assert main(["train", *common, f"prompt_file={binary}", "prompts=[]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prompt_file" in err[0] and "UTF-8" in err[0], err
    assert main(["train", *common, "rewards=[{name: hpsv3}]", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rewards[0].name" in err[0] and "hpsv3" in err[0], err


def tiny_diffusers_yaml(tmp_path):
    path = tmp_path / "tiny_diffusers.yaml"
    path.write_text("world: diffusers\nstage: ac_dmd\ndevice: cpu\nprompts: [a red cat]\n"
                    "model: {family: sd3, random_weights: true, arch: tiny_sd3, resolution: 32}\n")
    return path


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a CUDA device")
def test_a_cuda_config_on_a_machine_without_cuda_is_a_usage_error(trained_run, tiny_yaml, tmp_path, capsys):
    # A run directory written on a GPU machine, evaluated on a CPU one: the key and the override are named,
    # and nothing runs (no torch traceback from the first model move).
    for argv in (["eval", "--run", str(trained_run), "device=cuda"],
                 ["train", "--config", str(tiny_yaml), f"run_dir={tmp_path / 'r'}", "device=cuda"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "device" in err and "'cuda'" in err and "device=cpu" in err, err
    assert not (tmp_path / "r").exists()
    assert main(["train", "--config", str(tiny_yaml), "--dry-run", "device=cuda"]) == 0  # dry runs need no GPU
