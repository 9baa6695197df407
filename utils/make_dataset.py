"""Create a real Minari dataset locally, without jax: `python -m utils.make_dataset --help`.

Examples:
    python -m utils.make_dataset --env-id Hopper-v5 --dataset-id o2o-local/hopper/random-v0 --steps 1000000
    python -m utils.make_dataset --env-id Hopper-v5 --dataset-id o2o-local/hopper/so2-noisy-v0 \\
        --checkpoint runs/<run>/final.pt --noise-std 0.1 --steps 200000

Episodes are collected with numpy and written with `minari.create_dataset_from_buffers` (Minari's
DataCollector needs jax). Episode i is reset with seed + i. The last episode, if the step budget cuts it,
is kept and marked truncated (a cut, not a termination: it bootstraps). The dataset is written under a
temporary root and moved into MINARI_DATASETS_PATH at the end, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import bisect
import importlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import UserError
from utils.names import BEHAVIOR_LEVELS, VERSIONED_ID, datasets_root, is_local, observation_keys, task_of_env_id


@dataclass
class Args:
    env_id: str
    """Gymnasium env id that generates the data, e.g. Hopper-v5"""
    dataset_id: str
    """Minari id to write, with a -vN suffix, e.g. o2o-local/hopper/random-v0"""
    steps: int = 1_000_000
    """number of environment steps (transitions) to collect"""
    checkpoint: str | None = None
    """a checkpoint of one of our algorithms whose deterministic actor acts; uniform random actions if unset"""
    noise_std: float = 0.0
    """std of Gaussian noise added to the checkpoint actor's actions (then clipped to the action bounds)"""
    seed: int = 0
    """episode i is reset with seed + i; random actions are drawn from this seed too"""
    max_episode_steps: int | None = None
    """override the env's time limit (stored in the dataset's env spec)"""
    ref_min_score: float | None = None
    """Minari metadata reference return of a random policy (stored only together with --ref-max-score)"""
    ref_max_score: float | None = None
    """Minari metadata reference return of an expert; Minari estimates ref-min itself if only this is given"""
    overwrite: bool = False
    """replace an existing local dataset with the same id"""
    progress: bool = True
    """show a progress bar (off automatically when stderr is not a terminal)"""


def policy_from_checkpoint(path: str, noise_std: float, env: gym.Env, seed: int) -> Callable:
    """The deterministic actor of one of our checkpoints, plus optional clipped Gaussian noise.

    Each algorithm script saves its name under `algorithm` and exposes `policy_from_checkpoint(ckpt)`.
    Dict observations reach the actor flattened in the layout the data loader gives the scripts.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        module = importlib.import_module(f"algorithms.{checkpoint['algorithm']}")
        actor = module.policy_from_checkpoint(checkpoint)
    except Exception as err:
        raise UserError(f"cannot use checkpoint {path} as a policy ({type(err).__name__}: {err})") from err
    keys = observation_keys(task_of_env_id(env.spec.id), env.observation_space)
    flatten = (lambda obs: obs) if keys is None else (lambda obs: np.concatenate([np.ravel(obs[k]) for k in keys]))
    sizes = (flatten(env.observation_space.sample()).size, env.action_space.shape[0])
    if (checkpoint.get("obs_dim"), checkpoint.get("act_dim")) != sizes:
        raise UserError(
            f"checkpoint {path} was trained on {checkpoint.get('dataset')} (obs dim {checkpoint.get('obs_dim')}, "
            f"action dim {checkpoint.get('act_dim')}); {env.spec.id} has obs dim {sizes[0]}, action dim {sizes[1]}"
        )
    rng = np.random.default_rng(seed)
    action_space = env.action_space

    def act(observation) -> np.ndarray:
        action = np.asarray(actor(flatten(observation)), np.float64)
        if noise_std > 0:
            action = action + rng.normal(0.0, noise_std, size=action.shape)
        return np.clip(action, action_space.low, action_space.high)

    return act


# ---------------------------------------------------------------------------------------------------
# Behaviour policies of benchmark/behavior.py (SAC snapshots) and the medium / medium-replay recipes
# ---------------------------------------------------------------------------------------------------


def mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)
    )


class BehaviorActor(nn.Module):
    """Tanh-Gaussian policy obs -> (mu, log sigma in [-5, 2]), actions rescaled to the env's bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.net = mlp(obs_dim, 2 * act_dim, hidden)
        self.register_buffer("scale", torch.as_tensor((high - low) / 2, dtype=torch.float32))
        self.register_buffer("center", torch.as_tensor((high + low) / 2, dtype=torch.float32))

    def forward(self, obs: torch.Tensor, deterministic: bool = False, generator: torch.Generator | None = None):
        """Action and its log-probability; `generator` draws the Gaussian noise (seeded data collection)."""
        mu, log_std = self.net(obs).chunk(2, -1)
        std = log_std.clamp(-5.0, 2.0).exp()
        if deterministic:  # no draw: a deterministic evaluation leaves the random stream as it was
            pre_tanh = mu
        else:
            pre_tanh = mu + std * torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        # log N(u; mu, std) - log(1 - tanh(u)^2), with the exact, stable form of the tanh correction
        log_prob = (-0.5 * ((pre_tanh - mu) / std) ** 2 - std.log() - 0.5 * np.log(2 * np.pi)).sum(-1)
        log_prob = log_prob - (2 * (np.log(2) - pre_tanh - F.softplus(-2 * pre_tanh))).sum(-1)
        return self.center + self.scale * torch.tanh(pre_tanh), log_prob - self.scale.log().sum()


