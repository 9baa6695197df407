"""--compile and --cudagraphs: the one wrapper every script puts around its update steps (LeanRL style).

An update step here is a function of the agent's device state only: it samples its own minibatch from
device buffers whose storage and fill counts stay put, reads schedules (kappa, lambda) from device tensors
filled in place, and returns detached device tensors. Its Python arguments are a few hashable values that
select one of a handful of variants (e.g. which critic updates of a block end in an actor update); each
variant is compiled and captured once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from utils.errors import UserError


def check_fast_flags(cudagraphs: bool, device: torch.device) -> None:
    if cudagraphs and device.type != "cuda":
        raise UserError("--cudagraphs needs a CUDA device; drop it (or --compile alone works on the CPU)")


class FastUpdate:
    """`update(*key)`, eager, compiled (torch.compile) and/or replayed from a CUDA graph.

    With cudagraphs each key runs `warmup` eager calls on a side stream (they are real updates: Adam's state
    and the compiled kernels come into being there), then one capture, which records the kernels without
    running them, then a replay; later calls only replay. Random numbers drawn inside the graph are fresh at
    every replay (PyTorch advances the Philox offset of a captured generator per replay). The outputs are the
    graph's own tensors, which the next replay overwrites: the caller consumes them first (Metrics.add sums
    them into new tensors). Optimisers must be built with capturable=True, and a FastUpdate is built anew
    whenever they are replaced (the hand-over), so no graph holds a dead optimiser's state.
    """

    def __init__(self, update: Callable, compile: bool = False, cudagraphs: bool = False, warmup: int = 3):
        self.update = torch.compile(update) if compile else update
        self.cudagraphs, self.warmup = cudagraphs, warmup
        self.eager_calls: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.pool = None

    def __call__(self, *key):
        if not self.cudagraphs:
            return self.update(*key)
        if key in self.graphs:
            graph, output = self.graphs[key]
            graph.replay()
            return output
        calls = self.eager_calls.get(key, 0)
        if calls < self.warmup:
            self.eager_calls[key] = calls + 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                output = self.update(*key)
            torch.cuda.current_stream().wait_stream(side)
            return output
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.update(*key)
        self.pool = graph.pool()  # the variants share one memory pool
        self.graphs[key] = graph, output
        graph.replay()
        return output
