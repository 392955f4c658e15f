"""benchmarks/shapes_results.py: a row reads the --metrics file of each of its seeds' folders (mean, sample
standard deviation, range), and --per-prompt sets how many renders per caption the data row scores."""

import json
import math
from pathlib import Path

from bench_scripts import load_benchmark

MODELS = Path(__file__).resolve().parents[2] / "checkpoints" / "shapes"


def _results():
    return load_benchmark("shapes_results")


def test_rows_read_the_named_metrics_file_of_each_seed(tmp_path, monkeypatch):
    results = _results()
    monkeypatch.setattr(results, "data_row", lambda models, device, per_prompt=0: {"verifier/overall": 1.0})
    for seed, (v16, v64) in enumerate([(0.9, 0.30), (0.1, 0.40)]):
        folder = tmp_path / f"run_s{seed}"
        folder.mkdir()
        (folder / "final_metrics.json").write_text(json.dumps({"verifier/overall": v16, "reward/clip": 1.0}))
        (folder / "final_64pp_metrics.json").write_text(json.dumps({"verifier/overall": v64, "reward/clip": 2.0}))
    out = tmp_path / "table.json"
    argv = ["--metrics", "final_64pp_metrics.json", "--run", f"M={tmp_path / 'run_s0'}",
            "--run", f"M={tmp_path / 'run_s1'}", "--out", str(out)]
    assert results.main(argv) == 0
    row = json.loads(out.read_text())["rows"][-1]
    assert row["method"] == "M" and row["num_seeds"] == 2
    assert math.isclose(row["verifier/overall"], 0.35)  # the 64-sample files', not final_metrics.json's 0.5
    assert math.isclose(row["verifier/overall_std"], math.sqrt(2) * 0.05)  # sample std of two values 0.1 apart
    assert (row["verifier/overall_min"], row["verifier/overall_max"]) == (0.30, 0.40)
    assert row["reward/clip"] == 2.0 and "reward/clip_std" in row


def test_per_prompt_sets_the_data_rows_renders(monkeypatch):
    results = _results()
    seen = []

    def fake_evaluate(generate, prompts, batch_size, rewards):
        seen.append(len(prompts))
        return {}, None

    monkeypatch.setattr(results, "evaluate_samples", fake_evaluate)
    monkeypatch.setattr(results, "build_rewards", lambda *a, **k: None)
    results.data_row(MODELS, "cpu", per_prompt=2)
    results.data_row(MODELS, "cpu", per_prompt=3)
    assert seen[1] - seen[0] == seen[0] // 2 > 0  # 3 per caption against 2: one more per caption