def load_behavior_actor(snapshot: dict) -> BehaviorActor:
    """The float16-stored actor of a benchmark/behavior.py snapshot, in float32."""
    actor = BehaviorActor(
        snapshot["obs_dim"], snapshot["act_dim"], snapshot["hidden_dim"], snapshot["low"], snapshot["high"]
    )
    actor.net.load_state_dict({key: value.float() for key, value in snapshot["actor"].items()})
    return actor.eval()


def behavior_policy(env_dir: Path, level: str, env_id: str, seed: int) -> tuple[Callable, int | None]:
    """The policy that collects `level` data from the snapshots in env_dir, and the step count it fixes.

    medium: the stochastic policy of the first snapshot whose D4RL-normalized return reaches 100/3 (D4RL:
    a SAC policy stopped at a third of expert); any number of steps. medium-replay: the training run up to
    that snapshot replayed, as many steps as it trained: the first learning_starts steps uniform random,
    then every step by the newest snapshot taken before it (the replay buffer's policy mixture at the
    snapshot resolution, not its exact transitions).
    """
    from utils.names import D4RL_REF_SCORES

    try:
        snapshots = json.loads((env_dir / "snapshots.json").read_text())
        learning_starts = json.loads((env_dir / "args.json").read_text())["learning_starts"]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"no behaviour policy in {env_dir} ({type(err).__name__}: {err}); train one with "
            f"`python benchmark/behavior.py --env-id {env_id} --out {env_dir}`"
        ) from err
    medium = next((entry for entry in snapshots if entry["normalized_score"] >= 100 / 3), None)
    if medium is None:
        best = max((entry["normalized_score"] for entry in snapshots), default=float("nan"))
        raise UserError(
            f"no snapshot in {env_dir} reaches a third of the expert return (best {best:.1f} normalized, "
            f"D4RL refs {D4RL_REF_SCORES.get(task_of_env_id(env_id))}); train longer with benchmark/behavior.py"
        )
    generator = torch.Generator().manual_seed(seed)

    def sample(actor: BehaviorActor, observation: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor(torch.as_tensor(observation, dtype=torch.float32), generator=generator)[0].numpy()

    def load(entry: dict) -> BehaviorActor:
        return load_behavior_actor(torch.load(env_dir / entry["path"], map_location="cpu", weights_only=False))

    if level == "medium":
        actor = load(medium)
        return (lambda observation: sample(actor, observation)), None
    window = sorted((entry for entry in snapshots if entry["step"] <= medium["step"]), key=lambda e: e["step"])
    actors, starts = [load(entry) for entry in window], [entry["step"] for entry in window]
    space = gym.make(env_id).action_space
    space.seed(seed)
    calls = itertools.count(1)

    def replay(observation: np.ndarray) -> np.ndarray:
        step = next(calls)
        if step <= learning_starts or step <= starts[0]:
            return space.sample()
        return sample(actors[bisect.bisect_left(starts, step) - 1], observation)

    return replay, medium["step"]


def collect_behavior_dataset(env_id: str, dataset_id: str, level: str, steps: int, env_dir: Path, seed: int = 0):
    """A medium or medium-replay dataset from benchmark/behavior.py's snapshots (see behavior_policy)."""
    if level not in BEHAVIOR_LEVELS:
        raise UserError(f"behaviour level '{level}' is not one of {BEHAVIOR_LEVELS}")
    policy, fixed_steps = behavior_policy(env_dir, level, env_id, seed)
    return collect_dataset(env_id, dataset_id, fixed_steps or steps, policy, seed)


def _stack(observations: list):
    if isinstance(observations[0], dict):
        return {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}
    return np.stack(observations)


def collect_episodes(env: gym.Env, steps: int, policy: Callable | None, seed: int, progress: bool = False) -> list:
    """Roll out `steps` transitions into Minari EpisodeBuffers (the last one cut and marked truncated)."""
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from tqdm import tqdm

    env.action_space.seed(seed)
    buffers = []
    bar = tqdm(total=steps, desc=f"collect {env.spec.id}", unit="step", disable=not progress)
    collected = 0
    while collected < steps:
        episode_seed = seed + len(buffers)
        observation, _ = env.reset(seed=episode_seed)
        observations, actions, rewards, terminations, truncations = [observation], [], [], [], []
        done = False
        while not done and collected < steps:
            action = env.action_space.sample() if policy is None else policy(observation)
            observation, reward, terminated, truncated, _ = env.step(action)
            observations.append(observation)
            actions.append(np.asarray(action))
            rewards.append(float(reward))
            terminations.append(bool(terminated))
            truncations.append(bool(truncated))
            done = terminated or truncated
            collected += 1
        if not done:
            truncations[-1] = True  # the step budget cut this episode: a truncation, it still bootstraps
        buffers.append(
            EpisodeBuffer(
                id=len(buffers),
                seed=episode_seed,
                observations=_stack(observations),
                actions=np.stack(actions),
                rewards=np.asarray(rewards, np.float64),
                terminations=np.asarray(terminations, bool),
                truncations=np.asarray(truncations, bool),
            )
        )
        bar.update(len(actions))
    bar.close()
    return buffers


def collect_dataset(
    env_id: str,
    dataset_id: str,
    steps: int,
    policy: Callable | None = None,
    seed: int = 0,
    max_episode_steps: int | None = None,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Collect `steps` transitions on `env_id` and write them as the Minari dataset `dataset_id`."""
    import minari

    if not VERSIONED_ID.search(dataset_id) or "/" not in dataset_id:
        raise UserError(f"dataset id '{dataset_id}' must look like namespace/name-vN, e.g. o2o-local/hopper/random-v0")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if max_episode_steps is not None and max_episode_steps < 1:
        raise UserError(f"--max-episode-steps must be at least 1, got {max_episode_steps}")
    if ref_min_score is not None and ref_max_score is None:
        raise UserError("--ref-min-score is stored only together with --ref-max-score; pass both or neither")
    if is_local(dataset_id) and not overwrite:
        raise UserError(f"{dataset_id} already exists under {datasets_root()}; pass --overwrite to replace it")
    try:
        env = gym.make(env_id, **({"max_episode_steps": max_episode_steps} if max_episode_steps is not None else {}))
    except Exception as err:
        raise UserError(f"cannot make the Gymnasium env '{env_id}' ({type(err).__name__}: {err})") from err
    progress = sys.stderr.isatty() if progress is None else progress
    buffers = collect_episodes(env, steps, policy, seed, progress)

    root = datasets_root()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".o2o-staging-{os.getpid()}"
    final = root / dataset_id
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging)
    try:
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=env,
            eval_env=env.spec,
            algorithm_name="uniform random" if policy is None else "checkpoint actor",
            author="o2o-rl utils.make_dataset",
            author_email="none",
            code_permalink="utils/make_dataset.py",
            description=f"{steps} steps on {env_id}, seed {seed}",
            ref_min_score=ref_min_score,
            ref_max_score=ref_max_score,
        )
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / dataset_id, final)
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
        shutil.rmtree(staging, ignore_errors=True)
        env.close()
    return final


def main(args: Args) -> None:
    policy = None
    if args.checkpoint is not None:
        try:
            env = gym.make(args.env_id)
        except Exception as err:
            raise UserError(f"cannot make the Gymnasium env '{args.env_id}' ({type(err).__name__}: {err})") from err
        policy = policy_from_checkpoint(args.checkpoint, args.noise_std, env, args.seed)
    elif args.noise_std > 0:
        raise UserError("--noise-std applies to a --checkpoint actor; uniform random actions take no noise")
    path = collect_dataset(
        args.env_id,
        args.dataset_id,
        args.steps,
        policy,
        args.seed,
        args.max_episode_steps,
        args.ref_min_score,
        args.ref_max_score,
        args.overwrite,
        progress=None if args.progress else False,
    )
    print(f"wrote {args.dataset_id} ({args.steps} steps) to {path}")


if __name__ == "__main__":
    import tyro

    try:
        main(tyro.cli(Args))
    except UserError as err:
        sys.exit(f"error: {err}")
