"""OPT: the card's testable properties with exact numbers, smoke runs per backbone, and a CUDA variant."""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from algorithms import opt
from tests.conftest import assert_sgd_step, main_error, no_host_sync, recording_env, scalars, script_run
from utils import load_dataset, make_env

OBS, ACT = 4, 3


def tiny_agent(backbone="td3bc", device="cpu", name="hopper-medium", task="hopper", **overrides) -> opt.OPT:
    torch.manual_seed(0)
    args = opt.Args(backbone=backbone, hidden_dim=16, batch_size=8, **overrides)
    opt.resolve_args(args, name, task)
    agent = opt.OPT(OBS, ACT, args, torch.device(device))
    if backbone == "spot":
        agent.vae = opt.VAE(OBS, ACT, hidden=16).to(device).requires_grad_(False)
    return agent


def random_batch(n: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    obs, next_obs = torch.randn(n, OBS, dtype=dtype), torch.randn(n, OBS, dtype=dtype)
    action = torch.rand(n, ACT, dtype=dtype) * 2 - 1
    return obs, action, torch.randn(n, dtype=dtype), next_obs, torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)


def tensors_equal(a, b) -> bool:
    """Deep equality of (nested) state dicts."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[key], b[key]) for key in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def snapshot(agent: opt.OPT) -> dict:
    return {name: copy.deepcopy(module.state_dict()) for name, module in agent.networks().items()}


# ---------------------------------------------------------------------------------------------------
# Defaults and the kappa schedule
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, task, backbone, kappa, spot_lambda",
    [
        ("hopper-random", "hopper", "td3bc", (1.0, 1.0, 0), None),
        ("walker2d-medium", "walker2d", "td3bc", (0.3, 0.9, 150_000), None),
        ("halfcheetah-expert", "halfcheetah", "td3bc", (0.3, 0.9, 150_000), None),
        ("o2o-local/hopper/medium-replay-v0", "hopper", "td3bc", (0.1, 0.9, 150_000), None),
        ("antmaze-umaze-diverse", "antmaze", "spot", (0.1, 0.9, 100_000), 0.25),
        ("antmaze-medium-play", "antmaze", "spot", (0.1, 0.9, 100_000), 0.05),
        ("antmaze-large-play", "antmaze", "spot", (0.1, 0.9, 100_000), 0.025),
        ("antmaze-large-diverse", "antmaze", "spot", (0.1, 0.9, 200_000), 0.025),
        ("door-cloned", "door", "spot", (0.1, 0.9, 250_000), 1.0),
    ],
)
def test_dataset_defaults_follow_the_card_table(name, task, backbone, kappa, spot_lambda):
    defaults = opt.task_defaults(name, task)
    assert defaults["backbone"] == backbone and defaults["kappa"] == kappa
    if spot_lambda is not None:
        assert defaults["spot_lambda"] == spot_lambda
    args = opt.Args()
    opt.resolve_args(args, name, task)
    assert (args.kappa_start, args.kappa_end, args.kappa_steps) == kappa
    assert args.updates_per_step == (5 if backbone == "td3bc" else 1)
    assert args.actor_lr == (3e-4 if backbone == "td3bc" else 1e-4)
    assert args.normalize_states == (backbone == "td3bc") and args.layer_norm == (task == "door")
    assert args.online_gamma == (0.995 if task == "antmaze" else 0.99)


def test_explicit_settings_survive_resolution():
    args = opt.Args(backbone="spot", kappa_start=0.5, kappa_end=0.5, updates_per_step=3, normalize_states=True)
    opt.resolve_args(args, "hopper-random", "hopper")
    assert (args.backbone, args.kappa_start, args.kappa_end, args.kappa_steps) == ("spot", 0.5, 0.5, 0)
    assert args.updates_per_step == 3 and args.normalize_states and args.online_gamma == 0.99


def test_kappa_schedule_endpoints_midpoint_and_monotonicity():
    start, end, steps = 0.3, 0.9, 150_000
    values = [opt.kappa_at(t, start, end, steps) for t in range(0, 300_000, 997)]
    assert opt.kappa_at(0, start, end, steps) == start
    assert opt.kappa_at(steps, start, end, steps) == end
    assert opt.kappa_at(steps + 12_345, start, end, steps) == end
    assert opt.kappa_at(steps // 2, start, end, steps) == pytest.approx((start + end) / 2)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert all(opt.kappa_at(t, 1.0, 1.0, 0) == 1.0 for t in (0, 1, 10**6))  # random data: Q_on only


# ---------------------------------------------------------------------------------------------------
# Eq. 3: the meta-adaptation loss
# ---------------------------------------------------------------------------------------------------


class TanhTwin(nn.Module):
    """A smooth twin critic (tanh), so second derivatives are informative."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(OBS + ACT, 6, dtype=torch.float64)
        self.head = nn.Linear(6, 2, dtype=torch.float64)

    def forward(self, obs, action):
        return self.head(torch.tanh(self.hidden(torch.cat([obs, action], -1)))).T


