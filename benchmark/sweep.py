"""Run algorithms x datasets x seeds, locally with a process pool or on a Ray cluster; resumable.

    python benchmark/sweep.py --algorithms so2 --datasets hopper-random walker2d-random --seeds 0 1 2 \\
        --sweep-dir runs/sweep-random --workers 2 -- --offline-steps 100000 --online-steps 20000
    python benchmark/sweep.py ... --dry-run                      # print the commands only
    python benchmark/sweep.py ... --ray-address auto            # on a Ray cluster (ray start --head ...)

Everything after `--` is passed to every run, with `{dataset}` and `{seed}` replaced by the run's; an
argument holding `*` is a glob resolved when the run starts (it must match one file), so a method sweep can
start from the offline sweep's checkpoints:

    python benchmark/sweep.py --algorithms opt --label td3 ... -- \
        --pretrained "runs/offline/opt/{dataset}/seed{seed}/*/offline.pt" --no-new-critic ...

Run (algorithm, dataset, seed) writes into <sweep-dir>/<label or algorithm>/<dataset>/seed<seed>/; a run with a
final.pt there is finished and skipped, and one with a checkpoint.pt (killed, preempted, crashed) continues with
`--resume`, so a sweep can be started again after an interruption and loses at most the steps since each run's last
checkpoint. A failed run is retried once (resumed where it can be), then reported in <sweep-dir>/failures.json
(merged with other sweeps' records there); it never stops the sweep. Each attempt's command and output are in
attempt<k>.log.
Locally, --workers runs share each GPU (CUDA_VISIBLE_DEVICES is set round-robin) or the CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    algorithm: str
    dataset: str
    seed: int
    run_dir: Path
    command: tuple[str, ...]
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.label or self.algorithm}/{self.dataset}/seed{self.seed}"

    def finished(self) -> bool:
        return any(self.run_dir.glob("*/final.pt"))

    def resume_command(self) -> tuple[str, ...] | None:
        """`script --resume <run>` for the newest interrupted run (a checkpoint.pt, no final.pt), else None."""
        checkpoints = sorted(self.run_dir.glob("*/checkpoint.pt"), key=lambda path: path.stat().st_mtime)
        if not checkpoints:
            return None
        return (*self.command[:2], "--resume", str(checkpoints[-1].parent), "--no-progress")


def plan(
    algorithms, datasets, seeds, sweep_dir: Path, extra: list[str], script_dir: Path = REPO / "algorithms", label=None
):
    if label and len(algorithms) > 1:
        raise SystemExit("error: --label names the runs of ONE algorithm; run one sweep per labelled algorithm")
    runs = []
    for algorithm in algorithms:
        script = script_dir / f"{algorithm}.py"
        if not script.is_file():
            raise SystemExit(f"error: no script {script}; available: {sorted(p.stem for p in script_dir.glob('*.py'))}")
        for dataset in datasets:
            for seed in seeds:
                name = label or algorithm
                run_dir = sweep_dir / name / dataset.replace("/", "_") / f"seed{seed}"
                command = (
                    sys.executable,
                    str(script),
                    "--env-id",
                    dataset,
                    "--seed",
                    str(seed),
                    "--exp-name",
                    name,
                    "--run-dir",
                    str(run_dir),
                    "--no-progress",
                    *(arg.format(dataset=dataset.replace("/", "_"), seed=seed) for arg in extra),
                )
                runs.append(Run(algorithm, dataset, seed, run_dir, command, label or ""))
    return runs


def collected(run: Run, results: Path | None) -> bool:
    """True when `results` already holds the run's events and args.json (copied there when it finished)."""
    folder = None if results is None else results / run.run_dir.relative_to(run.run_dir.parents[2])
    return folder is not None and any(folder.glob("*/args.json"))


def resolve_globs(command: tuple[str, ...]) -> tuple[str, ...]:
    """Each argument holding `*` replaced by the one path it matches now; SystemExit if it matches none or several."""
    resolved = []
    for arg in command:
        if "*" in arg:
            matches = sorted(glob.glob(os.path.abspath(arg)))  # relative to where the sweep started
            if len(matches) != 1:
                raise SystemExit(f"error: {arg} matches {len(matches)} files, not one: finish or clean that sweep")
            arg = str(matches[0])
        resolved.append(arg)
    return tuple(resolved)


