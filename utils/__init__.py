"""What the algorithm scripts share (code a sixth algorithm could use unchanged); the common names, re-exported."""

from utils.data import OfflineData, check_pretrained_dataset, load_dataset
from utils.envs import make_env
from utils.errors import UserError
from utils.evaluation import discounted_returns, evaluate, kendall_tau, q_diagnostics
from utils.names import D4RL_REF_SCORES, NAMES, normalized_score, resolve_name, task_of_env_id

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
