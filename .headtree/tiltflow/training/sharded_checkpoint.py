"""Checkpoints of a run on several ranks, in torch.distributed.checkpoint's format (DCP): each rank writes
its own shards, no rank ever holds the whole state, and a checkpoint saved on N ranks loads on any M (one
process without a process group included): DCP reshards on load.

Layout in the run directory:

    checkpoint.pt                  the commit record (weights-only): {"format", "sharded": True, "step",
                                   "dirs": the committed step directories, newest first}
    checkpoint-dcp/step<N>/        one checkpoint: .metadata and __<rank>_0.distcp (DCP), tiltflow.pt

A step directory holds only tensors in DCP (`model/<role>/<name>`: the trainable parameters, from
get_model_state_dict; `optim/<role>/<name>/<key>`: the optimisers' moments and step counts, keyed by
parameter name; `ema/<name>`: the EMA shadows), each a DTensor shard or a whole tensor. Everything else,
small and the same on every rank, is in tiltflow.pt, written through tiltflow.storage (weights-only): the
loop's state (step, skipped updates; the step alone restores the data position and every RNG stream,
which are keyed by (seed, rank, step)), the optimisers' hyperparameters, the EMA decay, which roles share a
module and how many ranks wrote it. DCP would pickle non-tensor values and unpickle them on load; keeping
them out of it keeps every load weights-only, and the .metadata file (a pickle DCP writes) is read with an
unpickler that accepts DCP's own metadata classes only.

Atomicity: the ranks write into checkpoint-dcp/.step<N>.tmp; once every rank's shards and the metadata are
written (and fsynced), rank 0 renames that directory to step<N>, then atomically replaces checkpoint.pt
(tiltflow.storage.save_atomic), then removes directories no longer committed. checkpoint.pt is the commit:
a kill at any moment leaves it naming complete directories only; what an interrupted write left behind is
removed when the run resumes. Every rank-0 step ends in an agreement (a collective), so a failed write stops
or retries every rank together.

The optimiser state is taken from the optimisers directly instead of through get_optimizer_state_dict: that
function runs a zero-learning-rate step on an optimiser without state (to create it), which would give a
run whose updates were all skipped (on_nonfinite: skip) a state its uninterrupted twin does not have, and it
carries the hyperparameters as objects DCP pickles."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tiltflow.algorithms.common import TrainState
from tiltflow.config.loader import ConfigError
from tiltflow.distributed import Comm
from tiltflow.distributed.state import gather_objects, in_process_group
from tiltflow.storage import UNREADABLE, UnsafeFileError, fault_point, fsync_dir, load, save_atomic
from tiltflow.training.checkpointing import CheckpointError, write_with_retries

FORMAT = "tiltflow-dcp"
VERSION = 1
FOLDER = "checkpoint-dcp"
META = "tiltflow.pt"
STEP_DIR = re.compile(r"step(\d{8})")
TMP_DIR = re.compile(r"\.step\d{8}\.tmp")


class ShardedCheckpointer:
    """The Checkpointer of a run on several ranks (and of one process resuming such a run): save, load,
    exists, describe, as FileCheckpointer. keep: how many committed checkpoints stay (newest first; load
    falls back to an older one when the newest cannot be read); retries, retry_wait_s: a failed write is
    retried on every rank together, then raises CheckpointError."""

    saves_modules_itself = True  # the loop passes no copies of the model and algorithm state to save()

    def __init__(self, run_dir: Path, comm: Comm, modules: Mapping[str, nn.Module], state: TrainState,
                 name: str = "checkpoint.pt", *, keep: int = 1, retries: int = 0, retry_wait_s: float = 10.0,
                 warn: Callable[[str], None] | None = None):
        if keep < 1 or retries < 0 or retry_wait_s < 0:
            raise ValueError(f"need keep >= 1, retries >= 0, retry_wait_s >= 0; got {keep}, {retries}, {retry_wait_s}")
        self.path = Path(run_dir) / name
        self.folder = Path(run_dir) / FOLDER
        self.comm, self.modules, self.state = comm, dict(modules), state
        self.optims = {"generator": state.gen_opt, "fake": state.fake_opt}
        self.keep, self.retries, self.retry_wait_s = keep, retries, retry_wait_s
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.loaded: str | None = None
        if comm.rank == 0:
            self._remove_leftovers()

    @staticmethod
    def folder_in(run_dir: Path) -> bool:
        """Whether run_dir holds a distributed checkpoint folder (the checkpoints of a run on several ranks)."""
        return (Path(run_dir) / FOLDER).is_dir()

    # ---- the Checkpointer interface --------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.exists()

    def describe(self) -> str:
        return self.loaded or f"{self.folder} (distributed checkpoint, {self.comm.world_size} ranks)"

    def save(self, state: dict[str, Any]) -> None:
        """Write the modules', optimisers' and EMA's state (taken from them, not from `state`) and every other
        entry of `state` (step, skipped_updates). Collective: every rank calls it."""
        loop = {k: v for k, v in state.items() if k not in ("model", "algo")}
        step = int(loop["step"])
        target = self.folder / f"step{step:08d}"
        write_with_retries(lambda: self._write(target, loop), f"{target} (step {step})", _WriteFailed,
                           self.retries, self.retry_wait_s, self.warn)

    def load(self) -> dict[str, Any]:
        """Load the newest readable committed checkpoint into the modules, optimisers and EMA of this rank;
        returns the loop's state ({"step", "skipped_updates", "model": None, "algo": None}: nothing left for
        the loop to load). When checkpoint.pt cannot be read, the step directories are tried newest first
        (each is complete: it is renamed into place only once written). A checkpoint.pt written by one
        process (FileCheckpointer) is cut into this rank's shards and returned for the loop to load."""
        try:
            record = load(self.path)
        except UnsafeFileError:
            raise
        except UNREADABLE as err:
            self.warn(f"checkpoint {self.path} cannot be read ({type(err).__name__}: {_first_line(err)}); trying "
                      f"the step directories in {self.folder}")
            record = {"format": FORMAT, "dirs": self._step_dirs()}
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            if isinstance(record, dict) and "model" in record and "algo" in record and not record.get("sharded"):
                self.loaded = f"{self.path} (written by one process)"
                return self._from_one_process(record)
            raise CheckpointError(f"{self.path} is not a checkpoint this version of tiltflow resumes (no "
                                  f"'format': '{FORMAT}'; a gathered checkpoint of an earlier version?); start a "
                                  "new run_dir or resume with the version that wrote it")
        errors = []
        for name in record["dirs"]:
            folder = self.folder / name
            try:
                loop, ranks = self._load_dir(folder)
            except _Unreadable as err:
                errors.append(f"{name}: {err}")
                self.warn(f"checkpoint {folder} cannot be read ({err}); trying an older one")
                continue
            self.loaded = f"{folder} (distributed checkpoint written by {ranks} ranks)"
            return {**loop, "model": None, "algo": None}
        raise CheckpointError(f"no readable checkpoint in {self.folder}: " + ("; ".join(errors) or "none there"))

    # ---- writing ---------------------------------------------------------------------------------------
    def _write(self, target: Path, loop: dict[str, Any]) -> None:
        """One attempt: shards into a temporary directory, then rank 0 commits it. Raises _WriteFailed on
        every rank if any rank's write failed."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        tmp = target.with_name(f".{target.name}.tmp")
        self._on_main(lambda: self._prepare(tmp, target))
        tensors = self.tensors()
        try:
            with _single_process_quiet():
                dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=_no_dist())
        except CheckpointException as err:
            if all(isinstance(exc, OSError) for exc, _ in err.failures.values()):
                raise _WriteFailed(_first_failure(err)) from None
            raise
        self._on_main(lambda: save_atomic(self._meta(loop), tmp / META))
        fault_point("checkpoint_shards", int(loop["step"]))
        self._on_main(lambda: self._commit(tmp, target, int(loop["step"])))

    def tensors(self) -> dict[str, Tensor]:
        """What DCP writes: this rank's shards (DTensors) or whole tensors, keyed model/<role>/<name>,
        optim/<role>/<name>/<key> and ema/<name>."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        out: dict[str, Tensor] = {}
        for role, module in self._distinct().items():
            sd = get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=True))
            out.update({f"model/{role}/{k}": v for k, v in sd.items()})
        for role, opt in self.optims.items():
            names = self._names(role)
            for p in (p for group in opt.param_groups for p in group["params"]):
                for key, value in opt.state.get(p, {}).items():
                    if not torch.is_tensor(value):
                        raise TypeError(f"the {role} optimiser's state {key!r} of {names[id(p)]} is a "
                                        f"{type(value).__name__}; a distributed checkpoint holds tensors only")
                    out[f"optim/{role}/{names[id(p)]}/{key}"] = value
        names = self._names("generator")
        out.update({f"ema/{names[id(p)]}": s for p, s in zip(self.state.ema.params, self.state.ema.shadow)})
        return out

    def _meta(self, loop: dict[str, Any]) -> dict[str, Any]:
        """tiltflow.pt: the small state every rank shares (weights-only: numbers, strings, containers)."""
        groups = {}
        for role, opt in self.optims.items():
            names = self._names(role)
            groups[role] = [{**{k: v for k, v in g.items() if k != "params"},
                             "params": [names[id(p)] for p in g["params"]]} for g in opt.param_groups]
        return {"format": FORMAT, "version": VERSION, "loop": loop, "world_size": self.comm.world_size,
                "roles": self._aliases(), "param_groups": groups, "ema_decay": self.state.ema.decay}

    def _prepare(self, tmp: Path, target: Path) -> None:
        if target.name in self._committed():
            raise RuntimeError(f"{target} is committed; a run never writes the same step twice")
        for folder in (tmp, target):
            if folder.exists():
                shutil.rmtree(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _commit(self, tmp: Path, target: Path, step: int) -> None:
        """Rename the complete temporary directory into place, then replace the commit record."""
        fsync_dir(tmp)
        os.replace(tmp, target)
        fsync_dir(self.folder)
        dirs = [target.name, *self._committed()][:self.keep]
        save_atomic({"format": FORMAT, "sharded": True, "step": step, "dirs": dirs}, self.path)
        self._remove_uncommitted(set(dirs))

    def _on_main(self, fn: Callable[[], None]) -> None:
        """Run fn on rank 0 and agree on its outcome (a collective): an OSError there (a full disk) becomes
        _WriteFailed on every rank; any other error stops every rank."""
        error: tuple[str, str] | None = None
        raised: BaseException | None = None
        if self.comm.rank == 0:
            try:
                fn()
            except OSError as err:
                error = ("os", err.strerror or str(err))
            except Exception as err:  # a bug: re-raised on rank 0, reported on the others
                error, raised = ("bug", f"{type(err).__name__}: {err}"), err
        reported = [e for e in gather_objects(error) if e]
        if not reported:
            return
        if raised is not None:
            raise raised
        kind, message = reported[0]  # type: ignore[misc]
        if kind == "os":
            raise _WriteFailed(message)
        raise RuntimeError(f"rank 0 failed while writing the checkpoint: {message}")

    # ---- reading ---------------------------------------------------------------------------------------
    def _load_dir(self, folder: Path) -> tuple[dict[str, Any], int]:
        """Load one step directory; returns the loop's state and the number of ranks that wrote it.
        _Unreadable: missing or damaged files (the caller tries an older one); ConfigError: it was written
        for other models than this run's."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        problem = None
        try:
            meta = self._read_meta(folder)
            metadata = read_metadata(folder)
            check_files(folder, metadata)
        except _Unreadable as err:
            problem = str(err)
        problems = [p for p in gather_objects(problem) if p]  # every rank tries the next one, or none does
        if problems:
            raise _Unreadable(problems[0])
        if meta["roles"] != self._aliases():
            raise _layout_error(folder, f"its roles share modules as {meta['roles']}, this run's as "
                                        f"{self._aliases()}")
        for role in self.optims:
            self._check_groups(folder, role, meta["param_groups"][role])
        models, targets = self._targets(folder, metadata)
        try:
            with _single_process_quiet():
                dcp.load(targets, storage_reader=safe_reader(folder), no_dist=_no_dist())
        except CheckpointException as err:
            for exc, _ in err.failures.values():
                if isinstance(exc, UnsafeFileError):
                    raise exc from None
            raise _Unreadable(_first_failure(err)) from None
        self._apply(models, targets, meta)
        return dict(meta["loop"]), int(meta["world_size"])

    def _read_meta(self, folder: Path) -> dict[str, Any]:
        try:
            meta = load(folder / META)
        except UnsafeFileError:
            raise
        except UNREADABLE as err:
            raise _Unreadable(f"{META}: {type(err).__name__}: {_first_line(err)}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _Unreadable(f"{META} is not a {FORMAT} record")
        return meta

    def _targets(self, folder: Path, metadata: Any) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
        """The tensors DCP loads into, in place: the modules' state dicts (this rank's shards), the EMA shadows
        themselves and the optimiser state the checkpoint holds, shaped after its metadata (the optimisers of
        a resumed run have none yet). Raises ConfigError when the checkpoint holds other tensors."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        models, targets = {}, {}
        for role, module in self._distinct().items():
            models[role] = get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=True))
            targets.update({f"model/{role}/{k}": v for k, v in models[role].items()})
        names = self._names("generator")
        targets.update({f"ema/{names[id(p)]}": s for p, s in zip(self.state.ema.params, self.state.ema.shadow)})
        _check_tensors(folder, targets, metadata)
        params = {role: self._params(role) for role in self.optims}
        for key, md in metadata.state_dict_metadata.items():
            if not key.startswith("optim/"):
                continue
            role, _, rest = key.removeprefix("optim/").partition("/")
            name, _, _ = rest.rpartition("/")
            p = params.get(role, {}).get(name)
            if p is None:
                raise _layout_error(folder, f"it holds optimiser state of {role} parameter {name!r}, which this "
                                            "run does not train")
            if len(md.size) > 0 and tuple(md.size) != tuple(p.shape):
                raise _layout_error(folder, f"{key}: {tuple(md.size)} there, {tuple(p.shape)} here")
            targets[key] = _shaped_like(p, tuple(md.size), md.properties.dtype)
        return models, targets

    def _apply(self, models: dict[str, dict[str, Tensor]], targets: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Hand the loaded tensors to the modules and optimisers (the EMA shadows were loaded in place)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        for role, module in self._distinct().items():
            set_model_state_dict(module, models[role], options=StateDictOptions(strict=False))
        for role, opt in self.optims.items():
            opt.load_state_dict(self._optimizer_state(role, targets, meta["param_groups"][role]))
        self.state.ema.decay = float(meta["ema_decay"])

    def _optimizer_state(self, role: str, targets: dict[str, Tensor], saved_groups: list[dict[str, Any]]) -> dict:
        """The optimiser's own state-dict format (parameters numbered in group order) from name-keyed state."""
        opt, names = self.optims[role], self._names(role)
        mine = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
        state: dict[int, dict[str, Tensor]] = {}
        groups, index = [], 0
        for names_in_group, saved in zip(mine, saved_groups):
            groups.append({**saved, "params": list(range(index, index + len(names_in_group)))})
            for i, name in enumerate(names_in_group, index):
                prefix = f"optim/{role}/{name}/"
                entry = {k.removeprefix(prefix): v for k, v in targets.items() if k.startswith(prefix)}
                if entry:
                    state[i] = entry
            index += len(names_in_group)
        return {"state": state, "param_groups": groups}

    def _check_groups(self, folder: Path, role: str, saved_groups: list[dict[str, Any]]) -> None:
        """The role's optimiser holds the parameters the checkpoint's did, by name and group."""
        names = self._names(role)
        mine = [[names[id(p)] for p in g["params"]] for g in self.optims[role].param_groups]
        theirs = [list(g["params"]) for g in saved_groups]
        if mine != theirs:
            raise _layout_error(folder, f"its {role} optimiser's parameter groups hold other parameters "
                                        f"({sum(map(len, theirs))} against this run's {sum(map(len, mine))})")

    # ---- one-process checkpoints on several ranks ------------------------------------------------------
    def _from_one_process(self, record: dict[str, Any]) -> dict[str, Any]:
        """FileCheckpointer's checkpoint.pt (whole tensors) for this rank: every tensor of a trainable
        parameter, of its optimiser state and of its EMA shadow is cut to that parameter's shard
        (distribute_tensor, a collective: every rank walks the same file in the same order). The model
        state is recognised in both layouts the worlds write: {role: {name: tensor}} and {"role/name": tensor}."""
        params = {role: self._params(role) for role in self.optims}
        model = {}
        for key, value in record["model"].items():
            if isinstance(value, dict):
                model[key] = {k: _shard_like(v, params.get(key, {}).get(k)) for k, v in value.items()}
            else:
                role, _, name = key.partition("/")
                model[key] = _shard_like(value, params.get(role, {}).get(name))
        algo = dict(record["algo"])
        for role, field in (("generator", "gen_opt"), ("fake", "fake_opt")):
            flat = [p for group in self.optims[role].param_groups for p in group["params"]]
            saved = algo[field]
            algo[field] = {**saved, "state": {i: {k: _shard_like(v, flat[int(i)]) for k, v in entry.items()}
                                              for i, entry in saved["state"].items()}}
        ema = algo["ema"]
        algo["ema"] = {**ema, "shadow": [_shard_like(t, p) for t, p in zip(ema["shadow"], self.state.ema.params)]}
        return {**record, "model": model, "algo": algo}

    # ---- bookkeeping -----------------------------------------------------------------------------------
    def _distinct(self) -> dict[str, nn.Module]:
        """One role per distinct module (in the shared LoRA layout the generator and the fake are one)."""
        seen: dict[int, str] = {}
        return {role: m for role, m in self.modules.items() if seen.setdefault(id(m), role) == role}

    def _aliases(self) -> dict[str, str]:
        """role -> the role whose module it uses."""
        first: dict[int, str] = {}
        return {role: first.setdefault(id(m), role) for role, m in self.modules.items()}

    def _names(self, role: str) -> dict[int, str]:
        """id(parameter) -> its name in the role's module, for every parameter of the role's optimiser."""
        names = {id(p): n for n, p in self.modules[role].named_parameters()}
        held = [p for group in self.optims[role].param_groups for p in group["params"]]
        if role == "generator":
            held += self.state.ema.params
        stray = [tuple(p.shape) for p in held if id(p) not in names]
        if stray:
            raise RuntimeError(f"{len(stray)} parameters the {role} optimiser or EMA holds are not parameters of "
                               f"the {role} module (shapes {stray[:3]}); were they replaced after the optimiser "
                               "was built?")
        return names

    def _params(self, role: str) -> dict[str, Tensor]:
        """name -> parameter, for the parameters of the role's optimiser."""
        names = self._names(role)
        return {names[id(p)]: p for group in self.optims[role].param_groups for p in group["params"]}

    def _committed(self) -> list[str]:
        """The step directories checkpoint.pt names (newest first); none when it is missing or unreadable."""
        try:
            record = load(self.path)
        except UNREADABLE:
            return []
        return list(record["dirs"]) if isinstance(record, dict) and record.get("format") == FORMAT else []

    def _step_dirs(self) -> list[str]:
        """The step directories in the folder, newest first (committed or not)."""
        found = [d.name for d in self.folder.iterdir() if STEP_DIR.fullmatch(d.name)] if self.folder.is_dir() else []
        return sorted(found, reverse=True)

    def _remove_leftovers(self) -> None:
        """What writes a killed run never finished left: temporary directories, step directories no commit
        names, temporary files of checkpoint.pt. Nothing is removed when checkpoint.pt cannot be read."""
        for tmp in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
        if not self.folder.is_dir():
            return
        if self.path.exists() and not self._committed():
            for folder in self.folder.iterdir():
                if TMP_DIR.fullmatch(folder.name):
                    shutil.rmtree(folder, ignore_errors=True)
            return
        self._remove_uncommitted(set(self._committed()))

    def _remove_uncommitted(self, kept: set[str]) -> None:
        for folder in self.folder.iterdir():
            if folder.name not in kept and (STEP_DIR.fullmatch(folder.name) or TMP_DIR.fullmatch(folder.name)):
                shutil.rmtree(folder, ignore_errors=True)


# ---- DCP metadata, read safely ------------------------------------------------------------------------
_DCP_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata and nothing else: DCP's metadata classes, torch.Size, dtypes, layouts and
    paths. Any other global (a payload) raises UnsafeFileError before it is looked up."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_CLASSES or (module == "torch" and isinstance(vars(torch).get(name), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeFileError(f"refusing to load {str(self.path)!r}: it names {module}.{name}, which is not part "
                              "of a distributed checkpoint's metadata, and only weights-only loads are allowed")


