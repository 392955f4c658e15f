"""open_clip -> transformers key mapping against a REAL open_clip model (tests/fixtures/hpsv2, see
make_fixture.py there: open_clip 3.3.0, torch 2.14.1 CPU, seed 0), and the HPSv2 scorer built on it.

Tolerance for the embeddings: 1e-5 absolute on values of order 1. Both sides run the same float32 math
in a different operation order (fused vs split q/k/v projections, batched MHA vs explicit attention), so
they agree to float32 rounding (~1e-7 relative) accumulated over a few layers; any mapping error
(a transposed projection, swapped q/k, a missing layer norm) moves them by O(0.1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_rewards import write_tiny_clip_tokenizer

from tiltflow.rewards.hpsv2 import build_hpsv2, openclip_preprocess
from tiltflow.rewards.openclip_mapping import (
    clip_model_from_openclip,
    hf_config_from_openclip,
    openclip_to_hf_state_dict,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hpsv2"



@pytest.fixture(scope="module")
def fixture():
    meta = json.loads((FIXTURE / "fixture.json").read_text())
    state = load_file(str(FIXTURE / "openclip_state_dict.safetensors"))
    return meta, state, load_file(str(FIXTURE / "io.safetensors"))


def test_fixture_is_small():
    assert sum(p.stat().st_size for p in FIXTURE.iterdir()) < 2 * 2**20


def test_mapping_reproduces_open_clip_embeddings(fixture):
    meta, state, io = fixture
    vocab = meta["model_cfg"]["text_cfg"]["vocab_size"]
    config = hf_config_from_openclip(meta["model_cfg"], tokenizer_ids={"eos_token_id": vocab - 1})
    model = clip_model_from_openclip(state, config).eval()
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=io["pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(input_ids=io["input_ids"]).pooler_output)
    torch.testing.assert_close(image, io["image_embeds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(text, io["text_embeds"], atol=1e-5, rtol=0)
    assert all(not b.is_meta for b in model.buffers()) and all(not p.is_meta for p in model.parameters())


def test_mapping_refuses_unknown_keys_and_options(fixture):
    meta, state, _ = fixture
    with pytest.raises(ValueError, match="does not know"):
        openclip_to_hf_state_dict({**state, "visual.attn_pool.query": torch.zeros(1)})
    with pytest.raises(ValueError, match="ls_init_value"):
        hf_config_from_openclip(
            {**meta["model_cfg"], "vision_cfg": {**meta["model_cfg"]["vision_cfg"], "ls_init_value": 1e-5}}
        )
    with pytest.raises(RuntimeError, match="Missing key"):
        partial = {k: v for k, v in state.items() if k != "ln_final.weight"}
        clip_model_from_openclip(partial, hf_config_from_openclip(meta["model_cfg"]))


@pytest.fixture(scope="module")
def hps_files(fixture, tmp_path_factory):
    meta, state, _ = fixture
    root = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "HPS_v2.1_compressed.pt")
    save_file(state, str(root / "hps.safetensors"))
    (root / "cfg.json").write_text(json.dumps(meta["model_cfg"]))
    write_tiny_clip_tokenizer(root / "tokenizer")  # 514 ids < the fixture's 600
    return root


@pytest.mark.parametrize("checkpoint", ["HPS_v2.1_compressed.pt", "hps.safetensors", "."])
def test_build_hpsv2_end_to_end(fixture, hps_files, checkpoint):
    meta, _, io = fixture
    reward = build_hpsv2(
        hps_files / checkpoint, tokenizer=hps_files / "tokenizer", openclip_config=hps_files / "cfg.json"
    )
    assert reward.name == "hpsv2" and reward.differentiable and reward.scale == 1.0
    assert reward.encoder.preprocess == openclip_preprocess(32)
    image = (io["image_uint8"].permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    out = reward(image, ["a photo of a cat"])
    assert -1.0 <= out.scores.item() <= 1.0  # a cosine
    out.scores.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    # The whole image path against open_clip. Not a precision check (the two exact checks above are):
    # the only difference left is preprocessing (<= 1.2/255 per pixel).
    expected = torch.nn.functional.normalize(io["image_embeds"], dim=-1)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(reward.encoder.image_embeds(image), expected).item() > 0.999
