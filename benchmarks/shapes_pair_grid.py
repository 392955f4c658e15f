"""Two marked sample grids of the shapes world side by side, each under a title: e.g. the many-step teacher and
a 4-step student on the same test captions (grids written by `tiltflow eval`; the evaluation's grid_indices picks
the same captions for any number of samples per caption, so a teacher evaluated at 1 sample per caption and a
student at 64 show the same 48 captions in the same places).

    python benchmarks/shapes_pair_grid.py LEFT.png "teacher, 50 steps, CFG 3" RIGHT.png "RTDMD, 4 steps" --out OUT.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

TITLE_H, GAP = 28, 24


def pair(left: Path, left_title: str, right: Path, right_title: str) -> Image.Image:
    a, b = Image.open(left).convert("RGB"), Image.open(right).convert("RGB")
    out = Image.new("RGB", (a.width + GAP + b.width, TITLE_H + max(a.height, b.height)), "white")
    draw = ImageDraw.Draw(out)
    for x, image, title in ((0, a, left_title), (a.width + GAP, b, right_title)):
        out.paste(image, (x, TITLE_H))
        draw.text((x + 8, 8), title, fill="black")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("left", type=Path)
    p.add_argument("left_title")
    p.add_argument("right", type=Path)
    p.add_argument("right_title")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for path in (args.left, args.right):
        if not path.is_file():
            p.error(f"{path} does not exist; expected a grid PNG written by `tiltflow eval`")
    pair(args.left, args.left_title, args.right, args.right_title).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
