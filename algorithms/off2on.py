"""Off2On: Offline-to-Online Reinforcement Learning via Balanced Replay and Pessimistic Q-Ensemble.

Lee, Seo, Lee, Abbeel, Shin, CoRL 2021, arXiv 2107.00591. Offline: N = 5 independent CQL agents (actor and
twin critics each), trained together as one batched ensemble. Online: SAC without the CQL term on the
ensemble: the actors act as one Gaussian matching the first two moments of their mixture (Eq. 5), the
critic is the mean of the members' twin minima, and the replay is balanced: offline and online data share
one prioritized buffer sampled in proportion to w(s, a)^(1/T), a density ratio d_on / d_off learned with
the Jensen-Shannon variational loss (Eq. 4). The official code (shlee94/Off2OnRL) holds only the fine-tuning
phase. The decisions that change results:
- Offline: the official CQL defaults for gym MuJoCo (CQL(H), weight 5, 40k BC warm-start steps, 1M steps).
- Hand-over (official): target copies, fresh Adam at 3e-4, a new alpha = 1, a fresh density network; the dataset
  enters at priority 1, new transitions at the running max, which starts where the first block of K = 1000
  online steps holds a share f = 0.75 of the mass.
- Online (official): blocks of 1000 env steps, each followed by 1000 updates (the first by 5 x 1000).
- States are standardised with the dataset's statistics (CORL's CQL); `--no-normalize-states` feeds raw states
  as the official code does, on which CQL collapses on our hopper data.
Not done: the pixel-based manipulation experiments. Ablations: `--replay uniform|online_only`, `--num-agents`.
Every decision and deviation, the logged tags and the results on our data: docs/off2on.md.

Usage: python algorithms/off2on.py --env-id hopper-medium
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
from utils.buffers import BlockPriorityReplay, ReplayBuffer, transition_rows
from utils.evaluation import write_scores
from utils.fast import FastUpdate
from utils.metrics import Metrics
from utils.optim import adam, soft_update, zero_grad
from utils.run import Run, RunArgs, check_bounds, cli, offline_loop, online_loop


@dataclass
class Args(RunArgs):
    # experiment
    exp_name: str = "off2on"
    """name of the experiment, part of the run name"""
    # data
    normalize_states: bool = True
    """standardise states with the dataset's mean and std (CORL's CQL); off = raw states (official code)"""
    # budgets
    offline_steps: int = 1_000_000
    """CQL gradient steps of every member (official checkpoints: 1M); 0 = no pretraining"""
    online_steps: int = 250_000
    """online environment steps (official: 251 blocks of 1000)"""
    block_steps: int = 1_000
    """K: env steps collected per block, then K updates (official); also sets the initial new-sample priority"""
    first_block_multiplier: int = 5
    """the first block runs this many times K updates (README command: 5)"""
    batch_size: int = 256
    """RL batch, and each of the density network's online and offline minibatches"""
    # algorithm
    num_agents: int = 5
    """N CQL agents, each with an actor and twin critics (paper 6.1: 5; ablation 1, 2)"""
    hidden_dim: int = 256
    """width of the two hidden layers of actors, critics and the density network"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """target soft-update rate, every update"""
    offline_actor_lr: float = 1e-4
    """CQL actor and temperature learning rate"""
    offline_critic_lr: float = 3e-4
    """CQL critic learning rate"""
    cql_weight: float = 5.0
    """CQL(H) weight alpha_cql, no Lagrange (CQL README: 5 or 10 for gym MuJoCo)"""
    cql_samples: int = 10
    """actions per source (uniform, pi(s), pi(s')) in the CQL logsumexp"""
    bc_steps: int = 40_000
    """offline steps whose actor loss is behaviour cloning (CQL policy_eval_start)"""
    online_lr: float = 3e-4
    """learning rate of the fresh online Adam optimisers: actor, critics, alpha, density network"""
    replay: Literal["balanced", "uniform", "online_only"] = "balanced"
    """RL batches: density-ratio priorities (paper), uniform over all data, or online data only (Fig. 4c)"""
    priority_temperature: float = 5.0
    """T: priorities follow w^(1/T) (official code)"""
    init_online_fraction: float = 0.75
    """f: share of the priority mass the first block holds when it arrives (README command)"""
    online_buffer_size: int = 250_000
    """newest online steps the density network's online minibatch comes from (official FIFO)"""
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

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features))
        bound = 1 / in_features**0.5  # rlkit's fan-in uniform init for hidden layers, bias 0.1
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.constant_(self.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def mlp(sizes: tuple[int, ...], ensemble_size: int, last_init: float) -> nn.Sequential:
    """Ensemble MLP with ReLU between layers; the last layer drawn from U(-last_init, last_init)."""
    layers = []
    for n_in, n_out in itertools.pairwise(sizes[:-1]):
        layers += [EnsembleLinear(n_in, n_out, ensemble_size), nn.ReLU()]
    last = EnsembleLinear(sizes[-2], sizes[-1], ensemble_size)
    nn.init.uniform_(last.weight, -last_init, last_init)
    nn.init.uniform_(last.bias, -last_init, last_init)
    return nn.Sequential(*layers, last)


class Critic(nn.Module):
    """2N Q-functions (s, a) -> 256 -> 256 -> 1: member 2i and 2i + 1 are agent i's twin critics."""

    def __init__(self, obs_dim: int, act_dim: int, num_critics: int, hidden: int = 256):
        super().__init__()
        self.num_critics = num_critics
        self.net = mlp((obs_dim + act_dim, hidden, hidden, 1), num_critics, 3e-3)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """[B, obs] and [B, act] (shared by all members) or [2N, B, ...] (one per member) -> Q of shape [2N, B]."""
        x = torch.cat([obs, action], dim=-1)
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.num_critics, -1, -1)
        return self.net(x).squeeze(-1)

    def twin_min(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min over each agent's twin critics: [N, B]."""
        q = self(obs, action)
        return q.view(-1, 2, q.shape[-1]).min(1).values


class Actor(nn.Module):
    """N tanh-Gaussian actors obs -> 256 -> 256 -> (mu, log sigma in [-20, 2]), evaluated together."""

    def __init__(self, obs_dim: int, act_dim: int, num_agents: int, hidden: int = 256):
        super().__init__()
        self.num_agents, self.act_dim = num_agents, act_dim
        self.net = mlp((obs_dim, hidden, hidden, 2 * act_dim), num_agents, 1e-3)

    def members(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-tanh means and standard deviations [N, B, A], for shared [B, obs] or per-agent [N, B, obs] states."""
        if obs.dim() == 2:
            obs = obs.unsqueeze(0).expand(self.num_agents, -1, -1)
        mu, log_std = self.net(obs).chunk(2, dim=-1)
        return mu, log_std.clamp(-20.0, 2.0).exp()

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Every member's own action and log-probability (offline: N independent agents)."""
        return tanh_gaussian(*self.members(obs), deterministic)

    def ensemble(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 5: one action from the moment-matched Gaussian of the members' mixture (online)."""
        return tanh_gaussian(*mixture_moments(*self.members(obs)), deterministic)


def mixture_moments(mu: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the equal-weight mixture of N Gaussians (dim 0), per dimension, in pre-tanh space."""
    mean = mu.mean(0)
    variance = (std.pow(2) + mu.pow(2)).mean(0) - mean.pow(2)
    return mean, variance.clamp_min(math.exp(-40)).sqrt().clamp(math.exp(-20), math.exp(2))


def tanh_log_det(pre_tanh: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(z)^2) summed over the action, in the stable form 2 (log 2 - z - softplus(-2z))."""
    return (2 * (math.log(2) - pre_tanh - F.softplus(-2 * pre_tanh))).sum(-1)


def tanh_gaussian(mu, std, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Action tanh(z), z ~ N(mu, std) (or z = mu), and its log-probability."""
    normal = torch.distributions.Normal(mu, std, validate_args=False)
    pre_tanh = mu if deterministic else normal.rsample()
    return torch.tanh(pre_tanh), normal.log_prob(pre_tanh).sum(-1) - tanh_log_det(pre_tanh)


def data_log_prob(actor: Actor, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """log pi_i(a|s) of dataset actions under each member (the BC warm start), [N, B]."""
    mu, std = actor.members(obs)
    pre_tanh = torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6))
    return torch.distributions.Normal(mu, std, validate_args=False).log_prob(pre_tanh).sum(-1) - tanh_log_det(pre_tanh)


class DensityNet(nn.Module):
    """w(s, a) >= 0 estimating d_on / d_off: (s, a) -> 256 -> 256 -> 1 -> ReLU, starting at w = 1."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = mlp((obs_dim + act_dim, hidden, hidden, 1), 1, 3e-3)
        nn.init.constant_(self.net[-1].bias, 1.0)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return F.relu(self.net(torch.cat([obs, action], dim=-1).unsqueeze(0))).view(-1)


# ---------------------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------------------


class BalancedReplay(BlockPriorityReplay):
    """Rows 0..M-1 hold the dataset, then every online step in order (utils.buffers.BlockPriorityReplay). The
    running-max priority starts where the first block of K new rows holds a share f of the mass (official code);
    the density network's minibatches are uniform over the dataset and over the newest online steps (its FIFO)."""

    def __init__(self, dataset_rows: torch.Tensor, online_steps: int, args: Args, obs_dim: int, act_dim: int):
        f = args.init_online_fraction
        initial = len(dataset_rows) * f / ((1 - f) * args.block_steps)
        super().__init__(dataset_rows, online_steps, obs_dim, act_dim, initial, args.online_buffer_size)


# ---------------------------------------------------------------------------------------------------
# Losses and updates
# ---------------------------------------------------------------------------------------------------


def cql_gap(critic: Critic, actor: Actor, obs, next_obs, q_data: torch.Tensor, samples: int) -> torch.Tensor:
    """CQL(H) per critic, importance-sampled: mean over the batch of LSE_c(s) - Q_c(s, a), shape [2N].

    obs, next_obs: [N, B, obs], agent i's own minibatch; critics 2i and 2i + 1 use agent i's states and
    policy. The logsumexp runs over `samples` uniform actions, `samples` from pi_i(s) and `samples` from
    pi_i(s'), all evaluated at s, each minus its log-density.
    """
    n, batch, obs_dim = obs.shape
    act_dim = actor.act_dim
    states = torch.cat([obs, next_obs], 1).unsqueeze(1).expand(-1, samples, -1, -1).reshape(n, -1, obs_dim)
    with torch.no_grad():
        policy_actions, policy_log_prob = actor(states)  # [N, K * 2B, A]
    uniform = torch.rand(n, samples, batch, act_dim, device=obs.device) * 2 - 1
    actions = torch.cat([uniform, policy_actions.view(n, samples, 2 * batch, act_dim)], 2)  # [N, K, 3B, A]
    uniform_density = torch.full((n, samples, batch), act_dim * math.log(0.5), device=obs.device)
    log_density = torch.cat([uniform_density, policy_log_prob.view(n, samples, 2 * batch)], 2)
    q_obs = obs.repeat(1, 3, 1).unsqueeze(1).expand(-1, samples, -1, -1)
    twin = lambda x: x.reshape(n, samples * 3 * batch, -1).repeat_interleave(2, 0)
    q = critic(twin(q_obs), twin(actions)).view(2 * n, samples, 3, batch)
    values = q - log_density.repeat_interleave(2, 0).view(2 * n, samples, 3, batch)
    return values.permute(0, 3, 1, 2).flatten(2).logsumexp(-1).mean(1) - q_data.mean(1)


def density_loss(w_online: torch.Tensor, w_offline: torch.Tensor) -> torch.Tensor:
    """Eq. 4 with the Jensen-Shannon f: minimised at w = d_on / d_off; 0 at w = 1, never below -2 ln 2."""
    offline_term = -torch.log(2 / (w_offline + 1) + 1e-10).mean()
    return offline_term - torch.log(2 * w_online / (w_online + 1) + 1e-10).mean()


def priorities(w: torch.Tensor, w_offline: torch.Tensor, temperature: float) -> torch.Tensor:
    """w^(1/T), self-normalised by the offline minibatch's mean of w^(1/T), clamped to [1e-3, 1e3]."""
    scaled = w.pow(1 / temperature)
    return (scaled / (w_offline.pow(1 / temperature).mean() + 1e-10)).clamp(1e-3, 1e3)


def per_critic(x: torch.Tensor) -> torch.Tensor:
    """Agent-indexed [N, ...] -> critic-indexed [2N, ...]: agent i's tensor for both of its twin critics."""
    return x.repeat_interleave(2, 0)


class Off2On:
    """Networks, optimisers and the two update rules (offline: N CQL agents; online: ensemble SAC)."""

    def __init__(self, obs_dim: int, act_dim: int, args: Args, device: torch.device):
        self.args, self.device, n = args, device, args.num_agents
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.actor = Actor(obs_dim, act_dim, n, args.hidden_dim).to(device)
        self.critic = Critic(obs_dim, act_dim, 2 * n, args.hidden_dim).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros(n, device=device, requires_grad=True)  # one temperature per CQL agent
        self.target_entropy = -float(act_dim)
        self.actor_optimizer = adam(self.actor.parameters(), args.offline_actor_lr, args.cudagraphs)
        self.critic_optimizer = adam(self.critic.parameters(), args.offline_critic_lr, args.cudagraphs)
        self.alpha_optimizer = adam([self.log_alpha], args.offline_actor_lr, args.cudagraphs)
        self.act = torch.compile(self.actor.ensemble) if args.compile else self.actor.ensemble  # the acting policy
        self.density: DensityNet | None = None
        self.density_optimizer: torch.optim.Adam | None = None
        self.obs_mean, self.obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
        self.offline_updates = 0

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.obs_mean) / self.obs_std).astype(np.float32)

    @staticmethod
    def backward(loss: torch.Tensor, *optimizers: torch.optim.Optimizer) -> None:
        """Gradients of one loss for these optimisers' parameters, nothing stepped yet.

        Every loss of an update comes from the pre-step parameters, and each has its own forward graph (built
        after the previous backward), which is what torch.compile needs; the optimisers step at the end.
        """
        for optimizer in optimizers:
            zero_grad(optimizer)
        loss.backward()

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """The optimisers in the official order, then the target critics."""
        for optimizer in optimizers:
            optimizer.step()
        soft_update(self.critic_target, self.critic, self.args.tau)

    def offline_update(self, batch: tuple[torch.Tensor, ...], behaviour_cloning: bool) -> dict[str, torch.Tensor]:
        """One CQL step of every agent; batch tensors are [N, B, ...], one minibatch per agent.

        `behaviour_cloning`: CQL's warm start (the first bc_steps updates; the caller counts them).
        """
        args = self.args
        obs, action, reward, next_obs, done, _ = batch
        alpha = self.log_alpha.exp().detach().unsqueeze(1)
        new_action, log_prob = self.actor(obs)
        alpha_loss = -(self.log_alpha.unsqueeze(1) * (log_prob.detach() + self.target_entropy)).mean(1).sum()
        if behaviour_cloning:  # clone the data before maximising Q
            policy_value = data_log_prob(self.actor, obs, action)
        else:
            policy_value = self.critic.twin_min(per_critic(obs), per_critic(new_action))
        actor_loss = (alpha * log_prob - policy_value).mean(1).sum()
        # what the actor loss leaves on the critics is dropped when the critic loss's backward clears them
        self.backward(alpha_loss + actor_loss, self.alpha_optimizer, self.actor_optimizer)
        with torch.no_grad():
            next_action, _ = self.actor(next_obs)  # CQL's backup: min of the twins, no entropy term
            y = reward + args.gamma * (1.0 - done) * self.critic_target.twin_min(
                per_critic(next_obs), per_critic(next_action)
            )
        q = self.critic(per_critic(obs), per_critic(action))
        td_loss = (q - per_critic(y)).pow(2).mean(1).sum()
        cql_loss = args.cql_weight * cql_gap(self.critic, self.actor, obs, next_obs, q, args.cql_samples)
        self.backward(td_loss + cql_loss.sum(), self.critic_optimizer)
        self.step(self.alpha_optimizer, self.actor_optimizer, self.critic_optimizer)
        return {
            "offline/qf_loss": td_loss.detach(),
            "offline/cql_loss": cql_loss.detach().mean(),
            "offline/qf_values": q.mean().detach(),
            "offline/actor_loss": actor_loss.detach(),
            "offline/alpha": alpha.mean(),
        }

    def hand_over(self) -> None:
        """Card 2.2: targets = critics, fresh Adam for everything, one new alpha = 1, a fresh density network."""
        args = self.args
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optimizer = adam(self.actor.parameters(), args.online_lr, args.cudagraphs)
        self.critic_optimizer = adam(self.critic.parameters(), args.online_lr, args.cudagraphs)
        self.log_alpha = torch.zeros((), device=self.device, requires_grad=True)
        self.alpha_optimizer = adam([self.log_alpha], args.online_lr, args.cudagraphs)
        self.density = DensityNet(self.obs_dim, self.act_dim, args.hidden_dim).to(self.device)
        self.density_optimizer = adam(self.density.parameters(), args.online_lr, args.cudagraphs)

    def online_update(self, batch, online_batch=None, offline_batch=None):
        """One SAC step on the ensemble, and the density step when the density minibatches are given.

        Returns the metrics and the new priorities of the RL batch (None without density minibatches).
        """
        args = self.args
        obs, action, reward, next_obs, done, _ = batch
        alpha = self.log_alpha.exp().detach()
        new_action, log_prob = self.actor.ensemble(obs)
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        actor_loss = (alpha * log_prob - self.critic.twin_min(obs, new_action).mean(0)).mean()
        self.backward(alpha_loss + actor_loss, self.alpha_optimizer, self.actor_optimizer)
        with torch.no_grad():
            next_action, next_log_prob = self.actor.ensemble(next_obs)
            next_value = self.critic_target.twin_min(next_obs, next_action) - alpha * next_log_prob  # [N, B]
            y = reward + args.gamma * (1.0 - done) * next_value
        q = self.critic(obs, action)
        critic_loss = (q - per_critic(y)).pow(2).mean(1).sum()
        self.backward(critic_loss, self.critic_optimizer)
        results = {
            "losses/qf_loss": critic_loss.detach(),
            "losses/qf_values": q.mean().detach(),
            "losses/actor_loss": actor_loss.detach(),
            "losses/alpha": alpha,
            "losses/entropy": -log_prob.mean().detach(),
        }
        if online_batch is None:
            self.step(self.alpha_optimizer, self.actor_optimizer, self.critic_optimizer)
            return results, None
        w_online = self.density(online_batch[0], online_batch[1])
        w_offline = self.density(offline_batch[0], offline_batch[1])
        loss_w = density_loss(w_online, w_offline)
        with torch.no_grad():  # the pre-update density network scores the RL batch
            new_priorities = priorities(self.density(obs, action), w_offline, args.priority_temperature)
        self.backward(loss_w, self.density_optimizer)
        self.step(self.alpha_optimizer, self.actor_optimizer, self.critic_optimizer, self.density_optimizer)
        results |= {
            "losses/density_loss": loss_w.detach(),
            "charts/density_online": w_online.mean().detach(),
            "charts/density_offline": w_offline.mean().detach(),
            "charts/density_dead": (w_online == 0).float().mean(),
        }
        return results, new_priorities

    def policy(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        """Action for a raw (unnormalised) observation, or a batch of them."""
        with torch.no_grad():
            obs_t = torch.as_tensor(self.normalize(obs), device=self.device)
            action, _ = self.act(obs_t.view(-1, obs_t.shape[-1]), deterministic)  # one obs or a batch
        return action.view(*obs.shape[:-1], -1).cpu().numpy()

    def q_ensemble(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The actor's objective: mean over agents of the twin minimum."""
        with torch.no_grad():
            to_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)
            return self.critic.twin_min(to_tensor(self.normalize(obs)), to_tensor(action)).mean(0).cpu().numpy()

    def networks(self) -> dict[str, nn.Module | torch.optim.Optimizer]:
        names = ["actor", "critic", "critic_target", "actor_optimizer", "critic_optimizer", "alpha_optimizer"]
        names += ["density", "density_optimizer"] if self.density is not None else []
        return {name: getattr(self, name) for name in names}

    def state_dict(self) -> dict:
        state = {name: module.state_dict() for name, module in self.networks().items()}
        state |= {"log_alpha": self.log_alpha.detach().cpu(), "offline_updates": self.offline_updates}
        return state | {"obs_mean": self.obs_mean, "obs_std": self.obs_std, "num_agents": self.actor.num_agents}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Everything state_dict holds (for --resume; --pretrained takes the networks and state statistics only)."""
        for name, module in self.networks().items():
            module.load_state_dict(checkpoint[name])
        with torch.no_grad():
            self.log_alpha.copy_(checkpoint["log_alpha"])
        self.obs_mean, self.obs_std = checkpoint["obs_mean"], checkpoint["obs_std"]
        self.offline_updates = checkpoint["offline_updates"]


# ---------------------------------------------------------------------------------------------------
# Logging, checkpoints, evaluation
# ---------------------------------------------------------------------------------------------------


def policy_from_checkpoint(checkpoint: dict):
    """The deterministic actor of a checkpoint as raw obs -> action (used by utils.make_dataset)."""
    args = Args(**{**checkpoint["args"], "pretrained": None, "resume": None, "compile": False, "cudagraphs": False})
    agent = Off2On(checkpoint["obs_dim"], checkpoint["act_dim"], args, torch.device("cpu"))
    agent.load_state_dict(checkpoint)
    return lambda obs: agent.policy(obs, deterministic=True)


def log_evaluation(writer, agent: Off2On, env, args: Args, data: OfflineData, prefix: str, step: int, seed: int):
    q = {"q_function": agent.q_ensemble, "gamma": args.gamma} if prefix == "eval" else {}
    policy = lambda obs: agent.policy(obs, deterministic=True)
    result = evaluate(env, policy, args.eval_episodes, seed, minari_ref_scores=data.minari_ref_scores, **q)
    return write_scores(writer, result, prefix, step)


# ---------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------


def offline_step(agent: Off2On, dataset: ReplayBuffer, args: Args, behaviour_cloning: bool) -> dict[str, torch.Tensor]:
    """One offline update, each agent on its own minibatch."""
    rows = dataset.sample_rows(args.num_agents * args.batch_size).view(args.num_agents, args.batch_size, -1)
    return agent.offline_update(dataset.split(rows), behaviour_cloning)


def offline_phase(
    agent: Off2On, data: OfflineData, dataset: ReplayBuffer, eval_env, writer, args: Args, save=None, resume=None
):
    """N CQL agents from step 1, or from the step after `resume`'s; `save` writes checkpoint.pt."""
    update = FastUpdate(partial(offline_step, agent, dataset, args), args.compile, args.cudagraphs)

    def offline_update(step: int) -> dict[str, torch.Tensor]:
        results = update(agent.offline_updates < args.bc_steps)  # BC warm start of the actors first
        agent.offline_updates += 1
        return results

    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "offline", step, args.seed + 100)
    offline_loop(args, writer, offline_update, evaluate, save, resume)


def replay_update(agent: Off2On, replay: BalancedReplay, args: Args) -> dict[str, torch.Tensor]:
    """Draw the RL batch (and, for balanced replay, the density minibatches), update, write priorities."""
    index = replay.sample_rl(args.replay, args.batch_size)
    if args.replay == "balanced":
        online_batch = replay.batch(replay.sample_online(args.batch_size))
        offline_batch = replay.batch(replay.sample_offline(args.batch_size))
        results, new_priorities = agent.online_update(replay.batch(index), online_batch, offline_batch)
        replay.set_priorities(index, new_priorities)
    else:
        results, _ = agent.online_update(replay.batch(index))
    results["charts/offline_share"] = (index < replay.num_offline).float().mean()
    results["charts/p_new"] = replay.max_priority
    return results


def online_phase(
    agent: Off2On, data: OfflineData, replay: BalancedReplay, env, eval_env, writer, args, save=None, resume=None
):
    """Blocks of K env steps with the stochastic ensemble policy, each followed by K updates (the first by more).
    With `resume` it continues after the checkpoint's step (utils.run.online_loop)."""
    block_start = 0 if resume is None else resume["block_start"]
    if resume is not None:
        replay.load_state_dict(resume["replay"])
    update = FastUpdate(partial(replay_update, agent, replay, args), args.compile, args.cudagraphs)

    def store(step: int, obs, action, reward, next_obs, terminated, ended) -> None:
        states = agent.normalize(np.stack([obs, next_obs]))
        row = transition_rows(states[:1], action[None], np.array([reward]), states[1:], np.array([terminated]), True)
        replay.add(torch.from_numpy(row).to(agent.device))

    def train(step: int, metrics: Metrics) -> int:
        nonlocal block_start
        if step % args.block_steps != 0 and step != args.online_steps:
            return 0
        multiplier = args.first_block_multiplier if block_start == 0 else 1
        block_updates, block_start = (step - block_start) * multiplier, step
        for _ in range(block_updates):
            metrics.add(update())
        return block_updates

    act = lambda step, obs: agent.policy(obs, deterministic=False)
    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "eval", step, args.seed + 100)
    state = lambda: {"replay": replay.state_dict(), "block_start": block_start}
    online_loop(args, writer, env, agent.device, act, store, train, evaluate, state, save, resume)


def check_args(args: Args) -> None:
    """Refuse settings the phases cannot run with, naming the flag to change."""
    positive = ("num_agents", "hidden_dim", "cql_samples", "block_steps", "first_block_multiplier", "eval_freq")
    positive += ("offline_eval_freq", "batch_size", "online_buffer_size")
    check_bounds(args, positive, ("offline_steps", "online_steps", "bc_steps"))
    if 0 < args.online_steps < args.block_steps:
        raise UserError(f"--online-steps {args.online_steps} is shorter than one block; lower --block-steps")
    if not 0 < args.init_online_fraction < 1:
        raise UserError(f"--init-online-fraction must lie in (0, 1), got {args.init_online_fraction}")
    if args.priority_temperature <= 0:
        raise UserError(f"--priority-temperature must be > 0, got {args.priority_temperature}")


def main(args: Args) -> Path:
    run = Run(args, "off2on", "an Off2On")
    checkpoint = run.pretrained(needs_statistics=True)
    if checkpoint is not None:  # the offline run's networks and the inputs they were trained on
        run.adopt({"num_agents": checkpoint["num_agents"], "hidden_dim": checkpoint["args"]["hidden_dim"]})
        args.normalize_states = checkpoint["args"]["normalize_states"]
    check_args(args)
    data = load_dataset(args.env_id)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    writer, env, eval_env = run.open(data, checkpoint)
    agent, resume = Off2On(obs_dim, act_dim, args, run.device), run.resume
    loaded = resume or checkpoint  # a loaded run brings the state statistics its networks were trained with
    if loaded is not None:
        agent.obs_mean, agent.obs_std = loaded["obs_mean"], loaded["obs_std"]
    elif args.normalize_states:
        agent.obs_mean, agent.obs_std = data.observations.mean(0), data.observations.std(0) + 1e-3
    states = agent.normalize(data.observations), agent.normalize(data.next_observations)
    rows = transition_rows(states[0], data.actions, data.rewards, states[1], data.terminals, False)
    dataset = ReplayBuffer.of(rows, obs_dim, act_dim, run.device)
    del rows

    save = run.saver(agent)
    resumed_online = resume is not None and resume["phase"] == "online"
    if resume is not None:  # after the hand-over's fresh optimisers, so the saved online states replace them
        if resumed_online:
            agent.hand_over()
        agent.load_state_dict(resume)
        run.restore_rng()
    if checkpoint is not None:
        agent.actor.load_state_dict(checkpoint["actor"])
        agent.critic.load_state_dict(checkpoint["critic"])
    elif args.offline_steps > 0 and not resumed_online:
        offline_phase(agent, data, dataset, eval_env, writer, args, save, resume)
        if args.save_model:
            run.write("offline.pt", agent, "offline", args.offline_steps)
    if args.online_steps > 0:
        if not resumed_online:
            agent.hand_over()
        replay = BalancedReplay(dataset.storage, args.online_steps, args, obs_dim, act_dim)
        del dataset  # its rows now live in the balanced replay
        online_phase(agent, data, replay, env, eval_env, writer, args, save, resume if resumed_online else None)
    return run.finish(agent, args.online_steps)


if __name__ == "__main__":
    cli(main, Args)
