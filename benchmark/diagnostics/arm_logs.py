"""What the logs of compared arms say about the cause: per arm and dataset, seed means of Q diagnostics at the
hand-over and over the online phase (issue #34's "offline share, Q bias and rank tau at the switch, mean Q").

    python benchmark/diagnostics/arm_logs.py --sweep-dir benchmark/results/protocol-cpu/online \\
        --arms so2-rerun so2-no-pvu so2-upc1 --out benchmark/results/protocol-cpu/so2-ablation/logs.md

Reads <sweep-dir>/<arm>/<dataset>/seed<N>/<run>/events.*; one row per arm and dataset (the seed means), and with
--per-seed a second table with one row per seed. Columns: eval/q_bias and eval/q_rank_tau at step 0
(the hand-over) and their mean over the online evaluations after it; the means over the online phase of
losses/qf_values (the critics' mean Q on training batches) and charts/offline_share (offline rows in the batches).
A tag a run does not log is left blank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

COLUMNS = (
    ("eval/q_bias", "first", "Q bias at hand-over"),
    ("eval/q_bias", "online", "Q bias online"),
    ("eval/q_rank_tau", "first", "rank tau at hand-over"),
    ("eval/q_rank_tau", "online", "rank tau online"),
    ("losses/qf_values", "all", "mean Q (batches)"),
    ("charts/offline_share", "all", "offline share"),
)


def run_values(run_dir: Path) -> dict[str, float]:
    """The COLUMNS of one run (its newest event file's folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    tags, values = events.Tags()["scalars"], {}
    for tag, which, name in COLUMNS:
        if tag not in tags:
            continue
        points = [(s.step, s.value) for s in events.Scalars(tag)]
        if which == "first":
            values[name] = points[0][1] if points[0][0] == 0 else np.nan
        elif which == "online":
            values[name] = float(np.mean([v for step, v in points if step > 0]))
        else:
            values[name] = float(np.mean([v for _, v in points]))
    return values


def table(sweep_dir: Path, arms: list[str], per_seed: bool = False) -> str:
    names = [name for _, _, name in COLUMNS]
    first = "seed" if per_seed else "seeds"
    lines = [
        f"| arm | dataset | {first} | " + " | ".join(names) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(names),
    ]
    for arm in arms:
        for dataset_dir in sorted((sweep_dir / arm).glob("*")):
            runs = sorted({p.parent for p in dataset_dir.glob("seed*/*/events.out.tfevents.*")})
            groups = (
                [(run.parent.name.removeprefix("seed"), [run]) for run in runs] if per_seed else [(len(runs), runs)]
            )
            for label, group in groups if runs else []:
                per_run = [run_values(run) for run in group]
                cells = []
                for name in names:
                    found = [values[name] for values in per_run if name in values]
                    cells.append(f"{np.nanmean(found):.3f}" if found else "")
                lines.append(f"| {arm} | {dataset_dir.name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-dir", type=Path, required=True)
    parser.add_argument("--arms", nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--per-seed", action="store_true", help="also a table with one row per seed")
    args = parser.parse_args(argv)
    text = "Seed means:\n\n" + table(args.sweep_dir, args.arms)
    if args.per_seed:
        text += "\nPer seed:\n\n" + table(args.sweep_dir, args.arms, per_seed=True)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        flags = f"--sweep-dir {args.sweep_dir} --arms {' '.join(args.arms)}{' --per-seed' if args.per_seed else ''}"
        args.out.write_text(f"Command: python benchmark/diagnostics/arm_logs.py {flags}\n\n{text}")


if __name__ == "__main__":
    main()
