"""Pieces the diffusers adapters share (WORLDS.md section 3): fast-failing model resolution, the
precision policy (fp32 weights, bf16 autocast on CUDA only), an on-disk text-embedding cache, and the
adapter base class whose `velocity` is the Backbone of METHOD.md section 1. The attention-kernel choice
and the reporting of device faults (`phase_context`, `describe_failure`) live in attention.py.

Each family module (sd3.py, flux.py, flux2.py) supplies the family's timestep convention, latent
layout, prompt encoding and VAE scaling; nothing here patches diffusers.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tiltflow.flow.deadline import answers_within
from tiltflow.flow.rng import to_device
from tiltflow.models.adapters.attention import attention_context, bind_attention_backend, resolve_attention_backend
from tiltflow.models.adapters.attention import describe_failure as describe_failure  # re-exported for training/
from tiltflow.models.adapters.attention import phase_context as phase_context  # re-exported for training/

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROBE_S = 2.0
# Conditioning names -> the stock pipelines' keyword arguments (negative_<name> for the uncond branch).
_PIPELINE_NAMES = {"prompt_embeds": "prompt_embeds", "pooled": "pooled_prompt_embeds"}


class ModelUnavailableError(FileNotFoundError):
    """A model that cannot be loaded here: a missing folder, or a hub id that cannot be reached."""


def hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(constants.HF_HUB_OFFLINE)


def _probe_hub(repo_id: str) -> bool:
    """Whether the hub answers for repo_id within _PROBE_S seconds (a thread bounds DNS stalls too)."""
    from huggingface_hub import HfApi

    return answers_within(lambda: HfApi().model_info(repo_id, timeout=_PROBE_S), _PROBE_S + 0.5)


def resolve_source(source: str, *, what: str, marker: str = "model_index.json") -> tuple[str, bool]:
    """Return (path or hub id, local_files_only) for from_pretrained, failing within ~2 s otherwise.

    `marker` is a file that a complete folder of this kind holds (model_index.json for a pipeline,
    config.json for a single model); it is used to find a hub id in the local cache.
    """
    if not source:
        raise ValueError(f"{what}: no model given; expected a hub id (org/name) or a local folder")
    path = Path(source).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            raise ModelUnavailableError(f"{what}: folder {str(path)!r} has no {marker}; expected a diffusers "
                                        "folder as written by save_pretrained or `hf download`")
        return str(path), True
    if not _HUB_ID.match(source):
        raise ModelUnavailableError(f"{what}: local path {source!r} does not exist (and it is not a hub id "
                                    "of the form org/name)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, marker)
    if isinstance(cached, str):
        root = Path(cached)
        for _ in Path(marker).parts:
            root = root.parent
        return str(root), True
    if hub_offline():
        raise ModelUnavailableError(
            f"{what}: {source!r} is a hub id, HF_HUB_OFFLINE is set and it is not in the local Hugging Face "
            f"cache; run `hf download {source}` where the hub is reachable and pass the folder instead")
    if not _probe_hub(source):
        raise ModelUnavailableError(
            f"{what}: the Hugging Face hub did not answer for {source!r} within {_PROBE_S:.0f} s; download it "
            "first (`hf download ...`) and pass the local folder, or set HF_HUB_OFFLINE=1")
    return source, False


@dataclass
class Precision:
    """fp32 trainable weights; frozen base weights in `base_dtype`; bf16 autocast only on CUDA."""

    device: torch.device
    base_dtype: torch.dtype
    autocast: bool

    @staticmethod
    def resolve(device: str | torch.device, base_dtype: str = "auto", autocast: bool = True) -> Precision:
        dev = torch.device(device)
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if base_dtype == "auto":
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        elif base_dtype in names:
            dtype = names[base_dtype]
        else:
            raise ValueError(f"base_dtype must be 'auto' or one of {sorted(names)}, got {base_dtype!r}")
        return Precision(dev, dtype, autocast and dev.type == "cuda")

    def context(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matrix products (and attention) run in."""
        return torch.bfloat16 if self.autocast else self.base_dtype


