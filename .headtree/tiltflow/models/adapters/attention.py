"""Which scaled-dot-product-attention kernel a diffusers transformer uses (per model, not per process),
and how a CUDA fault inside one is reported (issue 14; WORLDS.md section 3).

The choice is applied twice, at two depths, because one is not enough:
- `attention_context` (torch.nn.attention.sdpa_kernel) around the transformer call. The backward of an
  SDPA call uses the kernel the forward picked, so this covers training without activation checkpointing.
- forward pre/post hooks on every attention module (`bind_attention_backend`). With activation
  checkpointing the block is recomputed inside backward, after the context above has exited; the hooks
  hold the same choice for that recomputation (otherwise torch's default kernel runs there: a different
  kernel than the forward's, and on FLUX.1-dev with cuDNN 9.19 the one that faults).
sdpa_kernel sets process-wide flags, so two models with different choices must not run at once in two
threads. Nothing in diffusers is patched: hooks are torch's public module API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# "default" = no restriction: torch's own priority among the kernels the inputs are eligible for.
SDPA_KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
ATTENTION_BACKENDS = ("auto", "default", *SDPA_KERNELS)

# cuDNN's SDPA backward gives FLUX.1-dev an illegal memory access (with CUDA_LAUNCH_BLOCKING=1:
# "mha_graph.execute(...).is_good()" false) in the first backward (issue 14). Cause, measured on an H200
# with torch 2.11.0+cu130 and cuDNN 9.19.0 (91900), benchmarks/results/flux1_attention_h200_2026-12-02.json:
# each backward alone works; the second of two backward calls with the same q/k/v layout and different
# grad-output strides uses the first call's strides (a graph cache keyed without them fits). FLUX.1's
# single and double blocks give SDPA identical q/k/v layouts but different grad-outputs (single blocks:
# a slice of the grad of cat([attn, mlp]), row stride 15360 instead of 3072).
# Backward visits the single blocks first, so the double blocks reuse a graph that reads their grad-output
# with the wrong stride: out of bounds. In the other order the graph reads in bounds and the gradients are
# silently wrong (max |diff| against flash 0.67 for gradients of size 0.49). FLUX.2-klein's and SD3's
# blocks differ in q/k/v strides or share one grad layout, so their cache keys do not collide.
# Only that torch/cuDNN pair was measured; "auto" avoids cuDNN for these families on every other pair
# too, until a pair is measured to work and added to CUDNN_SDPA_VERIFIED. attention_backend="cudnn" forces it.
CUDNN_SDPA_UNSAFE = frozenset({"flux1"})
CUDNN_SDPA_VERIFIED: dict[str, frozenset[tuple[str, int]]] = {}  # family -> {(torch.__version__, cuDNN)}

# The fastest kernel per family for forward+backward at its 512-px shapes, H200, torch 2.11.0, cuDNN 9.19
# (the JSON above, "time:*" cases, ms per call): SD3(.5)-M (24 heads x 64): flash 0.41, cuDNN 0.64,
# efficient 0.64, math 1.76. FLUX.1-dev (24 x 128): cuDNN 0.43 (faults), flash 0.66, efficient 1.09,
# math 3.27. FLUX.2-klein-9B (32 x 128): cuDNN 0.49, flash 0.69, efficient 1.16, math 4.27.
# "default" is torch's own priority, which picks cuDNN there.
_FASTEST = {"sd3": "flash", "flux1": "default", "flux2": "default"}


def cudnn_sdpa_faults(family: str, torch_version: str | None = None, cudnn_version: int | None = None) -> bool:
    """Whether cuDNN's SDPA is known (or, on an unmeasured torch/cuDNN pair, assumed) to fail this family."""
    if family not in CUDNN_SDPA_UNSAFE:
        return False
    pair = (torch_version or torch.__version__,
            torch.backends.cudnn.version() if cudnn_version is None else cudnn_version)
    return pair not in CUDNN_SDPA_VERIFIED.get(family, frozenset())