def read_metadata(folder: Path) -> Any:
    """The DCP metadata of a step directory, unpickled safely; refuses one that holds pickled objects
    (non-tensor entries, which DCP would load with a full unpickler)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UnsafeFileError:
        raise
    except FileNotFoundError:
        raise _Unreadable("no .metadata (its write did not finish)") from None
    except (OSError, EOFError, ValueError, AttributeError, pickle.UnpicklingError) as err:
        raise _Unreadable(f".metadata: {type(err).__name__}: {_first_line(err)}") from None
    objects = [k for k, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]
    if objects:
        raise UnsafeFileError(f"refusing to load {str(folder)!r}: it holds {len(objects)} pickled objects (e.g. "
                              f"{objects[0]!r}), and only weights-only loads are allowed")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def check_files(folder: Path, metadata: Any) -> None:
    """Every shard file the metadata names is there and long enough; else _Unreadable naming the files and
    the ranks that wrote them (DCP names them __<rank>_<n>.distcp)."""
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    bad = []
    for name, end in sorted(ends.items()):
        if Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeFileError(f"refusing to load {str(folder)!r}: its metadata names a file outside it ({name!r})")
        path = Path(folder) / name
        rank = re.match(r"__(\d+)_", name)
        who = f" (rank {rank.group(1)}'s shards)" if rank else ""
        if not path.is_file():
            bad.append(f"{name}{who} is missing")
        elif path.stat().st_size < end:
            bad.append(f"{name}{who} is truncated ({path.stat().st_size} of {end} bytes)")
    if bad:
        raise _Unreadable(", ".join(bad))


def safe_reader(folder: Path) -> Any:
    """DCP's FileSystemReader for `folder` with the metadata read by read_metadata (the tensors it loads
    weights-only itself). Built on first use: importing torch.distributed.checkpoint takes a second or two."""
    global _SAFE_READER
    if _SAFE_READER is None:
        from torch.distributed.checkpoint import FileSystemReader

        class SafeReader(FileSystemReader):
            def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
                metadata = read_metadata(Path(self.path))
                metadata.storage_meta.load_id = self.load_id
                return metadata

        _SAFE_READER = SafeReader
    return _SAFE_READER(folder)


_SAFE_READER: type | None = None


def read_checkpoint(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The newest committed distributed checkpoint of a run directory as whole tensors, in this process
    (no process group needed), and its tiltflow.pt record: for inspection and tests."""
    import torch.distributed.checkpoint as dcp

    record = load(Path(run_dir) / "checkpoint.pt")
    folder = Path(run_dir) / FOLDER / record["dirs"][0]
    metadata = read_metadata(folder)
    check_files(folder, metadata)
    tensors = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
               for k, md in metadata.state_dict_metadata.items()}
    with _single_process_quiet():
        dcp.load(tensors, storage_reader=safe_reader(folder), no_dist=True)
    return tensors, load(folder / META)


