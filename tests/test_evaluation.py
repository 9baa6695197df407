import importlib.util
import itertools

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec

from utils import UserError, discounted_returns, evaluate, kendall_tau, make_env, normalized_score
from utils.evaluation import exact_return_mask, q_diagnostics, window_labels


class ChainEnv(gym.Env):
    """Reward 1 per step; a positive action makes the episode terminate after 5 steps, else it runs on."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([self.np_random.uniform(0, 0.01)]), {}

    def step(self, action):
        self.t += 1
        return np.array([float(self.t)]), 1.0, bool(action[0] > 0 and self.t >= 5), False, {}


class FakeAntMaze(gym.Env):
    """Dict observations like Minari's AntMaze; reward 1 from step 3 on if the action is positive, never ends."""

    observation_space = gym.spaces.Dict(
        {
            "achieved_goal": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
            "desired_goal": gym.spaces.Box(-np.inf, np.inf, (2,), np.float64),
            "observation": gym.spaces.Box(-np.inf, np.inf, (27,), np.float64),
        }
    )
    action_space = gym.spaces.Box(-1.0, 1.0, (8,), np.float32)

    def _obs(self):
        return {
            "achieved_goal": np.full(2, float(self.t)),
            "desired_goal": np.full(2, 9.0),
            "observation": np.arange(27.0),
        }

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), float(action[0] > 0 and self.t >= 3), False, False, {}


@pytest.fixture
def registered():
    """Register test envs under ids whose names select utils' task rules; remove them afterwards."""
    made = []

    def register(env_id, entry_point, max_episode_steps):
        if env_id in gym.registry:
            pytest.skip(f"{env_id} is registered by an installed package")
        gym.register(env_id, entry_point=f"tests.test_evaluation:{entry_point}", max_episode_steps=max_episode_steps)
        made.append(env_id)
        return gym.spec(env_id).to_json()

    yield register
    for env_id in made:
        del gym.registry[env_id]


def test_discounted_returns_by_hand():
    np.testing.assert_allclose(discounted_returns(np.array([1.0, 2.0, 4.0]), 0.5), [1 + 1 + 1, 2 + 2, 4])


def test_exact_return_mask():
    assert exact_return_mask(4, True, 0.99, 0.01).all()
    # gamma 0.5: the tail weight 0.5^(10-t) is <= 0.01 for 10 - t >= 7, i.e. t <= 3
    np.testing.assert_array_equal(exact_return_mask(10, False, 0.5, 0.01), np.arange(10) <= 3)


def brute_force_tau_b(x, y):
    concordant = discordant = ties_x = ties_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if sx == 0 and sy == 0:
            continue
        if sx == 0:
            ties_x += 1
        elif sy == 0:
            ties_y += 1
        elif sx == sy:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / np.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))


def test_kendall_tau_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 40).astype(float)
        assert kendall_tau(x, y, chunk=7) == pytest.approx(brute_force_tau_b(x, y), abs=1e-12)
    x = rng.normal(size=100)
    assert kendall_tau(x, 3 * x + 1) == pytest.approx(1.0)
    assert kendall_tau(x, -x) == pytest.approx(-1.0)


def test_q_diagnostics_by_hand():
    true = np.array([10.0, -20.0, 40.0])
    result = q_diagnostics(np.array([11.0, -18.0, 20.0]), true)
    assert result["q_bias"] == pytest.approx((1 + 2 - 20) / (10 + 20 + 40))
    assert result["q_rank_tau"] == pytest.approx(1.0)
    assert result["q_pairs"] == 3


def test_q_bias_is_not_ruled_by_near_zero_returns():
    """A critic 10% high everywhere, plus one pair of a run that fell at once (Q_true 0.001, Q_est 1): the bias
    stays near +10%, where a mean of per-pair ratios would read (100 * 0.1 + 999) / 101 ~ +10."""
    true = np.append(np.full(100, 100.0), 1e-3)
    estimate = np.append(np.full(100, 110.0), 1.0)
    assert q_diagnostics(estimate, true)["q_bias"] == pytest.approx(0.1, abs=1e-3)
    assert np.isnan(q_diagnostics(np.ones(3), np.zeros(3))["q_bias"])  # no scale: undefined, not infinite


