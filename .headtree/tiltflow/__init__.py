"""tiltflow: few-step, reward-aligned text-to-image flow generators (RTDMD, arXiv 2605.26108)."""

__version__ = "0.1.0"
