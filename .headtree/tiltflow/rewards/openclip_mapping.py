"""Load open_clip-format CLIP weights (e.g. the HPSv2.1 checkpoint) into a transformers CLIPModel.

open_clip is not needed at run time: its config is translated to a CLIPConfig and its state-dict keys
are renamed (fused attention in-projections are split into q, k, v; projection matrices transposed).
Validated against a real open_clip model in tests/fixtures/hpsv2/.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

# Keys of the standard (non-"custom text") open_clip CLIP with a ViT image tower, and no more: options
# that change the architecture (LayerScale, attentional pooling, SigLIP bias, HF text towers...) are refused.
_TOP_KEYS = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "custom_text", "init_logit_scale"}
_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio", "patch_dropout"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_IGNORED_WEIGHTS = {"attn_mask", "text.attn_mask"}

_BLOCK = r"(?P<tower>visual\.)?transformer\.resblocks\.(?P<i>\d+)\."
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# open_clip multiplies by these (x @ proj, shape (width, embed)); transformers' Linear wants (embed, width).
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def hf_config_from_openclip(model_cfg: Mapping[str, Any], *, tokenizer_ids: Mapping[str, int] | None = None) -> Any:
    """transformers CLIPConfig equivalent to an open_clip model config (e.g. open_clip's ViT-H-14.json).

    tokenizer_ids: optional bos/eos/pad ids; the text tower pools at the first eos token.
    """
    from transformers import CLIPConfig

    vision, text = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    _check_keys("open_clip model config", model_cfg, _TOP_KEYS)
    _check_keys("open_clip vision_cfg", vision, _VISION_KEYS)
    _check_keys("open_clip text_cfg", text, _TEXT_KEYS)
    if model_cfg.get("custom_text", False):
        raise ValueError("open_clip config with custom_text=True (CustomTextCLIP) is not supported")
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    width_v, width_t = int(vision.get("width", 768)), int(text.get("width", 512))
    head_width = int(vision.get("head_width", 64))
    ids = dict(tokenizer_ids or {})
    text_config = dict(hidden_size=width_t, intermediate_size=int(width_t * float(text.get("mlp_ratio", 4.0))),
                       num_hidden_layers=int(text.get("layers", 12)), num_attention_heads=int(text.get("heads", 8)),
                       vocab_size=int(text.get("vocab_size", 49408)),
                       max_position_embeddings=int(text.get("context_length", 77)), hidden_act=act, layer_norm_eps=1e-5,
                       **ids)
    vision_config = dict(hidden_size=width_v, intermediate_size=int(width_v * float(vision.get("mlp_ratio", 4.0))),
                         num_hidden_layers=int(vision.get("layers", 12)), num_attention_heads=width_v // head_width,
                         image_size=int(vision.get("image_size", 224)), patch_size=int(vision.get("patch_size", 16)),
                         hidden_act=act, layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text_config, vision_config=vision_config,
                      projection_dim=int(model_cfg.get("embed_dim", 512)))


def openclip_to_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip CLIP state dict to transformers CLIPModel keys. Unknown keys raise ValueError."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in _IGNORED_WEIGHTS:
            continue
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif (m := re.match(_BLOCK + r"(?P<rest>.+)$", key)) is not None:
            if not _map_block(out, m.group("tower"), int(m.group("i")), m.group("rest"), value):
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"open_clip state dict has {len(unknown)} keys this mapping does not know, e.g. "
                         f"{unknown[:5]}; only the standard ViT CLIP layout is supported")
    return out


def _map_block(out: dict[str, Tensor], tower: str | None, index: int, rest: str, value: Tensor) -> bool:
    prefix = f"{'vision_model' if tower else 'text_model'}.encoder.layers.{index}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[-1]  # "weight" or "bias"
        q, k, v = value.chunk(3, dim=0)  # rows are [q; k; v], as in torch.nn.MultiheadAttention
        for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
        return True
    module, _, param = rest.rpartition(".")
    if module not in _BLOCK_RENAMES or param not in ("weight", "bias"):
        return False
    out[f"{prefix}{_BLOCK_RENAMES[module]}.{param}"] = value
    return True


def clip_model_from_openclip(state: Mapping[str, Tensor], config: Any) -> Any:
    """A transformers CLIPModel holding the open_clip weights `state` (strict: every weight must match).

    The model is built on the meta device and the weights assigned, so a ViT-H/14 does not pay for a
    random initialisation first; the only buffers, position ids, are then rebuilt.
    """
    from transformers import CLIPModel

    mapped = openclip_to_hf_state_dict(state)
    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(mapped, strict=True, assign=True)
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} was not restored from the open_clip weights")
        module_name, _, attr = name.rpartition(".")
        fresh = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()
        model.get_submodule(module_name).register_buffer(attr, fresh, persistent=False)
    return model


def _check_keys(what: str, cfg: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(cfg) - allowed)
    if extra:
        raise ValueError(f"{what} has unsupported keys {extra}; supported: {sorted(allowed)}")
