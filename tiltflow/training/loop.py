"""The training loop every stage runs: resume-by-default, atomic checkpoints, metrics.jsonl, a
progress bar, evaluation hooks and a finite-loss guard (the algorithms raise on non-finite losses)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from tiltflow.training.checkpoint import load, save_atomic


class Algorithm(Protocol):
    def step(self, it: int) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopHooks:
    """Model state (the trainable modules) and an optional evaluation called every `eval_every` steps."""

    model_state: Callable[[], dict]
    load_model_state: Callable[[dict], None]
    evaluate: Callable[[int], dict[str, float]] | None = None


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records from steps that the restored checkpoint has not seen (a record's step,
        like the checkpoint's, counts completed iterations: the checkpoint of step s has seen record s)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))


def run_loop(algo: Algorithm, hooks: LoopHooks, *, run_dir: Path, num_iters: int, checkpoint_every: int,
             log_every: int, eval_every: int, desc: str, progress: bool = True, stop_at: int | None = None) -> int:
    """Run iterations until num_iters (or stop_at). Returns the number of completed iterations."""
    ckpt_path = run_dir / "checkpoint.pt"
    log = MetricsLog(run_dir / "metrics.jsonl")
    start = 0
    if ckpt_path.exists():
        state = load(ckpt_path)
        hooks.load_model_state(state["model"])
        algo.load_state_dict(state["algo"])
        start = int(state["step"])
        log.truncate_after(start)
    end = num_iters if stop_at is None else min(stop_at, num_iters)

    def save(step: int) -> None:
        save_atomic({"step": step, "model": hooks.model_state(), "algo": algo.state_dict()}, ckpt_path)

    t0 = time.time()
    bar = tqdm(range(start, end), desc=desc, disable=None if progress else True, dynamic_ncols=True, leave=False)
    for it in bar:
        metrics = algo.step(it)
        done = it + 1
        if hooks.evaluate is not None and eval_every > 0 and (done % eval_every == 0 or done == num_iters):
            metrics.update(hooks.evaluate(done))
        if done % log_every == 0 or done == end:
            log.write({"step": done, "time_s": round(time.time() - t0, 3), **metrics})
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:3]})
        if done % checkpoint_every == 0 or done == end:
            save(done)
    return end
