"""ENOTO: the card's testable properties with exact numbers, a smoke run, and a CUDA variant."""

import copy
import dataclasses
import itertools
import math
import random

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from algorithms import enoto
from tests.conftest import assert_sgd_step, main_error, no_host_sync, recording_env, scalars, script_run
from utils import load_dataset, make_env
from utils.run import apply_preset, save_checkpoint

OBS, ACT = 4, 3


def tiny_agent(num_critics=3, device="cpu", **overrides) -> enoto.ENOTO:
    torch.manual_seed(0)
    args = enoto.Args(num_critics=num_critics, hidden_dim=16, **overrides)
    return enoto.ENOTO(OBS, ACT, args, torch.device(device))


def constant_critic(critic: enoto.Critic, values) -> None:
    """Make member i return values[i] whatever the input."""
    with torch.no_grad():
        critic.net[-1].weight.zero_()
        critic.net[-1].bias.copy_(torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1))


def random_batch(n=8, done=None):
    done = torch.zeros(n) if done is None else done
    return (torch.randn(n, OBS), torch.rand(n, ACT) * 2 - 1, torch.randn(n), torch.randn(n, OBS), done, torch.ones(n))


@pytest.mark.parametrize("n", [2, 3, 5, 10, 12])
def test_weighted_min_pair_is_the_mean_of_all_pairwise_minima(n):
    torch.manual_seed(n)
    q = torch.randint(-5, 5, (n, 64)).float() + torch.randn(n, 64) * (torch.rand(n, 64) < 0.5)  # many ties
    brute = torch.stack([torch.minimum(q[i], q[j]) for i, j in itertools.combinations(range(n), 2)]).mean(0)
    fast = enoto.weighted_min_pair(q)
    torch.testing.assert_close(fast, brute, atol=1e-5, rtol=0)
    assert (q.min(0).values <= fast + 1e-6).all() and (fast <= q.mean(0) + 1e-6).all()
    if n == 2:
        torch.testing.assert_close(fast, q.min(0).values)


def test_target_rules_match_their_definitions():
    torch.manual_seed(0)
    q = torch.randn(4, 16)
    assert torch.equal(enoto.ensemble_target(q, "min"), q.min(0).values)
    torch.testing.assert_close(enoto.ensemble_target(q, "mean"), q.mean(0))
    torch.testing.assert_close(enoto.ensemble_target(q, "weighted_min_pair"), enoto.weighted_min_pair(q))
    for rule in ("min", "mean", "rem", "random_min_pair", "weighted_min_pair"):
        assert enoto.ensemble_target(q, rule).shape == (16,)
    beta = enoto.ensemble_target(torch.eye(4), "rem")  # column b picks out beta_b
    assert (beta >= 0).all() and beta.sum().item() == pytest.approx(1.0)
    other = enoto.ensemble_target(torch.eye(4), "rem")
    assert not torch.equal(beta, other)  # a fresh draw per update


def test_random_min_pair_uses_two_distinct_members_and_averages_to_wmp():
    n, draws = 5, 20000
    q = torch.arange(n, dtype=torch.float32).unsqueeze(1)  # member i has value i
    torch.manual_seed(0)
    picks = torch.cat([enoto.ensemble_target(q, "random_min_pair") for _ in range(draws)])
    assert picks.max().item() <= n - 2  # the largest value is a pair minimum only if drawn twice
    # min(i, j) = k for exactly n - 1 - k of the C(n, 2) pairs
    for k in range(n - 1):
        p = (n - 1 - k) / math.comb(n, 2)
        assert abs((picks == k).float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / draws)
    q_random = torch.randn(n, 3)
    mc = torch.stack([enoto.ensemble_target(q_random, "random_min_pair") for _ in range(draws)]).mean(0)
    spread = (q_random.max(0).values - q_random.min(0).values) / math.sqrt(draws)
    assert ((mc - enoto.weighted_min_pair(q_random)).abs() < 4 * spread).all()


