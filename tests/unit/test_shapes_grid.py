"""The evaluation grid's choice of samples: spread over the captions, not the first caption's samples."""

import numpy as np

from tiltflow.worlds.shapes.evaluate import grid_indices, write_marked_grid


def test_a_grid_spreads_over_the_captions():
    many = [f"c{k}" for k in range(5) for _ in range(16)]  # 5 captions x 16 samples, as an evaluation orders them
    picked = grid_indices(many, 12)
    captions = [many[i] for i in picked]
    assert sorted(set(captions)) == [f"c{k}" for k in range(5)]  # every caption
    assert [captions.count(f"c{k}") for k in range(5)] == [3, 3, 2, 2, 2]  # first samples, then second, ...
    assert picked[:3] == [0, 1, 2] and picked == sorted(picked) and len(set(picked)) == 12
    wide = [f"c{k}" for k in range(103) for _ in range(4)]
    spread = grid_indices(wide, 48)
    assert len(spread) == 48 and len({wide[i] for i in spread}) == 48  # 48 captions, one sample each
    assert wide[spread[0]] == "c0" and wide[spread[-1]] == "c102"  # from the first caption to the last
    assert grid_indices(["a", "b"], 48) == [0, 1]


def test_the_grid_draws_the_chosen_samples(tmp_path):
    from PIL import Image

    prompts = [f"a photo of a {s}" for s in ("circle", "square", "triangle") for _ in range(8)]
    fills = {"circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255)}  # one flat colour per caption
    images = np.stack([np.full((32, 32, 3), fills[p.split()[-1]], dtype=np.uint8) for p in prompts])
    write_marked_grid(images, prompts, tmp_path / "g.png", max_images=6, scale=1)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    cell_w, cell_h, pad = 32 + 8, 32 + 8 + 40, 6
    assert grid.shape[:2] == (2 * (cell_h + pad) + pad, 3 * (cell_w + pad) + pad)  # 6 samples: 3 x 2, not 24
    centres = [tuple(grid[pad + r * (cell_h + pad) + 20, pad + c * (cell_w + pad) + 20]) for r in range(2)
               for c in range(3)]
    assert centres == [fills["circle"]] * 2 + [fills["square"]] * 2 + [fills["triangle"]] * 2  # two of each caption


def test_grids_of_any_samples_per_caption_show_the_same_captions_in_the_same_places():
    # benchmarks/shapes_pair_grid.py sets a teacher evaluated at 1 sample per caption beside a student at 64
    captions = [f"c{k}" for k in range(103)]
    for per in (1, 16, 64):
        prompts = [c for c in captions for _ in range(per)]
        assert [prompts[i] for i in grid_indices(prompts, 48)] == [captions[i] for i in grid_indices(captions, 48)]


def test_the_pair_grid_puts_two_grids_side_by_side_under_their_titles(tmp_path):
    from bench_scripts import load_benchmark
    from PIL import Image

    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (50, 20), (0, 0, 255)).save(tmp_path / "b.png")
    script = load_benchmark("shapes_pair_grid")
    assert script.main([str(tmp_path / "a.png"), "left", str(tmp_path / "b.png"), "right",
                        "--out", str(tmp_path / "p.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    top, gap = script.TITLE_H, script.GAP
    assert out.shape[:2] == (top + 30, 40 + gap + 50)
    assert tuple(out[top + 15, 20]) == (255, 0, 0) and tuple(out[top + 10, 40 + gap + 25]) == (0, 0, 255)
    assert tuple(out[top + 25, 40 + gap + 25]) == (255, 255, 255)  # below the shorter grid: background
