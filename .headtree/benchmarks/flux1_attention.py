"""Why FLUX.1-dev faults in cuDNN's fused attention backward (issue 14), and what each SDPA kernel costs.

Three kinds of case, each in its own subprocess (an illegal memory access poisons the CUDA context):
- raw: torch's scaled_dot_product_attention alone at a family's exact shapes, in the q/k/v and grad-output
  layouts diffusers' processors produce (FLUX.1 double blocks: (B,S,H,D) permuted to (B,H,S,D); single
  blocks: the grad-output is a slice of the grad of cat([attn, mlp], -1), row stride H*D + 4*H*D), under
  one kernel; `time:*` cases time forward+backward of every kernel, cuDNN last.
- reduced: a FLUX.1-dev transformer at full width with few blocks, under cuDNN only, to find which block
  kind, block sequence and whether the guidance embedding matter.
- full: FLUX.1-dev at full size with random weights through tiltflow's FluxAdapter, 512 px, batch 1,
  bf16 autocast, forward+backward (grads to the latents and the text embeddings) under each kernel; the
  adapter's default ("auto") with activation checkpointing; and a reduced model showing that a
  forward-only sdpa_kernel does not reach the recomputation of a checkpointed block.

    PYTHONPATH=. python benchmarks/flux1_attention.py --out flux1_attention.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
# (batch, heads, tokens, head_dim, width of the single-block MLP branch next to attention in the cat)
SHAPES = {"flux1": (1, 24, 1536, 128, 4 * 3072),  # 512 text + 1024 image tokens at 512 px
          "flux1_b4": (4, 24, 1536, 128, 4 * 3072),  # the stage-1 batch
          "klein9b": (1, 32, 1536, 128, 3 * 4096),  # FLUX.2-klein-9B (SwiGLU: 2 x 12288 in, 12288 out)
          "sd35": (1, 24, 1357, 64, 0)}  # SD3.5-M: 1024 image + 77 + 256 text tokens, no single blocks
RAW_FAULT = [f"raw:flux1:{lay}" for lay in ("contiguous", "bshd", "bshd_single", "contiguous_single",
                                            "seq_single_double", "seq_double_single", "seq_single_single")]
RAW_FAULT += ["raw:flux1_b4:seq_single_double", "raw:klein9b:klein_single", "raw:klein9b:seq_single_double",
              "raw:sd35:bshd"]
REDUCED = ["reduced:1:0:g", "reduced:0:1:g", "reduced:1:1:g", "reduced:1:1:-"]
TIME = ["time:flux1", "time:klein9b", "time:sd35"]
CHECK = ["gradcheck:flux1:double_single"]  # the order that does not fault: are its gradients right?
FULL = ["full:kernels", "full:auto_checkpointed", "recompute:1:1"]


def sync() -> None:
    torch.cuda.synchronize()


def emit(row: dict[str, Any]) -> None:
    print("ROW " + json.dumps(row), flush=True)


def describe(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "stride": list(t.stride()), "contiguous": t.is_contiguous(),
            "dtype": str(t.dtype)}


# ---- raw SDPA -----------------------------------------------------------------------------------
def raw_inputs(shape: str, layout: str, gen: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """q, k, v (B, H, S, D) bf16 in the given layout (non-leaf views of leaf tensors) and a grad-output."""
    b, h, s, d, mlp = SHAPES[shape]
    kw = {"device": "cuda", "dtype": torch.bfloat16, "generator": gen}

    def bshd() -> torch.Tensor:  # as diffusers' native SDPA path: (B, S, H, D) permuted to (B, H, S, D)
        return torch.randn(b, s, h, d, **kw).requires_grad_().permute(0, 2, 1, 3)

    def grad_single() -> torch.Tensor:  # slice of the grad of cat([attn (B,S,H*D), mlp (B,S,mlp)], -1)
        wide = torch.randn(b, s, h * d + mlp, **kw)
        return wide[..., : h * d].unflatten(-1, (h, d)).permute(0, 2, 1, 3)

    if layout.startswith("contiguous"):
        qkv = [torch.randn(b, h, s, d, **kw).requires_grad_() for _ in range(3)]
        grad = grad_single() if layout.endswith("single") else torch.randn(b, h, s, d, **kw)
    elif layout == "klein_single":  # q, k normalised (contiguous); v a chunk of the fused qkv+mlp projection
        fused = torch.randn(b, s, 3 * h * d + 2 * mlp, **kw).requires_grad_()
        v = fused[..., 2 * h * d: 3 * h * d].unflatten(-1, (h, d)).permute(0, 2, 1, 3)
        qkv = [bshd(), bshd(), v]
        grad = grad_single()
    else:
        qkv = [bshd() for _ in range(3)]
        grad = grad_single() if layout == "bshd_single" else bshd().detach()
    return qkv, grad


def fwd_bwd(qkv: list[torch.Tensor], grad: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(*qkv)
    dq, dk, dv = torch.autograd.grad(out, qkv, grad)
    return torch.stack([t.float().abs().sum() for t in (out, dq, dk, dv)])


def default_op(qkv: list[torch.Tensor]) -> str:
    """The aten op torch's own priority picks for these inputs (one forward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Log() as log:
        F.scaled_dot_product_attention(*qkv)
    return next((op for op in log.ops if "attention" in op), ",".join(log.ops))


