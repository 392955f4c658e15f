"""The shapes world's differentiable reward: a small transformers CLIPModel trained contrastively on rendered
(image, caption) pairs, each image also scored against hard-negative captions (wrong colour, count, shape
or position, tiltflow.worlds.shapes.scene.hard_negatives). Saved as a normal CLIP folder (config.json,
model.safetensors, tokenizer.json, preprocessor_config.json) and served by the CLIPScore scorer
(tiltflow.rewards.clip_score.ClipSimilarityReward)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tiltflow.config.shapes import ShapesRunConfig
from tiltflow.worlds.shapes.data import image_pool
from tiltflow.worlds.shapes.scene import Scene, hard_negatives, names_held_out_binding, prompt_sets
from tiltflow.worlds.shapes.teacher import export_folder, step_generator, train_part
from tiltflow.worlds.shapes.text import MAX_TOKENS, build_tokenizer, text_config

NOISE_STD_MAX = 0.1  # augmentation: pixel noise of a random std in [0, this] (images in [0, 1])


def new_clip(cfg: ShapesRunConfig, tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    m = cfg.model
    text = text_config(tokenizer, hidden_size=m.clip_hidden, num_layers=m.clip_layers, num_heads=m.clip_heads,
                       projection_dim=m.clip_projection)
    vision = CLIPVisionConfig(image_size=m.resolution, patch_size=m.clip_patch, hidden_size=m.clip_hidden,
                              intermediate_size=4 * m.clip_hidden, num_hidden_layers=m.clip_layers,
                              num_attention_heads=m.clip_heads, projection_dim=m.clip_projection)
    torch.manual_seed(cfg.seed + 1)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                projection_dim=m.clip_projection))


def image_processor(resolution: int) -> Any:
    """No resize (the images already have the model's size), mean = std = 0.5 (pixels to [-1, 1])."""
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor  # PIL backend: no torchvision

    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": resolution}, do_center_crop=True,
                              crop_size={"height": resolution, "width": resolution}, image_mean=[0.5] * 3,
                              image_std=[0.5] * 3, resample=3)


@functools.cache
def _negative_kinds(scene: Scene) -> tuple[tuple[str, ...], ...]:
    """The allowed hard-negative captions of a scene, one tuple per kind that has any (cached: the training
    loop asks for the same 149 scenes every step)."""
    kinds = [tuple(n.text for n in negs if not names_held_out_binding(n)) for negs in hard_negatives(scene).values()]
    return tuple(c for c in kinds if c)


def negative_texts(scenes: list[Scene], k: int, rng: np.random.Generator) -> list[list[str]]:
    """k hard-negative captions per scene, spread over the kinds it has; none names a held-out binding."""
    out = []
    for s in scenes:
        kinds = _negative_kinds(s)
        picks = []
        for j in range(k):
            kind = kinds[(j + int(rng.integers(len(kinds)))) % len(kinds)]
            picks.append(kind[int(rng.integers(len(kind)))])
        out.append(picks)
    return out


def contrastive_loss(model: Any, pixels: torch.Tensor, texts: list[str], negatives: list[list[str]],
                     tokenizer: Any) -> torch.Tensor:
    """Image -> text cross-entropy over the batch's captions plus every image's hard negatives, and
    text -> image over the batch; a caption repeated in the batch is not a negative of its twins."""
    b = len(texts)
    all_texts = texts + [t for negs in negatives for t in negs]
    # Tokenise each distinct caption once (a batch repeats captions), and compare captions by index.
    unique = list(dict.fromkeys(all_texts))
    index = {t: i for i, t in enumerate(unique)}
    ids = torch.tensor([index[t] for t in all_texts])
    tokens = {k: v[ids] for k, v in tokenizer(unique, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                              return_tensors="pt").items()}
    dev = pixels.device
    # The same embeddings as the scorer's ClipEncoder: pooled states through the projections.
    img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    out = model.text_model(input_ids=tokens["input_ids"].to(dev), attention_mask=tokens["attention_mask"].to(dev))
    txt = F.normalize(model.text_projection(out.pooler_output), dim=-1)
    logits = model.logit_scale.exp() * img @ txt.T  # (B, B + B k)
    same = (ids[:b, None] == ids[None, :]).to(dev)
    same.fill_diagonal_(False)
    logits_i = logits.masked_fill(same, float("-inf"))
    target = torch.arange(b, device=dev)
    logits_t = logits[:, :b].T.masked_fill(same[:, :b].T, float("-inf"))
    return (F.cross_entropy(logits_i, target) + F.cross_entropy(logits_t, target)) / 2