def run_with_retry(run: Run, env: dict[str, str] | None = None, attempts: int = 2, cwd: Path = REPO) -> tuple[Run, int]:
    """Run the command, once more if it fails; returns the last exit code. Output goes to attempt<k>.log."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    code = 1
    for attempt in range(1, attempts + 1):
        with open(run.run_dir / f"attempt{attempt}.log", "w") as log:
            try:
                command = run.resume_command() or resolve_globs(run.command)  # an interrupted run continues
                log.write(f"$ {' '.join(command)}\n")
                log.flush()
            except SystemExit as error:
                log.write(f"{error}\n")
                code = 2
                continue
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        if code == 0:
            break
    return run, code


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def run_local(runs: list[Run], workers: int) -> dict[str, int]:
    gpus = gpu_count()
    slots = max(gpus, 1)
    with ThreadPoolExecutor(max_workers=workers * slots) as pool:
        futures = []
        for index, run in enumerate(runs):
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(index % slots)
            futures.append(pool.submit(run_with_retry, run, env))
        return {run.name: code for run, code in (future.result() for future in futures)}


def on_worker(run: Run) -> tuple[Run, int]:
    """A Ray task: the run with this worker's Python, from its copy of the repository (the runtime_env's
    working_dir, the task's current folder), so no node needs the driver's checkout or interpreter path."""
    script = Path(run.command[1])
    if script.is_relative_to(REPO):  # a script of this repository: the worker's copy of it
        script = Path.cwd() / script.relative_to(REPO)
    command = (sys.executable, str(script), *run.command[2:])
    return run_with_retry(Run(run.algorithm, run.dataset, run.seed, run.run_dir, command, run.label), cwd=Path.cwd())


def ray_gpus_per_run(cluster_gpus: float, requested: float | None, address: str) -> float:
    """--gpus-per-run, or 0.25 where the cluster has GPUs and 0 where it has none; a request no node can meet is
    refused here, since Ray would keep such tasks pending forever."""
    gpus = requested if requested is not None else (0.25 if cluster_gpus else 0.0)
    if gpus > 0 and cluster_gpus == 0:
        raise SystemExit(
            f"error: the Ray cluster at {address} has no GPU, so tasks asking for --gpus-per-run {gpus} would wait "
            "forever; pass --gpus-per-run 0 to run on its CPUs, or start the GPU nodes first"
        )
    return gpus


def run_ray(runs: list[Run], address: str, gpus_per_run: float | None) -> dict[str, int]:
    """Each run a Ray task of one CPU (and a GPU share); the code travels to the workers as the runtime_env's
    working_dir. The runs write into their --sweep-dir paths: on several nodes that folder must be on a file
    system they all mount (NFS ...), or each run's files stay on the node that ran it."""
    try:
        import ray
    except ImportError:
        raise SystemExit("error: --ray-address needs Ray: pip install 'ray[default]'") from None
    excludes = ["runs/", ".git/", "*.pt", "benchmark/results/", "__pycache__/"]
    ray.init(address=address, runtime_env={"working_dir": str(REPO), "excludes": excludes})
    try:
        gpus = ray_gpus_per_run(ray.cluster_resources().get("GPU", 0.0), gpus_per_run, address)
        remote = ray.remote(num_gpus=gpus, num_cpus=1)(on_worker)
        results = ray.get([remote.remote(run) for run in runs])
    finally:
        ray.shutdown()
    return {run.name: code for run, code in results}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", required=True)
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--label", default=None, help="folder and --exp-name of the runs (e.g. td3 for a baseline)")
    parser.add_argument("--sweep-dir", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1, help="concurrent runs per GPU (or on the CPU)")
    parser.add_argument("--ray-address", default=None, help="run each run as a Ray task on this cluster")
    parser.add_argument(
        "--gpus-per-run", type=float, default=None, help="GPU share of a Ray task (default 0.25 with GPUs, else 0)"
    )
    parser.add_argument(
        "--collected", type=Path, default=None,
        help="a results tree (<label>/<dataset>/seed<N>/<run>/args.json) whose runs count as finished (a new machine)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--script-dir", type=Path, default=REPO / "algorithms", help=argparse.SUPPRESS)
    args = parser.parse_args(own)
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    sweep_dir = args.sweep_dir.resolve()
    runs = plan(args.algorithms, args.datasets, args.seeds, sweep_dir, extra, args.script_dir, args.label)
    todo = [run for run in runs if not run.finished() and not collected(run, args.collected)]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished (final.pt or collected), {len(todo)} to run")
    if args.dry_run:
        for run in todo:
            print(" ".join(run.command))
        return 0
    codes = run_ray(todo, args.ray_address, args.gpus_per_run) if args.ray_address else run_local(todo, args.workers)
    failures = {name: code for name, code in codes.items() if code != 0}
    args.sweep_dir.mkdir(parents=True, exist_ok=True)
    # merged, not replaced: another sweep's runs (other labels or seeds, maybe running beside this one) keep their
    # records; this sweep's own runs are listed only if they failed now
    record, planned = args.sweep_dir / "failures.json", {run.name for run in runs}
    earlier = json.loads(record.read_text()) if record.is_file() else {}
    merged = {name: code for name, code in earlier.items() if name not in planned} | failures
    record.write_text(json.dumps(merged, indent=2))
    for name, code in failures.items():
        print(f"FAILED twice: {name} (exit {code}); see {args.sweep_dir / name}/attempt2.log")
    print(f"{len(codes) - len(failures)} runs succeeded, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
