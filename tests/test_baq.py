"""BAQ: the card's testable properties with exact numbers, smoke runs for both backbones, a CUDA variant."""

import math

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from algorithms import baq
from tests.conftest import main_error, no_host_sync, recording_env, scalars, script_run
from utils import load_dataset, make_env

OBS, ACT = 4, 3


def tiny_agent(backbone="cql", device="cpu", **overrides) -> baq.BAQ:
    torch.manual_seed(0)
    args = baq.Args(backbone=backbone, hidden_dim=16, cql_samples=4, **overrides)
    return baq.BAQ(OBS, ACT, args, torch.device(device))


def random_batch(n=8, done=None):
    done = torch.zeros(n) if done is None else done
    return (torch.randn(n, OBS), torch.rand(n, ACT) * 2 - 1, torch.randn(n), torch.randn(n, OBS), done, torch.ones(n))


def constant_output(network: torch.nn.Module, values) -> None:
    """Make ensemble member i of a network return values[i] whatever the input."""
    last = network.net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1).expand_as(last.bias))


def test_weight_lies_in_0_1_and_is_one_on_the_bc_action():
    mse = torch.linspace(0, 10, 201, requires_grad=True)
    w = baq.td_weight(mse, 0.5)
    assert not w.requires_grad and w[0].item() == 1.0 and (w > 0).all() and (w <= 1).all()
    assert (w[1:] < w[:-1]).all()
    assert (baq.td_weight(mse, 1e12) >= 1 - 1e-6).all()  # k_q -> infinity: plain backbone


def test_priority_is_at_least_one_and_monotone():
    distance = torch.linspace(0, 5, 101)
    rho = baq.priority(distance, 0.7, 1.0)
    assert rho[0].item() == 1.0 and (rho >= 1).all() and (rho[1:] > rho[:-1]).all()
    assert torch.equal(baq.priority(distance, 0.7, 0.0), torch.ones(101))  # alpha = 0: uniform
    torch.testing.assert_close(baq.priority(distance, 0.7, 2.0), (distance / 0.7 + 1) ** 2)


@pytest.mark.parametrize("act_dim", [3, 6])
def test_weight_uses_the_mean_square_and_priority_the_euclidean_norm(act_dim):
    torch.manual_seed(act_dim)
    model = baq.BehaviourModel(OBS, act_dim, 16)
    obs, action = torch.randn(5, OBS), torch.rand(5, act_dim) * 2 - 1
    bc_mse, distance = baq.bc_distances(model, obs, action, chunk=2)
    with torch.no_grad():
        diff = (model(obs) - action).numpy()
    np.testing.assert_allclose(bc_mse.numpy(), (diff**2).sum(1) / act_dim, rtol=1e-6)
    np.testing.assert_allclose(distance.numpy(), np.sqrt((diff**2).sum(1)), rtol=1e-6)


def filled_replay(priorities: torch.Tensor, capacity: int) -> baq.PriorityReplay:
    replay = baq.PriorityReplay(capacity, OBS, ACT, torch.device("cpu"))
    rows = torch.zeros(len(priorities), 2 * OBS + ACT + 3)
    replay.add(rows, torch.zeros(len(priorities)), priorities)
    return replay


def test_sampling_frequencies_follow_the_priorities_and_new_rows_take_their_mass():
    torch.manual_seed(0)
    rho = torch.rand(1000, dtype=torch.float64) * 4 + 1
    replay = filled_replay(rho, 1100)
    assert replay.cumulative.dtype == torch.float64
    assert abs(replay.cumulative[999].item() / rho.sum().item() - 1) < 1e-9
    draws = 1_000_000
    counts = np.bincount(replay.sample(draws, True).numpy(), minlength=1000)
    p = (rho / rho.sum()).numpy()
    assert (np.abs(counts / draws - p) < 4 * np.sqrt(p * (1 - p) / draws)).all()
    chi2 = ((counts - draws * p) ** 2 / (draws * p)).sum()
    assert chi2 < 1000 + 5 * math.sqrt(2 * 1000)  # 999 degrees of freedom
    replay.add(torch.zeros(100, 2 * OBS + ACT + 3), torch.zeros(100), torch.full((100,), 50.0))
    share = (replay.sample(200_000, True) >= 1000).double().mean().item()
    expected = 5000 / (5000 + rho.sum().item())
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / 200_000)
    uniform = replay.sample(200_000, False)
    assert abs((uniform >= 1000).double().mean().item() - 100 / 1100) < 0.005


