"""Device-resident replay: a ring buffer of packed transitions, a static-priority replay (a prefix-sum sampler), and
the balanced replay with block priority sampling.

A buffer row is [obs, action, reward, next_obs, done, is_online]. Sizes and bounds that grow with the buffer are
device tensors (`filled`), so an update that samples stays one compiled graph or CUDA graph while it grows.
"""

from __future__ import annotations

import numpy as np
import torch


class ReplayBuffer:
    """A device-resident ring buffer; one row = [obs, action, reward, next_obs, done, is_online]."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.obs_dim, self.act_dim, self.capacity = obs_dim, act_dim, capacity
        self.storage = torch.zeros(capacity, 2 * obs_dim + act_dim + 3, device=device)
        self.position = self.size = 0
        self.filled = torch.zeros((), dtype=torch.long, device=device)  # size on the device, for the samplers

    @classmethod
    def of(cls, rows: np.ndarray, obs_dim: int, act_dim: int, device: torch.device) -> ReplayBuffer:
        """A buffer holding exactly `rows` (transition_rows' layout), copied to the device in one transfer."""
        buffer = cls(len(rows), obs_dim, act_dim, device)
        buffer.add(torch.from_numpy(rows).to(device))
        return buffer

    def add(self, rows: torch.Tensor) -> None:
        """Append rows [n, width], overwriting the oldest once full (FIFO)."""
        slots = (self.position + torch.arange(len(rows), device=rows.device)) % self.capacity
        self.storage[slots] = rows
        self.position = (self.position + len(rows)) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)
        self.filled.fill_(self.size)

    def sample_rows(self, n: int) -> torch.Tensor:
        """n rows uniformly with replacement; the bound is a device tensor, so a growing buffer is one graph."""
        return self.storage[torch.randint(0, 2**62, (n,), device=self.storage.device) % self.filled]

    def state_dict(self) -> dict:
        return {"rows": self.storage[: self.size].to("cpu", copy=True), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.position = len(state["rows"]), state["position"]
        self.storage[: self.size] = state["rows"].to(self.storage.device)
        self.filled.fill_(self.size)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """rows -> obs, action, reward, next_obs, done, is_online."""
        obs, action, reward, next_obs, done, is_online = rows.split(
            [self.obs_dim, self.act_dim, 1, self.obs_dim, 1, 1], -1
        )
        return obs, action, reward.squeeze(-1), next_obs, done.squeeze(-1), is_online.squeeze(-1)


def transition_rows(obs, action, reward, next_obs, done, is_online) -> np.ndarray:
    """Pack transitions (numpy, batched) into buffer rows, so adding them costs one host-device copy."""
    n = len(obs)
    columns = [obs, action, reward.reshape(n, 1), next_obs, done.reshape(n, 1), np.full((n, 1), float(is_online))]
    return np.concatenate(columns, axis=1).astype(np.float32)


class StaticPriorityReplay:
    """Rows that keep the priority they entered with, appended in order, never overwritten (size it for everything).

    Priorities never change, so an append-only float64 prefix sum is the whole sampler: a uniform draw in
    [0, total) is located by `searchsorted`, which gives P(i) = priority_i / sum of priorities exactly.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.buffer = ReplayBuffer(capacity, obs_dim, act_dim, device)
        # +inf past the last row: a search over the whole vector lands in the filled part, so the sampler
        # reads no Python-int size (one graph while the buffer grows)
        self.cumulative = torch.full((capacity,), torch.inf, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor, priority: torch.Tensor) -> None:
        start, end = self.buffer.size, self.buffer.size + len(rows)
        if end > self.buffer.capacity:
            raise ValueError(f"StaticPriorityReplay holds {self.buffer.capacity} rows; {end} do not fit")
        total = self.cumulative[start - 1] if start > 0 else 0.0
        self.cumulative[start:end] = total + priority.double().cumsum(0)
        self.buffer.add(rows)

    def sample(self, n: int, prioritized: bool) -> torch.Tensor:
        """n row indices in proportion to priority, or uniformly over the filled rows."""
        last, device = self.buffer.filled - 1, self.cumulative.device
        if not prioritized:
            return torch.randint(0, 2**62, (n,), device=device) % self.buffer.filled
        total = self.cumulative.index_select(0, last.view(1))  # not cumulative[last]: a device index is a sync
        draws = torch.rand(n, dtype=torch.float64, device=device) * total
        return torch.minimum(torch.searchsorted(self.cumulative, draws, right=True), last)

    def state_dict(self) -> dict:
        cumulative = self.cumulative[: self.buffer.size].to("cpu", copy=True)
        return {"buffer": self.buffer.state_dict(), "cumulative": cumulative}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.cumulative[: self.buffer.size] = state["cumulative"].to(self.cumulative.device)


# Rows per block of the two-level prefix sums of the priority sampler: a draw of n rows costs about
# capacity / SAMPLER_BLOCK + n * SAMPLER_BLOCK operations instead of a cumsum over the whole capacity.
SAMPLER_BLOCK = 128


class BlockPriorityReplay:
    """The dataset's rows, then every online step in order, in one buffer sized for the whole online budget (no
    offline row is ever overwritten), with a float64 priority per row: Off2On's balanced replay, also OPT's B_BR.

    The prioritized batch is drawn proportionally to priority with one uniform draw in each of B equal slices of
    the total mass (stratified, as the sum tree of Off2On's code), by two-level prefix sums on the device. A new
    row enters at the running-max priority, which starts at `initial`; what the priorities are is the script's
    rule (`set_priorities`). Offline and online minibatches are uniform over their rows.
    """

    def __init__(self, dataset_rows: torch.Tensor, online_steps: int, obs_dim: int, act_dim: int, initial: float,
                 online_window: int | None = None):  # fmt: skip
        device = dataset_rows.device
        self.num_offline, self.online_window = len(dataset_rows), online_window or online_steps
        self.buffer = ReplayBuffer(self.num_offline + online_steps, obs_dim, act_dim, device)
        self.buffer.add(dataset_rows)
        blocks = -(-self.buffer.capacity // SAMPLER_BLOCK)  # padded to whole blocks; the padding has priority 0
        self.priority = torch.zeros(blocks * SAMPLER_BLOCK, dtype=torch.float64, device=device)
        self.priority[: self.num_offline] = 1.0
        self.block_mass = self.priority.view(blocks, SAMPLER_BLOCK).sum(1)
        self.max_priority = torch.tensor(initial, dtype=torch.float64, device=device)

    @property
    def num_online(self) -> int:
        return self.buffer.size - self.num_offline

    def add(self, row: torch.Tensor) -> None:
        """A new online transition, at the running-max priority."""
        self.priority[self.buffer.size] = self.max_priority
        self.refresh_block_mass(self.buffer.filled.view(1))  # the new row's index, already on the device
        self.buffer.add(row)

    def sample_prioritized(self, n: int) -> torch.Tensor:
        """Stratified draws in two searches: the block of each target in the prefix sums of the block masses,
        then the row in the prefix sums of that block alone. O(blocks + n * SAMPLER_BLOCK), not O(capacity)."""
        block_cumulative, device = self.block_mass.cumsum(0), self.priority.device
        strata = torch.arange(n, device=device, dtype=torch.float64)
        targets = (strata + torch.rand(n, device=device, dtype=torch.float64)) * (block_cumulative[-1] / n)
        block = torch.searchsorted(block_cumulative, targets, right=True).clamp_(max=len(block_cumulative) - 1)
        residual = targets - (block_cumulative[block] - self.block_mass[block])
        within = self.priority.view(-1, SAMPLER_BLOCK)[block].cumsum(1)
        offset = torch.searchsorted(within, residual.unsqueeze(1), right=True).squeeze(1).clamp_(max=SAMPLER_BLOCK - 1)
        return torch.minimum(block * SAMPLER_BLOCK + offset, self.buffer.filled - 1)

    def refresh_block_mass(self, index: torch.Tensor) -> None:
        """Recompute (not increment, so no rounding drifts in) the mass of the blocks that hold `index`."""
        block = torch.div(index, SAMPLER_BLOCK, rounding_mode="floor")
        self.block_mass[block] = self.priority.view(-1, SAMPLER_BLOCK)[block].sum(1)

    def sample_uniform(self, low, high, n: int) -> torch.Tensor:
        """Uniform in [low, high); the bounds may be device tensors (no Python int that changes per step)."""
        return low + torch.randint(0, 2**62, (n,), device=self.priority.device) % (high - low)

    def sample_offline(self, n: int) -> torch.Tensor:
        return self.sample_uniform(0, self.num_offline, n)

    def sample_online(self, n: int) -> torch.Tensor:
        """Uniform over the newest `online_window` online steps (Off2On's online FIFO), by default all of them."""
        newest = torch.clamp(self.buffer.filled - self.num_offline, max=self.online_window)
        return self.sample_uniform(self.buffer.filled - newest, self.buffer.filled, n)

    def sample_rl(self, mode: str, n: int) -> torch.Tensor:
        if mode == "balanced":
            return self.sample_prioritized(n)
        if mode == "uniform":
            return self.sample_uniform(0, self.buffer.filled, n)
        return self.sample_online(n)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.buffer.split(self.buffer.storage[index])

    def set_priorities(self, index: torch.Tensor, priorities: torch.Tensor) -> None:
        """Duplicated indices carry equal values (same transition, same network), so write order is moot."""
        self.priority[index] = priorities.double()
        self.refresh_block_mass(index)
        # In place, so a captured graph keeps writing the tensor add() reads; spelled as an indexed write because
        # torch.compile (2.13, CPU) drops a copy_ into a 0-dim tensor here
        self.max_priority[...] = torch.maximum(self.max_priority, self.priority[index].max())

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).to("cpu", copy=True) for name in ("block_mass", "max_priority")}
        priority = self.priority[: self.buffer.size].to("cpu", copy=True)
        return state | {"buffer": self.buffer.state_dict(), "priority": priority}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.priority[: self.buffer.size] = state["priority"].to(self.priority.device)
        self.block_mass.copy_(state["block_mass"])
        self.max_priority.copy_(state["max_priority"])