def test_sunrise_weight_range_monotonicity_and_detachment():
    std = torch.linspace(0, 5, 101, requires_grad=True)
    w = enoto.sunrise_weight(std, 10.0)
    assert not w.requires_grad
    assert w[0].item() == 1.0 and (w >= 0.5).all() and (w <= 1.0).all()
    assert (w[1:20] < w[:19]).all()  # strictly decreasing (further out float32 rounds w to 0.5)
    assert (w[1:] <= w[:-1]).all()
    assert torch.equal(enoto.sunrise_weight(std, 0.0), torch.ones(101))


def test_online_target_and_per_sample_weight_on_a_constant_ensemble():
    agent = tiny_agent(num_critics=4, sunrise_temperature=10.0)
    agent.hand_over()
    values = torch.tensor([1.0, 5.0, -2.0, 4.0])
    constant_critic(agent.critic_target, values)
    next_obs, reward, done = torch.randn(8, OBS), torch.randn(8), (torch.arange(8) % 3 == 0).float()
    alpha = agent.log_alpha.exp().item()
    for rule, value in (("min", -2.0), ("mean", 2.0), ("weighted_min_pair", (-2 * 3 + 1 * 2 + 4) / 6)):
        agent.args.q_target = rule
        torch.manual_seed(1)
        y, weight = agent.online_target(next_obs, reward, done)
        torch.manual_seed(1)
        _, next_log_prob = agent.actor(next_obs)  # the same draw of a' as inside online_target
        torch.testing.assert_close(y, reward + 0.99 * (1 - done) * (value - alpha * next_log_prob))
        torch.testing.assert_close(y[done == 1], reward[done == 1])  # d = 1 -> y = r
    expected_weight = torch.sigmoid(-10 * values.std(correction=0)) + 0.5
    torch.testing.assert_close(weight, expected_weight.expand(8))
    agent.args.sunrise_weight = "batch"  # constant members: the batch-mean std is the same number
    torch.testing.assert_close(agent.online_target(next_obs, reward, done)[1], expected_weight)
    agent.args.sunrise_weight = "off"
    assert agent.online_target(next_obs, reward, done)[1].item() == 1.0


def test_offline_target_is_deterministic_min_without_entropy():
    agent = tiny_agent()
    constant_critic(agent.critic_target, [3.0, -1.0, 2.0])
    next_obs, reward, done = torch.randn(6, OBS), torch.randn(6), torch.tensor([0.0, 1, 0, 0, 1, 0])
    torch.testing.assert_close(agent.offline_target(next_obs, reward, done), reward + 0.99 * (1 - done) * -1.0)
    with torch.no_grad():
        agent.critic_target.net[-1].weight.normal_()  # now Q' depends on the action: must be tanh(mu(s'))
    next_action, _ = agent.actor(next_obs, deterministic=True)
    expected = reward + 0.99 * (1 - done) * agent.critic_target(next_obs, next_action).min(0).values
    torch.testing.assert_close(agent.offline_target(next_obs, reward, done), expected)


@pytest.mark.parametrize("backup", ["cql", "sac"])
def test_cql_backup_online_is_the_offline_backup_in_the_real_update(monkeypatch, backup):
    """--online-backup cql (CQL -> CQL): the critic regresses to the deterministic, entropy-free min target."""
    agent = tiny_agent(online_backup=backup, sunrise_weight="off")
    with torch.no_grad():
        agent.log_alpha.fill_(1.0)  # a large entropy term, so that the two backups differ clearly
    agent.hand_over()
    batch = random_batch(done=torch.tensor([0.0, 1, 0, 0, 0, 1, 0, 0]))
    deterministic = agent.offline_target(batch[3], batch[2], batch[4])
    seen, update_critic = [], agent.update_critic
    monkeypatch.setattr(agent, "update_critic", lambda b, y, w=1.0: seen.append(y) or update_critic(b, y, w))
    agent.online_update(batch)
    if backup == "cql":
        torch.testing.assert_close(seen[0], deterministic, rtol=0, atol=0)
    else:
        assert (seen[0] - deterministic)[batch[4] == 0].abs().min() > 1e-3  # sampled a' and the entropy term


