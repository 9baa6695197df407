"""Behaviour policies for local medium-quality datasets: plain online SAC, seeded, sized for a CPU.

    python benchmark/behavior.py --env-id Hopper-v5 --total-steps 300000 --out benchmark/behavior/hopper

Minari has no random, medium-replay or medium-expert MuJoCo data, and its medium/expert data cannot be
downloaded on a machine without internet. D4RL built "medium" from a SAC policy stopped at about 1/3 of
expert return and "medium-replay" from that policy's replay buffer; this trainer gives the policies for
the same recipe.

It keeps, every --snapshot-freq env steps, the actor (float16 weights, small enough to commit) with the
mean return of --eval-episodes deterministic episodes, in <out>/snapshots/step_<k>.pt, and the list of
all of them in <out>/snapshots.json. The replay buffer itself is not kept: medium-replay is regenerated
by rolling out the snapshots in order, each for the env steps of its window (the first window: uniform
random actions, as in training). That is the buffer's policy mixture at --snapshot-freq resolution, not
the exact transitions; say so wherever it is used.

SAC as Haarnoja et al. 2018 / CleanRL: two critics 256-256, tanh-Gaussian actor 256-256, automatic
entropy tuning with target -|A|, Adam 3e-4, batch 256, tau 0.005, gamma 0.99, one update per env step
after 5,000 uniform random steps. Bootstraps unless `terminated` (time-limit ends bootstrap).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any directory
from utils import UserError, normalized_score, task_of_env_id
from utils.make_dataset import BehaviorActor, load_behavior_actor, mlp


@dataclass
class Args:
    env_id: str = "Hopper-v5"
    """Gymnasium env id to train on"""
    out: str = "benchmark/behavior/hopper"
    """folder for snapshots/ and snapshots.json"""
    seed: int = 0
    """seed of python, numpy, torch and the env"""
    total_steps: int = 300_000
    """env steps of training"""
    learning_starts: int = 5_000
    """first env steps: uniform random actions, no updates"""
    snapshot_freq: int = 10_000
    """keep the actor and its evaluation every this many env steps (and at step learning_starts)"""
    eval_episodes: int = 5
    """deterministic episodes per snapshot evaluation"""
    hidden_dim: int = 256
    """width of the two hidden layers of actor and critics"""
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    lr: float = 3e-4
    """Adam learning rate of actor, critics and temperature"""
    buffer_size: int = 1_000_000
    threads: int = 1
    """torch CPU threads (a background job should leave the other core free)"""


def evaluate(actor: BehaviorActor, env: gym.Env, episodes: int, seed: int) -> float:
    """Mean return of deterministic episodes, episode i reset with seed + i."""
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        done, total = False, 0.0
        while not done:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32), deterministic=True)[0].numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def save_snapshot(out: Path, actor: BehaviorActor, step: int, args: Args, env: gym.Env, eval_env: gym.Env) -> dict:
    """The actor in float16, evaluated as stored (the behaviour policy IS these weights), written atomically."""
    snapshot = {
        "algorithm": "behavior",
        "env_id": args.env_id,
        "hidden_dim": args.hidden_dim,
        "obs_dim": env.observation_space.shape[0],
        "act_dim": env.action_space.shape[0],
        "low": env.action_space.low,
        "high": env.action_space.high,
        "actor": {key: value.half() for key, value in actor.net.state_dict().items()},
        "step": step,
    }
    eval_return = evaluate(load_behavior_actor(snapshot), eval_env, args.eval_episodes, args.seed + 10_000)
    entry = {
        "step": step,
        "eval_return": eval_return,
        "normalized_score": normalized_score(task_of_env_id(args.env_id), eval_return),
        "path": f"snapshots/step_{step:07d}.pt",
    }
    path = out / entry["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(snapshot | entry, tmp)
    os.replace(tmp, path)
    return entry


def train(args: Args) -> list[dict]:
    for name in ("total_steps", "snapshot_freq", "eval_episodes", "batch_size", "buffer_size", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.learning_starts < args.total_steps:
        raise UserError(f"--learning-starts must be in [0, --total-steps), got {args.learning_starts}")
    try:
        env, eval_env = gym.make(args.env_id), gym.make(args.env_id)
    except Exception as err:
        raise UserError(f"cannot make the Gymnasium env '{args.env_id}' ({type(err).__name__}: {err})") from err
    if not isinstance(env.action_space, gym.spaces.Box) or len(env.observation_space.shape or ()) != 1:
        raise UserError(f"{args.env_id} needs flat Box observations and actions for this trainer")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(asdict(args), indent=2))

    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    actor = BehaviorActor(obs_dim, act_dim, args.hidden_dim, env.action_space.low, env.action_space.high)
    critics = nn.ModuleList(mlp(obs_dim + act_dim, 1, args.hidden_dim) for _ in range(2))
    critic_targets = nn.ModuleList(mlp(obs_dim + act_dim, 1, args.hidden_dim) for _ in range(2))
    critic_targets.load_state_dict(critics.state_dict())
    log_alpha = torch.zeros(1, requires_grad=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), args.lr)
    critic_optimizer = torch.optim.Adam(critics.parameters(), args.lr)
    alpha_optimizer = torch.optim.Adam([log_alpha], args.lr)
    target_entropy = -float(act_dim)

    capacity = min(args.buffer_size, args.total_steps)
    buffer = {
        "obs": np.zeros((capacity, obs_dim), np.float32),
        "action": np.zeros((capacity, act_dim), np.float32),
        "reward": np.zeros(capacity, np.float32),
        "next_obs": np.zeros((capacity, obs_dim), np.float32),
        "terminated": np.zeros(capacity, np.float32),
    }

    def q_values(obs, action, nets):
        x = torch.cat([obs, action], -1)
        return torch.stack([net(x).squeeze(-1) for net in nets])

    def update(batch):
        obs, action, reward, next_obs, terminated = (torch.from_numpy(batch[k]) for k in buffer)
        alpha = log_alpha.exp().detach()
        with torch.no_grad():
            next_action, next_log_prob = actor(next_obs)
            next_q = q_values(next_obs, next_action, critic_targets).min(0).values - alpha * next_log_prob
            target = reward + args.gamma * (1 - terminated) * next_q
        critic_loss = F.mse_loss(q_values(obs, action, critics), target.expand(2, -1), reduction="sum") / len(obs)
        critic_optimizer.zero_grad()
        critic_loss.backward()
        critic_optimizer.step()
        new_action, log_prob = actor(obs)
        actor_loss = (alpha * log_prob - q_values(obs, new_action, critics).min(0).values).mean()
        actor_optimizer.zero_grad()
        actor_loss.backward()
        actor_optimizer.step()
        alpha_loss = -(log_alpha * (log_prob.detach() + target_entropy)).mean()
        alpha_optimizer.zero_grad()
        alpha_loss.backward()
        alpha_optimizer.step()
        with torch.no_grad():
            for target_param, param in zip(critic_targets.parameters(), critics.parameters(), strict=True):
                target_param.lerp_(param, args.tau)

    snapshots, episode_return, start = [], 0.0, time.perf_counter()
    obs, _ = env.reset(seed=args.seed)
    env.action_space.seed(args.seed)
    for step in range(1, args.total_steps + 1):
        if step <= args.learning_starts:
            action = env.action_space.sample()
        else:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32))[0].numpy()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        slot = (step - 1) % capacity
        for key, value in zip(buffer, (obs, action, reward, next_obs, terminated), strict=True):
            buffer[key][slot] = value
        episode_return += float(reward)
        obs = next_obs
        if terminated or truncated:
            obs, episode_return = env.reset()[0], 0.0
        if step > args.learning_starts:
            index = np.random.randint(0, min(step, capacity), args.batch_size)
            update({key: value[index] for key, value in buffer.items()})
        if step % args.snapshot_freq == 0 or step == args.learning_starts:
            with torch.random.fork_rng():  # building and evaluating the snapshot must not move training's stream
                snapshots.append(save_snapshot(out, actor, step, args, env, eval_env))
            (out / "snapshots.json").write_text(json.dumps(snapshots, indent=1))
            sps, entry = step / (time.perf_counter() - start), snapshots[-1]
            print(
                f"step {step}: eval return {entry['eval_return']:.1f} ({entry['normalized_score']:.1f}), {sps:.0f} SPS"
            )
    return snapshots


if __name__ == "__main__":
    try:
        cli_args = tyro.cli(Args)
        torch.set_num_threads(cli_args.threads)
        train(cli_args)
    except UserError as err:
        sys.exit(f"error: {err}")
