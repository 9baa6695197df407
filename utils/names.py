"""Dataset names: D4RL-style names -> Minari ids, tasks, D4RL reference scores, where local data lives.

Shared by loading (utils.data) and creating (utils.make_dataset) datasets, and imports neither of them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

# ---------------------------------------------------------------------------------------------------
# Name table
# ---------------------------------------------------------------------------------------------------

LOCOMOTION = {"hopper": "Hopper", "halfcheetah": "HalfCheetah", "walker2d": "Walker2d", "ant": "Ant"}
LOCOMOTION_LEVELS = ("simple", "medium", "expert")
ANTMAZE_LEVELS = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ADROIT_TASKS = ("pen", "door", "hammer", "relocate")
ADROIT_LEVELS = ("human", "cloned", "expert")
# Our own namespace for data generated here, so it never shadows a remote Minari id.
LOCAL_NAMESPACE = "o2o-local"
RANDOM_DATASET_STEPS = 1_000_000  # also the size of a generated sac-medium dataset (D4RL: 1M)
BEHAVIOR_LEVELS = ("medium", "medium-replay")
BEHAVIOR_ROOT = Path(__file__).resolve().parents[1] / "benchmark" / "behavior"
VERSIONED_ID = re.compile(r"-v\d+$")


@dataclass(frozen=True)
class DatasetName:
    """What a user-facing name stands for."""

    name: str
    minari_ids: tuple[str, ...]  # concatenated in this order (medium-expert = medium then expert)
    generate_env_id: str | None = None  # set for data we create locally on first use
    behavior_level: str | None = None  # medium / medium-replay from benchmark/behavior/<env>/; None = random


def _name_table() -> dict[str, DatasetName]:
    table = {}
    for env, Env in LOCOMOTION.items():
        for level in LOCOMOTION_LEVELS:
            table[f"{env}-{level}"] = DatasetName(f"{env}-{level}", (f"mujoco/{env}/{level}-v0",))
        table[f"{env}-medium-expert"] = DatasetName(
            f"{env}-medium-expert", (f"mujoco/{env}/medium-v0", f"mujoco/{env}/expert-v0")
        )
        table[f"{env}-random"] = DatasetName(
            f"{env}-random", (f"{LOCAL_NAMESPACE}/{env}/random-v0",), generate_env_id=f"{Env}-v5"
        )
        for level in BEHAVIOR_LEVELS:  # our own SAC behaviour data (benchmark/behavior.py), not D4RL's
            name = f"{env}-sac-{level}"
            minari_id = f"{LOCAL_NAMESPACE}/{env}/sac-{level}-v0"
            table[name] = DatasetName(name, (minari_id,), generate_env_id=f"{Env}-v5", behavior_level=level)
    for level in ANTMAZE_LEVELS:
        table[f"antmaze-{level}"] = DatasetName(f"antmaze-{level}", (f"D4RL/antmaze/{level}-v1",))
    for task in ADROIT_TASKS:
        for level in ADROIT_LEVELS:
            table[f"{task}-{level}"] = DatasetName(f"{task}-{level}", (f"D4RL/{task}/{level}-v2",))
    return table


NAMES = _name_table()

REFUSED = {
    "medium-replay": "Minari has no medium-replay data for the MuJoCo tasks (only simple, medium and expert "
    "exist remotely); use our own {env}-sac-medium-replay (README), {env}-simple or {env}-random",
    "full-replay": "Minari has no full-replay data; use {env}-medium or {env}-random",
    "kitchen": "FrankaKitchen-v1 does not run on mujoco 4 (its make fails in get_joint_qpos), so kitchen "
    "datasets cannot be fine-tuned online",
}


def resolve_name(name: str) -> DatasetName:
    """Map a D4RL-style name (with or without a -vN suffix) or a raw Minari id to Minari ids."""
    name = name.strip()
    if "/" in name:  # a raw Minari id
        if not VERSIONED_ID.search(name):
            raise UserError(
                f"Minari id '{name}' has no version suffix; Minari needs one, e.g. '{name}-v0' "
                "(a versionless id crashes inside minari)"
            )
        return DatasetName(name, (name,))
    short = VERSIONED_ID.sub("", name)
    if short in NAMES:
        return NAMES[short]
    env = short.split("-")[0]
    for key, why in REFUSED.items():
        if key in short:
            raise UserError(f"'{name}' is not available: {why.format(env=env)}")
    raise UserError(
        f"unknown dataset name '{name}'. Known names: {', '.join(sorted(NAMES))}; "
        "or give a raw Minari id such as mujoco/hopper/medium-v0"
    )


# ---------------------------------------------------------------------------------------------------
# Tasks and normalized scores
# ---------------------------------------------------------------------------------------------------

# D4RL reference returns (random, expert) from D4RL's infos.py, the ones the papers use.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867),
    "relocate": (-6.425911, 4233.877797728884),
}
_TASK_OF_ENV = {
    "Hopper": "hopper",
    "HalfCheetah": "halfcheetah",
    "Walker2d": "walker2d",
    "Ant": "ant",
    "AdroitHandPen": "pen",
    "AdroitHandDoor": "door",
    "AdroitHandHammer": "hammer",
    "AdroitHandRelocate": "relocate",
}


def task_of_env_id(env_id: str) -> str | None:
    """'Hopper-v5' -> 'hopper', 'AntMaze_UMaze-v4' -> 'antmaze', unknown envs -> None."""
    base = env_id.split(":")[-1].split("-v")[0]
    if base.startswith("AntMaze"):
        return "antmaze"
    return _TASK_OF_ENV.get(base)


def normalized_score(task: str | None, mean_return: float, success_rate: float = float("nan")) -> float:
    """D4RL normalized score x100; AntMaze is 100 x success rate; NaN where D4RL has no reference."""
    if task == "antmaze":
        return 100.0 * success_rate
    if task not in D4RL_REF_SCORES:
        return float("nan")
    low, high = D4RL_REF_SCORES[task]
    return 100.0 * (mean_return - low) / (high - low)


def datasets_root() -> Path:
    """The folder Minari reads local datasets from (MINARI_DATASETS_PATH or ~/.minari/datasets)."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


def is_local(minari_id: str) -> bool:
    return (datasets_root() / minari_id / "data" / "metadata.json").is_file()


def observation_keys(task: str | None, observation_space) -> tuple[str, ...] | None:
    """The order in which Dict observations are concatenated; None for flat Box observations.

    AntMaze follows D4RL's layout: the ant's (x, y) first, then the 27-d body state (29 dims); the goal
    is fixed by the evaluation env, as in D4RL. Other Dict spaces keep the space's own key order.
    """
    spaces = getattr(observation_space, "spaces", None)
    if not isinstance(spaces, dict):
        return None
    if task == "antmaze":
        return ("achieved_goal", "observation")
    return tuple(spaces)
