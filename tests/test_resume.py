"""--resume and --checkpoint-freq in all five scripts: exact continuation, kill -9 at any moment, bad input."""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, cli_error
from utils import UserError, run
from utils.checkpoint import CHECKPOINT

SCRIPTS = ("so2", "enoto", "baq", "off2on", "opt")
# tiny networks and budgets; checkpoints every 5 steps of either phase, evaluations every 20
RESUME_ARGS = {
    # N_upc 3 with an actor update every 2nd critic update: 21 blocks by online step 25, an odd critic-update count
    # there, so the actor updates after a resume fall elsewhere unless the counter is restored
    "so2": {"num_critics": 2, "warmup_steps": 4, "updates_per_step": 3, "actor_update_freq": 2, "mixed_batch_size": 16},
    "enoto": {"num_critics": 2, "warmup_steps": 5},
    "baq": {"bc_steps": 5, "probe_states": 50},
    "off2on": {"num_agents": 2, "bc_steps": 5, "block_steps": 10, "first_block_multiplier": 1},
    "opt": {"n_tau": 10, "n_pretrain": 5},
}
SIZES = {"hidden_dim": 16, "batch_size": 8, "eval_episodes": 1, "offline_steps": 30, "online_steps": 40}
CADENCE = {"eval_freq": 20, "offline_eval_freq": 20, "checkpoint_freq": 5, "log_freq": 5}
TIMING_TAGS = ("UPS", "SPS")  # wall-clock rates differ between any two runs


class Interrupted(Exception):
    """Raised right after a chosen checkpoint was written: the run stops there as if killed."""


def make_args(script: str, run_dir: Path, **overrides):
    module = importlib.import_module(f"algorithms.{script}")
    fields = {"env_id": "hopper-medium", "run_dir": str(run_dir), "cuda": False, "progress": False}
    return module, module.Args(**SIZES | CADENCE | RESUME_ARGS[script] | fields | overrides)