def test_evaluate_known_policies(registered):
    spec = registered("Chain-v0", "ChainEnv", max_episode_steps=10)
    env = make_env(spec, seed=0)
    gamma = 0.5
    true_q = lambda obs, act: discounted_returns(np.ones(5), gamma)[np.round(obs[:, 0]).astype(int)]

    forward = evaluate(env, lambda obs: np.ones(1), episodes=3, seed=0, q_function=true_q, gamma=gamma)
    assert forward["episodic_return"] == 5 and forward["return_std"] == 0 and forward["episode_length"] == 5
    assert forward["q_bias"] == pytest.approx(0, abs=1e-2) and forward["q_rank_tau"] == pytest.approx(1.0)
    assert forward["q_pairs"] == 15  # terminated episodes: every pair has an exact return
    assert np.isnan(forward["normalized_score"]) and np.isnan(forward["success_rate"])  # no D4RL refs

    doubled = evaluate(env, lambda obs: np.ones(1), 3, 0, lambda o, a: 2 * true_q(o, a), gamma=gamma)
    assert doubled["q_bias"] == pytest.approx(1.0, abs=2e-2)  # Q_est = 2 Q_true everywhere
    both = evaluate(
        env, lambda obs: np.ones(1), 3, 0, true_q, gamma, extra_q_functions={"x2": lambda o, a: 2 * true_q(o, a)}
    )
    assert both["q_bias"] == forward["q_bias"] and both["q_bias_x2"] == doubled["q_bias"]  # same pairs, own Q
    assert both["q_rank_tau_x2"] == pytest.approx(1.0) and both["q_pairs_x2"] == 15

    backward = evaluate(env, lambda obs: -np.ones(1), 2, 0, lambda o, a: np.zeros(len(o)), gamma=gamma)
    assert backward["episodic_return"] == 10 and backward["episode_length"] == 10
    assert backward["q_pairs"] == 8  # truncated at 10: only t <= 3 has a negligible tail at gamma 0.5
    assert backward["q_bias"] == pytest.approx(-1.0)

    shifted = evaluate(env, lambda obs: np.ones(1), 1, 0, true_q, gamma=gamma, q_reward_fn=lambda r: r - 1)
    assert np.isnan(shifted["q_bias"])  # Q_true is 0 for r - 1 = 0


def test_rank_tau_is_the_mean_over_windows_within_episodes():
    """SO2 paper: K = mean_i tau(P_i) over windows of consecutive pairs of one episode, not one tau over all."""
    np.testing.assert_array_equal(window_labels(100, 10, first=20), np.repeat(np.arange(20, 30), 10))
    np.testing.assert_array_equal(window_labels(5, 10), [0, 0, 0, 1, 1])  # at least two pairs per window
    true = np.array([5.0, 4, 3, 2, 1, 50, 40, 30, 20, 10])
    estimate = np.array([1.0, 2, 3, 4, 5, 5, 4, 3, 2, 1])  # wrong order in window 0, right order in window 1
    windows = np.repeat([0, 1], 5)
    assert q_diagnostics(estimate, true, windows)["q_rank_tau"] == pytest.approx(0.0)  # (-1 + 1) / 2
    assert q_diagnostics(estimate, true)["q_rank_tau"] == pytest.approx(brute_force_tau_b(estimate, true))


def test_evaluate_ranks_within_windows_of_each_episode(registered):
    env = make_env(registered("Chain-v0", "ChainEnv", max_episode_steps=10), seed=0)
    gamma = 0.5
    true_q = lambda obs, act: discounted_returns(np.ones(5), gamma)[np.round(obs[:, 0]).astype(int)]
    t = lambda obs: np.round(obs[:, 0]).astype(int)
    offset_q = lambda obs, act: true_q(obs, act) + 100.0 * (t(obs) >= 3)  # right within windows {0,1,2}, {3,4}
    result = evaluate(env, lambda obs: np.ones(1), 3, 0, offset_q, gamma=gamma, q_windows=10)
    assert result["q_rank_tau"] == pytest.approx(1.0)
    one_window = evaluate(env, lambda obs: np.ones(1), 1, 0, offset_q, gamma=gamma, q_windows=1)
    assert one_window["q_rank_tau"] < 0.5  # across the two windows the offset inverts 6 of the 10 pairs


