"""OPT: Online Pre-Training for Offline-to-Online Reinforcement Learning.

Shin, Kim, Jung, Hong, Yoon, Jang, Kim, Chae, Sung, Lee, Lim, ICML 2025, arXiv 2507.08387. Three phases:
(i) offline TD3+BC (MuJoCo) or SPOT (AntMaze, Adroit) gives an actor and twin critics Q_off; (ii) Online
Pre-Training: the frozen offline actor collects N_tau = 25k online steps, then a NEW twin critic Q_on is
trained for N_pretrain = 50k updates with the meta-adaptation loss of Eq. 3,
    L_off(psi) + c * L_on(psi - alpha_in * grad L_off(psi)),
on offline and online minibatches, while nothing else changes; (iii) fine-tuning: TD3 (or SPOT) updates of
both critics on balanced replay (Off2On's density-ratio priorities), the actor maximising Eq. 4,
(1 - kappa) Q1_off + kappa Q1_on, with kappa raised linearly. The online budget (300k) includes N_tau.
The official code (LGAI-Research/opt) was not available. The decisions that change results:
- Eq. 3 is second order (torch.func), c = stopgrad(min(L_off, L_on) / L_on) (an unofficial re-implementation's
  weight; unverified); Q_on's own targets and the frozen actor target make y.
- kappa per dataset (App. H, T15): random 1 -> 1, replay-type 0.1 -> 0.9, other MuJoCo 0.3 -> 0.9 over 150k.
- New rows of the balanced replay start at a running-max priority where the N_tau rows hold a share f = 0.75 of
  the mass (Off2On's rule; the card's "current max priority" from 1 left batches ~97% offline).
Not done: the RLPD and IQL backbones, the PT-Bon ablation, the final 100-episode AntMaze evaluation. Ablations:
--no-new-critic, --no-online-pretraining, --meta-first-order, --meta-weight none, --replay uniform|online_only;
the paper's TD3 baseline: --no-new-critic --no-online-pretraining --n-tau 0 --replay uniform.
Every decision and deviation, the logged tags and the results on our data: docs/opt.md.

Usage: python algorithms/opt.py --env-id hopper-medium
"""

from __future__ import annotations

import copy
import itertools
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
from utils.buffers import BlockPriorityReplay, ReplayBuffer, transition_rows
from utils.evaluation import write_scores
from utils.fast import FastUpdate
from utils.metrics import Metrics
from utils.optim import adam, optimizer_step, soft_update
from utils.run import Run, RunArgs, check_bounds, cli, offline_loop, online_loop, update_loop


@dataclass
class Args(RunArgs):
    # experiment
    exp_name: str = "opt"
    """name of the experiment, part of the run name"""
    # budgets
    offline_steps: int = 1_000_000
    """backbone gradient steps (paper 4.1); 0 = no pretraining"""
    online_steps: int = 300_000
    """online environment steps in total, the N_tau window included (paper 4.1, App. A.3)"""
    n_tau: int = 25_000
    """N_tau: env steps the frozen offline actor collects before Online Pre-Training (paper 5.5)"""
    n_pretrain: int = 50_000
    """N_pretrain: meta-adaptation updates of Q_on, no env steps (paper 5.5)"""
    vae_steps: int = 100_000
    """SPOT's VAE gradient steps, before the backbone (CORL)"""
    batch_size: int = 256
    """minibatch size; Online Pre-Training draws this many offline AND this many online rows"""
    # algorithm
    backbone: Literal["auto", "td3bc", "spot"] = "auto"
    """offline algorithm; auto = TD3+BC for MuJoCo, SPOT for AntMaze and Adroit (paper 4.1)"""
    hidden_dim: int = 256
    """width of the two hidden layers of actor, critics and density network"""
    layer_norm: bool | None = None
    """LayerNorm after each hidden ReLU of actor and critics; None = on for Adroit only (App. H)"""
    gamma: float = 0.99
    """discount of the offline phase"""
    online_gamma: float | None = None
    """discount from the N_tau window on; None = 0.995 for SPOT on AntMaze, otherwise --gamma (CORL)"""
    tau: float = 0.005
    """target soft-update rate"""
    policy_noise: float = 0.2
    """std of the target-policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target-policy smoothing noise"""
    policy_freq: int = 2
    """actor and target updates every this many critic updates (also Q_on targets in pre-training)"""
    exploration_noise: float = 0.1
    """std of the Gaussian exploration noise online"""
    ntau_noise: bool = True
    """explore with that noise in the N_tau window too (card D3); off = the deterministic offline actor"""
    actor_lr: float | None = None
    """None = 3e-4 for TD3+BC, 1e-4 for SPOT"""
    critic_lr: float = 3e-4
    """learning rate of Q_off and Q_on"""
    normalize_states: bool | None = None
    """None = on for TD3+BC, off for SPOT (card D1)"""
    td3bc_alpha: float = 2.5
    """TD3+BC: lambda = alpha / mean|Q|"""
    spot_lambda: float | None = None
    """SPOT's density weight; None = by task (CORL configs)"""
    spot_lambda_end: float | None = None
    """online floor of lambda's cooling; None = 0.2 AntMaze, 0.5 otherwise"""
    spot_cool_steps: int = 300_000
    """fine-tuning updates over which lambda cools (card D7)"""
    new_critic: bool = True
    """train the new critic Q_on; --no-new-critic applies Eq. 3 to Q_off and keeps one critic (ablation)"""
    online_pretraining: bool = True
    """Eq. 3 pre-training of Q_on; off = Q_on starts from a random init (ablation RandInit)"""
    meta_inner_lr: float = 3e-4
    """alpha_in of Eq. 3's inner SGD step (0 = the Eq. 10 ablation)"""
    meta_first_order: bool = False
    """drop the Hessian term of Eq. 3 (first-order MAML)"""
    meta_weight: Literal["min_ratio", "none"] = "min_ratio"
    """online-term weight c: min(L_off, L_on) / L_on (detached), or 1"""
    updates_per_step: int | None = None
    """fine-tuning updates per env step (UTD); None = 5 for TD3+BC, 1 for SPOT (paper 4.1)"""
    kappa_start: float | None = None
    """kappa at the first fine-tuning step; None = the card's table for the dataset"""
    kappa_end: float | None = None
    """kappa after --kappa-steps; None = the card's table"""
    kappa_steps: int | None = None
    """fine-tuning env steps of the linear kappa ramp; None = the card's table"""
    replay: Literal["balanced", "uniform", "online_only"] = "balanced"
    """fine-tuning batches: density-ratio priorities, uniform over all rows, or online rows only (ablation OR)"""
    priority_temperature: float = 5.0
    """T: priorities follow w^(1/T) (Off2On)"""
    init_online_fraction: float = 0.75
    """f: share of the priority mass the N_tau rows hold when fine-tuning starts (Off2On's init and default)"""
    # evaluation
    eval_freq: int = 5_000
    """online evaluation every this many environment steps (and at step 0)"""
    offline_eval_freq: int = 10_000
    """offline evaluation every this many gradient steps (and at the end)"""


