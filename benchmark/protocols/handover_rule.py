"""Round 2's hand-over rule (benchmark/protocols/cpu.md): an offline phase whose last evaluation is below 60 goes on
in blocks of 2.5k updates until a block's last evaluation reaches 60, at most to 20k updates.

    python benchmark/protocols/handover_rule.py keep runs/protocol-cpu-offline/enoto-strong/*/seed2 &  # while it runs
    python benchmark/protocols/handover_rule.py apply runs/protocol-cpu-offline/enoto-strong/*/seed2  # after it

The scripts cannot lengthen a finished run (--resume refuses a run with final.pt), and a finished run has removed its
checkpoint.pt. `keep` hard-links every checkpoint.pt written under the folders (the scripts write each atomically, a
new file each time) into the run's kept/ folder as checkpoint-<step>.pt, the newest three per run. Give both the
folders of the seeds one sweep runs: another sweep's runs are its own keeper's and `apply`'s. `apply` reads
each finished run's last `offline/normalized_score`; below the threshold, it puts the newest kept checkpoint at or
before that step back as checkpoint.pt with `offline_steps` one block further (args.json too), removes final.pt and
offline.pt, and resumes the run (`<script> --resume RUN`), keeping its checkpoints meanwhile, until the rule holds.
Resuming is bit-exact and nothing in an offline phase depends on its budget but the loop's end, so the result is the
run launched with that --offline-steps from the start; the updates after the kept checkpoint are made again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmark.diagnostics.offline_curves import offline_scores
from utils.checkpoint import atomic_save

REPO = Path(__file__).resolve().parents[2]
KEPT = 3  # checkpoints kept per run: the newest at or before the last step is one of them


def kept_checkpoints(run: Path) -> dict[int, Path]:
    return {int(path.stem.split("-")[1]): path for path in (run / "kept").glob("checkpoint-*.pt")}


def keep_once(folders: list[Path], seen: set[tuple[int, int]]) -> None:
    """Link each checkpoint.pt under `folders` not linked yet into its run's kept/ and drop the oldest beyond KEPT."""
    for checkpoint in (path for folder in folders for path in folder.glob("**/checkpoint.pt")):
        kept = checkpoint.parent / "kept"
        try:
            stat = checkpoint.stat()
            version = (stat.st_ino, stat.st_mtime_ns)  # a pruned link frees its inode for a later checkpoint
            if version in seen:
                continue
            kept.mkdir(exist_ok=True)
            link = kept / f"link-{stat.st_ino}.pt"
            os.link(checkpoint, link)  # the file stays when the run replaces or removes checkpoint.pt
        except OSError:
            continue  # replaced or removed meanwhile: the next one is linked
        seen.add(version)
        try:
            step = torch.load(link, map_location="cpu", weights_only=False)["step"]
            link.rename(kept / f"checkpoint-{step}.pt")
            for old in sorted(kept_checkpoints(checkpoint.parent))[:-KEPT]:
                (kept / f"checkpoint-{old}.pt").unlink(missing_ok=True)
        except Exception:  # a file that is not a checkpoint, or one removed by hand meanwhile: a keeper lives on
            link.unlink(missing_ok=True)


def keep(folders: list[Path], stop: threading.Event, interval: float) -> None:
    seen: set[tuple[int, int]] = set()
    while not stop.is_set():
        keep_once(folders, seen)
        stop.wait(interval)
    keep_once(folders, seen)


def extend(run: Path, done: int, steps: int) -> tuple[Path, str]:
    """Put the newest kept checkpoint at or before `done` (the run's last step) back, with `steps` offline updates;
    returns it and the run's algorithm."""
    kept = {step: path for step, path in kept_checkpoints(run).items() if step <= done}
    if not kept:
        raise SystemExit(
            f"error: {run} has no kept checkpoint at or before step {done} (its sweep ran without `keep`): delete "
            "that run and run the piece again, which makes it again with the keeper on"
        )
    checkpoint = torch.load(kept[max(kept)], map_location="cpu", weights_only=False)
    checkpoint["args"]["offline_steps"] = steps
    atomic_save(checkpoint, run / "checkpoint.pt")
    args = json.loads((run / "args.json").read_text())
    (run / "args.json.tmp").write_text(json.dumps({**args, "offline_steps": steps}, indent=2))
    os.replace(run / "args.json.tmp", run / "args.json")
    for name in ("final.pt", "offline.pt"):
        (run / name).unlink(missing_ok=True)
    return kept[max(kept)], checkpoint["algorithm"]


def apply(folders: list[Path], threshold: float, block: int, most: int, interval: float) -> list[str]:
    """Extend and resume every finished run under `folders` until the rule holds; one line per run."""
    lines = []
    for final in sorted(path for folder in folders for path in folder.glob("**/final.pt")):
        run = final.parent
        while True:
            scores = offline_scores(run)
            if not scores:
                raise SystemExit(f"error: {run} logged no offline/normalized_score: not an offline phase of round 2")
            step, score = scores[-1]
            if score >= threshold or step >= most:
                lines.append(f"{run}: hand-over at {step} updates, last evaluation {score:.1f}")
                break
            source, algorithm = extend(run, step, min(step + block, most))
            print(f"{run}: {score:.1f} at {step} < {threshold:g}: on to {min(step + block, most)} from {source.name}")
            stop = threading.Event()
            keeper = threading.Thread(target=keep, args=([run], stop, interval))
            keeper.start()
            try:
                command = [sys.executable, str(REPO / "algorithms" / f"{algorithm}.py"), "--resume", str(run)]
                if subprocess.run([*command, "--no-progress"]).returncode != 0:
                    raise SystemExit(
                        f"error: {' '.join(command)} failed; run the piece again: its sweep resumes the run, then "
                        "the rule is applied to it again"
                    )
            finally:
                stop.set()
                keeper.join()
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("keep", "apply"))
    parser.add_argument("folders", type=Path, nargs="+", help="the seed folders of an offline sweep (or runs)")
    parser.add_argument("--threshold", type=float, default=60.0)
    parser.add_argument("--block", type=int, default=2500, help="updates added per extension")
    parser.add_argument("--most", type=int, default=20000, help="no extension beyond this many updates")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between two looks for checkpoints")
    args = parser.parse_args(argv)
    if args.action == "keep":
        keep(args.folders, threading.Event(), args.interval)  # until killed
    for line in apply(args.folders, args.threshold, args.block, args.most, args.interval):
        print(line)


if __name__ == "__main__":
    main()
