"""CORL's CQL (tinkoff-ai/CORL, algorithms/offline/cql.py, imported as it is) on one of our local Minari datasets.

    python benchmark/diagnostics/corl_cql.py --corl /tmp/CORL --env-id hopper-sac-medium \
        --run-dir /work/diag --name corl-own [--width 64 --critic-layers 2 --actor-layers 2 ...]

Is the weak one-agent CQL hand-over of off2on.py / enoto.py our CQL, or CQL at these budgets on this data? This
trains CORL's ContinuousCQL.train (its losses, networks and initialisation; its d4rl, gym, pyrallis and wandb
imports get empty stand-ins; nothing of it is copied here) on our dataset, with CORL's hopper config by default
(configs/offline/cql/hopper/medium_v2.yaml: width 256, 3 hidden layers, policy lr 3e-5, CQL weight 10, bc 0,
state and reward normalization) or with off2on.py's protocol flags (--width 64 --critic-layers 2 --actor-layers 2
--policy-lr 1e-4 --cql-alpha 5 --bc-steps 400 --no-normalize --no-normalize-reward). What is ours: the data
(utils.load_dataset), CORL's reward normalization 1000 / (max - min episode return) computed on our episode ends,
the width (CORL's 256 is a literal: its nn.Linear is replaced by one that maps 256 to --width), an --actor-layers
2 actor built the way CORL builds its own, and the evaluation (utils.evaluate on our env, 10 episodes with
seed + 100 as off2on.py, logged as offline/normalized_score).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import types
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmark.peers import corl_trainer, load_corl  # noqa: E402
from utils import evaluate, load_dataset, make_env  # noqa: E402


def corl_module(corl: Path, width: int):
    module = load_corl(corl)

    class Linear(torch.nn.Linear):  # CORL's hidden width 256 is a literal in its constructors
        def __init__(self, n_in: int, n_out: int, *rest, **kwargs):
            super().__init__(width if n_in == 256 else n_in, width if n_out == 256 else n_out, *rest, **kwargs)

    module.nn = types.SimpleNamespace(**{**vars(torch.nn), "Linear": Linear})
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corl", type=Path, required=True, help="a clone of github.com/tinkoff-ai/CORL")
    parser.add_argument("--env-id", default="hopper-sac-medium")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=Path("runs"))
    parser.add_argument("--name", default="corl-cql")
    parser.add_argument("--updates", type=int, default=20_000)
    parser.add_argument("--eval-freq", type=int, default=5_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--critic-layers", type=int, default=3)
    parser.add_argument("--actor-layers", type=int, default=3, choices=(2, 3))
    parser.add_argument("--policy-lr", type=float, default=3e-5)
    parser.add_argument("--cql-alpha", type=float, default=10.0)
    parser.add_argument("--bc-steps", type=int, default=0)
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--normalize-reward", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    corl = corl_module(args.corl, args.width)
    config = corl.TrainConfig()  # the fields this script does not set are CORL's hopper yaml's too
    data = load_dataset(args.env_id)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    rewards = data.rewards.copy()
    if args.normalize_reward:
        returns = np.add.reduceat(rewards, np.r_[0, np.flatnonzero(data.episode_ends)[:-1] + 1])
        rewards *= 1000.0 / (returns.max() - returns.min())
    mean, std = (data.observations.mean(0), data.observations.std(0) + 1e-3) if args.normalize else (0.0, 1.0)
    arrays = [(data.observations - mean) / std, data.actions, rewards[:, None], (data.next_observations - mean) / std]
    arrays = [torch.as_tensor(np.asarray(x, np.float32)) for x in (*arrays, data.terminals[:, None])]  # CORL's shapes

    critic_1, critic_2 = (
        corl.FullyConnectedQFunction(obs_dim, act_dim, config.orthogonal_init, args.critic_layers) for _ in range(2)
    )
    actor = corl.TanhGaussianPolicy(obs_dim, act_dim, 1.0, orthogonal_init=config.orthogonal_init)
    if args.actor_layers == 2:
        nn = corl.nn
        actor.base_network = nn.Sequential(
            nn.Linear(obs_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2 * act_dim)
        )
        corl.init_module_weights(actor.base_network)
    trainer = corl_trainer(
        corl,
        critic_1,
        critic_2,
        actor,
        act_dim,
        policy_lr=args.policy_lr,
        bc_steps=args.bc_steps,
        cql_alpha=args.cql_alpha,
    )

    run_path = args.run_dir / f"{args.env_id}__{args.name}__{args.seed}"
    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    writer = SummaryWriter(str(run_path))
    env = make_env(data.eval_env_spec, args.seed)
    space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
    env = gym.wrappers.TransformObservation(env, lambda obs: ((obs - mean) / std).astype(np.float32), space)

    def policy(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor(torch.as_tensor(obs, dtype=torch.float32), deterministic=True)[0].numpy()

    for step in range(1, args.updates + 1):
        index = torch.randint(len(data), (config.batch_size,))
        log = trainer.train([x[index] for x in arrays])
        if step % 1000 == 0:
            for key in ("average_qf1", "cql_qf1_diff", "alpha", "policy_loss", "cql_q1_rand"):
                writer.add_scalar(f"offline/{key}", log[key], step)
        if step % args.eval_freq == 0:
            result = evaluate(env, policy, args.eval_episodes, args.seed + 100)
            writer.add_scalar("offline/normalized_score", result["normalized_score"], step)
            print(f"{step}: score {result['normalized_score']:.1f}, Q {log['average_qf1']:.1f}", flush=True)
    writer.close()
    torch.save({"actor": actor.state_dict(), "critic_1": critic_1.state_dict()}, run_path / "final.pt")


if __name__ == "__main__":
    main()
