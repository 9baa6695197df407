"""Time the data layer: flatten a Minari dataset to float32 arrays, write the cache, read it back.

    python benchmark/data_loading.py --root /tmp/minari-bench

Two datasets: hopper-random (1M uniform-random steps, ~40k short episodes, generated on first use) and a
synthetic 1000-episode x 1000-step dataset shaped like Minari's medium/expert sets. Dataset creation is
timed once but is not part of the flatten figures. Writes benchmark/results/data_loading.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_dataset(dataset_id: str, episodes: int, steps: int) -> None:
    import gymnasium as gym
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    rng = np.random.default_rng(0)
    env = gym.make("Hopper-v5")
    buffers = [
        EpisodeBuffer(
            id=i,
            observations=rng.normal(size=(steps + 1, 11)),
            actions=rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
            rewards=rng.normal(size=steps),
            terminations=np.zeros(steps, bool),
            truncations=np.eye(steps, dtype=bool)[-1],
        )
        for i in range(episodes)
    ]
    minari.create_dataset_from_buffers(
        dataset_id,
        buffers,
        env=env,
        eval_env=env.spec,
        author="bench",
        author_email="none",
        code_permalink="benchmark",
        description="synthetic",
    )


def time_loading(name: str) -> dict[str, float]:
    from utils import data as data_module

    resolved = data_module.resolve_name(name)
    for minari_id in resolved.minari_ids:  # start cold
        for cached in (data_module.datasets_root() / ".o2o-flat-cache").glob(minari_id.replace("/", "__") + "__*"):
            cached.unlink()
    start = time.perf_counter()
    data = data_module.load_dataset(name, use_cache=False)
    flatten = time.perf_counter() - start
    start = time.perf_counter()
    data_module.load_dataset(name, use_cache=True)  # flattens again and writes the cache
    flatten_and_write = time.perf_counter() - start
    start = time.perf_counter()
    data_module.load_dataset(name, use_cache=True)
    cached = time.perf_counter() - start
    return {
        "transitions": len(data),
        "episodes": int(data.episode_ends.sum()),
        "flatten_s": flatten,
        "cache_write_s": flatten_and_write - flatten,
        "cached_load_s": cached,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="MINARI_DATASETS_PATH to use (datasets are created there)")
    parser.add_argument("--random-steps", type=int, default=1_000_000)
    args = parser.parse_args()
    os.environ["MINARI_DATASETS_PATH"] = args.root
    os.environ["O2O_OFFLINE"] = "1"
    from utils import data as data_module

    rows, created = [], {}
    if not data_module.is_local("o2o-local/hopper/random-v0"):
        start = time.perf_counter()
        data_module.load_dataset("hopper-random", use_cache=False, random_steps=args.random_steps)
        created["hopper-random"] = time.perf_counter() - start
    rows.append(("hopper-random", time_loading("hopper-random")))
    if not data_module.is_local("bench/hopper/synthetic-1k-episodes-v0"):
        start = time.perf_counter()
        synthetic_dataset("bench/hopper/synthetic-1k-episodes-v0", episodes=1000, steps=1000)
        created["synthetic 1000 x 1000"] = time.perf_counter() - start
    rows.append(("bench/hopper/synthetic-1k-episodes-v0", time_loading("bench/hopper/synthetic-1k-episodes-v0")))

    lines = [
        "# Data loading",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Command: `python benchmark/data_loading.py --root <empty dir>`.",
        "",
        "| dataset | transitions | episodes | flatten (s) | + cache write (s) | cached load (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['transitions']} | {r['episodes']} | {r['flatten_s']:.1f} | "
            f"{r['cache_write_s']:.1f} | {r['cached_load_s']:.2f} |"
        )
    if created:
        lines += ["", "Creation (collect + write, once): " + "; ".join(f"{k} {v:.0f} s" for k, v in created.items())]
    text = "\n".join(lines) + "\n"
    out = Path(__file__).resolve().parent / "results" / "data_loading.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
