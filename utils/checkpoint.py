"""Resumable runs: atomic checkpoint files, random-number and environment state, the TensorBoard position.

A script's `checkpoint.pt` holds its own training state (networks, optimisers, buffers, loop variables) plus
what this module captures for it: every RNG stream, the exact MuJoCo state of the training episode, and
the length of every TensorBoard event file when it was written, so a resumed run can drop the events
logged after it and write each step once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from utils.errors import UserError

CHECKPOINT = "checkpoint.pt"
# 2: the online phases keep their loop state as utils.run.online_loop writes it ("loop": updates, logged_at, seconds)
CHECKPOINT_FORMAT = 2
# Flags a resumed run may change: they decide where and how fast it runs, not what it computes. RUN_SETTINGS left
# at their defaults keep the run's values (a --no-cuda run resumes on the CPU with its checkpoint cadence);
# --resume and --progress belong to this invocation; --run-dir is not used (the run stays in its folder).
RUN_SETTINGS = frozenset({"checkpoint_freq", "cuda", "compile", "cudagraphs"})
OPERATIONAL_FLAGS = RUN_SETTINGS | {"resume", "progress", "run_dir"}


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename: the file on disk is old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def rng_state() -> dict:
    """Every RNG stream; torch's as numpy arrays, which torch.load(map_location=...) leaves where they are."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state().numpy()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [generator.numpy() for generator in torch.cuda.get_rng_state_all()]
    return state


def host_bytes(state) -> torch.Tensor:
    """An RNG state as the CPU ByteTensor torch wants, from numpy or from a tensor that a map_location moved."""
    return torch.as_tensor(state).to("cpu", torch.uint8)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(host_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([host_bytes(generator) for generator in state["cuda"]])


def _time_limits(env: gym.Env):
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.wrappers.TimeLimit):
            yield env
        env = env.env


def env_state(env: gym.Env) -> dict:
    """The env's and its action space's RNG streams, and, for MuJoCo envs, the full physics state and the
    TimeLimit counters: enough to continue the running episode exactly."""
    state = {
        "np_random": env.unwrapped.np_random.bit_generator.state,
        "action_space": env.action_space.np_random.bit_generator.state,
    }
    unwrapped = env.unwrapped
    if isinstance(unwrapped, gym.envs.mujoco.MujocoEnv):
        import mujoco

        spec = mujoco.mjtState.mjSTATE_INTEGRATION  # qpos, qvel, act, warm start, time: all a step reads
        physics = np.empty(mujoco.mj_stateSize(unwrapped.model, spec))
        mujoco.mj_getState(unwrapped.model, unwrapped.data, physics, spec)
        state["mujoco"] = physics
        state["elapsed_steps"] = [limit._elapsed_steps for limit in _time_limits(env)]
    return state


