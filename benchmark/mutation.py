"""Mutation check: each edit switches one mechanism off where it enters the update; some test must fail.

    python benchmark/mutation.py --scripts so2 enoto --out benchmark/results/mutation.md

Every edit is applied alone to a scratch copy of the repository (never to this tree), then the script's
test file and its cases of tests/test_edges.py and tests/test_resume.py run there with `pytest -x`
(in-process tests; the subprocess smoke tests too with --with-slow). An edit the tests pass is MISSED: a mechanism
that can be deleted without any test noticing. An edit whose text no longer occurs exactly once is reported
as stale, so the list cannot silently stop testing anything. An edit that changes no behaviour (an
equivalent mutant, such as freezing a network no optimiser holds) does not belong in the list.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Edits shared by the scripts whose buffers are spelled alike. Not SAMPLER_BOUND for OPT, BAQ and Off2On: they
# sample their plain buffer only offline, where its size never changes (online they draw from their own
# replays), so that edit is an equivalent mutant there.
SAMPLER_BOUND = (
    "fast path: the sampler's bound is the host-side size (a CUDA graph would freeze it)",
    "torch.randint(0, 2**62, (n,), device=self.storage.device) % self.filled]",
    "torch.randint(0, self.size, (n,), device=self.storage.device)]",
    "utils/buffers.py",
)
# ENOTO and Off2On fit and apply the dataset's state statistics with the same lines.
STATE_STATISTICS = (
    "states: the statistics are never taken from the dataset",
    "agent.obs_mean, agent.obs_std = data.observations.mean(0), data.observations.std(0) + 1e-3",
    "pass",
)
ONLINE_ROW_STATES = (
    "states: the online rows are not standardised",
    "states = agent.normalize(np.stack([obs, next_obs]))",
    "states = np.stack([obs, next_obs]).astype(np.float32)",
)
PRIORITY_BOUND = (
    "fast path: the prioritized draw is clamped by the host-side size",
    "torch.minimum(block * SAMPLER_BLOCK + offset, self.buffer.filled - 1)",
    "(block * SAMPLER_BLOCK + offset).clamp_(max=self.buffer.size - 1)",
    "utils/buffers.py",
)

# script -> [(mechanism, text, its replacement[, file])]: the text is in algorithms/<script>.py unless a file (shared
# code in utils/) is named; either way the script's tests must catch the edit.
MUTATIONS: dict[str, list[tuple[str, ...]]] = {
    "so2": [
        (
            "resume: the mixed pool is not restored",
            '        pool.load_state_dict(resume["pool"])\n',
            "",
        ),
        (
            "resume: the critic update counter is not restored",
            '        self.critic_updates = checkpoint["critic_updates"]\n',
            "",
        ),
        (
            "PVU: the target critic gets the un-noised next action",
            "target_q = self.critic_target(next_obs, noisy_action)",
            "target_q = self.critic_target(next_obs, next_action)",
        ),
        (
            "PVU: the noise is not clipped",
            "noise = (torch.randn_like(action) * noise_std).clamp(-noise_clip, noise_clip)",
            "noise = torch.randn_like(action) * noise_std",
        ),
        (
            "hand-over: targets are not copied from the critics",
            "        self.critic_target.load_state_dict(self.critic.state_dict())\n",
            "",
        ),
        (
            "hand-over: the critic optimiser keeps the offline learning rate",
            "self.critic_optimizer = adam(self.critic.parameters(), args.online_lr, args.cudagraphs)",
            "self.critic_optimizer = adam(self.critic.parameters(), args.offline_lr, args.cudagraphs)",
        ),
        (
            "hand-over: the actor optimiser keeps the offline learning rate",
            "self.actor_optimizer = adam(self.actor.parameters(), args.online_lr, args.cudagraphs)",
            "self.actor_optimizer = adam(self.actor.parameters(), args.offline_lr, args.cudagraphs)",
        ),
        (
            "hand-over: alpha is not set to the fixed online value",
            "self.log_alpha.fill_(float(np.log(args.online_alpha)))",
            "self.log_alpha.add_(0.0)",
        ),
        (
            "hand-over: alpha keeps being tuned online",
            "self.auto_alpha = args.online_auto_alpha",
            "self.auto_alpha = True",
        ),
        (
            "online target: min over members instead of per member",
            "next_value = target_q if per_member else target_q.min(0).values",
            "next_value = target_q.min(0).values",
        ),
        (
            "offline target: per member instead of the shared minimum",
            "y = bellman_target(target_q, next_log_prob, reward, done, alpha, self.args.gamma, per_member=False)",
            "y = bellman_target(target_q, next_log_prob, reward, done, alpha, self.args.gamma, per_member=True)",
        ),
        (
            "target: terminations ignored",
            "return reward + gamma * (1.0 - done) * (next_value - alpha * next_log_prob)",
            "return reward + gamma * (next_value - alpha * next_log_prob)",
        ),
        (
            "online: no target soft update",
            "        soft_update(self.critic_target, self.critic, self.args.tau)\n"
            '        return {\n            "losses/qf',
            '        return {\n            "losses/qf',
        ),
        (
            "online: an actor update after every critic update",
            "return tuple((agent.critic_updates + i) % args.actor_update_freq == 0 for",
            "return tuple(True for",
        ),
        (
            "actor: mean over critics instead of the minimum",
            "return (alpha * log_prob - self.critic(obs, action).min(0).values).mean(), log_prob",
            "return (alpha * log_prob - self.critic(obs, action).mean(0)).mean(), log_prob",
        ),
        (
            "offline: the EDAC diversity term never reaches the critic loss",
            "critic_loss = td_loss + eta * div_loss",
            "critic_loss = td_loss",
        ),
        (
            "mixed pool: online rows never enter it",
            "            pool.add(row)  # overwrites the oldest pool slot",
            "            pass  # overwrites the oldest pool slot",
        ),
        (
            "sampling: the online share comes from the pool",
            "online_rows = online.sample_rows(updates * n_online).view(updates, n_online, -1)",
            "online_rows = pool.sample_rows(updates * n_online).view(updates, n_online, -1)",
        ),
        (
            "warm-up: updates start at the first step",
            "        if step <= args.warmup_steps:\n            return 0",
            "        if step <= 0:\n            return 0",
        ),
        (
            "online: a truncation is stored as terminal",
            "np.array([terminated]), True)",
            "np.array([ended]), True)",
        ),
        (
            "online: N_upc 1 instead of --updates-per-step",
            "minibatches = sample_so2(online, pool, args.batch_size, args.mixed_batch_size, args.updates_per_step)",
            "minibatches = sample_so2(online, pool, args.batch_size, args.mixed_batch_size, 1)",
        ),
        (
            "evaluation: stochastic actions",
            "    policy = lambda obs: agent.policy(obs, deterministic=True)\n",
            "    policy = lambda obs: agent.policy(obs, deterministic=False)\n",
        ),
        (
            "EDAC diversity: the action gradients are not normalised",
            "    grads = grads / (grads.norm(dim=-1, keepdim=True) + 1e-10)\n",
            "",
        ),
        (
            "per-dataset default: hopper gets 10 critics, not 50",
            'num_critics = args.num_critics or (50 if data.task == "hopper" else 10)',
            "num_critics = args.num_critics or 10",
        ),
        (
            "per-dataset default: eta 1 on medium-expert",
            "eta = args.eta if args.eta is not None else (5.0 if medium_expert else 1.0)",
            "eta = args.eta if args.eta is not None else 1.0",
        ),
        (
            "actor: log sigma clamped to [-20, 2] instead of [-5, 2]",
            "mu, log_std = self.mu(hidden), self.log_std(hidden).clamp(-5.0, 2.0)",
            "mu, log_std = self.mu(hidden), self.log_std(hidden).clamp(-20.0, 2.0)",
        ),
        (
            "offline: the temperature loss has the wrong sign",
            "return -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()",
            "return (self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()",
        ),
        SAMPLER_BOUND,
        (
            "fast path: the EDAC diversity term (a double backward) is compiled too",
            "@torch.compiler.disable  # a double backward",
            "# a double backward",
        ),
    ],
    "enoto": [
        (
            "resume: the online buffer is not restored",
            '        online.load_state_dict(resume["online"])\n',
            "",
        ),
        (
            "resume: the RNG streams are not restored",
            "        run.restore_rng()\n",
            "        pass\n",
        ),
        (
            "resume: the events after the checkpoint are not cut off",
            '        rewind_events(self.path, self.resume["events"])',
            "        pass",
            "utils/run.py",
        ),
        (
            "resume: the run's device and checkpoint cadence give way to the defaults",
            "            keep_run_settings(args.resume, args)",
            "            pass",
            "utils/run.py",
        ),
        (
            "resume: unflushed metrics are lost",
            '        metrics.sums, metrics.counts = resume["metrics"]\n        (updates, logged_at',
            "        (updates, logged_at",
            "utils/run.py",
        ),
        (
            "SUNRISE: the weight is computed but not passed to the critic loss",
            "results |= self.update_critic(batch, y, weight)",
            "results |= self.update_critic(batch, y)",
        ),
        (
            "SUNRISE: the weight multiplies nothing in the TD loss",
            "td_loss = (weight * (q - y).pow(2)).mean(1).sum()",
            "td_loss = (q - y).pow(2).mean(1).sum()",
        ),
        (
            "SUNRISE: the weight ignores the ensemble spread",
            "weight = sunrise_weight(target_q.std(0, correction=0), args.sunrise_temperature)",
            "weight = sunrise_weight(torch.zeros_like(reward), args.sunrise_temperature)",
        ),
        (
            "CQL: the gap carries no gradient",
            'critic_loss, results["cql_loss"] = td_loss + cql_loss, cql_loss.detach()',
            'critic_loss, results["cql_loss"] = td_loss + cql_loss.detach(), cql_loss.detach()',
        ),
        (
            "CQL: the logsumexp leaves out the pi(s') actions",
            "actions = torch.cat([uniform_actions, policy_actions], dim=1)",
            "actions = torch.cat([uniform_actions, policy_actions[:, :batch].repeat(1, 2, 1)], dim=1)",
        ),
        (
            "hand-over: the CQL term stays online",
            "self.cql_weight = self.args.cql_weight if self.args.keep_cql_online else 0.0",
            "self.cql_weight = self.args.cql_weight",
        ),
        (
            "online target: the --q-target rule is ignored (min over members)",
            "soft_value = ensemble_target(target_q, args.q_target) - alpha * next_log_prob",
            "soft_value = target_q.min(0).values - alpha * next_log_prob",
        ),
        (
            "online target: no entropy term",
            "soft_value = ensemble_target(target_q, args.q_target) - alpha * next_log_prob",
            "soft_value = ensemble_target(target_q, args.q_target)",
        ),
        (
            "offline target: a sampled next action instead of tanh(mu)",
            "            next_action, _ = self.actor(next_obs, deterministic=True)\n            return reward",
            "            next_action, _ = self.actor(next_obs)\n            return reward",
        ),
        (
            "WeightedMinPair: pair counts reversed (a max-pair mean)",
            "pair_counts = torch.arange(n - 1, -1, -1, device=q.device, dtype=q.dtype)",
            "pair_counts = torch.arange(0, n, device=q.device, dtype=q.dtype)",
        ),
        (
            "UCB: the candidates are scored by their mean only",
            "return (q.mean(0) + ucb_lambda * q.std(0, correction=0)).argmax()",
            "return q.mean(0).argmax()",
        ),
        (
            "exploration: UCB replaced by a plain policy sample",
            '            if mode == "none":',
            "            if True:",
        ),
        (
            "update order: the temperature is not updated online",
            "        results = self.update_alpha(obs)\n        y, weight = self.online_target(next_obs, reward, done)",
            "        results = {}\n        y, weight = self.online_target(next_obs, reward, done)",
        ),
        (
            "actor: mean over critics instead of the minimum",
            "actor_loss = (alpha * log_prob - self.critic(obs, action).min(0).values).mean()",
            "actor_loss = (alpha * log_prob - self.critic(obs, action).mean(0)).mean()",
        ),
        (
            "online: no target soft update",
            "        results |= self.update_actor(obs)\n        soft_update(self.critic_targ"
            'et, self.critic, self.args.tau)\n        return {f"losses/',
            '        results |= self.update_actor(obs)\n        return {f"losses/',
        ),
        (
            "warm-up: updates start at the first step",
            "if step <= args.warmup_steps or online.size < args.batch_size:",
            "if online.size < args.batch_size:",
        ),
        (
            "online: a truncation is stored as terminal",
            "states[1:], np.array([terminated]), True)",
            "states[1:], np.array([ended]), True)",
        ),
        STATE_STATISTICS,
        (
            "states: the dataset rows are not standardised",
            "columns = (agent.normalize(data.observations),",
            "columns = (data.observations,",
        ),
        ONLINE_ROW_STATES,
        (
            "states: exploration acts on raw states",
            "torch.as_tensor(self.normalize(obs), device=self.device)\n        if mode",
            "torch.as_tensor(obs.astype(np.float32), device=self.device)\n        if mode",
        ),
        (
            "evaluation: stochastic actions",
            "    policy = lambda obs: agent.policy(obs, deterministic=True)\n",
            "    policy = lambda obs: agent.policy(obs, deterministic=False)\n",
        ),
        (
            "AntMaze: the training reward is not shifted",
            'return (reward - 0.5) * 4.0 if task == "antmaze" else reward',
            "return reward",
        ),
        (
            "REM: fixed equal weights instead of a random convex combination",
            "beta = torch.rand(n, 1, device=q.device)",
            "beta = torch.ones(n, 1, device=q.device)",
        ),
        (
            "RandomMinPair: the same member twice",
            "return q[torch.randperm(n, device=q.device)[:2]].min(0).values",
            "return q[torch.zeros(2, dtype=torch.long, device=q.device)].min(0).values",
        ),
        (
            "OAC: the optimistic shift is not applied",
            "return torch.tanh(mu.detach() + shift + std * torch.randn_like(std))",
            "return torch.tanh(mu.detach() + std * torch.randn_like(std))",
        ),
        (
            "bootstrap exploration: the head is not redrawn per episode",
            "            head = random.randrange(agent.critic.num_critics)\n",
            "            pass\n",
        ),
        (
            "temperature: log alpha instead of alpha in d3rlpy's loss",
            "alpha_loss = -(self.log_alpha.exp() * (log_prob - self.act_dim)).mean()",
            "alpha_loss = -(self.log_alpha * (log_prob - self.act_dim)).mean()",
        ),
        (
            "CQL: the logsumexp without the importance-sampling densities",
            "values = (q.view(-1, samples, 3, batch) - log_density.view(samples, 3, batch)).permute(0, 3, 1, 2)",
            "values = q.view(-1, samples, 3, batch).permute(0, 3, 1, 2)",
        ),
        SAMPLER_BOUND,
    ],
    "off2on": [
        (
            "CQL: the logsumexp without the importance-sampling densities",
            "    values = q - log_density.repeat_interleave(2, 0).view(2 * n, samples, 3, batch)",
            "    values = q",
        ),
        (
            "resume: the balanced replay is not restored",
            '        replay.load_state_dict(resume["replay"])\n',
            "",
        ),
        (
            "resume: the offline update counter is not restored",
            '        self.offline_updates = checkpoint["offline_updates"]\n',
            "",
        ),
        (
            "balanced replay: the priorities are computed but never written back",
            "        replay.set_priorities(index, new_priorities)\n    else:",
            "        pass\n    else:",
        ),
        (
            "balanced replay: new rows do not enter at the running max",
            "        self.priority[self.buffer.size] = self.max_priority\n",
            "        self.priority[self.buffer.size] = 1.0\n",
            "utils/buffers.py",
        ),
        (
            "balanced replay: the running max starts at 1, not from --init-online-fraction",
            "        initial = len(dataset_rows) * f / ((1 - f) * args.block_steps)",
            "        initial = 1.0",
        ),
        (
            "priorities: the temperature is not applied",
            "    scaled = w.pow(1 / temperature)\n    return (scaled / (w_offline.pow(1 / temperature)",
            "    scaled = w\n    return (scaled / (w_offline.pow(1 / temperature)",
        ),
        (
            "priorities: not normalised by the offline minibatch",
            "    return (scaled / (w_offline.pow(1 / temperature).mean() + 1e-10)).clamp(1e-3, 1e3)",
            "    return scaled.clamp(1e-3, 1e3)",
        ),
        (
            "density: its loss never steps the density network",
            "self.step(self.alpha_optimizer, self.actor_optimizer, self.critic_optimizer, self.density_optimizer)",
            "self.step(self.alpha_optimizer, self.actor_optimizer, self.critic_optimizer)",
        ),
        (
            "density: the offline term of the JS loss is dropped",
            "    return offline_term - torch.log(2 * w_online / (w_online + 1) + 1e-10).mean()",
            "    return -torch.log(2 * w_online / (w_online + 1) + 1e-10).mean()",
        ),
        (
            "ensemble policy: the mean of the members only (no mixture variance)",
            "    variance = (std.pow(2) + mu.pow(2)).mean(0) - mean.pow(2)",
            "    variance = std.pow(2).mean(0)",
        ),
        (
            "online actor: one member's Q instead of the ensemble mean of twin minima",
            "actor_loss = (alpha * log_prob - self.critic.twin_min(obs, new_action).mean(0)).mean()",
            "actor_loss = (alpha * log_prob - self.critic.twin_min(obs, new_action)[0]).mean()",
        ),
        (
            "online target: no entropy term",
            "next_value = self.critic_target.twin_min(next_obs, next_action) - alpha * next_log_prob  # [N, B]",
            "next_value = self.critic_target.twin_min(next_obs, next_action)  # [N, B]",
        ),
        (
            "hand-over: targets are not copied from the critics",
            "        self.critic_target.load_state_dict(self.critic.state_dict())\n        self.actor_optimizer",
            "        self.actor_optimizer",
        ),
        (
            "hand-over: alpha is not reset to 1",
            "        self.log_alpha = torch.zeros((), device=self.device, requires_grad=True)\n",
            "        self.log_alpha = self.log_alpha.detach().mean().requires_grad_(True)\n",
        ),
        (
            "offline: no BC warm start",
            "results = update(agent.offline_updates < args.bc_steps)",
            "results = update(False)",
        ),
        (
            "offline: the CQL term carries no gradient",
            "self.backward(td_loss + cql_loss.sum(), self.critic_optimizer)",
            "self.backward(td_loss + cql_loss.sum().detach(), self.critic_optimizer)",
        ),
        (
            "evaluation: stochastic actions",
            "    policy = lambda obs: agent.policy(obs, deterministic=True)\n",
            "    policy = lambda obs: agent.policy(obs, deterministic=False)\n",
        ),
        (
            "schedule: the first block gets no extra updates",
            "multiplier = args.first_block_multiplier if block_start == 0 else 1",
            "multiplier = 1",
        ),
        (
            "online: a truncation is stored as terminal",
            "states[1:], np.array([terminated]), True)",
            "states[1:], np.array([ended]), True)",
        ),
        STATE_STATISTICS,
        (
            "states: the dataset rows are not standardised",
            "rows = transition_rows(states[0],",
            "rows = transition_rows(data.observations,",
        ),
        ONLINE_ROW_STATES,
        (
            "states: the policy acts on raw states",
            "obs_t = torch.as_tensor(self.normalize(obs), device=self.device)\n            action, _ = self.act(",
            "obs_t = torch.as_tensor(obs.astype(np.float32), device=self.device)\n            action, _ = self.act(",
        ),
        (
            "density: the online minibatch from all online rows, not the newest (FIFO)",
            "super().__init__(dataset_rows, online_steps, obs_dim, act_dim, initial, args.online_buffer_size)",
            "super().__init__(dataset_rows, online_steps, obs_dim, act_dim, initial)",
        ),
        (
            "twin minimum: the first twin only",
            "        return q.view(-1, 2, q.shape[-1]).min(1).values",
            "        return q.view(-1, 2, q.shape[-1])[:, 0]",
        ),
        PRIORITY_BOUND,
    ],
    "opt": [
        (
            "Online Pre-Training: the online rows' targets from Q_off's target network, not Q_on's own",
            "            y_online = self.td_target(critic_target, *online_batch[2:5])",
            "            y_online = self.td_target(self.q_off_target, *online_batch[2:5])",
        ),
        (
            "resume: the balanced replay is not restored",
            '        replay.load_state_dict(resume["replay"])\n',
            "",
        ),
        (
            "resume: the update counters are not restored",
            "        self.offline_updates, self.pretrain_updates, self.finetune_updates = counters\n",
            "",
        ),
        (
            "balanced replay: the priorities are computed but never written back",
            "        replay.set_priorities(index, new_priorities)\n",
            "",
        ),
        (
            "balanced replay: the running max starts at 1, not from --init-online-fraction",
            "        initial = len(dataset_rows) * f / ((1 - f) * max(args.n_tau, 1))",
            "        initial = 1.0",
        ),
        (
            "Eq. 4: kappa is ignored (Q_off only)",
            "            q = (1.0 - kappa) * q + kappa * self.q_on(obs, policy_action)[0]",
            "            q = q + 0.0 * self.q_on(obs, policy_action)[0]",
        ),
        (
            "Eq. 3: the online loss does not reach the meta objective",
            "    return offline_loss + c * online_loss, offline_loss.detach()",
            "    return offline_loss + c * online_loss.detach(), offline_loss.detach()",
        ),
        (
            "Eq. 3: the inner step is taken at the outer parameters (no adaptation)",
            "    online_loss = td_loss(adapted, *online)",
            "    online_loss = td_loss(params, *online)",
        ),
        (
            "Eq. 3: c is not detached",
            "        c = torch.where(online_loss > offline_loss, offline_loss / online_loss, 1.0).detach()",
            "        c = torch.where(online_loss > offline_loss, offline_loss / online_loss, 1.0)",
        ),
        (
            "fine-tuning: Q_on is not trained",
            '        pairs += [("qf_on", self.q_on, self.q_on_target, self.q_on_optimizer)]'
            " if self.q_on is not None else []",
            "        pairs += []",
        ),
        (
            "fine-tuning: the two critics draw their own target actions",
            "                y = self.td_target(critic_target, reward, next_obs, done, next_action)",
            "                y = self.td_target(critic_target, reward, next_obs, done)",
        ),
        (
            "TD3: no target policy smoothing",
            "        return (self.actor_target(next_obs) + noise).clamp(-1.0, 1.0)",
            "        return self.actor_target(next_obs).clamp(-1.0, 1.0)",
        ),
        (
            "TD3: the target is the first twin, not the minimum",
            "        return reward + self.gamma * (1.0 - done) * critic_target(next_obs, next_action).min(0).values",
            "        return reward + self.gamma * (1.0 - done) * critic_target(next_obs, next_action)[0]",
        ),
        (
            "TD3+BC: lambda is not held constant",
            "    lmbda = alpha / q1.abs().mean().detach()",
            "    lmbda = alpha / q1.abs().mean()",
        ),
        (
            "TD3+BC: the BC term is dropped",
            "    return -lmbda * q1.mean() + (policy_action - action).pow(2).mean()",
            "    return -lmbda * q1.mean()",
        ),
        (
            "kappa: held at its start value",
            "    return end if t >= steps else start + (end - start) * t / steps",
            "    return start",
        ),
        (
            "fine-tuning: the actor every update instead of every policy_freq",
            "metrics.add(update(agent.finetune_updates % args.policy_freq == 0))",
            "metrics.add(update(True))",
        ),
        (
            "evaluation: exploration noise",
            "    policy = lambda obs: agent.policy(obs, noise=0.0)\n",
            "    policy = lambda obs: agent.policy(obs, noise=0.1)\n",
        ),
        (
            "hand-over: SPOT's Adam states are not reset",
            '        if args.backbone == "spot":\n            self.actor_optimizer = adam',
            "        if False:\n            self.actor_optimizer = adam",
        ),
        (
            "online: a truncation is stored as terminal",
            "states[1:], np.array([terminated]), True)",
            "states[1:], np.array([ended]), True)",
        ),
        (
            "pre-training: the targets move every update, not every policy_freq",
            "return update(agent.pretrain_updates % args.policy_freq == 0)",
            "return update(True)",
        ),
        (
            "pre-training: one update fewer than N_pretrain",
            'update_loop(args, writer, "online pre-training", args.n_pretrain,',
            'update_loop(args, writer, "online pre-training", args.n_pretrain - 1,',
        ),
        (
            "per-dataset kappa: replay datasets start at 0.3",
            '(0.1, 0.9, 150_000) if "replay" in name else',
            '(0.3, 0.9, 150_000) if "replay" in name else',
        ),
        (
            "SPOT: lambda is not cooled online",
            "return args.spot_lambda * max(args.spot_lambda_end, 1.0 - update / args.spot_cool_steps)",
            "return args.spot_lambda",
        ),
        (
            "SPOT: the VAE term leaves the actor loss",
            "return -q.mean() / q.abs().mean().detach() + lmbda * neg_log_beta.mean()",
            "return -q.mean() / q.abs().mean().detach()",
        ),
        (
            "hand-over: the online discount is not applied",
            "        self.gamma = args.online_gamma",
            "        self.gamma = args.gamma",
        ),
        (
            "AntMaze: the training reward is not shifted",
            'return reward - 1.0 if task == "antmaze" else reward',
            "return reward",
        ),
        ONLINE_ROW_STATES,
        PRIORITY_BOUND,
        (
            "fast path: kappa and lambda are never written into their device tensors",
            "        agent.set_schedule(kappa)\n",
            "",
        ),
        (
            "fast path: the running max priority is written by copy_, which torch.compile drops on a 0-dim tensor",
            "self.max_priority[...] = torch.maximum(self.max_priority, self.priority[index].max())",
            "self.max_priority.copy_(torch.maximum(self.max_priority, self.priority[index].max()))",
            "utils/buffers.py",
        ),
    ],
    "baq": [
        (
            "resume: the priority replay is not restored",
            '        replay.load_state_dict(resume["replay"])\n',
            "",
        ),
        (
            "resume: IQL's cosine schedule restarts",
            '            self.actor_schedule.load_state_dict(checkpoint["actor_schedule"])',
            "            pass",
        ),
        (
            "Eq. 6: the weight is computed but not passed to the update",
            "agent.update(batch, w if args.use_weight else 1.0)",
            "agent.update(batch, 1.0)",
        ),
        (
            "Eq. 7: the weight multiplies nothing in the CQL TD term",
            "        td_loss = (weight * (q - y).pow(2)).mean(1).sum()",
            "        td_loss = (q - y).pow(2).mean(1).sum()",
        ),
        (
            "Eq. 8: the weight leaves IQL's V loss",
            "value_loss = expectile_loss(target_q - value, args.expectile, weight)",
            "value_loss = expectile_loss(target_q - value, args.expectile, 1.0)",
        ),
        (
            "Eq. 9: the weight leaves IQL's Q loss",
            "q_loss = 0.5 * (weight * (q - y).pow(2)).mean(1).sum()",
            "q_loss = 0.5 * (q - y).pow(2).mean(1).sum()",
        ),
        (
            "Eq. 6: k_q is ignored (w = exp(-mse))",
            "    return torch.exp(-bc_mse.detach() / k_q)",
            "    return torch.exp(-bc_mse.detach())",
        ),
        (
            "Eq. 10: priorities ignored (uniform draws)",
            "    index = replay.sample(args.batch_size, args.use_priority)",
            "    index = replay.sample(args.batch_size, False)",
        ),
        (
            "Eq. 10: new online rows enter with rho = 1, not their own",
            "        replay.add(row, bc_mse, priority(distance, k_rho, args.priority_alpha))",
            "        replay.add(row, bc_mse, torch.ones_like(distance))",
        ),
        (
            "Eq. 10: alpha is not applied",
            "    return (distance / k_rho + 1.0).pow(alpha)",
            "    return distance / k_rho + 1.0",
        ),
        (
            "calibration: k_q from the offline median only",
            "    k_q = args.k_q or max(m_off, m_probe, 1e-8) / math.log(2)",
            "    k_q = args.k_q or max(m_off, 1e-8) / math.log(2)",
        ),
        (
            "calibration: k_rho is not the median distance",
            "    k_rho = args.k_rho or max(distance.median().item(), 1e-8)",
            "    k_rho = args.k_rho or max(distance.mean().item(), 1e-8)",
        ),
        (
            "hand-over: the CQL weight stays the offline one",
            "        self.cql_weight = self.args.cql_weight_online",
            "        self.cql_weight = self.args.cql_weight",
        ),
        (
            "hand-over: IQL's actor lr is not set to the constant online rate",
            "            for group in self.actor_optimizer.param_groups:\n                gr"
            'oup["lr"].fill_(self.args.iql_lr)',
            "            for group in self.actor_optimizer.param_groups:\n                pass",
        ),
        (
            "CQL: the gap carries no gradient",
            "        (td_loss + cql_loss).backward()",
            "        (td_loss + cql_loss.detach()).backward()",
        ),
        (
            "evaluation: stochastic actions",
            "    policy = lambda obs: agent.policy(obs, deterministic=True)\n",
            "    policy = lambda obs: agent.policy(obs, deterministic=False)\n",
        ),
        (
            "IQL: the advantage weight is not clamped",
            "advantage_weight = torch.exp(args.iql_beta * (target_q - value.detach())).clamp(max=100.0)",
            "advantage_weight = torch.exp(args.iql_beta * (target_q - value.detach()))",
        ),
        (
            "online: a truncation is stored as terminal",
            "states[1:], np.array([terminated]), True)",
            "states[1:], np.array([ended]), True)",
        ),
        ONLINE_ROW_STATES,
        (
            "online: the reward scale is not applied",
            "rewards = np.array([reward * agent.reward_scale])",
            "rewards = np.array([reward])",
        ),
        (
            "IQL: the V target from the critics, not the target critics",
            "            target_q = self.critic_target(obs, action).min(0).values",
            "            target_q = self.critic(obs, action).min(0).values.detach()",
        ),
        (
            "fast path: the priority draw reads the host-side size",
            "total = self.cumulative.index_select(0, last.view(1))",
            "total = self.cumulative[self.buffer.size - 1]",
            "utils/buffers.py",
        ),
    ],
}


def edited_file(script: str, file: list[str]) -> str:
    """Where an edit's text is: the named shared file, else the script."""
    return file[0] if file else f"algorithms/{script}.py"


