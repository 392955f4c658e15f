"""`tiltflow bench` on the CPU with tiny architectures: every run yields finite positive times, the passes
counted during the timed iteration are the ones the algorithms' structure implies (stage 1: n_fake fake
updates and one generator update; stage 2: one rollout batch of RTDMD's terms; inference: K forwards and
one decode), efficiency is a positive finite ratio, and what the CPU cannot measure is None."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiltflow.cli import main

K, N_FAKE, BATCH, NUM_TRAINED = 4, 2, 2, 2  # NUM_TRAINED: Stage2Config's SubGRPO default


def _bench(tmp_path, arch, *extra):
    out = tmp_path / f"{arch}.json"
    rc = main(["bench", "--arch", arch, "--resolution", "32", "--stage", "all", "--batch", str(BATCH),
               "--n-fake", str(N_FAKE), "--num-steps", str(K), "--repeats", "2", "--warmup", "1",
               "--device", "cpu", "--out", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def _counts(run):
    """(component, name, batch, grad) -> (calls, backwards), checked identical over the repeats where the
    algorithm's structure fixes them."""
    return {(p["component"], p["name"], p["batch"], p["grad"]): (p["calls"], p["backwards"]) for p in run["passes"]}


def _check_common(run, key):
    for v in run[f"{key}_all"]:
        assert math.isfinite(v) and v > 0
    assert 0 < run[f"{key}_min"] <= run[key] <= run[f"{key}_max"]
    # A ratio of two timings: positive and finite. No upper bound: on a busy CPU a pass timed alone can take
    # longer than the same pass inside the iteration (tests must not depend on timing).
    for eff in ("efficiency", "efficiency_wall"):  # kernel time (the CPU's: perf_counter time) and event time
        assert 0 < run[eff] and math.isfinite(run[eff]), (eff, run[eff])
    assert run["images_per_s"] > 0
    assert run["peak_mem_gib"] is None  # CPU: nothing measured, no number made up
    for p in run["passes"]:
        for t in ("_s", "_kernel_s"):
            assert p[f"forward{t}"] > 0 and (p[f"forward_backward{t}"] is None) == (not p["grad"])
        assert all(b <= c for b, c in zip(p["backwards"], p["calls"]))


def _check_stage1(run):
    c = _counts(run)
    B, reps = BATCH, [1, 1]
    # Each fake update: one DSM pass at B, back-propagated, and one two-sample consistency pass at 2B without a
    # graph (consistency_grad: anchor, the default: h(x'_i) are stop-gradient targets).
    assert c[("transformer", "fake", B, True)] == ([N_FAKE] * 2, [N_FAKE] * 2)
    assert c[("transformer", "fake", 2 * B, False)] == ([N_FAKE] * 2, [0, 0])
    # One generator update: one step with gradient; the DM loss reads the CFG teacher and the fake, no grad.
    assert c[("transformer", "generator", B, True)] == (reps, reps)
    assert c[("transformer", "teacher", B, False)] == ([2, 2], [0, 0])
    assert c[("transformer", "fake", B, False)] == (reps, [0, 0])
    # Rollouts to a random stop k in 0..K-1: k + 1 no-grad steps per fake update, k for the generator's.
    lo, hi = N_FAKE, N_FAKE * K + K - 1
    assert all(lo <= n <= hi for n in c[("transformer", "generator", B, False)][0])
    assert len(c) == 6  # no decode, no reward in stage 1


def _check_stage2(run):
    c = _counts(run)
    G, one = BATCH, ([1, 1], [1, 1])
    assert run["rollout_batches"] == 1
    assert c[("transformer", "generator", G, False)] == ([K, K], [0, 0])  # the rollout
    # Policy gradient on NUM_TRAINED steps + the last step (reward BP and DM), each back-propagated.
    assert c[("transformer", "generator", G, True)] == ([NUM_TRAINED + 1] * 2, [NUM_TRAINED + 1] * 2)
    assert c[("transformer", "fake", G, True)] == one and c[("transformer", "fake", 2 * G, False)] == ([1, 1], [0, 0])
    assert c[("transformer", "teacher", G, False)] == ([2, 2], [0, 0])
    assert c[("transformer", "fake", G, False)] == ([1, 1], [0, 0])
    assert c[("vae_decode", "vae", G, False)] == ([1, 1], [0, 0]) and c[("vae_decode", "vae", G, True)] == one
    assert c[("reward", "brightness", G, False)] == ([1, 1], [0, 0])
    assert c[("reward", "brightness", G, True)] == one
    assert len(c) == 10


