"""Tiny random reward models built from configs, for the tests that must run offline on CPU (not part of the
package: test fixtures).

make_tiny_clip_folder writes a transformers CLIP folder (config, safetensors weights, a character-level
CLIP BPE tokenizer, preprocessor_config.json) that every CLIP-based scorer here can load by path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    others = [b for b in range(256) if b not in printable]  # numbered from 256 in byte order
    return {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}


def write_tiny_clip_tokenizer(folder: Path, *, model_max_length: int = 16) -> int:
    """A character-level CLIP BPE tokenizer (no merges) in `folder`; returns its vocabulary size."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"model_max_length": model_max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def write_processor_config(folder: Path, *, image_size: int, resample: int = 3) -> None:
    """preprocessor_config.json of a CLIPImageProcessor with shortest edge = crop = image_size."""
    config = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
              "resample": resample, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def tiny_clip_config(vocab_size: int, *, projection_dim: int = 16, image_size: int = 32, context_length: int = 16,
                     eos_token_id: int | None = None) -> Any:
    from transformers import CLIPConfig

    eos = vocab_size - 1 if eos_token_id is None else eos_token_id
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=vocab_size,
                max_position_embeddings=context_length, bos_token_id=vocab_size - 2, eos_token_id=eos, pad_token_id=eos)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def make_tiny_clip_folder(folder: str | Path, *, seed: int = 0, projection_dim: int = 16, image_size: int = 32) -> Path:
    """A random tiny CLIPModel saved as a complete hub-style folder; returns the folder."""
    from transformers import CLIPModel

    folder = Path(folder)
    vocab_size = write_tiny_clip_tokenizer(folder)
    write_processor_config(folder, image_size=image_size)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(vocab_size, projection_dim=projection_dim, image_size=image_size))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_aesthetic_head(path: str | Path, *, in_features: int = 16, seed: int = 0) -> Path:
    """A random head with the released layout (layers.{0,2,4,6,7}, dropouts between) saved with torch.save."""
    generator = torch.Generator().manual_seed(seed)
    widths = [in_features, 24, 12, 8, 4, 1]
    state = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=generator) / n_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(n_out, generator=generator) * 0.1
    torch.save(state, path)
    return Path(path)
