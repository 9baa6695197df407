"""What benchmark/speed.py times for each script: its paper-default agent on random device-resident data.

Each `SETUPS[name](task, obs_dim, act_dim, device, tiny=False, mode="eager", **flags)` returns the callables to
time, wrapped as the script's phases wrap them (`mode`: eager, compile, cudagraphs or compile+cudagraphs; `flags`:
fields of the script's Args, e.g. `replay="uniform"`, so that every update path a flag selects can be run):
- `offline`: one offline update; `hand_over`: the script's hand-over, called once before the online steps;
- `online`: the updates of one online environment step, with a row added first so the online buffer grows
  as in a run; `online_updates`: how many gradient updates that is;
- `act` (ENOTO): the online action choice, which ends in the one host transfer an env step needs (the action);
- `reference`: a bare forward + backward of the critic ensemble on the batch;
- `other_phases` (OPT): further update steps, timed after the hand-over; `label`: the config's name.
`tiny` shrinks networks and batches to show the overhead floor. The buffers hold the papers' sizes (1M rows).
The online steps are wrapped before the hand-over but first called after it (FastUpdate compiles and captures
lazily), so they trace and capture the online optimisers, as in the scripts, which wrap them at the hand-over.
Kept out of the scripts so that a copied script holds the algorithm only; tests/test_fast.py and
tests/test_benchmark.py run every setup, so a change of a script's update signatures shows here.
"""

from __future__ import annotations

import importlib
from functools import partial

import numpy as np
import torch

from utils.fast import FastUpdate
from utils.metrics import Metrics

DATASET_ROWS = 10**6


def script(name: str):
    return importlib.import_module(f"algorithms.{name}")


def fast_flags(mode: str) -> dict[str, bool]:
    return {"compile": "compile" in mode, "cudagraphs": "cudagraphs" in mode}


def random_buffer(module, capacity: int, rows: int, obs_dim: int, act_dim: int, device):
    """A script's ReplayBuffer holding `rows` uniform rows in [-1, 1], each one offline and not done."""
    buffer = module.ReplayBuffer(capacity, obs_dim, act_dim, device)
    buffer.add(torch.rand(rows, buffer.storage.shape[1], device=device) * 2 - 1)
    buffer.storage[:, -2:] = 0.0  # every script's rows end with (done, is_online)
    return buffer


def forward_backward(critic: torch.nn.Module, batch) -> callable:
    def reference():
        critic.zero_grad(set_to_none=True)
        critic(batch[0], batch[1]).sum().backward()

    return reference


