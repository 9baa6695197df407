"""SO2: the card's testable properties with exact numbers, a smoke run, and a CUDA variant."""

import copy
import itertools
import json
import types

import numpy as np
import pytest
import torch

from algorithms import so2
from tests.conftest import assert_sgd_step, main_error, no_host_sync, recording_env, scalars, script_run
from utils import load_dataset, make_env

OBS, ACT = 4, 3


def tiny_agent(num_critics=3, device="cpu", **overrides) -> so2.SO2:
    torch.manual_seed(0)
    return so2.SO2(OBS, ACT, num_critics, so2.Args(**overrides), torch.device(device))


def constant_critic(critic: so2.Critic, values) -> None:
    """Make member i return values[i] whatever the input."""
    with torch.no_grad():
        critic.net[-1].weight.zero_()
        critic.net[-1].bias.copy_(torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1))


def test_pvu_noise_is_clipped_shared_and_a_standard_deviation():
    torch.manual_seed(0)
    action = torch.rand(20000, ACT) * 2 - 1
    noisy, noise = so2.perturb(action, 0.3, 0.6)
    assert noise.shape == action.shape  # one draw per transition, broadcast over the members
    assert noise.abs().max() <= 0.6 and noisy.abs().max() <= 1.0
    torch.testing.assert_close(noisy, (action + noise).clamp(-1, 1))
    assert torch.equal(so2.perturb(action, 0.0, 0.6)[0], action)
    wide = so2.perturb(torch.zeros(200000, 1), 0.3, 100.0)[1]
    assert wide.std().item() == pytest.approx(0.3, rel=0.01)


def test_online_target_is_per_member_and_its_entropy_ignores_the_noise():
    agent = tiny_agent(target_noise=0.3)
    agent.hand_over()
    constant_critic(agent.critic_target, [1.0, 5.0, -2.0])
    next_obs, reward, done = torch.randn(8, OBS), torch.randn(8), (torch.arange(8) % 3 == 0).float()
    torch.manual_seed(1)
    y, noise = agent.online_target(next_obs, reward, done)
    torch.manual_seed(1)
    _, next_log_prob = agent.actor(next_obs)  # the same draw of a' as inside online_target
    expected = reward + 0.99 * (1 - done) * (torch.tensor([[1.0], [5.0], [-2.0]]) - 0.2 * next_log_prob)
    assert y.shape == (3, 8)
    torch.testing.assert_close(y, expected)
    assert noise.abs().sum() > 0
    agent.args.target_noise = 0.0  # toggling PVU off leaves log pi(a'|s') and hence y unchanged here
    torch.manual_seed(1)
    torch.testing.assert_close(agent.online_target(next_obs, reward, done)[0], expected)
    torch.testing.assert_close(y[:, done == 1], reward[done == 1].expand(3, -1))  # d = 1 -> y = r


def test_offline_target_is_the_shared_minimum():
    target_q = torch.tensor([[1.0, 4.0], [3.0, -1.0], [2.0, 0.0]])
    log_prob, reward, done = torch.tensor([0.5, -1.0]), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    y = so2.bellman_target(target_q, log_prob, reward, done, 0.1, 0.9, per_member=False)
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * (1.0 - 0.05), 2.0]))


def test_actor_loss_uses_the_ensemble_minimum():
    agent = tiny_agent()
    constant_critic(agent.critic, [3.0, -4.0, 7.0])
    loss, _ = agent.actor_loss(torch.randn(16, OBS), torch.tensor(0.0))
    assert loss.item() == pytest.approx(4.0)


def brute_force_diversity(critic, obs, action):
    grads = []
    for i in range(critic.num_critics):
        a = action.clone().requires_grad_(True)
        h = torch.cat([obs, a], -1)
        linears = [layer for layer in critic.net if isinstance(layer, so2.EnsembleLinear)]
        for layer in linears[:-1]:
            h = torch.relu(h @ layer.weight[i] + layer.bias[i])
        q = (h @ linears[-1].weight[i] + linears[-1].bias[i]).sum()
        g = torch.autograd.grad(q, a)[0]
        grads.append(g / (g.norm(dim=-1, keepdim=True) + 1e-10))
    total = torch.zeros(len(obs))
    for i, j in itertools.permutations(range(critic.num_critics), 2):
        total += (grads[i] * grads[j]).sum(-1)
    return total.mean() / (critic.num_critics - 1)


