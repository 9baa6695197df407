"""Deterministic evaluation episodes, normalized scores, and the SO2 paper's Q diagnostics."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np

from utils.names import normalized_score, task_of_env_id

Policy = Callable[[np.ndarray], np.ndarray]  # one observation -> one action
QFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]  # [n, obs], [n, act] -> [n]


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = sum_k gamma^k r_{t+k} to the end of the episode, for every t."""
    returns = np.empty(len(rewards), np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def exact_return_mask(length: int, terminated: bool, gamma: float, tail_tol: float) -> np.ndarray:
    """Steps whose Monte-Carlo return is exact: all of a terminated episode; otherwise only those whose
    missing tail gamma^(steps left) * V(s_T) is below `tail_tol` of V (e.g. 0.01 -> 459 steps at 0.99)."""
    if terminated:
        return np.ones(length, bool)
    steps_left = length - np.arange(length)
    return gamma**steps_left <= tail_tol


def kendall_tau(x: np.ndarray, y: np.ndarray, chunk: int = 1024) -> float:
    """Kendall's tau-b (ties corrected), exact, O(n^2) time in row chunks of O(chunk * n) memory."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    concordance = pairs_x = pairs_y = 0.0
    for start in range(0, len(x), chunk):
        sign_x = np.sign(x[start : start + chunk, None] - x[None, :])
        sign_y = np.sign(y[start : start + chunk, None] - y[None, :])
        concordance += float((sign_x * sign_y).sum())
        pairs_x += float(np.abs(sign_x).sum())
        pairs_y += float(np.abs(sign_y).sum())
    # Every unordered pair was counted twice; the factor cancels in the ratio.
    denominator = np.sqrt(pairs_x * pairs_y)
    return float(concordance / denominator) if denominator > 0 else float("nan")


def window_labels(pairs: int, windows: int, first: int = 0) -> np.ndarray:
    """Labels from `first` on for `pairs` consecutive pairs of one episode: `windows` equal-length windows, fewer
    where the episode is too short for two pairs in each."""
    count = max(1, min(windows, pairs // 2))
    return first + np.arange(pairs) * count // max(pairs, 1)


def q_diagnostics(
    q_estimates: np.ndarray, q_true: np.ndarray, windows: np.ndarray | None = None, min_abs_true: float = 1e-6
) -> dict[str, float]:
    """SO2 paper: q_bias = (Q_est - Q_true) / |Q_true|; q_rank_tau = K = mean_i Kendall tau over the windows.

    The bias is the pairs' mean error over their mean |Q_true| (the paper does not say how it averages): a
    mean of per-pair ratios is ruled by the few pairs whose return is near zero (an episode that falls at once,
    a state just before termination) and jumped to 10^4 on hopper. NaN when the mean |Q_true| is below
    `min_abs_true`.

    `windows` labels each pair with its window P_i (consecutive pairs within one episode, see window_labels), so
    that tau ranks similar states against each other and not the states of different episodes; None = one
    window. Windows whose tau is undefined (fewer than 2 pairs, or all ties) are left out of the mean.
    """
    scale = np.mean(np.abs(q_true)) if len(q_true) else 0.0
    bias = np.mean(q_estimates - q_true) / scale if scale >= min_abs_true else np.nan
    windows = np.zeros(len(q_true), int) if windows is None else windows
    taus = [kendall_tau(q_estimates[windows == w], q_true[windows == w]) for w in np.unique(windows)]
    taus = [tau for tau in taus if np.isfinite(tau)]
    rank_tau = float(np.mean(taus)) if taus else float("nan")
    return {"q_bias": float(bias), "q_rank_tau": rank_tau, "q_pairs": float(len(q_true))}


def run_episodes(envs: Sequence[gym.Env], policy: Policy, seeds, task: str | None, batched: bool) -> list[tuple]:
    """One episode per env, reset with its seed, stepped in lockstep with one policy call per step: on a batch
    [k, obs] if `batched`, else (one env) on the observation itself, as a single-env caller expects.

    Returns per episode (observations, actions, rewards, terminated, success).
    """
    current = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds, strict=True)]
    observations, actions, rewards = ([[] for _ in envs] for _ in range(3))
    terminated, success = [False] * len(envs), [False] * len(envs)
    active = list(range(len(envs)))
    while active:
        batch = np.stack([current[index] for index in active]) if batched else current[0]
        chosen = np.asarray(policy(batch)).reshape(len(active), -1)
        for index, action in zip(active, chosen, strict=True):
            next_observation, reward, terminated[index], truncated, info = envs[index].step(action)
            observations[index].append(current[index])
            actions[index].append(action)
            rewards[index].append(float(reward))
            success[index] |= bool(info.get("success", False)) or (task == "antmaze" and reward > 0)
            current[index] = next_observation
            if terminated[index] or truncated:
                active = [other for other in active if other != index]
    return list(zip(observations, actions, rewards, terminated, success, strict=True))


def evaluate(
    env: gym.Env | Sequence[gym.Env],
    policy: Policy,
    episodes: int,
    seed: int,
    q_function: QFunction | None = None,
    gamma: float = 0.99,
    q_reward_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    tail_tol: float = 0.01,
    minari_ref_scores: tuple[float, float] | None = None,
    extra_q_functions: dict[str, QFunction] | None = None,
    q_windows: int = 10,
) -> dict[str, float]:
    """Run `episodes` episodes of a deterministic policy; episode i is reset with seed + i.

    Given a list of k envs (a synchronous vector env without auto-reset), k episodes run in lockstep and the
    policy gets one batch [k, obs] per step: one forward (one device round trip) instead of k. Episode i is
    the same episode as with one env (its reset seed fixes it); only a policy whose batched forward rounds
    differently from its one-row forward can tell the two apart.

    Returns episodic_return (mean), return_std, episode_length, normalized_score (D4RL refs), success_rate
    (NaN where the task has no notion of success), minari_normalized_score where the dataset has Minari refs,
    and, given a Q function, q_bias / q_rank_tau / q_pairs against discounted Monte-Carlo returns.
    `q_reward_fn` maps env rewards to the rewards the critic was trained on (e.g. AntMaze r - 1, scaling).
    `extra_q_functions` (name -> Q) adds q_bias_<name> / q_rank_tau_<name> on the same state-action pairs.
    q_rank_tau averages Kendall tau over `q_windows` consecutive windows of each episode's exact-return pairs
    (the SO2 paper's M = 10 sliding windows; it gives no window size or stride, so the windows split each
    episode into equal, non-overlapping parts), which also keeps its cost at 1/q_windows of one global tau.
    q_bias compares Q with the plain discounted return of the deterministic evaluation policy: for a soft
    (SAC-style) critic that Q also holds the discounted entropy bonus of later steps, which shows as bias.
    """
    envs = list(env) if isinstance(env, Sequence) else [env]
    task = task_of_env_id(envs[0].spec.id) if envs[0].spec is not None else None
    returns, lengths, successes = [], [], []
    q_obs, q_actions, q_true, q_window = [], [], [], []
    for first in range(0, episodes, len(envs)):
        group = range(first, min(first + len(envs), episodes))
        seeds = [seed + episode for episode in group]
        trace = run_episodes(envs[: len(group)], policy, seeds, task, batched=len(envs) > 1)
        for episode, (observations, actions, rewards, terminated, success) in zip(group, trace, strict=True):
            returns.append(sum(rewards))
            lengths.append(len(rewards))
            successes.append(success)
            if q_function is not None:
                rewards_array = np.asarray(rewards)
                trained_rewards = q_reward_fn(rewards_array) if q_reward_fn is not None else rewards_array
                mask = exact_return_mask(len(rewards), terminated, gamma, tail_tol)
                q_true.append(discounted_returns(trained_rewards, gamma)[mask])
                q_window.append(window_labels(int(mask.sum()), q_windows, first=episode * q_windows))
                q_obs.append(np.asarray(observations)[mask])
                q_actions.append(np.asarray(actions)[mask])
    mean_return = float(np.mean(returns))
    has_success = task in ("antmaze", "pen", "door", "hammer", "relocate")
    success_rate = float(np.mean(successes)) if has_success else float("nan")
    result = {
        "episodic_return": mean_return,
        "return_std": float(np.std(returns)),
        "episode_length": float(np.mean(lengths)),
        "normalized_score": normalized_score(task, mean_return, success_rate),
        "success_rate": success_rate,
    }
    if minari_ref_scores is not None:
        low, high = minari_ref_scores
        result["minari_normalized_score"] = 100.0 * (mean_return - low) / (high - low)
    if q_function is not None:
        true, pair_obs, pair_actions = np.concatenate(q_true), np.concatenate(q_obs), np.concatenate(q_actions)
        windows = np.concatenate(q_window)
        functions = {"": q_function} | {f"_{name}": fn for name, fn in (extra_q_functions or {}).items()}
        for suffix, fn in functions.items():
            if len(true) >= 2:
                estimates = np.asarray(fn(pair_obs, pair_actions), np.float64).reshape(-1)
                diagnostics = q_diagnostics(estimates, true, windows)
            else:  # every episode was cut too early for an exact return
                diagnostics = {"q_bias": float("nan"), "q_rank_tau": float("nan"), "q_pairs": float(len(true))}
            result.update({f"{key}{suffix}": value for key, value in diagnostics.items()})
    return result


SCORES = ("normalized_score", "episodic_return", "success_rate", "minari_normalized_score", "q_bias", "q_rank_tau")


def write_scores(writer, result: dict[str, float], prefix: str, step: int) -> dict[str, float]:
    """Write an evaluation's scores and Q diagnostics (an extra Q function's too: q_bias_<name> ...) as
    prefix/<key>, leaving out what is NaN (no success notion, no exact return); returns `result`."""
    for key, value in result.items():
        if (key in SCORES or key.startswith(("q_bias_", "q_rank_tau_"))) and not np.isnan(value):
            writer.add_scalar(f"{prefix}/{key}", value, step)
    return result
