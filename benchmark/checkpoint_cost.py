"""What one checkpoint.pt costs at paper buffer sizes: its size on disk and the time to write it.

    python benchmark/checkpoint_cost.py --rows 1000000 --device cpu

For OPT (the largest replay: the dataset plus the whole online budget, float64 priorities beside it, five
networks and their Adam states) and SO2 (the mixed pool plus the online buffer, an ensemble of 10 critics),
with the buffers filled to `--rows` dataset rows and half the online budget: the state the scripts write
with `--checkpoint-freq`, through the same atomic writer. Median of --repeats writes, into --dir (its disk
is what is measured). Writes benchmark/results/checkpoint_<device>.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from algorithms import opt, so2  # noqa: E402
from utils.checkpoint import atomic_save  # noqa: E402

OBS_DIM, ACT_DIM = 17, 6  # halfcheetah / walker2d: the widest MuJoCo rows


def opt_state(rows: int, device: torch.device):
    """A callable that gathers the state OPT's checkpoint.pt holds in fine-tuning (networks, Adam, B_BR)."""
    args = opt.Args(online_steps=300_000, n_tau=25_000)
    opt.resolve_args(args, "halfcheetah-medium", "halfcheetah")
    agent = opt.OPT(OBS_DIM, ACT_DIM, args, device)
    agent.start_online_critic()
    agent.start_finetuning()
    width = 2 * OBS_DIM + ACT_DIM + 3
    replay = opt.BalancedReplay(torch.rand(rows, width, device=device), args.online_steps, args, OBS_DIM, ACT_DIM)
    for _ in range(args.online_steps // 2 // 10_000):
        replay.buffer.add(torch.rand(10_000, width, device=device))
    return lambda: agent.state_dict() | {"replay": replay.state_dict()}


def so2_state(rows: int, device: torch.device):
    """A callable that gathers the state SO2's checkpoint.pt holds online (networks, Adam, pool, online buffer)."""
    args = so2.Args(online_steps=100_000)
    agent = so2.SO2(OBS_DIM, ACT_DIM, 10, args, device)
    width = 2 * OBS_DIM + ACT_DIM + 3
    pool = so2.ReplayBuffer(rows, OBS_DIM, ACT_DIM, device)
    pool.add(torch.rand(rows, width, device=device))
    online = so2.ReplayBuffer(args.online_steps, OBS_DIM, ACT_DIM, device)
    online.add(torch.rand(args.online_steps // 2, width, device=device))
    return lambda: agent.state_dict() | {"pool": pool.state_dict(), "online": online.state_dict()}


def measure(state_fn, folder: Path, repeats: int) -> tuple[float, float]:
    """(size in MB, median seconds) of building the buffers' state and writing it atomically."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        atomic_save(state_fn(), folder / "checkpoint.pt")
        times.append(time.perf_counter() - start)
    return (folder / "checkpoint.pt").stat().st_size / 1e6, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmark" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    lines = [
        f"# Checkpoint cost on {args.device}",
        "",
        f"torch {torch.__version__}, {date.today()}; {args.rows:,} dataset rows, half the online budget filled, "
        f"obs {OBS_DIM} / action {ACT_DIM}; median of {args.repeats} atomic writes (state to host + torch.save + "
        "fsync + rename).",
        f"Command: `python benchmark/checkpoint_cost.py --rows {args.rows} --device {args.device}`.",
        "",
        "| script | what the buffers hold | size (MB) | write (s) |",
        "| --- | --- | ---: | ---: |",
    ]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, fn, what in (
            ("opt", opt_state, "B_BR: dataset + 150k of 300k online rows, float64 priorities"),
            ("so2", so2_state, "mixed pool (dataset) + 50k of 100k online rows"),
        ):
            size, seconds = measure(fn(args.rows, device), Path(tmp), args.repeats)
            lines.append(f"| {name} | {what} | {size:.0f} | {seconds:.2f} |")
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"checkpoint_{device.type}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
