"""Off2On: the card's testable properties with exact numbers, a smoke run, and a CUDA variant."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from algorithms import off2on, opt
from tests.conftest import assert_sgd_step, main_error, no_host_sync, recording_env, scalars, script_run
from utils import load_dataset, make_env
from utils.buffers import SAMPLER_BLOCK

OBS, ACT = 4, 3


def tiny_agent(num_agents=3, device="cpu", **overrides) -> off2on.Off2On:
    torch.manual_seed(0)
    args = off2on.Args(num_agents=num_agents, hidden_dim=16, **overrides)
    return off2on.Off2On(OBS, ACT, args, torch.device(device))


def random_rows(n: int, is_online: bool = False) -> torch.Tensor:
    rows = off2on.transition_rows(
        np.random.randn(n, OBS), np.random.uniform(-1, 1, (n, ACT)), np.random.randn(n), np.random.randn(n, OBS),
        np.zeros(n), is_online,
    )  # fmt: skip
    return torch.from_numpy(rows)


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(float)


def test_density_net_is_non_negative_starts_at_one_and_bounds_the_loss():
    torch.manual_seed(0)
    net = off2on.DensityNet(OBS, ACT, 32)
    obs, action = torch.randn(512, OBS), torch.rand(512, ACT) * 2 - 1
    w = net(obs, action)
    assert (w - 1).abs().max() < 0.05
    assert abs(off2on.density_loss(w, net(obs.flip(0), action)).item()) < 0.05
    assert (net(obs * 1e4, action * 1e4) >= 0).all() and (net(-obs * 1e4, action) >= 0).all()
    for _ in range(100):  # any non-negative outputs: L_w >= -2 ln 2 (its minimum is -2 JSD)
        w_on, w_off = torch.rand(64) * torch.rand(1) * 50, torch.rand(64) * torch.rand(1) * 50
        assert off2on.density_loss(w_on, w_off).item() >= -2 * math.log(2) - 1e-6
    assert off2on.density_loss(torch.ones(8), torch.ones(8)).item() == pytest.approx(0.0, abs=1e-6)


def test_density_ratio_ranks_online_like_samples_higher():
    """Offline N(0, I), online N(e1, I): the true ratio is exp(x1 - 0.5) (card property 2)."""
    torch.manual_seed(0)
    net = off2on.DensityNet(4, 0, 256)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-4)
    shift, empty = torch.tensor([1.0, 0, 0, 0]), torch.zeros(256, 0)
    for _ in range(1000):
        loss = off2on.density_loss(net(torch.randn(256, 4) + shift, empty), net(torch.randn(256, 4), empty))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        offline, online = torch.randn(4000, 4), torch.randn(4000, 4) + shift
        w_offline, w_online = net(offline, torch.zeros(4000, 0)), net(online, torch.zeros(4000, 0))
    points = torch.cat([offline, online])
    w, true_ratio = torch.cat([w_offline, w_online]).numpy(), torch.exp(points[:, 0] - 0.5).numpy()
    spearman = np.corrcoef(ranks(w), ranks(true_ratio))[0, 1]
    assert spearman >= 0.9
    assert 0.8 <= w_offline.mean().item() <= 1.25  # true E_off[w] = 1
    assert w_online.mean().item() > 1.5  # true E_on[w] = e


def test_priorities_normalisation_monotonicity_and_clamp():
    torch.manual_seed(0)
    w = torch.rand(10000) * 5
    full = off2on.priorities(w, w, 5.0)  # normalised over the whole offline set: mean exactly 1
    assert full.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert (full[w.argsort()].diff() >= 0).all()  # monotone in w
    torch.testing.assert_close(off2on.priorities(w, w, 1.0), (w / w.mean()).clamp(1e-3, 1e3))
    minibatch = torch.stack([off2on.priorities(w, w[torch.randint(0, 10000, (256,))], 5.0).mean() for _ in range(50)])
    assert ((minibatch - 1).abs() < 0.1).all()
    extreme = off2on.priorities(torch.tensor([0.0, 1e-30, 1.0, 1e30]), torch.full((4,), 1e-20), 1.0)
    assert extreme.min().item() == pytest.approx(1e-3) and extreme.max().item() == pytest.approx(1e3)


def make_replay(num_offline=1000, online_steps=500, **overrides) -> off2on.BalancedReplay:
    args = off2on.Args(**overrides)
    return off2on.BalancedReplay(random_rows(num_offline), online_steps, args, OBS, ACT)


def test_prioritized_draws_follow_the_priorities():
    torch.manual_seed(0)
    replay = make_replay(num_offline=50, online_steps=20)
    replay.set_priorities(torch.arange(50), torch.rand(50, dtype=torch.float64) * 3 + 0.01)
    for _ in range(5):
        replay.add(random_rows(1, True))
    index = torch.cat([replay.sample_prioritized(256) for _ in range(1000)])  # 256k draws
    p = (replay.priority[:55] / replay.priority[:55].sum()).numpy()
    frequency = np.bincount(index.numpy(), minlength=55) / len(index)
    sigma = np.sqrt(p * (1 - p) / len(index))
    assert (np.abs(frequency - p) < 4 * sigma + 1e-12).all()
    assert replay.sample_prioritized(256).shape == (256,)
    replay.set_priorities(torch.arange(55), torch.zeros(55, dtype=torch.float64))
    replay.set_priorities(torch.tensor([7]), torch.ones(1, dtype=torch.float64))  # every stratum lands on it
    assert replay.sample_prioritized(64).eq(7).all()


def test_new_samples_hold_the_initial_online_fraction_and_the_running_max_only_grows():
    replay = make_replay(num_offline=3000, online_steps=1000, init_online_fraction=0.75, block_steps=1000)
    assert replay.max_priority.item() == pytest.approx(3000 * 0.75 / (0.25 * 1000))
    for _ in range(1000):
        replay.add(random_rows(1, True))
    share = replay.priority[3000:4000].sum() / replay.priority[:4000].sum()
    assert share.item() == pytest.approx(0.75)
    history = [replay.max_priority.item()]
    for value in (0.5, 20.0, 3.0):
        replay.set_priorities(torch.tensor([1, 2, 2]), torch.full((3,), value))
        history.append(replay.max_priority.item())
        assert replay.priority[2].item() == value
    assert history == sorted(history) and history[-1] == 20.0


def test_offline_share_is_the_fraction_of_dataset_rows():
    torch.manual_seed(0)
    replay = make_replay(num_offline=300, online_steps=100)
    for _ in range(100):
        replay.add(random_rows(1, True))
    replay.set_priorities(torch.arange(400), torch.ones(400))  # equal priorities: expected share M / (M + n_online)
    index = torch.cat([replay.sample_prioritized(256) for _ in range(200)])
    assert (index < 300).float().mean().item() == pytest.approx(0.75, abs=0.01)
    fifo = make_replay(num_offline=10, online_steps=50, online_buffer_size=20)
    for _ in range(50):
        fifo.add(random_rows(1, True))
    draws = torch.cat([fifo.sample_online(256) for _ in range(20)])
    assert draws.min().item() == 40 and draws.max().item() == 59  # the newest 20 online rows only


def test_mixture_moments_match_monte_carlo():
    torch.manual_seed(0)
    mu, std = torch.randn(5, 1, 3, dtype=torch.float64), torch.rand(5, 1, 3, dtype=torch.float64) + 0.2
    mean, mixture_std = off2on.mixture_moments(mu, std)
    torch.testing.assert_close(mean, mu.mean(0))
    torch.testing.assert_close(mixture_std.pow(2), std.pow(2).mean(0) + mu.var(0, correction=0))
    member = torch.randint(0, 5, (2_000_000,))
    samples = mu[member, 0] + std[member, 0] * torch.randn(2_000_000, 3, dtype=torch.float64)
    torch.testing.assert_close(samples.mean(0), mean[0], atol=5e-3, rtol=0)
    torch.testing.assert_close(samples.std(0), mixture_std[0], atol=0, rtol=3e-3)
    one_mean, one_std = off2on.mixture_moments(mu[:1], std[:1])
    torch.testing.assert_close(one_std, std[0])
    same_mean, same_std = off2on.mixture_moments(mu[:1].expand(4, -1, -1), std[:1].expand(4, -1, -1))
    torch.testing.assert_close((same_mean, same_std), (one_mean, one_std))
    tiny = off2on.mixture_moments(torch.full((3, 1, 1), 1e4), torch.full((3, 1, 1), 1e-12))[1]
    assert torch.isfinite(tiny).all() and (tiny > 0).all()  # rounding cannot make the variance negative


def test_ensemble_policy_log_prob_and_deterministic_action():
    actor = off2on.Actor(OBS, ACT, 4, 16)
    obs = torch.randn(32, OBS)
    mean, std = off2on.mixture_moments(*actor.members(obs))
    torch.testing.assert_close(actor.ensemble(obs, deterministic=True)[0], torch.tanh(mean))
    torch.manual_seed(3)
    action, log_prob = actor.ensemble(obs)
    torch.manual_seed(3)
    z = mean + std * torch.randn_like(mean)
    gaussian = (-0.5 * ((z - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    torch.testing.assert_close(action, torch.tanh(z))
    torch.testing.assert_close(log_prob, gaussian - torch.log(1 - torch.tanh(z) ** 2).sum(-1), atol=1e-4, rtol=1e-4)


def test_agents_train_independently_and_differently():
    agent = tiny_agent(num_agents=3, bc_steps=0)
    obs, next_obs = torch.randn(3, 8, OBS), torch.randn(3, 8, OBS)
    action = torch.rand(3, 8, ACT) * 2 - 1

    def per_critic_gap():
        torch.manual_seed(7)
        q = agent.critic(off2on.per_critic(obs), off2on.per_critic(action))
        return off2on.cql_gap(agent.critic, agent.actor, obs, next_obs, q, 4), (q - 1).pow(2).mean(1)

    gap, td = per_critic_gap()
    with torch.no_grad():
        for parameter in agent.critic.parameters():
            parameter[3] += 0.5  # agent 1's second critic only
    new_gap, new_td = per_critic_gap()
    changed = torch.zeros(6, dtype=torch.bool)
    changed[3] = True
    assert torch.equal(gap[~changed], new_gap[~changed]) and torch.equal(td[~changed], new_td[~changed])
    assert not torch.equal(gap[3], new_gap[3])

    constant = torch.tensor([1.0, 4.0, -2.0, 5.0, 0.0, 0.0])  # twin minima 1, -2, 0 per agent
    with torch.no_grad():
        agent.critic_target.net[-1].weight.zero_()
        agent.critic_target.net[-1].bias.copy_(constant.view(-1, 1, 1))
    minima = agent.critic_target.twin_min(off2on.per_critic(obs), off2on.per_critic(action))
    torch.testing.assert_close(minima, torch.tensor([1.0, -2.0, 0.0]).view(3, 1).expand(3, 8))

    rows = random_rows(300)
    dataset = off2on.ReplayBuffer(300, OBS, ACT, torch.device("cpu"))
    dataset.add(rows)
    agent = tiny_agent(num_agents=3, bc_steps=2)
    with torch.no_grad():  # start all members identical: only their own minibatches and draws separate them
        for module in (agent.actor, agent.critic):
            for parameter in module.parameters():
                parameter.copy_(parameter[:1].expand_as(parameter))
    for update in range(5):
        agent.offline_update(dataset.split(dataset.sample_rows(3 * 32).view(3, 32, -1)), update < 2)
    first_layer = agent.actor.net[0].weight
    assert not torch.equal(first_layer[0], first_layer[1]) and not torch.equal(first_layer[1], first_layer[2])
    assert agent.log_alpha.shape == (3,) and len(set(agent.log_alpha.tolist())) == 3


def test_bc_warm_start_then_q_maximisation(monkeypatch, minari_root, tmp_path):
    data = load_dataset("hopper-medium")
    args = off2on.Args(
        num_agents=2, hidden_dim=16, batch_size=8, offline_steps=5, bc_steps=2, cql_samples=2, offline_eval_freq=5,
        eval_episodes=1, log_freq=10, progress=False,
    )  # fmt: skip
    agent = off2on.Off2On(11, 3, args, torch.device("cpu"))
    columns = (data.observations, data.actions, data.rewards, data.next_observations, data.terminals)
    dataset = off2on.ReplayBuffer(len(data), 11, 3, torch.device("cpu"))
    dataset.add(torch.from_numpy(off2on.transition_rows(*columns, False)))
    calls, data_log_prob = [], off2on.data_log_prob
    monkeypatch.setattr(off2on, "data_log_prob", lambda *a: (calls.append(1), data_log_prob(*a))[1])
    eval_env = make_env(data.eval_env_spec, 1)
    off2on.offline_phase(agent, data, dataset, eval_env, SummaryWriter(str(tmp_path)), args)
    assert calls == [1, 1] and agent.offline_updates == 5  # the real phase: 2 cloning steps, then Q maximisation
    agent = tiny_agent(num_agents=2)
    action = torch.tensor([[[0.3, -0.2, 0.9]]]).expand(2, 1, 3)
    obs = torch.randn(2, 1, OBS)
    mu, std = agent.actor.members(obs)
    z = torch.atanh(action)
    expected = torch.distributions.Normal(mu, std).log_prob(z).sum(-1) - torch.log(1 - action**2).sum(-1)
    monkeypatch.undo()
    torch.testing.assert_close(off2on.data_log_prob(agent.actor, obs, action), expected, atol=1e-4, rtol=1e-4)


def test_hand_over_resets_temperature_optimisers_and_targets(monkeypatch):
    agent = tiny_agent()
    batch = off2on.ReplayBuffer(48, OBS, ACT, torch.device("cpu")).split(random_rows(48).view(3, 16, -1))
    agent.offline_update(batch, False)
    agent.offline_update(batch, False)
    obs = torch.randn(16, OBS)
    before = agent.actor.members(obs)
    agent.hand_over()
    torch.testing.assert_close(agent.actor.members(obs), before)
    for target, critic in zip(agent.critic_target.parameters(), agent.critic.parameters(), strict=True):
        assert torch.equal(target, critic)
    assert agent.log_alpha.exp().item() == 1.0 and agent.log_alpha.shape == ()
    assert not agent.actor_optimizer.state and not agent.critic_optimizer.state
    assert agent.actor_optimizer.param_groups[0]["lr"] == 3e-4
    monkeypatch.setattr(off2on, "cql_gap", lambda *a: pytest.fail("CQL term online"))
    online = off2on.ReplayBuffer(16, OBS, ACT, torch.device("cpu")).split(random_rows(16, True))
    results, new_priorities = agent.online_update(online, online, online)
    assert new_priorities.shape == (16,) and (new_priorities >= 1e-3).all()
    assert np.isfinite(float(results["losses/density_loss"]))


def test_online_critic_targets_are_per_agent_with_a_shared_next_action():
    agent = tiny_agent(num_agents=2)
    agent.hand_over()
    with torch.no_grad():
        agent.critic_target.net[-1].weight.zero_()
        agent.critic_target.net[-1].bias.copy_(torch.tensor([3.0, 1.0, -1.0, 2.0]).view(-1, 1, 1))
        agent.critic.net[-1].weight.zero_()
        agent.critic.net[-1].bias.zero_()  # Q = 0: the loss reveals y
    obs, action, reward, next_obs = torch.randn(8, OBS), torch.rand(8, ACT), torch.randn(8), torch.randn(8, OBS)
    done = (torch.arange(8) % 2).float()
    torch.manual_seed(1)
    with torch.no_grad():
        agent.actor.ensemble(obs)  # the draws online_update makes, before its step changes the actor: s, then s'
        _, next_log_prob = agent.actor.ensemble(next_obs)
    torch.manual_seed(1)
    results, _ = agent.online_update((obs, action, reward, next_obs, done, torch.ones(8)))
    y = reward + 0.99 * (1 - done) * (torch.tensor([[1.0], [-1.0]]) - next_log_prob)  # alpha = 1
    expected = 2 * y.pow(2).mean(1).sum()  # two twin critics per agent, Q = 0
    assert results["losses/qf_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture
def online_run(minari_root, tmp_path):
    """The real online phase in-process on tiny hopper data, counting updates and recording transitions."""
    data = load_dataset("hopper-medium")
    args = off2on.Args(
        num_agents=2, hidden_dim=16, online_steps=50, block_steps=20, first_block_multiplier=3, batch_size=8,
        eval_freq=1000, eval_episodes=1, log_freq=10, progress=False,
    )  # fmt: skip
    torch.manual_seed(0)
    agent = off2on.Off2On(11, 3, args, torch.device("cpu"))
    agent.hand_over()
    columns = (data.observations, data.actions, data.rewards, data.next_observations, data.terminals)
    replay = off2on.BalancedReplay(torch.from_numpy(off2on.transition_rows(*columns, False)), 50, args, 11, 3)
    env, transitions = recording_env(data.env_spec)
    updates = []
    online_update = agent.online_update
    agent.online_update = lambda *batches: (updates.append(len(transitions)), online_update(*batches))[1]
    off2on.online_phase(agent, data, replay, env, make_env(data.eval_env_spec, 1), SummaryWriter(str(tmp_path)), args)
    return replay, transitions, updates, len(data)


def test_block_schedule_and_stored_transitions(online_run):
    replay, transitions, updates, num_offline = online_run
    assert updates == [20] * 60 + [40] * 20 + [50] * 10  # first block x 3, then K per block, then the rest
    assert replay.num_online == 50 and replay.num_offline == num_offline
    _, action, reward, _, done, is_online = replay.buffer.split(replay.buffer.storage[num_offline : num_offline + 50])
    np.testing.assert_array_equal(action.numpy(), np.array([t[0] for t in transitions], np.float32))
    np.testing.assert_array_equal(reward.numpy(), np.array([t[1] for t in transitions], np.float32))
    np.testing.assert_array_equal(done.numpy(), [float(t[2]) for t in transitions])  # truncation stores d = 0
    assert is_online.eq(1).all() and any(t[3] and not t[2] for t in transitions)
    assert (replay.priority[: num_offline + 50] >= 1e-3).all()


# hopper-expert keeps the env's 1000-step limit, so evaluation episodes have exact Monte-Carlo returns
SMOKE = [
    "--env-id", "hopper-expert", "--num-agents", "2", "--hidden-dim", "32", "--batch-size", "16",
    "--online-steps", "100", "--block-steps", "25", "--first-block-multiplier", "2", "--eval-freq", "50",
    "--eval-episodes", "2", "--offline-eval-freq", "10", "--log-freq", "10", "--cql-samples", "4",
    "--bc-steps", "5", "--no-cuda",
]  # fmt: skip


@pytest.mark.slow
def test_smoke_both_phases_then_pretrained(minari_root, tmp_path):
    run, _ = script_run("off2on", [*SMOKE, "--offline-steps", "20"], minari_root, tmp_path / "a")
    required = [
        "offline/normalized_score", "offline/episodic_return", "offline/qf_loss", "offline/cql_loss",
        "offline/alpha", "offline/UPS", "eval/normalized_score", "eval/episodic_return", "eval/q_bias",
        "eval/q_rank_tau", "charts/episodic_return", "charts/SPS", "charts/UPS", "charts/offline_share",
        "charts/density_online", "charts/density_offline", "charts/p_new", "losses/qf_loss", "losses/qf_values",
        "losses/actor_loss", "losses/alpha", "losses/density_loss",
    ]  # fmt: skip
    tags = scalars(run, required)
    assert all(0 <= share <= 1 for share in tags["charts/offline_share"])
    assert len(tags["eval/normalized_score"]) == 3  # steps 0, 50, 100
    offline, final = (torch.load(run / name, weights_only=False) for name in ("offline.pt", "final.pt"))
    assert offline["phase"] == "offline" and final["phase"] == "online" and offline["step"] == 20
    for key in ("args", "actor", "critic", "critic_target", "density", "density_optimizer", "env_spec"):
        assert key in final
    assert off2on.policy_from_checkpoint(final)(np.zeros(11)).shape == (3,)  # evaluates without the dataset

    online = [*SMOKE, "--pretrained", str(run / "offline.pt"), "--replay", "uniform"]
    second, _ = script_run("off2on", online, minari_root, tmp_path / "b")
    assert not (second / "offline.pt").exists()
    tags = scalars(second)
    assert not any(tag.startswith("offline/") for tag in tags) and "losses/density_loss" not in tags


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--online-steps", "10", "--block-steps", "20"], "lower --block-steps"),
        (["--init-online-fraction", "1.0"], "--init-online-fraction must lie in (0, 1)"),
        (["--num-agents", "0"], "--num-agents must be >= 1"),
        (["--pretrained", "/nonexistent/offline.pt"], "cannot be used"),
    ],
)
def test_bad_input_is_one_line(minari_root, tmp_path, monkeypatch, extra, message):
    assert message in main_error("off2on", [*SMOKE, "--run-dir", str(tmp_path), *extra], minari_root, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offline_and_online_updates():
    agent = tiny_agent(device="cuda")
    rows = random_rows(96).cuda()
    split = off2on.ReplayBuffer(1, OBS, ACT, torch.device("cuda")).split
    offline = agent.offline_update(split(rows.view(3, 32, -1)), False)
    with no_host_sync():  # after the warm-up above
        agent.offline_update(split(rows.view(3, 32, -1)), False)
    agent.hand_over()
    replay = off2on.BalancedReplay(rows, 10, agent.args, OBS, ACT)
    replay.add(rows[:1])
    online = off2on.replay_update(agent, replay, agent.args)
    with no_host_sync():
        off2on.replay_update(agent, replay, agent.args)
    assert all(torch.isfinite(v).all() and v.device.type == "cuda" for v in (*offline.values(), *online.values()))
    assert agent.policy(np.zeros(OBS, np.float32), deterministic=False).shape == (ACT,)


def test_replay_update_writes_the_pre_update_density_priorities_back(monkeypatch):
    """The priorities of the RL batch come from the density network before its step and reach the replay."""
    agent = tiny_agent(num_agents=2, batch_size=64)
    agent.hand_over()
    replay = make_replay(num_offline=200, online_steps=100, batch_size=64)
    for _ in range(100):
        replay.add(random_rows(1, True))
    density = copy.deepcopy(agent.density)
    seen = {}
    sample_rl, online_update = replay.sample_rl, agent.online_update
    monkeypatch.setattr(replay, "sample_rl", lambda *a: seen.setdefault("index", sample_rl(*a)))
    monkeypatch.setattr(agent, "online_update", lambda *a: seen.setdefault("batches", a) and online_update(*a))
    max_before = replay.max_priority.clone()
    off2on.replay_update(agent, replay, agent.args)
    batch, _, offline_batch = seen["batches"]
    with torch.no_grad():
        expected = off2on.priorities(density(*batch[:2]), density(*offline_batch[:2]), 5.0).double()
    assert not torch.equal(agent.density.net[-1].weight, density.net[-1].weight)  # the density net did step
    torch.testing.assert_close(replay.priority[seen["index"]], expected)  # a repeated row: the same value
    assert replay.max_priority == torch.maximum(max_before, expected.max())


# ---------------------------------------------------------------------------------------------------
# The real updates against hand-computed ones: plain SGD with lr 1, so a step is exactly minus the gradient
# ---------------------------------------------------------------------------------------------------


def test_offline_critic_step_is_td_to_the_twin_min_plus_the_cql_gradient():
    agent = tiny_agent(num_agents=2, bc_steps=0)
    with torch.no_grad():
        for param in agent.critic_target.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    agent.critic_optimizer = torch.optim.SGD(agent.critic.parameters(), lr=1.0)
    critic, target, actor = (copy.deepcopy(m) for m in (agent.critic, agent.critic_target, agent.actor))
    obs, next_obs, action = torch.randn(2, 8, OBS), torch.randn(2, 8, OBS), torch.rand(2, 8, ACT) * 2 - 1
    reward, done = torch.randn(2, 8), (torch.arange(16).view(2, 8) % 3 == 0).float()
    torch.manual_seed(4)
    agent.offline_update((obs, action, reward, next_obs, done, torch.zeros(2, 8)), False)
    torch.manual_seed(4)  # the same draws: pi(s) for actor and temperature, a' ~ pi(s'), then the CQL samples
    with torch.no_grad():
        actor(obs)
        next_action, _ = actor(next_obs)
        y = reward + 0.99 * (1 - done) * target.twin_min(off2on.per_critic(next_obs), off2on.per_critic(next_action))
    q = critic(off2on.per_critic(obs), off2on.per_critic(action))
    gap = off2on.cql_gap(critic, actor, obs, next_obs, q, agent.args.cql_samples)
    td = (q - off2on.per_critic(y)).pow(2).mean(1).sum()
    assert_sgd_step(agent.critic, critic, td + agent.args.cql_weight * gap.sum())


def test_online_actor_step_maximises_the_ensemble_mean_of_twin_minima():
    agent = tiny_agent(num_agents=3)
    agent.hand_over()
    agent.actor_optimizer = torch.optim.SGD(agent.actor.parameters(), lr=1.0)
    with torch.no_grad():  # members that disagree, so that one member's Q is not the ensemble's
        for param in agent.critic.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    actor, critic = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic)
    obs = torch.randn(8, OBS)
    batch = (obs, torch.rand(8, ACT) * 2 - 1, torch.randn(8), torch.randn(8, OBS), torch.zeros(8), torch.ones(8))
    torch.manual_seed(9)
    agent.online_update(batch)
    torch.manual_seed(9)
    new_action, log_prob = actor.ensemble(obs)  # alpha = 1 after the hand-over
    assert_sgd_step(agent.actor, actor, (log_prob - critic.twin_min(obs, new_action).mean(0)).mean())


@pytest.mark.parametrize("module", [off2on, opt])
def test_two_level_sampler_draws_exactly_what_one_cumsum_draws(module):
    """Against the O(capacity) reference: one cumsum over the filled rows and one searchsorted, same uniforms.

    Integer priorities keep every prefix sum exact, so the two must agree index for index; the buffer spans
    several blocks of the sampler and ends inside one, with zero-priority rows written on the way.
    """
    torch.manual_seed(0)
    rows = torch.randn(700, 2 * OBS + ACT + 3)
    args = module.Args(init_online_fraction=0.5, n_tau=100) if module is opt else module.Args(init_online_fraction=0.5)
    replay = module.BalancedReplay(rows[:600], 400, args, OBS, ACT)
    for row in rows[600:]:
        replay.add(row[None])
    index = torch.randint(0, 700, (300,))
    replay.set_priorities(index, torch.randint(0, 9, (300,)).double())
    replay.set_priorities(torch.tensor([5, 130, 699]), torch.tensor([0.0, 1000.0, 3.0], dtype=torch.float64))
    for seed in range(20):
        torch.manual_seed(seed)
        fast = replay.sample_prioritized(256)
        torch.manual_seed(seed)
        cumulative = replay.priority[: replay.buffer.size].cumsum(0)
        targets = (torch.arange(256, dtype=torch.float64) + torch.rand(256, dtype=torch.float64)) * cumulative[-1] / 256
        reference = torch.searchsorted(cumulative, targets, right=True).clamp_(max=replay.buffer.size - 1)
        assert torch.equal(fast, reference)
    masses = replay.priority.view(-1, SAMPLER_BLOCK).sum(1)
    assert torch.equal(replay.block_mass, masses)  # refreshed, never drifted


def test_cql_gap_matches_a_hand_computation_with_its_importance_weights():
    """CQL(H)'s logsumexp per critic over K uniform, K pi_i(s) and K pi_i(s') actions, each minus its log-density
    (uniform: |A| log 1/2; policy: log pi_i), computed in loops over agents, twins, states and actions from the same
    draws: the importance weights reach the gap (without them it differs by a nat or more)."""
    agent, samples = tiny_agent(num_agents=2), 3
    obs, next_obs, action = torch.randn(2, 4, OBS), torch.randn(2, 4, OBS), torch.rand(2, 4, ACT) * 2 - 1
    with torch.no_grad():
        q_data = agent.critic(off2on.per_critic(obs), off2on.per_critic(action))
        torch.manual_seed(5)
        fast = off2on.cql_gap(agent.critic, agent.actor, obs, next_obs, q_data, samples)
        torch.manual_seed(5)  # cql_gap's draws: pi_i at s and s' (K copies of the 2B states), then the uniform actions
        states = torch.cat([obs, next_obs], 1).unsqueeze(1).expand(-1, samples, -1, -1).reshape(2, -1, OBS)
        mu, std = agent.actor.members(states)
        z = mu + std * torch.randn_like(mu)
        log_pi = torch.distributions.Normal(mu, std).log_prob(z).sum(-1) - torch.log(1 - torch.tanh(z) ** 2).sum(-1)
        policy, log_pi = torch.tanh(z).view(2, samples, 8, ACT), log_pi.view(2, samples, 8)
        uniform = torch.rand(2, samples, 4, ACT) * 2 - 1

        def q(c, state, a):
            return agent.critic(state.expand(4, 1, -1), a.expand(4, 1, -1))[c, 0]

        brute = torch.zeros(4)
        for i, twin, b in itertools.product(range(2), range(2), range(4)):
            c, state = 2 * i + twin, obs[i, b].view(1, -1)
            values = [q(c, state, uniform[i, k, b].view(1, -1)) - ACT * math.log(0.5) for k in range(samples)]
            for k, column in itertools.product(range(samples), (b, 4 + b)):  # a ~ pi_i(s), then a ~ pi_i(s')
                values.append(q(c, state, policy[i, k, column].view(1, -1)) - log_pi[i, k, column])
            brute[c] += (torch.logsumexp(torch.stack(values), 0) - q_data[c, b]) / 4
    torch.testing.assert_close(fast, brute, rtol=1e-4, atol=1e-4)
