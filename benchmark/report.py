"""Turn a sweep's TensorBoard logs into a markdown table, learning curves and an aggregate IQM.

    python benchmark/report.py --sweep-dir runs/sweep-random --out benchmark/results/sweep-random \\
        --command "python benchmark/sweep.py ..." --baseline opt=td3

Reads eval/normalized_score (x = online environment steps, 0 = hand-over) of every run under
<sweep-dir>/<algorithm>/<dataset>/seed<seed>/. A run is complete when it has an evaluation AT its online budget
(`online_steps` of its args.json; without one, the largest last step of its algorithm x dataset) and is not listed
in <sweep-dir>/failures.json; other runs are listed as incomplete and counted nowhere. Per algorithm x dataset, over
complete seeds (mean +- population std): the score at hand-over, the drop (the first evaluation at or after
--drop-step minus the hand-over), the deepest dip (the lowest online evaluation minus the hand-over; with
--lowest-until STEPS, the lowest of the evaluations up to STEPS, such as the first 10k online steps issue #34 asks
for; a run without one that early: its first online evaluation), the final score (at the budget), the mean of the
online evaluations after the hand-over (e.g. BAQ's card: the mean of evaluations at 5k ... 30k), and the area under
the online curve as a step-weighted mean (trapezoids). Across datasets: the IQM of the final scores with a 95%
stratified bootstrap interval (rliable: 50,000 resamples of the seeds within each dataset), on the same number of
seeds per dataset (the lowest; the report says which seeds it left out). --baseline METHOD=BASE adds, per dataset,
METHOD minus BASE in mean final score, in mean dip and in the mean of the online evaluations, each with a bootstrap
interval (pairs without data are left out), and puts each pair in its own row of curves.png; where both ran the same
seeds, a table lists each seed's hand-over, lowest online evaluation, final score and mean of the online evaluations
for both. With --paired (for arms run from one starting point per seed, such as an ablation from one offline.pt per
seed) the differences in final score, lowest evaluation and online mean are taken per seed and their intervals
resample the seeds jointly. --only restricts the report to some algorithm folders. Writes report.md and curves.png
into --out. """

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

TAG = "eval/normalized_score"
SEED_DIR = re.compile(r"seed(\d+)")


def read_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray, int | None] | None:
    """(steps, scores, online budget from args.json or None) of the newest TensorBoard run below run_dir, or
    None if it logged no evaluation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = sorted({path.parent for path in run_dir.rglob("events.out.tfevents.*")})
    if not event_dirs:
        return None
    events = EventAccumulator(str(event_dirs[-1])).Reload()
    if TAG not in events.Tags()["scalars"]:
        return None
    scalars = events.Scalars(TAG)
    args_file = event_dirs[-1] / "args.json"
    budget = json.loads(args_file.read_text()).get("online_steps") if args_file.is_file() else None
    return np.array([s.step for s in scalars], float), np.array([s.value for s in scalars], float), budget


def collect(sweep_dir: Path, only: list[str] | None = None):
    """Complete curves by (algorithm, dataset) and seed, and the names of the incomplete runs; `only`: these
    algorithm folders alone."""
    failures = sweep_dir / "failures.json"
    failed = set(json.loads(failures.read_text())) if failures.is_file() else set()
    found: dict[tuple[str, str], dict[int, tuple]] = {}
    for seed_dir in sorted(sweep_dir.glob("*/*/seed*")):
        match = SEED_DIR.fullmatch(seed_dir.name)
        if only is not None and seed_dir.parent.parent.name not in only:
            continue
        if match is None or not seed_dir.is_dir():
            print(f"warning: skipping {seed_dir}: not a <algorithm>/<dataset>/seed<N> run folder", file=sys.stderr)
            continue
        curve = read_curve(seed_dir)
        if curve is not None:
            found.setdefault((seed_dir.parent.parent.name, seed_dir.parent.name), {})[int(match.group(1))] = curve
    curves: dict[tuple[str, str], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    incomplete = []
    for (algorithm, dataset), seeds in found.items():
        fallback = max(steps[-1] for steps, _, _ in seeds.values())
        for seed, (steps, scores, budget) in sorted(seeds.items()):
            name = f"{algorithm}/{dataset}/seed{seed}"
            if name in failed or steps[-1] != (budget if budget is not None else fallback):
                incomplete.append(f"{name} (last evaluation at {int(steps[-1])} of {budget or int(fallback)})")
            else:
                curves.setdefault((algorithm, dataset), {})[seed] = (steps, scores)
    return curves, incomplete


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


def bootstrap(statistic, groups: list[np.ndarray], samples: int = 50_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of statistic(resampled groups), resampling each group's seeds with replacement."""
    rng = np.random.default_rng(seed)
    resampled = [scores[rng.integers(0, len(scores), (samples, len(scores)))] for scores in groups]  # [samples, n]
    stats = statistic(resampled)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def bootstrap_iqm(scores_per_dataset: list[np.ndarray], samples: int = 50_000, seed: int = 0) -> tuple[float, float]:
    """The IQM's interval, stratified: seeds are resampled within each dataset."""

    def rowwise_iqm(resampled):
        values = np.sort(np.concatenate(resampled, axis=1), axis=1)
        cut = int(0.25 * values.shape[1])
        return values[:, cut : values.shape[1] - cut].mean(1)

    return bootstrap(rowwise_iqm, [np.asarray(x, float) for x in scores_per_dataset], samples, seed)


