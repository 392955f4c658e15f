"""The shapes world's text side (WORLDS.md 2): a word-level tokenizer over the caption vocabulary, built with
`tokenizers`, and a small transformers CLIP text model; both saved and loaded as a normal Hugging Face
folder (tokenizer.json + config.json + model.safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiltflow.worlds.shapes.scene import vocabulary

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
MAX_TOKENS = 16  # the longest caption ("a photo of a purple triangle and a cyan circle") is 10 words + 2


def build_tokenizer() -> Any:
    """A PreTrainedTokenizerFast (tiltflow.models.arch.word_tokenizer): whitespace words, [BOS] caption [EOS],
    padded with [PAD]."""
    from tiltflow.models.arch import word_tokenizer

    return word_tokenizer(MAX_TOKENS, words=vocabulary(), specials=SPECIALS, template="[BOS] $A [EOS]")


def text_config(tokenizer: Any, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                projection_dim: int = 64) -> Any:
    """A CLIPTextConfig for the word vocabulary; the pooled output is the [EOS] token's state."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads,
                          max_position_embeddings=MAX_TOKENS, projection_dim=projection_dim,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)


def build_text_encoder(folder: str | Path, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 2) -> Path:
    """Write a freshly initialised (seeded) text encoder and its tokenizer into `folder`."""
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = CLIPTextModel(text_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers,
                                      num_heads=num_heads)).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


class TextEncoder:
    """Captions -> {"prompt_embeds": (B, MAX_TOKENS, D) hidden states, "pooled": (B, D) [EOS] state}, frozen."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPTextModel

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file() or not (self.folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"text encoder folder {str(self.folder)!r} lacks config.json or tokenizer.json; "
                                    "build one with tiltflow.worlds.shapes.text.build_text_encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(str(self.folder), local_files_only=True, use_safetensors=True)
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt")
        out = self.model(input_ids=tokens["input_ids"].to(self.device),
                         attention_mask=tokens["attention_mask"].to(self.device))
        return {"prompt_embeds": out.last_hidden_state.float(), "pooled": out.pooler_output.float()}