def case_raw(shape: str, layout: str) -> None:
    """cuDNN only; seq_* layouts run two backward calls of different grad layouts in one process."""
    gen = torch.Generator("cuda").manual_seed(0)
    steps = layout.split("_")[1:] if layout.startswith("seq_") else [layout]
    for i, step in enumerate(steps):
        step = {"single": "bshd_single", "double": "bshd"}.get(step, step)
        qkv, grad = raw_inputs(shape, step, gen)
        emit({"event": "inputs", "step": i, "layout": step, "q": describe(qkv[0]), "v": describe(qkv[2]),
              "grad_out": describe(grad), "default_op": default_op(qkv)})
        with sdpa_kernel([KERNELS["cudnn"]]):
            stats = fwd_bwd(qkv, grad)
        sync()
        emit({"event": "ok", "step": i, "layout": step, "finite": bool(torch.isfinite(stats).all())})


def case_gradcheck(shape: str, layout: str) -> None:
    """cuDNN gradients against flash's for each call of a sequence of grad-output layouts."""
    gen = torch.Generator("cuda").manual_seed(0)
    for i, step in enumerate(layout.split("_")):
        qkv, grad = raw_inputs(shape, {"single": "bshd_single", "double": "bshd"}[step], gen)
        grads = {}
        for name in ("flash", "cudnn"):
            with sdpa_kernel([KERNELS[name]]):
                grads[name] = torch.autograd.grad(F.scaled_dot_product_attention(*qkv), qkv, grad)
        sync()
        err = [(a.float() - b.float()).abs().max().item() for a, b in zip(grads["cudnn"], grads["flash"])]
        emit({"event": "compared", "step": i, "layout": step, "grad_out_stride": list(grad.stride()),
              "max_abs_diff_dq_dk_dv": err, "flash_max_abs_dq_dk_dv": [g.float().abs().max().item()
                                                                     for g in grads["flash"]]})


def timed(fn: Any, repeats: int) -> float:
    fn()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    sync()
    return start.elapsed_time(end) / repeats


def case_time(shape: str, repeats: int) -> None:
    """Forward+backward time of each kernel in the diffusers layout (double-block grad), cuDNN last."""
    gen = torch.Generator("cuda").manual_seed(0)
    qkv, grad = raw_inputs(shape, "bshd", gen)
    emit({"event": "default_op", "op": default_op(qkv)})
    for name in ("flash", "efficient", "math", "cudnn"):
        with sdpa_kernel([KERNELS[name]]):
            ms = timed(lambda: fwd_bwd(qkv, grad), repeats)
        emit({"event": "timed", "kernel": name, "fwd_bwd_ms": round(ms, 4)})


# ---- FLUX.1 models ------------------------------------------------------------------------------
def flux_spec(num_layers: int | None = None, num_single: int | None = None, guidance: bool = True) -> dict:
    from tiltflow.models.arch import load_arch

    spec = dict(load_arch("flux1_dev")["components"]["transformer"])
    if num_layers is not None:
        spec.update(num_layers=num_layers, num_single_layers=num_single)
    spec["guidance_embeds"] = guidance
    return spec


