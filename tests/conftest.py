"""Tiny real Minari datasets, made with utils.make_dataset under a temporary MINARI_DATASETS_PATH."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Hopper with a 30-step limit: random actions both terminate (falls) and truncate (time limit).
TINY_HORIZON = 30


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory) -> Path:
    """A session-wide dataset root holding mujoco/hopper/{medium,expert}-v0 made locally with the real ids."""
    from utils.make_dataset import collect_dataset

    root = tmp_path_factory.mktemp("minari")
    previous = {key: os.environ.get(key) for key in ("MINARI_DATASETS_PATH", "O2O_OFFLINE")}
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    os.environ["O2O_OFFLINE"] = "1"  # the suite never touches the network unless a test asks for it
    collect_dataset("Hopper-v5", "mujoco/hopper/medium-v0", steps=2000, seed=0, max_episode_steps=TINY_HORIZON)
    collect_dataset("Hopper-v5", "mujoco/hopper/expert-v0", steps=500, seed=1000)
    yield root
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None):
    """Run `python <args>` as a user would, from a directory outside the repository by default."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd or Path("/"),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def script_run(script: str, args: list[str], minari_root: Path, run_dir: Path) -> tuple[Path, str]:
    """Run algorithms/<script>.py with args on the tiny datasets as a user would, writing under `run_dir`: it must
    exit 0. Returns the one run folder it made there and what it wrote on stderr."""
    command = [str(REPO / f"algorithms/{script}.py"), *args, "--run-dir", str(run_dir)]
    result = run_cli(command, {"MINARI_DATASETS_PATH": str(minari_root)}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = run_dir.iterdir()
    return run, result.stderr


def cli_error(script: str, args: list[str], minari_root: Path) -> str:
    """Run algorithms/<script>.py with args on the tiny datasets as a user would: it must exit 1 with one
    `error: ...` line and no traceback. Returns that line."""
    result = run_cli([str(REPO / f"algorithms/{script}.py"), *args], {"MINARI_DATASETS_PATH": str(minari_root)})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = error_line(result.stderr)
    assert line.startswith("error: "), line
    return line


def main_error(script: str, args: list[str], minari_root: Path, monkeypatch) -> str:
    """The scripts' entry point, `utils.run.cli(main, Args)` (tyro, then main), in this process with these flags on
    the tiny datasets: it must end with the one `error: ...` line that cli exits with. Returns that line. It is not
    the script's `__main__` block, which cli_error runs in a real process (once per script in test_resume); this
    saves the ~4 s start of a process per case."""
    from utils.run import cli

    module = importlib.import_module(f"algorithms.{script}")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_root))
    with pytest.raises(SystemExit) as exit_info:
        cli(module.main, module.Args)
    line = exit_info.value.code
    assert isinstance(line, str) and line.startswith("error: ") and "\n" not in line, line
    return line


@pytest.fixture(autouse=True)
def restore_global_torch_state(monkeypatch):
    """Every test leaves the process as it found it: a script's main, run in-process, seeds the global RNGs and
    switches on deterministic kernels (and their cuBLAS workspace), which would otherwise hold for the tests after."""
    import random

    import numpy as np
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn, precision = torch.backends.cudnn.deterministic, torch.get_float32_matmul_precision()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    name = "CUBLAS_WORKSPACE_CONFIG"
    if name in os.environ:  # monkeypatch puts back the value it records here, after the test
        monkeypatch.setenv(name, os.environ[name])
    else:  # recorded as unset, so removed after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.backends.cudnn.deterministic = cudnn
    torch.set_float32_matmul_precision(precision)
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    torch.set_rng_state(rng[2])


def error_line(stderr: str) -> str:
    """The last stderr line, which must be the one clear `error: ...` line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def scalars(run_dir: Path, required: tuple[str, ...] | list[str] = ()) -> dict[str, list[float]]:
    """Every TensorBoard scalar a run wrote, by tag; each `required` tag must be there, with finite values only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    tags = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in required:
        assert tag in tags and np.isfinite(tags[tag]).all(), tag
    return tags


def recording_env(env_spec: str, max_episode_steps: int = 12):
    """The dataset's env with a short time limit (so truncations happen) and a log of every step.

    Returns the env and the list it appends (action, reward, terminated, truncated, next observation) to.
    """
    from utils import make_env

    env = make_env(json.dumps(json.loads(env_spec) | {"max_episode_steps": max_episode_steps}), 0)
    transitions, step_fn = [], env.step

    def recording_step(action):
        result = step_fn(action)
        transitions.append((action, result[1], result[2], result[3], result[0]))
        return result

    env.step = recording_step
    return env, transitions


def assert_sgd_step(module_after, module_before, loss):
    """module_after is module_before after one plain SGD step with lr 1 on `loss` (computed with module_before)."""
    import torch

    grads = torch.autograd.grad(loss, list(module_before.parameters()))
    for after, before, grad in zip(module_after.parameters(), module_before.parameters(), grads, strict=True):
        torch.testing.assert_close(after, before - grad, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def no_host_sync():
    """Inside: any host-device synchronisation raises (CUDA only). Use it after a warm-up call, so that
    one-time work such as lazy initialisation does not count."""
    import torch

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
