"""On a GPU (skipped elsewhere; benchmark/gpu_check.sh runs them): every script's real phase steps, wrapped in
FastUpdate with cudagraphs=True as --cudagraphs wraps them (benchmark/setups.py), replay without a host sync
(torch.cuda.set_sync_debug_mode("error")), draw fresh random numbers at every replay, and compute what the eager
steps compute from the same seed, call for call. The CPU stand-in for the sync check is tests/test_sync.py.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch.utils._pytree import tree_leaves

from benchmark.setups import SETUPS, VARIANTS, variant_id
from tests.conftest import no_host_sync

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# FastUpdate captures a key at its 4th call; OPT's and BAQ-IQL's steps alternate two keys (actor step or not), so
# from the 9th call of a phase on every call is a replay, which the sync check covers.
CALLS, CHECKED_FROM = 12, 8
DEVICE = torch.device("cuda")


@pytest.fixture(autouse=True)
def deterministic():
    """The scripts' setting (--torch-deterministic, on by default), so that eager and replayed steps can agree."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous)


def run_steps(name: str, flags: dict, mode: str) -> dict[str, list[torch.Tensor]]:
    """CALLS calls of each phase step from seed 0, every output copied at once (a replay overwrites it); with
    cudagraphs the replays run under the sync check. ENOTO's action choice (it ends in the action's one transfer
    to the host) runs between the online updates, outside the check."""
    torch.manual_seed(0)
    hooks = SETUPS[name]("hopper", 11, 3, DEVICE, tiny=True, mode=mode, **flags)
    act = hooks.get("act", lambda: None)
    phases = {"offline": hooks["offline"], **hooks.get("other_phases", {}), "online": hooks["online"]}
    values: dict[str, list[torch.Tensor]] = {}
    for phase, step in phases.items():
        if phase == next(iter(hooks.get("other_phases", {})), "online"):
            hooks["hand_over"]()
        for call in range(CALLS):
            if phase == "online":
                act()
            checked = mode == "cudagraphs" and call >= CHECKED_FROM
            with no_host_sync() if checked else nullcontext():
                output = step()
            leaves = [
                leaf.detach().float().reshape(-1).clone() for leaf in tree_leaves(output) if torch.is_tensor(leaf)
            ]
            values.setdefault(phase, []).append(torch.cat(leaves))
    return values


SCRIPTS = [("so2", {}), ("enoto", {}), ("baq", {}), ("baq", {"backbone": "iql"}), ("off2on", {}), ("opt", {}),
           ("opt", {"backbone": "spot"})]  # fmt: skip


@pytest.mark.parametrize("name, flags", SCRIPTS, ids=[variant_id(*script) for script in SCRIPTS])
def test_cuda_graph_replays_compute_the_eager_steps_and_draw_fresh_noise(name, flags):
    eager, graphs = run_steps(name, flags, "eager"), run_steps(name, flags, "cudagraphs")
    assert eager.keys() == graphs.keys()
    for phase in eager:
        for call, (expected, replayed) in enumerate(zip(eager[phase], graphs[phase], strict=True)):
            torch.testing.assert_close(replayed, expected, rtol=1e-4, atol=1e-5, msg=f"{phase} call {call + 1}")
        replays = {tuple(values.tolist()) for values in graphs[phase][CHECKED_FROM:]}
        assert len(replays) == CALLS - CHECKED_FROM, f"{phase}: two replays returned the same values"


@pytest.mark.parametrize("name, flags", VARIANTS, ids=[variant_id(*variant) for variant in VARIANTS])
def test_every_update_path_replays_without_a_host_sync(name, flags):
    run_steps(name, flags, "cudagraphs")
