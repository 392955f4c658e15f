"""Imports flow one way (STYLE.md): flow <- sampling <- losses <- algorithms <- training <- cli; models and
rewards depend only on flow and third-party code; no world imports the algorithms or the training loop;
no module imports a private name from another module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "tiltflow"

# What each top-level part of tiltflow may import from the others (itself always allowed).
BASE = {"flow", "config", "storage", "distributed"}
ALLOWED = {
    "flow": set(),
    "config": set(),
    "storage": set(),
    "distributed": set(),
    "sampling": {"flow"},
    "losses": {"flow", "sampling"},
    "models": {"flow"},
    "rewards": {"flow"},
    "eval": {"flow", "rewards", "config"},
    "algorithms": BASE | {"sampling", "losses", "models", "rewards"},
    "worlds": BASE | {"sampling", "losses", "models", "rewards", "eval"},
    "training": BASE | {"sampling", "losses", "models", "rewards", "algorithms", "worlds"},
    "demo": BASE | {"sampling", "losses", "models", "rewards", "eval", "algorithms", "worlds", "training"},
    "bench": BASE | {"sampling", "losses", "models", "rewards", "eval", "algorithms", "worlds", "training"},
    "cli": BASE | {"sampling", "losses", "models", "rewards", "eval", "algorithms", "worlds", "training", "demo",
                   "bench"},
}


def _imports(path: Path):
    """(imported module, [names]) of every absolute tiltflow import in a file, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tiltflow"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tiltflow"):
            yield node.module, [a.name for a in node.names]


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_imports_follow_the_intended_direction():
    wrong = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        src = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if src == "__init__":
            continue
        assert src in ALLOWED, f"{rel}: part {src!r} has no place in the import rules; add it to ALLOWED"
        for module, _ in _imports(path):
            dst = _part(module)
            if dst is not None and dst != src and dst not in ALLOWED[src]:
                wrong.append(f"{rel} imports {module} ({src} -> {dst})")
    assert not wrong, "imports against the intended direction:\n" + "\n".join(wrong)


def test_no_private_name_is_imported_across_modules():
    wrong = []
    for path in ROOT.rglob("*.py"):
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}: from {module} import {', '.join(private)}")
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_a_wrong_import(tmp_path, monkeypatch):
    """The walker sees nested imports: a world module importing the training loop inside a function fails."""
    bad = tmp_path / "tiltflow" / "worlds" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from tiltflow.training.loop import run_loop\n    from tiltflow.flow import _x\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path / "tiltflow")
    for test in (test_imports_follow_the_intended_direction, test_no_private_name_is_imported_across_modules):
        try:
            test()
        except AssertionError as err:
            assert "bad.py" in str(err)
        else:
            raise AssertionError(f"{test.__name__} did not catch the wrong import")
