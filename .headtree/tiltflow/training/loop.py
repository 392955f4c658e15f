"""The training loop every stage runs: resume-by-default, atomic checkpoints, logging, a progress bar on a
terminal and a progress line at a fixed interval elsewhere, and evaluation hooks."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch.optim.optimizer import register_optimizer_step_post_hook
from tqdm.auto import tqdm

from tiltflow.distributed.state import gather_objects, is_main_process
from tiltflow.storage import FAULT_ENV, fault_point
from tiltflow.training.checkpointing import Checkpointer, FileCheckpointer
from tiltflow.training.logger import Logger


class Algorithm(Protocol):
    def step(self, it: int) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopHooks:
    """Model state (the trainable modules), an optional evaluation called every `eval_every` steps and
    `describe_fault(err)`, which turns a device fault inside a step into an error that says where it was."""

    model_state: Callable[[], dict]
    load_model_state: Callable[[dict], None]
    evaluate: Callable[[int], dict[str, float]] | None = None
    describe_fault: Callable[[BaseException, int], BaseException | None] | None = None


@dataclass
class NonFinite:
    """What the algorithm's FiniteGuard does with a NaN/inf loss, gradient or reward (run config
    on_nonfinite, max_skipped_updates)."""

    on_nonfinite: str = "stop"
    max_skipped_updates: int = 10
    check: str = "update"  # nonfinite_check: after every update, or once per step


class ProgressLine:
    """Off a terminal (a log file, CI) there is no progress bar: print step, elapsed time and an estimate
    of what is left every `every_s` seconds instead."""

    def __init__(self, desc: str, start: int, end: int, every_s: float, stream: Any = None):
        self.desc, self.start, self.end, self.every_s = desc, start, end, every_s
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if now - self.last < self.every_s and done < self.end:
            return
        self.last = now
        elapsed = now - self.t0
        rate = (done - self.start) / max(elapsed, 1e-9)
        left = (self.end - done) / rate if rate > 0 else float("nan")
        print(f"[{self.desc}] step {done}/{self.end} ({100 * done / max(self.end, 1):.0f}%), "
              f"{_duration(elapsed)} elapsed, ~{_duration(left)} left", file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def run_loop(algo: Algorithm, hooks: LoopHooks, *, run_dir: Path, num_iters: int, checkpoint_every: int,
             log_every: int, eval_every: int, desc: str, progress: bool = True, stop_at: int | None = None,
             logger: Logger | None = None, progress_every_s: float = 30.0,
             checkpointer: Checkpointer | None = None, nonfinite: NonFinite | None = None,
             time_limit_s: float = 0.0) -> int:
    """Run iterations until num_iters (or stop_at). Returns the number of completed iterations, fewer than
    that when the run paused at `time_limit_s` (> 0: wall seconds of this call, checked after each iteration;
    the run checkpoints and returns, and calling it again resumes from that checkpoint)."""
    ckpt = checkpointer or FileCheckpointer(run_dir)
    log = logger or Logger(run_dir)
    guard = getattr(algo, "guard", None)  # the algorithms' FiniteGuard (a bare test algorithm has none)
    if nonfinite is not None and guard is not None:
        guard.configure(nonfinite.on_nonfinite, nonfinite.max_skipped_updates, nonfinite.check)
    start = 0
    if ckpt.exists():
        state = ckpt.load()
        if state.get("model") is not None:  # a sharded checkpointer restores models and optimisers itself
            hooks.load_model_state(state["model"])
            algo.load_state_dict(state["algo"])
        start = int(state["step"])
        if guard is not None:
            guard.skipped = int(state.get("skipped_updates", 0))
        log.resume_at(start)
        if is_main_process():  # under torchrun, rank 0 speaks for the run
            print(f"[{desc}] resumed from {ckpt.describe()} at step {start}", file=sys.stderr, flush=True)
    end = num_iters if stop_at is None else min(stop_at, num_iters)
    t0 = time.time()
    bar = tqdm(range(start, end), desc=desc, disable=None if progress else True, dynamic_ncols=True, leave=False)
    line = ProgressLine(desc, start, end, progress_every_s) if progress and bar.disable else None
    for it in bar:
        try:
            with _pause_in_optimizer_step(it):
                metrics = algo.step(it)
        except RuntimeError as err:  # not FloatingPointError: the finite guard's own message names the step
            described = hooks.describe_fault(err, it) if hooks.describe_fault else None
            if described is None:
                raise
            raise described from err
        done = it + 1
        if hooks.evaluate is not None and eval_every > 0 and (done % eval_every == 0 or done == num_iters):
            metrics.update(hooks.evaluate(done))
        if done % log_every == 0 or done == end:
            log.write({"step": done, "time_s": round(time.time() - t0, 3), **metrics})
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:3]})
        # out of time on any rank (a collective under torchrun: every rank stops at the same step)
        out_of_time = time_limit_s > 0 and done < end and any(gather_objects(time.time() - t0 > time_limit_s))
        if done % checkpoint_every == 0 or done == end or out_of_time:
            own = getattr(ckpt, "saves_modules_itself", False)  # (the sharded one reads modules and optimisers)
            ckpt.save({"step": done, "model": None if own else hooks.model_state(),
                       "algo": None if own else algo.state_dict(),
                       **({"skipped_updates": guard.skipped} if guard is not None else {})})
        if line is not None:
            line.update(done)
        if out_of_time:
            bar.close()
            print(f"[{desc}] paused at step {done} of {end}: time limit ({time_limit_s:g} s) reached; checkpoint "
                  "saved, run the same command again to resume", file=sys.stderr, flush=True)
            return done
    fault_point("after_loop", end)
    return end


@contextlib.contextmanager
def _pause_in_optimizer_step(it: int) -> Iterator[None]:
    """Test hook (TILTFLOW_FAULT=optimizer_step@<it>): pause after the first optimiser step of iteration
    `it`, with the iteration half done, so that a kill lands inside it."""
    if os.environ.get(FAULT_ENV, "").partition("@")[0] != "optimizer_step":
        yield
        return
    fired = []

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        if not fired:
            fired.append(True)
            fault_point("optimizer_step", it)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()