def test_presets_set_their_values_and_refuse_a_contradicting_flag():
    args = enoto.Args(preset="official")
    apply_preset(args, enoto.PRESETS)
    assert (args.exploration, args.sunrise_weight, args.num_critics) == ("none", "batch", 10)
    args = enoto.Args(preset="cql_cql")
    apply_preset(args, enoto.PRESETS)
    assert (args.num_critics, args.q_target, args.exploration, args.sunrise_weight) == (2, "min", "none", "off")
    assert args.keep_cql_online and args.online_backup == "cql"
    agent = enoto.ENOTO(OBS, ACT, args, torch.device("cpu"))
    agent.hand_over()
    assert agent.cql_weight == 5.0  # the CQL term stays online
    args = enoto.Args(preset="cql_sac", num_critics=2, exploration="oac")  # agrees, then contradicts
    with pytest.raises(enoto.UserError, match="--preset cql_sac sets --exploration none; drop --exploration oac"):
        apply_preset(args, enoto.PRESETS)
    assert enoto.Args().preset == "enoto" and enoto.PRESETS["enoto"] == {}  # the card's defaults stay


def brute_force_cql_gap(critic, actor, obs, next_obs, action, samples):
    """Loops over critics, states and the 3 x samples actions, drawing in cql_gap's order."""
    batch, n = len(obs), critic.num_critics
    policy_actions, policy_log_prob = actor(torch.cat([obs, next_obs]).expand(samples, -1, -1))
    uniform = torch.rand(samples, batch, ACT) * 2 - 1
    total = 0.0
    for i in range(n):
        for b in range(batch):
            values = []
            for k in range(samples):
                values.append(critic(obs[b : b + 1], uniform[k, b : b + 1])[i, 0] - ACT * math.log(0.5))
                for source in (b, batch + b):  # pi(s) and pi(s'), both evaluated at s
                    a, lp = policy_actions[k, source : source + 1], policy_log_prob[k, source]
                    values.append(critic(obs[b : b + 1], a)[i, 0] - lp)
            total += torch.logsumexp(torch.stack(values), 0) - critic(obs[b : b + 1], action[b : b + 1])[i, 0]
    return total / (n * batch)


def test_cql_gap_matches_a_hand_computation_and_is_averaged_over_critics():
    agent = tiny_agent()
    obs, action, _, next_obs, _, _ = random_batch(5)
    q_data = agent.critic(obs, action)
    torch.manual_seed(3)
    fast = enoto.cql_gap(agent.critic, agent.actor, obs, next_obs, q_data, samples=4)
    torch.manual_seed(3)
    with torch.no_grad():
        brute = brute_force_cql_gap(agent.critic, agent.actor, obs, next_obs, action, samples=4)
    torch.testing.assert_close(fast, brute, atol=1e-5, rtol=1e-5)

    with torch.no_grad():  # N identical members give the single member's gap: an average, not a sum
        for parameter in agent.critic.parameters():
            parameter.copy_(parameter[:1].expand_as(parameter))
    single = enoto.Critic(OBS, ACT, 1, hidden=16)
    single.load_state_dict({key: value[:1] for key, value in agent.critic.state_dict().items()})
    torch.manual_seed(4)
    gap_n = enoto.cql_gap(agent.critic, agent.actor, obs, next_obs, agent.critic(obs, action), 4)
    torch.manual_seed(4)
    gap_1 = enoto.cql_gap(single, agent.actor, obs, next_obs, single(obs, action), 4)
    torch.testing.assert_close(gap_n, gap_1)


