"""benchmark/: the report on synthetic logs, the sweep's resume and retry, the speed script."""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from benchmark import report, sweep
from tests.conftest import REPO, run_cli

CURVES = {  # (algorithm, dataset, seed) -> scores at online steps 0, 50, 100
    ("algo_a", "hopper-x", 0): [10.0, 20.0, 40.0],
    ("algo_a", "hopper-x", 1): [14.0, 30.0, 60.0],
    ("algo_a", "walker-y", 0): [0.0, 0.0, 100.0],
    ("algo_b", "hopper-x", 0): [5.0, 5.0, 5.0],
}


@pytest.fixture
def sweep_logs(tmp_path):
    for (algorithm, dataset, seed), scores in CURVES.items():
        writer = SummaryWriter(str(tmp_path / algorithm / dataset / f"seed{seed}" / "run"))
        for step, score in zip((0, 50, 100), scores, strict=True):
            writer.add_scalar("eval/normalized_score", score, step)
        writer.close()
    return tmp_path


def test_report_numbers(sweep_logs, tmp_path):
    out = tmp_path / "out"
    command = ["--sweep-dir", str(sweep_logs), "--out", str(out), "--command", "python benchmark/sweep.py x"]
    report.main([*command, "--drop-step", "50"])
    text = (out / "report.md").read_text()
    # hopper-x, algo_a: start 10, 14 -> 12 +- 2; drop at 50: 10, 16 -> 13 +- 3; final 40, 60 -> 50 +- 10;
    # deepest dip (lowest online evaluation - hand-over): 10, 16 -> 13 +- 3 (here the evaluations at 50);
    # mean of the online evaluations: 30, 45 -> 37.5 +- 7.5;
    # AUC = trapezoids / 100: seed0 (15*50 + 30*50)/100 = 22.5, seed1 (22*50 + 45*50)/100 = 33.5 -> 28 +- 5.5
    assert (
        "| algo_a | hopper-x | 2 | 100 | 12.0 ± 2.0 | 13.0 ± 3.0 | 13.0 ± 3.0 | 50.0 ± 10.0 | 37.5 ± 7.5 | 28.0 ± 5.5 |"
    ) in text
    assert (
        "| algo_a | walker-y | 1 | 100 | 0.0 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 | 100.0 ± 0.0 | 50.0 ± 0.0 | 25.0 ± 0.0 |"
    ) in text
    assert (
        "| algo_b | hopper-x | 1 | 100 | 5.0 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 | 5.0 ± 0.0 | 5.0 ± 0.0 | 5.0 ± 0.0 |"
    ) in text
    assert "python benchmark/sweep.py x" in text
    assert "- algo_b: 5.0 [5.0, 5.0] over 1 datasets x 1 seeds" in text
    # equal seed counts: algo_a uses seed 0 of both datasets, finals 40 and 100 -> IQM 70 (n = 2 trims nothing)
    assert "- algo_a: 70.0 [" in text and "over 2 datasets x 1 seeds (left out: hopper-x seeds [1])" in text
    assert (out / "curves.png").stat().st_size > 1000


def test_curves_put_each_method_beside_its_baseline():
    algorithms = ["baq", "iql", "opt", "so2", "td3"]
    # pairs in their --baseline order, one row each; what no pair names shares a last row; a pair whose
    # algorithms have no runs (a piece not run yet) gets no row
    assert report.plot_groups(algorithms, ["opt=td3", "baq=iql", "enoto=cql-sac"]) == [
        ["opt", "td3"],
        ["baq", "iql"],
        ["so2"],
    ]
    assert report.plot_groups(algorithms, []) == [algorithms]


def test_iqm_and_bootstrap():
    assert report.iqm(np.arange(1.0, 9.0)) == 4.5  # drops 1, 2 and 7, 8
    assert report.iqm(np.array([100.0, 1.0, 2.0, 3.0])) == 2.5
    assert report.bootstrap_iqm([np.full(5, 3.0)], samples=200) == (3.0, 3.0)  # nothing to vary
    # Resampling is within each dataset: every resample holds four 1s and four 9s, whose IQM is exactly 5;
    # pooled resampling would vary the mix and widen the interval.
    assert report.bootstrap_iqm([np.full(4, 1.0), np.full(4, 9.0)], samples=200) == (5.0, 5.0)
    low, high = report.bootstrap_iqm([np.arange(10.0), np.arange(10.0) + 5], samples=500)
    assert 0 < high - low < 5  # a spread of seeds gives a real, bounded interval


