"""Tiny real Minari datasets, made with utils.make_dataset under a temporary MINARI_DATASETS_PATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def error_line(stderr: str) -> str:
    """The last stderr line, which must be the one clear `error: ...` line."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]
