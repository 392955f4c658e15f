"""One logging interface for the loop: metrics.jsonl always; TensorBoard and Weights & Biases when they
are installed and asked for (logging.tensorboard / logging.wandb)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from tiltflow.config.schema import LoggingConfig


class MetricsLog:
    """metrics.jsonl: one JSON record per logged step."""

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


def _optional(module: str, setting: str, what: str) -> Any:
    """An optional backend's module (pip package `setting`), or the error saying how to install it or switch it off."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"logging.{setting} is true but {what} is not installed: pip install {setting} "
                           f"(or set logging.{setting}=false)") from err


class Logger:
    """Writes each record to metrics.jsonl and to the optional backends."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig | None = None, run_name: str = "", config: Any = None,
                 enabled: bool = True):
        """enabled=False (ranks other than 0) writes nothing."""
        cfg = cfg or LoggingConfig()
        self.enabled = enabled
        self.jsonl = MetricsLog(run_dir / "metrics.jsonl")
        self.tb = self.wandb = None
        if enabled and cfg.tensorboard:
            writer = _optional("torch.utils.tensorboard", "tensorboard", "TensorBoard").SummaryWriter
            self.tb = writer(log_dir=str(run_dir / "tensorboard"))
        if enabled and cfg.wandb:
            self.wandb = _optional("wandb", "wandb", "wandb").init(
                project=cfg.wandb_project, name=run_name or None, dir=str(run_dir), config=config, resume="allow")

    def resume_at(self, step: int) -> None:
        if self.enabled:
            self.jsonl.truncate_after(step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(record)
        step = int(record["step"])
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