# ---- helpers ------------------------------------------------------------------------------------------
class _WriteFailed(Exception):
    """A checkpoint write failed on some rank (a full disk, no permission); every rank raises it."""


class _Unreadable(Exception):
    """A committed checkpoint whose files are missing or damaged."""


def _layout_error(folder: Path, detail: str) -> ConfigError:
    return ConfigError("run_dir", f"checkpoint {folder} was written for other models than this run's: {detail}; "
                                  "resume with the settings it was written with, or start a new run_dir")


def _check_tensors(folder: Path, targets: dict[str, Tensor], metadata: Any) -> None:
    """The checkpoint holds exactly the model and EMA tensors this run has, at the same (global) sizes."""
    saved = {k: tuple(md.size) for k, md in metadata.state_dict_metadata.items() if not k.startswith("optim/")}
    mine = {k: tuple(t.shape) for k, t in targets.items() if not k.startswith("optim/")}
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing:
        raise _layout_error(folder, f"it lacks {len(missing)} tensors this run trains, e.g. {missing[:3]}")
    if extra:
        raise _layout_error(folder, f"it holds {len(extra)} tensors this run does not train, e.g. {extra[:3]}")
    resized = [f"{k}: {saved[k]} there, {mine[k]} here" for k in mine if saved[k] != mine[k]]
    if resized:
        raise _layout_error(folder, f"{len(resized)} tensors differ in size, e.g. {'; '.join(resized[:2])}")


def _shaped_like(p: Tensor, size: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A load target of `size`: sharded like parameter p when it has p's (global) shape, whole otherwise
    (a step count)."""
    if tuple(p.shape) == size and hasattr(p, "device_mesh"):
        return torch.zeros_like(p.detach(), dtype=dtype)
    return torch.zeros(size, dtype=dtype, device="cpu" if len(size) == 0 else p.device)


def _shard_like(value: Any, p: Tensor | None) -> Any:
    """A whole tensor of p's shape, cut to this rank's shard of p (a collective); anything else as it is."""
    if p is None or not torch.is_tensor(value) or not hasattr(p, "device_mesh") or hasattr(value, "device_mesh"):
        return value
    if tuple(value.shape) != tuple(p.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def _first_failure(err: BaseException) -> str:
    """The first rank's error of a DCP CheckpointException, in one line."""
    failures = getattr(err, "failures", {}) or {}
    for rank, (exc, _) in sorted(failures.items()):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        return f"rank {rank}: {reason}"
    return _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _no_dist() -> bool:
    return not in_process_group()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save and load without a process group; one process is a case we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
