"""How much memory a VAE decode with gradient keeps for its backward, per image (the reward back-propagation
term's decode; why stage2.bp_chunk exists). Counts the distinct storages autograd saves during one decode of a
random latent, on the CPU, with the architecture's full-size decoder and random weights.

    python benchmarks/vae_grad_activations.py flux2_klein_4b sd35_medium

Measured at 256 px in fp32 (fast on a CPU) and reported for 512 px in bf16: the saved activations scale with the
pixel count (x4) and the element size (x1/2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def saved_bytes_per_image(arch_name: str, latent_size: int = 32) -> int:
    from tiltflow.models.arch import random_module

    arch = json.loads((Path(__file__).resolve().parents[1] / "tiltflow" / "models" / "arch" /
                       f"{arch_name}.json").read_text())
    vae = random_module(arch["components"]["vae"], seed=0, device=torch.device("cpu"), dtype=torch.float32)
    z = torch.randn(1, vae.config.latent_channels, latent_size, latent_size, requires_grad=True)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vae.decode(z)
    return sum(storages.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archs", nargs="+", help="architecture names of tiltflow/models/arch (with a 'vae' component)")
    args = p.parse_args(argv)
    for name in args.archs:
        b = saved_bytes_per_image(name)  # fp32, 256 px (latent 32)
        print(f"{name}: {b / 2**30:.3f} GiB at 256 px fp32 -> {b * 4 / 2 / 2**30:.2f} GiB per 512-px image in bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
