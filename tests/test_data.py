import contextlib
import json
import shutil
import socket
import threading
import time

import gymnasium
import h5py
import minari
import numpy as np
import pytest

import utils.data as data_module
from tests.conftest import REPO, error_line, run_cli
from utils import UserError, load_dataset, normalized_score
from utils.data import FLAT_KEYS, flatten_hdf5


def naive_flatten(minari_id: str) -> dict[str, np.ndarray]:
    """Episode by episode through Minari's own reader: the reference the fast path must equal."""
    parts = {key: [] for key in FLAT_KEYS}
    for episode in minari.load_dataset(minari_id).iterate_episodes():
        steps = len(episode.actions)
        parts["observations"].append(episode.observations[:-1])
        parts["next_observations"].append(episode.observations[1:])
        parts["actions"].append(episode.actions)
        parts["rewards"].append(episode.rewards)
        parts["terminals"].append(episode.terminations)
        ends = np.zeros(steps)
        ends[-1] = 1
        parts["episode_ends"].append(ends)
    return {key: np.concatenate(value).astype(np.float32) for key, value in parts.items()}


def test_flattening_equals_naive_construction(minari_root):
    dataset = minari.load_dataset("mujoco/hopper/medium-v0")
    terminations = sum(int(ep.terminations[-1]) for ep in dataset.iterate_episodes())
    truncations = sum(int(ep.truncations[-1] and not ep.terminations[-1]) for ep in dataset.iterate_episodes())
    assert terminations > 0 and truncations > 0, "the fixture must hold both kinds of episode end"

    data = load_dataset("hopper-medium", use_cache=False)
    reference = naive_flatten("mujoco/hopper/medium-v0")
    assert len(data) == dataset.total_steps == 2000  # nothing dropped, not even truncated last steps
    for key in FLAT_KEYS:
        assert getattr(data, key).dtype == np.float32
        np.testing.assert_array_equal(getattr(data, key), reference[key], err_msg=key)
    assert data.episode_ends.sum() == dataset.total_episodes
    assert data.terminals.sum() == terminations  # truncated ends are not terminal: they bootstrap
    # within an episode, next_obs is the following row's obs
    inside = data.episode_ends[:-1] == 0
    np.testing.assert_array_equal(data.next_observations[:-1][inside], data.observations[1:][inside])
    assert data.task == "hopper" and data.env_id == "Hopper-v5"


def test_cache_is_used_and_identical(minari_root, monkeypatch):
    fresh = load_dataset("hopper-medium")  # writes the cache
    monkeypatch.setattr(data_module, "flatten_hdf5", lambda *a, **k: pytest.fail("cache was not used"))
    cached = load_dataset("hopper-medium")
    for key in FLAT_KEYS:
        np.testing.assert_array_equal(getattr(cached, key), getattr(fresh, key))
    assert any((minari_root / ".o2o-flat-cache").glob("mujoco__hopper__medium-v0__2000steps__*.npz"))


def test_cache_is_invalidated_when_the_dataset_is_recreated(tmp_path, monkeypatch):
    from utils.make_dataset import collect_dataset

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    collect_dataset("Hopper-v5", "mujoco/hopper/simple-v0", steps=200, seed=0)
    first = load_dataset("hopper-simple")
    time.sleep(0.01)
    collect_dataset("Hopper-v5", "mujoco/hopper/simple-v0", steps=200, seed=7, overwrite=True)
    second = load_dataset("hopper-simple")
    assert len(first) == len(second) == 200
    assert not np.array_equal(first.observations, second.observations)


def test_medium_expert_is_medium_then_expert(minari_root):
    medium, expert = load_dataset("hopper-medium"), load_dataset("hopper-expert")
    both = load_dataset("hopper-medium-expert-v2")
    assert len(both) == len(medium) + len(expert) == 2500
    for key in FLAT_KEYS:
        np.testing.assert_array_equal(getattr(both, key), np.concatenate([getattr(medium, key), getattr(expert, key)]))
    assert both.minari_ids == ("mujoco/hopper/medium-v0", "mujoco/hopper/expert-v0")


