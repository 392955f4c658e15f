"""`tiltflow eval` on a tiny random CLIP: prompt files, generation, folder scoring, reports, errors."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from PIL import Image
from tiny_rewards import make_tiny_clip_folder

from tiltflow.eval.harness import add_eval_arguments, discover_folder, run_eval
from tiltflow.eval.prompts import PromptFileError, load_prompts
from tiltflow.eval.report import summarize, t_quantile_975
from tiltflow.rewards.preprocess import Prompt

REPORTS = ("per_prompt.jsonl", "summary.json", "summary.md", "index.html", "grid.png")



@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip"))


def parse(argv):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def generate(prompts):
    """Deterministic stand-in for a model: brightness from the prompt's length."""
    return torch.stack([torch.full((3, 40, 48), (len(p) % 10) / 10) for p in prompts])


def test_text_prompts_skip_comments_and_blanks(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# a comment\n\na red cube\n   \n  two dogs  \n#x\n")
    assert load_prompts(path) == ["a red cube", "two dogs"]


def test_geneval_jsonl_keeps_metadata(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(
        '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "two cats"}\n\n'
        '{"prompt": "a bench", "tag": "single_object"}\n'
    )
    prompts = load_prompts(path)
    assert prompts == ["two cats", "a bench"]
    assert prompts[0].metadata == {"tag": "counting", "include": [{"class": "cat", "count": 2}]}


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"prompt": "ok"}\n\n{"prompt": "ok"\n', r"meta\.jsonl:3: not valid JSON"),
        ('{"prompt": "ok"}\n["a list"]\n', r"meta\.jsonl:2: expected a JSON object, got list"),
        ('{"prompt": "ok"}\n{"tag": "x"}\n', r"meta\.jsonl:2: the object needs a non-empty string 'prompt'"),
        ("", "holds no prompts"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, match):
    path = tmp_path / "meta.jsonl"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=match):
        load_prompts(path)


def test_bad_bytes_in_text_file_name_the_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nalso fine\nbroken \xff\xfe\n")
    with pytest.raises(PromptFileError, match=r"p\.txt:3: not valid UTF-8"):
        load_prompts(path)


def test_summary_ci_matches_closed_form():
    results = []
    from tiltflow.eval.report import PromptResult

    for i, values in enumerate([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]):
        results.append(PromptResult(i, Prompt(f"p{i}", {"tag": "a" if i < 2 else "b"}), ["x", "y"], {"r": values}))
    stats = summarize(results, ["r"])
    s = stats["rewards"]["r"]
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2  # t_{0.975,3} * sd / sqrt(4), sd^2 = 5/3
    # scipy's t.ppf is accurate to ~1e-14 relative and the sd / sqrt add a few u: rel=1e-9 bounds both
    # (the scipy-less Cornish-Fisher fallback, ~1e-3, would not pass; scipy is in the test extra)
    assert s["mean"] == 2.5 and s["ci95_halfwidth"] == pytest.approx(half, rel=1e-9)
    assert stats["by_tag"] == {"a": {"r": 1.5}, "b": {"r": 3.5}} and stats["num_images"] == 8
    assert t_quantile_975(3) == pytest.approx(3.182446305284263)


def test_generate_then_rescore_folder(clip_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# three prompts\na red cube\ntwo dogs on grass\na bench\n")
    out = tmp_path / "gen"
    reward = f'clip_score={{"model": "{clip_dir}", "weight": 2}}'
    args = parse(
        [
            "--prompts",
            str(prompts),
            "--reward",
            reward,
            "--out",
            str(out),
            "--samples-per-prompt",
            "2",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert run_eval(args, generate=generate) == 0
    assert all((out / name).is_file() for name in REPORTS)
    lines = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == ["a red cube", "two dogs on grass", "a bench"]  # full set
    assert all(len(r["images"]) == 2 and len(r["scores"]["clip_score"]) == 2 for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    clip = summary["rewards"]["clip_score"]
    assert clip["n"] == 3 and clip["ci95_low"] < clip["mean"] < clip["ci95_high"]
    assert summary["rewards"]["weighted_total"]["mean"] == pytest.approx(2 * clip["mean"])
    assert "| clip_score |" in (out / "summary.md").read_text()
    assert "samples/00000_00.png" in (out / "index.html").read_text()
    assert Image.open(out / "grid.png").size == (3 * 196 + 4, 2 * 196 + 4)  # 6 images -> 3 x 2 cells

    again = tmp_path / "again"
    args = parse(
        ["--images", str(out / "samples"), "--reward", reward, "--out", str(again), "--no-progress", "--limit", "2"]
    )
    assert run_eval(args) == 0
    rescored = [json.loads(line) for line in (again / "per_prompt.jsonl").read_text().splitlines()]
    assert len(rescored) == 2
    for first, second in zip(lines, rescored):
        assert second["scores"]["clip_score"] == pytest.approx(first["scores"]["clip_score"], abs=1e-4)


def test_geneval_folder_layout(clip_dir, tmp_path):
    for i, (prompt, tag) in enumerate([("a cat", "single_object"), ("two cats", "counting")]):
        sub = tmp_path / "run" / f"{i:05d}"
        (sub / "samples").mkdir(parents=True)
        (sub / "metadata.jsonl").write_text(json.dumps({"tag": tag, "prompt": prompt}) + "\n")
        for k in range(2):
            Image.new("RGB", (36, 32), (40 * i + 20 * k, 90, 160)).save(sub / "samples" / f"{k:04d}.png")
    samples = discover_folder(tmp_path / "run")
    assert [(s.prompt_index, str(s.prompt)) for s in samples] == [(0, "a cat")] * 2 + [(1, "two cats")] * 2
    out = tmp_path / "out"
    args = parse(
        [
            "--images",
            str(tmp_path / "run"),
            "--reward",
            f'clip_score={{"model": "{clip_dir}"}}',
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert run_eval(args) == 0
    assert set(json.loads((out / "summary.json").read_text())["by_tag"]) == {"single_object", "counting"}


def test_bad_prompt_file_line_is_reported_by_run_eval(tmp_path, capsys):
    prompts = tmp_path / "meta.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"prompt": "fine"}\n{"prompt": 3}\n')
    args = parse(
        [
            "--prompts",
            str(prompts),
            "--reward",
            'remote={"url": "http://127.0.0.1:1"}',
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert run_eval(args, generate=generate) == 2
    assert "meta.jsonl:3:" in capsys.readouterr().err


def test_usage_errors(tmp_path, capsys):
    args = parse(["--reward", "clip_score", "--out", str(tmp_path)])
    assert run_eval(args) == 2 and "exactly one source" in capsys.readouterr().err
    args = parse(["--images", str(tmp_path / "missing"), "--reward", "nope", "--out", str(tmp_path)])
    assert run_eval(args) == 2 and "known rewards: clip_score" in capsys.readouterr().err