def set_env_state(env: gym.Env, state: dict) -> bool:
    """Restore env_state's streams; True if the episode continues exactly (MuJoCo), False if the caller must
    start a fresh episode (its reset then draws from the restored stream)."""
    env.unwrapped.np_random.bit_generator.state = state["np_random"]
    env.action_space.np_random.bit_generator.state = state["action_space"]
    if "mujoco" not in state:
        return False
    import mujoco

    np_random = env.unwrapped.np_random.bit_generator.state
    env.reset()  # wrappers that insist on a reset first; then the saved physics replaces what it drew
    env.unwrapped.np_random.bit_generator.state = np_random
    unwrapped = env.unwrapped
    mujoco.mj_setState(unwrapped.model, unwrapped.data, state["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(unwrapped.model, unwrapped.data)
    for limit, elapsed in zip(_time_limits(env), state["elapsed_steps"], strict=True):
        limit._elapsed_steps = elapsed
    return True


def event_files(run_path: Path) -> dict[str, int]:
    """Name -> size in bytes of every TensorBoard event file of the run (call after writer.flush())."""
    return {path.name: path.stat().st_size for path in sorted(run_path.glob("events.out.tfevents.*"))}


def rewind_events(run_path: Path, sizes: dict[str, int]) -> None:
    """Cut every event file back to its size at the checkpoint and delete the ones started after it: the events
    logged after the checkpoint go, each step will be written once by the resumed run."""
    for path in run_path.glob("events.out.tfevents.*"):
        if path.name in sizes:
            os.truncate(path, sizes[path.name])
        else:
            path.unlink()


def keep_run_settings(run_dir: str, args) -> None:
    """Before Run sets up determinism and the device: the RUN_SETTINGS and --torch-deterministic that `args` holds at
    their defaults take the run's values from its args.json (a value equal to the default counts as not given).
    --cudagraphs only where the run gets a CUDA device: elsewhere it runs eagerly instead of being refused. Without
    a readable args.json, `args` stays as given."""
    try:
        saved = json.loads((Path(run_dir) / "args.json").read_text())
    except (OSError, ValueError):
        return
    for field in dataclasses.fields(args):  # cuda before cudagraphs: RunArgs' order
        name = field.name
        if name not in RUN_SETTINGS | {"torch_deterministic"} or getattr(args, name) != field.default:
            continue
        if name in saved and (name != "cudagraphs" or (args.cuda and torch.cuda.is_available())):
            setattr(args, name, saved[name])


def load_for_resume(run_dir: str, algorithm: str, args, device: torch.device) -> tuple[dict, Path]:
    """The checkpoint of RUN_DIR, checked, and its run path; `args` takes the run's flags (the checkpoint's).

    Refuses, with one line and before anything is written: a folder without (or with a corrupt) checkpoint.pt,
    another script's run, a checkpoint of another version (a flag more or less than today's), and any flag
    given now that differs from both the run's value and its default.
    """
    run_path = Path(run_dir)
    path = run_path / CHECKPOINT
    if not path.is_file() and (run_path / "final.pt").is_file():
        raise UserError(f"--resume {run_dir}: that run is finished (final.pt); there is nothing to resume")
    if not path.is_file():
        raise UserError(f"--resume {run_dir}: no {CHECKPOINT} there (pass the run folder that holds it)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
        saved = checkpoint["args"]
    except Exception as err:
        raise UserError(f"--resume {run_dir}: {CHECKPOINT} cannot be read ({type(err).__name__}: {err})") from err
    if checkpoint.get("algorithm") != algorithm:
        raise UserError(f"--resume {run_dir} is a run of {checkpoint.get('algorithm')}, not {algorithm}")
    # A flag the run never had would take today's default, and one it had that is gone would be dropped: either
    # way a run with another meaning (or a state the code does not find).
    names = {field.name for field in dataclasses.fields(args)}
    new, gone = (sorted(side - OPERATIONAL_FLAGS) for side in (names - set(saved), set(saved) - names))
    if new or gone:
        flags = " ".join("--" + name.replace("_", "-") for name in new or gone)
        raise UserError(
            f"--resume {run_dir}: {CHECKPOINT} was written by another version of {algorithm}.py, which "
            f"{'had no' if new else 'had'} {flags}; start a new run"
        )
    if checkpoint.get("format", 1) != CHECKPOINT_FORMAT:
        raise UserError(
            f"--resume {run_dir}: {CHECKPOINT} was written by an earlier version of {algorithm}.py (checkpoint format "
            f"{checkpoint.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}); start a new run"
        )
    for field in dataclasses.fields(args):
        name, value = field.name, getattr(args, field.name)
        if name in OPERATIONAL_FLAGS:
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        if value != saved[name] and value != default:
            flag = name.replace("_", "-")
            raise UserError(
                f"--resume {run_dir}: --{flag} {value} differs from the run's {saved[name]}; a resumed run keeps "
                "its flags (start a new run to change it)"
            )
        setattr(args, name, saved[name])
    # The folder the run is in now, not this invocation's default: the checkpoints written from here on, and the
    # pretrained_with of a run started from its offline.pt, name the run they came from (with its --exp-name above).
    args.run_dir = os.path.dirname(os.path.abspath(run_path))
    return checkpoint, run_path


def resume_state(writer, run_path: Path, env: gym.Env) -> dict:
    """What a checkpoint needs besides the script's own state: RNG streams, the training env, event file sizes."""
    writer.flush()
    return {"rng": rng_state(), "env": env_state(env), "events": event_files(run_path)}