def test_random_dataset_is_generated_on_first_use(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    data = load_dataset("walker2d-random", random_steps=300)
    assert len(data) == 300 and data.env_id == "Walker2d-v5"
    assert (tmp_path / "o2o-local/walker2d/random-v0/data/main_data.hdf5").is_file()
    assert "generating 300 steps" in capsys.readouterr().err
    again = load_dataset("walker2d-random", random_steps=999)  # found locally: not regenerated
    assert len(again) == 300


def test_dict_observations_flatten_in_d4rl_antmaze_order(tmp_path):
    path = tmp_path / "main_data.hdf5"
    rng = np.random.default_rng(0)
    episodes = []
    with h5py.File(path, "w") as file:
        for index, steps in enumerate([3, 5]):
            group = file.create_group(f"episode_{index}")
            obs = {"achieved_goal": rng.normal(size=(steps + 1, 2)), "observation": rng.normal(size=(steps + 1, 27))}
            for key, value in obs.items():
                group.create_dataset(f"observations/{key}", data=value)
            group.create_dataset("actions", data=rng.normal(size=(steps, 8)).astype(np.float32))
            group.create_dataset("rewards", data=np.arange(steps, dtype=np.float64))
            group.create_dataset("terminations", data=np.zeros(steps, bool))
            group.create_dataset("truncations", data=np.eye(steps, dtype=bool)[-1])
            episodes.append(obs)
    arrays = flatten_hdf5(path, [0, 1], 8, ("achieved_goal", "observation"))
    expected = np.concatenate([np.concatenate([ep["achieved_goal"], ep["observation"]], 1)[:-1] for ep in episodes])
    np.testing.assert_allclose(arrays["observations"], expected.astype(np.float32))
    assert arrays["observations"].shape == (8, 29)
    np.testing.assert_array_equal(arrays["episode_ends"], [0, 0, 1, 0, 0, 0, 0, 1])


def test_corrupted_hdf5_gives_one_clear_error(minari_root, tmp_path, monkeypatch):
    shutil.copytree(minari_root / "mujoco/hopper/medium-v0", tmp_path / "mujoco/hopper/medium-v0")
    hdf5 = tmp_path / "mujoco/hopper/medium-v0/data/main_data.hdf5"
    hdf5.write_bytes(hdf5.read_bytes()[: hdf5.stat().st_size // 3])  # a truncated download
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(UserError, match="truncated or corrupted") as caught:
        load_dataset("hopper-medium")
    assert "mujoco/hopper/medium-v0" in str(caught.value)
    result = run_cli(["-m", "utils", "hopper-medium"], {"MINARI_DATASETS_PATH": str(tmp_path)}, cwd=REPO)
    assert result.returncode != 0
    assert error_line(result.stderr).startswith("error: Minari dataset 'mujoco/hopper/medium-v0'")


def test_metadata_lying_about_size_is_reported(minari_root, tmp_path, monkeypatch):
    shutil.copytree(minari_root / "mujoco/hopper/medium-v0", tmp_path / "mujoco/hopper/medium-v0")
    metadata_path = tmp_path / "mujoco/hopper/medium-v0/data/metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["total_steps"] += 5
    metadata_path.write_text(json.dumps(metadata))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(UserError, match="2000 steps but the metadata says 2005"):
        load_dataset("hopper-medium", use_cache=False)


def test_missing_dataset_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setenv("O2O_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        load_dataset("halfcheetah-expert")
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "mujoco/halfcheetah/expert-v0" in message and str(tmp_path) in message and "make_dataset" in message


@pytest.fixture
def tarpit():
    """A local server that accepts connections and never answers: huggingface_hub would hang on it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted, stop = [], threading.Event()

    def accept_forever():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):  # the accept timeout, to check `stop` now and then
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    server.close()


def test_missing_dataset_on_a_silent_network_fails_within_seconds(tarpit, tmp_path, monkeypatch):
    endpoint, accepted = tarpit
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.delenv("O2O_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.monotonic()
    with pytest.raises(UserError, match="did not answer within 4 s") as caught:
        load_dataset("hopper-expert")
    assert time.monotonic() - start < 10
    assert accepted, "the probe never reached the silent server"
    assert "mujoco/hopper/expert-v0" in str(caught.value) and str(tmp_path) in str(caught.value)

    env = {"MINARI_DATASETS_PATH": str(tmp_path), "HF_ENDPOINT": endpoint, "O2O_OFFLINE": "", "HF_HUB_OFFLINE": ""}
    start = time.monotonic()
    result = run_cli(["-m", "utils", "hopper-expert"], env, timeout=30, cwd=REPO)
    assert time.monotonic() - start < 30
    assert result.returncode != 0
    assert error_line(result.stderr).startswith("error: Minari dataset 'mujoco/hopper/expert-v0' is not under")


def test_refused_connection_fails_fast(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.delenv("O2O_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match=r"cannot be reached \(URLError: .*Connection refused"):
        load_dataset("hopper-expert")


@pytest.mark.parametrize("name", ["hopper-medium-replay", "nonsense", "mujoco/hopper/medium"])
def test_cli_bad_names_exit_with_one_line(name, minari_root):
    result = run_cli(["-m", "utils", name], cwd=REPO, timeout=30)
    assert result.returncode != 0
    assert error_line(result.stderr).startswith("error: ")
    assert "Traceback" not in result.stderr


def test_normalized_score_reference_points():
    assert normalized_score("hopper", 3234.3) == pytest.approx(100.0)
    assert normalized_score("hopper", -20.272305) == pytest.approx(0.0)
    assert normalized_score("halfcheetah", (12135.0 - 280.178953) / 2) == pytest.approx(50.0)  # the midpoint
    assert normalized_score("walker2d", 1000.0) == pytest.approx(100 * 998.370992 / 4590.670992)
    assert normalized_score("pen", 3076.8331017826877) == pytest.approx(100.0)
    assert normalized_score("antmaze", 123.0, success_rate=0.3) == pytest.approx(30.0)
    assert np.isnan(normalized_score(None, 10.0))


class ImageEnv(gymnasium.Env):
    """Image observations: loadable by Minari, not by the scripts' flat buffers."""

    observation_space = gymnasium.spaces.Box(0, 255, (4, 4, 3), np.uint8)
    action_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


@pytest.fixture
def test_env_ids():
    """Register ImageEnv under the given ids for one test."""
    made = []

    def register(env_id):
        if env_id in gymnasium.registry:
            pytest.skip(f"{env_id} is registered by an installed package")
        gymnasium.register(env_id, entry_point=f"{__name__}:ImageEnv", max_episode_steps=10)
        made.append(env_id)

    yield register
    for env_id in made:
        del gymnasium.registry[env_id]


def test_unsupported_data_gets_one_line_that_says_what(tmp_path, monkeypatch, test_env_ids):
    from utils.make_dataset import collect_dataset

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    collect_dataset("CartPole-v1", "test/cartpole/discrete-v0", steps=30)
    with pytest.raises(UserError, match=r"'test/cartpole/discrete-v0' has actions Discrete\(2\); .*continuous"):
        load_dataset("test/cartpole/discrete-v0")
    test_env_ids("Pixels-v0")
    collect_dataset("Pixels-v0", "test/pixels/image-v0", steps=30)
    with pytest.raises(UserError, match=r"'test/pixels/image-v0' has observations Box.*flat vector observations"):
        load_dataset("test/pixels/image-v0")
    test_env_ids("FrankaKitchen-v1")  # a kitchen env spec behind a raw id bypasses the name table
    collect_dataset("FrankaKitchen-v1", "D4RL/kitchen/mixed-v2", steps=30)
    with pytest.raises(UserError, match=r"'D4RL/kitchen/mixed-v2' is not supported: FrankaKitchen-v1 does not run"):
        load_dataset("D4RL/kitchen/mixed-v2")


def test_non_hdf5_data_format_is_named_not_called_corrupted(minari_root, tmp_path, monkeypatch):
    shutil.copytree(minari_root / "mujoco/hopper/medium-v0", tmp_path / "mujoco/hopper/medium-v0")
    metadata_path = tmp_path / "mujoco/hopper/medium-v0/data/metadata.json"
    metadata_path.write_text(json.dumps(json.loads(metadata_path.read_text()) | {"data_format": "arrow"}))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(UserError, match="stored as 'arrow'; only Minari's hdf5 format is supported") as caught:
        load_dataset("hopper-medium")
    assert "corrupted" not in str(caught.value)


def test_cache_key_holds_the_format_version_and_the_observation_layout(minari_root, monkeypatch):
    load_dataset("hopper-medium")  # cached under the current format version
    monkeypatch.setattr(data_module, "FLAT_FORMAT_VERSION", data_module.FLAT_FORMAT_VERSION + 1)
    reads = []
    real_flatten = data_module.flatten_hdf5
    monkeypatch.setattr(data_module, "flatten_hdf5", lambda *a: reads.append(a) or real_flatten(*a))
    load_dataset("hopper-medium")
    assert len(reads) == 1, "a cache of another format version was served"
    hdf5 = minari_root / "mujoco/hopper/medium-v0/data/main_data.hdf5"
    by_layout = {data_module._cache_path("x/y-v0", hdf5, 10, keys) for keys in (None, ("a", "b"), ("b", "a"))}
    assert len(by_layout) == 3
