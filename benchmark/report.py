"""Turn a sweep's TensorBoard logs into a markdown table, learning curves and an aggregate IQM.

    python benchmark/report.py --sweep-dir runs/sweep-random --out benchmark/results/sweep-random \\
        --command "python benchmark/sweep.py ..."

Reads eval/normalized_score (x = online environment steps, 0 = hand-over) of every run under
<sweep-dir>/<algorithm>/<dataset>/seed<seed>/. Per algorithm x dataset: the score at hand-over and after
the online budget (mean +- std over seeds; std is the population std), and the area under the online
curve, reported as the step-weighted mean score over the online phase (trapezoids). Across datasets: the
interquartile mean (IQM) of the final scores with a 95% stratified bootstrap interval (seeds resampled
within each dataset). Writes report.md and curves.png into --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TAG = "eval/normalized_score"


def read_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, scores) of the newest TensorBoard run below run_dir, or None if it logged no evaluation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = sorted({path.parent for path in run_dir.rglob("events.out.tfevents.*")})
    if not event_dirs:
        return None
    events = EventAccumulator(str(event_dirs[-1])).Reload()
    if TAG not in events.Tags()["scalars"]:
        return None
    scalars = events.Scalars(TAG)
    return np.array([s.step for s in scalars], float), np.array([s.value for s in scalars], float)


def collect(sweep_dir: Path) -> dict[tuple[str, str], dict[int, tuple[np.ndarray, np.ndarray]]]:
    curves: dict[tuple[str, str], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for seed_dir in sorted(sweep_dir.glob("*/*/seed*")):
        curve = read_curve(seed_dir)
        if curve is not None:
            algorithm, dataset = seed_dir.parent.parent.name, seed_dir.parent.name
            curves.setdefault((algorithm, dataset), {})[int(seed_dir.name[4:])] = curve
    return curves


def area_under_curve(steps: np.ndarray, scores: np.ndarray) -> float:
    """Step-weighted mean of the score over the online phase (trapezoid area / length)."""
    if len(steps) < 2:
        return float(scores[0])
    return float(np.sum((scores[1:] + scores[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def iqm(values: np.ndarray) -> float:
    """Interquartile mean as rliable computes it (scipy trim_mean 0.25): drop int(n/4) from each end."""
    values = np.sort(np.asarray(values, float).ravel())
    cut = int(0.25 * len(values))
    return float(values[cut : len(values) - cut].mean())


def bootstrap_iqm(scores_per_dataset: list[np.ndarray], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the IQM, resampling seeds with replacement within each dataset."""
    rng = np.random.default_rng(seed)
    stats = [
        iqm(np.concatenate([rng.choice(scores, size=len(scores)) for scores in scores_per_dataset]))
        for _ in range(samples)
    ]
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def summarise(curves) -> list[dict]:
    rows = []
    for (algorithm, dataset), seeds in sorted(curves.items()):
        start = np.array([scores[0] for _, scores in seeds.values()])
        final = np.array([scores[-1] for _, scores in seeds.values()])
        auc = np.array([area_under_curve(steps, scores) for steps, scores in seeds.values()])
        budget = int(max(steps[-1] for steps, _ in seeds.values()))
        rows.append(
            {
                "algorithm": algorithm,
                "dataset": dataset,
                "seeds": len(seeds),
                "budget": budget,
                "start": start,
                "final": final,
                "auc": auc,
            }
        )
    return rows


def plot(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({dataset for _, dataset in curves})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for (algorithm, name), seeds in sorted(curves.items()):
            if name != dataset:
                continue
            grid = np.unique(np.concatenate([steps for steps, _ in seeds.values()]))
            values = np.stack([np.interp(grid, steps, scores) for steps, scores in seeds.values()])
            mean, std = values.mean(0), values.std(0)
            ax.plot(grid, mean, label=f"{algorithm} ({len(seeds)} seeds)")
            ax.fill_between(grid, mean - std, mean + std, alpha=0.25)
        ax.set_title(dataset)
        ax.set_xlabel("online environment steps")
        ax.set_ylabel("normalized score (D4RL refs)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict], command: str) -> str:
    pm = lambda x: f"{x.mean():.1f} ± {x.std():.1f}"
    lines = [
        "# Learning results",
        "",
        f"Sweep command: `{command}`" if command else "Sweep command: not recorded",
        "",
        "Normalized score with D4RL reference returns on Minari data: NOT comparable with the papers' tables.",
        "",
        "| algorithm | dataset | seeds | online steps | hand-over | final | mean over online phase (AUC) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['algorithm']} | {r['dataset']} | {r['seeds']} | {r['budget']} | {pm(r['start'])} "
        f"| {pm(r['final'])} | {pm(r['auc'])} |"
        for r in rows
    ]
    lines += ["", "Aggregate over datasets, final score: IQM [95% stratified bootstrap CI]", ""]
    for algorithm in sorted({r["algorithm"] for r in rows}):
        per_dataset = [r["final"] for r in rows if r["algorithm"] == algorithm]
        low, high = bootstrap_iqm(per_dataset)
        lines.append(
            f"- {algorithm}: {iqm(np.concatenate(per_dataset)):.1f} [{low:.1f}, {high:.1f}] "
            f"over {len(per_dataset)} datasets"
        )
    return "\n".join(lines) + "\n\n![curves](curves.png)\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and curves.png")
    parser.add_argument("--command", default="", help="the sweep command, recorded in the report")
    args = parser.parse_args(argv)
    curves = collect(args.sweep_dir)
    if not curves:
        raise SystemExit(f"error: no {TAG} logs under {args.sweep_dir}/<algorithm>/<dataset>/seed<N>/")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(markdown(summarise(curves), args.command))
    plot(curves, args.out / "curves.png")
    print(f"wrote {args.out / 'report.md'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
