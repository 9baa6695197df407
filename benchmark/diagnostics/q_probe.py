"""A checkpoint's critics on dataset states: Q of the dataset's actions, of the policy's and of uniform ones.

    MINARI_DATASETS_PATH=... python benchmark/diagnostics/q_probe.py [--every 40] [--seed 0] CHECKPOINT ...

The evaluation's `eval/q_bias` compares Q with the returns on the policy's own trajectories; this shows how the
critics rank actions on the data's states, where a policy that leaves the data after the hand-over goes. States:
every `--every`-th episode of the checkpoint's own dataset (`args.env_id`), through the script's own state
normalisation and the Q its evaluation uses (ENOTO, BAQ: the minimum over the critics; Off2On: the mean over agents
of each twin minimum). Prints one line per checkpoint: its phase and step, the mean Q of the dataset's action, of the
policy's deterministic and sampled actions and of a uniform one, and the mean squared difference between the
policy's deterministic action and the dataset's (over states and action dimensions).
"""

import argparse
import functools
import importlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils import load_dataset

AGENTS = {"enoto": ("ENOTO", "q_min"), "off2on": ("Off2On", "q_ensemble"), "baq": ("BAQ", "q_min")}


def load_agent(checkpoint: dict):
    """The checkpoint's agent on the CPU and the Q function its evaluation uses (raw obs, action -> Q per state)."""
    name = checkpoint["algorithm"]
    if name not in AGENTS:
        raise SystemExit(f"error: q_probe reads {', '.join(AGENTS)} checkpoints, not {name}")
    module = importlib.import_module(f"algorithms.{name}")
    flags = {"pretrained": None, "resume": None, "compile": False, "cudagraphs": False}
    args = module.Args(**{**checkpoint["args"], **flags})
    agent = getattr(module, AGENTS[name][0])(checkpoint["obs_dim"], checkpoint["act_dim"], args, torch.device("cpu"))
    agent.load_state_dict(checkpoint)
    return agent, getattr(agent, AGENTS[name][1])


@functools.cache  # several checkpoints of one dataset load it once
def dataset_states(env_id: str, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(observations, actions) of every `every`-th episode of the dataset, from its first (shared: not to be
    modified)."""
    data = load_dataset(env_id)
    episode = np.r_[0, np.cumsum(data.episode_ends[:-1] > 0)]  # each transition's episode index
    rows = episode % every == 0
    return data.observations[rows], data.actions[rows]


def probe(path: str, every: int = 40, seed: int = 0) -> dict[str, float]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    agent, q = load_agent(checkpoint)
    obs, action = dataset_states(checkpoint["args"]["env_id"], every)
    torch.manual_seed(seed)
    policy_action = agent.policy(obs, deterministic=True)
    sources = {"data": action, "policy": policy_action, "policy sample": agent.policy(obs, deterministic=False)}
    sources["uniform"] = np.random.default_rng(seed).uniform(-1, 1, action.shape).astype(np.float32)
    values = {f"q {source}": float(q(obs, actions).mean()) for source, actions in sources.items()}
    distance = float(np.square(policy_action - action).mean())
    return values | {"policy-data mse": distance, "states": len(obs), "phase": checkpoint["phase"],
                     "step": checkpoint["step"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="offline.pt, final.pt or checkpoint.pt of enoto, off2on, baq")
    parser.add_argument("--every", type=int, default=40, help="states of every this-many-th episode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled and uniform actions")
    args = parser.parse_args(argv)
    for path in args.checkpoints:
        result = probe(path, args.every, args.seed)
        values = ", ".join(f"{key} {result[key]:.2f}" for key in result if key.startswith("q ") or "mse" in key)
        print(f"{path} ({result['phase']} step {result['step']}, {result['states']} states): {values}")


if __name__ == "__main__":
    main()
