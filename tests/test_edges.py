"""Edges shared by the five scripts, run in-process through each script's real main()."""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import pytest
import torch

import utils.run
from tests.conftest import scalars
from utils import UserError, load_dataset

SCRIPTS = ("so2", "enoto", "baq", "off2on", "opt")
BUDGETS = {
    "so2": ("offline_steps", "online_steps", "warmup_steps"),
    "enoto": ("offline_steps", "online_steps", "warmup_steps"),
    "baq": ("offline_steps", "online_steps", "bc_steps"),
    "off2on": ("offline_steps", "online_steps", "bc_steps"),
    "opt": ("offline_steps", "online_steps", "n_tau", "n_pretrain", "vae_steps"),
}


class EnvsMade(Exception):
    """Stops main() right after it built its two environments."""


@pytest.mark.parametrize("script, budget", [(s, b) for s, names in BUDGETS.items() for b in names])
def test_a_negative_budget_is_refused(minari_root, tmp_path, script, budget):
    module = importlib.import_module(f"algorithms.{script}")
    args = module.Args(env_id="hopper-medium", run_dir=str(tmp_path), **{budget: -5})
    with pytest.raises(UserError, match=f"--{budget.replace('_', '-')} must be >= 0, got -5"):
        module.main(args)
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused run"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("deterministic", [True, False])
def test_online_training_runs_in_the_evaluation_env_spec(minari_root, tmp_path, monkeypatch, script, deterministic):
    """AntMaze's data env draws a new goal per episode: training and evaluation both use the eval env spec."""
    module = importlib.import_module(f"algorithms.{script}")
    data = load_dataset("hopper-medium")
    collection_spec = json.dumps(json.loads(data.env_spec) | {"max_episode_steps": 7})
    monkeypatch.setattr(module, "load_dataset", lambda name: dataclasses.replace(data, env_spec=collection_spec))
    specs = []

    def record(env_spec, seed):
        specs.append((env_spec, seed))
        if len(specs) == 2:
            raise EnvsMade

    monkeypatch.setattr(utils.run, "make_env", record)  # where every script's run opens its envs
    with pytest.raises(EnvsMade):  # conftest's autouse fixture puts the determinism setting back afterwards
        module.main(module.Args(env_id="hopper-medium", run_dir=str(tmp_path), torch_deterministic=deterministic))
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # --torch-deterministic does that
    seed = module.Args().seed
    assert specs == [(data.eval_env_spec, seed), (data.eval_env_spec, seed + 100)]


TINY = {
    "so2": {"num_critics": 2},
    "enoto": {"num_critics": 2},
    "baq": {"bc_steps": 2},
    "off2on": {"num_agents": 2, "bc_steps": 2},
    "opt": {},
}


def tiny_args(script: str, tmp_path, **overrides):
    module = importlib.import_module(f"algorithms.{script}")
    sizes = {"hidden_dim": 16, "batch_size": 8, "eval_episodes": 1, "offline_steps": 2, "online_steps": 0}
    sizes |= {"env_id": "hopper-medium", "run_dir": str(tmp_path)}
    return module, module.Args(**sizes | TINY[script] | overrides)


