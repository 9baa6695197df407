"""Offline datasets: guarded loading of Minari data (names in utils.names), flat float32 arrays, the checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.names import (
    BEHAVIOR_ROOT,
    RANDOM_DATASET_STEPS,
    REFUSED,
    datasets_root,
    is_local,
    observation_keys,
    resolve_name,
    task_of_env_id,
)

# ---------------------------------------------------------------------------------------------------
# Loading with a network guard
# ---------------------------------------------------------------------------------------------------


def offline_mode() -> bool:
    """True when O2O_OFFLINE or HF_HUB_OFFLINE is set to a true value: never touch the network."""
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes") for var in ("O2O_OFFLINE", "HF_HUB_OFFLINE"))


def hub_reachable(timeout: float = 4.0) -> tuple[bool, str]:
    """Probe the Hugging Face endpoint with a bounded HTTP request.

    A plain TCP connect is not enough: a network that accepts and never answers makes huggingface_hub
    hang forever (its dataset listing has no timeout), so we wait for an HTTP answer, any status.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/api/datasets?limit=1", method="HEAD"), timeout=timeout
        )
    except urllib.error.HTTPError:
        return True, ""  # the server answered; the status does not matter here
    except Exception as err:  # timeouts, DNS failures, refused connections, TLS errors ...
        timed_out = isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError)
        what = f"did not answer within {timeout:.0f} s" if timed_out else "cannot be reached"
        return False, f"{endpoint} {what} ({type(err).__name__}: {err})"
    return True, ""


def _missing_error(minari_id: str, reason: str) -> UserError:
    return UserError(
        f"Minari dataset '{minari_id}' is not under MINARI_DATASETS_PATH={datasets_root()} and cannot be "
        f"downloaded: {reason}. Download it on a connected machine (`minari download {minari_id}`) and copy "
        f"the folder {minari_id}/ there, or create one with `python -m utils.make_dataset`"
    )


def ensure_local(minari_id: str) -> None:
    """Make sure the dataset is on disk: local data never touches the network; downloads are guarded."""
    if is_local(minari_id):
        return
    if offline_mode():
        raise _missing_error(minari_id, "offline mode is on (O2O_OFFLINE or HF_HUB_OFFLINE)")
    reachable, why = hub_reachable()
    if not reachable:
        raise _missing_error(minari_id, why)
    try:
        import minari

        minari.download_dataset(minari_id)
    except Exception as err:  # the hub's connection errors are not OSError subclasses
        raise _missing_error(minari_id, f"download failed ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------------------------------
# Flattening
# ---------------------------------------------------------------------------------------------------

FLAT_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "episode_ends")
# Part of the cache key: raise it whenever flatten_hdf5 or the arrays it writes change meaning.
FLAT_FORMAT_VERSION = 2


def check_supported(minari_id: str, env_spec: str | None, dataset) -> None:
    """One clear line for data the scripts cannot train on, before anything is read or crashes later."""
    env_id = json.loads(env_spec)["id"] if env_spec else ""
    if env_id.startswith("FrankaKitchen"):
        raise UserError(f"'{minari_id}' is not supported: {REFUSED['kitchen']}")
    from gymnasium.spaces import Box, Dict

    def is_vector(space) -> bool:
        return isinstance(space, Box) and len(space.shape) == 1

    if not is_vector(dataset.action_space):
        raise UserError(
            f"'{minari_id}' has actions {dataset.action_space}; the scripts need continuous vector (Box) actions"
        )
    space = dataset.observation_space
    parts = space.spaces.values() if isinstance(space, Dict) else [space]
    if not all(is_vector(part) for part in parts):
        raise UserError(
            f"'{minari_id}' has observations {space}; the scripts need flat vector observations or a Dict of "
            "them (no images, nested or discrete spaces)"
        )


def _read_array(file_id, path: str) -> np.ndarray:
    import h5py

    dset = h5py.h5d.open(file_id, path.encode())  # the low-level API skips h5py's per-call overhead
    out = np.empty(dset.shape, dtype=dset.dtype)
    dset.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
    return out


