"""Worlds tiltflow runs in (WORLDS.md): `gmm` (analytic, exact targets) and `shapes` (mini text-to-image)."""
