"""What the algorithms share: the Task a world provides (prompts, conditioning, decoding, rewards), the
checkpointable optimiser state the spine builds for them, and the per-step plumbing (optimiser step,
finite-loss guard, metrics averaged over micro-batches)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from tiltflow.distributed import Comm
from tiltflow.flow.rng import to_device
from tiltflow.models.ema import EMA
from tiltflow.rewards.base import RewardSet


class Task(Protocol):
    """What an algorithm needs of a world. Optional, looked up with getattr where a world can offer it:
    linear_reward() -> Tensor | None, the vector a when the total reward of decode(x) is a.x (the
    linear-shift estimator of the tilted denoiser, METHOD.md 5.6). A teacher backbone may likewise offer
    posterior_sampler(cond) -> PosteriorSampler, its exact p(x0 | x_tau) (tiltflow.algorithms.rtdmd)."""

    sample_shape: tuple[int, ...]
    rewards: RewardSet
    guidance_scale: float  # the teacher's CFG scale (1 = the conditional model alone, one pass)
    device: torch.device

    def sample_prompts(self, n: int, generator: torch.Generator) -> list[Any]: ...

    def encode(self, prompts: Sequence[Any]) -> Any: ...

    def encode_uncond(self, n: int) -> Any: ...

    def decode(self, x: Tensor) -> Tensor: ...


@dataclass
class Batch:
    """Prompts and their conditioning; `uncond` only when the teacher uses CFG."""

    prompts: list[Any]
    cond: Any
    uncond: Any

    @staticmethod
    def draw(task: Task, n: int, generator: torch.Generator) -> Batch:
        return Batch.of(task, task.sample_prompts(n, generator))

    @staticmethod
    def of(task: Task, prompts: list[Any]) -> Batch:
        uncond = task.encode_uncond(len(prompts)) if task.guidance_scale != 1.0 else None
        return Batch(prompts, task.encode(prompts), uncond)


def randn(shape: Sequence[int], generator: torch.Generator, like: Tensor) -> Tensor:
    """Gaussian noise from a CPU generator, moved to `like`'s device and dtype (the same numbers on any device)."""
    return to_device(torch.randn(tuple(shape), generator=generator, dtype=like.dtype), like.device)


