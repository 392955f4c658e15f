"""The per-model attention-kernel choice and the device-fault reporting of the diffusers adapters (issue 14),
on CPU with tiny random models: validation, what "auto" resolves to, that the chosen kernel runs in the
forward, in the backward and in the recomputation of a checkpointed block, and the failure messages.
"""

from __future__ import annotations

import ast
import contextlib
import copy
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from tiltflow.models.adapters import attention
from tiltflow.models.adapters.attention import describe_failure, resolve_attention_backend
from tiltflow.models.adapters.common import phase_context, shift_from_mu
from tiltflow.models.adapters.flux import FluxAdapter

CPU_FLASH = "aten._scaled_dot_product_flash_attention_for_cpu"  # torch's default SDPA kernel on CPU
CUDA = torch.device("cuda")  # resolution only: nothing runs on it


class OpLog(TorchDispatchMode):
    """Names of the aten ops that ran (forward, backward and recomputation alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def ran(self, prefix: str) -> bool:
        return any(op.startswith(prefix) for op in self.ops)


def _tiny(backend: str = "auto") -> FluxAdapter:
    return FluxAdapter.random("tiny_flux1", seed=0, attention_backend=backend)


def _inputs(adapter: FluxAdapter) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([0.7, 0.3]), adapter.encode(["a red cat", "a blue square"])


# ---- the option ---------------------------------------------------------------------------------
def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="attention_backend must be one of") as info:
        _tiny("fastest")
    for name in ("auto", "default", "cudnn", "flash", "efficient", "math"):
        assert repr(name) in str(info.value)


def test_auto_on_cpu_and_the_read_only_description():
    adapter = _tiny()
    assert adapter.attention_backend == "default"  # off CUDA: torch's own choice
    assert adapter.model_name == "tiny_flux1"
    with pytest.raises(AttributeError):
        adapter.attention_backend = "math"
    assert _tiny("math").attention_backend == "math"


@pytest.mark.parametrize(("family", "dtype", "head_dim", "expected"), [
    ("flux1", torch.bfloat16, 128, "flash"),  # cuDNN faults (issue 14); flash is the fastest other kernel
    ("flux1", torch.float32, 128, "efficient"),  # flash needs half precision; still not cuDNN
    ("flux1", torch.bfloat16, 12, "math"),  # neither flash nor efficient takes a head dim of 12
    ("sd3", torch.bfloat16, 64, "flash"),  # measured faster than cuDNN at 64-wide heads
    ("sd3", torch.float32, 64, "default"),
    ("flux2", torch.bfloat16, 128, "default"),  # torch picks cuDNN there, the fastest
])
def test_auto_on_cuda(family, dtype, head_dim, expected):
    assert resolve_attention_backend("auto", family=family, device=CUDA, dtype=dtype, head_dim=head_dim) == expected
    assert resolve_attention_backend("cudnn", family=family, device=CUDA, dtype=dtype) == "cudnn"  # forced


def test_auto_uses_cudnn_for_flux1_once_a_pair_is_verified(monkeypatch):
    pair = (torch.__version__, 99999)
    assert attention.cudnn_sdpa_faults("flux1", *pair)
    monkeypatch.setitem(attention.CUDNN_SDPA_VERIFIED, "flux1", frozenset({pair}))
    assert not attention.cudnn_sdpa_faults("flux1", *pair)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 99999)
    assert resolve_attention_backend("auto", family="flux1", device=CUDA, dtype=torch.bfloat16) == "default"


# ---- the kernel that runs ---------------------------------------------------------------------
def test_math_gives_the_default_output_and_really_runs_math():
    default, math = _tiny(), _tiny("math")
    x, sigma, cond = _inputs(default)
    with OpLog() as log_default:
        v_default = default.velocity(x, sigma, cond)
    with OpLog() as log_math:
        v_math = math.velocity(x, sigma, cond)
    assert log_default.ran(CPU_FLASH) and not log_math.ran(CPU_FLASH)
    assert v_default.abs().max() > 0.1
    torch.testing.assert_close(v_math, v_default, atol=1e-5, rtol=1e-5)


def _backward_ops(adapter: FluxAdapter, transformer: torch.nn.Module, outer: contextlib.AbstractContextManager
                  ) -> OpLog:
    """Ops of one backward (run outside any attention context) through a checkpointed transformer."""
    transformer.enable_gradient_checkpointing()
    x, sigma, cond = _inputs(adapter)
    x.requires_grad_(True)
    with outer:
        v = adapter.forward(transformer, x, sigma, cond)
    with OpLog() as log:
        v.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    return log


def test_choice_holds_in_the_recomputation_of_checkpointed_blocks():
    adapter = _tiny("math")
    log = _backward_ops(adapter, adapter.transformer, contextlib.nullcontext())
    assert log.ran("aten._softmax_backward_data") and not log.ran(CPU_FLASH)
    copied = copy.deepcopy(adapter.transformer)  # the separate layout's copies carry the choice
    log = _backward_ops(adapter, copied, contextlib.nullcontext())
    assert not log.ran(CPU_FLASH)


def test_a_forward_only_context_does_not_reach_the_recomputation():
    """Why attention.py also hooks the attention modules: sdpa_kernel around the forward alone lets the
    recomputation run torch's default kernel, which saves other tensors than the forward's."""
    adapter = _tiny("default")
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _backward_ops(adapter, adapter.transformer, sdpa_kernel([SDPBackend.MATH]))


# ---- failing in the open ----------------------------------------------------------------------
def test_phase_context_names_model_phase_and_backend():
    adapter = _tiny("math")
    fault = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError) as info:
        with phase_context(adapter, "fake update"):
            raise fault
    message = str(info.value)
    assert type(info.value) is RuntimeError and info.value.__cause__ is fault
    for part in ("fake update", "'tiny_flux1'", "flux1", "attention backend 'math'", "illegal memory access"):
        assert part in message


@pytest.mark.parametrize("text", ["CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx(...)`",
                                  "Expected mha_graph.execute(handle, variant_pack, workspace_ptr.get()).is_good()"
                                  " to be true, but got false."])
def test_library_faults_are_described(text):
    err = describe_failure(_tiny(), "rollout", RuntimeError(text))
    assert "rollout" in str(err) and "attention backend 'default'" in str(err)
    assert "attention_backend='flash'" in str(err)  # the way out, for a fault under torch's own choice
    with pytest.raises(RuntimeError, match="during the generator update of model 'tiny_flux1'"):
        with phase_context(_tiny(), "generator update"):
            raise RuntimeError(text)


@pytest.mark.parametrize("err", [
    ValueError("bad config"),
    RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu!"),  # our bug
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),  # callers catch this type
])
def test_other_errors_pass_through_unchanged(err):
    with pytest.raises(type(err)) as info:
        with phase_context(_tiny(), "fake update"):
            raise err
    assert info.value is err


# ---- layering ---------------------------------------------------------------------------------
def test_shift_from_mu_is_public():
    assert shift_from_mu(0.63, {"time_shift_type": "exponential"}) == pytest.approx(1.8776, abs=1e-4)
    assert shift_from_mu(0.63, {"time_shift_type": "linear"}) == 0.63
    with pytest.raises(ValueError, match="time_shift_type"):
        shift_from_mu(0.63, {"time_shift_type": "cosine"})


def test_no_module_imports_a_private_name_of_another():
    root = Path(attention.__file__).resolve().parents[1]  # tiltflow/models
    offenders = [f"{path.name}: {node.module}.{alias.name}" for path in root.rglob("*.py")
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
                 for alias in node.names if alias.name.startswith("_") and alias.name != "__future__"
                 and (node.module or "").startswith("tiltflow")]
    assert not offenders, offenders
