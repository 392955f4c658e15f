"""benchmarks/shapes_group_signal.py on hand-made sample folders: renders of a caption pass (no group is all-fail),
a group whose samples all fail in different ways has no pass/fail spread but a graded one."""

import json
from pathlib import Path

import numpy as np
from bench_scripts import load_benchmark
from PIL import Image

from tiltflow.worlds.shapes import render as R
from tiltflow.worlds.shapes.scene import parse


def _folder(tmp_path: Path, items: list[tuple[str, np.ndarray]]) -> Path:
    lines = []
    for i, (prompt, image) in enumerate(items):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "prompt": prompt, "seed": i}))
    (tmp_path / "index.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_counts_groups_with_and_without_a_spread(tmp_path):
    ok = "a photo of a red circle left of a blue square"
    bad = "a photo of two green triangles"
    good = [(ok, R.render(parse(ok), 32, s)) for s in range(3)]
    blank = np.full((32, 32, 3), 250, np.uint8)
    # All three fail "two green triangles": a blank image (credit 0), one green triangle, two red triangles.
    wrong = [(bad, blank), (bad, R.render(parse("a photo of a green triangle"), 32, 0)),
             (bad, R.render(parse("a photo of two red triangles"), 32, 0))]
    out = tmp_path / "s.json"
    assert load_benchmark("shapes_group_signal").main([str(_folder(tmp_path, good + wrong)), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["group_size"] == 3
    assert res["total"] == {"groups": 2, "all_fail": 1, "pass_fail_spread": 0, "graded_spread": 1}
    assert res["per_category"]["position"]["pass_rate"] == 1.0 and res["per_category"]["position"]["graded_mean"] == 1
    assert 0 < res["per_category"]["counting"]["graded_mean"] < 1
