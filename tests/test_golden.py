"""Golden runs: each script's tiny deterministic CPU run through its real main() (offline phase, hand-over,
online phase) reproduces, bit for bit, the final.pt and TensorBoard scalars committed under tests/golden/.

They pin what the scripts compute, so that code can be moved (shared plumbing into utils/, a section
rewritten) without changing a number: a refactor that changes one is a bug until its reason is named, and
then the fixture is rewritten with the reason in the commit message:

    python -m tests.test_golden            # rewrites tests/golden/*.pt from the scripts as they are

Bit equality holds for one set of library versions and one set of torch's CPU kernels; the fixture records the
versions of torch, numpy, mujoco and gymnasium, and where they differ from the ones installed the test skips and says
so. The kernels are pinned: each golden run is made in its own process with torch's AVX2 kernels (x86), since the
AVX-512 ones round some reductions differently (a logged mean moves in its last bit) and a process picks its kernels
once, when torch first needs them; off x86, a golden written with other kernels than the run's skips.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import gymnasium
import mujoco
import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

from tests.conftest import REPO
from tests.test_resume import all_scalars
from utils.fast import FastUpdate

GOLDEN = Path(__file__).resolve().parent / "golden"
# tiny networks and budgets: a few dozen updates in each phase, evaluations at both ends of each
SIZES = {"hidden_dim": 16, "batch_size": 8, "eval_episodes": 1, "offline_steps": 30, "online_steps": 40}
CADENCE = {"eval_freq": 20, "offline_eval_freq": 15, "log_freq": 5}
RUNS = {
    "so2": ("so2", {"num_critics": 3, "warmup_steps": 5, "updates_per_step": 2, "actor_update_freq": 2,
                    "mixed_batch_size": 16}),
    "enoto": ("enoto", {"num_critics": 3, "warmup_steps": 5}),
    "baq": ("baq", {"bc_steps": 5, "probe_states": 50}),
    "baq-iql": ("baq", {"bc_steps": 5, "probe_states": 50, "backbone": "iql"}),
    "off2on": ("off2on", {"num_agents": 2, "bc_steps": 5, "block_steps": 10, "first_block_multiplier": 2}),
    "opt": ("opt", {"n_tau": 10, "n_pretrain": 5}),
    "opt-spot": ("opt", {"n_tau": 10, "n_pretrain": 5, "backbone": "spot", "vae_steps": 10}),
}  # fmt: skip
LARGE = 4096  # tensors with more elements are kept as a digest of their bytes (SPOT's VAE is 750 wide)
KERNELS = {"ATEN_CPU_CAPABILITY": "avx2"} if platform.machine().lower() in ("x86_64", "amd64") else {}


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "numpy": np.__version__, "mujoco": mujoco.__version__,
            "gymnasium": gymnasium.__version__}  # fmt: skip


def golden_or_skip(name: str) -> dict:
    """tests/golden/<name>.pt, or a skip where the libraries differ from its own."""
    golden = torch.load(GOLDEN / f"{name}.pt", weights_only=False)
    if golden["versions"] != versions():
        pytest.skip(f"golden {name} was written with {golden['versions']}; installed: {versions()}")
    return golden


def same_kernels_or_skip(golden: dict, result: dict) -> None:
    """On x86 the run must have used the pinned AVX2 kernels (a pin that stopped working fails, it does not skip);
    elsewhere a golden written with other kernels than the run's skips."""
    written = golden.get("cpu kernels", "AVX2")  # the goldens written before this key was kept: AVX2
    if KERNELS:
        assert result["cpu kernels"] == "AVX2" == written, (result["cpu kernels"], written)
    elif result["cpu kernels"] != written:
        pytest.skip(
            f"golden written with torch's {written} CPU kernels; this machine's run used {result['cpu kernels']}"
        )


def leaves(value, prefix: str = "") -> dict:
    """Every tensor and number of a checkpoint, flattened to name -> value (its args, which hold paths, left out)."""
    if isinstance(value, dict):
        found = {}
        for key, item in value.items():
            if not (prefix == "" and key == "args"):
                found |= leaves(item, f"{prefix}.{key}" if prefix else str(key))
        return found
    if isinstance(value, list | tuple):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{prefix}[{i}]").items()}
    if isinstance(value, torch.Tensor | int | float | bool | str) or value is None:
        return {prefix: value}
    return {prefix: repr(value)}


def digest(tensor: torch.Tensor) -> str:
    """dtype, shape and sha256 of the bytes: equal exactly when the tensors are equal bit for bit."""
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return f"{tensor.dtype} {tuple(tensor.shape)} {hashlib.sha256(data).hexdigest()}"


