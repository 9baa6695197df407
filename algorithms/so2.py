"""SO2: A Perspective of Q-value Estimation on Offline-to-Online Reinforcement Learning.

Zhang, Liu, Li et al., AAAI 2024, arXiv 2312.07685, following the official `code` branch (opendilab/SO2).
Offline: EDAC (SAC-N with the ensemble-gradient diversity term). Online: SAC with the large Q-ensemble, the
Perturbed Value Update (clipped Gaussian noise on the next action of the Bellman target), 10 critic updates per
env step, per-member targets, on the official replay (256 online rows + 2304 from a pool of the dataset that the
online data flows into). The decisions that change results:
- EDAC is implemented here (the official code loads EDAC checkpoints): 3M steps, N = 50 critics on hopper and
  10 elsewhere, eta = 5 for halfcheetah/walker2d-medium-expert and 1 elsewhere.
- One actor update per 10 critic updates (official code; the paper's Algorithm 1 updates it every iteration).
- Hand-over: fresh Adam at 1e-3, alpha fixed at 0.2, target critics = copies of the critics; a 5k-step warm-up
  without updates, counted inside the 100k online budget.
- Bootstrapping on `terminated` only; critic loss summed over members offline (EDAC), averaged online (code).
Every decision and deviation, the logged tags and the results on our data: docs/so2.md.

Usage: python algorithms/so2.py --env-id hopper-medium
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any directory
from utils import OfflineData, UserError, evaluate, load_dataset
from utils.buffers import ReplayBuffer, transition_rows
from utils.evaluation import write_scores
from utils.fast import FastUpdate
from utils.metrics import Metrics
from utils.optim import adam, optimizer_step, soft_update, zero_grad
from utils.run import Run, RunArgs, check_bounds, cli, offline_loop, online_loop


@dataclass
class Args(RunArgs):
    # experiment
    exp_name: str = "so2"
    """name of the experiment, part of the run name"""
    # budgets
    offline_steps: int = 3_000_000
    """EDAC gradient steps (EDAC scripts/sac.py: 3000 epochs x 1000); 0 = no pretraining"""
    online_steps: int = 100_000
    """online environment steps, warm-up included (paper: 100k)"""
    warmup_steps: int = 5_000
    """first online steps: pretrained stochastic policy, no updates, online buffer only (official code)"""
    batch_size: int = 256
    """offline batch; online rows per batch (256 online + --mixed-batch-size pool rows)"""
    # algorithm
    hidden_dim: int = 256
    """width of the three hidden layers of actor and critics (EDAC)"""
    num_critics: int | None = None
    """ensemble size N; default 50 for hopper, 10 otherwise (EDAC / CORL configs)"""
    eta: float | None = None
    """EDAC diversity weight; default 5 for halfcheetah/walker2d-medium-expert, else 1; 0 = SAC-N"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """target soft-update rate, after every critic update"""
    offline_lr: float = 3e-4
    """EDAC learning rate of actor, critics and alpha"""
    online_lr: float = 1e-3
    """learning rate of the fresh online Adam optimisers (official configs)"""
    online_alpha: float = 0.2
    """fixed online entropy weight (official code: auto_alpha=False)"""
    online_auto_alpha: bool = False
    """keep tuning alpha online, starting from --online-alpha (ablation)"""
    updates_per_step: int = 10
    """N_upc: critic updates per environment step (paper: 10)"""
    actor_update_freq: int = 10
    """one actor update every this many critic updates (official code: 10)"""
    target_noise: float = 0.3
    """PVU noise std sigma on the target action; 0 turns PVU off (paper: 0.3)"""
    noise_clip: float = 0.6
    """PVU noise clip c (paper: 0.6)"""
    per_member_target: bool = True
    """online target per ensemble member (paper Eq. 3); --no-per-member-target uses the min over members"""
    sampling: Literal["so2", "uniform"] = "so2"
    """so2: 256 online + 2304 from the mixed pool (official code); uniform: --batch-size from D_off u D_on"""
    mixed_batch_size: int = 2304
    """rows from the mixed pool in each online batch"""
    online_buffer_size: int = 1_000_000
    """capacity of the online buffer"""
    # evaluation
    eval_freq: int = 1_000
    """online evaluation every this many environment steps (and at step 0)"""
    offline_eval_freq: int = 50_000
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
        bound = 1 / in_features**0.5  # EDAC's fan-in uniform init for hidden layers, bias 0.1
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.constant_(self.bias, 0.1)

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
        nn.init.uniform_(self.net[-1].weight, -3e-3, 3e-3)
        nn.init.uniform_(self.net[-1].bias, -3e-3, 3e-3)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """[B, obs] and [B, act] (shared by all members) or [N, B, ...] (one per member) -> Q of shape [N, B]."""
        x = torch.cat([obs, action], dim=-1)
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.num_critics, -1, -1)
        return self.net(x).squeeze(-1)


class Actor(nn.Module):
    """Tanh-Gaussian policy: obs -> 256 -> 256 -> 256 -> (mu, log sigma in [-5, 2])."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        layers = []
        for n_in, n_out in itertools.pairwise((obs_dim, hidden, hidden, hidden)):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        for layer in self.trunk[::2]:
            bound = 1 / layer.in_features**0.5
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.constant_(layer.bias, 0.1)
        for head in (self.mu, self.log_std):
            nn.init.uniform_(head.weight, -1e-3, 1e-3)
            nn.init.uniform_(head.bias, -1e-3, 1e-3)

    def forward(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Action in (-1, 1) and its log-probability (tanh change of variables)."""
        hidden = self.trunk(obs)
        mu, log_std = self.mu(hidden), self.log_std(hidden).clamp(-5.0, 2.0)
        normal = torch.distributions.Normal(mu, log_std.exp(), validate_args=False)
        pre_tanh = mu if deterministic else normal.rsample()
        action = torch.tanh(pre_tanh)
        log_prob = normal.log_prob(pre_tanh).sum(-1) - torch.log(1 - action.pow(2) + 1e-6).sum(-1)
        return action, log_prob


# ---------------------------------------------------------------------------------------------------
# Buffers
# ---------------------------------------------------------------------------------------------------


def sample_so2(online: ReplayBuffer, pool: ReplayBuffer, n_online: int, n_pool: int, updates: int) -> torch.Tensor:
    """Official code: each minibatch is n_online rows from the online buffer plus n_pool from the mixed pool.

    All minibatches of one environment step come from one gather per buffer: [updates, rows, width].
    """
    online_rows = online.sample_rows(updates * n_online).view(updates, n_online, -1)
    return torch.cat([online_rows, pool.sample_rows(updates * n_pool).view(updates, n_pool, -1)], dim=1)


def sample_uniform(offline: ReplayBuffer, online: ReplayBuffer, n: int, updates: int) -> torch.Tensor:
    """The paper's literal reading: n rows uniformly from the union of the dataset and the online data."""
    index = torch.randint(0, 2**62, (updates * n,), device=offline.storage.device) % (offline.filled + online.filled)
    from_online = (index >= offline.filled).unsqueeze(1)
    offline_rows = offline.storage[index.clamp(max=offline.capacity - 1)]
    online_rows = online.storage[(index - offline.filled).clamp(min=0)]
    return torch.where(from_online, online_rows, offline_rows).view(updates, n, -1)


# ---------------------------------------------------------------------------------------------------
# Losses and updates
# ---------------------------------------------------------------------------------------------------


def perturb(action: torch.Tensor, noise_std: float, noise_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PVU: one clipped Gaussian draw per transition (shared by all members), then back into [-1, 1]."""
    noise = (torch.randn_like(action) * noise_std).clamp(-noise_clip, noise_clip)
    return (action + noise).clamp(-1.0, 1.0), noise


def bellman_target(target_q, next_log_prob, reward, done, alpha, gamma, per_member: bool) -> torch.Tensor:
    """y = r + gamma (1 - d) (Q'(s', a') - alpha log pi(a'|s')); per member [N, B], or the min [B]."""
    next_value = target_q if per_member else target_q.min(0).values
    return reward + gamma * (1.0 - done) * (next_value - alpha * next_log_prob)


@torch.compiler.disable  # a double backward, which AOTAutograd cannot compile: eager inside compiled updates
def diversity_loss(critic: Critic, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """EDAC: mean over the batch of sum_{i != j} <g_i, g_j> / (N - 1), g_i = normalised grad_a Q_i(s, a)."""
    n = critic.num_critics
    member_actions = action.unsqueeze(0).expand(n, -1, -1).clone().requires_grad_(True)
    q = critic(obs.unsqueeze(0).expand(n, -1, -1), member_actions)
    grads = torch.autograd.grad(q.sum(), member_actions, create_graph=True)[0]
    grads = grads / (grads.norm(dim=-1, keepdim=True) + 1e-10)
    gram = torch.einsum("ibd,jbd->bij", grads, grads)
    off_diagonal = gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return off_diagonal.mean() / (n - 1)


class SO2:
    """Networks, optimisers and the two update rules (offline EDAC, online SO2)."""

    def __init__(self, obs_dim: int, act_dim: int, num_critics: int, args: Args, device: torch.device):
        self.args, self.device = args, device
        self.actor = Actor(obs_dim, act_dim, args.hidden_dim).to(device)
        self.critic = Critic(obs_dim, act_dim, num_critics, args.hidden_dim).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.target_entropy = -float(act_dim)
        self.actor_optimizer = adam(self.actor.parameters(), args.offline_lr, args.cudagraphs)
        self.critic_optimizer = adam(self.critic.parameters(), args.offline_lr, args.cudagraphs)
        self.alpha_optimizer = adam([self.log_alpha], args.offline_lr, args.cudagraphs)
        self.act = torch.compile(self.actor) if args.compile else self.actor  # the acting policy
        self.auto_alpha = True
        self.critic_updates = 0

    def alpha_loss(self, log_prob: torch.Tensor) -> torch.Tensor:
        return -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()

    def actor_loss(self, obs: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        action, log_prob = self.actor(obs)
        return (alpha * log_prob - self.critic(obs, action).min(0).values).mean(), log_prob

    def offline_update(self, batch: tuple[torch.Tensor, ...], eta: float) -> dict[str, torch.Tensor]:
        """One EDAC step: all losses from the pre-step parameters, then alpha, actor, critics, targets."""
        obs, action, reward, next_obs, done, _ = batch
        alpha = self.log_alpha.exp().detach()
        actor_loss, log_prob = self.actor_loss(obs, alpha)
        alpha_loss = self.alpha_loss(log_prob)
        zero_grad(self.alpha_optimizer)
        zero_grad(self.actor_optimizer)
        # One backward per forward graph (what torch.compile needs): the critic losses come after this one.
        # Each term reaches its own parameters; what the actor loss leaves on the critics is dropped below.
        (alpha_loss + actor_loss).backward()
        with torch.no_grad():
            next_action, next_log_prob = self.actor(next_obs)
            target_q = self.critic_target(next_obs, next_action)
            y = bellman_target(target_q, next_log_prob, reward, done, alpha, self.args.gamma, per_member=False)
        q = self.critic(obs, action)
        td_loss = (q - y).pow(2).mean(1).sum()  # EDAC: sum over members of the batch-mean MSE
        div_loss = diversity_loss(self.critic, obs, action) if eta > 0 else torch.zeros((), device=self.device)
        critic_loss = td_loss + eta * div_loss
        zero_grad(self.critic_optimizer)  # drops what the actor loss left on the critics
        critic_loss.backward()
        self.alpha_optimizer.step()
        self.actor_optimizer.step()
        self.critic_optimizer.step()
        soft_update(self.critic_target, self.critic, self.args.tau)
        return {
            "offline/qf_loss": td_loss.detach() / q.shape[0],  # logged per member, as online
            "offline/diversity_loss": div_loss.detach(),
            "offline/qf_values": q.mean().detach(),
            "offline/actor_loss": actor_loss.detach(),
            "offline/alpha_loss": alpha_loss.detach(),
            "offline/alpha": alpha,
            "offline/entropy": -log_prob.mean().detach(),
        }

    def hand_over(self) -> None:
        """Card 2.3: fresh Adam at the online lr, fixed alpha, targets = copies of the pretrained critics."""
        args = self.args
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.actor_optimizer = adam(self.actor.parameters(), args.online_lr, args.cudagraphs)
        self.critic_optimizer = adam(self.critic.parameters(), args.online_lr, args.cudagraphs)
        with torch.no_grad():
            self.log_alpha.fill_(float(np.log(args.online_alpha)))
        self.alpha_optimizer = adam([self.log_alpha], args.online_lr, args.cudagraphs)
        self.auto_alpha = args.online_auto_alpha
        self.critic_updates = 0

    def online_target(self, next_obs, reward, done) -> tuple[torch.Tensor, torch.Tensor]:
        """Perturbed Value Update target [N, B]: noisy next action in Q', entropy of the un-noised one."""
        args, alpha = self.args, self.log_alpha.exp().detach()
        with torch.no_grad():
            next_action, next_log_prob = self.actor(next_obs)
            noisy_action, noise = perturb(next_action, args.target_noise, args.noise_clip)
            target_q = self.critic_target(next_obs, noisy_action)
            y = bellman_target(target_q, next_log_prob, reward, done, alpha, args.gamma, args.per_member_target)
        return y, noise

    def online_critic_update(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        obs, action, reward, next_obs, done, is_online = batch
        y, noise = self.online_target(next_obs, reward, done)
        q = self.critic(obs, action)
        critic_loss = (q - y).pow(2).mean()  # official code: mean over members and batch
        optimizer_step(self.critic_optimizer, critic_loss)
        soft_update(self.critic_target, self.critic, self.args.tau)
        return {
            "losses/qf_loss": critic_loss.detach(),
            "losses/qf_values": q.mean().detach(),
            "charts/pvu_noise": noise.abs().mean(),
            "charts/offline_share": 1.0 - is_online.mean(),
        }

    def online_actor_update(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        alpha = self.log_alpha.exp().detach()
        actor_loss, log_prob = self.actor_loss(obs, alpha)
        optimizer_step(self.actor_optimizer, actor_loss)
        if self.auto_alpha:
            alpha_loss = self.alpha_loss(log_prob)
            optimizer_step(self.alpha_optimizer, alpha_loss)
        return {
            "losses/actor_loss": actor_loss.detach(),
            "losses/alpha": alpha,
            "losses/entropy": -log_prob.mean().detach(),
        }

    def policy(self, obs: np.ndarray, deterministic: bool) -> np.ndarray:
        with torch.no_grad():
            action, _ = self.act(torch.as_tensor(obs, dtype=torch.float32, device=self.device), deterministic)
        return action.cpu().numpy()

    def q_min(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            to_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)
            return self.critic(to_tensor(obs), to_tensor(action)).min(0).values.cpu().numpy()

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().cpu(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
            "critic_updates": self.critic_updates,
            "num_critics": self.critic.num_critics,
        }

    def load_state_dict(self, checkpoint: dict) -> None:
        """Everything state_dict holds (for --resume; --pretrained takes the networks only)."""
        for name in ("actor", "critic", "critic_target", "actor_optimizer", "critic_optimizer", "alpha_optimizer"):
            getattr(self, name).load_state_dict(checkpoint[name])
        with torch.no_grad():
            self.log_alpha.copy_(checkpoint["log_alpha"])
        self.critic_updates = checkpoint["critic_updates"]


# ---------------------------------------------------------------------------------------------------
# Logging, checkpoints, evaluation
# ---------------------------------------------------------------------------------------------------


def policy_from_checkpoint(checkpoint: dict):
    """The deterministic actor of a checkpoint as obs -> action (used by utils.make_dataset)."""
    actor = Actor(checkpoint["obs_dim"], checkpoint["act_dim"], checkpoint["args"]["hidden_dim"])
    actor.load_state_dict(checkpoint["actor"])
    actor.eval()

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return actor(torch.as_tensor(obs, dtype=torch.float32), deterministic=True)[0].numpy()

    return act


def log_evaluation(writer, agent: SO2, env, args: Args, data: OfflineData, prefix: str, step: int, seed: int):
    q = {"q_function": agent.q_min, "gamma": args.gamma} if prefix == "eval" else {}  # the actor's min over N
    policy = lambda obs: agent.policy(obs, deterministic=True)
    result = evaluate(env, policy, args.eval_episodes, seed, minari_ref_scores=data.minari_ref_scores, **q)
    return write_scores(writer, result, prefix, step)


# ---------------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------------


def offline_step(agent: SO2, dataset: ReplayBuffer, args: Args, eta: float) -> dict[str, torch.Tensor]:
    """One EDAC update on a uniform minibatch of the dataset."""
    return agent.offline_update(dataset.split(dataset.sample_rows(args.batch_size)), eta)


def offline_phase(
    agent: SO2, data: OfflineData, dataset: ReplayBuffer, eval_env, writer, args: Args, eta, save=None, resume=None
):
    """EDAC updates from step 1, or from the step after `resume`'s; `save` writes checkpoint.pt."""
    update = FastUpdate(partial(offline_step, agent, dataset, args, eta), args.compile, args.cudagraphs)
    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "offline", step, args.seed + 100)
    offline_loop(args, writer, lambda step: update(), evaluate, save, resume)


def actor_steps(agent: SO2, args: Args) -> tuple[bool, ...]:
    """Which of the next N_upc critic updates are followed by an actor update (every actor_update_freq-th)."""
    return tuple((agent.critic_updates + i) % args.actor_update_freq == 0 for i in range(1, args.updates_per_step + 1))


def online_updates(agent: SO2, online: ReplayBuffer, pool: ReplayBuffer, args: Args, actor_after) -> list[dict]:
    """The updates of one environment step: N_upc critic updates, the actor's after those `actor_after` marks.

    A function of device state and that tuple alone, so --compile and --cudagraphs treat the block as one step;
    the caller advances agent.critic_updates.
    """
    if args.sampling == "so2":
        minibatches = sample_so2(online, pool, args.batch_size, args.mixed_batch_size, args.updates_per_step)
    else:
        minibatches = sample_uniform(pool, online, args.batch_size, args.updates_per_step)
    results = []
    for rows, actor_update in zip(minibatches, actor_after, strict=True):
        batch = online.split(rows)
        results.append(agent.online_critic_update(batch))
        if actor_update:
            results.append(agent.online_actor_update(batch[0]))
    return results


def online_phase(
    agent: SO2, data: OfflineData, pool: ReplayBuffer, env, eval_env, writer, args: Args, save=None, resume=None
):
    """N_upc critic updates per env step after the warm-up, on online rows plus the mixed pool; exploration is the
    stochastic policy, nothing else. With `resume` it continues after the checkpoint's step (utils.run.online_loop).
    """
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    online = ReplayBuffer(min(args.online_buffer_size, args.online_steps), obs_dim, act_dim, agent.device)
    if resume is not None:
        online.load_state_dict(resume["online"])
        pool.load_state_dict(resume["pool"])
    block = FastUpdate(partial(online_updates, agent, online, pool, args), args.compile, args.cudagraphs)

    def store(step: int, obs, action, reward, next_obs, terminated, ended) -> None:
        row = transition_rows(obs[None], action[None], np.array([reward]), next_obs[None], np.array([terminated]), True)
        row = torch.from_numpy(row).to(agent.device)
        online.add(row)
        if step > args.warmup_steps and args.sampling == "so2":
            pool.add(row)  # overwrites the oldest pool slot (a shuffled offline transition at first)

    def train(step: int, metrics: Metrics) -> int:
        if step <= args.warmup_steps:
            return 0
        metrics.add(*block(actor_steps(agent, args)))
        agent.critic_updates += args.updates_per_step
        return args.updates_per_step

    act = lambda step, obs: agent.policy(obs, deterministic=False)
    evaluate = lambda step: log_evaluation(writer, agent, eval_env, args, data, "eval", step, args.seed + 100)
    state = lambda: {"online": online.state_dict(), "pool": pool.state_dict()}
    online_loop(args, writer, env, agent.device, act, store, train, evaluate, state, save, resume)
    return online


def check_args(args: Args, data: OfflineData) -> tuple[int, float]:
    """Resolve the per-dataset defaults and refuse budgets the phases cannot run with."""
    positive = ("updates_per_step", "actor_update_freq", "eval_freq", "offline_eval_freq", "batch_size")
    check_bounds(args, positive, ("offline_steps", "online_steps", "warmup_steps", "mixed_batch_size"))
    num_critics = args.num_critics or (50 if data.task == "hopper" else 10)
    medium_expert = data.name in ("halfcheetah-medium-expert", "walker2d-medium-expert")
    eta = args.eta if args.eta is not None else (5.0 if medium_expert else 1.0)
    if args.online_steps and args.online_steps <= args.warmup_steps:
        raise UserError(f"--online-steps {args.online_steps} leaves nothing after the warm-up; lower --warmup-steps")
    if eta > 0 and num_critics < 2:
        raise UserError("the EDAC diversity term needs --num-critics >= 2; or set --eta 0 (SAC-N)")
    return num_critics, eta


def main(args: Args) -> Path:
    run = Run(args, "so2", "an SO2")
    checkpoint = run.pretrained()
    if checkpoint is not None:  # the networks of the offline run
        run.adopt({"num_critics": checkpoint["num_critics"], "hidden_dim": checkpoint["args"]["hidden_dim"]})
    data = load_dataset(args.env_id)
    num_critics, eta = check_args(args, data)
    writer, env, eval_env = run.open(data, checkpoint)
    obs_dim, act_dim = data.observations.shape[1], data.actions.shape[1]
    agent = SO2(obs_dim, act_dim, num_critics, args, run.device)

    # The dataset lives on the device in shuffled order: the offline sampler, and then the mixed pool.
    order = np.random.permutation(len(data))
    columns = (data.observations, data.actions, data.rewards, data.next_observations, data.terminals)
    pool = ReplayBuffer.of(transition_rows(*(column[order] for column in columns), False), obs_dim, act_dim, run.device)

    save, resume = run.saver(agent), run.resume
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
        offline_phase(agent, data, pool, eval_env, writer, args, eta, save, resume)
        if args.save_model:
            run.write("offline.pt", agent, "offline", args.offline_steps)
    if args.online_steps > 0:
        if not resumed_online:
            agent.hand_over()
        online_phase(agent, data, pool, env, eval_env, writer, args, save, resume if resumed_online else None)
    return run.finish(agent, args.online_steps)


if __name__ == "__main__":
    cli(main, Args)