@dataclass
class TrainState:
    """The checkpointable optimiser state of a two-network algorithm: generator and fake-score
    optimisers and the generator EMA. Built by the spine (tiltflow.training.spine), after sharding."""

    gen_opt: torch.optim.Optimizer
    fake_opt: torch.optim.Optimizer
    ema: EMA

    def state_dict(self) -> dict:
        return {"gen_opt": self.gen_opt.state_dict(), "fake_opt": self.fake_opt.state_dict(),
                "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.gen_opt.load_state_dict(state["gen_opt"])
        self.fake_opt.load_state_dict(state["fake_opt"])
        self.ema.load_state_dict(state["ema"])


GradSync = Callable[[bool], AbstractContextManager]


def always_sync(enabled: bool) -> AbstractContextManager:
    """The default gradient-sync hook: a single process has nothing to synchronise."""
    return contextlib.nullcontext()


class FiniteGuard:
    """The finite-value guard of every update: one check (one host sync, agreed over ranks through `comm`)
    of its loss terms, rewards and gradient norms. on_nonfinite = "stop" raises FloatingPointError naming the
    step and the offending values; "skip" tells the caller to skip the update (no optimiser step, no EMA
    update) and counts it, and raises once more than `max_skipped` updates were skipped.

    check = "step" (with "stop" only) defers the check: each update's values are kept on the device and the
    algorithm reads them all once, at the end of its step (`flush`), so the host never waits for the GPU
    between updates. A non-finite update is then applied, and the updates after it in the same step run on
    what it left; the step raises at its end, before the loop logs, evaluates or writes a checkpoint, so the
    last checkpoint is intact as with "update" (the state in memory is thrown away). The message names the
    first non-finite update; it cannot list the parameters with non-finite gradients (later updates have
    overwritten them)."""

    def __init__(self, comm: Comm, on_nonfinite: str = "stop", max_skipped: int = 0, check: str = "update"):
        self.comm = comm
        self.configure(on_nonfinite, max_skipped, check)
        self.skipped = 0  # updates skipped so far in the run (checkpointed by the loop)
        self.pending: list[tuple[int, str, dict[str, Tensor | float]]] = []  # check = "step": not yet read

    def configure(self, on_nonfinite: str, max_skipped: int, check: str = "update") -> None:
        if on_nonfinite not in ("stop", "skip") or max_skipped < 0 or check not in ("update", "step"):
            raise ValueError(f"need on_nonfinite in ('stop', 'skip'), max_skipped >= 0 and check in ('update', "
                             f"'step'), got {on_nonfinite!r}, {max_skipped}, {check!r}")
        if check == "step" and on_nonfinite != "stop":
            raise ValueError("check = 'step' reads the values after the updates ran, so it cannot skip one; it "
                             f"needs on_nonfinite = 'stop', got {on_nonfinite!r}")
        self.on_nonfinite, self.max_skipped, self.check = on_nonfinite, max_skipped, check

    def ok(self, step: int, update: str, values: Mapping[str, Tensor | float],
           grads: Sequence[nn.Parameter] | None = None) -> bool:
        """True when every value (a scalar, or a tensor such as a batch of rewards) is finite on every rank.
        `grads`: the update's parameters, searched for the non-finite gradients on failure only. With
        check = "step": True at once; the values are read by `flush` at the end of the step."""
        values = {k: _local(v) for k, v in values.items()}
        if self.check == "step":
            self.pending.append((step, update, {k: v.detach() if isinstance(v, Tensor) else v
                                                for k, v in values.items()}))
            return True
        flags = _finite_flags([values])
        if not self.comm.any(not all(flags)):  # every rank agrees, so all stop (or skip) together
            return True
        where = _nonfinite_message(step, update, values, flags, grads)
        if self.on_nonfinite == "stop":
            raise FloatingPointError(f"{where}; stopping (on_nonfinite = stop; the last checkpoint is intact)")
        self.skipped += 1
        if self.skipped > self.max_skipped:
            raise FloatingPointError(f"{where}; {self.skipped} updates skipped, more than max_skipped_updates = "
                                     f"{self.max_skipped}; stopping (the last checkpoint is intact)")
        print(f"warning: {where}; update skipped ({self.skipped} of at most {self.max_skipped})",
              file=sys.stderr, flush=True)
        return False

    def flush(self) -> None:
        """check = "step": read every update's values of the step at once (one host sync, agreed over ranks)
        and raise FloatingPointError naming the first non-finite one. Nothing to do with check = "update"."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        flags = _finite_flags([values for _, _, values in pending])
        if not self.comm.any(not all(flags)):
            return
        first = 0
        for step, update, values in pending:
            mine = flags[first:first + len(values)]
            first += len(values)
            if not all(mine):
                where = _nonfinite_message(step, update, values, mine, None)
                break
        else:
            where = f"non-finite values on another rank in step {pending[0][0]}"
        raise FloatingPointError(f"{where}; found at the end of the step (nonfinite_check = step: the updates after "
                                 "it ran too, and nothing of this step was saved); stopping (on_nonfinite = stop; "
                                 "the last checkpoint is intact)")

    def metrics(self) -> dict[str, float]:
        """`skipped_updates` (the run's total so far) when skipping is on."""
        return {"skipped_updates": float(self.skipped)} if self.on_nonfinite == "skip" else {}


def _finite_flags(groups: Sequence[Mapping[str, Tensor | float]]) -> list[bool]:
    """Whether each value of each group is finite everywhere, in order: one host sync for all of them."""
    values = [v for group in groups for v in group.values()]
    device = next((v.device for v in values if isinstance(v, Tensor)), None)
    return torch.stack([torch.isfinite(torch.as_tensor(v, device=device).detach()).all()
                        for v in values]).tolist()


def _nonfinite_message(step: int, update: str, values: Mapping[str, Tensor | float], flags: Sequence[bool],
                       grads: Sequence[nn.Parameter] | None) -> str:
    bad = [name for name, ok in zip(values, flags) if not ok]
    what = ", ".join(f"{name} = {_first_bad(values[name])}" for name in bad) or "values on another rank"
    details = [_where_bad(name, values[name]) for name in bad if torch.as_tensor(values[name]).numel() > 1]
    details += _bad_gradients(grads) if grads is not None else []
    return f"non-finite {what} at step {step} in the {update}" + (f" ({'; '.join(details)})" if details else "")


def optimizer_step(opt: torch.optim.Optimizer, loss: Tensor, params: list[nn.Parameter], clip: float,
                   guard: FiniteGuard, it: int, role: str, loss_name: str) -> tuple[Tensor, bool]:
    """zero_grad, backward, clip the gradient norm, then the optimiser step unless `guard` finds the loss or
    the norm non-finite (the "<role> update" is skipped or the run stops). Returns (the norm before
    clipping, whether the optimiser stepped)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    stepped = guard.ok(it, f"{role} update", {loss_name: loss, f"{role} gradient norm": norm}, params)
    if stepped:
        opt.step()
    return norm, stepped


def _local(value: Tensor | float) -> Tensor | float:
    """A sharded (DTensor) value, e.g. the gradient norm under FSDP2, as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _first_bad(value: Tensor | float) -> float:
    t = torch.as_tensor(value).detach().flatten()
    return float(t[~torch.isfinite(t)][0])


def _where_bad(name: str, value: Tensor) -> str:
    bad = (~torch.isfinite(value.detach().flatten())).nonzero().flatten().tolist()
    return f"{name}: {len(bad)} of {value.numel()} entries, first at index {bad[0]}"


def _bad_gradients(params: Sequence[nn.Parameter]) -> list[str]:
    """Which parameters hold a non-finite gradient, by position and shape (searched on failure only)."""
    bad = [f"#{i} {tuple(p.shape)}" for i, p in enumerate(params)
           if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    listed = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
    return [f"non-finite gradients in {len(bad)} of {len(params)} parameters: {listed}"] if bad else []


class MeanMetrics:
    """Metrics over the micro-batches (and repeated updates) of one step: means, except worst cases
    (names ending in '_max' or containing '_max_'), which keep the maximum. Values may be device tensors
    (scalars); they are read once, in result(), with one host sync per device instead of one per value,
    and each is read as float(value) would (float32 -> float64 is exact), so the numbers are the same."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Tensor | float]] = []

    def add(self, metrics: Mapping[str, Tensor | float]) -> None:
        self.entries += [(k, _local(v).detach() if isinstance(v, Tensor) else v) for k, v in metrics.items()]

    def result(self) -> dict[str, float]:
        tensors = [v for _, v in self.entries if isinstance(v, Tensor)]
        read: dict[int, float] = {}
        for device in {t.device for t in tensors}:
            on = [t for t in tensors if t.device == device]
            read.update(zip(map(id, on), torch.stack([t.double().reshape(()) for t in on]).tolist()))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for k, v in self.entries:
            v = read[id(v)] if isinstance(v, Tensor) else float(v)
            if k.endswith("_max") or "_max_" in k:
                sums[k] = max(sums.get(k, v), v)
                counts[k] = 1
            else:
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        return {k: s / counts[k] for k, s in sums.items()}


class Phases:
    """The phase an algorithm is in (rollout, fake update, generator update), so that a device fault
    raised inside a step can say where it happened."""

    def __init__(self) -> None:
        self.current = "setup"

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        before, self.current = self.current, name
        yield
        self.current = before