def flatten_hdf5(hdf5_path: Path, episode_indices, total_steps: int, obs_keys) -> dict[str, np.ndarray]:
    """Read Minari's HDF5 directly into flat float32 transition arrays.

    Per episode with T steps the file holds T+1 observations: obs = O[:-1], next_obs = O[1:].
    terminals = terminations (no bootstrap); truncations only end episodes. Nothing is dropped.
    """
    import h5py

    arrays: dict[str, np.ndarray] | None = None
    row = 0
    with h5py.File(hdf5_path, "r") as file:
        for index in episode_indices:
            group = f"episode_{int(index)}"
            if obs_keys is None:
                observations = _read_array(file.id, f"{group}/observations")
            else:
                parts = [_read_array(file.id, f"{group}/observations/{key}") for key in obs_keys]
                observations = np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
            actions = _read_array(file.id, f"{group}/actions")
            steps = len(actions)
            if arrays is None:
                arrays = {
                    "observations": np.empty((total_steps, *observations.shape[1:]), np.float32),
                    "actions": np.empty((total_steps, *actions.shape[1:]), np.float32),
                    **{key: np.zeros(total_steps, np.float32) for key in ("rewards", "terminals", "episode_ends")},
                }
                arrays["next_observations"] = np.empty_like(arrays["observations"])
            if len(observations) != steps + 1 or row + steps > total_steps:
                raise ValueError(f"{group} has {len(observations)} observations for {steps} actions")
            end = row + steps
            arrays["observations"][row:end] = observations[:-1]
            arrays["next_observations"][row:end] = observations[1:]
            arrays["actions"][row:end] = actions
            arrays["rewards"][row:end] = _read_array(file.id, f"{group}/rewards")
            arrays["terminals"][row:end] = _read_array(file.id, f"{group}/terminations")
            arrays["episode_ends"][end - 1] = 1.0
            row = end
    if arrays is None or row != total_steps:
        raise ValueError(f"episodes hold {row} steps but the metadata says {total_steps}")
    return arrays


def _cache_path(minari_id: str, hdf5_path: Path, total_steps: int, obs_keys) -> Path:
    stat = hdf5_path.stat()
    # Keyed by id and size; the file's byte size and mtime catch a dataset recreated under the same id, the
    # format version and the observation layout a change to the flattening or to the key order.
    key = f"{FLAT_FORMAT_VERSION}|{obs_keys}|{hdf5_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    cache_dir = Path(os.environ.get("O2O_CACHE_DIR") or datasets_root() / ".o2o-flat-cache")
    return cache_dir / f"{minari_id.replace('/', '__')}__{total_steps}steps__{digest}.npz"


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


@dataclass
class _MinariPart:
    arrays: dict[str, np.ndarray]
    env_spec: str | None
    eval_env_spec: str | None
    observation_space: object
    ref_scores: tuple[float, float] | None


def _load_part(minari_id: str, use_cache: bool) -> _MinariPart:
    import minari

    ensure_local(minari_id)
    metadata_path = datasets_root() / minari_id / "data" / "metadata.json"
    with contextlib.suppress(OSError, ValueError):  # an unreadable file is reported below, as corrupted
        data_format = json.loads(metadata_path.read_text()).get("data_format", "hdf5")
        if data_format != "hdf5":
            raise UserError(
                f"'{minari_id}' is stored as {data_format!r}; only Minari's hdf5 format is supported "
                "(recreate it with data_format='hdf5', e.g. with `python -m utils.make_dataset`)"
            )
    try:
        dataset = minari.load_dataset(minari_id)
        metadata = dataset.storage.metadata
        total_steps = int(dataset.total_steps)
        env_spec = metadata.get("env_spec")
        eval_env_spec = metadata.get("eval_env_spec") or env_spec
        task = task_of_env_id(json.loads(env_spec)["id"]) if env_spec else None
        check_supported(minari_id, env_spec, dataset)
        obs_keys = observation_keys(task, dataset.observation_space)
        hdf5_path = Path(dataset.storage.data_path) / "main_data.hdf5"
        cache = _cache_path(minari_id, hdf5_path, total_steps, obs_keys)
        if use_cache and cache.is_file():
            with np.load(cache) as stored:
                arrays = {key: stored[key] for key in FLAT_KEYS}
        else:
            arrays = flatten_hdf5(hdf5_path, dataset.episode_indices, total_steps, obs_keys)
            if use_cache:
                _atomic_savez(cache, arrays)
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"Minari dataset '{minari_id}' under {datasets_root()} could not be read "
            f"({type(err).__name__}: {err}); it may be truncated or corrupted: delete "
            f"{datasets_root() / minari_id} and download or create it again"
        ) from err
    if task == "antmaze":
        # D4RL's AntMaze episodes end at the goal, Minari's continue (continuing_task=True): a goal-reaching
        # step is terminal here, and make_env ends online episodes there too, so both agree.
        arrays["terminals"] = np.maximum(arrays["terminals"], (arrays["rewards"] > 0).astype(np.float32))
    low, high = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    refs = (float(low), float(high)) if low is not None and high is not None else None
    return _MinariPart(arrays, env_spec, eval_env_spec, dataset.observation_space, refs)


