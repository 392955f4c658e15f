"""The generic training loop: checkpoint/resume, metrics.jsonl, progress bar, finite-loss guard."""