def meta_setup(seed=0):
    torch.manual_seed(seed)
    critic = TanhTwin()
    offline = random_batch(16, torch.float64)
    online = random_batch(16, torch.float64)
    return critic, (offline[0], offline[1], offline[2]), (online[0] + 1, online[1], online[2] * 3)


def td(critic, params, batch):
    obs, action, y = batch
    return opt.twin_td_loss(torch.func.functional_call(critic, params, (obs, action)), y)


def recipe_gradient(critic, offline, online, inner_lr, first_order, weight="none"):
    objective, *_ = opt.meta_objective(critic, offline, online, inner_lr, first_order, weight)
    return torch.autograd.grad(objective, list(critic.parameters()))


def test_second_order_gradient_matches_finite_differences():
    critic, offline, online = meta_setup()
    inner_lr = 0.1  # large, so the Hessian term is visible
    params = {name: p.detach() for name, p in critic.named_parameters()}

    def objective(flat: torch.Tensor) -> float:  # J(psi) = L_off(psi) + L_on(psi - a grad L_off(psi))
        p = dict(zip(params, torch.split(flat, [v.numel() for v in params.values()]), strict=True))
        p = {name: v.view_as(params[name]) for name, v in p.items()}
        grad = torch.func.grad(lambda q: td(critic, q, offline))(p)
        return (td(critic, p, offline) + td(critic, {k: p[k] - inner_lr * grad[k] for k in p}, online)).item()

    flat = torch.cat([v.reshape(-1) for v in params.values()])
    eps = 1e-6
    numeric = torch.stack([
        torch.tensor((objective(flat + eps * e) - objective(flat - eps * e)) / (2 * eps), dtype=torch.float64)
        for e in torch.eye(len(flat), dtype=torch.float64)
    ])  # fmt: skip
    analytic = torch.cat([g.reshape(-1) for g in recipe_gradient(critic, offline, online, inner_lr, False)])
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)
    first = torch.cat([g.reshape(-1) for g in recipe_gradient(critic, offline, online, inner_lr, True)])
    assert (first - numeric).abs().max() > 100 * (analytic - numeric).abs().max()  # the Hessian term matters


