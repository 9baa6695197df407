"""Optimiser helpers for update steps that --compile and --cudagraphs can take whole."""

from __future__ import annotations

import torch
from torch import nn


def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.zero_grad(set_to_none=True), spelled out: torch.compile skips Optimizer.zero_grad (a graph break)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


def adam(params, lr: float, capturable: bool) -> torch.optim.Adam:
    """Fused Adam: one kernel for all parameters instead of one per tensor; capturable for --cudagraphs."""
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau source, all parameters in one foreach kernel."""
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One gradient step on `loss` alone: zero_grad, backward, step."""
    zero_grad(optimizer)
    loss.backward()
    optimizer.step()