def train_reward_model(cfg: ShapesRunConfig, deadline: float, *, progress: bool = True) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    final_dir = run_dir / "reward_model"
    rc, device = cfg.reward_model, torch.device(cfg.device)
    tokenizer = build_tokenizer()
    scenes = prompt_sets()["train"]
    images, captions = image_pool(run_dir / f"reward_data_{cfg.model.resolution}.npz", scenes, rc.num_images,
                                  cfg.model.resolution, cfg.seed + 1)
    pool = torch.from_numpy(images).to(device)
    model = new_clip(cfg, tokenizer).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=0.1)

    def train_step(step: int) -> Tensor:
        g = step_generator(cfg.seed, step, 2)
        rng = np.random.default_rng([cfg.seed, step, 2])
        idx = torch.randint(pool.shape[0], (rc.batch_size,), generator=g)
        x = pool[idx.to(device)].permute(0, 3, 1, 2).float() / 255.0
        noise = torch.rand(rc.batch_size, 1, 1, 1, generator=g) * NOISE_STD_MAX
        x = (x + noise.to(device) * torch.randn(x.shape, generator=g).to(device)).clamp(0, 1)
        batch = [scenes[int(captions[int(i)])] for i in idx]
        negs = negative_texts(batch, rc.num_hard_negatives, rng)
        loss = contrastive_loss(model, x * 2 - 1, [s.text for s in batch], negs, tokenizer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()  # read (and checked) by train_part at its rows and checkpoints

    return train_part(cfg, "reward_model", rc, {"model": model, "optimizer": opt}, train_step,
                      lambda: export_clip(model, tokenizer, cfg.model.resolution, final_dir), deadline, progress,
                      loss_name="contrastive loss")


def export_clip(model: Any, tokenizer: Any, resolution: int, folder: Path) -> None:
    export_folder(model, folder, tokenizer, image_processor(resolution))


def load_clip_reward(folder: str | Path, device: str = "cpu", name: str = "clip") -> Any:
    """The trained reward model as a CLIPScore reward (scale 100, ClipSimilarityReward), loaded by
    tiltflow.rewards.loading.load_clip in float32 with the world's word-level tokenizer (AutoTokenizer; the
    default CLIPTokenizer would rebuild a BPE one from it)."""
    from transformers import AutoTokenizer

    from tiltflow.rewards.clip_score import ClipSimilarityReward
    from tiltflow.rewards.loading import load_clip

    encoder = load_clip(folder, device=device, what="shapes reward model",
                        tokenizer_loader=lambda p: AutoTokenizer.from_pretrained(str(p), local_files_only=True))
    return ClipSimilarityReward(encoder, name=name, scale=100.0)


@torch.no_grad()
def hard_negative_accuracy(reward: Any, scenes: list[Scene], size: int, *, seed: int = 777,
                           per_kind: int = 2, batch_size: int = 128) -> dict[str, float]:
    """How often the reward scores a render's own caption above each of its hard negatives (up to
    `per_kind` of each kind), by kind: reward_model/pairwise_{colour,count,shape,position}."""
    from tiltflow.worlds.shapes.render import render, to_tensor_images

    pairs = [(i, s.text, n.text, kind) for i, s in enumerate(scenes)
             for kind, negs in hard_negatives(s).items() for n in negs[:per_kind]]
    images = to_tensor_images(np.stack([render(s, size, seed + i) for i, s in enumerate(scenes)]))
    wins: dict[str, list[bool]] = {}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        x = images[[i for i, *_ in chunk]]
        pos = reward(x, [p for _, p, _, _ in chunk]).scores
        neg = reward(x, [n for _, _, n, _ in chunk]).scores
        for (_, _, _, kind), win in zip(chunk, (pos > neg).tolist()):
            wins.setdefault(kind, []).append(bool(win))
    return {f"reward_model/pairwise_{k}": float(np.mean(v)) for k, v in wins.items()}
