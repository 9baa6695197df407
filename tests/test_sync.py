"""No host-device synchronisation inside an update step, checked on the CPU: every speed setup and every flag
variant that changes an update path (benchmark.setups.VARIANTS) runs its phase steps on the meta device, a
stand-in for CUDA whose tensors have shapes but no data, under a dispatch mode that fails on the operators that
read a device value on the host (`aten._local_scalar_dense`: .item(), `if tensor`, indexing with a 0-dim device
tensor; `aten.nonzero`: boolean masks). The one transfer an env step needs, its action to the host, is the only
copy to the CPU allowed, and only outside the updates. Adam's own step is replaced by a plain in-place step (fused
Adam has no meta kernel; on CUDA it is fused and capturable, and syncs nothing): what is checked is the scripts'
code. tests/test_cuda.py checks the same variants on a GPU, under CUDA graphs and torch's sync debug mode.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmark.setups import SETUPS, VARIANTS, variant_id

SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}
MASK_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


class HostSyncError(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """Fails on a host read of a device value; lets the action of an env step (`allow_host_copy`) reach the CPU as
    zeros, since meta tensors have no data to copy."""

    def __init__(self, allow_host_copy: bool = False):
        super().__init__()
        self.allow_host_copy = allow_host_copy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            raise HostSyncError(f"host sync: {func}")
        if func in MASK_OPS and any(torch.is_tensor(i) and i.dtype == torch.bool for i in args[1]):
            raise HostSyncError(f"host sync: {func} with a boolean mask (its size is read on the host)")
        to_host = func is torch.ops.aten._to_copy.default and kwargs.get("device") == torch.device("cpu")
        if to_host and args[0].device.type == "meta":
            if not self.allow_host_copy:
                raise HostSyncError("a device-to-host copy inside an update step")
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


@torch.no_grad()
def plain_step(self, closure=None):
    for group in self.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.sub_(param.grad * group["lr"])


ADAM_INIT = torch.optim.Adam.__init__


def adam_init(self, params, lr=1e-3, **kwargs):
    """Adam checks `0 <= lr` on the host, once, at construction; a meta tensor lr (BAQ-IQL's cosine schedule writes
    it in place) has no value to check, so it is checked as a float and put back."""
    ADAM_INIT(self, params, lr=1e-3 if torch.is_tensor(lr) else lr, **kwargs)
    for group in self.param_groups:
        group["lr"] = lr


def run_on_meta(name: str, flags: dict) -> None:
    """Two calls of every phase step (the variants an update counter selects), the hand-over between them."""
    hooks = SETUPS[name]("hopper", 11, 3, torch.device("meta"), tiny=True, **flags)
    with NoHostSync():
        for _ in range(2):
            hooks["offline"]()
    hooks["hand_over"]()
    with NoHostSync():
        for phase in hooks.get("other_phases", {}).values():
            phase()
            phase()
    for _ in range(2):
        if "act" in hooks:
            with NoHostSync(allow_host_copy=True):
                hooks["act"]()
        with NoHostSync():
            hooks["online"]()


@pytest.mark.parametrize("name, flags", VARIANTS, ids=[variant_id(*variant) for variant in VARIANTS])
def test_no_update_step_reads_a_device_value_on_the_host(monkeypatch, name, flags):
    monkeypatch.setattr(torch.optim.Adam, "step", plain_step)
    monkeypatch.setattr(torch.optim.Adam, "__init__", adam_init)
    run_on_meta(name, flags)


def test_the_sweep_finds_a_host_sync(monkeypatch):
    """The checker itself: a 0-dim device index (BAQ's sampler before it used index_select) and a boolean mask fail,
    and so does an action sent to the host inside an update."""
    values, index = torch.zeros(5, device="meta"), torch.zeros((), dtype=torch.long, device="meta")
    for read in (lambda: values[index], lambda: values[values > 0], lambda: values.sum().item()):
        with pytest.raises(HostSyncError), NoHostSync():
            read()
    with pytest.raises(HostSyncError, match="device-to-host"), NoHostSync():
        values.cpu()
    with NoHostSync(allow_host_copy=True):
        assert values.cpu().shape == (5,)
    assert len(VARIANTS) >= 30 and {name for name, _ in VARIANTS} == set(SETUPS)