ADROIT = ("pen", "door", "hammer", "relocate")
SPOT_LAMBDA = {"umaze": 0.25, "medium-play": 0.05, "medium-diverse": 0.025, "large": 0.025}  # CORL configs


def task_defaults(name: str, task: str | None) -> dict:
    """The card's per-dataset settings (App. H T15, CORL configs) for a dataset name and task."""
    name = name.lower()
    if task == "antmaze":
        maze_lambda = next((value for key, value in SPOT_LAMBDA.items() if key in name), 0.025)
        kappa = (0.1, 0.9, 200_000 if "large-diverse" in name else 100_000)
        return {"backbone": "spot", "kappa": kappa, "spot_lambda": maze_lambda, "spot_lambda_end": 0.2}
    if task in ADROIT:
        return {"backbone": "spot", "kappa": (0.1, 0.9, 250_000), "spot_lambda": 1.0, "spot_lambda_end": 0.5}
    kappa = (1.0, 1.0, 0) if "random" in name else (0.1, 0.9, 150_000) if "replay" in name else (0.3, 0.9, 150_000)
    return {"backbone": "td3bc", "kappa": kappa, "spot_lambda": 1.0, "spot_lambda_end": 0.5}


def resolve_args(args: Args, name: str, task: str | None) -> None:
    """Fill every `None` / auto setting from the dataset and backbone, so args.json holds what ran."""
    defaults = task_defaults(name, task)
    args.backbone = defaults["backbone"] if args.backbone == "auto" else args.backbone
    spot = args.backbone == "spot"
    for field, value in zip(("kappa_start", "kappa_end", "kappa_steps"), defaults["kappa"], strict=True):
        setattr(args, field, value if getattr(args, field) is None else getattr(args, field))
    fallbacks = {key: defaults[key] for key in ("spot_lambda", "spot_lambda_end")} | {"layer_norm": task in ADROIT}
    fallbacks |= {"online_gamma": 0.995 if spot and task == "antmaze" else args.gamma, "normalize_states": not spot}
    fallbacks |= {"actor_lr": 1e-4 if spot else 3e-4, "updates_per_step": 1 if spot else 5}
    for field, value in fallbacks.items():
        if getattr(args, field) is None:
            setattr(args, field, value)


def kappa_at(t: int, start: float, end: float, steps: int) -> float:
    """Eq. 4's kappa after t fine-tuning env steps: linear from start to end over `steps`, then end."""
    return end if t >= steps else start + (end - start) * t / steps


def training_reward(reward, task: str | None):
    """AntMaze trains on r - 1 (CORL SPOT); scores always use the env's reward."""
    return reward - 1.0 if task == "antmaze" else reward


# ---------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """E independent linear layers as one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features))
        bound = 1 / in_features**0.5  # nn.Linear's default init, as TD3 and TD3+BC
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleLayerNorm(nn.Module):
    """LayerNorm over features with each member's own gain and bias."""

    def __init__(self, features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ensemble_size, 1, features))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:]), self.weight)


