"""--compile computes what eager computes, and the update steps stay one graph while the buffers grow.

Every script's speed setup (benchmark/setups.py) builds its update steps as its phases do (FastUpdate around
the same step functions), so these tests drive the real updates: a few offline updates, the hand-over, the other phases,
then online steps that each add a row to the online buffer first. Inductor draws its own random numbers
unless `fallback_random` is set; with it, eager and compiled draw the same ones and must agree closely.

Inductor compiles for 30-90 s per script on a 2-core CPU, so the suite runs it for SO2 alone and every script
through the aot_eager backend (the same graph capture, guards and AOTAutograd, with eager kernels: seconds);
O2O_COMPILE_TESTS=1 adds inductor for all and a compiled end-to-end run of each script (about 15 minutes).
"""

from __future__ import annotations

import importlib
import os
from functools import partial

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch.utils._pytree import tree_leaves

from benchmark.setups import SETUPS
from tests.conftest import REPO, run_cli, scalars
from utils import UserError
from utils.fast import FastUpdate, check_fast_flags

SCRIPTS = ["so2", "enoto", "baq", "baq-iql", "off2on", "opt"]  # BAQ's speed hook runs CQL unless told IQL
OFFLINE_CALLS, ONLINE_CALLS = 6, 8  # 20 updates or more per script (SO2: 10 critic updates per online call)


def trajectory(name: str, mode: str) -> torch.Tensor:
    """Every value the update steps return, in order, from one seed."""
    torch.manual_seed(0)
    script, _, backbone = name.partition("-")
    extra = {"backbone": backbone} if backbone else {}
    hooks = SETUPS[script]("hopper", 11, 3, torch.device("cpu"), True, mode, **extra)
    act = hooks.get("act", lambda: None)  # ENOTO's action choice draws random numbers between its updates
    values = [tree_leaves(hooks["offline"]()) for _ in range(OFFLINE_CALLS)]
    hooks["hand_over"]()
    for phase in hooks.get("other_phases", {}).values():
        values += [tree_leaves(phase()) for _ in range(OFFLINE_CALLS)]
    values += [tree_leaves((act(), hooks["online"]())[1]) for _ in range(2)]  # every online variant compiled
    with torch._dynamo.config.patch(error_on_recompile=True):  # a bound that tracks the buffer's size would fail
        values += [tree_leaves((act(), hooks["online"]())[1]) for _ in range(ONLINE_CALLS - 2)]
    return torch.stack([v.detach().float().reshape(()) for leaves in values for v in leaves if torch.is_tensor(v)])


ALL_COMPILE_TESTS = pytest.mark.skipif(
    not os.environ.get("O2O_COMPILE_TESTS"), reason="inductor for every script: set O2O_COMPILE_TESTS=1 (~15 min)"
)
BACKENDS = [("aot_eager", name) for name in SCRIPTS] + [("inductor", "so2")]
BACKENDS += [pytest.param("inductor", name, marks=ALL_COMPILE_TESTS) for name in SCRIPTS if name != "so2"]


@pytest.mark.parametrize("backend, name", BACKENDS)
def test_compile_matches_eager_and_does_not_recompile_as_the_buffer_grows(monkeypatch, backend, name):
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend=backend))
    torch._dynamo.reset()
    eager = trajectory(name, "eager")
    # Every Python value a graph reads is baked in and guarded: a bound or schedule that changes per step
    # (what a CUDA graph would freeze) then fails the error_on_recompile part of `trajectory`.
    static = {"specialize_int": True, "specialize_float": True, "automatic_dynamic_shapes": False}
    with torch._inductor.config.patch(fallback_random=True), torch._dynamo.config.patch(static):
        compiled = trajectory(name, "compile")
    assert len(compiled) == len(eager) >= 20
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


def test_fast_update_without_cudagraphs_is_the_function_and_cudagraphs_need_cuda():
    calls = []
    update = FastUpdate(lambda key: calls.append(key) or key)
    assert update("a") == "a" and calls == ["a"]
    check_fast_flags(False, torch.device("cpu"))
    with pytest.raises(UserError, match="--cudagraphs needs a CUDA device"):
        check_fast_flags(True, torch.device("cpu"))


@pytest.mark.slow
@ALL_COMPILE_TESTS
@pytest.mark.parametrize("name", ["so2", "enoto", "baq", "off2on", "opt"])
def test_a_compiled_run_goes_through_both_phases(minari_root, tmp_path, name):
    """--compile end to end: the phases build their steps with it and the compiled acting policy evaluates."""
    smoke = importlib.import_module(f"tests.test_{name}").SMOKE
    run = [str(REPO / "algorithms" / f"{name}.py"), *smoke, "--offline-steps", "20", "--compile"]
    result = run_cli([*run, "--run-dir", str(tmp_path)], {"MINARI_DATASETS_PATH": str(minari_root)}, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.iterdir()
    tags = scalars(path)
    assert np.isfinite(tags["eval/normalized_score"]).all() and len(tags["offline/normalized_score"]) >= 1