def all_scalars(run_path: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar in every event file of the run, files in the order they were started, timing
    tags left out."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    # Not by name: two files started in the same second differ only in a per-process writer counter, and
    # '.10' sorts before '.9'. The first event of a file (its version record) has the start time to the microsecond.
    files = [list(EventFileLoader(str(path)).Load()) for path in run_path.glob("events.out.tfevents.*")]
    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(files, key=lambda events: events[0].wall_time):
        for event in events:
            for value in event.summary.value:
                if not value.tag.endswith(TIMING_TAGS):
                    found.setdefault(value.tag, []).append((event.step, value.tensor.float_val[0]))
    return found


def networks(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's networks and optimisers, flattened to name -> tensor."""
    checkpoint = torch.load(path, weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)

    for key, value in checkpoint.items():
        if key != "args":
            walk(key, value)
    return flat


def interrupt_after(module, monkeypatch, phase: str, step: int):
    """Stop the run at its first checkpoint after (phase, step), with the checkpoint.pt of (phase, step) put back:
    as if killed just before that later write, so the events logged in between are on disk and must go."""
    save_checkpoint, kept = run.save_checkpoint, {}

    def save_then_stop(path, algorithm, agent, args, data, saved_phase, saved_step, **state):
        save_checkpoint(path, algorithm, agent, args, data, saved_phase, saved_step, **state)
        if path.name != CHECKPOINT:
            return
        if kept:
            path.write_bytes(kept["bytes"])
            raise Interrupted
        if (saved_phase, saved_step) == (phase, step):
            kept["bytes"] = path.read_bytes()

    monkeypatch.setattr(run, "save_checkpoint", save_then_stop)


# Odd steps, so that update counters driving every-2nd-step rules (TD3's policy delay) are odd there; online 25
# is mid-episode and, for OPT, in fine-tuning (N_tau 10).
CASES = [(script, {}, phase, step) for script in SCRIPTS for phase, step in (("offline", 15), ("online", 25))]
CASES.append(("baq", {"backbone": "iql"}, "offline", 15))  # IQL's cosine actor-lr schedule is state too


@pytest.mark.parametrize("script, flags, phase, step", CASES)
def test_a_resumed_run_is_the_uninterrupted_run(minari_root, tmp_path, monkeypatch, script, flags, phase, step):
    """Stopped after a checkpoint (mid-episode online) and resumed from it: the same final networks and optimiser
    states bit for bit, and the same TensorBoard scalars, each step once."""
    torch.set_num_threads(1)
    module, args = make_args(script, tmp_path / "straight", **flags)
    reference = module.main(args)

    with monkeypatch.context() as patch:
        interrupt_after(module, patch, phase, step)
        module, args = make_args(script, tmp_path / "resumed", exp_name="interrupted", **flags)
        with pytest.raises(Interrupted):
            module.main(args)
    (run_path,) = (tmp_path / "resumed").iterdir()
    assert torch.load(run_path / CHECKPOINT, weights_only=False)["step"] == step
    module, args = make_args(script, tmp_path / "elsewhere", resume=str(run_path))
    assert module.main(args) == run_path
    assert not (run_path / CHECKPOINT).exists(), "a finished run keeps final.pt only"
    # the checkpoints written after the resume name the run, not the resuming command's defaults
    final_args = torch.load(run_path / "final.pt", weights_only=False)["args"]
    assert (final_args["exp_name"], final_args["run_dir"]) == ("interrupted", str(tmp_path / "resumed"))

    expected, resumed = networks(reference / "final.pt"), networks(run_path / "final.pt")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
    assert all_scalars(run_path) == all_scalars(reference)


def wait_for_checkpoint(run_dir: Path, phase: str, process, timeout: float = 120) -> Path:
    """Poll until the run under run_dir has a checkpoint.pt of `phase`; returns the run path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        for path in run_dir.glob(f"*/{CHECKPOINT}"):
            try:
                if torch.load(path, weights_only=False)["phase"] == phase:
                    return path.parent
            except Exception:  # only a complete file counts
                pass
        time.sleep(0.05)
    raise AssertionError(f"no {phase} checkpoint within {timeout} s")


def cli_flags(script: str, **overrides) -> list[str]:
    _, args = make_args(script, Path("unused"), **overrides)
    flags = []
    for name in (*SIZES, *CADENCE, *RESUME_ARGS[script]):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_9_anywhere_then_resume_finishes(minari_root, tmp_path, script):
    """SIGKILL in the offline phase, then in the online phase with a checkpoint written every step (so the kill
    often lands inside a write): each time the checkpoint on disk loads, and --resume reaches the planned end."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    budget = {"offline_steps": 200, "online_steps": 150}
    command = [sys.executable, str(REPO / f"algorithms/{script}.py"), "--env-id", "hopper-medium", "--no-cuda"]
    command += ["--run-dir", str(tmp_path), *cli_flags(script, **budget), "--checkpoint-freq", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run_path = wait_for_checkpoint(tmp_path, "offline", process)
        time.sleep(random.uniform(0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        torch.load(run_path / CHECKPOINT, weights_only=False)  # never half-written
        resume = [sys.executable, str(REPO / f"algorithms/{script}.py"), "--resume", str(run_path), "--no-cuda"]
        process = subprocess.Popen(resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for_checkpoint(tmp_path, "online", process)
        time.sleep(random.uniform(0, 0.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert torch.load(run_path / CHECKPOINT, weights_only=False)["phase"] == "online"
        finished = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    finally:
        process.kill()
    assert finished.returncode == 0, finished.stderr[-2000:]
    final = torch.load(run_path / "final.pt", weights_only=False)
    assert (final["phase"], final["step"]) == ("online", budget["online_steps"])
    for tag, points in all_scalars(run_path).items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag} has steps written twice"
    evaluations = [step for step, _ in all_scalars(run_path)["eval/normalized_score"]]
    assert evaluations == list(range(0, budget["online_steps"] + 1, CADENCE["eval_freq"]))


@pytest.fixture
def stopped_run(minari_root, tmp_path, monkeypatch):
    """A tiny run of the script, stopped after its online checkpoint at step 20."""

    def make(script: str) -> Path:
        module, args = make_args(script, tmp_path)
        with monkeypatch.context() as patch:
            interrupt_after(module, patch, "online", 20)
            with pytest.raises(Interrupted):
                module.main(args)
        (run_path,) = tmp_path.iterdir()
        return run_path

    return make


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_resume_is_one_line_and_writes_nothing(minari_root, tmp_path, stopped_run, script):
    run_path = stopped_run(script)
    before = {path.name: path.read_bytes() for path in run_path.iterdir()}
    other = "enoto" if script != "enoto" else "so2"
    module, other_module = (importlib.import_module(f"algorithms.{name}") for name in (script, other))
    # the CLI's one line once per script; the other refusals in-process (the same UserError the CLI prints)
    assert f"--resume {tmp_path}: no {CHECKPOINT} there" in cli_error(script, ["--resume", str(tmp_path)], minari_root)
    for flags, message in (({"seed": 7}, "--seed 7 differs from the run's 1"),
                           ({"online_steps": 99}, "--online-steps 99 differs from the run's 40"),
                           ({"exp_name": "other"}, f"--exp-name other differs from the run's {script}")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            module.main(module.Args(resume=str(run_path), **flags))
    with pytest.raises(UserError, match=f"is a run of {script}, not {other}"):
        other_module.main(other_module.Args(resume=str(run_path)))
    assert {path.name: path.read_bytes() for path in run_path.iterdir()} == before

    # A checkpoint of an earlier version (enoto's and off2on's had neither the flag nor the state statistics)
    checkpoint = torch.load(run_path / CHECKPOINT, weights_only=False)
    missing = "normalize_states" if script in ("enoto", "off2on") else "seed"
    value = checkpoint["args"].pop(missing)
    for key in ("obs_mean", "obs_std") if script in ("enoto", "off2on") else ():
        del checkpoint[key]
    torch.save(checkpoint, run_path / CHECKPOINT)
    message = f"written by another version of {script}.py, which had no --{missing.replace('_', '-')}; start"
    with pytest.raises(UserError, match=message):
        module.main(module.Args(resume=str(run_path)))
    checkpoint["args"] |= {missing: value, "gone_flag": 1}  # and a flag that today's script no longer has
    torch.save(checkpoint, run_path / CHECKPOINT)
    with pytest.raises(UserError, match=f"written by another version of {script}.py, which had --gone-flag; start"):
        module.main(module.Args(resume=str(run_path)))
    del checkpoint["args"]["gone_flag"], checkpoint["format"]  # today's flags, an earlier checkpoint layout
    torch.save(checkpoint, run_path / CHECKPOINT)
    with pytest.raises(UserError, match=rf"written by an earlier version of {script}.py \(checkpoint format 1, "):
        module.main(module.Args(resume=str(run_path)))

    (run_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"{CHECKPOINT} cannot be read"):
        module.main(module.Args(resume=str(run_path)))


def test_resume_keeps_the_runs_device_cadence_and_fast_path_unless_given(tmp_path):
    """keep_run_settings: the run's values for flags left at their defaults, the given ones kept; --cudagraphs only
    where the run gets CUDA (elsewhere it runs eagerly instead of being refused for a flag the user cannot drop)."""
    from algorithms import so2
    from utils.checkpoint import keep_run_settings

    saved = {"cuda": False, "checkpoint_freq": 7, "compile": True, "cudagraphs": True, "torch_deterministic": False}
    (tmp_path / "args.json").write_text(json.dumps(saved | {"seed": 3}))
    args = so2.Args()
    keep_run_settings(str(tmp_path), args)
    assert (args.cuda, args.checkpoint_freq, args.compile, args.torch_deterministic) == (False, 7, True, False)
    assert not args.cudagraphs and args.seed == so2.Args().seed  # a --no-cuda run; the seed is load_for_resume's
    (tmp_path / "args.json").write_text(json.dumps(saved | {"cuda": True}))
    args = so2.Args(checkpoint_freq=3)
    keep_run_settings(str(tmp_path), args)
    assert args.checkpoint_freq == 3 and args.cudagraphs == torch.cuda.is_available()
    args = so2.Args()
    keep_run_settings(str(tmp_path / "missing"), args)  # no args.json: as given
    assert (args.cuda, args.checkpoint_freq) == (True, None)


def test_a_resumed_run_takes_its_device_and_determinism_before_setting_them_up(tmp_path, monkeypatch):
    """Run picks the device and sets determinism from the run's flags: a --no-cuda run stays on the CPU where CUDA
    is (patched in here), a --no-torch-deterministic one stays non-deterministic."""
    import utils.run
    from algorithms import so2

    (tmp_path / "args.json").write_text(json.dumps({"cuda": False, "torch_deterministic": False}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(utils.run, "load_for_resume", lambda *_: ({}, tmp_path))
    run = utils.run.Run(so2.Args(resume=str(tmp_path), progress=False), "so2", "an SO2")  # setting put back: conftest
    assert run.device.type == "cpu" and not torch.are_deterministic_algorithms_enabled()


def test_enoto_resume_keeps_every_flag_of_the_run(minari_root, tmp_path, stopped_run):
    run_path = stopped_run("enoto")
    module = importlib.import_module("algorithms.enoto")
    with pytest.raises(UserError, match="--num-critics 5 differs from the run's 2"):
        module.main(module.Args(resume=str(run_path), num_critics=5))
    args = module.Args(resume=str(run_path), progress=False)  # --cuda and --checkpoint-freq at their defaults
    module.main(args)
    saved = json.loads((run_path / "args.json").read_text())
    assert (args.online_steps, args.hidden_dim, args.seed) == (saved["online_steps"], 16, saved["seed"])
    assert (args.cuda, args.checkpoint_freq) == (False, 5)  # the run's device and checkpoint cadence, not defaults
    with pytest.raises(UserError, match="that run is finished"):
        module.main(module.Args(resume=str(run_path)))


def test_rng_streams_come_back_from_a_checkpoint_loaded_onto_another_device(tmp_path):
    """--resume loads checkpoint.pt with map_location=<the run's device>; torch's RNG states must reach
    set_rng_state as CPU byte tensors whatever that device is (on CUDA a moved ByteTensor is refused). Checked with
    map_location="meta", where a tensor moved there has no data left at all."""
    from utils.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3)
    random.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    expected = (torch.rand(4), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_state(torch.load(tmp_path / "state.pt", map_location="meta", weights_only=False)["rng"])
    drawn = (torch.rand(4), random.random())
    assert torch.equal(drawn[0], expected[0]) and drawn[1] == expected[1]

    # a checkpoint of the earlier format (torch's state as a tensor) still resumes
    legacy = rng_state() | {"torch": torch.get_rng_state()}
    expected = torch.rand(4)
    set_rng_state(legacy)
    assert torch.equal(torch.rand(4), expected)