def score_at(steps: np.ndarray, scores: np.ndarray, step: float) -> float:
    """The first evaluation at or after `step` (the last one if the run is shorter)."""
    index = min(int(np.searchsorted(steps, step)), len(steps) - 1)
    return float(scores[index])


def lowest_online(steps: np.ndarray, scores: np.ndarray, until: float | None) -> float:
    """The lowest evaluation after the hand-over (up to step `until` if given; the first one if none is that early);
    the hand-over itself for a run without online evaluations."""
    online = scores[1:][steps[1:] <= until] if until is not None else scores[1:]
    return float(online.min()) if len(online) else float(scores[min(1, len(scores) - 1)])


def summarise(curves, drop_step: float, lowest_until: float | None = None) -> list[dict]:
    rows = []
    for (algorithm, dataset), seeds in sorted(curves.items()):
        runs = [seeds[seed] for seed in sorted(seeds)]
        rows.append(
            {
                "algorithm": algorithm,
                "dataset": dataset,
                "seeds": sorted(seeds),
                "budget": int(runs[0][0][-1]),
                "start": np.array([scores[0] for _, scores in runs]),
                "drop": np.array([score_at(steps, scores, drop_step) - scores[0] for steps, scores in runs]),
                "lowest": np.array([lowest_online(steps, scores, lowest_until) for steps, scores in runs]),
                "final": np.array([scores[-1] for _, scores in runs]),
                "online_mean": np.array([scores[1:].mean() if len(scores) > 1 else scores[0] for _, scores in runs]),
                "auc": np.array([area_under_curve(steps, scores) for steps, scores in runs]),
            }
        )
        rows[-1]["dip"] = rows[-1]["lowest"] - rows[-1]["start"]
    return rows


def plot_groups(algorithms: list[str], baselines: list[str]) -> list[list[str]]:
    """One row of panels per METHOD=BASE pair (method beside its baseline), the other algorithms in a last row."""
    pairs = [[name for name in pair.split("=") if name in algorithms] for pair in baselines]
    groups = [pair for pair in pairs if pair]
    rest = [name for name in algorithms if not any(name in group for group in groups)]
    return groups + ([rest] if rest else [])