class TextEmbeddingCache:
    """Prompt -> dict of tensors, kept in memory (the `max_memory` most recent prompts) and, optionally,
    on disk as one safetensors file per prompt, keyed by sha256(model key, encoder settings, prompt)."""

    def __init__(self, root: str | Path | None, model_key: str, max_memory: int = 256):
        self.root = Path(root).expanduser() if root else None
        self.model_key = model_key
        self.max_memory = max_memory
        self.memory: OrderedDict[str, dict[str, Tensor]] = OrderedDict()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.model_key}\x00{prompt}".encode()).hexdigest()

    def get(self, prompts: Sequence[str], encode: Callable[[list[str]], dict[str, Tensor]]) -> dict[str, Tensor]:
        """Stack the embeddings of `prompts` (batch first), encoding only those not cached yet."""
        from safetensors.torch import load_file, save_file

        keys = [self.key(p) for p in prompts]
        missing: dict[str, str] = {}
        for p, k in zip(prompts, keys):
            if k in self.memory or k in missing:
                continue
            if self.root is not None and self._path(k).is_file():
                self.memory[k] = load_file(str(self._path(k)))
            else:
                missing[k] = p
        if missing:
            fresh = encode(list(missing.values()))
            for i, k in enumerate(missing):
                entry = {name: t[i].detach().to("cpu").contiguous() for name, t in fresh.items()}
                self.memory[k] = entry
                if self.root is not None:
                    self._path(k).parent.mkdir(parents=True, exist_ok=True)
                    save_file(entry, str(self._path(k)))
        names = self.memory[keys[0]].keys()
        out = {name: torch.stack([self.memory[k][name] for k in keys]) for name in names}
        for k in keys:
            self.memory.move_to_end(k)
        while len(self.memory) > max(self.max_memory, len(set(keys))):
            self.memory.popitem(last=False)
        return out


def stub_embeddings(prompts: Sequence[str], shapes: dict[str, tuple[int, ...]], salt: str) -> dict[str, Tensor]:
    """Deterministic random "text embeddings" per prompt, for random-weight models without text encoders
    (benchmarks): each prompt always maps to the same tensors."""
    out: dict[str, list[Tensor]] = {name: [] for name in shapes}
    for p in prompts:
        seed = int.from_bytes(hashlib.sha256(f"{salt}\x00{p}".encode()).digest()[:8], "little") >> 1
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            out[name].append(torch.randn(shape, generator=g))
    return {name: torch.stack(ts) for name, ts in out.items()}


def batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a (B,) float32 tensor on x's device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return s.expand(x.shape[0]).contiguous() if s.ndim == 0 else s.reshape(x.shape[0])


def join_conditions(cond: Any, uncond: Any) -> Any:
    """[cond; uncond] concatenated along the batch dim (dim 0), for classifier-free guidance as one pass at
    batch 2B; None where they cannot be: not dicts of tensors with the same keys, or tensors whose shapes
    differ beyond the batch dim (e.g. prompt embeddings of other lengths), dtypes or devices."""
    if not (isinstance(cond, dict) and isinstance(uncond, dict)) or cond.keys() != uncond.keys() or not cond:
        return None
    out = {}
    for name, c in cond.items():
        u = uncond[name]
        if not (isinstance(c, Tensor) and isinstance(u, Tensor)) or c.ndim == 0:
            return None
        if c.shape != u.shape or c.dtype != u.dtype or c.device != u.device:
            return None
        out[name] = torch.cat([c, u])
    return out


def to_unit_range(images: Tensor) -> Tensor:
    """VAE output in [-1, 1] -> images in [0, 1] (B, 3, H, W), float32, still differentiable."""
    return ((images.float() + 1) / 2).clamp(0, 1)


class TransformerAdapter:
    """What every adapter (the diffusers families here, the shapes world's) derives from its own `forward`,
    `encode` and `lora_pattern`: the Backbone velocity of its frozen transformer, CFG's batched conditioning,
    the unconditional branch and the LoRA targets."""

    transformer: nn.Module
    # CFG (tiltflow.models.base.guided_velocity) as one transformer pass at batch 2B, cond and uncond
    # concatenated, where the conditioning concatenates; False: two passes at batch B. The spine sets it
    # from parallel.batched_cfg.
    batched_cfg: bool = True
    lora_pattern: str = ""  # the Linear layers that carry LoRA adapters (re.fullmatch on module names)

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The frozen base model (Backbone protocol)."""
        return self.forward(self.transformer, x, sigma, cond)

    def forward(self, transformer: nn.Module, x: Tensor, sigma: Tensor, cond: dict[str, Tensor],
                guidance: float | None = None) -> Tensor:
        raise NotImplementedError

    def cfg_conditions(self, cond: dict[str, Tensor], uncond: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The conditioning of CFG's one batched pass, [cond; uncond], or None for two passes (batched_cfg
        off, or conditioning that does not concatenate). Every transformer here treats the samples of a
        batch independently (no attention mask, per-sample timestep and guidance), so the batched pass
        computes the two passes' values."""
        return join_conditions(cond, uncond) if self.batched_cfg else None

    def encode_uncond(self, n: int) -> dict[str, Tensor]:
        """The empty prompt, repeated n times (the unconditional branch of CFG)."""
        return self.encode([""] * n)

    def lora_target_modules(self, transformer: nn.Module) -> list[str]:
        return named_linear_modules(transformer, self.lora_pattern)


