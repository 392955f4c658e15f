"""Activation checkpointing under FSDP2 on 2 CPU processes (torchrun, gloo), diffusers world (tiny random SD3,
shared LoRA layout): training with parallel.activation_checkpointing=true runs both stages, and gives the same
losses and the same trained weights as the same 2-rank run without checkpointing.

The bug this guards: peft's adapter switching sets requires_grad on whatever parameter objects a LoRA layer holds
at the time. Under FSDP2 a block holds its all-gathered (unsharded) parameters from the pre-backward hook on, so
the switch that the checkpoint's recomputation makes (to the role that ran the forward) flipped the flags of the
parameters the recomputation computes with: stage 2's frozen stage-1 adapter came back trainable, the
recomputation saved other tensors than the forward, and torch.utils.checkpoint refused ("Recomputed values ...
have different metadata"); and the switch back after the recomputation could leave a trainable adapter's
gathered parameters without requires_grad before their gradients were accumulated.

Tolerance, derived before any number was seen: checkpointing recomputes each block with the same operations on
the same values in the same order (same ranks, same data, same all-gathered weights, no dropout), and its
backward uses the recomputed activations, which equal the saved ones bitwise; so every logged loss and every
trained weight must be bitwise equal to the run without checkpointing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.distributed.is_available(),
                                                   reason="torch.distributed is not available")]

CHECKPOINTING = "parallel.activation_checkpointing=true"


def logged(run_dir: Path) -> list[dict[str, float]]:
    """Every step's logged metrics (losses, fake-score terms, gradient norms, rewards) but the timings (*_s)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def assert_same_run(plain: Path, checkpointed: Path) -> None:
    rows_plain, rows_ckpt = logged(plain), logged(checkpointed)
    assert [r["step"] for r in rows_plain] == [1, 2]
    assert any(k.endswith("loss") for k in rows_plain[0]), rows_plain[0]  # the comparison covers the losses
    assert "gen_grad_norm" in rows_plain[0] and any(k.startswith("fake_") for k in rows_plain[0]), rows_plain[0]
    assert rows_ckpt == rows_plain
    a, b = load_file(str(plain / "final.safetensors")), load_file(str(checkpointed / "final.safetensors"))
    assert set(a) == set(b) and a
    for k in a:
        assert torch.equal(a[k], b[k]), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.parametrize("stage", ["ac_dmd", "rtdmd"])
def test_checkpointing_on_two_ranks_equals_no_checkpointing(stage, diffusers_runs):
    """The run without checkpointing is the 2-rank run of test_fsdp_worlds.py; stage 2 starts from its
    one-process stage-1 run (a frozen stage-1 adapter under the fresh one). Both runs of each kind come from
    conftest.DiffusersRuns (trained once per session; both stages in one torchrun job)."""
    plain, _ = diffusers_runs.two(stage)
    checkpointed, _ = diffusers_runs.two(stage, CHECKPOINTING)
    assert_same_run(plain, checkpointed)
