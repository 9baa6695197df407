"""algorithms/off2on.py with the dataset's state normalization (as OPT, BAQ and CORL's CQL do), flags unchanged.

    python benchmark/diagnostics/off2on_normalized_states.py <off2on flags>

Written before off2on.py had --normalize-states (run it with --no-normalize-states to repeat what it measured).
Observations of the dataset and of every env are standardised with the dataset's mean and std (+1e-3); nothing
else changes. A diagnostic: checkpoints it writes hold no statistics and do not load in off2on.py correctly.
"""

import dataclasses
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "algorithms"))  # off2on.py adds the repo root
import off2on

import utils.run  # after off2on.py put the repo root on the path

statistics = {}
load_dataset, make_env = off2on.load_dataset, utils.run.make_env  # the originals, before the patch below


def normalized_dataset(env_id: str):
    data = load_dataset(env_id)
    mean, std = data.observations.mean(0), data.observations.std(0) + 1e-3
    statistics.update(mean=mean, std=std)
    observations, next_observations = (
        ((x - mean) / std).astype(np.float32) for x in (data.observations, data.next_observations)
    )
    return dataclasses.replace(data, observations=observations, next_observations=next_observations)


def normalized_env(env_spec: str, seed: int) -> gym.Env:
    env = make_env(env_spec, seed)
    mean, std = statistics["mean"], statistics["std"]
    space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
    return gym.wrappers.TransformObservation(env, lambda obs: ((obs - mean) / std).astype(np.float32), space)


if __name__ == "__main__":
    off2on.load_dataset, utils.run.make_env = normalized_dataset, normalized_env  # both looked up at call time
    off2on.main(tyro.cli(off2on.Args))
