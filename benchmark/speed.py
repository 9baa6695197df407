"""Updates per second at paper defaults, warm-up excluded, beside a bare forward+backward reference.

    python benchmark/speed.py --device cpu --configs hopper halfcheetah
    python benchmark/speed.py --device cuda --algorithms enoto --modes eager cudagraphs

Every script with a setup in benchmark/setups.py (what to time, built from the script's own classes and
update steps) is measured; a new script joins by adding one. For each algorithm, configuration and mode (eager, compile,
cudagraphs, compile+cudagraphs: the update steps wrapped as the script's --compile / --cudagraphs wrap
them; compilation and graph capture happen in the warm-up, which is excluded) it times, on synthetic
device-resident buffers of the papers' sizes (1M dataset rows; no environment):
- offline: one offline gradient step at the paper's defaults;
- online: what one online environment step costs in updates (SO2: 10 critic + 1 actor update; ENOTO: one
  UCB action choice + one update);
- reference: a bare forward + backward of the same critic ensemble on the online batch, no optimiser;
- overhead: the online step with tiny networks (hidden 8, 2 critics, batch 8), where compute is
  negligible: the floor set by Python and kernel launches;
- other phases a setup names under `other_phases` (OPT: the Eq. 3 pre-training update), after the hand-over.
Each row is measured with the scripts' determinism settings (`--deterministic on`; `off` adds rows without)
and float32 matmul precision (`--matmul highest`; `high` adds TF32 rows on CUDA). A row that fails is
reported and the others go on; benchmark/results/speed_<device>.md and .json (device name, torch version,
date) are rewritten after every row, so a timeout keeps what was measured. Exit status 1 if a row failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch._dynamo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmark.setups import SETUPS  # noqa: E402

# obs / action sizes of the Gymnasium v5 tasks
CONFIGS = {"hopper": (11, 3), "halfcheetah": (17, 6), "walker2d": (17, 6)}
MODES = ["eager", "compile", "cudagraphs", "compile+cudagraphs"]


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


# Warm-up calls: OPT's steps alternate two variants (actor step or not), each compiled at its first call; a CUDA
# graph is captured at the 4th call of each variant (utils.fast.FastUpdate).
WARMUP = {"eager": 3, "compile": 3, "cudagraphs": 8, "compile+cudagraphs": 8}


def env_step(hooks: dict):
    """What an online env step costs in the agent: its action choice, where a setup times one, then its updates."""
    act, online = hooks.get("act"), hooks["online"]
    return online if act is None else lambda: (act(), online())


def measure(name: str, setup, config: str, device: torch.device, iterations: dict[str, int], mode: str) -> dict:
    obs_dim, act_dim = CONFIGS[config]
    hooks, warmup = setup(config, obs_dim, act_dim, device, mode=mode), WARMUP[mode]
    offline_ups = per_second(hooks["offline"], iterations["offline"], warmup, device)
    reference = per_second(hooks["reference"], iterations["offline"], 3, device)
    hooks["hand_over"]()
    other = hooks.get("other_phases", {})
    other_ups = {phase: per_second(fn, iterations["offline"], warmup, device) for phase, fn in other.items()}
    online_sps = per_second(env_step(hooks), iterations["online"], warmup, device)
    tiny = setup(config, obs_dim, act_dim, device, tiny=True, mode=mode)
    tiny["hand_over"]()
    return {
        "algorithm": name,
        "mode": mode,
        "config": f"{config} ({hooks['label']})",
        "offline_updates_per_s": offline_ups,
        "online_env_steps_per_s": online_sps,
        "online_updates_per_s": online_sps * hooks["online_updates"],
        "reference_fwd_bwd_per_s": reference,
        "tiny_ms_per_online_step": 1e3 / per_second(env_step(tiny), iterations["tiny"], 20 + warmup, device),
        "other_phases_updates_per_s": other_ups,
    }


def table(rows: list[dict], failures: list[dict], header: dict, command: str) -> str:
    lines = [
        f"# Speed on {header['device']}",
        "",
        f"torch {header['torch']}, {header['date']}; warm-up excluded; measured iterations: {header['iterations']}.",
        f"Command: `{command}`. deterministic: the scripts' default (`use_deterministic_algorithms(True)`, "
        "`CUBLAS_WORKSPACE_CONFIG=:4096:8`); matmul: `torch.set_float32_matmul_precision` (high = TF32 on CUDA).",
        "",
        "| algorithm | config | mode | deterministic | matmul | offline updates/s | online env steps/s (updates only) "
        "| online updates/s | bare critic fwd+bwd/s (online batch) | tiny nets: ms per online step "
        "| other phases: updates/s |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['config']} | {r['mode']} | {'yes' if r['deterministic'] else 'no'} "
            f"| {r['matmul']} | {r['offline_updates_per_s']:.1f} | {r['online_env_steps_per_s']:.2f} "
            f"| {r['online_updates_per_s']:.1f} | {r['reference_fwd_bwd_per_s']:.1f} "
            f"| {r['tiny_ms_per_online_step']:.2f} "
            f"| {'; '.join(f'{phase}: {ups:.1f}' for phase, ups in r['other_phases_updates_per_s'].items()) or '-'} |"
        )
    for f in failures:
        lines.append(
            f"\nFAILED: {f['algorithm']} {f['config']} {f['mode']} deterministic={f['deterministic']} "
            f"matmul={f['matmul']}: {f['error']}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--algorithms", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES, help="default: all on CUDA, eager on CPU")
    parser.add_argument(
        "--deterministic",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="use_deterministic_algorithms as the scripts set it (on, their default) and/or off",
    )
    parser.add_argument(
        "--matmul",
        nargs="+",
        default=["highest"],
        choices=["highest", "high"],
        help="float32 matmul precision; high = TF32 on CUDA (the scripts use highest)",
    )
    parser.add_argument("--offline-iterations", type=int, default=None, help="default 200 on CUDA, 20 on CPU")
    parser.add_argument("--online-iterations", type=int, default=None, help="default 50 on CUDA, 3 on CPU")
    parser.add_argument("--tiny-iterations", type=int, default=200, help="online steps timed with tiny networks")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--append", action="store_true", help="add the rows to the table already in --out")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as the scripts: before CUDA starts
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    modes = args.modes or (MODES if on_gpu else ["eager"])
    if not on_gpu and any("cudagraphs" in mode for mode in modes):
        parser.error("the cudagraphs modes need --device cuda")
    iterations = {
        "offline": args.offline_iterations or (200 if on_gpu else 20),
        "online": args.online_iterations or (50 if on_gpu else 3),
        "tiny": args.tiny_iterations,
    }
    device_name = (
        torch.cuda.get_device_name(device)
        if on_gpu
        else f"{platform.processor() or 'CPU'} x{torch.get_num_threads()} threads"
    )
    header = {"device": device_name, "torch": torch.__version__, "date": str(date.today()), "iterations": iterations}
    command = "python benchmark/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    if args.append and (out / f"speed_{device.type}.json").exists():
        earlier = json.loads((out / f"speed_{device.type}.json").read_text())
        rows, failures = earlier["rows"], earlier.get("failures", [])
        for row in rows:  # tables written before these columns existed
            row.setdefault("mode", "eager"), row.setdefault("deterministic", True), row.setdefault("matmul", "highest")
        command = f"{earlier.get('command', 'an earlier run')}; {command}"
    failed_before = len(failures)
    # the scripts' own settings first: a timeout then cuts the variants, not whole algorithms
    for deterministic, matmul, name, config, mode in itertools.product(
        args.deterministic, args.matmul, args.algorithms, args.configs, modes
    ):
        torch.manual_seed(0)
        torch.use_deterministic_algorithms(deterministic == "on", warn_only=True)
        torch.set_float32_matmul_precision(matmul)
        torch._dynamo.reset()
        labels = {"deterministic": deterministic == "on", "matmul": matmul}
        try:  # one row failing (or the step's timeout) costs that row, not the ones measured before it
            rows.append(measure(name, SETUPS[name], config, device, iterations, mode) | labels)
        except Exception as err:
            failures.append(
                {
                    "algorithm": name,
                    "config": config,
                    "mode": mode,
                    **labels,
                    "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                }
            )
            print(f"FAILED {name} {config} {mode} {labels}: {failures[-1]['error']}", file=sys.stderr)
        finally:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.set_float32_matmul_precision("highest")
        text = table(rows, failures, header, command)
        (out / f"speed_{device.type}.md").write_text(text)
        (out / f"speed_{device.type}.json").write_text(
            json.dumps({**header, "command": command, "rows": rows, "failures": failures}, indent=2)
        )
    print(text)
    return 1 if len(failures) > failed_before else 0


if __name__ == "__main__":
    sys.exit(main())