def test_cql_step_pushes_down_random_actions_and_up_dataset_actions():
    agent = tiny_agent(num_critics=2)
    obs, action, _, next_obs, _, _ = random_batch(64)
    action = torch.full_like(action, 0.5)  # dataset actions away from the uniform average
    with torch.no_grad():
        agent.actor.log_std.bias.fill_(-10.0)  # a huge policy log-density: the uniform terms dominate the LSE
        agent.critic.net[0].weight[:, OBS:] *= 10  # Q must depend on the action for the step to tell them apart
    probe = (torch.rand(16, 64, ACT) * 2 - 1).flatten(0, 1)  # fresh uniform actions at the same states
    probe_obs = obs.repeat(16, 1)
    before_data, before_random = agent.critic(obs, action).mean(), agent.critic(probe_obs, probe).mean()
    optimizer = torch.optim.SGD(agent.critic.parameters(), lr=0.1)
    enoto.cql_gap(agent.critic, agent.actor, obs, next_obs, agent.critic(obs, action), 10).backward()
    optimizer.step()
    with torch.no_grad():
        assert agent.critic(obs, action).mean() > before_data
        assert agent.critic(probe_obs, probe).mean() < before_random


def test_critic_loss_without_cql_is_the_summed_td_loss(monkeypatch):
    agent = tiny_agent(cql_weight=0.0)
    monkeypatch.setattr(enoto, "cql_gap", lambda *a: pytest.fail("CQL term computed with weight 0"))
    batch, y = random_batch(8), torch.randn(8)
    q = agent.critic(batch[0], batch[1]).detach()
    result = agent.update_critic(batch, y)
    assert "cql_loss" not in result
    assert result["qf_loss"].item() == pytest.approx(((q - y) ** 2).mean(1).sum().item(), rel=1e-6)
    weight = torch.rand(8)
    q = agent.critic(batch[0], batch[1]).detach()
    expected = (weight * (q - y) ** 2).mean(1).sum().item()
    assert agent.update_critic(batch, y, weight)["qf_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_temperature_moves_towards_the_target_entropy():
    for log_std, direction in ((0.0, -1), (-10.0, 1)):  # entropy above -|A| lowers alpha, below raises it
        agent = tiny_agent()
        with torch.no_grad():
            agent.actor.log_std.weight.zero_()
            agent.actor.log_std.bias.fill_(log_std)
        before = agent.log_alpha.item()
        entropy = agent.update_alpha(torch.randn(64, OBS))["entropy"].item()
        assert (entropy > -ACT) == (direction == -1)
        assert direction * (agent.log_alpha.item() - before) > 0


def test_actor_loss_uses_the_minimum_of_all_critics_in_both_phases():
    agent = tiny_agent()
    constant_critic(agent.critic, [3.0, -4.0, 7.0])
    with torch.no_grad():
        agent.log_alpha.fill_(-100.0)  # alpha ~ 0: the loss is -min_i Q_i
    assert agent.update_actor(torch.randn(16, OBS))["actor_loss"].item() == pytest.approx(4.0)
    agent.hand_over()
    agent.args.q_target = "mean"  # the loosened target never reaches the actor
    assert agent.update_actor(torch.randn(16, OBS))["actor_loss"].item() == pytest.approx(4.0)


def test_ucb_choice_against_an_independent_computation():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 7)).astype(np.float32)
    score = q.mean(0) + 10 * q.std(0)  # numpy's std is the population std
    assert enoto.ucb_choice(torch.from_numpy(q), 10.0).item() == score.argmax()
    assert enoto.ucb_choice(torch.from_numpy(q), 0.0).item() == q.mean(0).argmax()
    same = np.repeat(q[:1], 5, axis=0)  # identical critics: std 0, the max-Q candidate
    assert enoto.ucb_choice(torch.from_numpy(same), 10.0).item() == q[0].argmax()


