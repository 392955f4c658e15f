"""The distributed tests reuse the integration tests' tiny 2-D gmm problem and its trained teacher."""

from integration.conftest import TINY, make_cfg, teacher_run, tiny_yaml  # noqa: F401  (fixtures)
