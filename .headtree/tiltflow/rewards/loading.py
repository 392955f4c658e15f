"""Find and load reward-model files: a local folder or a Hugging Face hub id, failing fast offline.

Weights load only from safetensors or through torch.load(weights_only=True); remote code is never run.
Also holds ClipEncoder, the (frozen) CLIP image/text embedding shared by the CLIP-based scorers.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor

from tiltflow.flow.deadline import answers_within
from tiltflow.rewards.preprocess import ImagePreprocess

# A requirement is a tuple of alternatives; an alternative is a tuple of files that must all exist.
FileRequirement = tuple[tuple[str, ...], ...]
CONFIG: FileRequirement = (("config.json",),)
WEIGHTS: FileRequirement = (("model.safetensors",), ("model.safetensors.index.json",), ("pytorch_model.bin",))
PREPROCESSOR: FileRequirement = (("preprocessor_config.json",),)
TOKENIZER: FileRequirement = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PROBE_SECONDS = 1.5


class ModelFilesNotFound(FileNotFoundError):
    """A reward model's files are neither in the given folder nor in the local hub cache."""


def describe(requirements: Sequence[FileRequirement]) -> str:
    """'config.json, model.safetensors (or pytorch_model.bin)'-style list of the files needed."""
    parts = []
    for req in requirements:
        alts = [" + ".join(alt) for alt in req]
        parts.append(alts[0] if len(alts) == 1 else f"{alts[0]} (or {' or '.join(alts[1:])})")
    return ", ".join(parts)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_dir(source: str | Path, requirements: Sequence[FileRequirement], *, what: str) -> Path:
    """Local folder holding `requirements`: `source` itself if it is a folder, else a hub snapshot.

    Offline (HF_HUB_OFFLINE=1) or with the hub unreachable, a model not already cached raises
    ModelFilesNotFound within ~2 s, naming the model and the files needed.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [req for req in requirements if _pick(path, req) is None]
        if missing:
            raise ModelFilesNotFound(
                f"{what}: folder {path} lacks {describe(missing)} (needs: {describe(requirements)})"
            )
        return path
    repo_id = str(source)
    if not _HUB_ID.match(repo_id) or path.exists() or repo_id.startswith((".", "/", "~")):
        raise ModelFilesNotFound(f"{what}: {source!r} is neither a folder nor a hub id like 'org/name'")
    cached = _from_cache(repo_id, requirements)
    if cached is not None:
        return cached
    hint = (f"needs: {describe(requirements)}. Download them where the hub is reachable, e.g. "
            f"`hf download {repo_id} <files>`, or pass a local folder that holds them (there is no folder "
            f"{str(path)!r} here)")
    if hub_offline():
        raise ModelFilesNotFound(
            f"{what}: {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; {hint}"
        )
    if not _hub_reachable():
        raise ModelFilesNotFound(f"{what}: {repo_id!r} is not cached and the hub is unreachable; {hint}")
    return _download(repo_id, requirements, what)


def resolve_file(source: str | Path, *, hub_filename: str, what: str) -> Path:
    """A single file: `source` if it is a file, else `hub_filename` inside the hub repo `source`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    return resolve_model_dir(source, [((hub_filename,),)], what=what) / hub_filename  # a folder or a hub repo


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors from .safetensors, or from .pt/.pth/.bin via torch.load(weights_only=True).

    A {"state_dict": ...} wrapper is unwrapped and a "module." prefix (DataParallel) is dropped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unsupported weights file {path}: expected .safetensors, .pt, .pth, .bin or .ckpt")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat dictionary of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def _pick(folder: Path, requirement: FileRequirement) -> tuple[str, ...] | None:
    """The first alternative of `requirement` whose files all exist in `folder`, or None."""
    return next((alt for alt in requirement if all((folder / f).is_file() for f in alt)), None)