@pytest.mark.parametrize("mode", ["sunrise", "bootstrap", "none"])
def test_explore_returns_the_chosen_candidate(mode):
    agent = tiny_agent(num_critics=4, exploration=mode)
    with torch.no_grad():
        agent.critic.net[-1].weight.normal_()
    obs = np.random.default_rng(1).normal(size=OBS).astype(np.float32)
    torch.manual_seed(5)
    action = agent.explore(obs, head=2)
    torch.manual_seed(5)
    obs_t = torch.from_numpy(obs)
    if mode == "none":
        np.testing.assert_array_equal(action, agent.actor(obs_t)[0].detach().numpy())
        return
    candidates = agent.actor(obs_t.expand(4, -1))[0].detach()
    q = agent.critic(obs_t.expand(4, -1), candidates).detach()
    index = (q.mean(0) + 10 * q.std(0, correction=0)).argmax() if mode == "sunrise" else q[2].argmax()
    np.testing.assert_array_equal(action, candidates[index].numpy())


def test_oac_shift_has_mahalanobis_length_sqrt_2_delta_along_the_gradient():
    torch.manual_seed(0)
    grad, variance = torch.randn(5, ACT), torch.rand(5, ACT) + 0.1
    shift = enoto.oac_shift(grad, variance, 23.53)
    torch.testing.assert_close((shift.pow(2) / variance).sum(-1), torch.full((5,), 2 * 23.53))
    assert ((shift * grad).sum(-1) > 0).all()  # first order: the upper bound increases
    agent = tiny_agent(exploration="oac")
    action = agent.explore(np.zeros(OBS, np.float32), head=0)
    assert action.shape == (ACT,) and np.abs(action).max() < 1
    assert all(p.grad is None for p in agent.critic.parameters())


def test_checkpoint_round_trip_is_bit_exact(tmp_path, minari_root):
    data = load_dataset("hopper-expert")
    args = enoto.Args(num_critics=3, hidden_dim=16)
    torch.manual_seed(0)
    agent = enoto.ENOTO(11, 3, args, torch.device("cpu"))
    rows = enoto.transition_rows(
        data.observations, data.actions, data.rewards, data.next_observations, data.terminals, 0
    )
    dataset = enoto.ReplayBuffer(len(rows), 11, 3, agent.device)
    dataset.add(torch.from_numpy(rows))
    for _ in range(3):
        agent.offline_update(dataset.split(dataset.sample_rows(16)))
    save_checkpoint(tmp_path / "offline.pt", "enoto", agent, args, data, "offline", 3)
    loaded = enoto.ENOTO(11, 3, args, torch.device("cpu"))
    loaded.load_state_dict(torch.load(tmp_path / "offline.pt", weights_only=False))
    loaded.hand_over()
    assert torch.equal(loaded.log_alpha, agent.log_alpha) and loaded.log_alpha.item() != 0.0
    for name in ("actor", "critic", "critic_target"):
        for a, b in zip(getattr(agent, name).parameters(), getattr(loaded, name).parameters(), strict=True):
            assert torch.equal(a, b), name
    for name in ("actor_optimizer", "critic_optimizer", "alpha_optimizer"):
        for state_a, state_b in zip(
            getattr(agent, name).state.values(), getattr(loaded, name).state.values(), strict=True
        ):
            assert all(torch.equal(state_a[key], state_b[key]) for key in ("exp_avg", "exp_avg_sq")), name
    assert loaded.cql_weight == 0.0
    online_result = loaded.online_update(dataset.split(dataset.sample_rows(16)))
    assert "losses/cql_loss" not in online_result and "charts/sunrise_weight" in online_result


@pytest.fixture(params=["hopper", "antmaze"])
def online_run(minari_root, tmp_path, request):
    """The real online phase in-process on tiny hopper data, with a short horizon and a recording env; the
    "antmaze" run labels the same data AntMaze, whose training reward is (r - 0.5) * 4."""
    data = dataclasses.replace(load_dataset("hopper-medium"), task=request.param)
    args = enoto.Args(
        num_critics=3,
        hidden_dim=16,
        online_steps=50,
        warmup_steps=20,
        batch_size=8,
        eval_freq=1000,
        eval_episodes=1,
        log_freq=10,
        progress=False,
    )
    torch.manual_seed(0)
    random.seed(0)  # the bootstrap head of each episode: without it the heads depend on the tests run before
    agent = enoto.ENOTO(11, 3, args, torch.device("cpu"))
    agent.hand_over()
    env, transitions = recording_env(data.env_spec)
    updates, heads = [], []
    online_update, explore = agent.online_update, agent.explore
    agent.online_update = lambda batch: (updates.append(len(transitions)), online_update(batch))[1]
    agent.explore = lambda obs, head: (heads.append(head), explore(obs, head))[1]
    online = enoto.online_phase(agent, data, env, make_env(data.eval_env_spec, 1), SummaryWriter(str(tmp_path)), args)
    return online, transitions, updates, args, data.task, heads


