"""Export a trained generator for stock diffusers (WORLDS.md section 3): a LoRA file that the family's
pipeline reads with `pipe.load_lora_weights(folder)`, or a merged transformer folder that
`<Transformer>.from_pretrained(folder)` reads.

A stage-2 generator carries two adapters (the stage-1 LoRA, frozen, and the stage-2 one); they are
exported as ONE LoRA of rank r1 + r2 whose product equals the sum of both updates exactly:
A = [A1; A2], B = [s1 B1, s2 B2] with alpha = rank (scale 1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tiltflow.models.lora import full_value

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def combine_lora_states(parts: Sequence[tuple[dict[str, Tensor], float]]) -> tuple[dict[str, Tensor], int]:
    """Sum LoRAs given as (peft state dict, scale alpha / r) into one LoRA of scale 1: (state, rank).
    A module that some part does not touch gets zero rows from that part."""
    modules = sorted({k[: -len(".lora_A.weight")] for sd, _ in parts for k in sd if k.endswith(".lora_A.weight")})
    out: dict[str, Tensor] = {}
    for m in modules:
        a_parts, b_parts = [], []
        ref = next(sd for sd, _ in parts if f"{m}.lora_A.weight" in sd)
        d_in, d_out = ref[f"{m}.lora_A.weight"].shape[1], ref[f"{m}.lora_B.weight"].shape[0]
        for sd, scale in parts:
            r = next(v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight"))
            a = sd.get(f"{m}.lora_A.weight", torch.zeros(r, d_in))
            b = sd.get(f"{m}.lora_B.weight", torch.zeros(d_out, r))
            a_parts.append(a.detach().float().cpu())
            b_parts.append(b.detach().float().cpu() * scale)
        out[f"{m}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
        out[f"{m}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
    ranks = {v.shape[0] for k, v in out.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise RuntimeError(f"inconsistent combined LoRA ranks {sorted(ranks)}")
    return out, ranks.pop()


def combined_lora(transformer: nn.Module, adapter_names: Sequence[str]) -> tuple[dict[str, Tensor], int]:
    """The sum of the transformer's named adapters as one LoRA with scale 1: (peft state dict, rank)."""
    from peft.utils import get_peft_model_state_dict

    cfgs = getattr(transformer, "peft_config", {})
    missing = [n for n in adapter_names if n not in cfgs]
    if missing:
        raise KeyError(f"transformer has no adapter(s) {missing}; it has {sorted(cfgs)}")
    states = [{k: full_value(v) for k, v in get_peft_model_state_dict(transformer, adapter_name=n).items()}
              for n in adapter_names]  # gathered when sharded
    return combine_lora_states([(st, float(cfgs[n].lora_alpha) / float(cfgs[n].r))
                                for st, n in zip(states, adapter_names)])


def export_lora(transformer: nn.Module, adapter_names: Sequence[str], out_dir: str | Path, pipeline_cls: Any,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write the generator's LoRA (its adapters summed) where `pipeline_cls.load_lora_weights` finds it."""
    return save_lora(*combined_lora(transformer, adapter_names), out_dir, pipeline_cls, dtype)


def save_lora(state: dict[str, Tensor], rank: int, out_dir: str | Path, pipeline_cls: Any,
              dtype: torch.dtype = torch.float32) -> Path:
    """Write a scale-1 LoRA (peft keys) for `pipeline_cls.load_lora_weights`; the adapter metadata (rank,
    alpha = rank, targets) travels inside the safetensors file."""
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": targets, "lora_dropout": 0.0, "bias": "none"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(out, transformer_lora_layers={k: v.to(dtype) for k, v in state.items()},
                                   weight_name=LORA_WEIGHT_NAME, transformer_lora_adapter_metadata=metadata)
    return out / LORA_WEIGHT_NAME


def fold_lora(weights: dict[str, Tensor], lora: dict[str, Tensor]) -> dict[str, Tensor]:
    """Plain float32 `weights` with a scale-1 LoRA (peft keys, as combine_lora_states returns) folded in:
    W + B A for every module the LoRA touches. `weights` is not modified."""
    out = dict(weights)
    for key in [k for k in lora if k.endswith(".lora_A.weight")]:
        module = key[: -len(".lora_A.weight")]
        if f"{module}.weight" not in out:
            raise KeyError(f"the LoRA touches {module!r}, which the weights do not have")
        delta = lora[f"{module}.lora_B.weight"].float() @ lora[key].float()
        out[f"{module}.weight"] = out[f"{module}.weight"] + delta.to(out[f"{module}.weight"].device)
    return out


@torch.no_grad()
def merged_state_dict(transformer: nn.Module, adapter_names: Sequence[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """The transformer's weights with the named adapters folded in, under the plain diffusers names;
    the module itself is left untouched (so a shared teacher stays exact). Sharded (FSDP2) weights are
    gathered: every rank calls this, and every rank gets the whole state."""
    state, _ = combined_lora(transformer, adapter_names) if adapter_names else ({}, 0)
    out = {key.replace(".base_layer.", "."): full_value(value.detach()).float().cpu()
           for key, value in transformer.state_dict().items() if ".lora_" not in key}
    return {k: v.to(dtype).contiguous() for k, v in fold_lora(out, state).items()}


WEIGHTS_STEM = "diffusion_pytorch_model"  # diffusers' file names: <stem>.safetensors, or shards and an index


def shard_keys(state: dict[str, Tensor], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """`state`'s keys in order, cut into consecutive groups of at most `max_shard_bytes` at `itemsize` bytes an
    element (a tensor larger than that is a group alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def save_transformer_folder(transformer: nn.Module, state: dict[str, Tensor], out_dir: str | Path,
                            dtype: torch.dtype, max_shard_bytes: int = 10 * 10**9) -> Path:
    """A folder that `type(transformer).from_pretrained(folder)` reads: transformer's config.json and `state`
    (plain diffusers names) in `dtype`, as diffusion_pytorch_model.safetensors, or past `max_shard_bytes` (10 GB,
    as diffusers' own save) as numbered shards plus diffusion_pytorch_model.safetensors.index.json. Each shard
    is cast on its own (the peak is one shard, not a second copy of the model). Written next to `out_dir` first
    and moved into place, so a folder that exists is complete."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = {**dict(transformer.config), "_class_name": type(transformer).__name__}
    (tmp / "config.json").write_text(json.dumps(config, indent=1, default=list) + "\n")
    groups = shard_keys(state, dtype.itemsize, max_shard_bytes)
    names = ([f"{WEIGHTS_STEM}.safetensors"] if len(groups) == 1 else
             [f"{WEIGHTS_STEM}-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
    for name, keys in zip(names, groups):
        save_file({k: state[k].to(dtype).contiguous() for k in keys}, str(tmp / name), metadata={"format": "pt"})
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(v.numel() for v in state.values()) * dtype.itemsize},
                 "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
        (tmp / f"{WEIGHTS_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def export_merged_transformer(transformer: nn.Module, adapter_names: Sequence[str], out_dir: str | Path,
                              dtype: torch.dtype = torch.bfloat16) -> Path:
    """A transformer folder (config.json + diffusion_pytorch_model.safetensors) with the LoRA merged."""
    return save_transformer_folder(transformer, merged_state_dict(transformer, adapter_names, dtype), out_dir, dtype)
