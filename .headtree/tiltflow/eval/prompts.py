"""Prompt sets for evaluation: plain text (one prompt a line) or GenEval-style metadata JSONL.

Text files: blank lines and lines starting with "#" are skipped; the rest, stripped, are prompts.
JSONL files (.jsonl / .json): one JSON object a line with at least a non-empty string "prompt"; every other
key (GenEval's "tag", "include", "exclude", ...) is kept as the prompt's metadata. Blank lines are skipped.
Anything malformed raises PromptFileError naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiltflow.rewards.preprocess import Prompt

__all__ = ["Prompt", "PromptFileError", "load_prompts"]


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and the line."""


def load_prompts(path: str | Path, *, format: str = "auto") -> list[Prompt]:  # noqa: A002 - CLI vocabulary
    """All prompts of a file, in order. format: "auto" (by extension), "text" or "jsonl"."""
    path = Path(path)
    if format not in ("auto", "text", "jsonl"):
        raise ValueError(f"prompt format must be 'auto', 'text' or 'jsonl', got {format!r}")
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    if format == "auto":
        format = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"
    prompts: list[Prompt] = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise PromptFileError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
            if "\x00" in line:  # valid UTF-8 but not text: a binary file given by mistake
                raise PromptFileError(f"{path}:{lineno}: holds a NUL byte; is this a binary file?")
            if not line or (format == "text" and line.startswith("#")):
                continue
            prompts.append(_parse_jsonl_line(line, path, lineno) if format == "jsonl" else Prompt(line))
    if not prompts:
        raise PromptFileError(f"prompt file {path} holds no prompts")
    return prompts


def _parse_jsonl_line(line: str, path: Path, lineno: int) -> Prompt:
    try:
        record = json.loads(line)
    except ValueError as err:
        raise PromptFileError(
            f'{path}:{lineno}: not valid JSON ({err}); expected an object like {{"prompt": "...", "tag": "..."}}'
        ) from err
    if not isinstance(record, dict):
        raise PromptFileError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    text = record.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise PromptFileError(f"{path}:{lineno}: the object needs a non-empty string 'prompt', got {text!r}")
    return Prompt(text.strip(), {k: v for k, v in record.items() if k != "prompt"})