def test_the_static_priority_replay_refuses_rows_past_its_capacity_instead_of_wrapping():
    # the online loop's case, one row into a full replay: the ring buffer would overwrite row 0 while the prefix
    # sum (a one-element write into an empty slice) kept its priority
    replay = filled_replay(torch.ones(10, dtype=torch.float64), 10)
    with pytest.raises(ValueError, match="holds 10 rows; 11 do not fit"):
        replay.add(torch.ones(1, 2 * OBS + ACT + 3), torch.zeros(1), torch.ones(1))
    assert replay.buffer.position == 0 and not replay.buffer.storage.any()


def test_cql_weighted_td_loss_matches_a_hand_computation():
    agent = tiny_agent(cql_weight=0.0)
    constant_output(agent.critic, [2.0, -1.0])
    constant_output(agent.critic_target, [3.0, 5.0])
    obs, action, reward, next_obs, _, is_online = random_batch(6)
    done = torch.tensor([0.0, 1, 0, 0, 1, 0])
    weight = torch.rand(6)
    results = agent.update((obs, action, reward, next_obs, done, is_online), weight)
    y = reward + 0.99 * (1 - done) * 3.0  # min of the targets; d = 1 gives y = r
    expected = sum((weight * (q - y) ** 2).mean() for q in (2.0, -1.0))
    assert results["qf_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_iql_weighted_losses_match_hand_computations():
    agent = tiny_agent("iql")
    constant_output(agent.critic, [1.0, 4.0])
    constant_output(agent.critic_target, [2.0, 3.0])
    constant_output(agent.value, [2.5])
    obs, action, reward, next_obs, _, is_online = random_batch(6)
    done = torch.tensor([0.0, 1, 0, 0, 1, 0])
    weight = torch.rand(6)
    results = agent.update((obs, action, reward, next_obs, done, is_online), weight)
    u = 2.0 - 2.5  # min target Q - V < 0: weight |0.7 - 1| = 0.3
    assert results["value_loss"].item() == pytest.approx((weight * 0.3 * u**2).mean().item(), rel=1e-5)
    y = reward + 0.99 * (1 - done) * 2.5  # V(s') before the V step
    expected = 0.5 * sum((weight * (q - y) ** 2).mean() for q in (1.0, 4.0))
    assert results["qf_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    u = torch.tensor([-2.0, 0.5, 1.0])
    loss = baq.expectile_loss(u, 0.7, torch.tensor([1.0, 0.5, 2.0]))
    assert loss.item() == pytest.approx((0.3 * 4 + 0.5 * 0.7 * 0.25 + 2 * 0.7 * 1) / 3)


@pytest.mark.parametrize("backbone", ["cql", "iql"])
def test_unit_weights_reduce_to_the_backbone(backbone):
    plain, weighted = tiny_agent(backbone), tiny_agent(backbone)
    batch = random_batch(16)
    torch.manual_seed(1)
    expected = plain.update(batch)
    torch.manual_seed(1)
    got = weighted.update(batch, torch.ones(16))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value)
    for a, b in zip(plain.critic.parameters(), weighted.critic.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_zero_weights_leave_only_the_conservative_gradient():
    agent, reference = tiny_agent("cql"), tiny_agent("cql")
    obs, action, reward, next_obs, done, is_online = random_batch(16)
    torch.manual_seed(2)
    agent.update((obs, action, reward, next_obs, done, is_online), torch.zeros(16))
    torch.manual_seed(2)
    reference.actor(obs)  # the draws cql_update makes before the conservative term
    reference.actor(next_obs)
    q = reference.critic(obs, action)
    (10.0 * baq.cql_gap(reference.critic, reference.actor, obs, next_obs, q, 4).sum()).backward()
    for got, expected in zip(agent.critic.parameters(), reference.critic.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad)

    iql = tiny_agent("iql")
    before = [p.clone() for p in (*iql.critic.parameters(), *iql.value.parameters())]
    iql.update(random_batch(16), torch.zeros(16))  # zero gradients: Adam's first step moves nothing
    for old, new in zip(before, (*iql.critic.parameters(), *iql.value.parameters()), strict=True):
        assert torch.equal(old, new)


def test_iql_actor_lr_decays_offline_and_is_constant_online(minari_root, tmp_path):
    data = load_dataset("hopper-medium")
    args = baq.Args(backbone="iql", hidden_dim=16, batch_size=8, offline_steps=6, offline_eval_freq=6, eval_episodes=1,
                    log_freq=10, progress=False)  # fmt: skip
    agent = baq.BAQ(11, 3, args, torch.device("cpu"))
    dataset = baq.ReplayBuffer(len(data), 11, 3, agent.device)
    dataset.add(torch.from_numpy(baq.prepare_data(agent, data, args, fit_statistics=True)))
    writer, eval_env = SummaryWriter(str(tmp_path)), make_env(data.eval_env_spec, 1)
    args.offline_steps = 3  # the real phase, halfway through the cosine schedule over 6 updates
    baq.offline_phase(agent, data, dataset, eval_env, writer, args)
    assert float(agent.actor_optimizer.param_groups[0]["lr"]) == pytest.approx(3e-4 * (1 + math.cos(math.pi / 2)) / 2)
    agent.hand_over()
    for _ in range(3):
        agent.update(dataset.split(dataset.sample_rows(8)))
    assert float(agent.actor_optimizer.param_groups[0]["lr"]) == pytest.approx(3e-4) and agent.actor_optimizer.state


def test_calibration_medians():
    agent = tiny_agent("cql", probe_states=500)
    obs = torch.randn(2001, OBS)
    with torch.no_grad():  # dataset actions close to pi_BC, so that the probe's median MSE is the larger one
        action = (agent.bc_model(obs) + 0.05 * torch.randn(2001, ACT)).clamp(-1, 1)
    dataset = baq.ReplayBuffer(2001, OBS, ACT, torch.device("cpu"))
    dataset.add(torch.from_numpy(baq.transition_rows(
        obs.numpy(), action.numpy(), np.zeros(2001), np.random.randn(2001, OBS), np.zeros(2001), False,
    )))  # fmt: skip
    torch.manual_seed(3)
    replay, k_q, k_rho = baq.calibrate(agent, dataset, 10, SummaryWriter(), agent.args)
    torch.manual_seed(3)  # the same probe states and exploration actions
    with torch.no_grad():
        probe = torch.randint(0, 2001, (500,))
        probe_mse = (agent.bc_model(obs[probe]) - agent.actor(obs[probe])[0]).pow(2).mean(-1)
        offline_diff = agent.bc_model(obs) - action
    m_off, m_probe = offline_diff.pow(2).mean(-1).median().item(), probe_mse.median().item()
    assert m_probe > 2 * m_off
    assert k_q == pytest.approx(max(m_off, m_probe) / math.log(2), rel=1e-6)  # half of each get w >= 0.5
    assert k_rho == pytest.approx(offline_diff.norm(dim=-1).median().item(), rel=1e-6)
    rho = torch.diff(replay.cumulative[:2001], prepend=torch.zeros(1, dtype=torch.float64))
    assert rho.median().item() == pytest.approx(2.0)  # 2^alpha at the median distance
    replay, k_q, _ = baq.calibrate(agent, dataset, 10, SummaryWriter(), baq.Args(k_q=1e9, k_rho=2.0, probe_states=5))
    assert k_q == 1e9 and replay.num_offline == 2001


@pytest.fixture
def online_run(minari_root, tmp_path):
    """The real online phase in-process on tiny hopper data, with a short horizon and a recording env."""
    data = load_dataset("hopper-medium")
    args = baq.Args(hidden_dim=16, online_steps=40, batch_size=8, cql_samples=2, eval_freq=1000, eval_episodes=1,
                    log_freq=10, progress=False, probe_states=50)  # fmt: skip
    torch.manual_seed(0)
    agent = baq.BAQ(11, 3, args, torch.device("cpu"))
    dataset = baq.ReplayBuffer(len(data), 11, 3, agent.device)
    dataset.add(torch.from_numpy(baq.prepare_data(agent, data, args, fit_statistics=True)))
    agent.bc_model.requires_grad_(False)
    agent.hand_over()
    writer = SummaryWriter(str(tmp_path))
    replay, k_q, k_rho = baq.calibrate(agent, dataset, args.online_steps, writer, args)
    offline_cumulative, bc_params = (
        replay.cumulative[: len(data)].clone(),
        [p.clone() for p in agent.bc_model.parameters()],
    )
    env, transitions = recording_env(data.env_spec)
    agent.reward_scale = 2.5  # as IQL's scale would be, so that the online rows show whether it is applied
    baq.online_phase(agent, data, replay, k_q, k_rho, env, make_env(data.eval_env_spec, 1), writer, args)
    return agent, replay, transitions, offline_cumulative, bc_params, len(data), k_rho


def test_online_phase_keeps_priorities_and_pi_bc_and_stores_every_step(online_run):
    agent, replay, transitions, offline_cumulative, bc_params, num_offline, k_rho = online_run
    assert torch.equal(replay.cumulative[:num_offline], offline_cumulative)  # static priorities
    assert all(torch.equal(a, b) for a, b in zip(bc_params, agent.bc_model.parameters(), strict=True))
    assert replay.buffer.size == num_offline + len(transitions) == num_offline + 40
    _, action, _, _, done, is_online = replay.buffer.split(replay.buffer.storage[num_offline : num_offline + 40])
    np.testing.assert_array_equal(action.numpy(), np.array([t[0] for t in transitions], np.float32))
    np.testing.assert_array_equal(done.numpy(), [float(t[2]) for t in transitions])  # truncation stores d = 0
    assert is_online.eq(1).all() and any(t[3] and not t[2] for t in transitions)
    obs, _, reward, next_obs, _, _ = replay.buffer.split(replay.buffer.storage[num_offline : num_offline + 40])
    np.testing.assert_allclose(reward.numpy(), 2.5 * np.array([t[1] for t in transitions]), rtol=1e-6)
    raw = np.array([t[4] for t in transitions])
    np.testing.assert_allclose(next_obs.numpy(), agent.normalize(raw), rtol=1e-5, atol=1e-5)
    assert np.abs(agent.normalize(raw) - raw).max() > 0.1  # the dataset statistics do change the rows
    running = np.array([not (t[2] or t[3]) for t in transitions[:-1]])  # no reset between row i and row i + 1
    np.testing.assert_array_equal(obs[1:][running].numpy(), next_obs[:-1][running].numpy())  # s_{t+1} = s'_t
    new_rho = torch.diff(replay.cumulative[num_offline - 1 : num_offline + 40])
    obs, action = replay.buffer.split(replay.buffer.storage[num_offline : num_offline + 40])[:2]
    bc_mse, distance = baq.bc_distances(agent.bc_model, obs, action)
    torch.testing.assert_close(new_rho, (distance.double() / k_rho + 1.0) ** 1.0)  # Eq. 10 of its own row
    torch.testing.assert_close(replay.bc_mse[num_offline : num_offline + 40], bc_mse)
    logged = {}
    writer = type("Writer", (), {"add_scalar": lambda self, tag, value, step: logged.__setitem__(tag, float(value))})()
    baq.log_weights(writer, replay, 0.3, 40)
    w = torch.exp(-replay.bc_mse / 0.3)
    assert logged["charts/w_mean_offline"] == pytest.approx(w[:num_offline].mean().item(), rel=1e-5)
    assert logged["charts/w_mean_online"] == pytest.approx(w[num_offline : num_offline + 40].mean().item(), rel=1e-5)


SMOKE = [
    "--env-id", "hopper-expert", "--hidden-dim", "32", "--batch-size", "16", "--bc-steps", "40",
    "--online-steps", "60", "--eval-freq", "30", "--eval-episodes", "2", "--offline-eval-freq", "10",
    "--log-freq", "10", "--cql-samples", "4", "--probe-states", "100", "--no-cuda",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["cql", "iql"])
def test_smoke_both_phases_then_pretrained(minari_root, tmp_path, backbone):
    run, _ = script_run("baq", [*SMOKE, "--backbone", backbone, "--offline-steps", "20"], minari_root, tmp_path / "a")
    required = [
        "offline/bc_loss", "offline/bc_val_mse", "offline/normalized_score", "offline/qf_loss", "offline/UPS",
        "eval/normalized_score", "eval/episodic_return", "eval/q_bias", "eval/q_rank_tau", "charts/episodic_return",
        "charts/SPS", "charts/UPS", "charts/k_q", "charts/k_rho", "charts/w_mean", "charts/w_min",
        "charts/offline_share", "charts/w_mean_online", "charts/w_mean_offline", "losses/qf_loss",
        "losses/qf_values", "losses/actor_loss",
    ]  # fmt: skip
    required += ["losses/cql_loss", "losses/alpha"] if backbone == "cql" else ["losses/value_loss"]
    tags = scalars(run, required)
    assert all(0 < w <= 1 for w in tags["charts/w_mean"])
    assert all(ups > sps for ups, sps in zip(tags["charts/UPS"], tags["charts/SPS"], strict=True))  # update time only
    assert len(tags["eval/normalized_score"]) == 3  # steps 0, 30, 60
    offline, final = (torch.load(run / name, weights_only=False) for name in ("offline.pt", "final.pt"))
    assert offline["phase"] == "offline" and final["phase"] == "online" and "bc_val_mse" in offline
    assert final["k_q"] > 0 and final["k_rho"] > 0 and "bc_model" in final and "obs_mean" in final
    if backbone == "iql":  # the cosine schedule ran to its end offline; the online lr is the constant 3e-4
        lrs = [float(c["actor_optimizer"]["param_groups"][0]["lr"]) for c in (offline, final)]
        assert lrs == [pytest.approx(0.0, abs=1e-12), pytest.approx(3e-4)]
    assert baq.policy_from_checkpoint(final)(np.zeros(11)).shape == (3,)  # evaluates without the dataset

    online = [*SMOKE, "--backbone", backbone, "--pretrained", str(run / "offline.pt"), "--no-use-priority"]
    second, _ = script_run("baq", online, minari_root, tmp_path / "b")
    assert not (second / "offline.pt").exists() and not any(tag.startswith("offline/") for tag in scalars(second))
    for name in ("bc_model", "actor", "critic"):  # pi_BC is frozen; the backbone moved
        same = [torch.equal(a, b) for a, b in zip(offline[name].values(), torch.load(second / "final.pt",
                weights_only=False)[name].values(), strict=True)]  # fmt: skip
        assert all(same) == (name == "bc_model"), name


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bc-steps", "0"], "BAQ needs pi_BC"),
        (["--k-q", "-1"], "--k-q must be >= 0"),
        (["--expectile", "1.5"], "--expectile must lie in (0, 1)"),
        (["--pretrained", "/nonexistent/offline.pt"], "cannot be used"),
    ],
)
def test_bad_input_is_one_line(minari_root, tmp_path, monkeypatch, extra, message):
    assert message in main_error("baq", [*SMOKE, "--run-dir", str(tmp_path), *extra], minari_root, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backbone", ["cql", "iql"])
def test_cuda_updates_and_sampling(backbone):
    agent = tiny_agent(backbone, device="cuda")
    batch = tuple(t.cuda() for t in random_batch(64))
    offline = agent.update(batch)
    with no_host_sync():  # after the warm-up above
        agent.update(batch)
    agent.hand_over()
    weight = baq.td_weight(torch.rand(64, device="cuda"), 0.5)
    online = agent.update(batch, weight)
    with no_host_sync():
        agent.update(batch, weight)
    assert all(torch.isfinite(v).all() and v.device.type == "cuda" for v in (*offline.values(), *online.values()))
    assert agent.policy(np.zeros(OBS, np.float32), deterministic=False).shape == (ACT,)


@pytest.mark.parametrize("backbone", ["cql", "iql"])
def test_online_update_feeds_the_drawn_rows_weights_into_the_backbone(monkeypatch, backbone):
    """The batch is drawn by rho, and w = exp(-mse / k_q) of exactly those rows reaches the update."""
    agent = tiny_agent(backbone, batch_size=64)
    agent.hand_over()
    rows = torch.cat(
        [torch.randn(200, OBS), torch.rand(200, ACT) * 2 - 1, torch.randn(200, 1), torch.randn(200, OBS)], 1
    )
    rows = torch.cat([rows, torch.zeros(200, 2)], 1)
    replay = baq.PriorityReplay(200, OBS, ACT, torch.device("cpu"))
    bc_mse = torch.rand(200) * 0.5
    rho = torch.ones(200)
    rho[:10] = 1000.0  # ten rows hold 98% of the mass
    replay.add(rows, bc_mse, rho)
    seen = {}
    sample, update = replay.sample, agent.update
    monkeypatch.setattr(replay, "sample", lambda *a: seen.setdefault("index", sample(*a)))

    def recording_update(batch, weight=1.0):
        seen["weight"] = weight
        return update(batch, weight)

    monkeypatch.setattr(agent, "update", recording_update)
    baq.online_update(agent, replay, 0.2, agent.args)
    assert (seen["index"] < 10).float().mean() > 0.9  # drawn by priority
    torch.testing.assert_close(seen["weight"], torch.exp(-bc_mse[seen["index"]] / 0.2))


def test_hand_over_sets_the_online_cql_weight_that_the_update_uses():
    offline, online = (
        tiny_agent(cql_weight=10.0, cql_weight_online=2.5),
        tiny_agent(cql_weight=10.0, cql_weight_online=2.5),
    )
    online.hand_over()
    batch = random_batch(16)
    torch.manual_seed(4)
    before = offline.update(batch)["cql_loss"]
    torch.manual_seed(4)
    after = online.update(batch)["cql_loss"]  # the same networks and draws: only the weight differs
    assert online.cql_weight == 2.5 and after.item() == pytest.approx(before.item() / 4, rel=1e-5)


def test_iql_advantage_weight_is_clamped_at_100():
    agent = tiny_agent("iql")
    constant_output(agent.critic_target, [50.0, 60.0])  # Q - V = 50 + 10: exp(3 * 60) far above the clamp
    constant_output(agent.value, [-10.0])
    obs, action, reward, next_obs, done, is_online = random_batch(8)
    with torch.no_grad():
        log_prob = agent.actor.distribution(obs).log_prob(action).sum(-1)
    results = agent.update((obs, action, reward, next_obs, done, is_online))
    assert results["actor_loss"].item() == pytest.approx(-(100.0 * log_prob).mean().item(), rel=1e-5)