def test_evaluate_is_seeded_and_scores_hopper():
    spec = gym.spec("Hopper-v5").to_json()
    zero = lambda obs: np.zeros(3)
    first = evaluate(make_env(spec, 0), zero, episodes=2, seed=5)
    second = evaluate(make_env(spec, 1), zero, episodes=2, seed=5)
    other = evaluate(make_env(spec, 0), zero, episodes=2, seed=6)
    assert first["episodic_return"] == second["episodic_return"] != other["episodic_return"]
    assert first["normalized_score"] == pytest.approx(normalized_score("hopper", first["episodic_return"]))
    refs = evaluate(make_env(spec, 0), zero, 2, 5, minari_ref_scores=(0.0, 2 * first["episodic_return"]))
    assert refs["minari_normalized_score"] == pytest.approx(50.0)


def test_antmaze_env_is_flattened_d4rl_style_and_ends_at_the_goal(registered):
    env = make_env(registered("AntMaze_Fake-v4", "FakeAntMaze", max_episode_steps=20), seed=0)
    assert env.observation_space.shape == (29,)
    observation, _ = env.reset()
    np.testing.assert_array_equal(observation, np.concatenate([[0.0, 0.0], np.arange(27.0)]))
    reaching = evaluate(env, lambda obs: np.ones(8), episodes=2, seed=0)
    assert reaching["episode_length"] == 3 and reaching["success_rate"] == 1.0
    assert reaching["normalized_score"] == 100.0
    idle = evaluate(env, lambda obs: -np.ones(8), episodes=2, seed=0)
    assert idle["episode_length"] == 20 and idle["success_rate"] == 0.0 and idle["normalized_score"] == 0.0


def test_pen_uses_d4rl_horizon(registered):
    env = make_env(registered("AdroitHandPen-v1", "ChainEnv", max_episode_steps=200), seed=0)
    assert evaluate(env, lambda obs: -np.ones(1), episodes=1, seed=0)["episode_length"] == 100


@pytest.mark.skipif(importlib.util.find_spec("gymnasium_robotics") is not None, reason="gymnasium-robotics present")
def test_missing_gymnasium_robotics_is_a_clear_error():
    spec = EnvSpec("AntMaze_UMaze-v4", entry_point="gymnasium_robotics.envs.maze.ant_maze_v4:AntMazeEnv").to_json()
    with pytest.raises(UserError, match=r"requirements-robotics\.txt"):
        make_env(spec, seed=0)


def test_unknown_env_is_a_clear_error():
    with pytest.raises(UserError, match="cannot build the environment NoSuchEnv-v0"):
        make_env(EnvSpec("NoSuchEnv-v0", entry_point="no_such_module:Env").to_json(), seed=0)


class BrokenEnv(gym.Env):
    """Fails in its constructor the way a stale or foreign env spec does."""

    observation_space = ChainEnv.observation_space
    action_space = ChainEnv.action_space

    def __init__(self, error: str = "TypeError"):
        raise {"AttributeError": AttributeError, "TypeError": TypeError, "KeyError": KeyError}.get(
            error, AssertionError
        )("broken")


@pytest.mark.parametrize("error", ["AttributeError", "TypeError", "KeyError", "AssertionError"])
def test_env_spec_that_raises_inside_the_env_is_a_clear_error(error):
    spec = EnvSpec("Broken-v0", entry_point=f"{__name__}:BrokenEnv", kwargs={"error": error}).to_json()
    with pytest.raises(UserError, match=f"cannot build the environment Broken-v0: {error}"):
        make_env(spec, seed=0)


def test_lockstep_envs_give_the_same_episodes_with_one_policy_call_per_step():
    """Episodes in lockstep over a list of envs: the same per-episode results as one env (for a policy whose
    batched and one-row outputs agree exactly), with one batched call per step instead of one per env."""
    spec = gym.spec("Hopper-v5").to_json()

    def counting(calls):
        def policy(obs):
            calls.append(np.shape(obs))
            return np.tanh(3 * np.asarray(obs)[..., 2:5] - np.asarray(obs)[..., 5:8])  # row by row: exact

        return policy

    one_calls, many_calls = [], []
    one = evaluate(make_env(spec, 0), counting(one_calls), 7, seed=5, q_function=lambda o, a: o[:, 0])
    envs = [make_env(spec, 10 + i) for i in range(3)]
    many = evaluate(envs, counting(many_calls), 7, seed=5, q_function=lambda o, a: o[:, 0])
    assert one.keys() == many.keys() and one.pop("success_rate") is not many.pop("success_rate")  # both NaN
    assert one == many and one["q_pairs"] > 100
    assert all(shape == (11,) for shape in one_calls)
    assert len(one_calls) == one["episode_length"] * 7
    assert len(many_calls) < len(one_calls) / 2 and max(shape[0] for shape in many_calls) == 3
