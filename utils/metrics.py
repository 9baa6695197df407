"""Training metrics without host-device syncs: sums on the device, one transfer per flush; update time by CUDA
events on a GPU."""

from __future__ import annotations

import time

import torch


class Metrics:
    """Sums the update steps' detached device tensors under their tags; `flush` writes the means with one
    device-to-host transfer.

    A tag's first value is copied and later ones are added in place, all of one result in one foreach kernel, so
    an update's outputs may be buffers that its next call overwrites (a replayed CUDA graph's static outputs).
    `sums` and `counts` are what a checkpoint keeps.
    """

    def __init__(self, writer):
        self.writer, self.sums, self.counts = writer, {}, {}

    def add(self, *results: dict[str, torch.Tensor]) -> None:
        for metrics in results:
            known = [key for key in metrics if key in self.sums and torch.is_tensor(self.sums[key])]
            if known:
                torch._foreach_add_([self.sums[key] for key in known], [metrics[key] for key in known])
            for key, value in metrics.items():
                if key not in known:
                    self.sums[key] = self.sums.get(key, 0) + value  # a new tensor, or Python numbers
                self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, step: int) -> None:
        if not self.sums:
            return
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in self.sums.values()]).cpu().tolist()
        for (key, count), value in zip(self.counts.items(), values, strict=True):
            self.writer.add_scalar(key, value / count, step)
        self.sums, self.counts = {}, {}


class UpdateClock:
    """Seconds spent inside `with clock:` blocks. On a GPU each block is timed by two CUDA events, read (one sync)
    only when `seconds()` is asked, at logging time; on the CPU by perf_counter."""

    def __init__(self, device: torch.device, seconds: float = 0.0):
        self.cuda, self.total, self.spans = device.type == "cuda", seconds, []

    def __enter__(self) -> UpdateClock:
        if self.cuda:
            self.spans.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.spans[-1][0].record()
        else:
            self.tic = time.perf_counter()
        return self

    def __exit__(self, *_) -> None:
        if self.cuda:
            self.spans[-1][1].record()
        else:
            self.last = time.perf_counter() - self.tic
            self.total += self.last

    def discard_last(self) -> None:
        """Forget the last block (it made no update; a window of env steps without updates keeps no CUDA events)."""
        if self.cuda:
            self.spans.pop()
        else:
            self.total -= self.last

    def seconds(self) -> float:
        if self.spans:
            self.spans[-1][1].synchronize()
            self.total += sum(start.elapsed_time(end) for start, end in self.spans) / 1e3
            self.spans = []
        return self.total