def golden_run(name: str, run_dir: Path, static_outputs: bool = False) -> dict:
    """The run `name` of RUNS on the tests' tiny hopper data (MINARI_DATASETS_PATH set), in a process of its own with
    the pinned CPU kernels: final.pt, scalars and the kernels used. With `static_outputs` the script's FastUpdate
    is StaticOutputs."""
    out = run_dir.parent / f"{run_dir.name}-golden.pt"
    code = "import sys; from tests.test_golden import golden_child; golden_child(*sys.argv[1:])"
    command = [sys.executable, "-c", code, name, str(run_dir), str(out), str(int(static_outputs))]
    env = {**os.environ, **KERNELS, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    return torch.load(out, weights_only=False)


def golden_child(name: str, run_dir: str, out: str, static_outputs: str) -> None:
    if static_outputs == "1":
        importlib.import_module(f"algorithms.{RUNS[name][0]}").FastUpdate = StaticOutputs
    kernels = {"cpu kernels": torch.backends.cpu.get_cpu_capability()}
    torch.save(golden_run_here(name, Path(run_dir)) | kernels, out)


def golden_run_here(name: str, run_dir: Path) -> dict:
    script, flags = RUNS[name]
    module = importlib.import_module(f"algorithms.{script}")
    fixed = {"env_id": "hopper-medium", "run_dir": str(run_dir), "cuda": False, "progress": False, "seed": 1}
    torch.set_num_threads(1)
    run_path = module.main(module.Args(**SIZES | CADENCE | flags | fixed))
    final = torch.load(run_path / "final.pt", weights_only=False)
    final = {k: digest(v) if torch.is_tensor(v) and v.numel() > LARGE else v for k, v in leaves(final).items()}
    return {"final": final, "scalars": all_scalars(run_path)}


@pytest.mark.parametrize("name", list(RUNS))
def test_golden_run_is_reproduced_bit_for_bit(minari_root, tmp_path, name):
    golden = golden_or_skip(name)
    result = golden_run(name, tmp_path / "run")
    same_kernels_or_skip(golden, result)
    assert result["scalars"].keys() == golden["scalars"].keys()
    for tag, points in golden["scalars"].items():
        assert result["scalars"][tag] == points, tag
    assert result["final"].keys() == golden["final"].keys()
    for key, expected in golden["final"].items():
        value = result["final"][key]
        if isinstance(expected, torch.Tensor):
            assert value.dtype == expected.dtype and torch.equal(value, expected), key
        else:
            assert value == expected, key


class StaticOutputs(FastUpdate):
    """FastUpdate as a replayed CUDA graph returns: every call of a key writes its results into the same tensors."""

    def __init__(self, update, compile: bool = False, cudagraphs: bool = False, warmup: int = 3):
        super().__init__(update, compile)
        self.outputs = {}

    def __call__(self, *key):
        fresh = self.update(*key)
        if key not in self.outputs:
            self.outputs[key] = tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, fresh)
        static = self.outputs[key]
        for old, new in zip(tree_leaves(static), tree_leaves(fresh), strict=True):
            if torch.is_tensor(old):
                old.copy_(new)
        return static


@pytest.mark.parametrize("name", list(RUNS))
def test_metrics_survive_update_outputs_that_the_next_call_overwrites(minari_root, tmp_path, name):
    """Under --cudagraphs an update returns the same output tensors at every replay; the logged means must be those
    of every update, not the last one's repeated (the golden run's scalars, bit for bit)."""
    golden = golden_or_skip(name)
    result = golden_run(name, tmp_path / "run", static_outputs=True)
    same_kernels_or_skip(golden, result)
    assert result["scalars"] == golden["scalars"]


def write_goldens(names: list[str]) -> None:
    """Rewrite tests/golden/<name>.pt for `names` on freshly made tiny datasets (the tests' own recipe), on x86 with
    the pinned AVX2 kernels only (a golden written with others would make every x86 run fail)."""
    import tempfile

    from tests.conftest import TINY_HORIZON
    from utils.make_dataset import collect_dataset

    with tempfile.TemporaryDirectory() as root:
        os.environ["MINARI_DATASETS_PATH"], os.environ["O2O_OFFLINE"] = root, "1"
        collect_dataset("Hopper-v5", "mujoco/hopper/medium-v0", steps=2000, seed=0, max_episode_steps=TINY_HORIZON)
        GOLDEN.mkdir(exist_ok=True)
        for name in names:
            result = golden_run(name, Path(root) / "runs" / name)
            if KERNELS and result["cpu kernels"] != "AVX2":
                raise SystemExit(f"error: the golden run used torch's {result['cpu kernels']} kernels, not AVX2")
            torch.save(result | {"versions": versions(), "flags": RUNS[name]}, GOLDEN / f"{name}.pt")
            print(f"wrote {GOLDEN / name}.pt: {len(result['final'])} values, {len(result['scalars'])} tags")


if __name__ == "__main__":
    write_goldens(sys.argv[1:] or list(RUNS))
