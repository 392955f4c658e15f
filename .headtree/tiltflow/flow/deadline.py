"""A call given a deadline: the hub probes of tiltflow.models and tiltflow.rewards (parts that may import
only flow/ of tiltflow) run their network call through it, so that a stalled DNS lookup cannot hold them."""

from __future__ import annotations

import threading
from collections.abc import Callable


def answers_within(fn: Callable[[], object], seconds: float) -> bool:
    """Whether fn() returns without raising within `seconds`. It runs in a daemon thread, which is left to
    finish on its own when it takes longer."""
    answer: list[bool] = []

    def run() -> None:
        try:
            fn()
            answer.append(True)
        except Exception:  # noqa: BLE001 - any failure means "no answer"
            answer.append(False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(answer and answer[0])