def mlp(sizes: tuple[int, ...], ensemble_size: int, layer_norm: bool = False, last_init: float | None = None):
    """Ensemble MLP, ReLU (then LayerNorm if asked) after each hidden layer; last layer U(+-last_init) if given."""
    layers = []
    for n_in, n_out in itertools.pairwise(sizes[:-1]):
        layers += [EnsembleLinear(n_in, n_out, ensemble_size), nn.ReLU()]
        layers += [EnsembleLayerNorm(n_out, ensemble_size)] if layer_norm else []
    last = EnsembleLinear(sizes[-2], sizes[-1], ensemble_size)
    if last_init is not None:
        nn.init.uniform_(last.weight, -last_init, last_init)
        nn.init.uniform_(last.bias, -last_init, last_init)
    return nn.Sequential(*layers, last)


class Critic(nn.Module):
    """Twin Q-functions (s, a) -> 256 -> 256 -> 1 as one 2-member ensemble: Q of shape [2, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layer_norm: bool, last_init: float | None):
        super().__init__()
        self.net = mlp((obs_dim + act_dim, hidden, hidden, 1), 2, layer_norm, last_init)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], -1).unsqueeze(0).expand(2, -1, -1)).squeeze(-1)


class Actor(nn.Module):
    """Deterministic policy obs -> 256 -> 256 -> tanh (max action 1 on every task)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layer_norm: bool, last_init: float | None):
        super().__init__()
        self.net = mlp((obs_dim, hidden, hidden, act_dim), 1, layer_norm, last_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs.unsqueeze(0))[0])


class VAE(nn.Module):
    """SPOT's behaviour density: encoder (s, a) -> 750 -> 750 -> (mean, log std), decoder (s, z) -> 750 -> 750 -> a."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 750, kl_weight: float = 0.5):
        super().__init__()
        self.latent_dim, self.kl_weight = 2 * act_dim, kl_weight
        self.encoder = mlp((obs_dim + act_dim, hidden, hidden, 2 * self.latent_dim), 1)
        self.decoder = mlp((obs_dim + self.latent_dim, hidden, hidden, act_dim), 1)

    def neg_elbo(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """-ELBO per sample with one latent draw: mean squared reconstruction + kl_weight * mean KL, [B]."""
        mean, log_std = self.encoder(torch.cat([obs, action], -1).unsqueeze(0))[0].chunk(2, -1)
        log_std = log_std.clamp(-4.0, 15.0)
        z = mean + log_std.exp() * torch.randn_like(mean)
        reconstruction = torch.tanh(self.decoder(torch.cat([obs, z], -1).unsqueeze(0))[0])
        kl = -0.5 * (1 + 2 * log_std - mean.pow(2) - (2 * log_std).exp()).mean(-1)
        return (reconstruction - action).pow(2).mean(-1) + self.kl_weight * kl


class DensityNet(nn.Module):
    """w(s, a) >= 0 estimating d_on / d_off: (s, a) -> 256 -> 256 -> 1 -> ReLU, starting at w = 1."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = mlp((obs_dim + act_dim, hidden, hidden, 1), 1, last_init=3e-3)
        nn.init.constant_(self.net[-1].bias, 1.0)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net(torch.cat([obs, action], dim=-1).unsqueeze(0))).view(-1)


# ---------------------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------------------


class BalancedReplay(BlockPriorityReplay):
    """B_off then B_on in one buffer = B_BR (utils.buffers.BlockPriorityReplay), sized for the whole online budget,
    so no offline row is ever overwritten (card D8). The running-max priority starts where the N_tau rows hold a
    share f of the mass (Off2On's rule for its first block); B_off and B_on minibatches are uniform."""

    def __init__(self, dataset_rows: torch.Tensor, online_steps: int, args: Args, obs_dim: int, act_dim: int):
        f = args.init_online_fraction
        initial = len(dataset_rows) * f / ((1 - f) * max(args.n_tau, 1))
        super().__init__(dataset_rows, online_steps, obs_dim, act_dim, initial)


# ---------------------------------------------------------------------------------------------------
# Losses and updates
# ---------------------------------------------------------------------------------------------------