def plot(curves, path: Path, baselines: list[str] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({dataset for _, dataset in curves})
    groups = plot_groups(sorted({algorithm for algorithm, _ in curves}), list(baselines))
    shape = (len(groups), len(datasets))
    fig, axes = plt.subplots(*shape, figsize=(4.5 * shape[1], 3.2 * shape[0]), squeeze=False, sharex=True)
    for row, group in zip(axes, groups, strict=True):
        for ax, dataset in zip(row, datasets, strict=True):
            for algorithm in group:
                seeds = curves.get((algorithm, dataset))
                if not seeds:
                    continue
                grid = np.unique(np.concatenate([steps for steps, _ in seeds.values()]))
                values = np.stack([np.interp(grid, steps, scores) for steps, scores in seeds.values()])
                mean, std = values.mean(0), values.std(0)
                ax.plot(grid, mean, label=f"{algorithm} ({len(seeds)} seeds)")
                ax.fill_between(grid, mean - std, mean + std, alpha=0.25)
            ax.set_title(dataset, fontsize=9)
            ax.set_ylabel("normalized score (D4RL refs)", fontsize=8)
            if ax.has_data():
                ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("online environment steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SEED_COLUMNS = {
    "start": "hand-over",
    "lowest": "lowest online evaluation",
    "final": "final",
    "online_mean": "online mean",
}


def seed_table(method: dict, base: dict) -> list[str]:
    """Each seed's hand-over, lowest online evaluation, final score and mean of the online evaluations, both arms."""
    arms = f"{method['algorithm']} / {base['algorithm']}"
    lines = ["| seed | " + " | ".join(f"{name}: {arms}" for name in SEED_COLUMNS.values()) + " |"]
    lines += ["| ---: |" + " ---: |" * len(SEED_COLUMNS)]
    for i, seed in enumerate(method["seeds"]):
        cells = [f"{method[key][i]:.1f} / {base[key][i]:.1f}" for key in SEED_COLUMNS]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines


def on_seeds(row: dict, seeds: list[int]) -> dict:
    """The row restricted to `seeds`: every per-seed array indexed alike."""
    index = [row["seeds"].index(seed) for seed in seeds]
    return {key: value[index] if isinstance(value, np.ndarray) else value for key, value in row.items()} | {
        "seeds": list(seeds)
    }


def difference(method: dict, base: dict, key: str, paired: bool) -> str:
    """Mean of method minus base with its 95% bootstrap interval: paired, the per-seed differences (seeds resampled
    jointly); else each arm's seeds resampled apart."""
    a, b = method[key], base[key]
    if paired:
        low, high = bootstrap(lambda resampled: resampled[0].mean(1), [a - b])
    else:
        low, high = bootstrap(lambda resampled: resampled[0].mean(1) - resampled[1].mean(1), [a, b])
    return f"{SEED_COLUMNS.get(key, key)} {a.mean() - b.mean():+.1f} [{low:+.1f}, {high:+.1f}]"


def markdown(
    rows: list[dict],
    command: str,
    incomplete: list[str],
    baselines: list[str],
    drop_step: float,
    paired: bool = False,
    lowest_until: float | None = None,
) -> str:
    pm = lambda x: f"{x.mean():.1f} ± {x.std():.1f}"
    lines = [
        "# Learning results",
        "",
        f"Sweep command: `{command}`" if command else "Sweep command: not recorded",
        "",
        "Normalized score with D4RL reference returns on Minari data: NOT comparable with the papers' tables.",
        "",
        f"| algorithm | dataset | seeds | online steps | hand-over | drop at {int(drop_step)} | deepest dip | final "
        "| mean of online evaluations | mean over online phase (AUC) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    # a run shorter than drop_step has its drop at its last evaluation: the cell says so
    shorter = lambda r: f" (at {r['budget']}: the run's end)" if r["budget"] < drop_step else ""
    lines += [
        f"| {r['algorithm']} | {r['dataset']} | {len(r['seeds'])} | {r['budget']} | {pm(r['start'])} "
        f"| {pm(r['drop'])}{shorter(r)} | {pm(r['dip'])} | {pm(r['final'])} | {pm(r['online_mean'])} | {pm(r['auc'])} |"
        for r in rows
    ]
    if lowest_until is not None:
        until = f"the evaluations up to online step {int(lowest_until)} (a run with none: its first online one)"
        lines += ["", f"Deepest dip and lowest online evaluation: {until}."]
    if incomplete:
        lines += ["", f"Incomplete runs, counted nowhere: {', '.join(incomplete)}."]
    lines += ["", "Aggregate over datasets, final score: IQM [95% stratified bootstrap CI, 50,000 resamples]", ""]
    for algorithm in sorted({r["algorithm"] for r in rows}):
        mine = [r for r in rows if r["algorithm"] == algorithm]
        k = min(len(r["seeds"]) for r in mine)  # equal seed counts, so that no dataset weighs more
        left_out = [f"{r['dataset']} seeds {r['seeds'][k:]}" for r in mine if len(r["seeds"]) > k]
        per_dataset = [r["final"][:k] for r in mine]
        low, high = bootstrap_iqm(per_dataset)
        lines.append(
            f"- {algorithm}: {iqm(np.concatenate(per_dataset)):.1f} [{low:.1f}, {high:.1f}] over {len(mine)} "
            f"datasets x {k} seeds" + (f" (left out: {'; '.join(left_out)})" if left_out else "")
        )
    by_key = {(r["algorithm"], r["dataset"]): r for r in rows}
    for pair in baselines:
        method, base = pair.split("=")
        shared = [d for d in sorted({r["dataset"] for r in rows}) if (method, d) in by_key and (base, d) in by_key]
        if not shared:
            continue  # a pair of a protocol piece not run yet
        arms = {}  # paired: every arm from one starting point per seed, differences per seed on the seeds both ran
        for dataset in shared:
            mine, theirs = by_key[(method, dataset)], by_key[(base, dataset)]
            both = [seed for seed in mine["seeds"] if seed in theirs["seeds"]]
            if paired and both:
                arms[dataset] = on_seeds(mine, both), on_seeds(theirs, both)
            elif not paired:
                arms[dataset] = mine, theirs
        kind = "paired by seed, mean [95% bootstrap CI]" if paired else "mean [95% bootstrap CI over seeds]"
        lines += ["", f"{method} minus {base} per dataset, {kind}:", ""]
        keys = ("final", "lowest", "online_mean") if paired else ("final", "dip", "online_mean")
        for dataset, (mine, theirs) in arms.items():
            label = f"{dataset} (seeds {' '.join(map(str, mine['seeds']))})" if paired else dataset
            lines.append(f"- {label}: {'; '.join(difference(mine, theirs, key, paired) for key in keys)}")
        if paired or all(mine["seeds"] == theirs["seeds"] for mine, theirs in arms.values()):
            for dataset, (mine, theirs) in arms.items():
                lines += ["", f"{method} and {base} on {dataset}, per seed:", ""]
                lines += seed_table(mine, theirs)
    return "\n".join(lines) + "\n\n![curves](curves.png)\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and curves.png")
    parser.add_argument("--command", default="", help="the sweep command, recorded in the report")
    parser.add_argument("--drop-step", type=float, default=10_000, help="online step of the drop figure")
    parser.add_argument("--baseline", action="append", default=[], metavar="METHOD=BASE", help="method minus baseline")
    parser.add_argument("--paired", action="store_true", help="differences per seed where both ran the same seeds")
    parser.add_argument("--lowest-until", type=float, default=None, help="lowest evaluation and dip up to this step")
    parser.add_argument("--only", nargs="+", default=None, metavar="ALGORITHM", help="only these algorithm folders")
    args = parser.parse_args(argv)
    for pair in args.baseline:
        if pair.count("=") != 1:
            raise SystemExit(f"error: --baseline {pair}: write METHOD=BASE, e.g. opt=td3")
    curves, incomplete = collect(args.sweep_dir, args.only)
    if not curves:
        raise SystemExit(f"error: no complete {TAG} logs under {args.sweep_dir}/<algorithm>/<dataset>/seed<N>/")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = summarise(curves, args.drop_step, args.lowest_until)
    text = markdown(rows, args.command, incomplete, args.baseline, args.drop_step, args.paired, args.lowest_until)
    (args.out / "report.md").write_text(text)
    plot(curves, args.out / "curves.png", args.baseline)
    print(f"wrote {args.out / 'report.md'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
