"""A run directory with a checkpoint resumes only under the structure it was written with (worlds/base.py).

Before, a resume with another lora.finetune only warned that the config changed and then failed inside the
checkpoint load with a bare KeyError; now the change is refused by name before anything is written."""

from pathlib import Path

import pytest

from tiltflow.config.loader import ConfigError
from tiltflow.worlds.base import prepare_run_dir
from tiltflow.worlds.registry import load_run_config

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "shapes" / "rtdmd.yaml"


def shapes_cfg(run_dir: Path, *overrides: str):
    return load_run_config(CONFIG, [f"run_dir={run_dir}", "device=cpu", "init_from=runs/x", *overrides])


@pytest.mark.parametrize("change", ["lora.finetune=full", "lora.layout=separate", "lora.rank=8", "lora.alpha=32",
                                    "stage=bp_only", "init_from=runs/y"])
def test_a_structural_change_is_refused_by_name_and_the_config_is_kept(tmp_path, change):
    extra = ("lora.layout=separate",) if change == "lora.finetune=full" else ()
    prepare_run_dir(shapes_cfg(tmp_path, *extra))
    (tmp_path / "checkpoint.pt").write_bytes(b"written by an earlier call")
    before = (tmp_path / "config.yaml").read_text()
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}'.*holds a checkpoint written with {key}="):
        prepare_run_dir(shapes_cfg(tmp_path, *extra, change))
    assert (tmp_path / "config.yaml").read_text() == before


def test_other_changes_still_resume_with_a_warning(tmp_path, capsys):
    prepare_run_dir(shapes_cfg(tmp_path))
    (tmp_path / "checkpoint.pt").write_bytes(b"written by an earlier call")
    prepare_run_dir(shapes_cfg(tmp_path, "stage2.num_iters=7", f"init_from={Path('runs/x').resolve()}"))
    err = capsys.readouterr().err
    assert "holds another config; replacing it" in err and "stage2.num_iters: 400 -> 7" in err
    assert "num_iters: 7" in (tmp_path / "config.yaml").read_text()


def test_without_a_checkpoint_the_directory_takes_any_config(tmp_path):
    prepare_run_dir(shapes_cfg(tmp_path))
    prepare_run_dir(shapes_cfg(tmp_path, "lora.rank=8"))
    assert "rank: 8" in (tmp_path / "config.yaml").read_text()


def test_a_distributed_checkpoint_folder_counts_too(tmp_path):
    prepare_run_dir(shapes_cfg(tmp_path))
    (tmp_path / "checkpoint-dcp").mkdir()
    with pytest.raises(ConfigError, match="lora.rank"):
        prepare_run_dir(shapes_cfg(tmp_path, "lora.rank=8"))