def twin_td_loss(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_TD of a twin pair (Eq. 2): MSE(Q1, y) + MSE(Q2, y); q is [2, B]."""
    return (q - y).pow(2).mean(1).sum()


def td3bc_actor_loss(q1: torch.Tensor, policy_action: torch.Tensor, action: torch.Tensor, alpha: float):
    """Eq. 1: -lambda mean Q1(s, pi(s)) + mean (pi(s) - a)^2, lambda = alpha / mean|Q1| held constant."""
    lmbda = alpha / q1.abs().mean().detach()
    return -lmbda * q1.mean() + (policy_action - action).pow(2).mean()


def spot_actor_loss(q: torch.Tensor, neg_log_beta: torch.Tensor, lmbda: float) -> torch.Tensor:
    """SPOT: -Q / mean|Q| (held constant) + lambda * the VAE's -ELBO of the policy action."""
    return -q.mean() / q.abs().mean().detach() + lmbda * neg_log_beta.mean()


@torch.compiler.disable  # a double backward (second order), which AOTAutograd cannot compile: eager
def meta_objective(critic: nn.Module, offline, online, inner_lr: float, first_order: bool, weight: str):
    """Eq. 3: L_off(psi) + c * L_on(psi'), psi' = psi - inner_lr * grad L_off(psi), one functional SGD step.

    offline, online: (obs, action, y) with fixed targets. Second order: the inner gradient stays in the
    graph, so backward gives grad L_off + c (I - inner_lr H_off) grad L_on(psi'); first order drops H_off.
    Returns (objective, L_off, L_on, c); only the objective carries gradients to the critic's parameters.
    """
    params = dict(critic.named_parameters())

    def td_loss(p, obs, action, y):
        return twin_td_loss(torch.func.functional_call(critic, p, (obs, action)), y)

    offline_loss = td_loss(params, *offline)
    grads = torch.autograd.grad(offline_loss, list(params.values()), retain_graph=True, create_graph=not first_order)
    adapted = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
    online_loss = td_loss(adapted, *online)
    if weight == "min_ratio":
        # min(L_off, L_on) / L_on, written so that it is exactly 1 when L_on <= L_off (no epsilon needed)
        c = torch.where(online_loss > offline_loss, offline_loss / online_loss, 1.0).detach()
    else:
        c = torch.ones((), device=online_loss.device)
    return offline_loss + c * online_loss, offline_loss.detach(), online_loss.detach(), c


def density_loss(w_online: torch.Tensor, w_offline: torch.Tensor) -> torch.Tensor:
    """Off2On Eq. 4 with the Jensen-Shannon f: minimised at w = d_on / d_off; 0 at w = 1."""
    offline_term = -torch.log(2 / (w_offline + 1) + 1e-10).mean()
    return offline_term - torch.log(2 * w_online / (w_online + 1) + 1e-10).mean()


def priorities(w: torch.Tensor, w_offline: torch.Tensor, temperature: float) -> torch.Tensor:
    """w^(1/T), self-normalised by the offline minibatch's mean of w^(1/T), clamped to [1e-3, 1e3]."""
    scaled = w.pow(1 / temperature)
    return (scaled / (w_offline.pow(1 / temperature).mean() + 1e-10)).clamp(1e-3, 1e3)


class OPT:
    """Actor, Q_off, Q_on, (VAE, density network), their optimisers, and the update rule of each phase."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        self.args, self.device, self.obs_dim, self.act_dim = args, device, obs_dim, act_dim
        spot = args.backbone == "spot"
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim, args.layer_norm, 1e-3 if spot else None).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.act = torch.compile(self.actor) if args.compile else self.actor  # the acting policy
        self.q_off = self.new_critic()
        self.q_off_target = copy.deepcopy(self.q_off).requires_grad_(False)
        self.actor_optimizer = adam(self.actor.parameters(), args.actor_lr, args.cudagraphs)
        self.q_off_optimizer = adam(self.q_off.parameters(), args.critic_lr, args.cudagraphs)
        self.vae = VAE(obs_dim, act_dim).to(device) if spot else None
        self.vae_optimizer = adam(self.vae.parameters(), 1e-3, self.args.cudagraphs) if spot else None
        self.q_on = self.q_on_target = self.q_on_optimizer = None
        self.density = self.density_optimizer = None
        self.obs_mean, self.obs_std = np.zeros(obs_dim), np.ones(obs_dim)
        self.gamma = args.gamma
        # The phases count the updates (the steps they take are functions of device state): policy_freq and
        # SPOT's lambda follow them. Eq. 4's kappa and that lambda reach the update as device tensors.
        self.offline_updates = self.pretrain_updates = self.finetune_updates = 0
        self.kappa = torch.zeros((), device=device)
        self.lmbda = torch.zeros((), device=device)

    def new_critic(self) -> Critic:
        """A twin critic as the backbone builds it (Q_on: same architecture and init as Q_off)."""
        args = self.args
        last_init = 3e-3 if args.backbone == "spot" else None
        return Critic(self.obs_dim, self.act_dim, args.hidden_dim, args.layer_norm, last_init).to(self.device)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.obs_mean) / self.obs_std).astype(np.float32)

    def td_target(self, critic_target: Critic, reward, next_obs, done, next_action=None) -> torch.Tensor:
        """y = r + gamma (1 - d) min_j Qbar_j(s', a'), a' = pi_target(s') + clipped noise (TD3)."""
        if next_action is None:
            next_action = self.target_action(next_obs)
        return reward + self.gamma * (1.0 - done) * critic_target(next_obs, next_action).min(0).values

    def target_action(self, next_obs: torch.Tensor) -> torch.Tensor:
        args = self.args
        noise = torch.randn(len(next_obs), self.act_dim, device=next_obs.device) * args.policy_noise
        noise = noise.clamp(-args.noise_clip, args.noise_clip)
        return (self.actor_target(next_obs) + noise).clamp(-1.0, 1.0)

    def spot_lambda(self, update: int) -> float:
        """SPOT's lambda in fine-tuning update `update`, cooled: lambda * max(lambda_end, 1 - n / N_cool)."""
        args = self.args
        return args.spot_lambda * max(args.spot_lambda_end, 1.0 - update / args.spot_cool_steps)

    def set_schedule(self, kappa: float) -> None:
        """kappa and SPOT's lambda of the next fine-tuning update, written in place (no value baked into a graph)."""
        self.kappa.fill_(kappa)
        self.lmbda.fill_(self.spot_lambda(self.finetune_updates + 1))

    def vae_update(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        loss = self.vae.neg_elbo(obs, action).mean()
        optimizer_step(self.vae_optimizer, loss)
        return loss.detach()

    def offline_update(self, batch, actor_step: bool) -> dict[str, torch.Tensor]:
        """One TD3+BC (or SPOT) step: the critic every step; the actor and all targets when `actor_step`
        (every `policy_freq`-th update, counted by the phase)."""
        args = self.args
        obs, action, reward, next_obs, done, _ = batch
        with torch.no_grad():
            y = self.td_target(self.q_off_target, reward, next_obs, done)
        q = self.q_off(obs, action)
        qf_loss = twin_td_loss(q, y)
        optimizer_step(self.q_off_optimizer, qf_loss)
        results = {"offline/qf_loss": qf_loss.detach(), "offline/qf_values": q.mean().detach()}
        if actor_step:
            policy_action = self.actor(obs)
            q1 = self.q_off(obs, policy_action)[0]
            if args.backbone == "td3bc":
                actor_loss = td3bc_actor_loss(q1, policy_action, action, args.td3bc_alpha)
                results["offline/bc_loss"] = (policy_action - action).pow(2).mean().detach()
            else:
                actor_loss = spot_actor_loss(q1, self.vae.neg_elbo(obs, policy_action), args.spot_lambda)
            optimizer_step(self.actor_optimizer, actor_loss)
            soft_update(self.q_off_target, self.q_off, args.tau)
            soft_update(self.actor_target, self.actor, args.tau)
            results["offline/actor_loss"] = actor_loss.detach()
        return results

    def hand_over(self) -> None:
        """Before the N_tau window: SPOT resets actor and Q_off Adam (CORL); the online discount applies."""
        args = self.args
        if args.backbone == "spot":
            self.actor_optimizer = adam(self.actor.parameters(), args.actor_lr, args.cudagraphs)
            self.q_off_optimizer = adam(self.q_off.parameters(), args.critic_lr, args.cudagraphs)
        self.gamma = args.online_gamma

    def start_online_critic(self) -> None:
        """Q_on freshly initialised, its targets a copy, its own Adam (kept into fine-tuning)."""
        self.q_on = self.new_critic()
        self.q_on_target = copy.deepcopy(self.q_on).requires_grad_(False)
        self.q_on_optimizer = adam(self.q_on.parameters(), self.args.critic_lr, self.args.cudagraphs)

    def meta_critic(self) -> tuple[Critic, Critic, torch.optim.Adam]:
        """The critic Online Pre-Training trains: Q_on, or Q_off in the no-new-critic ablation."""
        if self.args.new_critic:
            return self.q_on, self.q_on_target, self.q_on_optimizer
        return self.q_off, self.q_off_target, self.q_off_optimizer

    def pretrain_update(self, offline_batch, online_batch, target_step: bool) -> dict[str, torch.Tensor]:
        """One Eq. 3 step of the meta critic; targets from its own target nets and the frozen actor target,
        which move when `target_step` (every `policy_freq`-th update)."""
        args = self.args
        critic, critic_target, optimizer = self.meta_critic()
        with torch.no_grad():
            y_offline = self.td_target(critic_target, *offline_batch[2:5])
            y_online = self.td_target(critic_target, *online_batch[2:5])
        offline, online = (*offline_batch[:2], y_offline), (*online_batch[:2], y_online)
        objective, offline_loss, online_loss, c = meta_objective(
            critic, offline, online, args.meta_inner_lr, args.meta_first_order, args.meta_weight
        )
        optimizer_step(optimizer, objective)
        if target_step:
            soft_update(critic_target, critic, args.tau)
        return {"pretrain/offline_loss": offline_loss, "pretrain/online_loss": online_loss, "pretrain/meta_weight": c}

    def start_finetuning(self) -> None:
        """A random Q_on where Online Pre-Training did not make one; a fresh density network for balanced replay."""
        if self.args.new_critic and self.q_on is None:
            self.start_online_critic()
        if self.args.replay == "balanced":
            self.start_density()

    def start_density(self) -> None:
        self.density = DensityNet(self.obs_dim, self.act_dim, self.args.hidden_dim).to(self.device)
        self.density_optimizer = adam(self.density.parameters(), 3e-4, self.args.cudagraphs)

    def actor_loss(self, obs: torch.Tensor) -> torch.Tensor:
        """Eq. 4 on Q1 of each pair: Q_k = (1 - kappa) Q1_off + kappa Q1_on (Q1_off alone without Q_on)."""
        policy_action, kappa = self.actor(obs), self.kappa
        q = self.q_off(obs, policy_action)[0]
        if self.q_on is not None:
            q = (1.0 - kappa) * q + kappa * self.q_on(obs, policy_action)[0]
        if self.args.backbone == "td3bc":
            return -q.mean()  # plain TD3 online, no BC term (paper 4.1)
        return spot_actor_loss(q, self.vae.neg_elbo(obs, policy_action), self.lmbda)

    def finetune_update(self, batch, actor_step: bool, online_batch=None, offline_batch=None):
        """TD steps of Q_off and Q_on on the batch, the density step when its minibatches are given, and, when
        `actor_step` (every `policy_freq`-th update), the Eq. 4 actor step (kappa and lambda from set_schedule)
        with all target updates. Returns metrics and new priorities."""
        args = self.args
        obs, action, reward, next_obs, done, _ = batch
        results, new_priorities = {}, None
        with torch.no_grad():
            next_action = self.target_action(next_obs)  # one a' for both pairs, both from the actor target
        pairs = [("qf", self.q_off, self.q_off_target, self.q_off_optimizer)]
        pairs += [("qf_on", self.q_on, self.q_on_target, self.q_on_optimizer)] if self.q_on is not None else []
        for name, critic, critic_target, optimizer in pairs:
            with torch.no_grad():
                y = self.td_target(critic_target, reward, next_obs, done, next_action)
            q = critic(obs, action)
            loss = twin_td_loss(q, y)
            optimizer_step(optimizer, loss)
            results |= {f"losses/{name}_loss": loss.detach(), f"losses/{name}_values": q.mean().detach()}
        if online_batch is not None:
            w_online = self.density(online_batch[0], online_batch[1])
            w_offline = self.density(offline_batch[0], offline_batch[1])
            with torch.no_grad():  # the pre-update density network scores the batch
                new_priorities = priorities(self.density(obs, action), w_offline, args.priority_temperature)
            loss_w = density_loss(w_online, w_offline)
            optimizer_step(self.density_optimizer, loss_w)
            density = {"losses/density_loss": loss_w, "charts/density_online": w_online.mean()}
            results |= {key: value.detach() for key, value in density.items()}
            results["charts/density_offline"] = w_offline.mean().detach()
        if actor_step:
            actor_loss = self.actor_loss(obs)
            optimizer_step(self.actor_optimizer, actor_loss)
            for _, critic, critic_target, _ in pairs:
                soft_update(critic_target, critic, args.tau)
            soft_update(self.actor_target, self.actor, args.tau)
            results["losses/actor_loss"] = actor_loss.detach()
        return results, new_priorities

    def policy(self, obs: np.ndarray, noise: float) -> np.ndarray:
        """Action for a raw (unnormalised) observation: pi(s) + N(0, noise^2), clipped to [-1, 1]."""
        with torch.no_grad():
            obs_t = torch.as_tensor(self.normalize(obs), device=self.device)
            action = self.act(obs_t.view(-1, obs_t.shape[-1])).view(*obs.shape[:-1], -1)  # one obs or a batch
            action = (action + noise * torch.randn_like(action)).clamp(-1.0, 1.0) if noise > 0 else action
        return action.cpu().numpy()

    def q_min(self, critic: Critic, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            obs_t = torch.as_tensor(self.normalize(obs), device=self.device)
            action_t = torch.as_tensor(action, dtype=torch.float32, device=self.device)
            return critic(obs_t, action_t).min(0).values.cpu().numpy()

    def networks(self) -> dict[str, nn.Module | torch.optim.Optimizer]:
        names = ["actor", "actor_target", "q_off", "q_off_target", "actor_optimizer", "q_off_optimizer"]
        names += ["vae", "vae_optimizer", "q_on", "q_on_target", "q_on_optimizer", "density", "density_optimizer"]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def state_dict(self) -> dict:
        state = {name: module.state_dict() for name, module in self.networks().items()}
        updates = (self.offline_updates, self.pretrain_updates, self.finetune_updates)
        return state | {"obs_mean": self.obs_mean, "obs_std": self.obs_std, "updates": updates}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Loads what the checkpoint holds (offline.pt: the backbone; final.pt and checkpoint.pt: Q_on and the
        density too, and the update counters that drive policy_freq and SPOT's lambda)."""
        if "q_on" in checkpoint and self.q_on is None:
            self.start_online_critic()
        if "density" in checkpoint and self.density is None:
            self.start_density()
        for name, module in self.networks().items():
            module.load_state_dict(checkpoint[name])
        self.obs_mean, self.obs_std = checkpoint["obs_mean"], checkpoint["obs_std"]
        counters = checkpoint.get("updates", (0, 0, 0))  # offline.pt of earlier versions has none
        self.offline_updates, self.pretrain_updates, self.finetune_updates = counters


# ---------------------------------------------------------------------------------------------------
# Logging, checkpoints, evaluation
# ---------------------------------------------------------------------------------------------------


def policy_from_checkpoint(checkpoint: dict):
    """The deterministic actor of a checkpoint as raw obs -> action (used by utils.make_dataset)."""
    args = Args(**{**checkpoint["args"], "pretrained": None, "resume": None, "compile": False, "cudagraphs": False})
    agent = OPT(checkpoint["obs_dim"], checkpoint["act_dim"], args, torch.device("cpu"))
    agent.load_state_dict(checkpoint)
    return lambda obs: agent.policy(obs, noise=0.0)


def log_evaluation(writer, agent: OPT, env, args: Args, data: OfflineData, prefix: str, step: int, seed: int):
    q = {}
    if prefix == "eval":  # Q_off's twin minimum; Q_on's beside it as q_bias_on / q_rank_tau_on
        q = {"q_function": lambda obs, action: agent.q_min(agent.q_off, obs, action), "gamma": agent.gamma}
        q["q_reward_fn"] = lambda reward: training_reward(reward, data.task)
        if agent.q_on is not None:
            q["extra_q_functions"] = {"on": lambda obs, action: agent.q_min(agent.q_on, obs, action)}
    policy = lambda obs: agent.policy(obs, noise=0.0)
    result = evaluate(env, policy, args.eval_episodes, seed, minari_ref_scores=data.minari_ref_scores, **q)
    return write_scores(writer, result, prefix, step)


# ---------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------


def prepare_data(agent: OPT, data: OfflineData, fit_statistics: bool) -> np.ndarray:
    """The dataset as buffer rows in the training scale; `fit_statistics` first takes the state mean and std
    from it (TD3+BC; a loaded checkpoint brings the statistics its networks were trained with)."""
    if fit_statistics:
        agent.obs_mean, agent.obs_std = data.observations.mean(0), data.observations.std(0) + 1e-3
    reward = training_reward(data.rewards, data.task)
    columns = (agent.normalize(data.observations), np.clip(data.actions, -1, 1), reward)
    return transition_rows(*columns, agent.normalize(data.next_observations), data.terminals, False)


def vae_phase(agent: OPT, dataset: ReplayBuffer, writer, args: Args) -> None:
    """SPOT's behaviour VAE, trained first and frozen afterwards (x = VAE step)."""
    sample = lambda: dataset.split(dataset.sample_rows(args.batch_size))
    update = FastUpdate(lambda: agent.vae_update(*sample()[:2]), args.compile, args.cudagraphs)
    update_loop(args, writer, "VAE", args.vae_steps, lambda step: {"offline/vae_loss": update()})


def offline_step(agent: OPT, dataset: ReplayBuffer, args: Args, actor_step: bool) -> dict[str, torch.Tensor]:
    """One TD3+BC update on a uniform minibatch of the dataset; the actor and targets move when `actor_step`."""
    return agent.offline_update(dataset.split(dataset.sample_rows(args.batch_size)), actor_step)


def offline_phase(
    agent: OPT, data: OfflineData, dataset: ReplayBuffer, eval_env, writer, args: Args, save=None, resume=None
):
    """Backbone updates from step 1, or from the step after `resume`'s; `save` writes checkpoint.pt."""
    update = FastUpdate(partial(offline_step, agent, dataset, args), args.compile, args.cudagraphs)

    def offline_update(step: int) -> dict[str, torch.Tensor]:
        agent.offline_updates += 1
        return update(agent.offline_updates % args.policy_freq == 0)

    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "offline", step, args.seed + 100)
    offline_loop(args, writer, offline_update, evaluate, save, resume)


def pretrain_step(agent: OPT, replay: BalancedReplay, args: Args, target_step: bool) -> dict[str, torch.Tensor]:
    offline_batch = replay.batch(replay.sample_offline(args.batch_size))
    online_batch = replay.batch(replay.sample_online(args.batch_size))
    return agent.pretrain_update(offline_batch, online_batch, target_step)


def online_pretraining(agent: OPT, replay: BalancedReplay, writer, args: Args) -> None:
    """N_pretrain Eq. 3 updates on B_off and B_on minibatches (x = pre-training update); no env steps."""
    update = FastUpdate(partial(pretrain_step, agent, replay, args), args.compile, args.cudagraphs)

    def pretrain_update(step: int) -> dict[str, torch.Tensor]:
        agent.pretrain_updates += 1
        return update(agent.pretrain_updates % args.policy_freq == 0)

    update_loop(args, writer, "online pre-training", args.n_pretrain, pretrain_update, "pretrain/UPS")


def replay_update(agent: OPT, replay: BalancedReplay, args: Args, actor_step: bool) -> dict[str, torch.Tensor]:
    """Draw the batch (and, for balanced replay, the density minibatches), update, write priorities."""
    index = replay.sample_rl(args.replay, args.batch_size)
    if args.replay == "balanced":
        online_batch = replay.batch(replay.sample_online(args.batch_size))
        offline_batch = replay.batch(replay.sample_offline(args.batch_size))
        results, new_priorities = agent.finetune_update(replay.batch(index), actor_step, online_batch, offline_batch)
        replay.set_priorities(index, new_priorities)
        results["charts/p_new"] = replay.max_priority
    else:
        results, _ = agent.finetune_update(replay.batch(index), actor_step)
    results["charts/offline_share"] = (index < replay.num_offline).float().mean()
    return results


def finetune_step(agent: OPT, update: FastUpdate, kappa: float, args: Args, metrics: Metrics) -> None:
    """The UTD fine-tuning updates of one env step (`update`: replay_update as the phase built it); counted here,
    for policy_freq and SPOT's lambda. Each update's metrics are taken before the next call, which may overwrite
    them (a replayed CUDA graph writes the same output tensors)."""
    for _ in range(args.updates_per_step):
        agent.set_schedule(kappa)
        agent.finetune_updates += 1
        metrics.add(update(agent.finetune_updates % args.policy_freq == 0))


def online_phase(
    agent: OPT, data: OfflineData, replay: BalancedReplay, env, eval_env, writer, args, save=None, resume=None
):
    """Env steps 1..N_tau with the frozen actor; then Online Pre-Training; then UTD fine-tuning updates per step.
    With `resume` it continues after the checkpoint's step (utils.run.online_loop); a kill during Online
    Pre-Training resumes before it and repeats it."""
    if resume is not None:
        replay.load_state_dict(resume["replay"])
    update = None  # the update step, built once Q_on and the density network exist
    kappa = lambda step: kappa_at(step - args.n_tau - 1, args.kappa_start, args.kappa_end, args.kappa_steps)

    def store(step: int, obs, action, reward, next_obs, terminated, ended) -> None:
        states = agent.normalize(np.stack([obs, next_obs]))
        rewards = np.array([training_reward(reward, data.task)])
        row = transition_rows(states[:1], action[None], rewards, states[1:], np.array([terminated]), True)
        replay.add(torch.from_numpy(row).to(agent.device))  # into B_on and B_BR (the same rows)

    def train(step: int, metrics: Metrics) -> int:
        nonlocal update
        if step <= args.n_tau:
            return 0
        update = update or FastUpdate(partial(replay_update, agent, replay, args), args.compile, args.cudagraphs)
        finetune_step(agent, update, kappa(step), args, metrics)
        return args.updates_per_step

    def after_step(step: int) -> None:
        if step == args.n_tau:  # the N_tau window is over: Online Pre-Training, then fine-tuning
            if args.online_pretraining:
                if args.new_critic:
                    agent.start_online_critic()
                online_pretraining(agent, replay, writer, args)
            agent.start_finetuning()

    def on_log(step: int) -> None:
        writer.add_scalar("charts/kappa", kappa(step), step)
        if args.backbone == "spot":
            writer.add_scalar("losses/spot_lambda", agent.spot_lambda(agent.finetune_updates), step)

    act = lambda step, obs: agent.policy(obs, args.exploration_noise if step > args.n_tau or args.ntau_noise else 0.0)
    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "eval", step, args.seed + 100)
    state = lambda: {"replay": replay.state_dict()}
    online_loop(args, writer, env, agent.device, act, store, train, evaluate, state, save, resume, on_log, after_step)


def check_args(args: Args) -> None:
    """Refuse settings the phases cannot run with, naming the flag to change."""
    positive = ("hidden_dim", "policy_freq", "updates_per_step", "spot_cool_steps", "eval_freq", "offline_eval_freq")
    budgets = ("offline_steps", "online_steps", "n_tau", "n_pretrain", "vae_steps", "kappa_steps")
    check_bounds(args, (*positive, "batch_size"), budgets)
    if args.online_steps > 0 and args.n_tau >= args.online_steps:
        steps = f"--n-tau {args.n_tau} leaves no fine-tuning in --online-steps {args.online_steps}"
        raise UserError(f"{steps}; lower --n-tau")
    if args.online_steps > 0 and args.online_pretraining and args.n_tau == 0:
        raise UserError("Online Pre-Training needs online data: set --n-tau >= 1 or pass --no-online-pretraining")
    for name in ("kappa_start", "kappa_end"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    if not 0 < args.init_online_fraction < 1:
        raise UserError(f"--init-online-fraction must lie in (0, 1), got {args.init_online_fraction}")
    if args.meta_inner_lr < 0 or args.priority_temperature <= 0:
        raise UserError("--meta-inner-lr must be >= 0 and --priority-temperature > 0")


def main(args: Args) -> Path:
    run = Run(args, "opt", "an OPT")
    checkpoint = run.pretrained()
    if checkpoint is not None:
        trained = checkpoint["args"]
        if args.backbone not in ("auto", trained["backbone"]):
            held = f"--pretrained {args.pretrained} holds a {trained['backbone']} backbone"
            raise UserError(f"{held}, not {args.backbone}")
        for name in ("backbone", "hidden_dim", "layer_norm", "normalize_states"):  # the network's shape and inputs
            setattr(args, name, trained[name])
    data = load_dataset(args.env_id)
    resolve_args(args, data.name, data.task)
    check_args(args)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    writer, env, eval_env = run.open(data, checkpoint)
    agent, resume = OPT(obs_dim, act_dim, args, run.device), run.resume
    save = run.saver(agent)

    resumed_online = resume is not None and resume["phase"] == "online"
    if resumed_online:  # the hand-over first, so the saved online optimiser states replace what it made
        agent.hand_over()
    for loaded in (checkpoint, resume):
        if loaded is not None:
            agent.load_state_dict(loaded)
    rows = prepare_data(agent, data, fit_statistics=checkpoint is None and resume is None and args.normalize_states)
    dataset = ReplayBuffer.of(rows, obs_dim, act_dim, run.device)
    del rows
    if resume is not None:
        run.restore_rng()
    elif checkpoint is None and args.backbone == "spot":
        vae_phase(agent, dataset, writer, args)
    if agent.vae is not None:
        agent.vae.requires_grad_(False)  # frozen from here on, trained here or loaded
    if checkpoint is None and not resumed_online:
        if args.offline_steps > 0:
            offline_phase(agent, data, dataset, eval_env, writer, args, save, resume)
        if args.save_model:
            run.write("offline.pt", agent, "offline", args.offline_steps)
    if args.online_steps > 0:
        if not resumed_online:
            agent.hand_over()
        replay = BalancedReplay(dataset.storage, args.online_steps, args, obs_dim, act_dim)
        del dataset  # its rows now live in B_BR
        online_phase(agent, data, replay, env, eval_env, writer, args, save, resume if resumed_online else None)
    return run.finish(agent, args.online_steps)


if __name__ == "__main__":
    cli(main, Args)
