"""Model resolution (local folders, hub cache, fail-fast offline), safe weight loading, the registry."""

from __future__ import annotations

import pickle
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from tiltflow.rewards import loading
from tiltflow.rewards.loading import (
    CONFIG,
    WEIGHTS,
    ModelFilesNotFound,
    load_state_dict,
    resolve_file,
    resolve_model_dir,
)
from tiltflow.rewards.registry import KNOWN_REWARDS, build_reward, build_reward_set, parse_reward_spec


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_local_folder_missing_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFilesNotFound, match=r"lacks model\.safetensors \(or .*pytorch_model\.bin\)"):
        resolve_model_dir(tmp_path, [CONFIG, WEIGHTS], what="CLIPScore model")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert resolve_model_dir(tmp_path, [CONFIG, WEIGHTS], what="x") == tmp_path


def test_offline_missing_hub_model_fails_fast(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelFilesNotFound) as err:
        resolve_model_dir("openai/clip-vit-large-patch14", [CONFIG, WEIGHTS], what="CLIPScore model")
    assert time.monotonic() - start < 2.0
    message = str(err.value)
    assert "openai/clip-vit-large-patch14" in message and "HF_HUB_OFFLINE=1" in message
    assert "config.json" in message and "model.safetensors" in message


def test_unreachable_hub_fails_fast_without_offline_flag(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a loopback port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ModelFilesNotFound, match="hub is unreachable"):
        resolve_file("xswu/HPSv2", hub_filename="HPS_v2.1_compressed.pt", what="HPSv2 checkpoint")
    assert time.monotonic() - start < 2.0


def test_cached_hub_snapshot_is_found_offline(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = empty_hub_cache / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_text("{}")
    assert resolve_model_dir("org/tiny", [CONFIG, WEIGHTS], what="x") == snapshot


def test_not_a_folder_nor_hub_id(tmp_path):
    with pytest.raises(ModelFilesNotFound, match="neither a folder nor a hub id"):
        resolve_model_dir(str(tmp_path / "nope" / "deeper" / "x"), [CONFIG], what="x")


def test_load_state_dict_formats(tmp_path):
    tensors = {"a": torch.ones(2), "b": torch.zeros(1, 3)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = load_state_dict(tmp_path / name)
        assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], tensors["a"])
    with pytest.raises(ValueError, match="expected .safetensors"):
        load_state_dict(tmp_path / "w.npz")


class NotATensor:
    pass


def test_load_state_dict_refuses_arbitrary_pickles(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"a": NotATensor()}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError):  # weights_only=True refuses to build the object
        load_state_dict(tmp_path / "evil.pt")


def test_registry_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_reward("clipscore")
    assert all(name in str(err.value) for name in KNOWN_REWARDS)
    assert set(KNOWN_REWARDS) == {"clip_score", "pickscore", "aesthetic", "hpsv2", "imagereward", "remote"}


def test_registry_unknown_argument_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown arguments \['colour'\]; accepted: \['url', 'name'"):
        build_reward("remote", url="http://127.0.0.1:1", colour="red")


def test_reward_specs():
    spec = parse_reward_spec('pickscore={"weight": 0.5, "model": "/m"}')
    assert (spec.name, spec.weight, spec.kwargs) == ("pickscore", 0.5, {"model": "/m"})
    assert parse_reward_spec("clip_score").kwargs == {}
    with pytest.raises(ValueError, match="JSON object"):
        parse_reward_spec("clip_score={oops}")
    with pytest.raises(ValueError, match="weight must be a number"):
        parse_reward_spec('clip_score={"weight": "high"}')
    reward_set = build_reward_set(
        [
            'remote={"url": "http://127.0.0.1:1", "name": "ocr", "weight": 2}',
            {"reward": "remote", "url": "http://127.0.0.1:2"},
        ],
        defaults={"device": "cpu"},
    )  # remote takes no device: not passed
    assert reward_set.names == ["ocr", "remote"] and reward_set.weights == [2.0, 1.0]


def test_probe_is_bounded(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused or filtered
    start = time.monotonic()
    assert loading._hub_reachable() is False
    assert time.monotonic() - start < 2.0