def _check_infer(run, batch):
    c = _counts(run)
    assert c == {("transformer", "generator", batch, False): ([K, K], [0, 0]),
                 ("vae_decode", "vae", batch, False): ([1, 1], [0, 0])}
    assert run["latency_ratio"] == pytest.approx(run["latency_s"] / run["bound_s"]) and run["bound_s"] > 0


@pytest.mark.slow  # ~10-20 s each on 2 busy cores
@pytest.mark.parametrize("arch,peak", [("tiny_sd3", None), ("tiny_flux2", "1.0")])
def test_bench_all_stages_on_cpu(tmp_path, arch, peak):
    report = _bench(tmp_path, arch, *(["--peak-tflops", peak] if peak else []))
    prov = report["provenance"]
    for key in ("command", "gpu", "driver", "torch", "diffusers", "transformers", "peft", "date_utc"):
        assert key in prov
    assert prov["command"].startswith("tiltflow bench ") and prov["gpu"] is None
    runs = {(r["stage"], r["batch"]): r for r in report["runs"]}
    assert sorted(runs) == [("1", BATCH), ("2", BATCH), ("infer", 1), ("infer", BATCH)]
    for (stage, _), run in runs.items():
        assert {"efficiency", "mfu", "peak_mem_gib", "images_per_s", "passes"} <= set(run)
        _check_common(run, {"1": "cycle_s", "2": "iter_s", "infer": "latency_s"}[stage])
        assert (run["mfu"] is None) == (peak is None)  # no peak given on a CPU: no MFU
        if peak is not None:
            assert run["mfu"] > 0 and all(f > 0 for f in run["flops"])
    _check_stage1(runs[("1", BATCH)])
    _check_stage2(runs[("2", BATCH)])
    _check_infer(runs[("infer", 1)], 1)
    _check_infer(runs[("infer", BATCH)], BATCH)
    assert "latency_ratio" in runs[("infer", 1)] and "cycle_s" in runs[("1", BATCH)] and "iter_s" in runs[("2", BATCH)]


def test_flops_per_sample_scale_with_batch(tmp_path):
    """MFU counts FLOPs per sample x batch: check that against a count at the batch itself."""
    from torch.utils.flop_counter import FlopCounterMode

    from tiltflow.bench import build, flops_per_sample, one_pass
    from tiltflow.cli import build_parser

    args = build_parser().parse_args(["bench", "--arch", "tiny_sd3", "--resolution", "32", "--device", "cpu",
                                      "--no-activation-checkpointing", "--out", str(tmp_path / "x.json")])
    args.guidance_scale = 4.5
    b = build(args, stage2=False)
    for kind in [("transformer", "fake", 3, True), ("vae_decode", "vae", 3, False)]:
        fwd, bwd = flops_per_sample(b, kind, args)
        with FlopCounterMode(display=False) as fc:
            one_pass(b, kind, 3, backward=kind[3])()
        assert fc.get_total_flops() == 3 * (fwd + bwd) and fwd > 0


def test_bench_help_and_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--peak-tflops" in text and "--activation-checkpointing" in text and "exit codes" in text
    # A full-size architecture on the CPU is a usage error (exit 2), not an hour of swapping.
    assert main(["bench", "--arch", "sd35_medium", "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2


def test_skip_pass_timing_counts_passes_and_reports_no_ratio(tmp_path):
    """--skip-pass-timing times no pass alone: the passes are still counted, and efficiency, MFU, the
    inference bound and its ratios are None (it used to fail on the missing times)."""
    out = tmp_path / "skip.json"
    assert main(["bench", "--arch", "tiny_sd3", "--resolution", "32", "--stage", "infer", "--batch", str(BATCH),
                 "--num-steps", str(K), "--repeats", "1", "--warmup", "1", "--device", "cpu", "--skip-pass-timing",
                 "--peak-tflops", "1", "--out", str(out)]) == 0
    for run in json.loads(out.read_text())["runs"]:
        assert _counts(run)[("transformer", "generator", run["batch"], False)] == ([K], [0])
        assert run["latency_s"] > 0
        for key in ("efficiency", "mfu", "bound_s", "bound_wall_s", "latency_ratio", "latency_ratio_wall"):
            assert run[key] is None, key


@pytest.mark.parametrize("extra", [[], ["--no-mixed-precision", "--no-batched-cfg", "--no-activation-checkpointing"],
                                   ["--mixed-precision", "--checkpoint-every", "2", "--compile", "blocks"]])
def test_recorded_command_reruns_the_same_settings(extra):
    """The provenance command parses back to the same settings, switches turned off included (it used to drop
    --no-mixed-precision, so rerunning it would have turned mixed precision back on)."""
    import argparse

    from tiltflow.bench import add_arguments, command

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--arch", "tiny_sd3", "--out", "b.json", *extra])
    again = p.parse_args(command(args).split()[2:])
    assert vars(again) == vars(args)


def _ev(action, addr, size, where="x.py"):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": "/site/torch/nn/modules/linear.py", "line": 1, "name": "forward"},
                       {"filename": f"/site/diffusers/{where}", "line": 3, "name": "forward"},
                       {"filename": "/repo/tiltflow/algorithms/ac_dmd.py", "line": 7, "name": "fake_update"}]}


