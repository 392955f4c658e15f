"""Safe loading (issue 11, item 6): weights load only through safetensors or torch.load(weights_only=True),
and remote code never runs. A pickled payload put where a checkpoint, a stage-1 result or a teacher is
expected is refused with one line (exit code 2) and never executed."""

from __future__ import annotations

import ast
import pathlib
from pathlib import Path

import pytest
import torch

import tiltflow
from tiltflow.cli import main


class Payload:
    """Unpickling this with a full pickle load creates `marker`: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "model": {"w": torch.zeros(2)}, "algo": Payload(marker)}, path)


@pytest.mark.parametrize("where", ["checkpoint", "init_from", "teacher"])
def test_pickled_payload_is_refused_and_never_runs(where, tiny_yaml, teacher_run, reference, capsys, tmp_path):
    marker = tmp_path / "code_ran"
    run_dir, stage1, teacher = tmp_path / "run", reference["ac_dmd"], teacher_run
    if where == "checkpoint":
        planted = run_dir / "checkpoint.pt"
    elif where == "init_from":
        stage1 = tmp_path / "stage1"
        planted = stage1 / "final.pt"
    else:
        teacher = tmp_path / "teacher"
        planted = teacher / "teacher.pt"
    plant(planted, marker)
    code = main(["train", "--config", str(tiny_yaml), "stage=rtdmd", f"run_dir={run_dir}",
                 f"teacher_run={teacher}", f"init_from={stage1}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"refusing to load {str(planted)!r}" in lines[0] and "weights-only" in lines[0]
    assert not marker.exists()


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == name]


def test_every_torch_load_is_weights_only_and_no_remote_code():
    """A source scan of the package: torch.load always with weights_only=True, trust_remote_code never true."""
    root = Path(tiltflow.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for call in calls(tree, "load"):
            if getattr(call.func.value, "id", None) != "torch":
                continue
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                offenders.append(f"{path.relative_to(root)}:{call.lineno}: torch.load without weights_only=True")
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    offenders.append(f"{path.relative_to(root)}:{node.value.lineno}: trust_remote_code not False")
    assert not offenders, offenders
