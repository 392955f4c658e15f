"""The shapes world end to end on CPU with tiny models: the teacher stage (text encoder, CLIP reward model,
SD3 teacher; interrupted and resumed), a few AC-DMD then RTDMD steps through tiltflow.training.spine.train,
sampling a finished run from a prompt file, and `tiltflow eval --run` of the teacher."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from tiltflow.storage import load
from tiltflow.training.spine import train
from tiltflow.worlds.registry import load_run_config
from tiltflow.worlds.shapes.scene import VocabularyError

TINY = ["world=shapes", "device=cpu", "log_every=1", "checkpoint_every=1",
        "model.num_layers=1", "model.num_heads=2", "model.head_dim=8", "model.text_hidden=16", "model.text_layers=1",
        "model.clip_hidden=16", "model.clip_layers=1", "model.clip_projection=16",
        "teacher.num_iters=4", "teacher.batch_size=8", "teacher.num_images=64", "teacher.checkpoint_every=2",
        "teacher.log_every=1", "reward_model.num_iters=2", "reward_model.batch_size=8", "reward_model.num_images=64",
        "reward_model.log_every=1", "eval.max_prompts=6", "eval.num_per_prompt=1", "eval.teacher_steps=3",
        "lora.rank=2", "lora.alpha=2"]
STAGE = ["stage1.num_iters=2", "stage1.batch_size=2", "stage1.n_fake=1", "stage2.num_iters=2",
         "stage2.num_prompts=1", "stage2.group_size=2", "stage2.ema_every=1"]


def _cfg(*overrides):
    return load_run_config(None, [*TINY, *overrides], default_world="shapes")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_models")
    # First call: out of time right after the reward model's first step (it checkpoints and stops).
    first = train(_cfg("stage=teacher", f"run_dir={root}", "teacher.time_limit_s=1e-9"), progress=False)
    assert first["finished"] == 0.0 and first["reward_model/step"] == 1.0
    assert (root / "reward_model_train.pt").is_file() and not (root / "reward_model").exists()
    second = train(_cfg("stage=teacher", f"run_dir={root}"), progress=False)
    assert second["finished"] == 1.0 and second["teacher/step"] == 4.0
    assert load(root / "teacher_train.pt")["step"] == 4
    return root


def test_teacher_stage_writes_loadable_fp16_folders(models_dir):
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPModel

    weights = load_file(str(models_dir / "teacher" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    SD3Transformer2DModel.from_pretrained(str(models_dir / "teacher"), local_files_only=True)
    CLIPModel.from_pretrained(str(models_dir / "reward_model"), local_files_only=True)
    rows = [json.loads(line) for line in (models_dir / "reward_model_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # step 1 before the interruption, step 2 after the resume


def test_teacher_resume_matches_uninterrupted(tmp_path):
    """2 steps + stop + 2 more steps == 4 steps (data and noise are reseeded from (seed, step))."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["stage=teacher", "reward_model.num_iters=1", "teacher.checkpoint_every=1"]
    train(_cfg(*common, f"run_dir={a}", "teacher.num_iters=2"), progress=False)
    (a / "teacher").rename(a / "teacher_at_2")
    train(_cfg(*common, f"run_dir={a}"), progress=False)
    train(_cfg(*common, f"run_dir={b}"), progress=False)
    sa, sb = load(a / "teacher_train.pt"), load(b / "teacher_train.pt")
    for k in sb["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


def _fp16_of(value, base):
    """How far a saved fp16 weight may be from the float32 `value` of another merge of the same run:
    round-to-nearest fp16 is off by at most 2^-11 relative (normal range) or 2^-25 absolute (subnormals), and
    two float32 merges W + B A (rank <= 4 here: at most 5 roundings of magnitude <= 2|W| + |value| each, u = 2^-24)
    may differ by 2 x 5 x 2^-24 (2|W| + |value|) <= 2^-19 (|W| + |value|), W the LoRA's `base` weight."""
    return 2**-11 * value.abs() + 2**-25 + 2**-19 * (value.abs() + base.float().abs())


def _check_student_folder(run_dir, teacher):
    """export_transformer/ is the run's generator as a stock diffusers folder: SD3Transformer2DModel reads it with
    no missing, unexpected or mismatched weight, and every weight is the sampling generator's (its LoRA folded in
    by the roles' own merge of the weights reloaded from final.safetensors) rounded to fp16, within _fp16_of. The
    run must have moved some weight of the fp16 `teacher` by more than that, or a LoRA left out of the folder
    would go unseen. (For a LoRA on full stage-1 weights the export is already full weights: no merge, and the
    teacher term only loosens the bound.)"""
    from diffusers import SD3Transformer2DModel

    from tiltflow.worlds.diffusers_world import sampling_models
    from tiltflow.worlds.shapes.world import build_models

    _, models = sampling_models(load_run_config(run_dir / "config.yaml", [f"run_dir={run_dir}"]), build_models)
    want = models.merged_generator_weights()
    folder = run_dir / "export_transformer"
    assert {v.dtype for v in load_file(str(folder / "diffusion_pytorch_model.safetensors")).values()} == {torch.float16}
    model, info = SD3Transformer2DModel.from_pretrained(str(folder), output_loading_info=True, local_files_only=True)
    assert not any(info.values()), info
    got = {k: v.float() for k, v in model.state_dict().items()}
    assert set(got) == set(want) == set(teacher)
    moved = False
    for key, value in want.items():
        bound = _fp16_of(value, teacher[key])
        assert torch.all((got[key] - value).abs() <= bound), key
        moved |= bool(torch.any((value - teacher[key].float()).abs() > 2 * bound))
    assert moved, f"{run_dir.name}: no weight moved past fp16 rounding; the check above could not see a lost update"


def test_distillation_stages_through_the_spine(models_dir, tmp_path, capsys):
    s1, s2 = tmp_path / "ac_dmd", tmp_path / "rtdmd"
    common = [*STAGE, f"models_dir={models_dir}"]
    # lr 1e-2: LoRA updates past fp16 rounding within 2 iterations (the student folders are checked below)
    m1 = train(_cfg(*common, "stage=ac_dmd", f"run_dir={s1}", "stage1.lr=1e-2"), progress=False)
    assert 0.0 <= m1["verifier/overall"] <= 1.0
    assert (s1 / "final_grid.png").is_file() and (s1 / "final.safetensors").is_file()
    teacher_before = load_file(str(models_dir / "teacher" / "diffusion_pytorch_model.safetensors"))
    m2 = train(_cfg(*common, "stage=rtdmd", f"run_dir={s2}", f"init_from={s1}", "eval.every=1", "stage2.lr=1e-2",
                    "rewards=[{name: clip, weight: 1.0}, {name: verifier, weight: 1.0}]"), progress=False)
    assert "reward/clip" in m2 and "reward/verifier" in m2
    rows = [json.loads(line) for line in (s2 / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_verifier/overall" in r for r in rows)
    # Stage 2 trained its generator LoRA (it differs from stage 1's export); the teacher files are untouched.
    f1, f2 = load_file(str(s1 / "final.safetensors")), load_file(str(s2 / "final.safetensors"))
    gen = [k for k in f2 if k.startswith("generator/")]
    assert gen and any(not torch.equal(f1[k], f2[k]) for k in gen if k in f1)
    after = load_file(str(models_dir / "teacher" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(teacher_before[k], after[k]) for k in after)
    _check_student_folder(s1, teacher_before)  # the students as stock diffusers folders: a LoRA on the teacher
    _check_student_folder(s2, teacher_before)  # two LoRAs on the teacher

    # Sampling the finished run from captions in the vocabulary; an unknown word is named.
    from tiltflow.worlds.shapes.world import ShapesWorld

    run_cfg = load_run_config(s2 / "config.yaml", [f"run_dir={s2}"])
    out = tmp_path / "samples"
    ShapesWorld().sample(run_cfg, texts=["a photo of two red circles", "a photo of a square above a circle"], out=out)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in index] == ["a photo of two red circles", "a photo of a square above a circle"]
    assert all((out / r["file"]).is_file() for r in index) and (out / "grid.png").is_file()
    with pytest.raises(VocabularyError, match="'hexagon'"):
        ShapesWorld().sample(run_cfg, texts=["a photo of a hexagon"], out=tmp_path / "bad")
    # The same through the command, from a caption file: `tiltflow sample --run DIR --prompts FILE --out DIR`.
    from tiltflow.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("a photo of three blue squares\na photo of a yellow triangle\n")
    assert main(["sample", "--run", str(s2), "--prompts", str(captions), "--out", str(tmp_path / "from_file")]) == 0
    index = [json.loads(line) for line in (tmp_path / "from_file" / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in index] == ["a photo of three blue squares", "a photo of a yellow triangle"]
    captions.write_text("a photo of a red hexagon\n")
    capsys.readouterr()
    assert main(["sample", "--run", str(s2), "--prompts", str(captions), "--out", str(tmp_path / "bad2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caption 1" in err[0] and "'hexagon'" in err[0], err  # one line, no traceback

    # Re-evaluating the finished run (`tiltflow eval --run DIR --out OUT`): its final generator, evaluated afresh
    # with the run's own eval settings and noise, gives the run's final metrics; an override changes them.
    n = run_cfg.eval.num_per_prompt
    assert main(["eval", "--run", str(s2), "--out", str(tmp_path / "re")]) == 0
    again = json.loads((tmp_path / "re" / f"final_{n}pp_metrics.json").read_text())
    stored = json.loads((s2 / "final_metrics.json").read_text())
    assert again.keys() == stored.keys()
    # The run evaluated its live generator, the re-evaluation loads its export: the same function in float32 up to
    # the order of its sums. First order, each of the few hundred sequential reductions (4 sampler steps through
    # the 1-layer transformer, then the 1-layer reward model) adds at most u = 6e-8 relative: < 3e-5 in all, so
    # 1e-4 relative on the scores. The verifier reads the images quantised to 8 bits, which such perturbations
    # leave as they are unless a pixel sits on a rounding edge; its pass/fail is compared exactly.
    for k in stored:
        tol = 0.0 if k.startswith("verifier/") else 1e-4 * abs(stored[k])
        assert abs(again[k] - stored[k]) <= tol, (k, stored[k], again[k])
    assert main(["eval", "--run", str(s2), "--out", str(tmp_path / "re"), f"eval.num_per_prompt={2 * n}"]) == 0
    assert (tmp_path / "re" / f"final_{2 * n}pp_grid.png").is_file()


def test_eval_run_of_the_teacher(models_dir, tmp_path):
    from tiltflow.cli import main

    before = sorted(p.name for p in models_dir.rglob("*"))
    t = time.monotonic()
    assert main(["eval", "--run", str(models_dir), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads(next((tmp_path / "ev").glob("teacher_*_metrics.json")).read_text())
    assert set(metrics) >= {"verifier/overall", "reward/clip", "num_steps"}
    accuracy = json.loads((tmp_path / "ev" / "reward_model_metrics.json").read_text())
    assert 0.0 <= accuracy["reward_model/pairwise_colour"] <= 1.0 and "reward_model/pairwise_position" in accuracy
    assert json.loads((tmp_path / "ev" / "eval_run.json").read_text())["metrics"] == accuracy
    assert sorted(p.name for p in models_dir.rglob("*")) == before  # --out: nothing written into the run
    assert time.monotonic() - t < 60


def test_model_cards_are_filled(models_dir):
    calls = [json.loads(line) for line in (models_dir / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and all(c["seconds"] > 0 and c["device"].startswith("CPU") for c in calls)
    for folder in ("text_encoder", "reward_model", "teacher"):
        card = (models_dir / folder / "README.md").read_text()
        assert "| seed | 0 |" in card and "2 call(s)" in card and "{" not in card.split("model section")[0]


def test_time_limit_finish_exports_what_it_has(tmp_path):
    """on_time_limit=finish: one call out of time still leaves a reward model and a teacher (after 1 step each),
    and the card counts the step taken even when it was not a logging step (log_every 100)."""
    out = train(_cfg("stage=teacher", f"run_dir={tmp_path}", "teacher.time_limit_s=1e-9",
                     "teacher.on_time_limit=finish", "teacher.warmup_iters=0", "teacher.log_every=100"),
                progress=False)
    assert out["finished"] == 1.0 and out["teacher/step"] == 1.0 and out["reward_model/step"] == 1.0
    assert "| training steps | 1 of 4 planned |" in (tmp_path / "teacher" / "README.md").read_text()


def test_time_limit_finish_never_exports_a_teacher_in_its_warmup(tmp_path):
    """The first GPU call (2026-12-02) spent its whole budget on the reward model and exported a 1-step teacher
    as "finished": a teacher still in its warm-up pauses instead, and the next call resumes it."""
    cfg = ["stage=teacher", f"run_dir={tmp_path}", "teacher.on_time_limit=finish", "teacher.warmup_iters=3"]
    out = train(_cfg(*cfg, "teacher.time_limit_s=1e-9"), progress=False)
    assert out["finished"] == 0.0 and out["teacher/step"] == 1.0 and not (tmp_path / "teacher").exists()
    assert load(tmp_path / "teacher_train.pt")["step"] == 1
    again = train(_cfg(*cfg), progress=False)
    assert again["finished"] == 1.0 and again["teacher/step"] == 4.0 and (tmp_path / "teacher").is_dir()


def test_teacher_init_from_continues_a_committed_teacher(models_dir, tmp_path):
    """teacher.init_from: model and EMA start from a teacher folder's (fp16) weights, so a committed teacher can
    train longer without its optimiser state; a folder that is not a teacher, or of other sizes, is refused."""
    import shutil

    from tiltflow.config.loader import ConfigError
    from tiltflow.worlds.shapes.models import load_transformer

    source = load_transformer(models_dir / "teacher")
    with torch.no_grad():  # weights no fresh initialisation has: every one moved by 0.25
        for p in source.parameters():
            p.add_(0.25)
    source.half().save_pretrained(str(tmp_path / "source"), safe_serialization=True)
    start = load_transformer(tmp_path / "source").state_dict()
    common = ["stage=teacher", "teacher.num_iters=1", "teacher.lr=1e-12", "teacher.warmup_iters=0"]
    for name in ("more", "fresh"):
        for part in ("text_encoder", "reward_model"):  # done parts are skipped: only the teacher trains
            shutil.copytree(models_dir / part, tmp_path / name / part)
    out = train(_cfg(*common, f"run_dir={tmp_path / 'more'}", f"teacher.init_from={tmp_path / 'source'}"),
                progress=False)
    assert out["finished"] == 1.0 and "reward_model/step" not in out
    card = (tmp_path / "more" / "teacher" / "README.md").read_text()
    assert f"| training steps | 1 of 1 planned, continuing the teacher in `{tmp_path / 'source'}`" in card
    ema = load(tmp_path / "more" / "teacher_train.pt")["ema"]
    for k, v in start.items():  # one step at lr 1e-12 moves no weight by more than about 1e-12
        assert torch.allclose(ema[k], v, rtol=0, atol=1e-9), k
    train(_cfg(*common, f"run_dir={tmp_path / 'fresh'}"), progress=False)
    fresh = load(tmp_path / "fresh" / "teacher_train.pt")["ema"]
    moved = [k for k, _ in source.named_parameters()]  # (buffers such as the position table were not moved)
    assert moved and all(not torch.allclose(fresh[k], start[k], rtol=0, atol=0.1) for k in moved)
    with pytest.raises(ConfigError, match="teacher.init_from"):
        train(_cfg(*common, f"run_dir={tmp_path / 'none'}", f"teacher.init_from={tmp_path}"), progress=False)
    made = {p.name for p in (tmp_path / "none").iterdir()}
    assert made <= {"config.yaml"}, made  # refused before any model or data was made
    with pytest.raises(ValueError, match="does not fit the configured model"):
        train(_cfg("stage=teacher", f"run_dir={tmp_path / 'other'}", "model.head_dim=4", "teacher.num_iters=1",
                   "reward_model.num_iters=1", f"teacher.init_from={tmp_path / 'source'}"), progress=False)


def test_non_finite_teacher_loss_names_its_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """The losses stay on the device and are read at rows and checkpoints only; a NaN at step 6 (between the
    checkpoint at step 5 and the next row) stops the run naming step 6, and teacher_train.pt still holds the
    step-5 weights."""
    import torch.nn.functional as F

    from tiltflow.worlds.shapes import teacher as teacher_mod

    cfg = ["stage=teacher", f"run_dir={tmp_path}", "teacher.num_iters=12", "teacher.checkpoint_every=5",
           "teacher.log_every=4", "reward_model.num_iters=1"]
    calls = {"n": 0}
    real = F.mse_loss

    def poisoned(*args, **kw):  # the teacher's 7th loss (step 6) is NaN
        calls["n"] += 1
        out = real(*args, **kw)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(teacher_mod.F, "mse_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"teacher: non-finite flow-matching loss \(nan\) at step 6"):
        train(_cfg(*cfg), progress=False)
    saved = load(tmp_path / "teacher_train.pt")
    assert saved["step"] == 5 and all(torch.isfinite(v).all() for v in saved["model"].values())
    rows = [json.loads(line) for line in (tmp_path / "teacher_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4]  # the row of step 8 would have held the NaN: never written


def test_shapes_demo_before_and_after(models_dir, tmp_path, capsys):
    """`tiltflow demo --world shapes`: the starting generator's scores and samples, a short RTDMD run through
    the spine, the same captions and noise after; report, grids and metrics written."""
    from tiltflow.cli import main

    out = tmp_path / "demo"
    tiny = [o for o in TINY if o.startswith(("model.", "lora."))]
    argv = ["demo", "--world", "shapes", "--out", str(out), f"models_dir={models_dir}", *tiny,
            "stage2.num_iters=2", "stage2.num_prompts=1", "stage2.group_size=2", "eval.max_prompts=3",
            "eval.num_per_prompt=2"]
    assert main(argv) == 0
    for name in ("before_metrics.json", "after_metrics.json", "before_after.png", "report.md",
                 "rtdmd/final.safetensors", "rtdmd/config.yaml", "rtdmd/metrics.jsonl"):
        assert (out / name).is_file(), name
    m = json.loads((out / "demo_metrics.json").read_text())
    assert m["before"]["reward/clip"] != m["after"]["reward/clip"]  # the generator moved
    # "after" is the run's final generator on the same prompts and noise as its own final evaluation
    final = json.loads((out / "rtdmd" / "final_metrics.json").read_text())
    assert m["after"]["verifier/overall"] == final["verifier/overall"]
    assert m["after"]["reward/clip"] == final["reward/clip"]  # the same weights, prompts and noise
    report = (out / "report.md").read_text()
    assert "before: the teacher, no CFG" in report and "after: RTDMD fine-tune" in report


def test_shapes_demo_usage_errors(tmp_path, capsys):
    from tiltflow.cli import main

    assert main(["demo", "--world", "shapes", "--out", str(tmp_path), f"models_dir={tmp_path / 'none'}"]) == 2
    assert "lacks ['teacher', 'text_encoder', 'reward_model']" in capsys.readouterr().err
    assert main(["demo", "--world", "shapes", "--methods", "ac_dmd"]) == 2
    assert "not --config or --methods" in capsys.readouterr().err


def test_a_lora_stage2_on_a_full_fine_tuned_stage1_starts_where_it_ended_and_exports_full_weights(models_dir,
                                                                                                   tmp_path):
    """The reference recipe's stage 2 (a fresh LoRA) on a full-fine-tuned stage-1 run: the generator's and the
    fake score's LoRAs sit on frozen copies of stage 1's generator and fake score, so stage 2 starts exactly where
    stage 1 ended; the export folds the LoRA into the stage-1 weights, and sampling reads it."""
    from tiltflow.config.loader import ConfigError
    from tiltflow.worlds.diffusers_world import read_final
    from tiltflow.worlds.shapes.world import ShapesWorld, build_models

    s1, s2 = tmp_path / "full", tmp_path / "lora"
    common = [*STAGE, f"models_dir={models_dir}"]
    train(_cfg(*common, "stage=ac_dmd", f"run_dir={s1}", "lora.finetune=full", "lora.layout=separate"), progress=False)
    stage1 = read_final(s1)
    cfg2 = _cfg(*common, "stage=rtdmd", f"run_dir={s2}", f"init_from={s1}", "lora.layout=separate", "lora.alpha=4")
    with pytest.raises(ConfigError, match="lora.layout.*full-fine-tuning run"):
        build_models(_cfg(*common, "stage=rtdmd", f"run_dir={s2}", f"init_from={s1}"), stage1)

    # The start: the same velocities as stage 1's generator and fake score (its full weights, loaded plainly). A
    # fresh LoRA adds exactly zero (B = 0), so both sides run the same float32 operations on the same weights:
    # equal up to nothing; 1e-5 only allows another kernel choice between the peft-wrapped and the plain Linear.
    adapter, models = build_models(cfg2, stage1)
    _, full = build_models(_cfg(*common, "stage=ac_dmd", f"run_dir={s1}", "lora.finetune=full",
                                "lora.layout=separate"), None)
    full.generator.load_state_dict({k.removeprefix("export/"): v for k, v in stage1.items()
                                    if k.startswith("export/")})
    full.load_trainable_state(stage1, roles=("fake",))
    torch.manual_seed(0)
    x, sigma = torch.randn(2, *adapter.latent_shape(adapter.resolution, adapter.resolution)), torch.tensor([0.7, 0.3])
    cond = adapter.encode(["a photo of a red circle", "a photo of two blue squares"])
    with torch.no_grad():
        for role in ("generator_role", "fake_role"):
            torch.testing.assert_close(getattr(models, role).velocity(x, sigma, cond),
                                       getattr(full, role).velocity(x, sigma, cond), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(models.teacher_role.velocity(x, sigma, cond),
                                  models.generator_role.velocity(x, sigma, cond))
        # The fold: a LoRA made non-zero, folded into plain weights, gives the LoRA model's velocity. They differ by
        # association only, (W + s B A) x against W x + s B (A x): a few float32 roundings (u = 6e-8) per product of
        # a one-block model with inner sizes <= 64 on O(1) values, far inside rtol 1e-4; a dropped or doubled
        # scaling s = alpha / rank = 2 moves the output by the whole LoRA term (0.05-size weights), far outside.
        for _, p in models.generator_named:
            p.add_(0.05 * torch.randn_like(p))
        full.generator.load_state_dict(models.merged_generator_weights())
        torch.testing.assert_close(full.generator_role.velocity(x, sigma, cond),
                                   models.generator_role.velocity(x, sigma, cond), rtol=1e-4, atol=1e-5)

    # Training it: only LoRA weights are trained; the export is full weights; sampling reads them.
    train(cfg2, progress=False)
    final = read_final(s2)
    assert all(".lora_" in k for k in final if k.startswith(("generator/", "fake/")))
    assert not any(".lora_" in k for k in final if k.startswith("export/"))
    run_cfg = load_run_config(s2 / "config.yaml", [f"run_dir={s2}"])
    ShapesWorld().sample(run_cfg, texts=["a photo of two red circles"], out=tmp_path / "samples")
    assert (tmp_path / "samples" / "grid.png").is_file()
    teacher = load_file(str(models_dir / "teacher" / "diffusion_pytorch_model.safetensors"))
    _check_student_folder(s1, teacher)  # full weights
    _check_student_folder(s2, teacher)  # a LoRA folded into full stage-1 weights


def test_export_precision_script_evaluates_the_run_and_its_fp16_weights(models_dir, tmp_path):
    """benchmarks/shapes_export_precision.py: its evaluation of the run as trained, with the run's own settings,
    reproduces the run's final_metrics.json; the fp16 side is a second evaluation of the same captions."""
    from bench_scripts import load_benchmark

    run = tmp_path / "ac_dmd"
    train(_cfg(*STAGE, f"models_dir={models_dir}", "stage=ac_dmd", f"run_dir={run}", "stage1.lr=1e-2"), progress=False)
    assert load_benchmark("shapes_export_precision").main(["--run", str(run), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["as_trained"] == json.loads((run / "final_metrics.json").read_text())
    assert set(result["fp16_weights"]) == set(result["as_trained"]) and "provenance" in result
    assert result["difference"] == {k: v - result["as_trained"][k] for k, v in result["fp16_weights"].items()}
    assert result["moved_norm"] > 0 and 0 < result["rounding_over_moved"] < 1


def test_tiltflow_export_writes_the_run_s_student_in_the_dtype_asked(models_dir, tmp_path, capsys):
    """`tiltflow export --run DIR --out DIR --dtype fp32`: the student exactly (float32: the exported folder
    reproduces the sampling generator's velocity as test_export's merged-transformer check does), and within
    fp16 rounding of the folder training wrote (a path apart: the export LoRA folded into the teacher); an --out
    that holds files, and a world without transformers, are usage errors (exit 2)."""
    from diffusers import SD3Transformer2DModel

    from tiltflow.cli import main
    from tiltflow.worlds.diffusers_world import sampling_models
    from tiltflow.worlds.shapes.world import build_models

    run = tmp_path / "ac_dmd"
    train(_cfg(*STAGE, f"models_dir={models_dir}", "stage=ac_dmd", f"run_dir={run}", "stage1.lr=1e-2"), progress=False)
    out = tmp_path / "fp32"
    assert main(["export", "--run", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    exported = SD3Transformer2DModel.from_pretrained(str(out), local_files_only=True)
    trained = load_file(str(run / "export_transformer" / "diffusion_pytorch_model.safetensors"))
    teacher = load_file(str(models_dir / "teacher" / "diffusion_pytorch_model.safetensors"))
    for key, value in exported.state_dict().items():
        assert torch.all((trained[key].float() - value).abs() <= _fp16_of(value, teacher[key])), key
    adapter, models = sampling_models(load_run_config(run / "config.yaml", [f"run_dir={run}"]), build_models)
    torch.manual_seed(0)
    x, sigma = torch.randn(2, *adapter.latent_shape(adapter.resolution, adapter.resolution)), torch.tensor([0.7, 0.3])
    cond = adapter.encode(["a photo of a red circle", "a photo of two blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(adapter.forward(exported, x, sigma, cond),
                                   models.generator_role.velocity(x, sigma, cond), atol=2e-5, rtol=1e-5)
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    gmm = tmp_path / "gmm"
    gmm.mkdir()
    (gmm / "config.yaml").write_text("world: gmm\nstage: ac_dmd\n")
    assert main(["export", "--run", str(gmm), "--out", str(tmp_path / "g")]) == 2
    assert "the gmm world has no `export`" in capsys.readouterr().err
