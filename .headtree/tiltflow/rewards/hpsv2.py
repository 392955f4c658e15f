"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023): an OpenCLIP ViT-H/14 fine-tuned on human
preferences (a training reward). Score = cos(image, prompt), as the HPSv2 code reports it (about 0.2-0.35).

The released checkpoint is an open_clip state dict; it is loaded into a transformers CLIPModel through
openclip_mapping, so neither open_clip nor torchvision is needed. Images are preprocessed as open_clip's
eval transform does (bicubic shortest-edge resize, torchvision-rounded center crop, OpenAI mean/std).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tiltflow.rewards.clip_score import ClipSimilarityReward
from tiltflow.rewards.loading import (
    TOKENIZER,
    ClipEncoder,
    as_dtype,
    load_state_dict,
    load_tokenizer,
    resolve_file,
    resolve_model_dir,
)
from tiltflow.rewards.openclip_mapping import clip_model_from_openclip, hf_config_from_openclip
from tiltflow.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocess

DEFAULT_CHECKPOINT = "xswu/HPSv2"
CHECKPOINT_FILE = "HPS_v2.1_compressed.pt"
# Same BPE vocabulary as open_clip's tokenizer; PickScore needs this folder too.
DEFAULT_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# open_clip's ViT-H-14 architecture (its model_configs/ViT-H-14.json).
VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def openclip_preprocess(image_size: int) -> ImagePreprocess:
    """open_clip's eval transform for a square model input of `image_size`."""
    return ImagePreprocess(shortest_edge=image_size, crop_size=(image_size, image_size), resample="bicubic",
                           mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_rounding="round")


def build_hpsv2(checkpoint: str | Path = DEFAULT_CHECKPOINT, *, filename: str = CHECKPOINT_FILE,
                tokenizer: str | Path = DEFAULT_TOKENIZER, openclip_config: Mapping[str, Any] | str | Path = VIT_H_14,
                device: str = "cpu", dtype: str = "float32", name: str = "hpsv2") -> ClipSimilarityReward:
    """HPSv2.1 reward.

    checkpoint: the .pt/.safetensors file, a folder holding `filename`, or a hub repo id.
    tokenizer: folder or hub id with a CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt).
    openclip_config: open_clip model config (dict or path to its JSON); default ViT-H-14.
    """
    cfg = json.loads(Path(openclip_config).read_text()) if isinstance(openclip_config, (str, Path)) else openclip_config
    ckpt_path = resolve_file(checkpoint, hub_filename=filename, what="HPSv2 checkpoint")
    tok = load_tokenizer(resolve_model_dir(tokenizer, [TOKENIZER], what="HPSv2 tokenizer"))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = hf_config_from_openclip(cfg, tokenizer_ids={k: v for k, v in ids.items() if v is not None})
    model = clip_model_from_openclip(load_state_dict(ckpt_path), config)
    model = model.to(device=device, dtype=as_dtype(dtype)).eval().requires_grad_(False)
    encoder = ClipEncoder(model=model, tokenizer=tok, preprocess=openclip_preprocess(config.vision_config.image_size))
    return ClipSimilarityReward(encoder, name=name, scale=1.0)