class DiffusersAdapter(TransformerAdapter):
    """One diffusers pipeline seen as a tiltflow Backbone plus what a Task needs.

    Subclasses implement the family-specific hooks (`forward`, `_run_text_encoders`, `stub_shapes`,
    `latents_to_vae`, `vae_to_latents`, `latent_shape`, `sigma_shift`) and set `lora_pattern`.
    `forward(transformer, x, sigma, cond, guidance)` evaluates ANY transformer of this family (the base,
    a LoRA-wrapped one or a separate copy) in tiltflow's convention: x in tiltflow's latent layout,
    sigma (B,) in [0, 1], returns v = eps - x0 in float32.
    """

    family: str = ""
    pipeline_class: str = ""  # the diffusers pipeline class name
    default_max_sequence_length: int = 0

    @classmethod
    def from_pretrained(cls, source: str, *, device: str | torch.device = "cpu", base_dtype: str = "auto",
                        autocast: bool = True, embed_cache_dir: str | Path | None = None, **family: Any) -> Any:
        """Load the whole pipeline (transformer, VAE, text encoders, tokenizers, scheduler config) from a
        hub id or a local folder; safetensors only, never remote code; fails fast when unavailable."""
        import diffusers

        precision = Precision.resolve(device, base_dtype, autocast)
        path, local_only = resolve_source(source, what=f"{cls.family} model")
        pipe = getattr(diffusers, cls.pipeline_class).from_pretrained(
            path, **_dtype_kw(precision.base_dtype), use_safetensors=True, local_files_only=local_only)
        pipe = pipe.to(precision.device)
        return cls(pipe, source=source, precision=precision, embed_cache_dir=embed_cache_dir, **family)

    @classmethod
    def random(cls, arch: str, *, seed: int = 0, device: str | torch.device = "cpu", base_dtype: str = "auto",
               autocast: bool = True, text_encoders: bool | None = None, embed_cache_dir: str | Path | None = None,
               **family: Any) -> Any:
        """Architecture `arch` (tiltflow/models/arch/<arch>.json) with random weights. Without text
        encoders (the default when the file lists none, as the full-size ones do) prompts map to
        deterministic stub embeddings of the real shapes."""
        from tiltflow.models.arch import build_random_pipeline, load_arch

        spec = load_arch(arch)
        if spec["family"] != cls.family:
            raise ValueError(f"architecture {arch!r} is of family {spec['family']!r}, expected {cls.family!r}")
        precision = Precision.resolve(device, base_dtype, autocast)
        listed = any(k.startswith("text_encoder") for k in spec["components"])
        with_text = listed if text_encoders is None else text_encoders
        if with_text and not listed and "text_components" in spec:  # full size: only when asked for explicitly
            spec["components"].update(spec["text_components"])
            listed = True
        if with_text and not listed:
            raise ValueError(f"architecture {arch!r} lists no text encoders; use text_encoders=False (stubs)")
        pipe = build_random_pipeline(spec, seed=seed, device=precision.device, dtype=precision.base_dtype,
                                     text_encoders=with_text)
        settings = {**spec.get("settings", {}), **family}
        return cls(pipe, source=f"random:{arch}:{seed}", precision=precision, stub_text=not with_text,
                   embed_cache_dir=embed_cache_dir, model_name=arch, **settings)

    def __init__(self, pipe: Any, *, source: str, precision: Precision, max_sequence_length: int | None = None,
                 embed_cache_dir: str | Path | None = None, stub_text: bool = False, attention_backend: str = "auto",
                 model_name: str | None = None):
        """`attention_backend`: "auto" (the fastest kernel that works for this family here, see
        attention.py), "default" (torch's choice), or one of "cudnn", "flash", "efficient", "math"."""
        self._attention_backend = resolve_attention_backend(
            attention_backend, family=self.family, device=precision.device, dtype=precision.compute_dtype,
            head_dim=getattr(pipe.transformer.config, "attention_head_dim", None))
        self._model_name = model_name or source
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        self.transformer: nn.Module = pipe.transformer
        self.vae: nn.Module = pipe.vae
        self.source = source
        self.precision = precision
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.stub_text = stub_text
        self._dtypes: dict[int, tuple[Tensor, torch.dtype, torch.dtype]] = {}  # see input_dtype
        key = f"{self.family}|{source}|L={self.max_sequence_length}|{self.encoder_settings()}"
        self.cache = TextEmbeddingCache(embed_cache_dir, key)
        self._bind(self.transformer)

    # ---- what runs, for error messages ----------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The architecture (random weights), hub id or folder this adapter was built from."""
        return self._model_name

    @property
    def attention_backend(self) -> str:
        """The resolved attention kernel choice: "default" or one of "cudnn", "flash", "efficient", "math"."""
        return self._attention_backend

    def attention(self) -> contextlib.AbstractContextManager:
        """The attention-kernel scope of a transformer call (forward() enters it)."""
        return attention_context(self._attention_backend)

    def _bind(self, transformer: nn.Module) -> nn.Module:
        """Hold the kernel choice inside each attention module too (checkpoint recomputation, attention.py).
        Deep copies of a bound transformer carry the hooks."""
        bind_attention_backend(transformer, self._attention_backend)
        return transformer

    # ---- Backbone -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.precision.device

    # ---- prompts --------------------------------------------------------------------------------
    def encoder_settings(self) -> str:
        """Anything besides model and max length that changes the embeddings (part of the cache key)."""
        return ""

    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Batch-first dict of text-conditioning tensors on the device."""
        if not prompts:
            raise ValueError("encode: got an empty list of prompts")
        if self.stub_text:
            fn = lambda ps: stub_embeddings(ps, self.stub_shapes(), self.cache.model_key)  # noqa: E731
        else:
            fn = self._encode_prompts
        cond = self.cache.get([str(p) for p in prompts], fn)
        return {k: to_device(v, self.device) for k, v in cond.items()}  # (cached on the CPU)

    def encode_uncached(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The prompts through the text encoders every time, on the device, no cache (a trainer without the
        text-embedding cache; `tiltflow bench --text-encoders`)."""
        if not prompts:
            raise ValueError("encode_uncached: got an empty list of prompts")
        return self._encode_prompts([str(p) for p in prompts])

    def hold_prompt_set(self, prompts: Sequence[str], budget_gib: float = 8.0) -> bool:
        """Keep every prompt of a fixed prompt set (and the empty prompt of CFG) in the in-memory embedding
        cache once encoded, so that each is encoded once per run rather than again whenever the least
        recently used entries (256 by default) were dropped, if they fit `budget_gib` of host memory (fp32;
        SD3's are 5.5 MB a prompt). Returns whether they fit; otherwise the disk cache (model.embed_cache_dir)
        is what saves re-encoding, and a warning says so."""
        n = len(set(prompts)) + 1
        size = n * 4 * sum(math.prod(shape) for shape in self.stub_shapes().values())
        if size <= budget_gib * 2**30:
            self.cache.max_memory = max(self.cache.max_memory, n)
            return True
        if self.cache.root is None:
            print(f"warning: the {n - 1} prompts' text embeddings ({size / 2**30:.1f} GiB) exceed the "
                  f"{budget_gib:g} GiB kept in memory, so prompts are encoded again when drawn again; set "
                  "model.embed_cache_dir to keep them on disk", file=sys.stderr, flush=True)
        return False

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        if self.pipe.text_encoder is None:
            raise RuntimeError(f"this {self.family} pipeline has no text encoders; build it with text encoders "
                               "or stubs")
        return self._run_text_encoders(prompts)

    def _run_text_encoders(self, prompts: list[str]) -> dict[str, Tensor]:
        """The family's prompt encoding through the pipeline's text encoders (under no_grad)."""
        raise NotImplementedError

    def stub_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    # ---- latents and images ---------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def sigma_shift(self, height: int, width: int, num_steps: int) -> float:
        raise NotImplementedError

    def latents_to_vae(self, x: Tensor) -> Tensor:
        """AutoencoderKL's convention (SD3 family, FLUX.1): z = x / scaling_factor + shift_factor."""
        cfg = self.vae.config
        return x / cfg.scaling_factor + cfg.shift_factor

    def vae_to_latents(self, z: Tensor) -> Tensor:
        cfg = self.vae.config
        return (z - cfg.shift_factor) * cfg.scaling_factor

    def decode(self, x: Tensor) -> Tensor:
        """tiltflow latents -> images in [0, 1], differentiable with respect to x."""
        z = self.latents_to_vae(x.float())
        with self.precision.context():
            images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return to_unit_range(images)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] (B, 3, H, W) -> tiltflow latents (the posterior mode, as diffusers does)."""
        pixels = (images.to(self.device, self.vae.dtype) * 2 - 1)
        with self.precision.context():
            z = self.vae.encode(pixels).latent_dist.mode()
        return self.vae_to_latents(z.float())

    def to_pipeline_latents(self, x: Tensor) -> Tensor:
        """What the stock pipeline takes as `latents=` (and returns with output_type='latent')."""
        return x

    def pipeline_kwargs(self, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None = None,
                        guidance_scale: float = 1.0) -> dict[str, Any]:
        """Keyword arguments that make the stock pipeline use our embeddings and guidance."""
        kw = {_PIPELINE_NAMES[k]: v for k, v in cond.items()}
        kw.update({f"negative_{_PIPELINE_NAMES[k]}": v for k, v in (uncond or {}).items()})
        return {**kw, "guidance_scale": guidance_scale}

    def load_transformer(self, source: str) -> nn.Module:
        """Another transformer of this family at this precision (FLUX.2: the step-distilled generator
        init), from a pipeline folder, a transformer folder or a hub id."""
        return self._bind(load_transformer(type(self.transformer), source, what=f"{self.family} transformer",
                                           dtype=self.precision.base_dtype, device=self.device))

    def random_transformer(self, seed: int) -> nn.Module:
        """A transformer of the same architecture with other random weights."""
        from tiltflow.models.arch import random_module

        spec = {"_class_name": type(self.transformer).__name__, **dict(self.transformer.config)}
        return self._bind(random_module(spec, seed=seed, device=self.device, dtype=self.precision.base_dtype))

    def _cast(self, t: Tensor, transformer: nn.Module) -> Tensor:
        """Inputs go in as the transformer's (base) dtype, as the pipelines do."""
        return t.to(device=self.device, dtype=self.input_dtype(transformer))

    def input_dtype(self, transformer: nn.Module) -> torch.dtype:
        """module_dtype(transformer), remembered per transformer. diffusers' ModelMixin.dtype walks every
        submodule: for a 24-block transformer with LoRA layers that was most of a pass's host time (tens of
        ms, three times a pass). Read again when the first parameter is another object (fully_shard replaces
        parameters) or has changed dtype (.to)."""
        first = next(transformer.parameters())
        hit = self._dtypes.get(id(transformer))
        if hit is None or hit[0] is not first or hit[1] != first.dtype:
            hit = self._dtypes[id(transformer)] = (first, first.dtype, module_dtype(transformer))
        return hit[2]