def test_live_at_peak_replays_allocs_and_completed_frees():
    from tiltflow.bench import frame_label, live_at_peak

    events = [_ev("alloc", 1, 100), _ev("alloc", 2, 50, "attn.py"),
              _ev("free_requested", 1, 100),  # still held until its free completes
              _ev("alloc", 3, 30), _ev("free_completed", 1, 100), _ev("free_completed", 3, 30),
              _ev("alloc", 4, 120), _ev("free_completed", 4, 120)]
    best, live, at = live_at_peak(events)
    assert best == 180 and sorted(live) == [1, 2, 3] and at["addr"] == 3  # not 50 + 120 = 170 later
    assert frame_label(live[2]["frames"]) == ("diffusers/attn.py:3 forward <- "
                                              "tiltflow/algorithms/ac_dmd.py:7 fake_update")
    torch_f, lib_f, step_f = live[2]["frames"]  # innermost first; the adapter's frame sits between
    adapter_f = {"filename": "/repo/tiltflow/models/adapters/sd3.py", "line": 33, "name": "forward"}
    deep = [torch_f, lib_f, adapter_f, step_f]
    assert frame_label(deep) == ("diffusers/attn.py:3 forward <- tiltflow/models/adapters/sd3.py:33 "
                                                "forward <- tiltflow/algorithms/ac_dmd.py:7 fake_update")
    assert frame_label([]) == "(no Python frame)"
    assert live_at_peak([]) == (0, {}, None)


def test_memory_trace_is_cuda_only(tmp_path):
    from tiltflow.bench import memory_at_peak

    ran = []
    assert "skipped" in memory_at_peak(lambda: ran.append(1), torch.device("cpu"), None, "stage1")
    assert ran == []  # nothing runs where there is no allocator trace


def test_sd35_text_components_have_the_public_sizes():
    """`bench --text-encoders` on sd35_medium builds these: CLIP ViT-L/14 text (123.65 M parameters with its
    projection), OpenCLIP bigG/14 text (694.7 M) and the T5 v1.1 XXL encoder (4.762 B), counted on the meta
    device."""
    import transformers

    from tiltflow.models.arch import load_arch

    spec = load_arch("sd35_medium")
    assert not any(k.startswith("text_encoder") for k in spec["components"])  # stubs unless asked for
    counts = {}
    for name, part in spec["text_components"].items():
        if name.startswith("text_encoder"):
            cfg = {k: v for k, v in part.items() if not k.startswith("_")}
            conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            with torch.device("meta"):
                model = getattr(transformers, part["_class_name"])(conf)
            counts[name] = sum(p.numel() for p in model.parameters())
    assert abs(counts["text_encoder"] - 123.65e6) < 0.01e6
    assert abs(counts["text_encoder_2"] - 694.7e6) < 0.1e6
    assert abs(counts["text_encoder_3"] - 4.762e9) < 0.001e9


def test_text_encoders_run_per_batch_and_stay_out_of_the_transformer_flops(tmp_path):
    """--text-encoders: one text_encode pass per batch of the cycle (n_fake + 1), and each transformer pass's
    FLOPs are those of the run with stub embeddings (the first one counted used to include the encoding of
    its prompts, 22.6 TFLOP too many on SD3.5-M)."""
    rows = {}
    for name, extra in (("stub", []), ("text", ["--text-encoders"])):
        out = tmp_path / f"{name}.json"
        assert main(["bench", "--arch", "tiny_sd3", "--resolution", "64", "--batch", "2", "--stage", "1",
                     "--n-fake", "2", "--device", "cpu", "--repeats", "1", "--warmup", "1", "--out", str(out),
                     *extra]) == 0
        rows[name] = {(p["component"], p["name"], p["batch"], p["grad"]): p
                      for p in json.loads(out.read_text())["runs"][0]["passes"]}
    text = rows["text"].pop(("text_encode", "prompts", 2, False))
    assert text["calls"] == [3] and text["forward_flops"] > 0
    assert rows["text"].keys() == rows["stub"].keys()
    for kind, p in rows["stub"].items():
        assert rows["text"][kind]["forward_flops"] == p["forward_flops"], kind
        assert rows["text"][kind]["backward_flops"] == p["backward_flops"], kind
