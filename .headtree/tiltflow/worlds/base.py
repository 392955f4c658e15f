"""What a world gives the training spine (tiltflow.training.spine): its Task, its role models, how to
evaluate the generator during training and what to save at the end. Everything else (optimisers, the
parallel plan, the loop, checkpoints, logging) is the spine's, the same for every world."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from tiltflow.config.schema import RunConfig, SamplerConfig
from tiltflow.models.ema import EMA
from tiltflow.models.roles import Roles


class TrainModels(Protocol):
    """The modules behind the roles: what a checkpoint holds of them, and how to prepare them."""

    def roles(self) -> Roles: ...

    def trainable_state(self) -> dict[str, Any]: ...

    def load_trainable_state(self, state: dict[str, Any]) -> None: ...

    def enable_activation_checkpointing(self, every: int = 1) -> None: ...

    def modules(self) -> dict[str, Any]:
        """The trainable modules by role ("generator", "fake"; one module may serve both)."""
        ...

    def shard_units(self, include_teacher: bool) -> list[Any]:
        """The modules FSDP2 shards (tiltflow.distributed.fsdp.ShardUnit: a root and its blocks): the
        trainable ones, and a separate frozen teacher when asked."""
        ...


@dataclass
class WorldSetup:
    """One stage's world-specific pieces.

    task: prompts, conditioning, decoding and rewards (tiltflow.algorithms.common.Task).
    evaluate(step): metrics of the generator, called with the EMA weights in place.
    finish(ema): save the final weights (and plots) into the run directory; returns final metrics.
    """

    task: Any
    models: TrainModels
    sampler: SamplerConfig  # resolved (e.g. the family's time shift)
    finish: Callable[[EMA], dict[str, Any]]
    evaluate: Callable[[int], dict[str, float]] | None = None
    eval_every: int = 0  # steps between evaluations (0: none during training)
    # describe_fault(err, where): a device fault inside training restated with what the world knows (model,
    # attention backend, versions), or None for other errors (they keep their own message).
    describe_fault: Callable[[BaseException, str], BaseException | None] | None = None


class World(Protocol):
    """A world: its config class and how to build one stage. `train_teacher` is for worlds whose teacher
    is trained here (not a pretrained model); it writes into cfg.run_dir and returns its metrics."""

    name: ClassVar[str]
    config_class: ClassVar[type[RunConfig]]

    def build(self, cfg: Any, *, progress: bool = True) -> WorldSetup: ...

    def train_teacher(self, cfg: Any, *, progress: bool = True) -> dict[str, Any]: ...


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory and write the resolved config into it. A config already there that differs
    (a resumed run given other settings) is replaced, with a warning naming each changed key."""
    import sys

    import yaml

    from tiltflow.config.loader import to_dict, to_yaml
    from tiltflow.distributed.state import is_main_process

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    if is_main_process():
        try:
            old = yaml.safe_load(path.read_text()) if path.is_file() else None
        except (yaml.YAMLError, UnicodeDecodeError):  # unreadable: nothing to compare, it is replaced
            old = None
        if isinstance(old, dict):
            changed = config_changes(old, to_dict(cfg))
            refuse_structural_changes(old, to_dict(cfg), run_dir)
            if changed:
                print(f"warning: {path} holds another config; replacing it ({'; '.join(changed[:8])}"
                      f"{'; ...' if len(changed) > 8 else ''})", file=sys.stderr, flush=True)
        path.write_text(to_yaml(cfg))
    return run_dir


# Keys that decide what the checkpoint's tensors are (which models, which parameters and their shapes) or what
# they mean (the stage-1 run a stage-2 export builds on): a checkpoint written under other values cannot resume.
STRUCTURAL_KEYS = ("world", "stage", "init_from", "lora.layout", "lora.finetune", "lora.rank", "lora.alpha")
CHECKPOINT_MARKERS = ("checkpoint.pt", "checkpoint-dcp")  # FileCheckpointer's file, ShardedCheckpointer's folder


def refuse_structural_changes(old: dict, new: dict, run_dir: Path) -> None:
    """A run directory holding a checkpoint resumes only under the structure it was written with: a change
    of a STRUCTURAL_KEYS value raises ConfigError naming it, before anything is loaded or overwritten."""
    from tiltflow.config.loader import ConfigError

    if not any((run_dir / m).exists() for m in CHECKPOINT_MARKERS):
        return
    for key in STRUCTURAL_KEYS:
        before, after = _dotted(old, key), _dotted(new, key)
        if key == "init_from" and before and after and Path(before).resolve() == Path(after).resolve():
            continue  # the same stage-1 run, named another way
        if before != after:
            raise ConfigError(key, f"{str(run_dir)!r} holds a checkpoint written with {key}={before!r}, which "
                              f"cannot resume with {key}={after!r}; give another run_dir to start afresh, or "
                              f"{key}={before!r} to resume")


def _dotted(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'key: old -> new' for every dotted key whose value differs between two config dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(old.keys() | new.keys(), key=str)
                for c in config_changes(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def text_sample_settings(cfg: Any, num: int | None, prompt: int | None, seed: int | None) -> Any:
    """A text-to-image world's run config under `tiltflow sample`'s options: --seed replaces sample.seed;
    --num and --prompt belong to worlds whose prompts are indices (gmm) and are refused."""
    import dataclasses

    from tiltflow.config.loader import UsageError

    if num is not None or prompt is not None:
        raise UsageError("--num and --prompt are for a gmm run; here give prompts with --text (repeatable) and "
                         "the count per prompt with sample.num_per_prompt=N")
    return cfg if seed is None else dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, seed=seed))