def shift_from_mu(mu: float, scheduler_config: Any) -> float:
    """The time-shift factor of a dynamic-shift pipeline: exp(mu) ('exponential') or mu ('linear')."""
    kind = scheduler_config.get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu)
    if kind == "linear":
        return float(mu)
    raise ValueError(f"unsupported scheduler time_shift_type {kind!r}; expected 'exponential' or 'linear'")


def module_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype


def named_linear_modules(transformer: nn.Module, pattern: str) -> list[str]:
    """Full names of the Linear layers (plain, or already wrapped by a LoRA adapter) whose name matches
    `pattern` (re.fullmatch)."""
    rx = re.compile(pattern)
    names = [name for name, m in transformer.named_modules()
             if (isinstance(m, nn.Linear) or isinstance(getattr(m, "base_layer", None), nn.Linear))
             and "lora_" not in name and not name.endswith("base_layer") and rx.fullmatch(name)]
    if not names:
        raise ValueError(f"no Linear module of {type(transformer).__name__} matches the LoRA pattern {pattern!r}")
    return names


def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """diffusers >= 0.42 names the argument `dtype`; older releases `torch_dtype`."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}


def load_transformer(model_cls: Any, source: str, *, what: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A transformer alone, from a pipeline folder (transformer/ inside) or a model folder or hub id."""
    path = Path(source).expanduser()
    sub = None if path.is_dir() and not (path / "transformer" / "config.json").is_file() else "transformer"
    marker = "config.json" if sub is None else f"{sub}/config.json"
    resolved, local_only = resolve_source(source, what=what, marker=marker)
    model = model_cls.from_pretrained(resolved, subfolder=sub, **_dtype_kw(dtype), use_safetensors=True,
                                      local_files_only=local_only)
    return model.to(device).eval().requires_grad_(False)