def test_online_buffer_holds_exactly_the_online_transitions(online_run):
    online, transitions, updates, args, task, heads = online_run
    assert online.size == len(transitions) == args.online_steps  # one row per env step, no offline rows
    _, action, reward, _, done, is_online = online.split(online.storage[: online.size])
    np.testing.assert_array_equal(action.numpy(), np.array([t[0] for t in transitions], np.float32))
    rewards = np.array([t[1] for t in transitions])
    expected = (rewards - 0.5) * 4 if task == "antmaze" else rewards
    np.testing.assert_allclose(reward.numpy(), expected.astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(done.numpy(), [float(t[2]) for t in transitions])  # truncation stores d = 0
    assert is_online.eq(1).all()
    assert any(t[3] and not t[2] for t in transitions), "no truncation was exercised"
    assert updates == list(range(args.warmup_steps + 1, args.online_steps + 1))  # one update per step after warm-up
    ends = [step for step, t in enumerate(transitions) if t[2] or t[3]]  # an episode ends after these steps
    for start, end in zip([-1, *ends], [*ends, len(heads) - 1], strict=True):
        assert len(set(heads[start + 1 : end + 1])) <= 1  # one bootstrap head per episode ...
    assert len(set(heads)) > 1  # ... drawn again for the next


# hopper-expert keeps the env's 1000-step limit, so evaluation episodes have exact Monte-Carlo returns
SMOKE = [
    "--env-id", "hopper-expert", "--num-critics", "3", "--hidden-dim", "32", "--batch-size", "16",
    "--online-steps", "100", "--warmup-steps", "20", "--eval-freq", "50", "--eval-episodes", "2",
    "--offline-eval-freq", "10", "--log-freq", "10", "--cql-samples", "4", "--no-cuda",
]  # fmt: skip


@pytest.mark.slow
def test_smoke_both_phases_then_pretrained(minari_root, tmp_path):
    run, _ = script_run("enoto", [*SMOKE, "--offline-steps", "20"], minari_root, tmp_path / "a")
    required = [
        "offline/normalized_score", "offline/episodic_return", "offline/qf_loss", "offline/cql_loss", "offline/q_std",
        "offline/alpha", "offline/UPS", "eval/normalized_score", "eval/episodic_return", "eval/q_bias",
        "eval/q_rank_tau", "charts/episodic_return", "charts/SPS", "charts/UPS", "charts/sunrise_weight",
        "losses/qf_loss", "losses/qf_values", "losses/q_std", "losses/actor_loss", "losses/alpha",
    ]  # fmt: skip
    tags = scalars(run, required)
    assert "losses/cql_loss" not in tags
    assert all(0.5 <= w <= 1.0 for w in tags["charts/sunrise_weight"])
    assert len(tags["eval/normalized_score"]) == 3  # steps 0, 50, 100
    offline, final = (torch.load(run / name, weights_only=False) for name in ("offline.pt", "final.pt"))
    assert offline["phase"] == "offline" and final["phase"] == "online" and offline["step"] == 20
    for key in ("args", "actor", "critic", "critic_target", "log_alpha", "alpha_optimizer", "env_spec"):
        assert key in final
    assert enoto.policy_from_checkpoint(final)(np.zeros(11)).shape == (3,)  # evaluates without the dataset

    online = [*SMOKE, "--pretrained", str(run / "offline.pt"), "--exploration", "oac", "--q-target", "rem"]
    online += ["--num-critics", "5"]  # ignored: the networks come from the checkpoint
    second, stderr = script_run("enoto", online, minari_root, tmp_path / "b")
    assert "using the checkpoint's --num-critics 3 --hidden-dim 32" in stderr
    assert not (second / "offline.pt").exists()
    assert not any(tag.startswith("offline/") for tag in scalars(second))
    assert torch.load(second / "final.pt", weights_only=False)["num_critics"] == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--online-steps", "10", "--warmup-steps", "10"], "lower --warmup-steps"),
        (["--num-critics", "1"], "needs --num-critics >= 2"),
        (["--cql-samples", "0"], "--cql-samples must be >= 1"),
        (["--pretrained", "/nonexistent/offline.pt"], "cannot be used"),
    ],
)
def test_bad_input_is_one_line(minari_root, tmp_path, monkeypatch, extra, message):
    assert message in main_error("enoto", [*SMOKE, "--run-dir", str(tmp_path), *extra], minari_root, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("exploration", ["sunrise", "oac"])
def test_cuda_offline_and_online_updates(exploration):
    agent = tiny_agent(device="cuda", exploration=exploration, sunrise_weight="batch")
    batch = tuple(t.cuda() for t in random_batch(64))
    offline = agent.offline_update(batch)
    with no_host_sync():  # after the warm-up above
        agent.offline_update(batch)
    agent.hand_over()
    online = agent.online_update(batch)
    with no_host_sync():
        agent.online_update(batch)
    assert all(torch.isfinite(v).all() and v.device.type == "cuda" for v in (*offline.values(), *online.values()))
    assert agent.explore(np.zeros(OBS, np.float32), head=1).shape == (ACT,)


# ---------------------------------------------------------------------------------------------------
# The real updates against hand-computed ones: plain SGD with lr 1, so a step is exactly minus the gradient
# ---------------------------------------------------------------------------------------------------


def perturbed_targets(agent):
    with torch.no_grad():  # targets that differ from the critics and between members, per state and action
        for param in agent.critic_target.parameters():
            param.add_(torch.randn_like(param) * 0.5)


def test_online_critic_step_is_the_sunrise_weighted_td_to_the_wmp_soft_target():
    agent = tiny_agent(num_critics=4, sunrise_temperature=1.0)  # T small enough that w varies per sample
    agent.hand_over()
    perturbed_targets(agent)
    agent.critic_optimizer = torch.optim.SGD(agent.critic.parameters(), lr=1.0)
    critic, target, actor = (copy.deepcopy(m) for m in (agent.critic, agent.critic_target, agent.actor))
    batch = random_batch(done=torch.tensor([0.0, 1, 0, 0, 0, 1, 0, 0]))
    obs, action, reward, next_obs, done, _ = batch
    torch.manual_seed(5)
    agent.online_update(batch)
    alpha = agent.log_alpha.exp().detach()  # the temperature steps first; the target uses the new value
    torch.manual_seed(5)  # the same draws: pi(s) for the temperature, then a' ~ pi(s')
    with torch.no_grad():
        actor(obs)
        next_action, next_log_prob = actor(next_obs)
        target_q = target(next_obs, next_action)
        pair_minima = torch.stack(
            [torch.minimum(target_q[i], target_q[j]) for i, j in itertools.combinations(range(4), 2)]
        )
        y = reward + 0.99 * (1 - done) * (pair_minima.mean(0) - alpha * next_log_prob)
        weight = torch.sigmoid(-1.0 * target_q.std(0, correction=0)) + 0.5
    assert weight.max() - weight.min() > 0.01, "the weights must differ between samples to be tested"
    assert_sgd_step(agent.critic, critic, (weight * (critic(obs, action) - y).pow(2)).mean(1).sum())
    moved = zip(agent.critic_target.parameters(), target.parameters(), agent.critic.parameters(), strict=True)
    for after, old, new in moved:  # then the targets follow the updated critics by tau
        torch.testing.assert_close(after, old + 0.005 * (new - old))


def test_offline_critic_step_carries_the_cql_gradient():
    agent = tiny_agent(num_critics=3)
    perturbed_targets(agent)
    agent.critic_optimizer = torch.optim.SGD(agent.critic.parameters(), lr=1.0)
    critic, target, actor = (copy.deepcopy(m) for m in (agent.critic, agent.critic_target, agent.actor))
    batch = random_batch(done=torch.tensor([0.0, 1, 0, 0, 0, 1, 0, 0]))
    obs, action, reward, next_obs, done, _ = batch
    torch.manual_seed(6)
    agent.offline_update(batch)
    torch.manual_seed(6)  # the same draws: pi(s) for the temperature, then the CQL samples
    with torch.no_grad():
        actor(obs)
        next_action, _ = actor(next_obs, deterministic=True)
        y = reward + 0.99 * (1 - done) * target(next_obs, next_action).min(0).values
    q = critic(obs, action)
    gap = enoto.cql_gap(critic, actor, obs, next_obs, q, agent.args.cql_samples)
    assert_sgd_step(agent.critic, critic, (q - y).pow(2).mean(1).sum() + 5.0 * gap)


def test_hand_over_drops_the_cql_term_and_keeps_everything_else():
    agent = tiny_agent(num_critics=3)
    agent.offline_update(random_batch())
    before = {name: copy.deepcopy(getattr(agent, name).state_dict()) for name in ("critic", "critic_target", "actor")}
    optimizer_states = {name: getattr(agent, f"{name}_optimizer").state_dict() for name in ("actor", "critic")}
    agent.hand_over()
    assert agent.cql_weight == 0.0
    for name, state in before.items():
        assert all(torch.equal(state[key], value) for key, value in getattr(agent, name).state_dict().items()), name
    for name, state in optimizer_states.items():
        assert getattr(agent, f"{name}_optimizer").state_dict()["state"].keys() == state["state"].keys() != set()
    kept = tiny_agent(num_critics=3, keep_cql_online=True)
    kept.hand_over()
    assert kept.cql_weight == 5.0


def test_oac_action_moves_the_mean_by_the_optimistic_shift():
    agent = tiny_agent(num_critics=4, exploration="oac")
    with torch.no_grad():
        agent.critic.net[-1].weight.normal_()  # a Q that depends on the action, with members that disagree
    obs = torch.randn(OBS)
    torch.manual_seed(8)
    action = agent.oac_action(obs)
    mu, std = (t.detach() for t in agent.actor.distribution(obs))
    mu = mu.requires_grad_(True)
    q = agent.critic(obs.unsqueeze(0), torch.tanh(mu).unsqueeze(0))
    grad = torch.autograd.grad((q.mean(0) + 4.66 * q.std(0, correction=0)).sum(), mu)[0]
    shift = enoto.oac_shift(grad, std.pow(2), 23.53)
    assert shift.norm() > 0.1, "the shift must be large enough to matter"
    torch.manual_seed(8)
    torch.testing.assert_close(action, torch.tanh(mu.detach() + shift + std * torch.randn_like(std)))


def test_temperature_step_is_d3rlpys_alpha_times_the_entropy_gap():
    """d3rlpy: loss = -alpha (log pi - |A|), so d loss / d log alpha = -alpha mean(log pi - |A|)."""
    agent = tiny_agent()
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.3))  # alpha != 1, where alpha and log alpha in front would differ
    agent.alpha_optimizer = torch.optim.SGD([agent.log_alpha], lr=1.0)
    obs = torch.randn(16, OBS)
    torch.manual_seed(2)
    agent.update_alpha(obs)
    torch.manual_seed(2)
    with torch.no_grad():
        _, log_prob = agent.actor(obs)
    expected = math.log(0.3) + 0.3 * (log_prob - ACT).mean()  # log alpha - gradient
    assert agent.log_alpha.item() == pytest.approx(expected.item(), rel=1e-5)