def _from_cache(repo_id: str, requirements: Sequence[FileRequirement]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    folder: Path | None = None
    for req in requirements:
        for alt in req:
            found = [try_to_load_from_cache(repo_id, f) for f in alt]
            if all(isinstance(p, str) for p in found):
                folder = folder or Path(found[0]).parent
                break
        else:
            return None
    return folder if folder is not None and all(_pick(folder, r) for r in requirements) else None


def _hub_reachable() -> bool:
    """TCP connect to the hub endpoint within _PROBE_SECONDS (DNS included: the probe runs in a thread)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    return answers_within(lambda: socket.create_connection((host, port), timeout=_PROBE_SECONDS).close(),
                          _PROBE_SECONDS)


def _download(repo_id: str, requirements: Sequence[FileRequirement], what: str) -> Path:
    from huggingface_hub import hf_hub_download, list_repo_files

    available = set(list_repo_files(repo_id))
    folder: Path | None = None
    for req in requirements:
        alt = next((a for a in req if set(a) <= available), None)
        if alt is None:
            raise ModelFilesNotFound(f"{what}: hub repo {repo_id!r} has none of {describe([req])}")
        for f in alt:
            folder = Path(hf_hub_download(repo_id, f)).parent
    assert folder is not None
    return folder


@dataclass
class ClipEncoder:
    """Frozen CLIP towers: L2-normalised image and text embeddings, differentiable in the pixels.

    model: a transformers CLIPModel (or CLIPVisionModelWithProjection for image-only scorers);
    tokenizer: a CLIP tokenizer, or None for image-only use.
    """

    model: Any
    tokenizer: Any
    preprocess: ImagePreprocess

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D), unit norm."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_embeds(self, texts: list[str]) -> Tensor:
        """B strings -> (B, D), unit norm. Texts are truncated to the model's context length."""
        if self.tokenizer is None:
            raise RuntimeError("this ClipEncoder was built without a tokenizer")
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        out = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                    attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


def load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_clip(source: str | Path, *, processor: str | Path | None = None, device: str = "cpu",
              dtype: str | torch.dtype = "float32", vision_only: bool = False, what: str = "CLIP model",
              tokenizer_loader: Callable[[Path], Any] = load_tokenizer) -> ClipEncoder:
    """A frozen ClipEncoder from a transformers CLIP folder or hub id.

    processor: where preprocessor_config.json and the tokenizer live (default: `source`).
    vision_only: load CLIPVisionModelWithProjection and no tokenizer.
    tokenizer_loader: folder -> tokenizer (default: a BPE CLIPTokenizer; another kind, e.g. AutoTokenizer
    for a word-level tokenizer.json, which CLIPTokenizer would rebuild as BPE).
    """
    model_dir = resolve_model_dir(source, [CONFIG, WEIGHTS], what=what)
    proc_req = [PREPROCESSOR] if vision_only else [PREPROCESSOR, TOKENIZER]
    proc_dir = resolve_model_dir(processor or source, proc_req, what=f"{what} processor")
    model = _load_clip_model(model_dir, vision_only=vision_only, what=what)
    model = model.to(device=device, dtype=as_dtype(dtype)).eval().requires_grad_(False)
    tokenizer = None if vision_only else tokenizer_loader(proc_dir)
    return ClipEncoder(model=model, tokenizer=tokenizer, preprocess=ImagePreprocess.from_pretrained(proc_dir))


def _load_clip_model(model_dir: Path, *, vision_only: bool, what: str) -> Any:
    """CLIPModel, or CLIPVisionModelWithProjection from a full CLIP folder; every weight must be present."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True}
    if vision_only:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        if model_type == "clip":  # the projection width lives on the full config, not its vision part
            full = CLIPConfig.from_pretrained(str(model_dir), local_files_only=True)
            vision = CLIPVisionConfig.from_dict(full.vision_config.to_dict())
            vision.projection_dim = full.projection_dim
            kwargs["config"] = vision
        model, info = CLIPVisionModelWithProjection.from_pretrained(str(model_dir), **kwargs)
    else:
        model, info = CLIPModel.from_pretrained(str(model_dir), **kwargs)
    missing = sorted(info.get("missing_keys", [])) if isinstance(info, dict) else sorted(info.missing_keys)
    if missing:
        raise ValueError(
            f"{what}: {model_dir} lacks weights for {missing[:5]} ({len(missing)} in all); is it a CLIP checkpoint?"
        )
    return model
