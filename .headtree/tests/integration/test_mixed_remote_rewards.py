"""Issue C acceptance: stage 2 runs with a RewardSet mixing a differentiable reward (local) and a
non-differentiable one served by the reference reward server over loopback. The non-differentiable reward
reaches the generator through the policy gradient only."""

import torch

from tiltflow.rewards.base import RewardSet
from tiltflow.rewards.remote import RemoteReward
from tiltflow.rewards.server import serving
from tiltflow.training.spine import train
from tiltflow.worlds.gmm import runs
from tiltflow.worlds.gmm.rewards import HalfspaceReward, LinearReward


def test_stage2_with_local_differentiable_and_remote_indicator_reward(make_cfg, tmp_path, monkeypatch):
    s1 = tmp_path / "s1"
    train(make_cfg("ac_dmd", s1), progress=False)
    with serving(HalfspaceReward([0.0, 1.0], 0.0)) as server:
        url = getattr(server, "url", None) or f"http://127.0.0.1:{server.server_address[1]}"
        remote = RemoteReward(url, name="halfspace", encoding="npy-float32", timeout_s=10, retries=1)
        calls = []

        class Recording(RewardSet):
            def __call__(self, samples, prompts, *, only_differentiable=False):
                out = super().__call__(samples, prompts, only_differentiable=only_differentiable)
                calls.append((only_differentiable, sorted(out.per_reward)))
                return out

        rewards = Recording([LinearReward([1.0, 0.5]), remote], [0.5, 1.0])
        monkeypatch.setattr(runs, "build_rewards", lambda spec: rewards)
        cfg = make_cfg("rtdmd_fullchain", tmp_path / "s2", f"init_from={s1}")
        before = torch.load(s1 / "final.pt", weights_only=True)["generator"]
        train(cfg, progress=False)
    after = torch.load(tmp_path / "s2" / "final.pt", weights_only=True)["generator_raw"]
    assert any(not diff and names == ["halfspace", "linear"] for diff, names in calls)  # PG sees both
    assert any(diff and names == ["linear"] for diff, names in calls)  # BP sees the differentiable one only
    assert any(not torch.equal(before[k], after[k]) for k in before)