def test_diversity_loss_matches_brute_force_and_special_cases():
    torch.manual_seed(0)
    critic = so2.Critic(OBS, ACT, 4, hidden=16)
    obs, action = torch.randn(5, OBS), torch.rand(5, ACT) * 2 - 1
    torch.testing.assert_close(so2.diversity_loss(critic, obs, action), brute_force_diversity(critic, obs, action))

    with torch.no_grad():
        for parameter in critic.parameters():
            parameter.copy_(parameter[:1].expand_as(parameter))  # N identical members
    assert so2.diversity_loss(critic, obs, action).item() == pytest.approx(4.0, abs=1e-5)

    pair = so2.Critic(OBS, ACT, 2, hidden=16)
    with torch.no_grad():
        for parameter in pair.parameters():
            parameter[1] = parameter[0]
        pair.net[-1].weight[1] *= -1  # Q_1 = -Q_0: opposite action gradients
        pair.net[-1].bias[1] *= -1
    assert so2.diversity_loss(pair, obs, action).item() == pytest.approx(-2.0, abs=1e-5)
    with torch.no_grad():
        pair.net[-1].weight[1] *= -1
        pair.net[0].weight[0, OBS + 1 :] = 0  # member 0 sees only a_0, member 1 only a_1, a_2
        pair.net[0].weight[1, OBS] = 0
    assert so2.diversity_loss(pair, obs, action).item() == pytest.approx(0.0, abs=1e-6)


def test_eta_zero_skips_the_double_backward(monkeypatch):
    agent = tiny_agent()
    monkeypatch.setattr(so2, "diversity_loss", lambda *a: pytest.fail("diversity term computed with eta = 0"))
    batch = (
        torch.randn(8, OBS),
        torch.rand(8, ACT),
        torch.randn(8),
        torch.randn(8, OBS),
        torch.zeros(8),
        torch.zeros(8),
    )
    assert agent.offline_update(batch, eta=0.0)["offline/diversity_loss"].item() == 0.0


def test_soft_update_formula():
    source, target = so2.Critic(OBS, ACT, 2, hidden=8), so2.Critic(OBS, ACT, 2, hidden=8)
    before = [p.clone() for p in target.parameters()]
    so2.soft_update(target, source, 0.005)
    for old, new, src in zip(before, target.parameters(), source.parameters(), strict=True):
        torch.testing.assert_close(new, 0.995 * old + 0.005 * src)


def test_alpha_offline_moves_towards_the_target_entropy_and_is_fixed_online():
    agent = tiny_agent()
    for log_prob, direction in ((torch.full((8,), 10.0), 1), (torch.full((8,), -10.0), -1)):
        agent.log_alpha.grad = None
        agent.alpha_loss(log_prob).backward()  # low entropy (high log pi) must raise alpha, and vice versa
        assert -direction * agent.log_alpha.grad.item() > 0
    agent.hand_over()
    assert agent.log_alpha.exp().item() == pytest.approx(0.2) and not agent.auto_alpha
    before = agent.log_alpha.item()
    agent.online_actor_update(torch.randn(8, OBS))
    assert agent.log_alpha.item() == before


def test_actor_bounds_clamp_and_determinism():
    actor = so2.Actor(OBS, ACT)
    obs = torch.randn(1000, OBS) * 10
    action, _ = actor(obs)
    assert action.abs().max() < 1
    torch.testing.assert_close(actor(obs, deterministic=True)[0], actor(obs, deterministic=True)[0])
    with torch.no_grad():
        for head in (actor.mu, actor.log_std):
            head.weight.zero_()
            head.bias.zero_()
        actor.log_std.bias.fill_(-100.0)  # clamped to -5
    _, log_prob = actor(obs[:2], deterministic=True)
    expected = ACT * (5.0 - 0.5 * np.log(2 * np.pi)) - ACT * np.log(1 + 1e-6)
    torch.testing.assert_close(log_prob, torch.full((2,), expected, dtype=torch.float32))


def test_sampling_composition_and_fifo_pool():
    device = torch.device("cpu")
    online, pool = so2.ReplayBuffer(50, OBS, ACT, device), so2.ReplayBuffer(40, OBS, ACT, device)
    make_rows = lambda n, is_online: torch.from_numpy(
        so2.transition_rows(np.ones((n, OBS)), np.ones((n, ACT)), np.ones(n), np.ones((n, OBS)), np.zeros(n), is_online)
    )
    pool.add(make_rows(40, False))
    online.add(make_rows(7, True))
    rows = so2.sample_so2(online, pool, 256, 2304, updates=3)
    assert rows.shape[:2] == (3, 2560) and rows[:, :256, -1].eq(1).all() and rows[:, 256:, -1].eq(0).all()
    for k in range(1, 46):
        pool.add(make_rows(1, True))
        assert pool.size == 40
        assert pool.storage[:, -1].sum().item() == min(k, 40)  # exactly k slots hold online data
        assert pool.storage[: min(k, 40), -1].eq(1).all()  # the oldest slots are overwritten first
    offline = so2.ReplayBuffer(30, OBS, ACT, device)
    offline.add(make_rows(30, False))
    union = so2.sample_uniform(offline, online, 20000, updates=2)
    assert union.shape == (2, 20000, 2 * OBS + ACT + 3)
    assert union[..., -1].mean().item() == pytest.approx(7 / 37, abs=0.01)  # uniform over 30 offline + 7 online


