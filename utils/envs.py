"""Gymnasium environments that match a dataset, rebuilt from the EnvSpec JSON stored with the data."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.registration import EnvSpec

from utils.errors import UserError
from utils.names import observation_keys, task_of_env_id

# D4RL evaluated pen with a 100-step horizon; Minari's env spec says 200, which inflates pen scores.
HORIZON_OVERRIDES = {"pen": 100}
ROBOTICS_TASKS = ("antmaze", "pen", "door", "hammer", "relocate")


def parse_env_spec(env_spec: str) -> EnvSpec:
    # Specs written by gymnasium 0.29 carry keys that gymnasium 1.x refuses; Minari strips the same ones.
    for stale in ('"order_enforce": true,', '"apply_api_compatibility": false,', '"autoreset": false, '):
        env_spec = env_spec.replace(stale, "")
    return EnvSpec.from_json(env_spec)


class FlattenDictObservation(gym.ObservationWrapper):
    """Concatenate Dict observations in the order the dataset loader uses (AntMaze: D4RL's layout)."""

    def __init__(self, env: gym.Env, keys: tuple[str, ...]):
        super().__init__(env)
        self.keys = keys
        size = sum(int(np.prod(env.observation_space[key].shape)) for key in keys)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float64)

    def observation(self, observation):
        return np.concatenate([np.asarray(observation[key], np.float64).ravel() for key in self.keys])


class TerminateAtGoal(gym.Wrapper):
    """D4RL's AntMaze episodes end when the goal is reached; Minari's envs are continuing tasks."""

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        return observation, reward, terminated or reward > 0, truncated, info


def make_env(env_spec: str, seed: int) -> gym.Env:
    """Build and seed the env of a dataset: EnvSpec JSON in, flat float observations out.

    The env is reset once with `seed`, so later plain `reset()` calls continue a seeded stream.
    """
    try:
        spec = parse_env_spec(env_spec)
    except Exception as err:  # broken JSON, a missing key, a value of the wrong type
        reason = f"{type(err).__name__}: {err}"
        raise UserError(f"the dataset's env spec cannot be read ({reason}): {env_spec[:200]}") from err
    task = task_of_env_id(spec.id)
    kwargs = {"max_episode_steps": HORIZON_OVERRIDES[task]} if task in HORIZON_OVERRIDES else {}
    try:
        env = gym.make(spec, **kwargs)
        keys = observation_keys(task, env.observation_space)
        if keys is not None:
            env = FlattenDictObservation(env, keys)
        if task == "antmaze":
            env = TerminateAtGoal(env)
        env.reset(seed=seed)
    except Exception as err:  # a stale or foreign spec fails in many ways inside gym.make and the env's init
        if task in ROBOTICS_TASKS and isinstance(err, ImportError | gym.error.Error):
            raise UserError(
                f"{spec.id} needs gymnasium-robotics ({type(err).__name__}: {err}); "
                "install it with `pip install -r requirements-robotics.txt`"
            ) from err
        raise UserError(f"cannot build the environment {spec.id}: {type(err).__name__}: {err}") from err
    env.action_space.seed(seed)
    return env
