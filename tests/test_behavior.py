"""benchmark/behavior.py: the SAC behaviour-policy trainer keeps seeded, loadable snapshots with their returns."""

import json
import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch

import utils.data as data_module
from benchmark import behavior
from utils import UserError, load_dataset
from utils.make_dataset import BehaviorActor, collect_behavior_dataset, load_behavior_actor


def tiny(tmp_path, **overrides) -> behavior.Args:
    sizes = {"total_steps": 300, "learning_starts": 100, "snapshot_freq": 100, "eval_episodes": 1}
    return behavior.Args(out=str(tmp_path), hidden_dim=8, batch_size=16, **sizes | overrides)


def test_snapshots_are_kept_with_their_evaluation_and_reload_exactly(tmp_path):
    snapshots = behavior.train(tiny(tmp_path))
    assert [entry["step"] for entry in snapshots] == [100, 200, 300]
    assert json.loads((tmp_path / "snapshots.json").read_text()) == snapshots
    env = gym.make("Hopper-v5")
    for entry in snapshots:
        snapshot = torch.load(tmp_path / entry["path"], weights_only=False)
        actor = load_behavior_actor(snapshot)
        assert all(value.dtype == torch.float16 for value in snapshot["actor"].values())  # small enough to commit
        assert behavior.evaluate(actor, env, 1, 10_000) == pytest.approx(entry["eval_return"], rel=1e-6)
    first, last = (torch.load(tmp_path / e["path"], weights_only=False)["actor"] for e in (snapshots[0], snapshots[-1]))
    assert any(not torch.equal(first[key], last[key]) for key in first)  # the updates reached the actor


def test_training_is_seeded(tmp_path):
    runs = [behavior.train(tiny(tmp_path / name, total_steps=200, seed=seed)) for name, seed in (("a", 3), ("b", 3))]
    assert runs[0] == runs[1]
    other = behavior.train(tiny(tmp_path / "c", total_steps=200, seed=4))
    assert other[-1]["eval_return"] != runs[0][-1]["eval_return"]


def test_log_prob_of_the_tanh_gaussian_matches_a_change_of_variables():
    torch.manual_seed(0)
    low, high = np.array([-2.0, 0.0]), np.array([2.0, 1.0])  # rescaled bounds: the Jacobian of the scale counts
    actor = BehaviorActor(3, 2, 8, low, high)
    obs = torch.randn(5, 3)
    action, log_prob = actor(obs)
    mu, log_std = actor.net(obs).chunk(2, -1)
    std = log_std.clamp(-5, 2).exp()
    pre_tanh = torch.atanh((action - actor.center) / actor.scale).double()
    normal = torch.distributions.Normal(mu.double(), std.double())
    expected = normal.log_prob(pre_tanh).sum(-1) - torch.log(
        actor.scale.double() * (1 - torch.tanh(pre_tanh) ** 2)
    ).sum(-1)
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"total_steps": 0}, "--total-steps must be >= 1"),
        ({"learning_starts": 300}, "--learning-starts must be in"),
        ({"env_id": "NoSuchEnv-v0"}, "cannot make the Gymnasium env 'NoSuchEnv-v0'"),
        ({"env_id": "CartPole-v1"}, "needs flat Box observations and actions"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        behavior.train(tiny(tmp_path, **overrides))


@pytest.fixture(scope="module")
def behavior_dir(tmp_path_factory):
    """A trained tiny behaviour run whose three snapshots act as distinct constants: tanh(-1), tanh(0.5), tanh(1.5).

    Their recorded scores make the second one (step 200) the medium policy.
    """
    out = tmp_path_factory.mktemp("behavior")
    snapshots = behavior.train(tiny(out))
    for entry, center, score in zip(snapshots, (-1.0, 0.5, 1.5), (5.0, 40.0, 50.0), strict=True):
        snapshot = torch.load(out / entry["path"], weights_only=False)
        last_weight, last_bias = (key for key in snapshot["actor"] if key.startswith("4."))
        snapshot["actor"][last_weight].zero_()
        snapshot["actor"][last_bias].copy_(torch.tensor([center] * 3 + [-10.0] * 3))  # sigma at its floor e^-5
        torch.save(snapshot, out / entry["path"])
        entry["normalized_score"] = score
    (out / "snapshots.json").write_text(json.dumps(snapshots))
    return out


def test_medium_is_the_first_snapshot_at_a_third_of_expert(behavior_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(data_module, "BEHAVIOR_ROOT", behavior_dir.parent)
    monkeypatch.setattr(data_module, "task_of_env_id", lambda env_id: behavior_dir.name)  # hopper -> the tiny run
    data = load_dataset("hopper-sac-medium", random_steps=120)
    assert len(data) == 120 and data.minari_ids == ("o2o-local/hopper/sac-medium-v0",)
    np.testing.assert_allclose(data.actions, np.tanh(0.5), atol=0.02)  # stochastic, sigma e^-5


def test_medium_replay_replays_the_run_up_to_medium(behavior_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    collect_behavior_dataset("Hopper-v5", "test/hopper/replay-v0", "medium-replay", 999, behavior_dir)
    actions = load_dataset("test/hopper/replay-v0").actions
    assert len(actions) == 200  # the training steps up to the medium snapshot, whatever the budget asked
    assert np.abs(actions[:100]).max() > 0.9 and actions[:100].std() > 0.4  # learning_starts: uniform random
    np.testing.assert_allclose(actions[100:], np.tanh(-1.0), atol=0.02)  # the snapshot taken before each step


def test_without_a_medium_snapshot_the_error_says_what_to_do(behavior_dir, tmp_path):
    low = tmp_path / "low"
    shutil.copytree(behavior_dir, low)
    entries = json.loads((low / "snapshots.json").read_text())
    (low / "snapshots.json").write_text(json.dumps([entry | {"normalized_score": 10.0} for entry in entries]))
    with pytest.raises(UserError, match=r"no snapshot in .* reaches a third of the expert return \(best 10.0"):
        collect_behavior_dataset("Hopper-v5", "test/hopper/none-v0", "medium", 10, low)
    with pytest.raises(UserError, match=r"no behaviour policy in .*nowhere.* train one with"):
        collect_behavior_dataset("Hopper-v5", "test/hopper/none-v0", "medium", 10, tmp_path / "nowhere")


def test_deterministic_actions_draw_nothing_from_the_random_stream():
    actor = BehaviorActor(3, 2, 8, np.array([-1.0, -1.0]), np.array([1.0, 1.0]))
    obs = torch.randn(4, 3)
    state = torch.get_rng_state()
    actor(obs, deterministic=True)
    assert torch.equal(torch.get_rng_state(), state)