def test_transition_rows_split_roundtrip():
    buffer = so2.ReplayBuffer(4, OBS, ACT, torch.device("cpu"))
    obs, act, next_obs = np.arange(8.0).reshape(2, OBS), -np.ones((2, ACT)), np.full((2, OBS), 3.0)
    buffer.add(torch.from_numpy(so2.transition_rows(obs, act, np.array([1.5, 2.5]), next_obs, np.array([0, 1]), True)))
    parts = buffer.split(buffer.storage[:2])
    for part, expected in zip(parts, (obs, act, [1.5, 2.5], next_obs, [0, 1], [1, 1]), strict=True):
        np.testing.assert_array_equal(part.numpy(), np.asarray(expected, np.float32))


@pytest.fixture
def online_run(minari_root, tmp_path, monkeypatch):
    """Run the real online phase in-process on the tiny hopper data, counting every update."""
    data = load_dataset("hopper-medium")
    args = so2.Args(
        online_steps=60,
        warmup_steps=20,
        batch_size=8,
        mixed_batch_size=24,
        eval_freq=1000,
        eval_episodes=1,
        log_freq=100,
        progress=False,
        updates_per_step=10,
        actor_update_freq=10,
    )
    torch.manual_seed(0)
    agent = so2.SO2(11, 3, 3, args, torch.device("cpu"))
    counts = {"critic": 0, "actor": 0, "soft": 0, "pool_adds_in_warmup": 0}
    pool = so2.ReplayBuffer(len(data), 11, 3, agent.device)
    pool.add(
        torch.from_numpy(
            so2.transition_rows(
                data.observations, data.actions, data.rewards, data.next_observations, data.terminals, False
            )
        )
    )
    agent.hand_over()
    for name, optimizer in (("critic", agent.critic_optimizer), ("actor", agent.actor_optimizer)):
        step = optimizer.step
        monkeypatch.setattr(
            optimizer,
            "step",
            lambda *a, _step=step, _name=name: (counts.__setitem__(_name, counts[_name] + 1), _step(*a))[1],
        )
    soft = so2.soft_update
    monkeypatch.setattr(so2, "soft_update", lambda *a: (counts.__setitem__("soft", counts["soft"] + 1), soft(*a)))
    env, transitions = recording_env(data.env_spec)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    online = so2.online_phase(agent, data, pool, env, make_env(data.eval_env_spec, 1), writer, args)
    return agent, pool, online, counts, [(t[2], t[3]) for t in transitions], args


def test_update_counts_pool_and_done_flags(online_run):
    agent, pool, online, counts, flags, args = online_run
    learning_steps = args.online_steps - args.warmup_steps
    assert counts["critic"] == counts["soft"] == agent.critic_updates == 10 * learning_steps
    assert counts["actor"] == learning_steps
    assert pool.storage[:, -1].sum().item() == learning_steps  # warm-up transitions never enter the pool
    assert pool.size == pool.capacity
    done = online.storage[: online.size, -2].numpy()
    np.testing.assert_array_equal(done, [float(terminated) for terminated, _ in flags])
    assert any(truncated and not terminated for terminated, truncated in flags), "no truncation was exercised"


def test_hand_over_keeps_the_policy():
    agent = tiny_agent()
    obs = torch.randn(32, OBS)
    before = agent.actor(obs, deterministic=True)[0]
    agent.hand_over()
    torch.testing.assert_close(agent.actor(obs, deterministic=True)[0], before)
    for target, online in zip(agent.critic_target.parameters(), agent.critic.parameters(), strict=True):
        assert torch.equal(target, online)


# hopper-expert keeps the env's 1000-step limit, so evaluation episodes have exact Monte-Carlo returns
SMOKE = [
    "--env-id", "hopper-expert", "--num-critics", "3", "--batch-size", "8", "--mixed-batch-size", "24",
    "--online-steps", "120", "--warmup-steps", "10", "--eval-freq", "60", "--eval-episodes", "2",
    "--offline-eval-freq", "10", "--log-freq", "10", "--no-cuda", "--hidden-dim", "32", "--updates-per-step", "2",
    "--actor-update-freq", "2",
]  # fmt: skip