def resolve_attention_backend(name: str, *, family: str, device: torch.device, dtype: torch.dtype,
                              head_dim: int | None = None) -> str:
    """"auto" -> the fastest kernel measured for this family that works here; other names pass through.

    Off CUDA "auto" is "default" (torch's choice). flash needs bf16/fp16 and a head dim that is a
    multiple of 8 up to 256; where it cannot run, "default" (or, for a family whose cuDNN SDPA fails,
    "efficient" or "math")."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {list(ATTENTION_BACKENDS)}, got {name!r}")
    if name != "auto":
        return name
    if device.type != "cuda":
        return "default"
    choice = _FASTEST.get(family, "default")
    unsafe = cudnn_sdpa_faults(family)
    if choice == "default" and unsafe:
        choice = "flash"
    dim_ok = head_dim is None or (head_dim % 8 == 0 and head_dim <= 256)
    flash_ok = dtype in (torch.bfloat16, torch.float16) and dim_ok
    if choice == "flash" and not flash_ok:
        choice = ("efficient" if head_dim is None or head_dim % 8 == 0 else "math") if unsafe else "default"
    return choice


def attention_context(backend: str) -> contextlib.AbstractContextManager:
    """sdpa_kernel restricted to `backend` (a resolved name); no restriction for "default"."""
    if backend == "default":
        return contextlib.nullcontext()
    if backend not in SDPA_KERNELS:
        raise ValueError(f"attention backend must be resolved to 'default' or one of {list(SDPA_KERNELS)}, "
                         f"got {backend!r}")
    return sdpa_kernel([SDPA_KERNELS[backend]])


class _KernelScope:
    """A pre-hook that enters `attention_context(backend)` and an always-called post-hook that leaves it.
    A small object of its own (not a closure over the adapter) so that deep copies of a transformer copy
    only this, and behave the same."""

    def __init__(self, backend: str):
        self.backend = backend
        self.open: list[contextlib.AbstractContextManager] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        ctx = attention_context(self.backend)
        ctx.__enter__()
        self.open.append(ctx)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.open:
            self.open.pop().__exit__(None, None, None)


def bind_attention_backend(transformer: nn.Module, backend: str) -> list[Any]:
    """Hold `backend` on every attention module of `transformer`, also when activation checkpointing
    recomputes a block during backward. Returns the hook handles; "default" installs nothing."""
    if backend == "default":
        return []
    attention_context(backend)  # validates the name
    handles = []
    # diffusers' attention modules (Attention, AttentionModuleMixin): those that own a processor
    for module in [m for m in transformer.modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]:
        scope = _KernelScope(backend)
        handles.append(module.register_forward_pre_hook(scope.enter))
        handles.append(module.register_forward_hook(scope.leave, always_call=True))
    return handles


def unbind_attention_backend(root: nn.Module) -> int:
    """Remove the hooks of bind_attention_backend under `root`; returns the number removed. For compiled
    blocks (parallel.compile: blocks), both seen on the H200: dynamo cannot trace a context manager opened in
    one hook and closed in another ("generator didn't stop"), and it guards on each module's hook ids, which
    differ from block to block, so hooked blocks recompile once per block (past dynamo's recompile limit on a
    24-block SD3.5-M) instead of sharing one graph per kind of block. Without them the graph is traced
    under the adapter's attention_context, which fixes the kernel in the compiled forward and backward (the
    recomputation of a checkpointed block included: it is part of the compiled graph)."""
    removed = 0
    for module in root.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), _KernelScope)]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
                removed += 1
    return removed


# ---- failing in the open -------------------------------------------------------------------------
# Phrases of GPU-library faults; a bare "cuda" would also match tiltflow's own mistakes, e.g. "Expected all
# tensors to be on the same device, ... cuda:0 and cpu".
_DEVICE_WORDS = ("cuda error", "cuda driver error", "cudnn", "cublas", "illegal memory access", "device-side assert",
                 "mha_graph", "misaligned address", "launch failure")


def is_device_failure(err: BaseException) -> bool:
    """A fault of a GPU kernel or library (not out-of-memory, which keeps its own type for callers)."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    if isinstance(err, getattr(torch, "AcceleratorError", ())):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _DEVICE_WORDS)


def describe_failure(adapter: Any, phase: str, err: BaseException) -> RuntimeError:
    """A RuntimeError naming the model, the training phase and the attention backend in use, for a
    device fault `err` (chain it: `raise describe_failure(...) from err`)."""
    model = getattr(adapter, "model_name", None) or type(adapter).__name__
    family = getattr(adapter, "family", "") or "?"
    backend = getattr(adapter, "attention_backend", None) or "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    hint = ("rerun with CUDA_LAUNCH_BLOCKING=1 to name the failing kernel; if it is attention, pass "
            "attention_backend='flash' (or 'efficient', 'math') to the adapter"
            if backend in ("default", "cudnn", "unknown") else
            "rerun with CUDA_LAUNCH_BLOCKING=1 to name the failing kernel")
    return RuntimeError(
        f"CUDA failure during the {phase} of model {model!r} (family {family}, attention backend {backend!r}; "
        f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {gpu}): "
        f"{type(err).__name__}: {first}. A GPU kernel or library failed; {hint}.")


@contextlib.contextmanager
def phase_context(adapter: Any, phase: str) -> Iterator[None]:
    """Re-raise a device fault inside the block as `describe_failure(adapter, phase, err)`; any other
    exception (out-of-memory included) passes through unchanged."""
    try:
        yield
    except Exception as err:
        if is_device_failure(err):
            raise describe_failure(adapter, phase, err) from err
        raise