def test_report_without_logs_is_a_clear_error(tmp_path):
    result = run_cli([str(REPO / "benchmark/report.py"), "--sweep-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.returncode != 0 and "error: no complete eval/normalized_score logs" in result.stderr


def test_report_counts_complete_runs_only_and_compares_with_a_baseline(tmp_path, capsys):
    """Final = the evaluation AT the budget of args.json; short or failed runs are listed, not counted."""
    runs = {  # (algorithm, seed) -> scores at steps 0, 50, 100 (fewer: the run stopped early)
        ("method", 0): [10.0, 20.0, 30.0],
        ("method", 1): [10.0, 20.0],  # stopped at 50 of 100
        ("method", 2): [0.0, 0.0, 0.0],  # finished, but listed as failed
        ("base", 0): [10.0, 10.0, 10.0],
    }
    for (algorithm, seed), scores in runs.items():
        run = tmp_path / algorithm / "hopper-z" / f"seed{seed}" / "run"
        writer = SummaryWriter(str(run))
        for step, score in zip((0, 50, 100), scores, strict=False):
            writer.add_scalar("eval/normalized_score", score, step)
        writer.close()
        (run / "args.json").write_text(json.dumps({"online_steps": 100}))
    (tmp_path / "failures.json").write_text(json.dumps({"method/hopper-z/seed2": 1}))
    (tmp_path / "method" / "hopper-z" / "seed_old").mkdir()  # a stray folder
    out = tmp_path / "out"
    report.main(["--sweep-dir", str(tmp_path), "--out", str(out), "--baseline", "method=base"])
    text = (out / "report.md").read_text()
    # seed 0; the 100-step runs are shorter than the default drop step (10k): the drop cell says where it is taken
    row = "| method | hopper-z | 1 | 100 | 10.0 ± 0.0 | 20.0 ± 0.0 (at 100: the run's end) | 10.0 ± 0.0 | 30.0 ± 0.0 |"
    assert row in text
    assert "method/hopper-z/seed1 (last evaluation at 50 of 100)" in text and "method/hopper-z/seed2" in text
    assert "- hopper-z: final +20.0 [+20.0, +20.0]; dip +10.0 [+10.0, +10.0]" in text  # one seed: zero width
    assert "warning: skipping" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="write METHOD=BASE"):
        report.main(["--sweep-dir", str(tmp_path), "--out", str(out), "--baseline", "method"])


FAKE_SCRIPT = """
import pathlib, sys
args = sys.argv
run_dir = pathlib.Path(args[args.index("--run-dir") + 1])
dataset = args[args.index("--env-id") + 1]
counter = run_dir / "calls"
calls = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(calls))
if dataset == "always-fails" or (dataset == "flaky" and calls == 1):
    sys.exit(3)
(run_dir / "run").mkdir(parents=True, exist_ok=True)
(run_dir / "run" / "final.pt").write_text("done")
"""


def calls(sweep_dir, dataset):
    return int((sweep_dir / "fake" / dataset / "seed0" / "calls").read_text())


def test_sweep_retries_once_reports_and_resumes(tmp_path, capsys):
    scripts, sweep_dir = tmp_path / "scripts", tmp_path / "sweep"
    scripts.mkdir()
    (scripts / "fake.py").write_text(FAKE_SCRIPT)
    argv = [
        "--algorithms",
        "fake",
        "--datasets",
        "ok",
        "flaky",
        "always-fails",
        "--seeds",
        "0",
        "--sweep-dir",
        str(sweep_dir),
        "--workers",
        "2",
        "--script-dir",
        str(scripts),
        "--",
        "--offline-steps",
        "5",
    ]
    assert sweep.main(argv) == 1
    assert (calls(sweep_dir, "ok"), calls(sweep_dir, "flaky"), calls(sweep_dir, "always-fails")) == (1, 2, 2)
    assert json.loads((sweep_dir / "failures.json").read_text()) == {"fake/always-fails/seed0": 3}
    assert (sweep_dir / "fake/flaky/seed0/attempt1.log").exists() and (
        sweep_dir / "fake/flaky/seed0/attempt2.log"
    ).exists()

    # a sweep of other runs beside this one (cpu.sh's units) recorded a failure in the same sweep dir
    other = {"fake/always-fails/seed0": 3, "other/hopper-x/seed1": 1, "fake/flaky/seed0": 1}  # flaky's: stale
    (sweep_dir / "failures.json").write_text(json.dumps(other))
    assert sweep.main(argv) == 1  # resumed: finished runs are skipped, the failed one is tried again
    assert (calls(sweep_dir, "ok"), calls(sweep_dir, "flaky"), calls(sweep_dir, "always-fails")) == (1, 2, 4)
    # the other sweep's record stays; this sweep's failure is written again; flaky is finished: its line goes
    expected = {"other/hopper-x/seed1": 1, "fake/always-fails/seed0": 3}
    assert json.loads((sweep_dir / "failures.json").read_text()) == expected
    assert "3 runs, 2 already finished (final.pt or collected), 1 to run" in capsys.readouterr().out


def test_sweep_dry_run_prints_the_commands(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    argv = [
        "--algorithms",
        "so2",
        "--datasets",
        "hopper-random",
        "--seeds",
        "0",
        "1",
        "--sweep-dir",
        str(sweep_dir),
        "--dry-run",
        "--",
        "--offline-steps",
        "100",
    ]
    assert sweep.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "so2.py" in line]
    assert len(lines) == 2 and all("--offline-steps 100" in line and "--no-progress" in line for line in lines)
    assert "--seed 1" in lines[1] and str(sweep_dir / "so2/hopper-random/seed1") in lines[1]
    assert not sweep_dir.exists()


def test_sweep_unknown_algorithm_and_missing_ray(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="no script"):
        sweep.main(["--algorithms", "nope", "--datasets", "x", "--sweep-dir", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(SystemExit, match=r"--ray-address needs Ray"):
        sweep.run_ray([], "auto", 0.25)


def test_speed_has_a_setup_for_every_algorithm_script():
    from benchmark.setups import SETUPS

    scripts = {path.stem for path in (REPO / "algorithms").glob("*.py")} - {"__init__"}
    assert set(SETUPS) == scripts  # a new script joins the speed benchmark with a setup in benchmark/setups.py


@pytest.mark.parametrize(
    "name", sorted(path.stem for path in (REPO / "algorithms").glob("*.py") if path.stem != "__init__")
)
def test_every_speed_setup_runs_with_tiny_networks(name):
    from benchmark.setups import SETUPS

    hooks = SETUPS[name]("hopper", 11, 3, torch.device("cpu"), tiny=True)
    hooks["offline"]()
    hooks["reference"]()
    hooks["hand_over"]()
    hooks.get("act", lambda: None)()
    hooks["online"]()
    for phase in hooks.get("other_phases", {}).values():
        phase()
    assert hooks["label"] and hooks["online_updates"] >= 1


@pytest.mark.slow
def test_speed_script_runs_one_configuration(tmp_path):
    result = run_cli(
        [
            str(REPO / "benchmark/speed.py"),
            "--device",
            "cpu",
            "--algorithms",
            "so2",
            "--configs",
            "halfcheetah",
            "--offline-iterations",
            "2",
            "--online-iterations",
            "1",
            "--out",
            str(tmp_path),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads((tmp_path / "speed_cpu.json").read_text())
    assert measured["torch"] and measured["date"] and measured["device"]
    (row,) = measured["rows"]
    assert row["config"] == "halfcheetah (N=10)"
    for key in (
        "offline_updates_per_s",
        "online_env_steps_per_s",
        "reference_fwd_bwd_per_s",
        "tiny_ms_per_online_step",
    ):
        assert np.isfinite(row[key]) and row[key] > 0
    assert row["online_updates_per_s"] == pytest.approx(10 * row["online_env_steps_per_s"])
    assert "| so2 | halfcheetah (N=10) | eager |" in (tmp_path / "speed_cpu.md").read_text()


def test_speed_keeps_the_rows_that_worked_when_one_setup_fails(tmp_path, monkeypatch):
    """A setup that raises costs its own row: the others are measured and written, the failure is reported in the
    table and the JSON, and the exit status says so."""
    from benchmark import speed

    def broken(*args, **kwargs):
        raise RuntimeError("captured a host sync")

    def cheap(config, obs_dim, act_dim, device, tiny=False, mode="eager", **flags):
        counter = torch.zeros(())
        step = lambda: counter.add_(1)
        return {"label": "cheap", "offline": step, "hand_over": lambda: None, "online": step, "online_updates": 2,
                "reference": step}  # fmt: skip

    monkeypatch.setattr(speed, "SETUPS", {"broken": broken, "cheap": cheap})
    argv = ["--device", "cpu", "--algorithms", "broken", "cheap", "--configs", "hopper", "--out", str(tmp_path)]
    argv += ["--offline-iterations", "2", "--online-iterations", "2", "--tiny-iterations", "2"]
    assert speed.main(argv) == 1
    measured = json.loads((tmp_path / "speed_cpu.json").read_text())
    (row,) = measured["rows"]
    assert row["algorithm"] == "cheap"
    assert row["online_updates_per_s"] == pytest.approx(2 * row["online_env_steps_per_s"])
    (failure,) = measured["failures"]
    assert failure["algorithm"] == "broken" and failure["error"] == "RuntimeError: captured a host sync"
    table = (tmp_path / "speed_cpu.md").read_text()
    assert "| cheap | hopper (cheap) | eager | yes | highest |" in table and "FAILED: broken hopper eager" in table

    assert speed.main([*argv[:3], *argv[4:], "--append", "--matmul", "high"]) == 0  # --append keeps the rows
    rows = json.loads((tmp_path / "speed_cpu.json").read_text())["rows"]
    assert [(row["algorithm"], row["matmul"]) for row in rows] == [("cheap", "highest"), ("cheap", "high")]


def test_sweep_skips_the_runs_whose_results_are_collected(tmp_path):
    """--collected: on a new machine a sweep does not repeat the runs whose events and args.json are committed."""
    scripts, results = tmp_path / "scripts", tmp_path / "results"
    scripts.mkdir()
    (scripts / "fake.py").write_text(FAKE_SCRIPT)
    (results / "base" / "ok" / "seed0" / "run123").mkdir(parents=True)
    (results / "base" / "ok" / "seed0" / "run123" / "args.json").write_text("{}")
    argv = ["--algorithms", "fake", "--label", "base", "--datasets", "ok", "--seeds", "0", "1"]
    argv += ["--sweep-dir", str(tmp_path / "sweep"), "--script-dir", str(scripts), "--collected", str(results)]
    assert sweep.main(argv) == 0
    assert not (tmp_path / "sweep" / "base" / "ok" / "seed0").exists()
    assert (tmp_path / "sweep" / "base" / "ok" / "seed1" / "run" / "final.pt").read_text() == "done"


RESUMABLE_SCRIPT = """
import pathlib, sys, json
args = sys.argv
if "--resume" in args:
    run = pathlib.Path(args[args.index("--resume") + 1])
    (run / "resumed_with").write_text(json.dumps(args[1:]))
    (run / "final.pt").write_text("done")
    sys.exit(0)
run = pathlib.Path(args[args.index("--run-dir") + 1]) / "run"
run.mkdir(parents=True)
(run / "started_with").write_text(json.dumps(args[1:]))
(run / "checkpoint.pt").write_text("state")
sys.exit(9)  # killed after its first checkpoint
"""


def test_sweep_resumes_an_interrupted_run_and_fills_placeholders(tmp_path):
    """A run that died after a checkpoint is retried with --resume; {dataset}, {seed} and globs are filled in;
    --label names the runs' folder and --exp-name."""
    scripts, sweep_dir = tmp_path / "scripts", tmp_path / "sweep"
    scripts.mkdir()
    (scripts / "fake.py").write_text(RESUMABLE_SCRIPT)
    offline = tmp_path / "offline" / "fake" / "hopper-x" / "seed3" / "run123"
    offline.mkdir(parents=True)
    (offline / "offline.pt").write_text("weights")
    pattern = str(tmp_path / "offline" / "fake" / "{dataset}" / "seed{seed}" / "*" / "offline.pt")
    argv = ["--algorithms", "fake", "--label", "base", "--datasets", "hopper-x", "--seeds", "3"]
    argv += ["--sweep-dir", str(sweep_dir), "--script-dir", str(scripts), "--", "--pretrained", pattern]
    assert sweep.main(argv) == 0
    run = sweep_dir / "base" / "hopper-x" / "seed3" / "run"
    started = json.loads((run / "started_with").read_text())
    assert started[started.index("--pretrained") + 1] == str(offline / "offline.pt")
    assert started[started.index("--exp-name") + 1] == "base"
    assert json.loads((run / "resumed_with").read_text()) == ["--resume", str(run), "--no-progress"]
    assert "--resume" in (run.parent / "attempt2.log").read_text()

    (offline.parent / "run456").mkdir()
    (offline.parent / "run456" / "offline.pt").write_text("weights")
    (run / "final.pt").unlink()
    (run / "checkpoint.pt").unlink()
    assert sweep.main(argv) == 1  # two offline.pt now match the pattern: the run fails with a clear line
    assert "matches 2 files, not one" in (run.parent / "attempt1.log").read_text()


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster (head node on 127.0.0.1, 2 CPUs, no GPU), stopped afterwards."""
    pytest.importorskip("ray")
    port = 46379 + os.getpid() % 1000
    start = ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    start += ["--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"]
    started = subprocess.run(start, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    yield f"127.0.0.1:{port}"
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)


def test_ray_sweep_runs_on_a_local_cluster_and_refuses_gpus_it_lacks(tmp_path, ray_cluster, capsys):
    """Two runs as Ray tasks on a real cluster; the default GPU share on a GPU-less cluster is 0, and an explicit
    share fails at once with one line instead of waiting forever."""
    scripts, sweep_dir = tmp_path / "scripts", tmp_path / "sweep"
    scripts.mkdir()
    (scripts / "fake.py").write_text(FAKE_SCRIPT)
    argv = ["--algorithms", "fake", "--datasets", "ok", "--seeds", "0", "1", "--sweep-dir", str(sweep_dir)]
    argv += ["--script-dir", str(scripts), "--ray-address", ray_cluster]
    assert sweep.main(argv) == 0
    for seed in (0, 1):
        assert (sweep_dir / "fake" / "ok" / f"seed{seed}" / "run" / "final.pt").read_text() == "done"
    assert "2 runs succeeded, 0 failed" in capsys.readouterr().out

    with pytest.raises(SystemExit, match=r"has no GPU, so tasks asking for --gpus-per-run 0\.25 would wait forever"):
        sweep.main([*argv[:-2], "--seeds", "2", "--ray-address", ray_cluster, "--gpus-per-run", "0.25"])


def test_gpu_check_refuses_bad_arguments_and_rehearses_on_the_cpu(tmp_path):
    """benchmark/gpu_check.sh: a usage line and exit 2 for bad arguments; --quick runs every step here (no CUDA:
    it says so, the CUDA tests skip) and leaves each result file in OUTDIR."""
    script = str(REPO / "benchmark" / "gpu_check.sh")
    for bad in ([], ["--quick"], [str(tmp_path / "out"), "--fast"]):
        result = subprocess.run(["bash", script, *bad], capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and result.stderr.startswith("usage: bash benchmark/gpu_check.sh OUTDIR")
    assert not (tmp_path / "out").exists()
    if torch.cuda.is_available():
        pytest.skip("the CPU rehearsal is for machines without CUDA")
    quick = ["bash", script, str(tmp_path / "out"), "--quick"]
    result = subprocess.run(quick, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "no CUDA device: the same steps on the CPU" in result.stdout
    files = sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*") if path.is_file())
    # The CUDA branch writes the same files (speed_cuda for speed_cpu): the device returns at most 8
    expected = ["env.txt", "extra/speed_cpu.json", "extra/speed_cpu.md", "log.txt", "smoke_runs.tar.gz"]
    assert files == sorted([*expected, "speed_cpu.json", "speed_cpu.md"]) and len(files) <= 8
    assert len(json.loads((tmp_path / "out" / "extra" / "speed_cpu.json").read_text())["rows"]) == 2  # appended
    with tarfile.open(tmp_path / "out" / "smoke_runs.tar.gz") as archive:
        smoke = archive.extractfile("./smoke.txt").read().decode()
    assert "so2__1" in smoke and "opt__1" in smoke and "eval/normalized_score [(0," in smoke
    assert "== CUDA tests: exit 0" in (tmp_path / "out" / "log.txt").read_text()


def test_gpu_check_fits_its_one_device_call():
    """On CUDA the step limits (the wheel install's included) add up to under 8.5 of the device's 10 minutes per
    call, which leaves the machine's start and the transfers inside the session's 15 minutes."""
    text = (REPO / "benchmark" / "gpu_check.sh").read_text()
    cuda_branch = text[text.index('if [ "$DEVICE" = cuda ]; then') : text.index("else  # the CPU rehearsal")]
    limits = [int(re.search(r"timeout (\d+) \$PYTHON -m pip install", text).group(1))]
    limits.append(int(re.search(r'step "CUDA tests" (\d+)', text).group(1)))
    limits += [int(limit) for limit in re.findall(r'step "[^"]+" (\d+)', cuda_branch)]
    full = text[text.index("else\n    # Sized from") : text.index("export MINARI_DATASETS_PATH")]
    limits.append(int(re.search(r"LIMIT=(\d+)", full).group(1)))  # the smoke runs, side by side
    assert len(limits) == 6 and sum(limits) <= 510, limits


def test_every_mutation_edit_still_matches_its_script_once():
    """A refactor that moves a line the mutation list names fails here, not silently in a later mutation run."""
    from benchmark import mutation

    edits = [(script, *edit) for script, listed in mutation.MUTATIONS.items() for edit in listed]
    stale = []
    for script, name, old, new, *file in edits:
        if (REPO / mutation.edited_file(script, file)).read_text().count(old) != 1 or old == new:
            stale.append((script, name))
    assert len(edits) > 100 and stale == []


def test_report_takes_the_lowest_evaluation_up_to_lowest_until(tmp_path):
    """A late collapse counts in the dip over the whole run, not in the dip up to --lowest-until (issue #34: the
    lowest evaluation in the first 10k online steps); the differences also name the online mean."""
    for algorithm, scores in (("late", (50.0, 40.0, 10.0)), ("flat", (50.0, 45.0, 45.0))):
        run = tmp_path / algorithm / "hopper-z" / "seed0" / "run"
        writer = SummaryWriter(str(run))
        for step, score in zip((0, 50, 100), scores, strict=True):
            writer.add_scalar("eval/normalized_score", score, step)
        writer.close()
    common = ["--sweep-dir", str(tmp_path), "--baseline", "late=flat", "--only", "late", "flat"]
    report.main([*common, "--out", str(tmp_path / "all")])
    whole = (tmp_path / "all" / "report.md").read_text()
    assert "| late | hopper-z | 1 | 100 | 50.0 ± 0.0 | -40.0 ± 0.0 (at 100: the run's end) | -40.0 ± 0.0 |" in whole
    assert "- hopper-z: final -35.0 [-35.0, -35.0]; dip -35.0 [-35.0, -35.0]; online mean -20.0" in whole
    report.main([*common, "--out", str(tmp_path / "early"), "--lowest-until", "50"])
    early = (tmp_path / "early" / "report.md").read_text()
    assert "| late | hopper-z | 1 | 100 | 50.0 ± 0.0 | -40.0 ± 0.0 (at 100: the run's end) | -10.0 ± 0.0 |" in early
    assert "- hopper-z: final -35.0 [-35.0, -35.0]; dip -5.0 [-5.0, -5.0]" in early
    assert "the evaluations up to online step 50 (a run with none: its first online one)." in early
    assert "| 0 | 50.0 / 50.0 | 40.0 / 45.0 | 10.0 / 45.0 | 25.0 / 45.0 |" in early  # per seed: lowest to 50


def test_report_pairs_arms_by_seed_when_asked(tmp_path):
    """Arms from one starting point per seed: the seeds differ a lot, the arms by exactly +5 in every seed. Paired,
    the interval is that +5 alone; unpaired it spans the seeds' spread. --only leaves other folders out."""
    finals = {0: 0.0, 1: 50.0, 2: 100.0}
    for algorithm, shift in (("arm", 5.0), ("base", 0.0), ("other", 1.0)):
        for seed, final in finals.items():
            run = tmp_path / algorithm / "hopper-z" / f"seed{seed}" / "run"
            writer = SummaryWriter(str(run))
            for step, score in ((0, 10.0 + seed), (50, final / 2 + shift - 1.0), (100, final + shift)):
                writer.add_scalar("eval/normalized_score", score, step)
            writer.close()
            (run / "args.json").write_text(json.dumps({"online_steps": 100}))
    common = ["--sweep-dir", str(tmp_path), "--baseline", "arm=base", "--only", "arm", "base"]
    report.main([*common, "--out", str(tmp_path / "paired"), "--paired"])
    text = (tmp_path / "paired" / "report.md").read_text()
    expected = "- hopper-z (seeds 0 1 2): final +5.0 [+5.0, +5.0]; lowest online evaluation +5.0 [+5.0, +5.0]; "
    assert expected + "online mean +5.0" in text
    assert "| 2 | 12.0 / 12.0 | 54.0 / 49.0 | 105.0 / 100.0 | 79.5 / 74.5 |" in text  # hand-over, lowest, final, mean
    assert "| other |" not in text
    report.main([*common, "--out", str(tmp_path / "unpaired")])
    unpaired = (tmp_path / "unpaired" / "report.md").read_text()
    low, high = map(float, re.search(r"final \+5\.0 \[([-+.\d]+), ([-+.\d]+)\]", unpaired).groups())
    assert low < -20 and high > 30  # resampling the arms apart mixes the seeds' spread into the difference
    shutil.rmtree(tmp_path / "base" / "hopper-z" / "seed1")  # the baseline lacks a seed: pairs on seeds 0 and 2
    report.main([*common, "--out", str(tmp_path / "partial"), "--paired"])
    partial = (tmp_path / "partial" / "report.md").read_text()
    assert "- hopper-z (seeds 0 2): final +5.0 [+5.0, +5.0]" in partial
    assert "| 2 | 12.0 / 12.0 | 54.0 / 49.0 | 105.0 / 100.0 | 79.5 / 74.5 |" in partial and "\n| 1 |" not in partial


def test_arm_logs_reads_the_hand_over_and_the_online_means(tmp_path):
    """Q bias at step 0 vs its mean over later evaluations, and seed means, from synthetic event files."""
    from benchmark.diagnostics import arm_logs

    for seed, shift in ((0, 0.0), (2, 2.0)):  # seed 2 second: a label taken from the position would read 1
        writer = SummaryWriter(str(tmp_path / "arm" / "hopper-z" / f"seed{seed}" / "run"))
        for step, bias in ((0, 1.0 + shift), (50, 3.0 + shift), (100, 5.0 + shift)):
            writer.add_scalar("eval/q_bias", bias, step)
        for step, q in ((25, 10.0), (75, 20.0)):
            writer.add_scalar("losses/qf_values", q + shift, step)
        writer.close()
    text = arm_logs.table(tmp_path, ["arm", "missing"])
    # hand-over (1 + 3) / 2; online ((3 + 5) / 2 + (5 + 7) / 2) / 2; mean Q (15 + 17) / 2; no rank tau, no share
    assert "| arm | hopper-z | 2 | 2.000 | 5.000 |  |  | 16.000 |  |" in text
    assert "missing" not in text
    per_seed = arm_logs.table(tmp_path, ["arm"], per_seed=True)  # seed 2: hand-over 3, online (5 + 7) / 2, Q 17
    assert "| arm | hopper-z | 0 | 1.000 | 4.000 |  |  | 15.000 |  |" in per_seed
    assert "| arm | hopper-z | 2 | 3.000 | 6.000 |  |  | 17.000 |  |" in per_seed
    arm_logs.main(["--sweep-dir", str(tmp_path), "--arms", "arm", "--per-seed", "--out", str(tmp_path / "logs.md")])
    written = (tmp_path / "logs.md").read_text()
    assert written.startswith(f"Command: python benchmark/diagnostics/arm_logs.py --sweep-dir {tmp_path} --arms arm")
    assert written.index("Seed means:") < written.index("| arm | hopper-z | 2 | 2.000") < written.index("Per seed:")
    assert written.index("Per seed:") < written.index("| arm | hopper-z | 2 | 3.000")


def test_handover_score_repeats_a_runs_evaluation_on_its_seeds_and_differs_on_others(minari_root, tmp_path, capsys):
    """On the run's own reset seeds (seed + 100) it gives the run's last logged score; on other seeds another."""
    from algorithms import opt
    from benchmark.diagnostics import handover_score
    from tests.conftest import scalars

    torch.set_num_threads(1)
    sizes = {"hidden_dim": 16, "batch_size": 8, "offline_steps": 6, "offline_eval_freq": 6, "online_steps": 0}
    args = opt.Args(env_id="hopper-medium", run_dir=str(tmp_path), cuda=False, progress=False, seed=3,
                    eval_episodes=3, **sizes)  # fmt: skip
    run = opt.main(args)
    logged = scalars(run)["offline/normalized_score"][-1]
    same = handover_score.score(str(run / "final.pt"), episodes=3, seed=103)
    assert same["score"] == pytest.approx(logged, abs=1e-4)
    # the standard error from the three episodes' own scores, each run alone
    single = [handover_score.score(str(run / "final.pt"), episodes=1, seed=103 + i)["score"] for i in range(3)]
    assert np.mean(single) == pytest.approx(same["score"], abs=1e-6)
    assert same["stderr"] == pytest.approx(np.std(single, ddof=1) / np.sqrt(3), rel=1e-6) and same["stderr"] > 0
    other = handover_score.score(str(run / "final.pt"), episodes=3, seed=50_000)
    assert other["score"] != pytest.approx(logged, abs=1e-3)
    capsys.readouterr()
    handover_score.main([str(run / "final.pt"), "--episodes", "3", "--seed", "103"])
    printed = f"{run / 'final.pt'}: {same['score']:.1f} +- {same['stderr']:.2f} (return {same['return']:.1f}, length"
    printed += f" {same['length']:.0f})"
    assert capsys.readouterr().out.strip() == printed


def test_offline_curves_lists_each_seeds_evaluations_up_to_the_hand_over(tmp_path):
    """Synthetic offline runs: updates done, the last evaluation, the range before it, every evaluation."""
    from benchmark.diagnostics import offline_curves

    # seed 0's run resumed once: its evaluations in two event files
    curves = {(0, "run"): [[(2500, 24.0), (5000, 20.5)], [(7500, 23.7), (10000, 61.0)]],
              (2, "run"): [[(2500, 80.0), (10000, 90.5)]], (2, "bare"): [[]]}  # fmt: skip
    for (seed, name), files in curves.items():
        for points in files:
            writer = SummaryWriter(str(tmp_path / "arm" / "hopper-z" / f"seed{seed}" / name))
            for step, score in points:
                writer.add_scalar("offline/normalized_score", score, step)
            writer.add_scalar("offline/qf_loss", 1.0, 100)
            writer.close()
    text = offline_curves.table(tmp_path, ["arm", "missing"])
    evaluations = "2.5k: 24.0, 5k: 20.5, 7.5k: 23.7, 10k: 61.0"
    assert f"| arm | hopper-z | 0 | 10000 | 61.0 | 20.5 - 24.0 | {evaluations} | run |" in text
    assert "| arm | hopper-z | 2 | 10000 | 90.5 | 80.0 - 80.0 | 2.5k: 80.0, 10k: 90.5 | run |" in text
    assert "| arm | hopper-z | 2 |  |  |  | no offline evaluation | bare |" in text
    assert len(text.splitlines()) == 5 and "missing" not in text
    out = tmp_path / "out" / "offline.md"
    offline_curves.main(["--sweep-dir", str(tmp_path), "--labels", "arm", "--out", str(out)])
    written = out.read_text()
    assert written.startswith(f"Command: python benchmark/diagnostics/offline_curves.py --sweep-dir {tmp_path}")
    assert text in written


def test_q_probe_reads_the_data_through_the_checkpoints_normalisation(minari_root, tmp_path, capsys):
    """Q of every other episode's (state, action) pairs as the critics see them, on the checkpoint's standardised
    states (by hand through the critic), not raw ones; the policy's distance from the data's actions; a checkpoint
    of a script it cannot read is one error line."""
    from algorithms import enoto
    from benchmark.diagnostics import q_probe
    from utils import load_dataset

    torch.set_num_threads(1)
    sizes = {"hidden_dim": 16, "batch_size": 8, "num_critics": 3, "cql_samples": 2, "offline_steps": 6}
    args = enoto.Args(env_id="hopper-medium", run_dir=str(tmp_path), cuda=False, progress=False, eval_episodes=1,
                      offline_eval_freq=6, online_steps=0, **sizes)  # fmt: skip
    path = enoto.main(args) / "offline.pt"
    result = q_probe.probe(str(path), every=2)

    data, checkpoint = load_dataset("hopper-medium"), torch.load(path, weights_only=False)
    ends = np.flatnonzero(data.episode_ends) + 1
    rows = np.concatenate([np.arange(start, end) for start, end in zip(np.r_[0, ends[:-1]], ends, strict=True)][::2])
    obs, action = data.observations[rows], torch.as_tensor(data.actions[rows])
    agent = q_probe.load_agent(checkpoint)[0]
    standardised = torch.as_tensor((obs - checkpoint["obs_mean"]) / checkpoint["obs_std"], dtype=torch.float32)
    with torch.no_grad():
        expected = agent.critic(standardised, action).min(0).values.mean().item()
        raw = agent.critic(torch.as_tensor(obs), action).min(0).values.mean().item()
    assert result["states"] == len(rows) < len(data.observations)
    assert result["q data"] == pytest.approx(expected, rel=1e-5) and raw != pytest.approx(expected, rel=1e-3)
    policy_action = enoto.policy_from_checkpoint(checkpoint)(obs)
    assert result["policy-data mse"] == pytest.approx(np.square(policy_action - data.actions[rows]).mean(), rel=1e-5)

    capsys.readouterr()
    q_probe.main([str(path), "--every", "2"])
    assert capsys.readouterr().out.startswith(f"{path} (offline step 6, {len(rows)} states): q data {expected:.2f}, ")
    torch.save({"algorithm": "opt"}, tmp_path / "opt.pt")
    with pytest.raises(SystemExit, match="error: q_probe reads enoto, off2on, baq checkpoints, not opt"):
        q_probe.probe(str(tmp_path / "opt.pt"))


def test_cpu_protocol_carries_finished_offline_checkpoints_for_a_later_session(tmp_path):
    """`cpu.sh carry` copies each finished offline phase's offline.pt (and args.json) to where round 2's online arms
    start from, again when it changes (a hand-over rule extension), never an unfinished one's; git ignores the copy."""
    shutil.copytree(REPO / "benchmark" / "protocols", tmp_path / "benchmark" / "protocols")
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    offline = tmp_path / "runs" / "protocol-cpu-offline" / "opt-1m" / "hopper-sac-medium"
    for seed, finished in ((0, True), (1, False)):
        run = offline / f"seed{seed}" / "run_a"
        run.mkdir(parents=True)
        (run / "offline.pt").write_text(f"weights {seed}")
        (run / "args.json").write_text("{}")
        if finished:
            (run / "final.pt").write_text("")

    def carry():
        subprocess.run(["bash", "benchmark/protocols/cpu.sh", "carry", "opt-1m"], cwd=tmp_path, check=True)

    carry()
    carried = tmp_path / "benchmark/results/protocol-cpu/checkpoints/opt-1m/hopper-sac-medium"
    assert (carried / "seed0" / "run_a" / "offline.pt").read_text() == "weights 0"
    assert (carried / "seed0" / "run_a" / "args.json").is_file()
    assert not (carried / "seed1").exists()
    extended = offline / "seed0/run_a/offline.pt"
    extended.write_text("weights 0, extended")
    later = extended.stat().st_mtime + 5  # written after the copy, whatever the file system's time resolution
    os.utime(extended, (later, later))
    carry()
    assert (carried / "seed0" / "run_a" / "offline.pt").read_text() == "weights 0, extended"
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    ignored = subprocess.run(["git", "check-ignore", str(carried / "seed0/run_a/offline.pt")], cwd=tmp_path)
    assert ignored.returncode == 0


def test_handover_rule_extends_a_weak_offline_phase_to_the_run_launched_with_that_budget(minari_root, tmp_path, capsys):
    """`keep` links the checkpoints a run writes; `apply` puts the newest one at or before the last step back with a
    larger --offline-steps and resumes (here from an older one: the updates after it are made again): the extended
    Off2On run (its BC phase crossing the first budget's end) equals, bit for bit, the run launched with that budget,
    every evaluation logged once; a strong run is left as it is."""
    import threading

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from algorithms import off2on
    from benchmark.diagnostics.offline_curves import offline_scores
    from benchmark.protocols import handover_rule

    torch.set_num_threads(1)
    sizes = {"hidden_dim": 16, "batch_size": 8, "num_agents": 2, "bc_steps": 25, "offline_eval_freq": 10,
             "checkpoint_freq": 3, "online_steps": 0}  # fmt: skip

    def offline(folder, steps):
        return off2on.main(off2on.Args(env_id="hopper-medium", run_dir=str(folder), cuda=False, progress=False,
                                       seed=2, eval_episodes=1, offline_steps=steps, **sizes))  # fmt: skip

    def logged(run):  # every offline evaluation event, duplicates included
        events = [
            event for path in sorted(run.glob("events.out.tfevents.*")) for event in EventFileLoader(str(path)).Load()
        ]
        return sorted((e.step, v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value)
                      for e in events for v in e.summary.value if v.tag == "offline/normalized_score")  # fmt: skip

    folder, stop = tmp_path / "weak", threading.Event()
    keeper = threading.Thread(target=handover_rule.keep, args=([folder], stop, 0.001))
    keeper.start()
    try:
        run = offline(folder, 20)
    finally:
        stop.set()
        keeper.join()
    kept = handover_rule.kept_checkpoints(run)
    assert not (run / "checkpoint.pt").exists() and 1 < len(kept) <= 3 and max(kept) <= 20
    kept[max(kept)].unlink()  # the newest kept one gone: apply goes back further
    older = max(handover_rule.kept_checkpoints(run))
    capsys.readouterr()
    lines = handover_rule.apply([folder], threshold=1e9, block=20, most=40, interval=0.001)  # always weak: to the most
    assert f"on to 40 from checkpoint-{older}.pt" in capsys.readouterr().out
    assert lines == [f"{run}: hand-over at 40 updates, last evaluation {offline_scores(run)[-1][1]:.1f}"]
    assert json.loads((run / "args.json").read_text())["offline_steps"] == 40
    direct = offline(tmp_path / "direct", 40)
    assert logged(run) == logged(direct) and [step for step, _ in logged(run)] == [10, 20, 30, 40]
    extended, launched = (torch.load(path / "offline.pt", weights_only=False) for path in (run, direct))
    assert extended.keys() == launched.keys() and extended["step"] == 40
    for name in extended.keys() - {"args"}:  # args: the run folders differ
        flat = [torch.utils._pytree.tree_leaves(checkpoint[name]) for checkpoint in (extended, launched)]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*flat, strict=True)), name

    before = {name: (direct / name).read_bytes() for name in ("final.pt", "offline.pt", "args.json")}
    strong = handover_rule.apply([tmp_path / "direct"], threshold=-1e9, block=10, most=80, interval=0.001)
    assert strong == [f"{direct}: hand-over at 40 updates, last evaluation {offline_scores(direct)[-1][1]:.1f}"]
    assert {name: (direct / name).read_bytes() for name in before} == before
    shutil.rmtree(run / "kept")
    with pytest.raises(SystemExit, match="no kept checkpoint at or before step 40"):
        handover_rule.apply([folder], threshold=1e9, block=10, most=50, interval=0.001)


def test_handover_rule_keeps_a_checkpoint_written_under_an_inode_seen_before(tmp_path):
    """A pruned link frees its inode, and the file system may give it to a later checkpoint.pt: the keeper tells the
    files apart by inode and modification time, not by inode alone (here: the same inode, rewritten in place)."""
    from benchmark.protocols import handover_rule

    run, seen = tmp_path / "label" / "run", set()
    run.mkdir(parents=True)
    for step in (1, 2, 3, 4, 5):
        with open(run / "checkpoint.pt", "r+b" if step > 1 else "wb") as file:  # r+b: the same inode
            torch.save({"step": step}, file)
        os.utime(run / "checkpoint.pt", ns=(step * 10**9, step * 10**9))
        handover_rule.keep_once([tmp_path], seen)
    assert sorted(handover_rule.kept_checkpoints(run)) == [3, 4, 5]
