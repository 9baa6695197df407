"""BAQ: Behavior Adaption Q-Learning (implicit behaviour models for offline-to-online RL).

"From Static to Dynamic: Leveraging Implicit Behavioral Models to Facilitate Transition in Offline-to-Online
Reinforcement Learning", ICLR 2025 submission (OpenReview d159zNCmOq; later arXiv 2511.03695). A frozen
behaviour-cloning model pi_BC scores every transition by how far its action is from pi_BC(s). Online, that
score (i) down-weights the TD regression of BC-divergent pairs, w = exp(-mean((pi_BC(s) - a)^2) / k_q), in
CQL (Eq. 7) or in IQL's V and Q losses (Eq. 8-9), and (ii) sets the replay priority
rho = (||pi_BC(s) - a||_2 / k_rho + 1)^alpha over one buffer of offline and online data (Eq. 10).
No public code exists; every constant the paper leaves open is a decision of the card, kept as a flag. Those
that change results:
- k_q = max(m_off, m_probe) / ln 2 (offline and pretrained-policy median MSEs to pi_BC), k_rho = the median
  offline L2 distance, alpha = 1; `--k-q`, `--k-rho` override.
- Eq. 10 applies to every transition, offline data included; new transitions get their own rho (not the max
  priority); priorities never change; no importance-sampling correction.
- The weight multiplies the CQL TD term only (Eq. 7); backbones as CORL's CQL and IQL (IQL: actor lr
  cosine-decayed offline, a constant 3e-4 online).
Not implemented: the `--is-beta` importance-sampling ablation. Every decision and deviation, the logged tags and
the results on our data: docs/baq.md.

Usage: python algorithms/baq.py --env-id hopper-medium --backbone iql
"""

from __future__ import annotations

import copy
import itertools
import math
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
from utils.buffers import ReplayBuffer, StaticPriorityReplay, transition_rows
from utils.evaluation import write_scores
from utils.fast import FastUpdate
from utils.metrics import Metrics
from utils.optim import adam, optimizer_step, soft_update, zero_grad
from utils.run import Run, RunArgs, check_bounds, cli, offline_loop, online_loop, update_loop


