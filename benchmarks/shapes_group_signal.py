"""How much policy-gradient signal the shapes verifier gives a group of samples (issue 9): for each prompt of a
`tiltflow sample` folder (PNGs + index.jsonl, several samples per prompt), whether its samples' pass/fail verdicts
differ (else every sample's verifier advantage is 0) and whether their graded scores (verifier_partial) differ.

    tiltflow sample --run checkpoints/shapes/ac_dmd_s0 --prompts CAPTIONS --out DIR device=cpu sample.num_per_prompt=8
    python benchmarks/shapes_group_signal.py DIR --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from tiltflow.worlds.shapes.scene import parse
    from tiltflow.worlds.shapes.verifier import check, detect, partial_credit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", type=Path, help="a `tiltflow sample` output folder of the shapes world")
    p.add_argument("--out", type=Path, default=None, help="write the summary as JSON here too")
    args = p.parse_args(argv)
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in (args.samples / "index.jsonl").read_text().splitlines():
        row = json.loads(line)
        scene = parse(row["prompt"])
        found = detect(np.asarray(Image.open(args.samples / row["file"]).convert("RGB")))
        groups[row["prompt"]].append((float(check(scene, found).passed), partial_credit(scene, found)))
    per_cat: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for prompt, scores in groups.items():
        verdicts, graded = np.array([s[0] for s in scores]), np.array([s[1] for s in scores])
        c = per_cat[parse(prompt).category]
        c["groups"] += 1
        c["all_fail"] += float(verdicts.max() == 0)
        c["pass_fail_spread"] += float(verdicts.std() > 0)
        c["graded_spread"] += float(graded.std() > 0)
        c["pass_rate_sum"] += float(verdicts.mean())
        c["graded_sum"] += float(graded.mean())
    total = {k: sum(c[k] for c in per_cat.values()) for k in ("groups", "all_fail", "pass_fail_spread",
                                                              "graded_spread")}
    out = {"samples": str(args.samples), "group_size": len(next(iter(groups.values()))), "total": total,
           "per_category": {cat: {"groups": c["groups"], "all_fail": c["all_fail"],
                                  "pass_fail_spread": c["pass_fail_spread"], "graded_spread": c["graded_spread"],
                                  "pass_rate": c["pass_rate_sum"] / c["groups"],
                                  "graded_mean": c["graded_sum"] / c["groups"]} for cat, c in per_cat.items()}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