def flux_call(transformer: torch.nn.Module, resolution: int, batch: int, seed: int = 0) -> torch.Tensor:
    """One forward (bf16 autocast) as FluxAdapter.forward makes it; returns a scalar to differentiate."""
    from tiltflow.models.adapters.flux import image_ids

    g = torch.Generator("cuda").manual_seed(seed)
    cfg, hw = transformer.config, resolution // 16
    x = torch.randn(batch, hw * hw, cfg.in_channels, device="cuda", generator=g, requires_grad=True)
    txt = torch.randn(batch, 512, cfg.joint_attention_dim, device="cuda", generator=g, requires_grad=True)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, device="cuda", generator=g)
    guidance = torch.full((batch,), 3.5, device="cuda") if cfg.guidance_embeds else None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = transformer(hidden_states=x.bfloat16(), encoder_hidden_states=txt.bfloat16(),
                          pooled_projections=pooled.bfloat16(), timestep=torch.full((batch,), 0.6, device="cuda"),
                          guidance=guidance, img_ids=image_ids(hw, hw, x.device, torch.bfloat16),
                          txt_ids=torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16), return_dict=False)[0]
    return (out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).mean()


def case_reduced(num_layers: int, num_single: int, guidance: bool, resolution: int) -> None:
    from tiltflow.models.arch import random_module

    model = random_module(flux_spec(num_layers, num_single, guidance), seed=0, device=torch.device("cuda"),
                          dtype=torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    with sdpa_kernel([KERNELS["cudnn"]]):
        loss = flux_call(model, resolution, 1)
        loss.backward()
    sync()
    emit({"event": "ok", "loss_finite": bool(torch.isfinite(loss).item())})


def case_recompute(num_layers: int, num_single: int, resolution: int) -> None:
    """Activation checkpointing: flash held by attention-module hooks (tiltflow), then flash only as a
    forward-time sdpa_kernel, with backward (and so the recomputation) outside it."""
    from tiltflow.models.adapters.attention import bind_attention_backend
    from tiltflow.models.arch import random_module

    model = random_module(flux_spec(num_layers, num_single), seed=0, device=torch.device("cuda"),
                          dtype=torch.bfloat16)
    model.enable_gradient_checkpointing()
    model.train()
    handles = bind_attention_backend(model, "flash")
    flux_call(model, resolution, 1).backward()
    sync()
    emit({"event": "ok", "variant": "hooks", "hooks": len(handles)})
    for hd in handles:
        hd.remove()
    with sdpa_kernel([KERNELS["flash"]]):
        loss = flux_call(model, resolution, 1)
    emit({"event": "forward_ok", "variant": "forward_context_only"})
    loss.backward()
    sync()
    emit({"event": "ok", "variant": "forward_context_only"})


def full_adapter(attention_backend: str) -> Any:
    from tiltflow.models.adapters.flux import FluxAdapter

    return FluxAdapter.random("flux1_dev", seed=0, device="cuda", text_encoders=False, guidance=3.5,
                              attention_backend=attention_backend)


def adapter_step(adapter: Any, resolution: int) -> torch.Tensor:
    """Forward+backward through FluxAdapter.forward: grads to the latents and the text embeddings."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *adapter.latent_shape(resolution, resolution), generator=g).cuda().requires_grad_()
    cond = {k: v.clone().requires_grad_() for k, v in adapter.encode(["a red cat on a street"]).items()}
    v = adapter.forward(adapter.transformer, x, torch.tensor([0.6], device="cuda"), cond)
    loss = (v * torch.linspace(-1, 1, v.shape[1], device="cuda")[None, :, None, None]).mean()
    loss.backward()
    return torch.stack([loss.detach(), x.grad.abs().sum(), cond["prompt_embeds"].grad.abs().sum()])


def case_full_kernels(resolution: int, repeats: int) -> None:
    adapter = full_adapter("default")  # no restriction: the cases below choose the kernel themselves
    emit({"event": "built", "model_mem_gib": round(torch.cuda.memory_allocated() / 2**30, 2)})
    for name in ("flash", "efficient", "math", "cudnn"):
        torch.cuda.reset_peak_memory_stats()
        with sdpa_kernel([KERNELS[name]]):  # forward AND backward inside: no recomputation here anyway
            stats = adapter_step(adapter, resolution)
            sync()
            emit({"event": "first_ok", "kernel": name})
            t0 = time.perf_counter()
            for _ in range(repeats):
                stats = adapter_step(adapter, resolution)
            sync()
        emit({"event": "timed", "kernel": name, "fwd_bwd_s": round((time.perf_counter() - t0) / repeats, 4),
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "finite": bool(torch.isfinite(stats).all())})


def case_full_auto(resolution: int, repeats: int) -> None:
    """The adapter's defaults, activation checkpointing on (as training runs it), no sdpa_kernel outside."""
    adapter = full_adapter("auto")
    adapter.transformer.enable_gradient_checkpointing()
    adapter.transformer.train()
    torch.cuda.reset_peak_memory_stats()  # the fp32 build (random init) peaks higher than the step
    stats = adapter_step(adapter, resolution)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        stats = adapter_step(adapter, resolution)
    sync()
    emit({"event": "timed", "attention_backend": adapter.attention_backend, "model_name": adapter.model_name,
          "checkpointed": True, "fwd_bwd_s": round((time.perf_counter() - t0) / repeats, 4),
          "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
          "finite": bool(torch.isfinite(stats).all())})


def run_case(case: str, args: argparse.Namespace) -> None:
    kind, *rest = case.split(":")
    if kind == "raw":
        case_raw(rest[0], rest[1])
    elif kind == "gradcheck":
        case_gradcheck(rest[0], rest[1])
    elif kind == "time":
        case_time(rest[0], args.repeats * 10)
    elif kind == "reduced":
        case_reduced(int(rest[0]), int(rest[1]), rest[2] == "g", args.resolution)
    elif kind == "recompute":
        case_recompute(int(rest[0]), int(rest[1]), args.resolution)
    elif case == "full:kernels":
        case_full_kernels(args.resolution, args.repeats)
    elif case == "full:auto_checkpointed":
        case_full_auto(args.resolution, args.repeats)
    else:
        raise ValueError(f"unknown case {case!r}")


# ---- driver -------------------------------------------------------------------------------------
def spawn(case: str, args: argparse.Namespace, blocking: bool) -> dict[str, Any]:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1" if blocking else "0")
    cmd = [sys.executable, __file__, "--case", case, "--resolution", str(args.resolution),
           "--repeats", str(args.repeats)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, stdout, stderr = "timeout", str(err.stdout or ""), str(err.stderr or "")
    rows = [json.loads(line[4:]) for line in stdout.splitlines() if line.startswith("ROW ")]
    error = [ln for ln in stderr.strip().splitlines() if ln.strip()][-12:] if rc != 0 else []
    return {"case": case, "cuda_launch_blocking": blocking, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "rows": rows, "error_tail": error}


def environment() -> dict[str, Any]:
    import diffusers

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
            "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "diffusers": diffusers.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON report (required unless --case)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the full model (x10 for raw SDPA)")
    p.add_argument("--groups", nargs="+", default=["raw", "time", "reduced", "full", "check"],
                   choices=["raw", "time", "reduced", "full", "check"])
    p.add_argument("--cases", nargs="+", help="run these cases (names as in the report) instead of --groups")
    p.add_argument("--case-timeout", type=float, default=240.0, help="seconds per subprocess")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = p.parse_args(argv)
    if args.case:
        try:
            run_case(args.case, args)
        except BaseException:
            traceback.print_exc()
            return 1
        return 0
    if args.out is None:
        p.error("--out is required")
    if not torch.cuda.is_available():
        print("flux1_attention: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    groups = {"raw": (RAW_FAULT, True), "time": (TIME, False), "reduced": (REDUCED, True), "full": (FULL, False),
              "check": (CHECK, False)}
    if args.cases:
        known = {c: blocking for cases, blocking in groups.values() for c in cases}
        unknown = sorted(set(args.cases) - set(known))
        if unknown:
            p.error(f"unknown --cases {unknown}; known: {sorted(known)}")
        groups = {"selected": (args.cases, False)}
        args.groups = ["selected"]
    report: dict[str, Any] = {"command": " ".join(["python", "benchmarks/flux1_attention.py", *(argv or sys.argv[1:])]),
                              **environment(), "settings": {k: str(v) for k, v in vars(args).items()},
                              "shapes": {k: dict(zip(("batch", "heads", "tokens", "head_dim", "mlp_width"), v))
                                         for k, v in SHAPES.items()}, "cases": []}
    for group in args.groups:
        cases, blocking = groups[group]
        for case in cases:
            row = spawn(case, args, blocking)
            print(json.dumps(row), flush=True)
            report["cases"].append(row)
            args.out.write_text(json.dumps(report, indent=1) + "\n")  # written after each case
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
