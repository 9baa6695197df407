"""The only code the five algorithm scripts share: data, environments, evaluation, dataset creation."""

from utils.data import (
    D4RL_REF_SCORES,
    NAMES,
    OfflineData,
    check_pretrained_dataset,
    load_dataset,
    normalized_score,
    resolve_name,
    task_of_env_id,
)
from utils.envs import make_env
from utils.errors import UserError
from utils.evaluation import discounted_returns, evaluate, kendall_tau, q_diagnostics

__all__ = [
    "D4RL_REF_SCORES",
    "NAMES",
    "OfflineData",
    "UserError",
    "check_pretrained_dataset",
    "discounted_returns",
    "evaluate",
    "kendall_tau",
    "load_dataset",
    "make_env",
    "normalized_score",
    "q_diagnostics",
    "resolve_name",
    "task_of_env_id",
]