@dataclass
class Args(RunArgs):
    # experiment
    exp_name: str = "baq"
    """name of the experiment, part of the run name"""
    # budgets
    offline_steps: int = 1_000_000
    """backbone gradient steps (CORL); 0 = no backbone pretraining (pi_BC is still trained)"""
    online_steps: int = 30_000
    """online environment steps (paper Table 1: the first 30k)"""
    bc_steps: int = 100_000
    """pi_BC gradient steps, before the backbone"""
    batch_size: int = 256
    """minibatch size of pi_BC, backbone and online updates"""
    # algorithm
    backbone: Literal["cql", "iql"] = "cql"
    """offline algorithm BAQ fine-tunes"""
    hidden_dim: int = 256
    """width of every hidden layer"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """target soft-update rate, every update"""
    cql_actor_lr: float = 3e-5
    """CQL actor and temperature learning rate (CORL)"""
    cql_critic_lr: float = 3e-4
    """CQL critic learning rate (CORL)"""
    cql_weight: float = 10.0
    """CQL(H) weight offline (CORL locomotion configs)"""
    cql_weight_online: float = 10.0
    """CQL(H) weight online (CORL finetune default)"""
    cql_samples: int = 10
    """actions per source (uniform, pi(s), pi(s')) in the CQL logsumexp"""
    iql_lr: float = 3e-4
    """IQL learning rate of actor, Q and V"""
    expectile: float = 0.7
    """IQL expectile tau_e"""
    iql_beta: float = 3.0
    """IQL inverse temperature of the advantage weights"""
    bc_lr: float = 3e-4
    """pi_BC learning rate"""
    use_weight: bool = True
    """weight the TD regression by w(s, a) (Eq. 6-9); off = the priority-only ablation "Our-S\""""
    use_priority: bool = True
    """sample in proportion to rho (Eq. 10); off = uniform over the buffer"""
    k_q: float = 0.0
    """weight scale; 0 = max(m_off, m_probe) / ln 2 at the hand-over"""
    k_rho: float = 0.0
    """priority scale; 0 = median offline ||pi_BC(s) - a||_2"""
    priority_alpha: float = 1.0
    """exponent alpha inside Eq. 10"""
    probe_states: int = 10_000
    """offline states on which the pretrained policy's exploration actions set m_probe"""
    # evaluation
    eval_freq: int = 5_000
    """online evaluation every this many environment steps (and at step 0)"""
    offline_eval_freq: int = 10_000
    """offline evaluation every this many gradient steps (and at the end)"""


# ---------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """E independent linear layers as one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int, gain: float | None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_features))
        if gain is None:  # nn.Linear's default draw (IQL, pi_BC)
            bound = 1 / in_features**0.5
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)
        else:  # CORL CQL: orthogonal weights, zero bias
            with torch.no_grad():
                for member in self.weight:
                    member.copy_(nn.init.orthogonal_(torch.empty(out_features, in_features), gain).T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def mlp(sizes: tuple[int, ...], ensemble_size: int, orthogonal: bool) -> nn.Sequential:
    """Ensemble MLP with ReLU between layers; CORL's orthogonal init (gain sqrt 2, last layer 1e-2) or default."""
    layers = []
    for n_in, n_out in itertools.pairwise(sizes[:-1]):
        layers += [EnsembleLinear(n_in, n_out, ensemble_size, math.sqrt(2) if orthogonal else None), nn.ReLU()]
    return nn.Sequential(*layers, EnsembleLinear(sizes[-2], sizes[-1], ensemble_size, 1e-2 if orthogonal else None))


class Critic(nn.Module):
    """Twin Q-functions (s, a) -> hidden layers -> 1, evaluated together: [B, ...] -> [2, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, orthogonal: bool):
        super().__init__()
        self.net = mlp((obs_dim + act_dim, *[hidden] * layers, 1), 2, orthogonal)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1)
        return self.net(x.unsqueeze(0).expand(2, *x.shape)).squeeze(-1)


class ValueNet(nn.Module):
    """IQL's V(s): obs -> 256 -> 256 -> 1."""

    def __init__(self, obs_dim: int, hidden: int):
        super().__init__()
        self.net = mlp((obs_dim, hidden, hidden, 1), 1, False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.unsqueeze(0)).view(obs.shape[:-1])


def tanh_log_det(pre_tanh: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(z)^2) summed over the action, in the stable form 2 (log 2 - z - softplus(-2z))."""
    return (2 * (math.log(2) - pre_tanh - F.softplus(-2 * pre_tanh))).sum(-1)


class TanhGaussianActor(nn.Module):
    """CORL CQL actor: obs -> 3 x 256 -> (mu, raw log sigma); log sigma = scale * raw + offset, learnable."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp((obs_dim, hidden, hidden, hidden, 2 * act_dim), 1, True)
        self.log_std_scale = nn.Parameter(torch.tensor(1.0))
        self.log_std_offset = nn.Parameter(torch.tensor(-1.0))

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Action in (-1, 1) and its log-probability (tanh change of variables)."""
        mu, raw = self.net(obs.unsqueeze(0))[0].chunk(2, dim=-1)
        log_std = (self.log_std_scale * raw + self.log_std_offset).clamp(-20.0, 2.0)
        normal = torch.distributions.Normal(mu, log_std.exp(), validate_args=False)
        pre_tanh = mu if deterministic else normal.rsample()
        return torch.tanh(pre_tanh), normal.log_prob(pre_tanh).sum(-1) - tanh_log_det(pre_tanh)


class GaussianActor(nn.Module):
    """CORL IQL actor: mean = tanh(obs -> 256 -> 256 -> A), state-independent log sigma; samples are clipped."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp((obs_dim, hidden, hidden, act_dim), 1, False)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def distribution(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean = torch.tanh(self.net(obs.unsqueeze(0))[0])
        return torch.distributions.Normal(mean, self.log_std.clamp(-20, 2).exp(), validate_args=False)

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.distribution(obs)
        action = dist.mean if deterministic else dist.sample().clamp(-1.0, 1.0)
        return action, dist.log_prob(action).sum(-1)


class BehaviourModel(nn.Module):
    """pi_BC: deterministic obs -> 256 -> 256 -> tanh(A), trained by MSE and then frozen."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp((obs_dim, hidden, hidden, act_dim), 1, False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs.unsqueeze(0))[0])


# ---------------------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------------------


class PriorityReplay(StaticPriorityReplay):
    """Offline then online rows, each with its static priority rho (Eq. 10; the sampler: utils.buffers) and its
    BC MSE (for w)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        super().__init__(capacity, obs_dim, act_dim, device)
        self.bc_mse = torch.zeros(capacity, device=device)
        self.num_offline = 0

    def add(self, rows: torch.Tensor, bc_mse: torch.Tensor, priority: torch.Tensor) -> None:
        start = self.buffer.size
        super().add(rows, priority)
        self.bc_mse[start : start + len(rows)] = bc_mse

    def state_dict(self) -> dict:
        bc_mse = self.bc_mse[: self.buffer.size].to("cpu", copy=True)
        return super().state_dict() | {"bc_mse": bc_mse, "num_offline": self.num_offline}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bc_mse[: self.buffer.size] = state["bc_mse"].to(self.bc_mse.device)
        self.num_offline = state["num_offline"]


def bc_distances(bc_model: BehaviourModel, obs: torch.Tensor, action: torch.Tensor, chunk: int = 65536):
    """mean squared and Euclidean distance of a to pi_BC(s), in chunks: (mse [n], l2 [n])."""
    with torch.no_grad():
        diff = torch.cat([bc_model(o) - a for o, a in zip(obs.split(chunk), action.split(chunk), strict=True)])
    return diff.pow(2).mean(-1), diff.norm(dim=-1)


def td_weight(bc_mse: torch.Tensor, k_q: float) -> torch.Tensor:
    """Eq. 6: w = exp(-mean((pi_BC(s) - a)^2) / k_q), in (0, 1], 1 where a = pi_BC(s)."""
    return torch.exp(-bc_mse.detach() / k_q)


def priority(distance: torch.Tensor, k_rho: float, alpha: float) -> torch.Tensor:
    """Eq. 10: rho = (||pi_BC(s) - a||_2 / k_rho + 1)^alpha >= 1."""
    return (distance / k_rho + 1.0).pow(alpha)


# ---------------------------------------------------------------------------------------------------
# Losses and updates
# ---------------------------------------------------------------------------------------------------


def cql_gap(critic: Critic, actor: TanhGaussianActor, obs, next_obs, q_data: torch.Tensor, samples: int):
    """CQL(H), importance-sampled, per critic: mean over the batch of LSE_k(s) - Q_k(s, a), shape [2].

    The logsumexp runs over `samples` uniform actions, `samples` from pi(s) and `samples` from pi(s'), all
    evaluated at s, each minus its log-density.
    """
    batch, act_dim = q_data.shape[1], actor.act_dim
    with torch.no_grad():
        policy_actions, policy_log_prob = actor(torch.cat([obs, next_obs]).repeat(samples, 1))
    uniform_actions = torch.rand(samples * batch, act_dim, device=obs.device) * 2 - 1
    # the logsumexp's columns: K x (B uniform, B from pi(s), B from pi(s'))
    uniform_log_density = torch.full((samples, batch), act_dim * math.log(0.5), device=obs.device)
    log_density = torch.cat([uniform_log_density, policy_log_prob.view(samples, 2 * batch)], 1)  # [K, 3B]
    actions = torch.cat([uniform_actions.view(samples, batch, -1), policy_actions.view(samples, 2 * batch, -1)], 1)
    q = critic(obs.repeat(3, 1).repeat(samples, 1), actions.reshape(-1, act_dim)).view(2, samples, 3, batch)
    values = (q - log_density.view(samples, 3, batch)).permute(0, 3, 1, 2).flatten(2)
    return values.logsumexp(-1).mean(1) - q_data.mean(1)


def expectile_loss(u: torch.Tensor, expectile: float, weight: torch.Tensor) -> torch.Tensor:
    """IQL's V loss (Eq. 8 with the BAQ weight): mean(w |tau - 1(u < 0)| u^2), u = Q - V."""
    return (weight * (expectile - (u < 0).float()).abs() * u.pow(2)).mean()


class BAQ:
    """pi_BC, the backbone's networks and optimisers, and the (weighted) backbone update."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        self.args, self.device, self.act_dim = args, device, act_dim
        self.bc_model = BehaviourModel(obs_dim, act_dim, args.hidden_dim).to(device)
        self.bc_optimizer = adam(self.bc_model.parameters(), args.bc_lr, args.cudagraphs)
        if args.backbone == "cql":
            self.actor = TanhGaussianActor(obs_dim, act_dim, args.hidden_dim).to(device)
            self.critic = Critic(obs_dim, act_dim, args.hidden_dim, 3, orthogonal=True).to(device)
            self.log_alpha = torch.zeros((), device=device, requires_grad=True)
            self.actor_optimizer = adam(self.actor.parameters(), args.cql_actor_lr, args.cudagraphs)
            self.critic_optimizer = adam(self.critic.parameters(), args.cql_critic_lr, args.cudagraphs)
            self.alpha_optimizer = adam([self.log_alpha], args.cql_actor_lr, args.cudagraphs)
            self.actor_schedule = None
        else:
            self.actor = GaussianActor(obs_dim, act_dim, args.hidden_dim).to(device)
            self.critic = Critic(obs_dim, act_dim, args.hidden_dim, 2, orthogonal=False).to(device)
            self.value = ValueNet(obs_dim, args.hidden_dim).to(device)
            # The lr is a device tensor that the cosine schedule rewrites in place between (captured) updates.
            iql_lr = torch.tensor(args.iql_lr, device=device)
            self.actor_optimizer = adam(self.actor.parameters(), iql_lr, args.cudagraphs)
            self.critic_optimizer = adam(self.critic.parameters(), args.iql_lr, args.cudagraphs)
            self.value_optimizer = adam(self.value.parameters(), args.iql_lr, args.cudagraphs)
            steps = max(args.offline_steps, 1)
            self.actor_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_optimizer, steps)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.act = torch.compile(self.actor) if args.compile else self.actor  # the acting policy
        self.cql_weight = args.cql_weight
        self.obs_mean, self.obs_std, self.reward_scale = np.zeros(obs_dim), np.ones(obs_dim), 1.0

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.obs_mean) / self.obs_std).astype(np.float32)

    def bc_update(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        loss = (self.bc_model(obs) - action).pow(2).mean()
        optimizer_step(self.bc_optimizer, loss)
        return loss.detach()

    def update(self, batch, weight: torch.Tensor | float = 1.0) -> dict[str, torch.Tensor]:
        """One backbone step; `weight` multiplies the TD regression per sample (1 offline)."""
        return self.cql_update(batch, weight) if self.args.backbone == "cql" else self.iql_update(batch, weight)

    def cql_update(self, batch, weight) -> dict[str, torch.Tensor]:
        """CORL CQL; BAQ Eq. 7 weights the TD term only. All losses from the pre-step parameters."""
        args = self.args
        obs, action, reward, next_obs, done, _ = batch
        alpha = self.log_alpha.exp().detach()
        new_action, log_prob = self.actor(obs)
        alpha_loss = -(self.log_alpha * (log_prob.detach() - self.act_dim)).mean()
        actor_loss = (alpha * log_prob - self.critic(obs, new_action).min(0).values).mean()
        zero_grad(self.alpha_optimizer)
        zero_grad(self.actor_optimizer)
        # One backward per forward graph (what torch.compile needs): the critic losses come after this one.
        # Each term reaches its own parameters; what the actor loss leaves on Q is dropped below.
        (alpha_loss + actor_loss).backward()
        with torch.no_grad():
            next_action, _ = self.actor(next_obs)  # no entropy term in the backup
            y = reward + args.gamma * (1.0 - done) * self.critic_target(next_obs, next_action).min(0).values
        q = self.critic(obs, action)
        td_loss = (weight * (q - y).pow(2)).mean(1).sum()
        cql_loss = self.cql_weight * cql_gap(self.critic, self.actor, obs, next_obs, q, args.cql_samples).sum()
        zero_grad(self.critic_optimizer)
        (td_loss + cql_loss).backward()
        for optimizer in (self.alpha_optimizer, self.actor_optimizer, self.critic_optimizer):
            optimizer.step()
        soft_update(self.critic_target, self.critic, args.tau)
        losses = {"qf_loss": td_loss, "cql_loss": cql_loss, "qf_values": q.mean(), "actor_loss": actor_loss}
        return {key: value.detach() for key, value in losses.items()} | {"alpha": alpha}

    def iql_update(self, batch, weight) -> dict[str, torch.Tensor]:
        """CORL IQL order: V, then Q towards r + gamma V(s') (pre-update V), then the AWR actor; BAQ Eq. 8-9."""
        args = self.args
        obs, action, reward, next_obs, done, _ = batch
        with torch.no_grad():
            next_value = self.value(next_obs)
            target_q = self.critic_target(obs, action).min(0).values
        value = self.value(obs)
        value_loss = expectile_loss(target_q - value, args.expectile, weight)
        optimizer_step(self.value_optimizer, value_loss)
        y = reward + args.gamma * (1.0 - done) * next_value
        q = self.critic(obs, action)
        q_loss = 0.5 * (weight * (q - y).pow(2)).mean(1).sum()
        optimizer_step(self.critic_optimizer, q_loss)
        soft_update(self.critic_target, self.critic, args.tau)
        advantage_weight = torch.exp(args.iql_beta * (target_q - value.detach())).clamp(max=100.0)
        actor_loss = -(advantage_weight * self.actor.distribution(obs).log_prob(action).sum(-1)).mean()
        optimizer_step(self.actor_optimizer, actor_loss)
        losses = {"qf_loss": q_loss, "value_loss": value_loss, "qf_values": q.mean(), "actor_loss": actor_loss}
        return {key: value.detach() for key, value in losses.items()}

    def hand_over(self) -> None:
        """The online CQL weight; IQL's actor lr becomes a constant 3e-4 (card A14), Adam kept."""
        self.cql_weight = self.args.cql_weight_online
        if self.args.backbone == "iql":
            self.actor_schedule = None
            for group in self.actor_optimizer.param_groups:
                group["lr"].fill_(self.args.iql_lr)

    def policy(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """Action for a raw (unnormalised) observation."""
        with torch.no_grad():
            obs_t = torch.as_tensor(self.normalize(obs), device=self.device)
            return self.act(obs_t.view(-1, obs_t.shape[-1]), deterministic)[0].view(*obs.shape[:-1], -1).cpu().numpy()

    def q_min(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            obs_t = torch.as_tensor(self.normalize(obs), device=self.device)
            action_t = torch.as_tensor(action, dtype=torch.float32, device=self.device)
            return self.critic(obs_t, action_t).min(0).values.cpu().numpy()

    def networks(self) -> dict[str, nn.Module | torch.optim.Optimizer]:
        names = ["bc_model", "actor", "critic", "critic_target", "actor_optimizer", "critic_optimizer"]
        names += ["alpha_optimizer"] if self.args.backbone == "cql" else ["value", "value_optimizer"]
        return {name: getattr(self, name) for name in names}

    def state_dict(self) -> dict:
        state = {name: module.state_dict() for name, module in self.networks().items()}
        if self.args.backbone == "cql":
            state["log_alpha"] = self.log_alpha.detach().cpu()
        elif self.actor_schedule is not None:  # IQL offline: where the cosine schedule stands
            state["actor_schedule"] = self.actor_schedule.state_dict()
        return state | {"obs_mean": self.obs_mean, "obs_std": self.obs_std, "reward_scale": self.reward_scale}

    def load_state_dict(self, checkpoint: dict) -> None:
        for name, module in self.networks().items():
            module.load_state_dict(checkpoint[name])
        if self.args.backbone == "cql":
            with torch.no_grad():
                self.log_alpha.copy_(checkpoint["log_alpha"])
        elif self.actor_schedule is not None and "actor_schedule" in checkpoint:
            self.actor_schedule.load_state_dict(checkpoint["actor_schedule"])
        self.obs_mean, self.obs_std = checkpoint["obs_mean"], checkpoint["obs_std"]
        self.reward_scale = checkpoint["reward_scale"]


# ---------------------------------------------------------------------------------------------------
# Logging, checkpoints, evaluation
# ---------------------------------------------------------------------------------------------------


def policy_from_checkpoint(checkpoint: dict):
    """The deterministic actor of a checkpoint as raw obs -> action (used by utils.make_dataset)."""
    args = Args(**{**checkpoint["args"], "pretrained": None, "resume": None, "compile": False, "cudagraphs": False})
    agent = BAQ(checkpoint["obs_dim"], checkpoint["act_dim"], args, torch.device("cpu"))
    agent.load_state_dict(checkpoint)
    return lambda obs: agent.policy(obs, deterministic=True)


def log_evaluation(writer, agent: BAQ, env, args: Args, data: OfflineData, prefix: str, step: int, seed: int):
    trained_reward = lambda reward: reward * agent.reward_scale
    q = {"q_function": agent.q_min, "gamma": args.gamma, "q_reward_fn": trained_reward} if prefix == "eval" else {}
    policy = lambda obs: agent.policy(obs, deterministic=True)
    result = evaluate(env, policy, args.eval_episodes, seed, minari_ref_scores=data.minari_ref_scores, **q)
    return write_scores(writer, result, prefix, step)


# ---------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------


def prepare_data(agent: BAQ, data: OfflineData, args: Args, fit_statistics: bool) -> np.ndarray:
    """The dataset as normalised buffer rows; `fit_statistics` first takes the state statistics and (IQL) the
    reward scale from it (a loaded checkpoint brings the ones its networks were trained with)."""
    if fit_statistics:
        agent.obs_mean, agent.obs_std = data.observations.mean(0), data.observations.std(0) + 1e-3
    if fit_statistics and args.backbone == "iql":  # IQL's MuJoCo recipe: r * 1000 / (max - min episode return)
        episode_returns = np.add.reduceat(data.rewards, np.r_[0, np.flatnonzero(data.episode_ends)[:-1] + 1])
        agent.reward_scale = 1000.0 / max(episode_returns.max() - episode_returns.min(), 1e-6)
    columns = (agent.normalize(data.observations), np.clip(data.actions, -1, 1), data.rewards * agent.reward_scale)
    return transition_rows(*columns, agent.normalize(data.next_observations), data.terminals, False)


def bc_phase(agent: BAQ, dataset: ReplayBuffer, writer, args: Args) -> float:
    """pi_BC by MSE on 95% of the transitions; the validation MSE on the other 5% is returned and logged."""
    order = torch.randperm(dataset.size, device=dataset.storage.device)
    held_out = max(1, dataset.size // 20)
    validation, train = order[:held_out], order[held_out:]
    val_obs, val_action, *_ = dataset.split(dataset.storage[validation[:100_000]])

    def bc_update(step: int) -> dict[str, torch.Tensor]:
        pick = torch.randint(0, len(train), (args.batch_size,), device=train.device)  # no host-to-device copy
        obs, action, *_ = dataset.split(dataset.storage[train[pick]])
        return {"offline/bc_loss": agent.bc_update(obs, action)}

    update_loop(args, writer, "pi_BC", args.bc_steps, bc_update)
    val_mse = bc_distances(agent.bc_model, val_obs, val_action)[0].mean().item()
    writer.add_scalar("offline/bc_val_mse", val_mse, args.bc_steps)
    return val_mse


def offline_step(agent: BAQ, dataset: ReplayBuffer, args: Args) -> dict[str, torch.Tensor]:
    """One backbone update on a uniform minibatch of the dataset (BAQ adds nothing offline)."""
    return agent.update(dataset.split(dataset.sample_rows(args.batch_size)))


def offline_phase(
    agent: BAQ, data: OfflineData, dataset: ReplayBuffer, eval_env, writer, args: Args, save=None, resume=None
):
    """Backbone updates from step 1, or from the step after `resume`'s; `save` writes checkpoint.pt."""
    update = FastUpdate(partial(offline_step, agent, dataset, args), args.compile, args.cudagraphs)

    def offline_update(step: int) -> dict[str, torch.Tensor]:
        results = {f"offline/{key}": value for key, value in update().items()}
        if agent.actor_schedule is not None:
            agent.actor_schedule.step()  # IQL's cosine lr: outside the update step, in place in the lr tensor
        return results

    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "offline", step, args.seed + 100)
    offline_loop(args, writer, offline_update, evaluate, save, resume)


def calibrate(agent: BAQ, dataset: ReplayBuffer, online_steps: int, writer, args: Args):
    """Card 2.2: k_q and k_rho from the data, Eq. 10 for every offline row; returns (replay, k_q, k_rho)."""
    obs, action, *_ = dataset.split(dataset.storage[: dataset.size])
    bc_mse, distance = bc_distances(agent.bc_model, obs, action)
    probe = torch.randint(0, dataset.size, (args.probe_states,), device=obs.device)
    with torch.no_grad():
        probe_actions = agent.actor(obs[probe])[0]  # the exploration sampler, as online
    m_off, m_probe = bc_mse.median().item(), bc_distances(agent.bc_model, obs[probe], probe_actions)[0].median().item()
    k_q = args.k_q or max(m_off, m_probe, 1e-8) / math.log(2)
    k_rho = args.k_rho or max(distance.median().item(), 1e-8)
    replay = PriorityReplay(dataset.size + online_steps, dataset.obs_dim, dataset.act_dim, obs.device)
    replay.add(dataset.storage[: dataset.size], bc_mse, priority(distance, k_rho, args.priority_alpha))
    replay.num_offline = dataset.size
    for key, value in {"k_q": k_q, "k_rho": k_rho, "m_off": m_off, "m_probe": m_probe}.items():
        writer.add_scalar(f"charts/{key}", value, 0)
    return replay, k_q, k_rho


def online_update(agent: BAQ, replay: PriorityReplay, k_q: float, args: Args) -> dict[str, torch.Tensor]:
    """Draw by rho (or uniformly), weight the TD regression by w (or not), one backbone step."""
    index = replay.sample(args.batch_size, args.use_priority)
    batch = replay.buffer.split(replay.buffer.storage[index])
    w = td_weight(replay.bc_mse[index], k_q)
    results = {f"losses/{key}": value for key, value in agent.update(batch, w if args.use_weight else 1.0).items()}
    return results | {"charts/w_mean": w.mean(), "charts/w_min": w.min(), "charts/offline_share": 1 - batch[-1].mean()}


def log_weights(writer, replay: PriorityReplay, k_q: float, step: int) -> None:
    """Mean w over all stored offline and online rows (a batch holds too few online rows to tell)."""
    offline, online = slice(0, replay.num_offline), slice(replay.num_offline, replay.buffer.size)
    for name, rows in (("offline", offline), ("online", online)):
        writer.add_scalar(f"charts/w_mean_{name}", td_weight(replay.bc_mse[rows], k_q).mean(), step)


def online_phase(
    agent: BAQ, data, replay: PriorityReplay, k_q, k_rho, env, eval_env, writer, args, save=None, resume=None
):
    """One update per env step from the first step; every new transition enters with its own rho. With `resume`
    it continues after the checkpoint's step (utils.run.online_loop)."""
    if resume is not None:
        replay.load_state_dict(resume["replay"])
    update = FastUpdate(partial(online_update, agent, replay, k_q, args), args.compile, args.cudagraphs)

    def store(step: int, obs, action, reward, next_obs, terminated, ended) -> None:
        states = agent.normalize(np.stack([obs, next_obs]))
        rewards = np.array([reward * agent.reward_scale])
        row = transition_rows(states[:1], action[None], rewards, states[1:], np.array([terminated]), True)
        row = torch.from_numpy(row).to(agent.device)
        bc_mse, distance = bc_distances(agent.bc_model, *replay.buffer.split(row)[:2])
        replay.add(row, bc_mse, priority(distance, k_rho, args.priority_alpha))

    def train(step: int, metrics: Metrics) -> int:
        metrics.add(update())
        return 1

    act = lambda step, obs: np.clip(agent.policy(obs, deterministic=False), -1.0, 1.0)
    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "eval", step, args.seed + 100)
    state = lambda: {"replay": replay.state_dict(), "k_q": k_q, "k_rho": k_rho}
    on_log = partial(log_weights, writer, replay, k_q)
    online_loop(args, writer, env, agent.device, act, store, train, evaluate, state, save, resume, on_log)


def check_args(args: Args) -> None:
    """Refuse settings the phases cannot run with, naming the flag to change."""
    positive = ("hidden_dim", "cql_samples", "probe_states", "eval_freq", "offline_eval_freq", "batch_size")
    check_bounds(args, positive, ("offline_steps", "online_steps", "bc_steps"))
    if args.pretrained is None and args.bc_steps < 1:
        raise UserError("BAQ needs pi_BC: --bc-steps must be >= 1 unless --pretrained gives one")
    for name in ("k_q", "k_rho", "priority_alpha"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0 (0 = automatic for k-q and k-rho)")
    if not 0 < args.expectile < 1:
        raise UserError(f"--expectile must lie in (0, 1), got {args.expectile}")


def main(args: Args) -> Path:
    run = Run(args, "baq", "a BAQ")
    checkpoint = run.pretrained()
    if checkpoint is not None:  # the offline run's networks
        run.adopt({"backbone": checkpoint["args"]["backbone"], "hidden_dim": checkpoint["args"]["hidden_dim"]})
    check_args(args)
    data = load_dataset(args.env_id)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    writer, env, eval_env = run.open(data, checkpoint)
    agent, resume = BAQ(obs_dim, act_dim, args, run.device), run.resume
    save = run.saver(agent, lambda: {"bc_val_mse": bc_val_mse})

    resumed_online = resume is not None and resume["phase"] == "online"
    if resumed_online:  # the hand-over first, so the saved online optimiser settings replace its changes
        agent.hand_over()
    for loaded in (checkpoint, resume):  # with the state statistics and reward scale its networks learnt with
        if loaded is not None:
            agent.load_state_dict(loaded)
    rows = prepare_data(agent, data, args, fit_statistics=checkpoint is None and resume is None)
    dataset = ReplayBuffer.of(rows, obs_dim, act_dim, run.device)
    del rows
    bc_val_mse = (checkpoint or resume or {}).get("bc_val_mse")
    if resume is not None:
        run.restore_rng()
    elif checkpoint is None:
        bc_val_mse = bc_phase(agent, dataset, writer, args)
        save("offline", 0, Metrics(writer))  # pi_BC done: a kill from here on resumes without repeating it
    if checkpoint is None and not resumed_online:
        if args.offline_steps > 0:
            offline_phase(agent, data, dataset, eval_env, writer, args, save, resume)
        if args.save_model:
            run.write("offline.pt", agent, "offline", args.offline_steps, bc_val_mse=bc_val_mse)
    agent.bc_model.requires_grad_(False).eval()  # frozen from here on, trained here or loaded
    if args.online_steps == 0:
        return run.finish(agent, 0)
    if resumed_online:
        k_q, k_rho = resume["k_q"], resume["k_rho"]
        replay = PriorityReplay(len(data) + args.online_steps, obs_dim, act_dim, run.device)
    else:
        agent.hand_over()
        replay, k_q, k_rho = calibrate(agent, dataset, args.online_steps, writer, args)
    del dataset  # its rows now live in the priority replay
    online_phase(agent, data, replay, k_q, k_rho, env, eval_env, writer, args, save, resume if resumed_online else None)
    return run.finish(agent, args.online_steps, k_q=k_q, k_rho=k_rho)


if __name__ == "__main__":
    cli(main, Args)
