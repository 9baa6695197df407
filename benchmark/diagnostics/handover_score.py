"""A checkpoint's deterministic policy scored again, on episodes none of the runs evaluated.

    python benchmark/diagnostics/handover_score.py [--episodes 50] [--seed 50000] CHECKPOINT ...

Every run evaluates on reset seeds seed + 100 + i, so the online phase's step-0 evaluation of an offline.pt repeats
the offline phase's last one exactly. Where an offline phase was stopped, or a checkpoint chosen, by that number,
part of its level may be the noise of those episodes, and a "drop" after the hand-over partly regression to the
mean. This scores the same policy on other episodes (reset seeds SEED + i): the policy's level without that
selection, and the standard error that says how much of a score the episodes' noise can explain.
Prints one line per checkpoint: normalized score, its standard error over episodes, the mean return and episode
length.
"""

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from utils.envs import make_env
from utils.evaluation import evaluate
from utils.names import normalized_score, task_of_env_id


def score(path: str, episodes: int, seed: int) -> dict[str, float]:
    """Normalized score of the checkpoint's deterministic policy over `episodes` episodes with seeds seed + i, its
    standard error over the episodes (NaN for one episode), the mean return and the mean episode length."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    policy = importlib.import_module(f"algorithms.{checkpoint['algorithm']}").policy_from_checkpoint(checkpoint)
    envs = [make_env(checkpoint["eval_env_spec"], seed + i) for i in range(min(episodes, 10))]
    result = evaluate(envs, policy, episodes, seed)
    task = task_of_env_id(envs[0].spec.id)
    # evaluate's return_std is the population std (ddof 0): the sample std is sqrt(n / (n - 1)) times it
    sample_std = result["return_std"] * np.sqrt(episodes / (episodes - 1)) if episodes > 1 else float("nan")
    if task == "antmaze":  # the score is 100 x the success rate: a binomial proportion's standard error
        rate = result["success_rate"]
        stderr = 100 * np.sqrt(rate * (1 - rate) / (episodes - 1)) if episodes > 1 else float("nan")
    else:  # the score is affine in the return (NaN where the task has no D4RL reference)
        unit = normalized_score(task, 1.0) - normalized_score(task, 0.0)
        stderr = abs(unit) * sample_std / np.sqrt(episodes)
    return {"score": result["normalized_score"], "stderr": stderr, "return": result["episodic_return"],
            "length": result["episode_length"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="offline.pt, final.pt or checkpoint.pt of any script")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per checkpoint")
    parser.add_argument("--seed", type=int, default=50_000, help="reset seed of the first episode (runs use seed+100)")
    args = parser.parse_args(argv)
    for path in args.checkpoints:
        result = score(path, args.episodes, args.seed)
        line = f"{result['score']:.1f} +- {result['stderr']:.2f} (return {result['return']:.1f}, length"
        print(f"{path}: {line} {result['length']:.0f})")


if __name__ == "__main__":
    main()