def so2(task: str, obs_dim: int, act_dim: int, device: torch.device, tiny: bool = False, mode="eager", **flags):
    """EDAC with 50 critics on hopper, 10 elsewhere; one online step is 10 critic updates + the actor update."""
    module, fast = script("so2"), fast_flags(mode)
    num_critics = 2 if tiny else (50 if task == "hopper" else 10)
    sizes = {"hidden_dim": 8, "batch_size": 8, "mixed_batch_size": 24} if tiny else {}
    args = module.Args(**{"num_critics": num_critics, **fast, **sizes, **flags})
    agent = module.SO2(obs_dim, act_dim, num_critics, args, device)
    pool_rows, online_rows = (1000, 1000) if tiny else (DATASET_ROWS, 100_000)
    pool = random_buffer(module, pool_rows, pool_rows, obs_dim, act_dim, device)
    online = random_buffer(module, online_rows, online_rows // 2, obs_dim, act_dim, device)
    batch = pool.split(pool.sample_rows(args.batch_size + args.mixed_batch_size))
    eta = 1.0 if args.eta is None else args.eta
    offline = FastUpdate(partial(module.offline_step, agent, pool, args, eta), **fast)
    block = FastUpdate(partial(module.online_updates, agent, online, pool, args), **fast)

    def online_step():
        row = online.storage[online.position - 1 : online.position].clone()
        online.add(row)
        if args.sampling == "so2":
            pool.add(row)
        results = block(module.actor_steps(agent, args))
        agent.critic_updates += args.updates_per_step
        return results

    return {
        "label": f"N={num_critics}",
        "offline": offline,
        "hand_over": agent.hand_over,
        "online": online_step,
        "online_updates": args.updates_per_step,
        "reference": forward_backward(agent.critic, batch),
    }


def enoto(task: str, obs_dim: int, act_dim: int, device: torch.device, tiny: bool = False, mode="eager", **flags):
    """CQL-N with 10 critics; one online step is the UCB action choice and one update."""
    module, fast = script("enoto"), fast_flags(mode)
    sizes = {"num_critics": 2, "hidden_dim": 8, "batch_size": 8} if tiny else {}
    args = module.Args(**sizes, **fast, **flags)
    module.apply_preset(args, module.PRESETS)
    agent = module.ENOTO(obs_dim, act_dim, args, device)
    dataset_rows, online_rows = (1000, 1000) if tiny else (DATASET_ROWS, 250_000)
    dataset = random_buffer(module, dataset_rows, dataset_rows, obs_dim, act_dim, device)
    online = random_buffer(module, online_rows, online_rows // 2, obs_dim, act_dim, device)
    batch, obs = online.split(online.sample_rows(args.batch_size)), np.zeros(obs_dim, np.float32)
    offline = FastUpdate(partial(module.offline_step, agent, dataset, args), **fast)
    online_update = FastUpdate(partial(module.replay_update, agent, online, args), **fast)

    def online_step():
        online.add(online.storage[online.position - 1 : online.position].clone())
        return online_update()

    return {
        "label": f"N={args.num_critics}",
        "offline": offline,
        "hand_over": agent.hand_over,
        "act": lambda: agent.explore(obs, head=1 % args.num_critics),
        "online": online_step,
        "online_updates": 1,
        "reference": forward_backward(agent.critic, batch),
    }


def baq(task: str, obs_dim: int, act_dim: int, device: torch.device, tiny: bool = False, mode="eager", **flags):
    """The CQL (or IQL) backbone; one online step is the new row's priority, the prioritized draw and the update."""
    module, fast = script("baq"), fast_flags(mode)
    sizes = {"hidden_dim": 8, "batch_size": 8} if tiny else {}
    args = module.Args(**sizes, **fast, **flags)
    agent = module.BAQ(obs_dim, act_dim, args, device)
    rows = 1000 if tiny else DATASET_ROWS
    dataset = random_buffer(module, rows, rows, obs_dim, act_dim, device)
    replay = module.PriorityReplay(dataset.capacity + args.online_steps, obs_dim, act_dim, device)
    replay.add(dataset.storage, torch.rand(dataset.size, device=device), torch.rand(dataset.size, device=device) + 1)
    batch = dataset.split(dataset.sample_rows(args.batch_size))
    offline = FastUpdate(partial(module.offline_step, agent, dataset, args), **fast)
    online = FastUpdate(partial(module.online_update, agent, replay, 1.0, args), **fast)

    def online_step():
        row = dataset.storage[:1]
        bc_mse, distance = module.bc_distances(agent.bc_model, *dataset.split(row)[:2])
        replay.add(row, bc_mse, module.priority(distance, 1.0, 1.0))
        return online()

    return {
        "label": args.backbone,
        "offline": offline,
        "hand_over": agent.hand_over,
        "online": online_step,
        "online_updates": 1,
        "reference": forward_backward(agent.critic, batch),
    }


def off2on(task: str, obs_dim: int, act_dim: int, device: torch.device, tiny: bool = False, mode="eager", **flags):
    """5 CQL agents (after the BC warm start); one online step is the density step, the draw, the update, the
    priority write (UTD 1)."""
    module, fast = script("off2on"), fast_flags(mode)
    sizes = {"num_agents": 2, "hidden_dim": 8, "batch_size": 8} if tiny else {}
    args = module.Args(**{**sizes, **fast, **flags})
    agent = module.Off2On(obs_dim, act_dim, args, device)
    rows = 1000 if tiny else DATASET_ROWS
    dataset = random_buffer(module, rows, rows, obs_dim, act_dim, device)
    replay = module.BalancedReplay(dataset.storage, args.online_steps, args, obs_dim, act_dim)
    batch = dataset.split(dataset.sample_rows(args.batch_size))
    offline = FastUpdate(partial(module.offline_step, agent, dataset, args), **fast)
    online = FastUpdate(partial(module.replay_update, agent, replay, args), **fast)

    def online_step():
        replay.add(dataset.storage[replay.num_online : replay.num_online + 1])
        return online()

    return {
        "label": f"N={args.num_agents}",
        "offline": lambda: offline(False),
        "hand_over": agent.hand_over,
        "online": online_step,
        "online_updates": 1,
        "reference": forward_backward(agent.critic, batch),
    }


def opt(task: str, obs_dim: int, act_dim: int, device: torch.device, tiny: bool = False, mode="eager", **flags):
    """TD3+BC offline; one fine-tuning env step is 5 updates of both critics with density steps, prioritized
    draws and priority writes; `other_phases` times one second-order Eq. 3 pre-training update."""
    module, fast = script("opt"), fast_flags(mode)
    sizes = {"hidden_dim": 8, "batch_size": 8} if tiny else {}
    args = module.Args(**sizes, **fast, **flags)
    module.resolve_args(args, f"{task}-medium", task)
    agent = module.OPT(obs_dim, act_dim, args, device)
    rows = 1000 if tiny else DATASET_ROWS
    dataset = random_buffer(module, rows, rows, obs_dim, act_dim, device)
    replay = module.BalancedReplay(dataset.storage, args.online_steps, args, obs_dim, act_dim)
    for row in dataset.storage[:10]:
        replay.add(row[None])
    batch = dataset.split(dataset.sample_rows(args.batch_size))
    offline = FastUpdate(partial(module.offline_step, agent, dataset, args), **fast)
    pretrain = FastUpdate(partial(module.pretrain_step, agent, replay, args), **fast)
    finetune = FastUpdate(partial(module.replay_update, agent, replay, args), **fast)

    def offline_update():
        agent.offline_updates += 1
        return offline(agent.offline_updates % args.policy_freq == 0)

    def hand_over():
        agent.hand_over()
        if args.new_critic:
            agent.start_online_critic()
        agent.start_finetuning()

    def pretrain_update():
        agent.pretrain_updates += 1
        return pretrain(agent.pretrain_updates % args.policy_freq == 0)

    def online_step():
        replay.add(dataset.storage[replay.num_online : replay.num_online + 1])
        metrics = Metrics(None)
        module.finetune_step(agent, finetune, 0.5, args, metrics)
        return metrics.sums

    return {
        "label": f"UTD {args.updates_per_step}",
        "offline": offline_update,
        "hand_over": hand_over,
        "online": online_step,
        "online_updates": args.updates_per_step,
        "reference": forward_backward(agent.q_off, batch),
        "other_phases": {"online pre-training (Eq. 3)": pretrain_update} if args.online_pretraining else {},
    }


SETUPS = {"so2": so2, "enoto": enoto, "baq": baq, "off2on": off2on, "opt": opt}

# Every flag value that changes what an update step runs (the defaults are the first of each script), for the
# sync sweeps: tests/test_sync.py on the meta device, tests/test_cuda.py under CUDA graphs.
VARIANTS = [
    ("so2", {}),
    ("so2", {"sampling": "uniform"}),
    ("so2", {"per_member_target": False}),
    ("so2", {"online_auto_alpha": True}),
    ("so2", {"target_noise": 0.0}),
    ("so2", {"eta": 0.0}),
    ("enoto", {}),
    *[("enoto", {"q_target": rule}) for rule in ("min", "mean", "rem", "random_min_pair")],
    *[("enoto", {"exploration": mode}) for mode in ("none", "bootstrap", "oac")],
    *[("enoto", {"sunrise_weight": weight}) for weight in ("batch", "off")],
    *[("enoto", {"preset": preset}) for preset in ("official", "cql_sac", "cql_cql")],
    ("baq", {}),
    ("baq", {"use_priority": False}),
    ("baq", {"use_weight": False}),
    ("baq", {"backbone": "iql"}),
    ("baq", {"backbone": "iql", "use_priority": False, "use_weight": False}),
    ("off2on", {}),
    ("off2on", {"replay": "uniform"}),
    ("off2on", {"replay": "online_only"}),
    ("off2on", {"num_agents": 1}),
    ("opt", {}),
    ("opt", {"backbone": "spot"}),
    ("opt", {"new_critic": False}),
    ("opt", {"online_pretraining": False}),
    ("opt", {"meta_first_order": True, "meta_weight": "none"}),
    ("opt", {"replay": "uniform"}),
    ("opt", {"replay": "online_only"}),
    ("opt", {"layer_norm": True}),
    ("opt", {"new_critic": False, "online_pretraining": False, "n_tau": 0, "replay": "uniform"}),  # plain TD3
]


def variant_id(name: str, flags: dict) -> str:
    return "-".join([name, *(f"{key}={value}" for key, value in flags.items())])
