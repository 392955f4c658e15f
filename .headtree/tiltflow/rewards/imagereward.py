"""ImageReward (Xu et al. 2023), an evaluation reward, through the optional `image-reward` package.

That package is imported lazily: it needs BLIP code, timm and torchvision (a large CUDA torch), so it is an
optional extra, or better, run it behind the remote reward server in its own environment. Scores are not
differentiable here (the package scores PIL images).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltflow.rewards.base import RewardOutput
from tiltflow.rewards.preprocess import check_images, prompt_texts

DEFAULT_MODEL = "ImageReward-v1.0"
INSTALL_HINT = ("ImageReward needs the optional package `image-reward` (pip install image-reward; it brings "
                "timm and torchvision), or serve it with tiltflow-reward-server in another environment and "
                "use the 'remote' reward")


def to_pil(images: Tensor) -> list[Any]:
    """(B, 3, H, W) in [0, 1] -> PIL RGB images, rounded to uint8 as a saved PNG would be."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arrays]


class ImageRewardScorer:
    """ImageReward score per (image, prompt); not differentiable."""

    differentiable = False

    def __init__(self, model: Any, *, name: str = "imagereward"):
        self.model, self.name = model, name

    def __call__(self, samples: Tensor, prompts: Sequence[Any]) -> RewardOutput:
        check_images(samples)
        texts = prompt_texts(prompts, samples.shape[0])
        with torch.no_grad():
            scores = [float(self.model.score(text, image)) for text, image in zip(texts, to_pil(samples))]
        return RewardOutput(scores=torch.tensor(scores, dtype=torch.float32, device=samples.device))


def build_imagereward(model: str = DEFAULT_MODEL, *, device: str = "cpu", download_root: str | None = None,
                      med_config: str | None = None, name: str = "imagereward") -> ImageRewardScorer:
    """model: "ImageReward-v1.0" (fetched from THUDM/ImageReward by the package) or a local checkpoint path."""
    try:
        import ImageReward  # noqa: N813 - the package's own name
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    loaded = ImageReward.load(model, device=device, download_root=download_root, med_config=med_config)
    loaded.eval().requires_grad_(False)
    return ImageRewardScorer(loaded, name=name)
