"""A toy two-network training state for the distributed-checkpoint tests (test_dcp_checkpoint.py): a generator
and a fake score (two MLPs, or one MLP whose two layers the two optimisers share out, like the shared LoRA
layout), their AdamW optimisers and the generator's EMA, sharded with FSDP2 on several ranks or plain in one
process. Every rank trains on the same batches, so a sharded step does the arithmetic of an unsharded one
(AdamW and the EMA are elementwise; the reduced gradient is (g + g) / 2 = g): runs on 2 ranks and on one
process agree bitwise, and a resumed run can be compared with a straight one bit for bit.

Run under torchrun: `dcp_toy.py save|resume <dir> separate|shared [<dir> separate|shared ...]` (see main)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from tiltflow.algorithms.common import TrainState
from tiltflow.models.ema import EMA

SAVED_AT, MORE = 3, 2  # the checkpoint is saved after SAVED_AT steps; MORE steps follow it
SKIPPED = 1  # the generator's update of step 0 is skipped (as on_nonfinite: skip would)


def build(shard: bool, shared: bool = False, hidden: int = 6) -> tuple[dict[str, nn.Module], TrainState]:
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    fake = gen if shared else nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    if shard:
        from tiltflow.distributed.fsdp import ShardUnit, fsdp_shard

        nets = [gen] if shared else [gen, fake]
        fsdp_shard([ShardUnit(n, [n[0], n[2]]) for n in nets], device_type="cpu", bf16=False)
    gen_params = list(gen[0].parameters()) if shared else list(gen.parameters())
    fake_params = list(fake[2].parameters()) if shared else list(fake.parameters())
    state = TrainState(torch.optim.AdamW(gen_params, lr=1e-2, weight_decay=0.1),
                       torch.optim.AdamW(fake_params, lr=2e-2, betas=(0.8, 0.99)), EMA(gen_params, 0.9))
    return {"generator": gen, "fake": fake}, state


def step(modules: dict[str, nn.Module], state: TrainState, it: int) -> float:
    """One iteration: a fake update, then a generator update (skipped at step 0) and the EMA; returns the loss."""
    g = torch.Generator().manual_seed(100 + it)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    loss = 0.0
    for role, opt in (("fake", state.fake_opt), ("generator", state.gen_opt)):
        opt.zero_grad(set_to_none=True)
        value = (modules[role](x) - y).square().mean()
        value.backward()
        loss += float(value.detach())
        if role == "generator" and it < SKIPPED:
            continue
        opt.step()
        if role == "generator":
            state.ema.update()
    for opt in (state.fake_opt, state.gen_opt):
        opt.zero_grad(set_to_none=True)
    return loss


def whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def snapshot(modules: dict[str, nn.Module], state: TrainState) -> dict:
    """Every trainable tensor as a whole tensor (a collective on several ranks): parameters by role and name,
    optimiser state by role, parameter index and key, EMA shadows in order."""
    out: dict = {"params": {}, "optim": {}, "ema": [whole(s) for s in state.ema.shadow]}
    for role, opt in (("generator", state.gen_opt), ("fake", state.fake_opt)):
        out["params"][role] = {n: whole(p) for n, p in modules[role].named_parameters()}
        flat = [p for group in opt.param_groups for p in group["params"]]
        out["optim"][role] = {i: {k: whole(v) for k, v in opt.state[p].items()} for i, p in enumerate(flat)
                              if p in opt.state}
        out["optim"][role + "_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return out


def main(mode: str, jobs: list[tuple[Path, bool]]) -> None:
    """For each (folder, shared) in turn, on the same ranks, from a freshly built state (build() seeds it):
    save: train SAVED_AT steps, save a checkpoint (with skipped_updates = SKIPPED), write the whole state then
    and the losses of MORE further steps to reference.pt. resume (a later job: fresh ranks): load that
    checkpoint and write the state loaded and the losses of MORE steps to resumed.pt. Both layouts in one job
    spare a torchrun start (fresh interpreters) per layout."""
    import torch.distributed as dist

    from tiltflow.distributed import TorchComm
    from tiltflow.training.sharded_checkpoint import ShardedCheckpointer

    dist.init_process_group("gloo")
    for folder, shared in jobs:
        modules, state = build(shard=True, shared=shared)
        ckpt = ShardedCheckpointer(folder, TorchComm(), modules, state)
        if mode == "save":
            for it in range(SAVED_AT):
                step(modules, state, it)
            ckpt.save({"step": SAVED_AT, "skipped_updates": SKIPPED, "model": None, "algo": None})
            out = {"state": snapshot(modules, state)}
        else:
            loaded = ckpt.load()
            out = {"loop": {k: v for k, v in loaded.items() if k not in ("model", "algo")},
                   "state": snapshot(modules, state)}
        out["losses"] = [step(modules, state, it) for it in range(SAVED_AT, SAVED_AT + MORE)]
        if dist.get_rank() == 0:
            torch.save(out, folder / f"{'reference' if mode == 'save' else 'resumed'}.pt")


if __name__ == "__main__":
    # dcp_toy.py save|resume <dir> separate|shared [<dir> separate|shared ...]
    args = sys.argv[2:]
    assert args and len(args) % 2 == 0 and set(args[1::2]) <= {"separate", "shared"}, sys.argv
    main(sys.argv[1], [(Path(d), layout == "shared") for d, layout in zip(args[::2], args[1::2])])
    from tiltflow.distributed.launch import finish_process

    finish_process(0)  # destroys the process group; why it ends the process at once: see there