def scratch_copy(source: Path, destination: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "behavior")
    return Path(shutil.copytree(source, destination / "repo", ignore=ignore))


def run_tests(repo: Path, script: str, timeout: float, with_slow: bool) -> tuple[bool, float]:
    """True when some test failed (the edit was caught), and the seconds it took."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += [
        f"tests/test_{script}.py",
        "tests/test_edges.py",
        "tests/test_resume.py",
        "tests/test_fast.py",
        "-k",
        script,
        *([] if with_slow else ["-m", "not slow"]),
    ]
    try:
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=timeout)
        caught = result.returncode != 0
    except subprocess.TimeoutExpired:
        caught = True  # a hang is noticed too
    return caught, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", nargs="+", default=list(MUTATIONS), choices=list(MUTATIONS))
    parser.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    parser.add_argument("--with-slow", action="store_true", help="also run the subprocess smoke tests (slow)")
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="the tree to mutate, e.g. a worktree of an older commit"
    )
    parser.add_argument("--skip-done", type=Path, default=None, help="a table of an earlier run: skip its edits")
    parser.add_argument("--only", nargs="+", default=None, help="only the edits whose mechanism contains one of these")
    args = parser.parse_args()
    rows = ["| script | mechanism switched off | result | seconds |", "| --- | --- | --- | ---: |"]
    done = args.skip_done.read_text() if args.skip_done else ""
    for script in args.scripts:
        for mechanism, old, new, *file in MUTATIONS[script]:
            if f"| {script} | {mechanism} |" in done or (args.only and not any(w in mechanism for w in args.only)):
                continue
            with tempfile.TemporaryDirectory() as scratch:
                repo = scratch_copy(args.repo, Path(scratch))
                path = repo / edited_file(script, file)
                text = path.read_text()
                if text.count(old) != 1:
                    result, seconds = f"stale ({text.count(old)} matches)", 0.0
                else:
                    path.write_text(text.replace(old, new))
                    caught, seconds = run_tests(repo, script, args.timeout, args.with_slow)
                    result = "caught" if caught else "MISSED"
            rows.append(f"| {script} | {mechanism} | {result} | {seconds:.0f} |")
            print(rows[-1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
