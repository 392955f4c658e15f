"""The shapes world's models on CPU at tiny size: the text encoder round-trips through from_pretrained
offline; the adapter keeps the SD3 conventions; the CLIP reward model is served by the CLIPScore scorer and
the verifier is a non-differentiable reward; the contrastive loss ranks a caption above its hard negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiltflow.config.shapes import ShapesModelSpec, ShapesRunConfig
from tiltflow.rewards.base import Reward, RewardSet
from tiltflow.rewards.clip_score import ClipSimilarityReward
from tiltflow.worlds.shapes import render as R
from tiltflow.worlds.shapes.models import ShapesAdapter, euler_sample, new_transformer
from tiltflow.worlds.shapes.rewards import PartialVerifierReward, VerifierReward, build_rewards
from tiltflow.worlds.shapes.scene import VocabularyError, hard_negatives, parse, vocabulary
from tiltflow.worlds.shapes.text import MAX_TOKENS, TextEncoder, build_text_encoder, build_tokenizer

TINY = ShapesModelSpec(num_layers=1, num_heads=2, head_dim=8, text_hidden=16, text_layers=1, clip_hidden=16,
                       clip_layers=1, clip_projection=16)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return build_text_encoder(tmp_path_factory.mktemp("text"), seed=0, hidden_size=16, num_layers=1, num_heads=2)


def test_tokenizer_is_word_level_over_the_vocabulary():
    tok = build_tokenizer()
    assert len(tok) == len(vocabulary()) + 4
    ids = tok("a photo of two red circles")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 6 + 2
    assert tok.unk_token_id not in ids
    assert tok.unk_token_id in tok("a photo of a hexagon")["input_ids"]
    longest = max((s.text for s in _all()), key=lambda t: len(t.split()))
    assert len(tok(longest)["input_ids"]) <= MAX_TOKENS


def _all():
    from tiltflow.worlds.shapes.scene import CATEGORIES, all_scenes

    return [s for c in CATEGORIES for s in all_scenes(c)]


def test_text_encoder_round_trips_offline(text_dir, monkeypatch):
    from transformers import CLIPTextModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder(text_dir)
    out = enc(["a photo of a red circle", "a photo of a blue circle", ""])
    assert out["prompt_embeds"].shape == (3, MAX_TOKENS, 16) and out["pooled"].shape == (3, 16)
    assert not torch.allclose(out["pooled"][0], out["pooled"][1])  # one word apart, different embeddings
    again = CLIPTextModel.from_pretrained(str(text_dir), local_files_only=True)
    for (k, a), b in zip(enc.model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(TextEncoder(text_dir)(["a photo of a red circle"])["pooled"], out["pooled"][:1])


def test_adapter_uses_the_sd3_conventions(text_dir):
    """timestep = 1000 sigma reaches the transformer; decode maps [-1, 1] to [0, 1]; unknown words are named."""
    model = new_transformer(TINY, 16, seed=0).eval()
    adapter = ShapesAdapter(model, TextEncoder(text_dir))
    seen = {}
    model.register_forward_pre_hook(lambda m, a, kw: seen.update(t=kw["timestep"]), with_kwargs=True)
    x = torch.randn(2, 3, 32, 32)
    v = adapter.velocity(x, torch.tensor([0.25, 0.5]), adapter.encode(["a photo of a circle"] * 2))
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.equal(seen["t"], torch.tensor([250.0, 500.0]))
    assert torch.equal(adapter.decode(torch.tensor([-1.0, 0.0, 1.0, 3.0])), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    with pytest.raises(VocabularyError, match="'hexagon'"):
        adapter.encode(["a photo of a hexagon"])
    # One joint block, the last one (context_pre_only): q k v out and the context's q k v (no to_add_out).
    assert len(adapter.lora_target_modules(model)) == 7


def test_euler_sampler_integrates_a_known_velocity():
    """With v = eps - x0 for a fixed x0 (the exact velocity of a point mass), Euler lands on x0 exactly."""
    x0 = torch.full((1, 3, 4, 4), 0.3)

    def velocity(x, sigma, cond):
        s = sigma.view(-1, 1, 1, 1)
        eps = (x - (1 - s) * x0) / s
        return eps - x0

    cond = {"pooled": torch.zeros(1, 1)}
    out = euler_sample(velocity, cond, None, 1.0, (3, 4, 4), 5, torch.Generator().manual_seed(0), torch.device("cpu"))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


def test_verifier_reward():
    r = VerifierReward()
    assert isinstance(r, Reward) and r.differentiable is False
    s = parse("a photo of three blue triangles")
    img = R.to_tensor_images(np.stack([R.render(s, 32, 0), R.render(parse("a photo of a circle"), 32, 0)]))
    out = r(img, [s.text, s.text])
    assert out.scores.tolist() == [1.0, 0.0] and out.extras["reasons"] == ["ok", "count"]
    total = RewardSet([r]).__call__(img, [s.text] * 2)
    assert total.differentiable_total is None


def test_partial_verifier_reward_through_the_config_names():
    """'verifier_partial' builds the graded reward: 1 on a pass, the fraction of checks met otherwise (one
    circle for "three blue triangles": count 1 - 2/3, no triangle, no blue one: 1/9)."""
    from tiltflow.config.shapes import ShapesRewardChoice

    rs = build_rewards([ShapesRewardChoice("verifier_partial", 1.0), ShapesRewardChoice("verifier", 0.5)], "unused",
                       "cpu")
    assert [type(r) for r in rs.rewards] == [PartialVerifierReward, VerifierReward]
    assert rs.rewards[0].differentiable is False
    s = parse("a photo of three blue triangles")
    img = R.to_tensor_images(np.stack([R.render(s, 32, 0), R.render(parse("a photo of a circle"), 32, 0)]))
    torch.testing.assert_close(rs.rewards[0](img, [s.text] * 2).scores, torch.tensor([1.0, 1 / 9]))


def test_clip_reward_is_served_by_clipscore_and_differentiable(tmp_path):
    from tiltflow.worlds.shapes.reward_model import export_clip, load_clip_reward, new_clip

    cfg = ShapesRunConfig(model=TINY)
    tok = build_tokenizer()
    export_clip(new_clip(cfg, tok), tok, 32, tmp_path / "clip")
    reward = load_clip_reward(tmp_path / "clip")
    assert isinstance(reward, ClipSimilarityReward) and reward.differentiable
    images = R.to_tensor_images(np.stack([R.render(parse("a photo of a red circle"), 32, i) for i in range(2)]))
    images.requires_grad_(True)
    out = reward(images, ["a photo of a red circle", "a photo of a blue square"])
    assert out.scores.shape == (2,) and bool((out.scores.abs() <= 100 + 1e-3).all())
    out.scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.slow
def test_contrastive_training_learns_hard_negatives():
    """A tiny CLIP trained for 60 steps on CPU scores held-back renders' captions above their hard
    negatives more often than chance (0.5); untrained it sits near chance."""
    from tiltflow.worlds.shapes.reward_model import contrastive_loss, negative_texts, new_clip
    from tiltflow.worlds.shapes.scene import prompt_sets

    torch.manual_seed(0)
    cfg = ShapesRunConfig(model=ShapesModelSpec(clip_hidden=32, clip_layers=2, clip_heads=2, clip_projection=32))
    tok = build_tokenizer()
    model = new_clip(cfg, tok)
    scenes = [s for s in prompt_sets()["train"] if s.category in ("colors", "counting")]
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def pairwise_accuracy(seed: int) -> float:
        test = [scenes[i] for i in np.random.default_rng(seed).integers(len(scenes), size=64)]
        x = R.to_tensor_images(np.stack([R.render(s, 32, 10_000 + i) for i, s in enumerate(test)])) * 2 - 1
        negs = [hard_negatives(s)["colour" if s.groups[0].colour else "count"][0].text for s in test]
        with torch.no_grad():
            img = F.normalize(model.visual_projection(model.vision_model(pixel_values=x).pooler_output), dim=-1)

            def emb(texts: list[str]) -> torch.Tensor:
                t = tok(texts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
                return F.normalize(model.text_projection(model.text_model(**t).pooler_output), dim=-1)

            return float(((img * emb([s.text for s in test])).sum(-1) > (img * emb(negs)).sum(-1)).float().mean())

    before = pairwise_accuracy(1)
    for step in range(60):
        idx = rng.integers(len(scenes), size=32)
        batch = [scenes[int(i)] for i in idx]
        x = R.to_tensor_images(np.stack([R.render(s, 32, step * 100 + j) for j, s in enumerate(batch)])) * 2 - 1
        loss = contrastive_loss(model, x, [s.text for s in batch], negative_texts(batch, 2, rng), tok)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = pairwise_accuracy(1)
    print(f"pairwise accuracy against hard negatives: {before:.3f} untrained, {after:.3f} after 60 steps")
    assert after > 0.75 and after > before + 0.15
