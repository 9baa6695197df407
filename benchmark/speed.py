"""Updates per second at paper defaults, warm-up excluded, beside a bare forward+backward reference.

    python benchmark/speed.py --device cpu --configs hopper halfcheetah
    python benchmark/speed.py --device cuda

For each configuration it times, on synthetic device-resident buffers (no environment):
- offline: one offline gradient step (SO2: EDAC with the diversity term, batch 256);
- online: the updates of one environment step (SO2: 10 critic updates + 1 actor update, batch 2560);
- reference: a bare forward + backward of the same critic ensemble on the same batch, no optimiser;
- overhead: the same online block with tiny networks (hidden 8, 2 critics, batch 8 + 24), where compute
  is negligible, with 1 and with 10 updates per step: the ratio shows what 10 updates cost in Python.
Writes benchmark/results/speed_<device>.md and .json (device name, torch version, date).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from algorithms import so2

# obs / action sizes of the Gymnasium v5 tasks and the paper's ensemble sizes
CONFIGS = {"hopper": (11, 3, 50), "halfcheetah": (17, 6, 10), "walker2d": (17, 6, 10)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_second(fn, iterations: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return iterations / (time.perf_counter() - start)


def random_buffer(size: int, obs_dim: int, act_dim: int, device: torch.device, is_online: bool) -> so2.ReplayBuffer:
    buffer = so2.ReplayBuffer(size, obs_dim, act_dim, device)
    rows = torch.rand(size, buffer.storage.shape[1], device=device) * 2 - 1
    rows[:, -2] = 0.0
    rows[:, -1] = float(is_online)
    buffer.add(rows)
    return buffer


def so2_setup(obs_dim, act_dim, num_critics, device, **overrides):
    args = so2.Args(num_critics=num_critics, **overrides)
    agent = so2.SO2(obs_dim, act_dim, num_critics, args, device)
    pool = random_buffer(100_000, obs_dim, act_dim, device, False)
    online = random_buffer(10_000, obs_dim, act_dim, device, True)
    return agent, args, pool, online


def measure_so2(config: str, device: torch.device, iterations: dict[str, int]) -> dict:
    obs_dim, act_dim, num_critics = CONFIGS[config]
    agent, args, pool, online = so2_setup(obs_dim, act_dim, num_critics, device)
    offline_ups = per_second(
        lambda: agent.offline_update(pool.split(pool.sample_rows(args.batch_size)), eta=1.0),
        iterations["offline"],
        3,
        device,
    )
    agent.hand_over()
    online_sps = per_second(lambda: so2.online_updates(agent, online, pool, args), iterations["online"], 1, device)

    batch = pool.split(pool.sample_rows(args.batch_size + args.mixed_batch_size))

    def forward_backward():
        agent.critic.zero_grad(set_to_none=True)
        agent.critic(batch[0], batch[1]).sum().backward()

    reference = per_second(forward_backward, iterations["offline"], 3, device)

    tiny = {}
    for updates in (1, 10):
        small, small_args, small_pool, small_online = so2_setup(
            obs_dim,
            act_dim,
            2,
            device,
            hidden_dim=8,
            batch_size=8,
            mixed_batch_size=24,
            updates_per_step=updates,
            actor_update_freq=updates,
        )
        small.hand_over()
        tiny[updates] = 1e3 / per_second(
            functools.partial(so2.online_updates, small, small_online, small_pool, small_args), 200, 20, device
        )
    return {
        "algorithm": "so2",
        "config": f"{config} (N={num_critics})",
        "offline_updates_per_s": offline_ups,
        "online_env_steps_per_s": online_sps,
        "online_critic_updates_per_s": online_sps * args.updates_per_step,
        "reference_fwd_bwd_per_s": reference,
        "tiny_block_ms_1_update": tiny[1],
        "tiny_block_ms_10_updates": tiny[10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--offline-iterations", type=int, default=None, help="default 200 on CUDA, 20 on CPU")
    parser.add_argument("--online-iterations", type=int, default=None, help="default 50 on CUDA, 3 on CPU")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    iterations = {
        "offline": args.offline_iterations or (200 if on_gpu else 20),
        "online": args.online_iterations or (50 if on_gpu else 3),
    }
    torch.manual_seed(0)
    rows = [measure_so2(config, device, iterations) for config in args.configs]
    device_name = (
        torch.cuda.get_device_name(device)
        if on_gpu
        else f"{platform.processor() or 'CPU'} x{torch.get_num_threads()} threads"
    )
    header = {"device": device_name, "torch": torch.__version__, "date": str(date.today()), "iterations": iterations}

    lines = [
        f"# Speed on {device_name}",
        "",
        f"torch {torch.__version__}, {date.today()}; warm-up excluded; measured iterations: {iterations}.",
        f"Command: `python benchmark/speed.py --device {device.type} --configs {' '.join(args.configs)}`.",
        "",
        "| algorithm | config | offline updates/s | online env steps/s (updates only) | online critic updates/s "
        "| bare critic fwd+bwd/s (online batch) | tiny nets: ms per step, 1 update | 10 updates |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['config']} | {r['offline_updates_per_s']:.1f} "
            f"| {r['online_env_steps_per_s']:.2f} "
            f"| {r['online_critic_updates_per_s']:.1f} | {r['reference_fwd_bwd_per_s']:.1f} "
            f"| {r['tiny_block_ms_1_update']:.2f} | {r['tiny_block_ms_10_updates']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed_{device.type}.md").write_text(text)
    (out / f"speed_{device.type}.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
