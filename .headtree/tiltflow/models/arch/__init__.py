"""Architectures shipped with tiltflow (the *.json files beside this module) and random-weight builders.

Full-size files hold the real public configs of SD3-M, SD3.5-M, FLUX.1-dev and FLUX.2-klein 4B/9B
(transformer, VAE, scheduler) for benchmarks with random weights (WORLDS.md section 3); tiny_* files
also hold tiny text encoders and are what the CPU tests build.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ARCH_DIR = Path(__file__).resolve().parent
_WORDS = ("a an the of and with on in under above below left right photo painting of cat dog bird car house tree "
          "red green blue yellow black white small large square circle triangle sky city street mountain river "
          "portrait person woman man child robot flower garden night day sun moon sign says hello world").split()


def load_arch(name: str) -> dict[str, Any]:
    """An architecture file: the pipeline class, each component's class and config, adapter settings."""
    path = ARCH_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in ARCH_DIR.glob("*.json"))
        raise ValueError(f"unknown architecture {name!r}; known: {known}")
    return json.loads(path.read_text())


def word_tokenizer(model_max_length: int, chat_template: str | None = None, *, words: Sequence[str] | None = None,
                   specials: Sequence[str] = ("<pad>", "<unk>", "<s>", "</s>"), template: str = "$A </s>") -> Any:
    """A small word-level tokenizer (built with `tokenizers`) standing in for CLIP/T5/Qwen tokenizers in
    random-weight models; it pads, truncates and appends an end token like the real ones. The vocabulary
    is `specials` (pad, unk, bos, eos) then `words` (default: a small English list); `template` is the
    post-processing of one text, e.g. "[BOS] $A [EOS]" (the shapes world's caption tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pad, unk, bos, eos = specials
    vocab = {tok: i for i, tok in enumerate(list(specials) + list(sorted(set(_WORDS)) if words is None else words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template.split()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos,
                                   model_max_length=model_max_length)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def random_module(spec: dict[str, Any], *, seed: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A diffusers or transformers model with random weights, built directly on `device`."""
    import diffusers
    import transformers

    cfg = {k: v for k, v in spec.items() if not k.startswith("_")}
    cls_name = spec["_class_name"]
    devices = [device.index or 0] if device.type == "cuda" else []  # the RNG state restored afterwards
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        if hasattr(diffusers, cls_name) and not hasattr(transformers, cls_name):
            model = getattr(diffusers, cls_name).from_config(cfg)
        else:
            config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
            model = getattr(transformers, cls_name)(config)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def build_random_pipeline(arch: dict[str, Any], *, seed: int, device: torch.device, dtype: torch.dtype,
                          text_encoders: bool) -> Any:
    """The pipeline of `arch` with random weights; without text encoders (text_encoders=False) the
    text components are None and prompts must use stub embeddings."""
    import diffusers

    parts: dict[str, Any] = {}
    for i, (name, spec) in enumerate(sorted(arch["components"].items())):
        if name.startswith("tokenizer"):
            parts[name] = word_tokenizer(spec["model_max_length"], spec.get("chat_template")) if text_encoders else None
        elif name.startswith("text_encoder"):
            parts[name] = random_module(spec, seed=seed + i, device=device, dtype=dtype) if text_encoders else None
        elif name == "scheduler":
            parts[name] = getattr(diffusers, spec["_class_name"]).from_config(spec)
        else:
            parts[name] = random_module(spec, seed=seed + i, device=device, dtype=dtype)
    if "vae" in parts and "batch_norm" in arch:  # FLUX.2: give the latent statistics non-trivial values
        bn = parts["vae"].bn
        g = torch.Generator().manual_seed(seed)
        bn.running_mean.copy_(0.5 * torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    pipeline_cls = getattr(diffusers, arch["pipeline"])
    for name in inspect.signature(pipeline_cls.__init__).parameters:  # text parts an arch file omits
        if name.startswith(("text_encoder", "tokenizer")) and name not in parts:
            if text_encoders:
                raise ValueError(f"architecture {arch['pipeline']} lists no {name!r}; build it without text encoders")
            parts[name] = None
    return pipeline_cls(**parts, **arch.get("pipeline_kwargs", {}))
