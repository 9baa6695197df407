"""Every seed's offline evaluations up to its hand-over: what the online phase started from, and how far the
offline curve moved around that point (a hand-over taken at a high point of an oscillating curve can fall back
whatever the online algorithm does).

    python benchmark/diagnostics/offline_curves.py --sweep-dir benchmark/results/protocol-cpu/offline \\
        --labels enoto-strong cql2-strong --out benchmark/results/protocol-cpu/strong/offline.md

Reads <sweep-dir>/<label>/<dataset>/seed<N>/<run>/events.* (offline/normalized_score); one row per label, dataset
and run: the offline updates done, the hand-over (the last evaluation), the range of the evaluations before it,
every evaluation as step: score, and the run folder (a seed may hold more than one).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def offline_scores(run_dir: Path) -> list[tuple[int, float]]:
    """(update, normalized score) of every offline evaluation of a run, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    if "offline/normalized_score" not in events.Tags()["scalars"]:
        return []
    by_step = {event.step: event.value for event in events.Scalars("offline/normalized_score")}  # the last one logged
    return sorted(by_step.items())


def steps_label(step: int) -> str:
    return f"{step / 1000:g}k" if step % 100 == 0 and step >= 1000 else str(step)


def table(sweep_dir: Path, labels: list[str]) -> str:
    lines = [
        "| label | dataset | seed | updates | hand-over | earlier evaluations: min - max | evaluations | run |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for label in labels:
        for run in sorted({p.parent for p in (sweep_dir / label).glob("*/seed*/*/events.out.tfevents.*")}):
            seed, dataset = run.parent.name.removeprefix("seed"), run.parent.parent.name
            scores = offline_scores(run)
            if not scores:
                lines.append(f"| {label} | {dataset} | {seed} |  |  |  | no offline evaluation | {run.name} |")
                continue
            earlier = [score for _, score in scores[:-1]]
            spread = f"{min(earlier):.1f} - {max(earlier):.1f}" if earlier else ""
            curve = ", ".join(f"{steps_label(step)}: {score:.1f}" for step, score in scores)
            (last_step, last_score) = scores[-1]
            row = f"| {label} | {dataset} | {seed} | {last_step} | {last_score:.1f} | {spread} | {curve} | {run.name} |"
            lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-dir", type=Path, required=True, help="the offline runs' results tree")
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=None, help="write the table here (else print it)")
    args = parser.parse_args(argv)
    labels = " ".join(args.labels)
    command = f"python benchmark/diagnostics/offline_curves.py --sweep-dir {args.sweep_dir} --labels {labels}"
    text = f"Command: {command}\n\n{table(args.sweep_dir, args.labels)}\n"
    if args.out is None:
        print(text, end="")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
