"""Our offline CQL-type updates beside CORL's own ContinuousCQL.train, in one process, as ratios.

    git clone https://github.com/tinkoff-ai/CORL /tmp/CORL
    python benchmark/peers.py --corl /tmp/CORL --threads 1

CORL's algorithms/offline/cql.py is imported from --corl as it is (its d4rl, gym, pyrallis and wandb imports
get empty stand-ins; nothing of it is copied here) and its update is timed on random Hopper-sized batches
beside ENOTO's offline update (CQL-N, 3 hidden layers of 256) at N = 2 and 10, and Off2On's (5 CQL agents,
2 hidden layers). Each measurement is the median of --repeats rounds of --iterations updates after a warm-up,
the rounds interleaved so that a busy machine slows all of them alike. What it shows is the cost per critic
and per hidden layer: the CQL term evaluates every critic on 30 actions per state, so an update costs about
N x layers x batch x 30 forward+backward rows, and a 2-hidden-layer critic costs about half of a 3-layer one.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmark.setups import SETUPS  # noqa: E402

OBS_DIM, ACT_DIM, BATCH = 11, 3, 256


def load_corl(corl: Path):
    """CORL's algorithms/offline/cql.py as a module, its d4rl, gym, pyrallis and wandb imports as empty stand-ins."""
    for name in ("d4rl", "gym", "pyrallis", "wandb"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["gym"].Env = object  # only annotations use it
    sys.modules["pyrallis"].wrap = lambda *a, **k: lambda fn: fn
    spec = importlib.util.spec_from_file_location("corl_cql", corl / "algorithms" / "offline" / "cql.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corl_trainer(module, critic_1, critic_2, actor, act_dim: int, **overrides):
    """CORL's ContinuousCQL on these networks with its TrainConfig's values (bc_steps 0), `overrides` replacing them."""
    config = module.TrainConfig()
    settings = {name: getattr(config, name) for name in CORL_SETTINGS} | {"bc_steps": 0} | overrides
    return module.ContinuousCQL(
        critic_1=critic_1,
        critic_2=critic_2,
        critic_1_optimizer=torch.optim.Adam(critic_1.parameters(), settings["qf_lr"]),
        critic_2_optimizer=torch.optim.Adam(critic_2.parameters(), settings["qf_lr"]),
        actor=actor,
        actor_optimizer=torch.optim.Adam(actor.parameters(), settings["policy_lr"]),
        device="cpu",
        target_entropy=-act_dim,
        **settings,
    )


CORL_SETTINGS = (
    "discount", "soft_target_update_rate", "alpha_multiplier", "use_automatic_entropy_tuning", "backup_entropy",
    "policy_lr", "qf_lr", "target_update_period", "cql_n_actions", "cql_importance_sample", "cql_lagrange",
    "cql_target_action_gap", "cql_temp", "cql_alpha", "cql_max_target_backup", "cql_clip_diff_min",
    "cql_clip_diff_max",
)  # fmt: skip


def corl_cql(corl: Path, hidden_layers: int):
    """CORL's ContinuousCQL with its paper config (configs/offline/cql/hopper), critic_1 with `hidden_layers`."""
    module = load_corl(corl)
    orthogonal = module.TrainConfig().orthogonal_init
    critic_1 = module.FullyConnectedQFunction(OBS_DIM, ACT_DIM, orthogonal, hidden_layers)
    critic_2 = module.FullyConnectedQFunction(OBS_DIM, ACT_DIM, orthogonal, hidden_layers)
    actor = module.TanhGaussianPolicy(OBS_DIM, ACT_DIM, 1.0, orthogonal_init=orthogonal)
    trainer = corl_trainer(module, critic_1, critic_2, actor, ACT_DIM)
    batch = [torch.randn(BATCH, OBS_DIM), torch.rand(BATCH, ACT_DIM) * 2 - 1, torch.randn(BATCH, 1)]
    batch += [torch.randn(BATCH, OBS_DIM), torch.zeros(BATCH, 1)]
    return lambda: trainer.train(batch)


def ours(script: str, **overrides):
    module = importlib.import_module(f"algorithms.{script}")
    original = module.Args
    module.Args = lambda **kwargs: original(**{**kwargs, **overrides})
    try:
        return SETUPS[script]("hopper", OBS_DIM, ACT_DIM, torch.device("cpu"))["offline"]
    finally:
        module.Args = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corl", type=Path, required=True, help="a clone of github.com/tinkoff-ai/CORL")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    updates = {
        "CORL CQL, 2 critics x 3 hidden layers": (corl_cql(args.corl, 3), 2 * 3),
        "CORL CQL, 2 critics x 2 hidden layers": (corl_cql(args.corl, 2), 2 * 2),
        "ENOTO offline CQL-N, 2 critics x 3 hidden layers": (ours("enoto", num_critics=2), 2 * 3),
        "ENOTO offline CQL-N, 10 critics x 3 hidden layers": (ours("enoto"), 10 * 3),
        "Off2On offline, 5 CQL agents = 10 critics x 2 hidden layers": (ours("off2on"), 10 * 2),
    }
    rates = {name: [] for name in updates}
    for fn, _ in updates.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, (fn, _) in updates.items():
            start = time.perf_counter()
            for _ in range(args.iterations):
                fn()
            rates[name].append(args.iterations / (time.perf_counter() - start))
    reference = statistics.median(rates["CORL CQL, 2 critics x 3 hidden layers"]) * 6
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {BATCH}, Hopper sizes")
    print("| update | updates/s | updates/s x critic-layers | vs CORL 3-layer per critic-layer |")
    print("| --- | ---: | ---: | ---: |")
    for name, (_, critic_layers) in updates.items():
        rate = statistics.median(rates[name])
        print(f"| {name} | {rate:.2f} | {rate * critic_layers:.1f} | {rate * critic_layers / reference:.2f} |")


if __name__ == "__main__":
    main()
