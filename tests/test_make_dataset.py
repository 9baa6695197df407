import sys
import types

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch

from tests.conftest import REPO, error_line, run_cli
from utils import UserError, load_dataset
from utils.make_dataset import collect_dataset, policy_from_checkpoint


def test_cli_creates_a_dataset_that_loads_offline(tmp_path):
    env = {"MINARI_DATASETS_PATH": str(tmp_path), "O2O_OFFLINE": "1"}
    args = ["--env-id", "Hopper-v5", "--dataset-id", "mujoco/hopper/simple-v0", "--steps", "300", "--seed", "3"]
    made = run_cli([str(REPO / "utils/make_dataset.py"), *args], env)  # run as a file, from outside the repo
    assert made.returncode == 0, made.stderr
    assert "wrote mujoco/hopper/simple-v0 (300 steps)" in made.stdout
    loaded = run_cli(["-m", "utils", "hopper-simple"], env, cwd=REPO)
    assert loaded.returncode == 0, loaded.stderr
    assert "Minari mujoco/hopper/simple-v0; env Hopper-v5; 300 transitions" in loaded.stdout
    assert not list(tmp_path.glob(".o2o-staging-*"))

    again = run_cli([str(REPO / "utils/make_dataset.py"), *args], env)
    assert again.returncode != 0
    assert error_line(again.stderr) == (
        f"error: mujoco/hopper/simple-v0 already exists under {tmp_path}; pass --overwrite to replace it"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--env-id", "NoSuchEnv-v0", "--dataset-id", "a/b-v0"], "error: cannot make the Gymnasium env 'NoSuchEnv-v0'"),
        (["--env-id", "Hopper-v5", "--dataset-id", "a/b"], "error: dataset id 'a/b' must look like namespace/name-vN"),
        (["--env-id", "Hopper-v5", "--dataset-id", "a/b-v0", "--steps", "0"], "error: --steps must be at least 1"),
        (["--env-id", "Hopper-v5", "--dataset-id", "a/b-v0", "--noise-std", "0.1"], "error: --noise-std applies to"),
        (["--env-id", "Hopper-v5", "--dataset-id", "a/b-v0", "--checkpoint", "/nonexistent.pt"], "error: cannot use"),
        (["--env-id", "Nope-v0", "--dataset-id", "a/b-v0", "--checkpoint", "/nonexistent.pt"], "error: cannot make"),
        (["--env-id", "Hopper-v5", "--dataset-id", "a/b-v0", "--max-episode-steps", "0"], "error: --max-episode-steps"),
        (["--env-id", "Hopper-v5", "--dataset-id", "a/b-v0", "--ref-min-score", "0"], "error: --ref-min-score is"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    result = run_cli(["-m", "utils.make_dataset", *args], {"MINARI_DATASETS_PATH": str(tmp_path)}, 30, cwd=REPO)
    assert result.returncode != 0
    assert error_line(result.stderr).startswith(message)
    assert "Traceback" not in result.stderr


def test_episodes_are_seeded_and_the_cut_episode_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    collect_dataset("Hopper-v5", "test/hopper/seeded-v0", steps=250, seed=40)
    dataset = minari.load_dataset("test/hopper/seeded-v0")
    env = gym.make("Hopper-v5")
    episodes = list(dataset.iterate_episodes())
    for index, episode in enumerate(episodes):
        np.testing.assert_array_equal(episode.observations[0], env.reset(seed=40 + index)[0])
    assert sum(len(ep.actions) for ep in episodes) == 250
    assert episodes[-1].truncations[-1] and not episodes[-1].terminations[-1]  # cut by the budget: bootstraps
    assert all(ep.terminations[-1] for ep in episodes[:-1])  # random hopper falls long before 1000 steps


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minari, "create_dataset_from_buffers", fail)
    with pytest.raises(KeyboardInterrupt):
        collect_dataset("Hopper-v5", "test/hopper/broken-v0", steps=50)
    assert not (tmp_path / "test/hopper/broken-v0").exists()
    assert not list(tmp_path.glob(".o2o-staging-*"))


@pytest.fixture
def fake_algorithm(monkeypatch):
    """An algorithm module that follows the checkpoint contract: `policy_from_checkpoint(ckpt)`."""
    module = types.ModuleType("algorithms.fake_constant")
    module.policy_from_checkpoint = lambda checkpoint: lambda obs: np.full(3, checkpoint["action"])
    monkeypatch.setitem(sys.modules, "algorithms.fake_constant", module)


def test_checkpoint_actor_with_noise(tmp_path, monkeypatch, fake_algorithm):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    checkpoint = tmp_path / "final.pt"
    torch.save({"algorithm": "fake_constant", "action": 0.5, "obs_dim": 11, "act_dim": 3}, checkpoint)
    env = gym.make("Hopper-v5")

    exact = policy_from_checkpoint(str(checkpoint), 0.0, env, seed=0)
    collect_dataset("Hopper-v5", "test/hopper/actor-v0", steps=200, policy=exact)
    np.testing.assert_array_equal(load_dataset("test/hopper/actor-v0").actions, 0.5)

    noisy = policy_from_checkpoint(str(checkpoint), 0.3, env, seed=0)
    collect_dataset("Hopper-v5", "test/hopper/noisy-v0", steps=2000, policy=noisy)
    actions = load_dataset("test/hopper/noisy-v0").actions
    assert actions.min() >= -1 and actions.max() <= 1  # clipped to the action bounds
    assert (actions == 1).mean() == pytest.approx(0.048, abs=0.015)  # P(N(0.5, 0.3) > 1) = 0.048
    inside = actions[actions < 1]
    assert abs(np.median(inside) - 0.5) < 0.03


def test_bad_checkpoint_contract_is_a_clear_error(tmp_path):
    checkpoint = tmp_path / "old.pt"
    torch.save({"no_algorithm_key": 1}, checkpoint)
    with pytest.raises(UserError, match=r"cannot use checkpoint .*KeyError"):
        policy_from_checkpoint(str(checkpoint), 0.0, gym.make("Hopper-v5"), seed=0)


def test_checkpoint_of_another_env_is_refused_before_collection(tmp_path, fake_algorithm):
    checkpoint = tmp_path / "final.pt"
    torch.save({"algorithm": "fake_constant", "action": 0.5, "obs_dim": 11, "act_dim": 3, "dataset": "x"}, checkpoint)
    with pytest.raises(UserError, match=r"trained on x \(obs dim 11, action dim 3\); Walker2d-v5 has obs dim 17"):
        policy_from_checkpoint(str(checkpoint), 0.0, gym.make("Walker2d-v5"), seed=0)


def test_dict_observations_reach_the_actor_flat_in_the_loader_layout(tmp_path, monkeypatch):
    from tests.test_evaluation import FakeAntMaze

    seen = []
    module = types.ModuleType("algorithms.fake_recorder")
    module.policy_from_checkpoint = lambda checkpoint: lambda obs: seen.append(obs) or np.zeros(8)
    monkeypatch.setitem(sys.modules, "algorithms.fake_recorder", module)
    gym.register("AntMaze_Recorder-v4", entry_point=FakeAntMaze, max_episode_steps=5)
    try:
        env = gym.make("AntMaze_Recorder-v4")
        checkpoint = tmp_path / "final.pt"
        torch.save({"algorithm": "fake_recorder", "obs_dim": 29, "act_dim": 8}, checkpoint)
        policy = policy_from_checkpoint(str(checkpoint), 0.0, env, seed=0)
        observation, _ = env.reset(seed=0)
        policy(observation)
    finally:
        del gym.registry["AntMaze_Recorder-v4"]
    np.testing.assert_array_equal(seen[0], np.concatenate([observation["achieved_goal"], observation["observation"]]))