@pytest.mark.slow
def test_smoke_both_phases_then_pretrained(minari_root, tmp_path):
    run, _ = script_run("so2", [*SMOKE, "--offline-steps", "20"], minari_root, tmp_path / "a")
    required = [
        "offline/normalized_score", "offline/episodic_return", "offline/qf_loss", "offline/diversity_loss",
        "offline/UPS", "eval/normalized_score", "eval/episodic_return", "eval/q_bias", "eval/q_rank_tau",
        "charts/episodic_return", "charts/SPS", "charts/UPS", "losses/qf_loss", "losses/qf_values", "losses/actor_loss",
        "losses/alpha", "charts/offline_share", "charts/pvu_noise",
    ]  # fmt: skip
    tags = scalars(run, required)
    assert len(tags["eval/normalized_score"]) == 3  # steps 0, 60, 120
    assert json.loads((run / "args.json").read_text())["offline_steps"] == 20
    offline, final = (torch.load(run / name, weights_only=False) for name in ("offline.pt", "final.pt"))
    assert offline["phase"] == "offline" and final["phase"] == "online" and offline["step"] == 20
    for key in ("args", "actor", "critic", "critic_target", "actor_optimizer", "critic_optimizer", "env_spec"):
        assert key in final
    policy = so2.policy_from_checkpoint(final)  # evaluates without the dataset
    assert policy(np.zeros(11)).shape == (3,)

    second, _ = script_run("so2", [*SMOKE, "--pretrained", str(run / "offline.pt")], minari_root, tmp_path / "b")
    assert not (second / "offline.pt").exists()
    assert not any(tag.startswith("offline/") for tag in scalars(second))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--online-steps", "10", "--warmup-steps", "10"], "lower --warmup-steps"),
        (["--pretrained", "/nonexistent/offline.pt"], "cannot be used"),
        (["--env-id", "hopper-medium-replay"], "Minari has no medium-replay"),
    ],
)
def test_bad_input_is_one_line(minari_root, tmp_path, monkeypatch, extra, message):
    assert message in main_error("so2", [*SMOKE, "--run-dir", str(tmp_path), *extra], minari_root, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offline_and_online_updates():
    agent = tiny_agent(device="cuda")
    batch = tuple(
        t.cuda()
        for t in (
            torch.randn(64, OBS),
            torch.rand(64, ACT) * 2 - 1,
            torch.randn(64),
            torch.randn(64, OBS),
            torch.zeros(64),
            torch.zeros(64),
        )
    )
    offline = agent.offline_update(batch, eta=1.0)
    with no_host_sync():  # after the warm-up above
        agent.offline_update(batch, eta=1.0)
    agent.hand_over()
    online = agent.online_critic_update(batch) | agent.online_actor_update(batch[0])
    with no_host_sync():
        agent.online_critic_update(batch) | agent.online_actor_update(batch[0])
    for value in (*offline.values(), *online.values()):
        assert value.device.type == "cuda" and torch.isfinite(value).all()


def test_qf_loss_is_logged_per_member_in_both_phases():
    """The offline gradient uses EDAC's sum over members; both phases log the mean, so the curve does not jump."""
    agent = tiny_agent(num_critics=3)
    with torch.no_grad():
        agent.log_alpha.fill_(-30.0)  # alpha ~ 0: the target no longer depends on the sampled next action
    constant_critic(agent.critic_target, [1.0, 2.0, 3.0])
    obs, action, reward, next_obs = torch.randn(8, OBS), torch.rand(8, ACT) * 2 - 1, torch.randn(8), torch.randn(8, OBS)
    done = torch.tensor([0.0, 1, 0, 0, 1, 0, 0, 0])
    batch = (obs, action, reward, next_obs, done, torch.zeros(8))
    with torch.no_grad():
        y = reward + 0.99 * (1 - done) * 1.0  # the min over the constant target members
        per_member = (agent.critic(obs, action) - y).pow(2).mean()
    logged = agent.offline_update(batch, eta=0.0)["offline/qf_loss"]
    assert logged.item() == pytest.approx(per_member.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# The real updates against hand-computed ones: plain SGD with lr 1, so a step is exactly minus the gradient
# ---------------------------------------------------------------------------------------------------


def hand_batch(n=8):
    torch.manual_seed(1)
    done = torch.tensor([0.0, 1, 0, 0, 1, 0, 0, 0])[:n]
    return torch.randn(n, OBS), torch.rand(n, ACT) * 2 - 1, torch.randn(n), torch.randn(n, OBS), done, torch.ones(n)


def test_online_critic_update_regresses_to_the_perturbed_per_member_target():
    """PVU: a clipped noisy a' into the target critics, the entropy of the un-noised a', one target per member."""
    agent = tiny_agent(num_critics=3, target_noise=0.3, noise_clip=0.1)  # a clip that binds for most draws
    agent.hand_over()
    with torch.no_grad():  # targets that differ from the critics and depend strongly on the action
        for param in agent.critic_target.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    agent.critic_optimizer = torch.optim.SGD(agent.critic.parameters(), lr=1.0)
    critic, target = copy.deepcopy(agent.critic), copy.deepcopy(agent.critic_target)
    obs, action, reward, next_obs, done, is_online = hand_batch()
    torch.manual_seed(7)
    agent.online_critic_update((obs, action, reward, next_obs, done, is_online))
    torch.manual_seed(7)  # the same draws as the update: a' ~ pi(s'), then the noise
    with torch.no_grad():
        next_action, next_log_prob = agent.actor(next_obs)
        noise = (torch.randn_like(next_action) * 0.3).clamp(-0.1, 0.1)
        noisy_q = target(next_obs, (next_action + noise).clamp(-1, 1))  # [N, B]
        y = reward + 0.99 * (1 - done) * (noisy_q - 0.2 * next_log_prob)
    assert_sgd_step(agent.critic, critic, (critic(obs, action) - y).pow(2).mean())
    moved = zip(agent.critic_target.parameters(), target.parameters(), agent.critic.parameters(), strict=True)
    for after, old, new in moved:
        torch.testing.assert_close(after, old + 0.005 * (new - old))  # the target follows after every update


def test_offline_update_regresses_to_the_shared_min_target_with_the_diversity_term():
    agent = tiny_agent(num_critics=3)
    agent.critic_optimizer = torch.optim.SGD(agent.critic.parameters(), lr=1.0)
    with torch.no_grad():
        for param in agent.critic_target.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    critic, target, actor = (copy.deepcopy(m) for m in (agent.critic, agent.critic_target, agent.actor))
    alpha = agent.log_alpha.exp().detach()
    obs, action, reward, next_obs, done, is_online = hand_batch()
    torch.manual_seed(3)
    agent.offline_update((obs, action, reward, next_obs, done, is_online), eta=2.0)
    torch.manual_seed(3)  # the update draws pi(s) for the actor loss first, then a' ~ pi(s')
    with torch.no_grad():
        actor(obs)
        next_action, next_log_prob = actor(next_obs)
        y = reward + 0.99 * (1 - done) * (target(next_obs, next_action).min(0).values - alpha * next_log_prob)
    td = (critic(obs, action) - y).pow(2).mean(1).sum()  # EDAC: summed over members
    assert_sgd_step(agent.critic, critic, td + 2.0 * so2.diversity_loss(critic, obs, action))


def test_hand_over_copies_targets_fresh_adam_at_the_online_rate_and_fixes_alpha():
    agent = tiny_agent(num_critics=3)
    for _ in range(3):  # targets lag behind, Adam has state, alpha has moved
        agent.offline_update(hand_batch(), eta=1.0)
    same = lambda: all(map(torch.equal, agent.critic_target.parameters(), agent.critic.parameters()))
    assert not same()
    agent.hand_over()
    assert same()
    for optimizer in (agent.actor_optimizer, agent.critic_optimizer, agent.alpha_optimizer):
        assert [group["lr"] for group in optimizer.param_groups] == [1e-3] and not optimizer.state
    assert agent.log_alpha.exp().item() == pytest.approx(0.2, rel=1e-6)
    agent.online_critic_update(hand_batch())
    agent.online_actor_update(hand_batch()[0])
    assert agent.log_alpha.exp().item() == pytest.approx(0.2, rel=1e-6)  # fixed online


@pytest.mark.parametrize(
    "name, task, critics, eta",
    [
        ("hopper-medium", "hopper", 50, 1.0),
        ("hopper-medium-expert", "hopper", 50, 1.0),
        ("walker2d-medium", "walker2d", 10, 1.0),
        ("walker2d-medium-expert", "walker2d", 10, 5.0),
        ("halfcheetah-medium-expert", "halfcheetah", 10, 5.0),
        ("halfcheetah-random", "halfcheetah", 10, 1.0),
    ],
)
def test_per_dataset_defaults_follow_edac(name, task, critics, eta):
    data = types.SimpleNamespace(name=name, task=task)
    assert so2.check_args(so2.Args(), data) == (critics, eta)
    assert so2.check_args(so2.Args(num_critics=7, eta=0.5), data) == (7, 0.5)  # explicit flags win
