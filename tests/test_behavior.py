"""benchmark/behavior.py: the SAC behaviour-policy trainer keeps seeded, loadable snapshots with their returns."""

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from benchmark import behavior
from utils import UserError


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
        actor = behavior.load_actor(snapshot)
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
    actor = behavior.Actor(3, 2, 8, low, high)
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