@dataclass
class OfflineData:
    """A dataset as flat float32 transition arrays, with what is needed to rebuild its environment."""

    name: str
    minari_ids: tuple[str, ...]
    env_spec: str  # Gymnasium EnvSpec JSON of the data-collection env
    eval_env_spec: str  # the dataset's evaluation env (AntMaze: fixed D4RL goal); the data env otherwise
    task: str | None  # key of the D4RL reference table, 'antmaze', or None
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray  # 1.0 = terminated: do not bootstrap
    episode_ends: np.ndarray  # 1.0 on the last transition of every episode (terminated or truncated)
    minari_ref_scores: tuple[float, float] | None = field(default=None)  # Minari metadata refs, if any

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def env_id(self) -> str:
        return json.loads(self.env_spec)["id"]

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: getattr(self, key) for key in FLAT_KEYS}

    def describe(self) -> str:
        return (
            f"'{self.name}' = Minari {' + '.join(self.minari_ids)}; env {self.env_id}; {len(self)} transitions, "
            f"{int(self.episode_ends.sum())} episodes, {int(self.terminals.sum())} terminal; "
            f"obs dim {self.observations.shape[1]}, action dim {self.actions.shape[1]}"
        )


def load_dataset(name: str, use_cache: bool = True, random_steps: int = RANDOM_DATASET_STEPS) -> OfflineData:
    """Load a dataset by D4RL-style name or Minari id as flat float32 arrays (cached on disk).

    `random_steps` sets the size of a random or sac-medium dataset generated on first use (tests make tiny
    ones); a sac-medium-replay dataset has the length of the behaviour's training run up to medium.
    """
    resolved = resolve_name(name)
    if resolved.generate_env_id and not is_local(resolved.minari_ids[0]):
        from utils.make_dataset import collect_behavior_dataset, collect_dataset

        minari_id, env_id, level = resolved.minari_ids[0], resolved.generate_env_id, resolved.behavior_level
        what = (
            f"{level} data of our SAC behaviour policy" if level else f"{random_steps} steps of uniform random actions"
        )
        print(f"{minari_id} is not under {datasets_root()}: generating {what} on {env_id} (done once)", file=sys.stderr)
        if level is None:
            collect_dataset(env_id, minari_id, steps=random_steps)
        else:
            behavior_dir = BEHAVIOR_ROOT / task_of_env_id(env_id)
            collect_behavior_dataset(env_id, minari_id, level, random_steps, behavior_dir)
    parts = [_load_part(minari_id, use_cache) for minari_id in resolved.minari_ids]
    first = parts[0]
    if first.env_spec is None:
        raise UserError(
            f"Minari dataset '{resolved.minari_ids[0]}' stores no environment spec; it cannot be fine-tuned online"
        )
    arrays = {
        key: np.concatenate([part.arrays[key] for part in parts]) if len(parts) > 1 else first.arrays[key]
        for key in FLAT_KEYS
    }
    return OfflineData(
        name=resolved.name,
        minari_ids=resolved.minari_ids,
        env_spec=first.env_spec,
        eval_env_spec=first.eval_env_spec,
        task=task_of_env_id(json.loads(first.env_spec)["id"]),
        minari_ref_scores=first.ref_scores if len(parts) == 1 else None,  # Minari refs do not survive a concat
        **arrays,
    )


def check_pretrained_dataset(checkpoint: dict, data: OfflineData, path: str) -> None:
    """A checkpoint continues only on the data it was trained on: its networks, state statistics and reward
    scale belong to that dataset, and mixing them with another one's would change the run's meaning."""
    trained = checkpoint.get("dataset")
    try:
        same = trained is not None and resolve_name(trained).minari_ids == data.minari_ids
    except UserError:
        same = False
    if not same:
        raise UserError(f"--pretrained {path} was trained on {trained}, not {data.name}: pass --env-id {trained}")