@pytest.mark.parametrize("inner_lr", [3e-4, 0.1])
def test_first_and_second_order_by_hand(inner_lr):
    """First order: grad L_off(psi) + grad L_on(psi'); second minus first: -a H_off(psi) grad L_on(psi')."""
    critic, offline, online = meta_setup(1)
    psi = {name: p.detach() for name, p in critic.named_parameters()}
    grad_offline = torch.func.grad(lambda p: td(critic, p, offline))(psi)
    adapted = {name: psi[name] - inner_lr * grad_offline[name] for name in psi}
    grad_online = torch.func.grad(lambda p: td(critic, p, online))(adapted)
    hvp = torch.func.jvp(torch.func.grad(lambda p: td(critic, p, offline)), (psi,), (grad_online,))[1]
    first = recipe_gradient(critic, offline, online, inner_lr, True)
    second = recipe_gradient(critic, offline, online, inner_lr, False)
    for name, g1, g2 in zip(psi, first, second, strict=True):
        torch.testing.assert_close(g1, grad_offline[name] + grad_online[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g2 - g1, -inner_lr * hvp[name], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("first_order", [True, False])
def test_zero_inner_step_is_eq_10(first_order):
    critic, offline, online = meta_setup(2)
    params = dict(critic.named_parameters())
    *_, c = opt.meta_objective(critic, offline, online, 0.0, first_order, "min_ratio")
    expected = torch.autograd.grad(td(critic, params, offline) + c * td(critic, params, online), list(params.values()))
    for got, want in zip(
        recipe_gradient(critic, offline, online, 0.0, first_order, "min_ratio"), expected, strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_min_ratio_weight_is_detached_and_caps_the_online_term():
    critic, offline, online = meta_setup(3)
    _, offline_loss, online_loss, c = opt.meta_objective(critic, offline, online, 3e-4, False, "min_ratio")
    assert online_loss > offline_loss and not c.requires_grad  # online targets were scaled up
    assert c.item() == pytest.approx((offline_loss / online_loss).item(), rel=1e-12)
    objective, offline_loss, online_loss, c = opt.meta_objective(critic, online, offline, 3e-4, False, "min_ratio")
    assert online_loss < offline_loss and c.item() == 1.0
    assert objective.item() == pytest.approx((offline_loss + online_loss).item(), rel=1e-12)
    *_, c = opt.meta_objective(critic, offline, online, 3e-4, False, "none")
    assert c.item() == 1.0


# ---------------------------------------------------------------------------------------------------
# Actor losses
# ---------------------------------------------------------------------------------------------------


def test_td3bc_actor_loss_by_hand_with_a_constant_lambda():
    q1 = torch.tensor([1.0, -3.0], requires_grad=True)
    policy_action = torch.tensor([[0.5, 0.0], [0.0, 0.0]], requires_grad=True)
    action = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    loss = opt.td3bc_actor_loss(q1, policy_action, action, 2.5)
    lmbda = 2.5 / 2.0  # alpha / mean |Q|
    assert loss.item() == pytest.approx(-lmbda * -1.0 + (0.25 + 1.0) / 4)
    loss.backward()
    torch.testing.assert_close(q1.grad, torch.full((2,), -lmbda / 2))  # lambda carries no gradient
    torch.testing.assert_close(policy_action.grad, 2 * (policy_action - action).detach() / 4)


def test_spot_actor_loss_by_hand_and_lambda_cooling():
    q = torch.tensor([2.0, -4.0], requires_grad=True)
    loss = opt.spot_actor_loss(q, torch.tensor([0.5, 1.5]), 0.25)
    assert loss.item() == pytest.approx(1.0 / 3.0 + 0.25 * 1.0)  # mean Q -1, mean |Q| 3
    loss.backward()
    torch.testing.assert_close(q.grad, torch.full((2,), -1 / (2 * 3.0)))
    agent = tiny_agent("spot", name="antmaze-umaze", task="antmaze", spot_cool_steps=100)
    assert agent.spot_lambda(0) == 0.25 and agent.args.spot_lambda_end == 0.2
    assert agent.spot_lambda(50) == pytest.approx(0.125)
    assert agent.spot_lambda(10**6) == pytest.approx(0.25 * 0.2)
    agent.finetune_updates = 49  # set_schedule writes what the 50th update reads into the device tensors
    agent.set_schedule(0.7)
    assert agent.lmbda.item() == pytest.approx(0.125) and agent.kappa.item() == pytest.approx(0.7)


def actor_gradient(agent: opt.OPT, obs: torch.Tensor, kappa: float) -> list[torch.Tensor]:
    agent.set_schedule(kappa)  # as the phase does before each fine-tuning update
    return torch.autograd.grad(agent.actor_loss(obs), list(agent.actor.parameters()))


def perturb(module: nn.Module, member: int | None = None) -> None:
    """Add noise to every weight (or only to one twin member's slice)."""
    with torch.no_grad():
        for p in module.parameters():
            mask = 1.0 if member is None else (torch.arange(2) == member).view(2, 1, 1)
            p.add_(torch.randn_like(p) * mask)


@pytest.mark.parametrize("backbone", ["td3bc", "spot"])
def test_eq4_kappa_extremes_select_one_critic_and_only_q1_heads_count(backbone):
    agent = tiny_agent(backbone)
    agent.start_online_critic()
    obs = torch.randn(32, OBS)

    def gradient(kappa):
        torch.manual_seed(5)  # the VAE draws its latent noise
        return actor_gradient(agent, obs, kappa)

    reference = {kappa: gradient(kappa) for kappa in (0.0, 0.4, 1.0)}
    perturb(agent.q_off, member=1)
    perturb(agent.q_on, member=1)  # the twins' second members never enter the actor loss
    assert all(tensors_equal(gradient(kappa), reference[kappa]) for kappa in reference)
    perturb(agent.q_off)
    assert tensors_equal(gradient(1.0), reference[1.0]) and not tensors_equal(gradient(0.4), reference[0.4])
    reference[0.0] = gradient(0.0)
    perturb(agent.q_on)
    assert tensors_equal(gradient(0.0), reference[0.0]) and not tensors_equal(gradient(1.0), reference[1.0])


def test_eq4_by_hand_for_td3():
    agent = tiny_agent()
    agent.start_online_critic()
    obs = torch.randn(16, OBS)
    with torch.no_grad():
        a = agent.actor(obs)
        expected = -(0.7 * agent.q_off(obs, a)[0] + 0.3 * agent.q_on(obs, a)[0]).mean()
    agent.set_schedule(0.3)
    assert agent.actor_loss(obs).item() == pytest.approx(expected.item(), rel=1e-6)


def test_vae_scores_dataset_actions_as_more_likely():
    torch.manual_seed(0)
    vae = opt.VAE(OBS, ACT, hidden=64)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    mixing = torch.randn(OBS, ACT)
    behaviour = lambda obs: torch.tanh(obs @ mixing)
    for _ in range(400):
        obs = torch.randn(256, OBS)
        loss = vae.neg_elbo(obs, behaviour(obs)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    obs = torch.randn(2000, OBS)
    with torch.no_grad():
        on_data, off_data = vae.neg_elbo(obs, behaviour(obs)), vae.neg_elbo(obs, torch.rand(2000, ACT) * 2 - 1)
    assert on_data.shape == (2000,) and on_data.mean() < 0.5 * off_data.mean()


# ---------------------------------------------------------------------------------------------------
# Balanced replay
# ---------------------------------------------------------------------------------------------------


def test_density_loss_and_priorities_by_hand():
    w_online, w_offline = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    expected = -np.mean(np.log([2 / 1, 2 / 2])) - np.mean(np.log([2 * 1 / 2, 2 * 3 / 4]))
    assert opt.density_loss(w_online, w_offline).item() == pytest.approx(expected, rel=1e-6)
    w, offline = torch.tensor([0.0, 1.0, 32.0, 1e20]), torch.tensor([1.0, 32.0])
    expected = torch.tensor([0.0, 1.0, 2.0, 1e4]) / 1.5  # 32^(1/5) = 2, mean over offline (1 + 2) / 2
    torch.testing.assert_close(opt.priorities(w, offline, 5.0), expected.clamp(1e-3, 1e3))


def test_draws_follow_priorities_new_rows_take_the_max_and_offline_rows_stay():
    torch.manual_seed(0)
    rows = torch.arange(4 * 14, dtype=torch.float32).view(4, 14)  # 2 OBS + ACT + 3 columns
    replay = opt.BalancedReplay(rows.clone(), 3, opt.Args(), OBS, ACT)
    replay.set_priorities(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    draws = torch.cat([replay.sample_prioritized(256) for _ in range(400)])
    counts = torch.bincount(draws, minlength=4).double()
    expected = counts.sum() * torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    chi_square = ((counts - expected).pow(2) / expected).sum().item()
    assert chi_square < 16.27  # 3 degrees of freedom, p = 0.001 (stratified draws only lower the spread)
    for _ in range(3):
        replay.add(rows[:1] + 100)
        assert replay.priority[replay.buffer.size - 1] == 4.0  # the running max
    assert replay.num_online == 3 and torch.equal(replay.buffer.storage[:4], rows)  # nothing overwritten
    assert (replay.sample_online(1000) >= 4).all() and (replay.sample_offline(1000) < 4).all()
    assert (replay.sample_rl("online_only", 1000) >= 4).all()


# ---------------------------------------------------------------------------------------------------
# Hand-over, normalisation and the three online stages run in-process
# ---------------------------------------------------------------------------------------------------


def test_hand_over_keeps_td3_adam_and_resets_spot_adam_and_discount():
    for backbone, name, task in (("td3bc", "hopper-medium", "hopper"), ("spot", "antmaze-umaze", "antmaze")):
        agent = tiny_agent(backbone, name=name, task=task)
        agent.offline_update(random_batch(8), actor_step=True)
        actor_optimizer = agent.actor_optimizer
        agent.hand_over()
        kept = agent.actor_optimizer is actor_optimizer and len(agent.q_off_optimizer.state) > 0
        assert kept == (backbone == "td3bc"), backbone
        assert agent.gamma == (0.995 if task == "antmaze" else 0.99)


def test_env_observations_and_dataset_rows_use_the_offline_statistics(minari_root):
    data = load_dataset("hopper-medium")
    args = opt.Args(hidden_dim=16)
    opt.resolve_args(args, data.name, data.task)
    agent = opt.OPT(11, 3, args, torch.device("cpu"))
    rows = opt.prepare_data(agent, data, fit_statistics=True)
    mean, std = data.observations.mean(0), data.observations.std(0) + 1e-3
    np.testing.assert_allclose(rows[:, :11], (data.observations - mean) / std, rtol=1e-5, atol=1e-5)
    env = make_env(data.env_spec, 0)
    raw, _ = env.reset(seed=0)
    with torch.no_grad():
        expected = agent.actor(torch.as_tensor((raw - mean) / std, dtype=torch.float32).view(1, -1))[0]
    np.testing.assert_allclose(agent.policy(raw, noise=0.0), expected.numpy(), rtol=1e-6)


VARIANTS = {"opt": {}, "no_new_critic": {"new_critic": False}, "rand_init": {"online_pretraining": False}}


@pytest.fixture(params=list(VARIANTS))
def online_run(request, minari_root, tmp_path):
    return request.param, *run_online_phase(VARIANTS[request.param], tmp_path)


def run_online_phase(variant: dict, tmp_path):
    """The real online phase in-process on tiny hopper data, recording every pre-training and fine-tuning call."""
    data = load_dataset("hopper-medium")
    args = opt.Args(**{
        "hidden_dim": 16, "batch_size": 8, "online_steps": 50, "n_tau": 20, "n_pretrain": 6, "updates_per_step": 3,
        "eval_freq": 1000, "eval_episodes": 1, "log_freq": 10, "progress": False,
    } | variant)  # fmt: skip
    opt.resolve_args(args, data.name, data.task)
    torch.manual_seed(0)
    agent = opt.OPT(11, 3, args, torch.device("cpu"))
    rows = opt.prepare_data(agent, data, args.normalize_states)
    split = opt.ReplayBuffer(1, 11, 3, agent.device).split
    for actor_step in (False, True):  # a critic and an actor step, so every optimizer has a state to keep
        agent.offline_update(split(torch.from_numpy(rows[:8])), actor_step)
    agent.hand_over()
    replay = opt.BalancedReplay(torch.from_numpy(rows), args.online_steps, args, 11, 3)
    env, transitions = recording_env(data.env_spec)
    record = {"initial": snapshot(agent), "pretrain": [], "finetune": []}
    pretrain_update, finetune_update = agent.pretrain_update, agent.finetune_update

    def pretrain(*batches):
        record.setdefault("before_pretrain", snapshot(agent))
        record["pretrain"].append(len(transitions))
        return pretrain_update(*batches)

    def finetune(batch, actor_step, *rest):
        record.setdefault("before_finetune", snapshot(agent))
        record.setdefault("priority_before_finetune", replay.priority.clone())
        record["finetune"].append((len(transitions), agent.kappa.item()))  # the kappa this update reads
        return finetune_update(batch, actor_step, *rest)

    agent.pretrain_update, agent.finetune_update = pretrain, finetune
    opt.online_phase(agent, data, replay, env, make_env(data.eval_env_spec, 1), SummaryWriter(str(tmp_path)), args)
    return agent, replay, transitions, record, rows


def test_plain_td3_recipe_is_td3_from_the_first_step_on_uniform_replay(minari_root, tmp_path):
    """README's TD3 baseline: no Q_on, no pre-training, no N_tau window, no density network, no priorities."""
    recipe = {"new_critic": False, "online_pretraining": False, "n_tau": 0, "replay": "uniform"}
    agent, replay, _, record, rows = run_online_phase(recipe, tmp_path)
    assert [step for step, _ in record["finetune"]] == [step for step in range(1, 51) for _ in range(3)]
    assert agent.q_on is None and agent.density is None and record["pretrain"] == []
    offline, online = replay.priority[: len(rows)], replay.priority[len(rows) : replay.buffer.size]
    assert offline.eq(1).all() and online.eq(replay.max_priority).all()  # no priority was ever written


def test_collection_window_changes_nothing_and_pretraining_only_the_meta_critic(online_run):
    variant, agent, _, _, record, _ = online_run
    initial, before_finetune = record["initial"], record["before_finetune"]
    first_stage = record.get("before_pretrain", before_finetune)
    assert all(tensors_equal(first_stage[name], initial[name]) for name in initial)  # N_tau window: no change
    assert record["pretrain"] == ([20] * 6 if variant != "rand_init" else [])  # zero env steps while pre-training
    frozen = ["actor", "actor_target", "actor_optimizer"]
    frozen += ["q_off", "q_off_target", "q_off_optimizer"] if variant != "no_new_critic" else []
    assert all(tensors_equal(before_finetune[name], initial[name]) for name in frozen)
    if variant == "opt":
        for name in ("q_on", "q_on_target"):
            assert not tensors_equal(before_finetune[name], record["before_pretrain"][name]), name
        assert all(state["step"] == 6 for state in before_finetune["q_on_optimizer"]["state"].values())
    if variant == "no_new_critic":
        assert agent.q_on is None and not tensors_equal(before_finetune["q_off"], initial["q_off"])
    if variant == "rand_init":
        assert "q_on" in before_finetune  # created at random when fine-tuning starts


def test_n_tau_rows_hold_the_initial_online_fraction_of_the_priority_mass(online_run):
    """Off2On's init: the running max starts at M f / ((1 - f) N_tau), so the N_tau rows hold f of the mass."""
    _, agent, replay, _, record, rows = online_run
    priority, offline, n_tau = record["priority_before_finetune"], len(rows), agent.args.n_tau
    assert replay.num_offline == offline and torch.equal(priority[:offline], torch.ones(offline, dtype=torch.float64))
    window = priority[offline : offline + n_tau]
    assert torch.equal(window, torch.full_like(window, offline * 0.75 / (0.25 * n_tau)))
    assert (window.sum() / (offline + window.sum())).item() == pytest.approx(0.75, rel=1e-12)


def test_budget_kappa_and_stored_transitions(online_run):
    _, agent, replay, transitions, record, rows = online_run
    assert len(transitions) == 50 and replay.num_online == 50  # total env steps, N_tau included
    steps = [step for step, _ in record["finetune"]]
    assert steps == [step for step in range(21, 51) for _ in range(3)]  # UTD 3 on the 30 fine-tuning steps
    assert agent.args.kappa_start == 0.3  # kappa first applies here (a float32 device tensor)
    assert record["finetune"][0][1] == pytest.approx(0.3, rel=1e-6)
    assert agent.finetune_updates == 90
    actor_steps = {int(state["step"]) for state in agent.actor_optimizer.state_dict()["state"].values()}
    assert actor_steps == {45 + 1}  # every 2nd update, plus the one offline actor step
    assert torch.equal(replay.buffer.storage[: len(rows)], torch.from_numpy(rows))  # offline rows intact
    _, action, reward, _, done, is_online = replay.buffer.split(replay.buffer.storage[len(rows) :])
    np.testing.assert_array_equal(action.numpy(), np.array([t[0] for t in transitions], np.float32))
    np.testing.assert_array_equal(reward.numpy(), np.array([t[1] for t in transitions], np.float32))
    np.testing.assert_array_equal(done.numpy(), [float(t[2]) for t in transitions])  # truncation stores d = 0
    assert is_online.eq(1).all() and any(t[3] and not t[2] for t in transitions)
    obs, _, _, next_obs, _, _ = replay.buffer.split(replay.buffer.storage[len(rows) :])
    raw = np.array([t[4] for t in transitions])
    np.testing.assert_allclose(next_obs.numpy(), agent.normalize(raw), rtol=1e-5, atol=1e-5)  # the offline statistics
    assert np.abs(agent.normalize(raw) - raw).max() > 0.1  # ... which do change the rows
    running = np.array([not (t[2] or t[3]) for t in transitions[:-1]])  # no reset between row i and row i + 1
    np.testing.assert_array_equal(obs[1:][running].numpy(), next_obs[:-1][running].numpy())  # s_{t+1} = s'_t


# ---------------------------------------------------------------------------------------------------
# As a user runs it
# ---------------------------------------------------------------------------------------------------

# hopper-expert keeps the env's 1000-step limit, so evaluation episodes have exact Monte-Carlo returns
SMOKE = [
    "--env-id", "hopper-expert", "--hidden-dim", "32", "--batch-size", "16", "--vae-steps", "20",
    "--online-steps", "60", "--n-tau", "20", "--n-pretrain", "10", "--eval-freq", "20", "--eval-episodes", "2",
    "--offline-eval-freq", "10", "--log-freq", "10", "--no-cuda",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["td3bc", "spot"])
def test_smoke_three_phases_then_pretrained(minari_root, tmp_path, backbone):
    run, _ = script_run("opt", [*SMOKE, "--backbone", backbone, "--offline-steps", "20"], minari_root, tmp_path / "a")
    required = [
        "offline/normalized_score", "offline/qf_loss", "offline/actor_loss", "offline/UPS", "pretrain/offline_loss",
        "pretrain/online_loss", "pretrain/meta_weight", "pretrain/UPS", "eval/normalized_score",
        "eval/episodic_return", "eval/q_bias", "eval/q_rank_tau", "eval/q_bias_on", "eval/q_rank_tau_on",
        "charts/episodic_return", "charts/SPS", "charts/UPS", "charts/kappa", "charts/offline_share",
        "charts/density_online", "charts/density_offline", "charts/p_new", "losses/qf_loss", "losses/qf_values",
        "losses/qf_on_loss", "losses/qf_on_values", "losses/actor_loss", "losses/density_loss",
    ]  # fmt: skip
    required += ["offline/bc_loss"] if backbone == "td3bc" else ["offline/vae_loss", "losses/spot_lambda"]
    tags = scalars(run, required)
    scores = tags["eval/normalized_score"]
    assert len(scores) == 4 and scores[0] == scores[1]  # steps 0, 20 (the frozen N_tau window), 40, 60
    assert len(tags["eval/q_bias_on"]) == 2 and all(0 < c <= 1 for c in tags["pretrain/meta_weight"])
    kappa = tags["charts/kappa"]  # 40 fine-tuning steps of a 150k ramp from 0.3 (Minari expert)
    assert kappa == sorted(kappa) and kappa[0] >= 0.3 and kappa[-1] <= 0.3 + 0.6 * 40 / 150_000 + 1e-7
    offline, final = (torch.load(run / name, weights_only=False) for name in ("offline.pt", "final.pt"))
    assert offline["phase"] == "offline" and final["phase"] == "online" and "q_on" not in offline
    for key in ("q_on", "q_on_target", "q_on_optimizer", "density", "obs_mean", "actor_target"):
        assert key in final, key
    assert ("vae" in final) == (backbone == "spot")
    assert opt.policy_from_checkpoint(final)(np.zeros(11)).shape == (3,)  # evaluates without the dataset

    online = [*SMOKE, "--pretrained", str(run / "offline.pt"), "--no-new-critic", "--replay", "uniform"]
    second, _ = script_run("opt", online, minari_root, tmp_path / "b")
    tags = scalars(second)
    assert not (second / "offline.pt").exists() and not any(tag.startswith("offline/") for tag in tags)
    assert "losses/qf_on_loss" not in tags and "losses/density_loss" not in tags and "pretrain/online_loss" in tags
    final = torch.load(second / "final.pt", weights_only=False)
    assert final["args"]["backbone"] == backbone and "q_on" not in final  # the checkpoint's backbone
    np.testing.assert_array_equal(final["obs_mean"], offline["obs_mean"])  # and its state statistics


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-tau", "60"], "lower --n-tau"),
        (["--n-tau", "0"], "--no-online-pretraining"),
        (["--kappa-start", "1.5"], "--kappa-start must lie in [0, 1]"),
        (["--updates-per-step", "0"], "--updates-per-step must be >= 1"),
        (["--pretrained", "/nonexistent/offline.pt"], "cannot be used"),
    ],
)
def test_bad_input_is_one_line(minari_root, tmp_path, monkeypatch, extra, message):
    assert message in main_error("opt", [*SMOKE, "--run-dir", str(tmp_path), *extra], minari_root, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backbone", ["td3bc", "spot"])
def test_cuda_updates_of_every_phase(backbone):
    agent = tiny_agent(backbone, device="cuda")
    batch = tuple(t.cuda() for t in random_batch(64))
    results = [agent.offline_update(batch, False), agent.offline_update(batch, True)]
    with no_host_sync():  # after the warm-up above: a critic and an actor step
        agent.offline_update(batch, False), agent.offline_update(batch, True)
    agent.hand_over()
    agent.start_online_critic()
    online_batch = tuple(t.cuda() for t in random_batch(64))
    results.append(agent.pretrain_update(batch, online_batch, True))
    with no_host_sync():
        agent.pretrain_update(batch, online_batch, True)
    agent.start_finetuning()
    rows = torch.cat([batch[0], batch[1], batch[2][:, None], batch[3], batch[4][:, None], batch[5][:, None]], 1)
    replay = opt.BalancedReplay(rows, 10, agent.args, OBS, ACT)
    replay.add(rows[:1])
    agent.set_schedule(0.5)
    results += [opt.replay_update(agent, replay, agent.args, actor_step) for actor_step in (False, True)]
    with no_host_sync():
        opt.replay_update(agent, replay, agent.args, False), opt.replay_update(agent, replay, agent.args, True)
    assert all(torch.isfinite(v).all() and v.device.type == "cuda" for r in results for v in r.values())
    assert agent.policy(np.zeros(OBS, np.float32), noise=0.1).shape == (ACT,)


def test_replay_update_writes_the_pre_update_density_priorities_back(monkeypatch):
    agent = tiny_agent()
    agent.args.batch_size = 64
    agent.hand_over()
    agent.start_online_critic()
    agent.start_finetuning()
    rows = torch.cat(
        [torch.randn(300, OBS), torch.rand(300, ACT) * 2 - 1, torch.randn(300, 1), torch.randn(300, OBS)], 1
    )
    rows = torch.cat([rows, torch.zeros(300, 2)], 1)  # not done, offline
    replay = opt.BalancedReplay(rows[:200], 100, agent.args, OBS, ACT)
    replay.add(rows[200:] + torch.tensor([0.0] * (rows.shape[1] - 1) + [1.0]))  # 100 online rows
    density = copy.deepcopy(agent.density)
    seen = {}
    sample_rl, finetune_update = replay.sample_rl, agent.finetune_update
    monkeypatch.setattr(replay, "sample_rl", lambda *a: seen.setdefault("index", sample_rl(*a)))
    monkeypatch.setattr(agent, "finetune_update", lambda *a: seen.setdefault("batches", a) and finetune_update(*a))
    max_before = replay.max_priority.clone()
    opt.replay_update(agent, replay, agent.args, False)
    batch, _, _, offline_batch = seen["batches"]
    with torch.no_grad():
        expected = opt.priorities(density(*batch[:2]), density(*offline_batch[:2]), 5.0).double()
    assert not torch.equal(agent.density.net[-1].weight, density.net[-1].weight)  # the density net did step
    torch.testing.assert_close(replay.priority[seen["index"]], expected)  # a repeated row: the same value
    assert replay.max_priority == torch.maximum(max_before, expected.max())


def test_finetune_step_trains_both_pairs_on_one_smoothed_target_action_and_twin_minima():
    """Fine-tuning: Q_off and Q_on each regress to r + gamma (1 - d) min_j Qbar_j(s', a'), with ONE a' for both,
    a' = clip(pi_target(s') + clip(N(0, sigma), +-0.5))."""
    agent = tiny_agent(policy_noise=0.4)  # a wider noise than TD3's 0.2, so that the 0.5 clip binds
    agent.hand_over()
    agent.start_online_critic()
    agent.start_finetuning()
    with torch.no_grad():  # targets that differ between the twins, the pairs and the critics
        for module in (agent.q_off_target, agent.q_on_target, agent.actor_target):
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.5)
    agent.q_off_optimizer = torch.optim.SGD(agent.q_off.parameters(), lr=1.0)
    agent.q_on_optimizer = torch.optim.SGD(agent.q_on.parameters(), lr=1.0)
    before = {name: copy.deepcopy(getattr(agent, name)) for name in ("q_off", "q_on", "q_off_target", "q_on_target")}
    obs, action, reward, next_obs, _, is_online = random_batch(8)
    done = torch.tensor([0.0, 1, 0, 0, 1, 0, 0, 0])
    torch.manual_seed(11)
    agent.finetune_update((obs, action, reward, next_obs, done, is_online), False)  # no actor step
    torch.manual_seed(11)
    with torch.no_grad():
        noise = (torch.randn(8, ACT) * 0.4).clamp(-0.5, 0.5)
        next_action = (agent.actor_target(next_obs) + noise).clamp(-1, 1)
    assert (noise.abs() == 0.5).any(), "the clip must bind for some draw"
    for name in ("q_off", "q_on"):
        with torch.no_grad():
            y = reward + 0.99 * (1 - done) * before[f"{name}_target"](next_obs, next_action).min(0).values
        critic = before[name]
        assert_sgd_step(getattr(agent, name), critic, (critic(obs, action) - y).pow(2).mean(1).sum())


def test_pretraining_moves_the_meta_critics_targets_every_policy_freq_updates(monkeypatch, tmp_path):
    agent = tiny_agent(n_pretrain=6)
    agent.hand_over()
    agent.start_online_critic()
    rows = torch.cat([torch.randn(40, OBS), torch.rand(40, ACT) * 2 - 1, torch.randn(40, 1), torch.randn(40, OBS)], 1)
    replay = opt.BalancedReplay(torch.cat([rows[:30], torch.zeros(30, 2)], 1), 10, agent.args, OBS, ACT)
    for row in rows[30:]:
        replay.add(torch.cat([row, torch.tensor([0.0, 1.0])])[None])
    moved = []
    soft_update = opt.soft_update
    monkeypatch.setattr(
        opt, "soft_update", lambda target, source, tau: (moved.append(target), soft_update(target, source, tau))
    )
    opt.online_pretraining(agent, replay, SummaryWriter(str(tmp_path)), agent.args)  # the phase counts updates
    assert (
        agent.pretrain_updates == 6 and moved == [agent.q_on_target] * 3
    )  # updates 2, 4, 6 (policy_freq 2); nothing else moves


def test_antmaze_trains_on_r_minus_1_and_other_tasks_on_r():
    reward = np.array([0.0, 1.0, 0.5])
    np.testing.assert_array_equal(opt.training_reward(reward, "antmaze"), reward - 1.0)
    np.testing.assert_array_equal(opt.training_reward(reward, "hopper"), reward)


def test_online_pretraining_regresses_q_on_to_its_own_targets_in_the_real_update():
    """Eq. 3 in OPT.pretrain_update: Q_on moves by the meta-objective's gradient with y from Q_on's own target
    network (and the frozen actor target) on both minibatches, not from Q_off's; checked as one SGD step, lr 1."""
    agent = tiny_agent()
    agent.start_online_critic()
    with torch.no_grad():  # three clearly different critics: Q_on, its target, Q_off's target
        agent.q_on_target.net[-1].bias.add_(2.0)
        agent.q_off_target.net[-1].bias.add_(-3.0)
    agent.q_on_optimizer = torch.optim.SGD(agent.q_on.parameters(), lr=1.0)
    q_on, q_on_target = copy.deepcopy(agent.q_on), copy.deepcopy(agent.q_on_target)
    offline_batch, online_batch = random_batch(8), random_batch(8)
    torch.manual_seed(11)
    agent.pretrain_update(offline_batch, online_batch, target_step=False)
    torch.manual_seed(11)  # the same target-policy noise, offline batch first
    with torch.no_grad():
        y_offline = agent.td_target(q_on_target, *offline_batch[2:5])
        y_online = agent.td_target(q_on_target, *online_batch[2:5])
    args = agent.args
    objective, *_ = opt.meta_objective(
        q_on, (*offline_batch[:2], y_offline), (*online_batch[:2], y_online), args.meta_inner_lr,
        args.meta_first_order, args.meta_weight,
    )  # fmt: skip
    assert_sgd_step(agent.q_on, q_on, objective)
