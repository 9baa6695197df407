"""ENOTO: Improving Offline-to-Online Reinforcement Learning with Q-Ensembles.

Zhao, Hao, Ma, Liu, Zheng, Meng, IJCAI 2024, arXiv 2306.06871 (v1: "E2O"); numbers from the official code
(TJU-DRL-LAB/AI-Optimizer, E2O, a d3rlpy v1 fork). This is ENOTO-CQL: CQL-N pretraining (N = 10 critics,
min-over-N target), then at the switch the CQL term is dropped and the same networks keep training as SAC-N with
the WeightedMinPair target, the SUNRISE uncertainty-weighted Bellman backup (T = 10) and SUNRISE UCB action
selection (lambda = 10), on a fresh online buffer. The decisions that change results:
- Offline CQL(H) exactly as d3rlpy (importance-sampled logsumexp, weight 5, gap averaged and TD loss summed over
  critics, a deterministic entropy-free backup); updates in d3rlpy's order: temperature, critics, actor, targets.
- Hand-over: networks, targets, temperature and Adam states are kept; only the CQL term goes; the dataset is not
  used online.
- The SUNRISE weight is per sample (SUNRISE's definition); the official code's one weight per batch is
  `--sunrise-weight batch`, and `--preset official` is what the released pipeline ran.
- States are standardised with the dataset's statistics (CORL's CQL); `--no-normalize-states` feeds raw states
  as the official code does, on which CQL collapses on our hopper data.
Not implemented: ENOTO-LAPO, the paper's AntMaze variant. Ablations: `--q-target`, `--exploration`,
`--sunrise-weight`, `--keep-cql-online`, `--online-backup`; baselines: `--preset cql_sac|cql_cql`.
Every decision and deviation, the logged tags and the results on our data: docs/enoto.md.

Usage: python algorithms/enoto.py --env-id hopper-medium
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any directory
from utils import OfflineData, UserError, evaluate, load_dataset
from utils.buffers import ReplayBuffer, transition_rows
from utils.evaluation import write_scores
from utils.fast import FastUpdate
from utils.metrics import Metrics
from utils.optim import adam, optimizer_step, soft_update
from utils.run import Run, RunArgs, apply_preset, check_bounds, cli, offline_loop, online_loop


@dataclass
class Args(RunArgs):
    # experiment
    exp_name: str = "enoto"
    """name of the experiment, part of the run name"""
    # data
    normalize_states: bool = True
    """standardise states with the dataset's mean and std (CORL's CQL); off = raw states (official code)"""
    # budgets
    offline_steps: int = 1_000_000
    """CQL-N gradient steps (paper 4.1); 0 = no pretraining (the paper's "Scratch")"""
    online_steps: int = 250_000
    """online environment steps (paper 4.1)"""
    warmup_steps: int = 1_000
    """first online steps: act with the pretrained agent, no updates (official update_start_step)"""
    batch_size: int = 256
    """minibatch size in both phases"""
    # algorithm
    hidden_dim: int = 256
    """width of the three hidden layers of actor and critics"""
    num_critics: int = 10
    """ensemble size N in both phases (official code; the paper never states it)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """target soft-update rate, every update"""
    actor_lr: float = 3e-5
    """actor learning rate, both phases"""
    critic_lr: float = 3e-4
    """critic learning rate, both phases"""
    alpha_lr: float = 1e-4
    """temperature learning rate (initial alpha 1, target entropy -|A|), both phases"""
    cql_weight: float = 5.0
    """CQL(H) weight on the critic-averaged gap (Lagrange multiplier fixed at 1)"""
    cql_samples: int = 10
    """actions per source (uniform, pi(s), pi(s')) in the CQL logsumexp"""
    keep_cql_online: bool = False
    """keep the CQL term online (the paper's CQL -> CQL baseline)"""
    online_backup: Literal["sac", "cql"] = "sac"
    """online Bellman target: SAC-N's (sampled a', entropy term) or CQL's deterministic one without entropy"""
    preset: Literal["enoto", "official", "cql_sac", "cql_cql"] = "enoto"
    """enoto: the card's defaults; official: what the released E2O code ran; cql_sac, cql_cql: the paper's
    baselines (see PRESETS); a flag that contradicts the preset is an error"""
    q_target: Literal["min", "mean", "rem", "random_min_pair", "weighted_min_pair"] = "weighted_min_pair"
    """online target rule over the target ensemble (paper 3.2); offline is always min"""
    exploration: Literal["none", "sunrise", "bootstrap", "oac"] = "sunrise"
    """online action selection (paper 3.3): policy sample, UCB, bootstrapped head, or OAC"""
    sunrise_weight: Literal["per_sample", "batch", "off"] = "per_sample"
    """SUNRISE weighted backup: per sample (SUNRISE), one scalar per batch (official E2O), or none"""
    sunrise_temperature: float = 10.0
    """T in w = sigmoid(-T std) + 0.5"""
    ucb_lambda: float = 10.0
    """lambda in the UCB score mean + lambda std"""
    oac_beta_ub: float = 4.66
    """OAC optimism beta_UB (exploration oac)"""
    oac_delta: float = 23.53
    """OAC shift size delta (exploration oac)"""
    online_buffer_size: int = 1_000_000
    """capacity of the online buffer"""
    # evaluation
    eval_freq: int = 5_000
    """online evaluation every this many environment steps (and at step 0)"""
    offline_eval_freq: int = 10_000
    """offline evaluation every this many gradient steps (and at the end)"""


# One flag for what the official pipeline ran and for the paper's baselines (2 critics: standard CQL).
CQL_SAC = {"num_critics": 2, "q_target": "min", "exploration": "none", "sunrise_weight": "off"}
PRESETS = {
    "enoto": {},
    "official": {"exploration": "none", "sunrise_weight": "batch"},
    "cql_sac": CQL_SAC,
    "cql_cql": CQL_SAC | {"keep_cql_online": True, "online_backup": "cql"},
}


# ---------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """E independent linear layers as one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features))
        bound = 1 / in_features**0.5  # what nn.Linear's default init draws (d3rlpy uses no custom init)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class Critic(nn.Module):
    """N Q-functions (s, a) -> 256 -> 256 -> 256 -> 1, evaluated together."""

    def __init__(self, obs_dim: int, act_dim: int, num_critics: int, hidden: int = 256):
        super().__init__()
        self.num_critics = num_critics
        layers = []
        for n_in, n_out in itertools.pairwise((obs_dim + act_dim, hidden, hidden, hidden)):
            layers += [EnsembleLinear(n_in, n_out, num_critics), nn.ReLU()]
        self.net = nn.Sequential(*layers, EnsembleLinear(hidden, 1, num_critics))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """[B, obs] and [B, act] (shared by all members) or [N, B, ...] (one per member) -> Q of shape [N, B]."""
        x = torch.cat([obs, action], dim=-1)
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.num_critics, -1, -1)
        return self.net(x).squeeze(-1)


def tanh_log_det(pre_tanh: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(z)^2) summed over the action, in the stable form 2 (log 2 - z - softplus(-2z))."""
    return (2 * (math.log(2) - pre_tanh - F.softplus(-2 * pre_tanh))).sum(-1)


class Actor(nn.Module):
    """Tanh-Gaussian policy: obs -> 256 -> 256 -> 256 -> (mu, log sigma in [-20, 2]), default init."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        layers = []
        for n_in, n_out in itertools.pairwise((obs_dim, hidden, hidden, hidden)):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def distribution(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-tanh mean and standard deviation."""
        hidden = self.trunk(obs)
        return self.mu(hidden), self.log_std(hidden).clamp(-20.0, 2.0).exp()

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Action in (-1, 1) and its log-probability (tanh change of variables)."""
        mu, std = self.distribution(obs)
        normal = torch.distributions.Normal(mu, std, validate_args=False)
        pre_tanh = mu if deterministic else normal.rsample()
        return torch.tanh(pre_tanh), normal.log_prob(pre_tanh).sum(-1) - tanh_log_det(pre_tanh)


# ---------------------------------------------------------------------------------------------------
# Buffers (online only: utils.buffers.ReplayBuffer), losses and updates
# ---------------------------------------------------------------------------------------------------


def weighted_min_pair(q: torch.Tensor) -> torch.Tensor:
    """Mean over all N-choose-2 pairs of min(q_i, q_j), per sample, from one sort: [N, B] -> [B].

    After sorting ascending, q_(k) is the smaller member of exactly N - 1 - k pairs.
    """
    n = q.shape[0]
    pair_counts = torch.arange(n - 1, -1, -1, device=q.device, dtype=q.dtype)
    return (pair_counts.unsqueeze(1) * q.sort(0).values).sum(0) * (2.0 / (n * (n - 1)))


def ensemble_target(q: torch.Tensor, rule: str) -> torch.Tensor:
    """Reduce target-critic values [N, B] to one value per sample [B] (paper 3.2)."""
    n = q.shape[0]
    if rule == "min":
        return q.min(0).values
    if rule == "mean":
        return q.mean(0)
    if rule == "rem":  # one random convex combination per update, shared by the batch
        beta = torch.rand(n, 1, device=q.device)
        return (beta / beta.sum() * q).sum(0)
    if rule == "random_min_pair":  # REDQ with M = 2: two distinct members per update
        return q[torch.randperm(n, device=q.device)[:2]].min(0).values
    return weighted_min_pair(q)


def sunrise_weight(std: torch.Tensor, temperature: float) -> torch.Tensor:
    """SUNRISE: w = sigmoid(-T std) + 0.5, in [0.5, 1]; 1 where the target ensemble agrees."""
    return torch.sigmoid(-temperature * std.detach()) + 0.5


def ucb_choice(q: torch.Tensor, ucb_lambda: float) -> torch.Tensor:
    """Index of the candidate with the largest mean + lambda std over the ensemble; q is [N, M]."""
    return (q.mean(0) + ucb_lambda * q.std(0, correction=0)).argmax()


def cql_gap(critic: Critic, actor: Actor, obs, next_obs, q_data: torch.Tensor, samples: int) -> torch.Tensor:
    """CQL(H), d3rlpy's importance-sampled form: mean over critics and batch of LSE_i(s) - Q_i(s, a).

    The logsumexp runs over `samples` uniform actions, `samples` from pi(s) and `samples` from pi(s'), all
    evaluated at s, each minus its log-density.
    """
    batch, act_dim = q_data.shape[1], actor.mu.out_features
    with torch.no_grad():
        policy_actions, policy_log_prob = actor(torch.cat([obs, next_obs]).expand(samples, -1, -1))
    uniform_actions = torch.rand(samples, batch, act_dim, device=obs.device) * 2 - 1
    actions = torch.cat([uniform_actions, policy_actions], dim=1)  # [K, 3B, A]: uniform, pi(s), pi(s')
    log_density = torch.cat(
        [torch.full((samples, batch), act_dim * math.log(0.5), device=obs.device), policy_log_prob], 1
    )
    q = critic(obs.repeat(3, 1).expand(samples, -1, -1).reshape(-1, obs.shape[1]), actions.reshape(-1, act_dim))
    values = (q.view(-1, samples, 3, batch) - log_density.view(samples, 3, batch)).permute(0, 3, 1, 2)
    return values.flatten(2).logsumexp(-1).mean() - q_data.mean()


def oac_shift(grad: torch.Tensor, variance: torch.Tensor, delta: float) -> torch.Tensor:
    """OAC's mean shift sqrt(2 delta) Sigma g / ||g||_Sigma: the step of Mahalanobis length sqrt(2 delta) along g."""
    norm = (grad.pow(2) * variance).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return math.sqrt(2 * delta) * variance * grad / norm


class ENOTO:
    """Networks, optimisers and the two update rules (offline CQL-N, online SAC-N + WMP + SUNRISE)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        self.args, self.device = args, device
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic = Critic(obs_dim, act_dim, args.num_critics, args.hidden_dim).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.act_dim = act_dim
        self.actor_optimizer = adam(self.actor.parameters(), args.actor_lr, args.cudagraphs)
        self.critic_optimizer = adam(self.critic.parameters(), args.critic_lr, args.cudagraphs)
        self.alpha_optimizer = adam([self.log_alpha], args.alpha_lr, args.cudagraphs)
        self.act = torch.compile(self.actor) if args.compile else self.actor  # the acting policy
        self.cql_weight = args.cql_weight
        self.obs_mean, self.obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.obs_mean) / self.obs_std).astype(np.float32)

    def update_alpha(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """d3rlpy: loss = -alpha (log pi(a|s) - |A|); alpha falls while the entropy is above -|A|."""
        with torch.no_grad():
            _, log_prob = self.actor(obs)
        alpha_loss = -(self.log_alpha.exp() * (log_prob - self.act_dim)).mean()
        optimizer_step(self.alpha_optimizer, alpha_loss)
        return {"alpha_loss": alpha_loss.detach(), "entropy": -log_prob.mean()}

    def update_critic(self, batch, y: torch.Tensor, weight: torch.Tensor | float = 1.0) -> dict[str, torch.Tensor]:
        """TD loss summed over critics (mean over the batch, weighted), plus the critic-averaged CQL gap."""
        obs, action, _, next_obs, _, _ = batch
        q = self.critic(obs, action)
        td_loss = (weight * (q - y).pow(2)).mean(1).sum()
        q_std = q.detach().std(0, correction=0).mean()
        results = {"qf_loss": td_loss.detach(), "qf_values": q.detach().mean(), "q_std": q_std}
        critic_loss = td_loss
        if self.cql_weight > 0:
            cql_loss = self.cql_weight * cql_gap(self.critic, self.actor, obs, next_obs, q, self.args.cql_samples)
            critic_loss, results["cql_loss"] = td_loss + cql_loss, cql_loss.detach()
        optimizer_step(self.critic_optimizer, critic_loss)
        return results

    def update_actor(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """alpha log pi(a|s) - min over ALL current critics, in both phases."""
        alpha = self.log_alpha.exp().detach()
        action, log_prob = self.actor(obs)
        actor_loss = (alpha * log_prob - self.critic(obs, action).min(0).values).mean()
        optimizer_step(self.actor_optimizer, actor_loss)
        return {"actor_loss": actor_loss.detach(), "alpha": alpha}

    def offline_target(self, next_obs, reward, done) -> torch.Tensor:
        """d3rlpy CQL backup: r + gamma (1 - d) min_i Q'_i(s', tanh mu(s')), no entropy term."""
        with torch.no_grad():
            next_action, _ = self.actor(next_obs, deterministic=True)
            return reward + self.args.gamma * (1.0 - done) * self.critic_target(next_obs, next_action).min(0).values

    def online_target(self, next_obs, reward, done) -> tuple[torch.Tensor, torch.Tensor]:
        """y = r + gamma (1 - d) (rule_i Q'_i(s', a') - alpha log pi(a'|s')) and the SUNRISE weight."""
        args, alpha = self.args, self.log_alpha.exp().detach()
        with torch.no_grad():
            next_action, next_log_prob = self.actor(next_obs)
            target_q = self.critic_target(next_obs, next_action)
            if args.online_backup == "cql":  # CQL -> CQL keeps the offline backup
                y = self.offline_target(next_obs, reward, done)
            else:
                soft_value = ensemble_target(target_q, args.q_target) - alpha * next_log_prob
                y = reward + args.gamma * (1.0 - done) * soft_value
            if args.sunrise_weight == "per_sample":
                weight = sunrise_weight(target_q.std(0, correction=0), args.sunrise_temperature)
            elif args.sunrise_weight == "batch":  # official E2O: std of the batch-mean Q over N policy draws
                draws = self.actor(next_obs.expand(self.critic.num_critics, -1, -1))[0]
                q_draws = self.critic_target(next_obs.repeat(len(draws), 1), draws.flatten(0, 1))
                batch_std = q_draws.view(len(q_draws), len(draws), -1).mean(2).std(0, correction=0).mean()
                weight = sunrise_weight(batch_std, args.sunrise_temperature)
            else:
                weight = torch.ones((), device=self.device)
        return y, weight

    def offline_update(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """One CQL-N step in d3rlpy's order: temperature, critics, actor, targets."""
        obs, _, reward, next_obs, done, _ = batch
        results = self.update_alpha(obs)
        results |= self.update_critic(batch, self.offline_target(next_obs, reward, done))
        results |= self.update_actor(obs)
        soft_update(self.critic_target, self.critic, self.args.tau)
        return {f"offline/{key}": value for key, value in results.items()}

    def hand_over(self) -> None:
        """Card 2.2: everything is carried over; only the CQL term goes (unless --keep-cql-online)."""
        self.cql_weight = self.args.cql_weight if self.args.keep_cql_online else 0.0

    def online_update(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        obs, _, reward, next_obs, done, _ = batch
        results = self.update_alpha(obs)
        y, weight = self.online_target(next_obs, reward, done)
        results |= self.update_critic(batch, y, weight)
        results |= self.update_actor(obs)
        soft_update(self.critic_target, self.critic, self.args.tau)
        return {f"losses/{key}": value for key, value in results.items()} | {"charts/sunrise_weight": weight.mean()}

    def explore(self, obs: np.ndarray, head: int) -> np.ndarray:
        """The online action: a policy sample, the UCB or bootstrapped-head choice among N draws, or OAC."""
        mode, obs_t = self.args.exploration, torch.as_tensor(self.normalize(obs), device=self.device)
        if mode == "oac":
            return self.oac_action(obs_t).cpu().numpy()
        with torch.no_grad():
            if mode == "none":
                return self.act(obs_t)[0].cpu().numpy()
            candidates = self.act(obs_t.expand(self.critic.num_critics, -1))[0]
            q = self.critic(obs_t.expand(len(candidates), -1), candidates)
            choice = ucb_choice(q, self.args.ucb_lambda) if mode == "sunrise" else q[head].argmax()
            return candidates.index_select(0, choice.view(1))[0].cpu().numpy()  # a device index: no sync

    def oac_action(self, obs: torch.Tensor) -> torch.Tensor:
        """Optimistic Actor-Critic: shift the pre-tanh mean along grad of mean + beta_UB std of Q, by sqrt(2 delta)."""
        with torch.no_grad():
            mu, std = self.actor.distribution(obs)
        mu = mu.requires_grad_(True)
        q = self.critic(obs.unsqueeze(0), torch.tanh(mu).unsqueeze(0))
        upper_bound = q.mean(0) + self.args.oac_beta_ub * q.std(0, correction=0)
        grad = torch.autograd.grad(upper_bound.sum(), mu)[0]
        shift = oac_shift(grad, std.pow(2), self.args.oac_delta)
        return torch.tanh(mu.detach() + shift + std * torch.randn_like(std))

    def policy(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """Action for a raw (unnormalised) observation, or a batch of them."""
        with torch.no_grad():
            action, _ = self.act(torch.as_tensor(self.normalize(obs), device=self.device), deterministic)
        return action.cpu().numpy()

    def q_min(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            to_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)
            return self.critic(to_tensor(self.normalize(obs)), to_tensor(action)).min(0).values.cpu().numpy()

    NETWORKS = ("actor", "critic", "critic_target", "actor_optimizer", "critic_optimizer", "alpha_optimizer")

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).state_dict() for name in self.NETWORKS}
        statistics = {"obs_mean": self.obs_mean, "obs_std": self.obs_std, "num_critics": self.critic.num_critics}
        return state | statistics | {"log_alpha": self.log_alpha.detach().cpu()}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Everything the hand-over carries: networks, targets, temperature, Adam states."""
        for name in self.NETWORKS:
            getattr(self, name).load_state_dict(checkpoint[name])
        for name in ("actor", "critic", "alpha"):  # the Adam states continue, at the learning rates of the flags
            for group in getattr(self, f"{name}_optimizer").param_groups:
                group["lr"] = getattr(self.args, f"{name}_lr")
        with torch.no_grad():
            self.log_alpha.copy_(checkpoint["log_alpha"])
        self.obs_mean, self.obs_std = checkpoint["obs_mean"], checkpoint["obs_std"]


def training_reward(reward: np.ndarray, task: str) -> np.ndarray:
    """AntMaze trains on (r - 0.5) * 4 (the official fork's CQL setting); other tasks on r."""
    return (reward - 0.5) * 4.0 if task == "antmaze" else reward


# ---------------------------------------------------------------------------------------------------
# Logging, checkpoints, evaluation
# ---------------------------------------------------------------------------------------------------


def policy_from_checkpoint(checkpoint: dict):
    """The deterministic actor of a checkpoint as raw obs -> action (used by utils.make_dataset)."""
    args = Args(**{**checkpoint["args"], "pretrained": None, "resume": None, "compile": False, "cudagraphs": False})
    agent = ENOTO(checkpoint["obs_dim"], checkpoint["act_dim"], args, torch.device("cpu"))
    agent.load_state_dict(checkpoint)
    return lambda obs: agent.policy(obs, deterministic=True)


def log_evaluation(writer, agent: ENOTO, env, args: Args, data: OfflineData, prefix: str, step: int, seed: int):
    trained_reward = lambda reward: training_reward(reward, data.task)
    q = {"q_function": agent.q_min, "gamma": args.gamma, "q_reward_fn": trained_reward} if prefix == "eval" else {}
    policy = lambda obs: agent.policy(obs, deterministic=True)
    result = evaluate(env, policy, args.eval_episodes, seed, minari_ref_scores=data.minari_ref_scores, **q)
    return write_scores(writer, result, prefix, step)


# ---------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------


def offline_step(agent: ENOTO, dataset: ReplayBuffer, args: Args) -> dict[str, torch.Tensor]:
    """One CQL-N update on a uniform minibatch of the dataset."""
    return agent.offline_update(dataset.split(dataset.sample_rows(args.batch_size)))


def offline_phase(
    agent: ENOTO, data: OfflineData, dataset: ReplayBuffer, eval_env, writer, args: Args, save=None, resume=None
):
    """CQL-N updates from step 1, or from the step after `resume`'s; `save` writes checkpoint.pt."""
    update = FastUpdate(partial(offline_step, agent, dataset, args), args.compile, args.cudagraphs)
    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "offline", step, args.seed + 100)
    offline_loop(args, writer, lambda step: update(), evaluate, save, resume)


def replay_update(agent: ENOTO, online: ReplayBuffer, args: Args) -> dict[str, torch.Tensor]:
    """One online update on a uniform minibatch of the online buffer."""
    return agent.online_update(online.split(online.sample_rows(args.batch_size)))


def online_phase(
    agent: ENOTO, data: OfflineData, env, eval_env, writer, args: Args, save=None, resume=None
) -> ReplayBuffer:
    """Fresh online buffer, no offline data (card 2.2); one update per step after the warm-up; the acting head
    (Bootstrapped DQN) drawn anew for each episode. With `resume` it continues after the checkpoint's step
    (utils.run.online_loop)."""
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    online = ReplayBuffer(min(args.online_buffer_size, args.online_steps), obs_dim, act_dim, agent.device)
    if resume is not None:
        online.load_state_dict(resume["online"])
    head = random.randrange(agent.critic.num_critics) if resume is None else resume["head"]
    update = FastUpdate(partial(replay_update, agent, online, args), args.compile, args.cudagraphs)

    def store(step: int, obs, action, reward, next_obs, terminated, ended) -> None:
        nonlocal head
        states = agent.normalize(np.stack([obs, next_obs]))
        trained_reward = training_reward(np.array([reward]), data.task)
        row = transition_rows(states[:1], action[None], trained_reward, states[1:], np.array([terminated]), True)
        online.add(torch.from_numpy(row).to(agent.device))
        if ended:
            head = random.randrange(agent.critic.num_critics)

    def train(step: int, metrics: Metrics) -> int:
        if step <= args.warmup_steps or online.size < args.batch_size:
            return 0
        metrics.add(update())
        return 1

    act = lambda step, obs: agent.explore(obs, head)
    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "eval", step, args.seed + 100)
    state = lambda: {"online": online.state_dict(), "head": head}
    online_loop(args, writer, env, agent.device, act, store, train, evaluate, state, save, resume)
    return online


def check_args(args: Args) -> None:
    """Refuse settings the phases cannot run with, naming the flag to change."""
    positive = ("num_critics", "hidden_dim", "cql_samples", "eval_freq", "offline_eval_freq", "batch_size")
    check_bounds(args, positive, ("offline_steps", "online_steps", "warmup_steps"))
    if args.online_steps and args.online_steps <= args.warmup_steps:
        raise UserError(f"--online-steps {args.online_steps} leaves nothing after the warm-up; lower --warmup-steps")
    if args.q_target in ("weighted_min_pair", "random_min_pair") and args.num_critics < 2:
        raise UserError(f"--q-target {args.q_target} needs --num-critics >= 2")


def main(args: Args) -> Path:
    run = Run(args, "enoto", "an ENOTO")
    apply_preset(args, PRESETS)
    checkpoint = run.pretrained(needs_statistics=True)
    if checkpoint is not None:  # the networks come from the offline run (official code re-reads its params)
        run.adopt({"num_critics": checkpoint["num_critics"], "hidden_dim": checkpoint["args"]["hidden_dim"]})
        args.normalize_states = checkpoint["args"]["normalize_states"]  # the inputs its networks were trained on
    check_args(args)
    data = load_dataset(args.env_id)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    writer, env, eval_env = run.open(data, checkpoint)
    agent, resume = ENOTO(obs_dim, act_dim, args, run.device), run.resume
    if resume is None and checkpoint is None and args.normalize_states:  # else load_state_dict brings them
        agent.obs_mean, agent.obs_std = data.observations.mean(0), data.observations.std(0) + 1e-3

    save = run.saver(agent)
    resumed_online = resume is not None and resume["phase"] == "online"
    if resume is not None:  # after the hand-over's changes, so the saved online optimiser states replace them
        if resumed_online:
            agent.hand_over()
        agent.load_state_dict(resume)
        run.restore_rng()
    if checkpoint is not None:
        agent.load_state_dict(checkpoint)
    elif args.offline_steps > 0 and not resumed_online:
        columns = (agent.normalize(data.observations), data.actions, training_reward(data.rewards, data.task))
        rows = transition_rows(*columns, agent.normalize(data.next_observations), data.terminals, False)
        dataset = ReplayBuffer.of(rows, obs_dim, act_dim, run.device)
        del rows
        offline_phase(agent, data, dataset, eval_env, writer, args, save, resume)
        del dataset  # the online phase does not use the offline data
        if args.save_model:
            run.write("offline.pt", agent, "offline", args.offline_steps)
    if args.online_steps > 0:
        agent.hand_over()  # only drops the CQL term: the same after a resumed hand-over
        online_phase(agent, data, env, eval_env, writer, args, save, resume if resumed_online else None)
    return run.finish(agent, args.online_steps)


if __name__ == "__main__":
    cli(main, Args)