@pytest.fixture(scope="module", params=SCRIPTS)
def offline_checkpoint(request, minari_root, tmp_path_factory):
    """(script, path of an offline.pt) from a 2-update offline run on the tiny hopper-medium data."""
    module, args = tiny_args(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, module.main(args) / "offline.pt"


def test_pretrained_from_another_dataset_is_refused(offline_checkpoint, tmp_path):
    script, path = offline_checkpoint
    module, args = tiny_args(script, tmp_path, env_id="hopper-expert", pretrained=str(path))  # same dimensions
    with pytest.raises(UserError, match="was trained on hopper-medium, not hopper-expert: pass --env-id hopper-medium"):
        module.main(args)
    module, args = tiny_args(script, tmp_path, env_id="mujoco/hopper/medium-v0", pretrained=str(path))
    final = torch.load(module.main(args) / "final.pt", weights_only=False)  # the same data under its Minari id
    assert final["dataset"] == "mujoco/hopper/medium-v0"


def test_pretrained_takes_the_architecture_and_statistics_of_the_checkpoint(offline_checkpoint, tmp_path):
    script, path = offline_checkpoint
    checkpoint = torch.load(path, weights_only=False)
    if "obs_mean" in checkpoint:  # a shifted mean shows whether the rows and the policy use the checkpoint's
        checkpoint["obs_mean"] = checkpoint["obs_mean"] + 1.0
        path = tmp_path / "shifted.pt"
        torch.save(checkpoint, path)
    module, args = tiny_args(script, tmp_path, hidden_dim=32, pretrained=str(path))
    run = module.main(args)
    final = torch.load(run / "final.pt", weights_only=False)
    assert final["args"]["hidden_dim"] == 16 == json.loads((run / "args.json").read_text())["hidden_dim"]
    if "obs_mean" in checkpoint:
        np.testing.assert_array_equal(final["obs_mean"], checkpoint["obs_mean"])


def test_pretrained_without_state_statistics_is_refused(offline_checkpoint, tmp_path):
    script, path = offline_checkpoint
    if script not in ("enoto", "off2on"):
        pytest.skip("enoto and off2on checkpoints hold state statistics since 2026-12-02")
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["obs_mean"], checkpoint["obs_std"]
    torch.save(checkpoint, tmp_path / "old.pt")
    module, args = tiny_args(script, tmp_path, pretrained=str(tmp_path / "old.pt"))
    with pytest.raises(UserError, match="written by an earlier version without state statistics; pretrain again"):
        module.main(args)


def test_enoto_pretrained_continues_at_the_learning_rates_of_the_flags(offline_checkpoint, tmp_path):
    script, path = offline_checkpoint
    if script != "enoto":
        pytest.skip("ENOTO carries its Adam states over the hand-over")
    module, args = tiny_args(script, tmp_path, pretrained=str(path), actor_lr=1e-3, critic_lr=2e-3, alpha_lr=3e-3)
    final = torch.load(module.main(args) / "final.pt", weights_only=False)
    for name, lr in (("actor", 1e-3), ("critic", 2e-3), ("alpha", 3e-3)):
        assert [group["lr"] for group in final[f"{name}_optimizer"]["param_groups"]] == [lr], name


def saturated_actor(script: str, pre_tanh: float):
    """The script's tanh-Gaussian actor with its last layer set so that every pre-tanh mean is `pre_tanh`, std 1."""
    module = importlib.import_module(f"algorithms.{script}")
    with torch.no_grad():
        if script == "enoto":
            actor = module.Actor(4, 3, 8)
            for head, value in ((actor.mu, pre_tanh), (actor.log_std, 0.0)):
                head.weight.zero_()
                head.bias.fill_(value)
        else:  # BAQ: one head of 2|A| outputs, log sigma = 1 * raw - 1
            actor = module.TanhGaussianActor(4, 3, 8)
            last = actor.net[-1]
            last.weight.zero_()
            last.bias.copy_(torch.tensor([pre_tanh] * 3 + [1.0] * 3).view_as(last.bias))
    return actor


@pytest.mark.parametrize("script", ["enoto", "baq"])
@pytest.mark.parametrize("pre_tanh", [0.5, 8.0, 12.0])
def test_tanh_gaussian_log_prob_is_exact_where_the_reference_code_is(script, pre_tanh):
    """d3rlpy (ENOTO) and CORL's CQL (BAQ) use the exact tanh correction; the 1e-6 form is off by 4.6 at u = 12."""
    _, log_prob = saturated_actor(script, pre_tanh)(torch.zeros(2, 4), deterministic=True)
    u = np.float64(pre_tanh)
    log_det = 2 * np.log(2) - 2 * u - 2 * np.log1p(np.exp(-2 * u))  # log(1 - tanh(u)^2), exact in float64
    expected = 3 * (-0.5 * np.log(2 * np.pi) - log_det)
    np.testing.assert_allclose(log_prob.detach().numpy(), [expected, expected], rtol=1e-5)


def tiny_agent(script: str):
    module = importlib.import_module(f"algorithms.{script}")
    args = module.Args(hidden_dim=16, eval_episodes=2, **TINY[script])
    torch.manual_seed(0)
    if script == "so2":
        return module, args, module.SO2(11, 3, 2, args, torch.device("cpu"))
    if script == "opt":
        module.resolve_args(args, "hopper-medium", "hopper")
    agent_class = {"enoto": "ENOTO", "baq": "BAQ", "off2on": "Off2On", "opt": "OPT"}[script]
    return module, args, getattr(module, agent_class)(11, 3, args, torch.device("cpu"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluation_episodes_act_deterministically(minari_root, tmp_path, script):
    """Two evaluations with the same episode seeds give the same returns only if no action is sampled."""
    from torch.utils.tensorboard import SummaryWriter

    from utils import make_env

    module, args, agent = tiny_agent(script)
    data = load_dataset("hopper-medium")
    env, writer = make_env(data.eval_env_spec, 0), SummaryWriter(str(tmp_path))
    first, second = (module.log_evaluation(writer, agent, env, args, data, "offline", 0, 5) for _ in range(2))
    assert first["episodic_return"] == second["episodic_return"]
    assert first["episode_length"] > 1


@pytest.mark.parametrize(
    "script, overrides, message",
    [
        ("opt", {"init_online_fraction": 1.0}, r"--init-online-fraction must lie in \(0, 1\), got 1.0"),
        ("enoto", {"preset": "cql_sac", "q_target": "mean"}, "--preset cql_sac sets --q-target min; drop --q-target"),
    ],
)
def test_new_flags_refuse_bad_values_in_one_line(minari_root, tmp_path, script, overrides, message):
    module, args = tiny_args(script, tmp_path, **overrides)
    with pytest.raises(UserError, match=message):
        module.main(args)


NORMALIZING = {  # the scripts that standardise states with the dataset's statistics, with a short online phase
    "enoto": {"num_critics": 2, "warmup_steps": 5},
    "baq": {"bc_steps": 5, "probe_states": 50},
    "off2on": {"num_agents": 2, "bc_steps": 5, "block_steps": 10, "first_block_multiplier": 1},
    "opt": {"n_tau": 10, "n_pretrain": 5},
}


@pytest.mark.parametrize("script", NORMALIZING)
def test_state_normalization_makes_a_run_blind_to_a_shift_of_every_observation(
    minari_root, tmp_path, monkeypatch, script
):
    """Every observation, in the dataset and from every env, moved by one constant: where the dataset's statistics
    reach the dataset rows, the online rows, the acting and the evaluated policy, the evaluation's Q diagnostics
    and policy_from_checkpoint, it is the same run up to rounding; a place that skips them sees states 50 away.

    Network weights are not compared: Adam turns rounding-sized gradient differences into steps of size lr."""
    import gymnasium as gym

    module = importlib.import_module(f"algorithms.{script}")
    data, make_env = load_dataset("hopper-expert"), utils.run.make_env  # the env's own time limit: exact returns
    sizes = {"hidden_dim": 16, "batch_size": 8, "eval_episodes": 1, "offline_steps": 30, "online_steps": 40}
    sizes |= {"eval_freq": 20, "offline_eval_freq": 30, "log_freq": 5, "cuda": False, "progress": False}

    def run(shift: float):
        shifted = [column + np.float32(shift) for column in (data.observations, data.next_observations)]
        shifted_data = dataclasses.replace(data, observations=shifted[0], next_observations=shifted[1])
        monkeypatch.setattr(module, "load_dataset", lambda name: shifted_data)
        actions = []  # of the training env, whose seed is the run's

        def shifted_env(env_spec, seed):
            env = make_env(env_spec, seed)
            if seed == module.Args.seed:
                step = env.step
                env.step = lambda action: (actions.append(np.array(action)), step(action))[1]
            return gym.wrappers.TransformObservation(env, lambda obs: obs + np.float32(shift), env.observation_space)

        monkeypatch.setattr(utils.run, "make_env", shifted_env)
        args = module.Args(env_id="hopper-expert", run_dir=str(tmp_path / str(shift)), **sizes | NORMALIZING[script])
        path = module.main(args)
        return torch.load(path / "final.pt", weights_only=False), scalars(path), np.array(actions)

    (plain, plain_tags, plain_actions), (moved, moved_tags, moved_actions) = run(0.0), run(50.0)
    np.testing.assert_allclose(moved["obs_mean"], plain["obs_mean"] + 50, rtol=1e-5)  # the statistics did move
    np.testing.assert_allclose(moved_actions, plain_actions, atol=1e-3)  # online rows and the acting policy
    losses = [tag for tag in plain_tags if tag.startswith("offline/") and tag.endswith("_loss")]
    for tag in [*losses, "eval/episodic_return", "eval/q_bias"]:  # the dataset rows; evaluation
        first = [plain_tags[tag][0], moved_tags[tag][0]] if tag in losses else [plain_tags[tag], moved_tags[tag]]
        np.testing.assert_allclose(first[1], first[0], rtol=1e-3, atol=1e-3, err_msg=tag)
    assert losses and len(plain_tags["eval/q_bias"]) == 3
    obs = data.observations[0]
    policies = [module.policy_from_checkpoint(checkpoint) for checkpoint in (plain, moved)]
    np.testing.assert_allclose(policies[1](obs + 50), policies[0](obs), atol=1e-3)


@pytest.mark.parametrize("spec", ["{", "{}", '{"id": "Hopper-v5"}', "[1, 2]"])
def test_a_malformed_env_spec_is_one_line(spec):
    from utils import make_env

    with pytest.raises(UserError, match="the dataset's env spec cannot be read"):
        make_env(spec, 0)
