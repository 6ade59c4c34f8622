"""Episodic memories shared by the replay methods (replay, ng_replay, DER, DER++, ER-ACE, GDumb).

Both memories hold device tensors, ``x``, ``y`` (output-unit index), ``task`` (the task a sample came
from) and, for the reservoir, optional per-sample extras (DER's logits); both are updated without
per-sample Python, draw only from the generator their method passes in (never the global RNG), and
have a ``state_dict`` of tensors and ints (loads with ``torch.load(weights_only=True)``).

:class:`ReservoirMemory` (Vitter 1985, algorithm R): the m-th sample seen (m = 0, 1, …) goes to slot
m while m < size; after that a draw j ~ U{0, …, m} puts it in slot j when j < size, else it is
dropped, so every sample seen so far is in memory with probability size / (m + 1) (mammoth's
``utils/buffer.py`` ``reservoir``). :func:`reservoir_slots` does one batch at once, exactly as the
sequential algorithm on the same draws (the latest sample wins a slot drawn twice).
:meth:`ReservoirMemory.sample` draws without replacement (mammoth's ``get_data``: ``np.random.choice(…,
replace=False)``, at most as many as the memory holds).

:class:`BalancedMemory` (GDumb's greedy class-balanced sampler, Prabhu et al. 2020):
see its docstring.

Output units of replayed samples: :func:`replay_units` and :func:`joined_units` give a memory sample
of task j, trained while training task t, the units that test task j at that point,
``stream.eval_units(t, j)``: in class-IL every class seen so far (every unit with
``active_units=all``), in task-IL task j's own head, in domain-IL the shared head.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from cl_runner.data.stream import Task, TaskStream
from cl_runner.methods.base import Batch

MEMORY_KEYS = ("x", "y", "task")


def reservoir_slots(n_seen: int, draws: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Vectorized algorithm R for one batch: (slots, sources), the memory slots a batch writes and,
    for each, the index in the batch of the sample that ends up there.

    ``draws[i]`` is sample i's uniform draw in [0, 1): the batch's i-th sample is the run's sample
    m = n_seen + i, its slot is m while m < size, else j = ⌊draw · (m + 1)⌋ (j ~ U{0, …, m}), kept
    when j < size. Several samples in one slot: the last one wins (scatter with amax over the
    sample index, deterministic on every device)."""
    b = draws.shape[0]
    m = torch.arange(n_seen, n_seen + b, dtype=torch.long, device=draws.device)
    j = (draws.double() * (m + 1).double()).floor().long()  # double: exact for m < 2^52
    slot = torch.where(m < size, m, j)
    keep = slot < size
    last = torch.full((size,), -1, dtype=torch.long, device=draws.device)
    last.scatter_reduce_(0, slot[keep], torch.arange(b, device=draws.device)[keep], reduce="amax")
    slots = (last >= 0).nonzero().squeeze(1)
    return slots, last[slots]


class ReservoirMemory:
    """``size`` slots of (x, y, task, extras…) filled by algorithm R; ``tensors`` are allocated on the
    device of the first batch added (extras: one tensor per sample each, e.g. ``logits=``)."""

    def __init__(self, size: int):
        self.size = int(size)
        self.n_seen = 0  # samples offered so far (algorithm R's m)
        self.tensors: dict[str, Tensor] = {}

    @property
    def filled(self) -> int:
        return min(self.n_seen, self.size)

    def __len__(self) -> int:
        return self.filled

    @torch.no_grad()
    def add(self, generator: torch.Generator, x: Tensor, y: Tensor, task: int, **extras: Tensor) -> None:
        """Offer a batch: one float64 draw per sample from ``generator``, then the slots it wins."""
        if not self.tensors:
            size, dev = self.size, x.device
            self.tensors = {
                "x": torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=dev),
                "y": torch.zeros(size, dtype=y.dtype, device=dev),
                "task": torch.zeros(size, dtype=torch.long, device=dev),
            }
            for k, v in extras.items():
                self.tensors[k] = torch.zeros((size, *v.shape[1:]), dtype=v.dtype, device=dev)
        draws = torch.rand(len(x), generator=generator, dtype=torch.float64)
        slots, sources = reservoir_slots(self.n_seen, draws, self.size)
        self.n_seen += len(x)
        if len(slots) == 0:
            return
        dev = x.device
        slots, sources = slots.to(dev, non_blocking=True), sources.to(dev, non_blocking=True)
        self.tensors["x"][slots] = x[sources]
        self.tensors["y"][slots] = y[sources]
        self.tensors["task"][slots] = task
        for k, v in extras.items():
            self.tensors[k][slots] = v[sources]

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device, keys: tuple[str, ...] = MEMORY_KEYS
    ) -> tuple[Tensor, ...] | None:
        """``min(n, filled)`` samples drawn without replacement (a permutation from ``generator``), as
        the tensors named by ``keys``; None while the memory is empty."""
        if self.filled == 0:
            return None
        idx = torch.randperm(self.filled, generator=generator)[:n].to(device, non_blocking=True)
        return tuple(self.tensors[k][idx] for k in keys)

    def state_dict(self) -> dict[str, Any]:
        return {"n_seen": self.n_seen, "memory": dict(self.tensors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.n_seen = int(state["n_seen"])
        self.tensors = dict(state["memory"])


# ---- output units of replayed samples ----------------------------------------------------------------


def replay_units(stream: TaskStream, task: Task) -> Tensor | None:
    """(t + 1, 2) table: row j = the units of task j's samples replayed while training ``task`` (t);
    None when every row equals the task's own units (domain-IL, class-IL: one range for every
    sample, so batches need no per-sample ranges)."""
    t = task.id
    units = [stream.eval_units(t, j) for j in range(t + 1)]
    same = len(set(units)) == 1 and units[0] == tuple(task.units)
    return None if same else torch.tensor(units, device=task.y_train.device)


def joined_units(batch: Batch, table: Tensor | None, memory_tasks: list[Tensor]) -> Tensor | None:
    """Per-sample units of ``batch`` followed by memory samples of the tasks ``memory_tasks`` (one
    tensor per replayed block), or None when one range serves them all."""
    su = batch.sample_units
    if su is None and table is None:
        return None
    own = torch.tensor(batch.units, device=batch.y.device)
    current = su if su is not None else own.expand(len(batch), 2)
    blocks = [table[t] if table is not None else own.expand(len(t), 2) for t in memory_tasks]
    return torch.cat([current, *blocks])


# ---- GDumb's greedy class-balanced memory --------------------------------------------------------------


def water_fill(counts: Tensor, removals: int) -> Tensor:
    """Class counts after ``removals`` greedy steps of "take one from the largest class, the lowest
    index among equals" (GDumb's eviction), without the loop: the final maximum M is the smallest
    level with Σ max(0, counts − M) ≤ removals; the steps left over then take one each from the
    lowest-indexed classes at level M."""
    if removals <= 0:
        return counts.clone()
    lo, hi = 0, int(counts.max())  # R(hi) = 0 ≤ removals; find the smallest level with R ≤ removals
    while lo < hi:
        mid = (lo + hi) // 2
        if int((counts - mid).clamp_min(0).sum()) <= removals:
            hi = mid
        else:
            lo = mid + 1
    level = lo
    out = counts.clamp_max(level)
    left = removals - int((counts - level).clamp_min(0).sum())
    if left > 0:
        at_level = (counts >= level).nonzero().squeeze(1)[:left]  # ascending class index
        out[at_level] -= 1
    return out


class BalancedMemory:
    """GDumb's greedy class-balanced sampler (Prabhu et al. 2020), vectorized.

    For each incoming sample (x, y), in order, with Y the classes seen so far including y and k the
    size: if the memory holds fewer than k_c = ⌊k / |Y|⌋ samples of y (a class never seen before
    always has 0 < k_c, as k ≥ the number of classes), it is stored: in a free slot while there is
    one, otherwise in place of an instance of the class with the most samples (the lowest class
    index among equals), chosen at random. Otherwise it is dropped.

    Vectorized over a chunk of samples (no per-sample Python), exactly equal to that loop: k_c only
    decreases, a class below its quota only gains and a class above it only loses (never below the
    quota), so (1) sample i of class y is stored iff count_y + (earlier samples of y in the chunk) <
    k_c(i) — a prefix of the chunk's samples of each class; (2) the evictions, E = stored − free
    slots, hit the classes the sequential argmax would, which is :func:`water_fill` on the counts
    after storing (a class still below its quota is never the largest); (3) all of a class's stored
    samples of the chunk arrive before its first eviction, so its d evictions remove the d members
    with the smallest keys, one uniform key per member drawn per chunk (slots first, then the
    chunk's samples): a uniformly random d-subset, as d random removals one after another.
    ``tests/test_baselines_b.py`` checks the contents against the plain loop on the same keys.

    Differences from the authors' code (drimpossible/GDumb ``src/dataloader.py``), which picks the
    first ⌊k / n_classes⌋ samples of each class of the whole dataset at once (n_classes of the
    whole stream, known in advance): here the quota follows the classes seen so far (the paper's
    online sampler), so a memory evaluated after task t holds ⌊k / |Y_t|⌋ per class.
    """

    def __init__(self, size: int, n_classes: int):
        self.size = int(size)
        self.n_classes = int(n_classes)
        self.counts = torch.zeros(self.n_classes, dtype=torch.long)  # CPU: read every chunk
        self.seen = torch.zeros(self.n_classes, dtype=torch.bool)
        self.filled = 0  # slots [0, filled) hold samples
        self.tensors: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return self.filled

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "seen": self.seen, "filled": self.filled, "memory": dict(self.tensors)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # on the CPU, whatever device the checkpoint was loaded to (they index with CPU labels)
        self.counts, self.seen = state["counts"].cpu().clone(), state["seen"].cpu().clone()
        self.filled = int(state["filled"])
        self.tensors = dict(state["memory"])

    @torch.no_grad()
    def add(self, generator: torch.Generator, x: Tensor, y: Tensor, task: int) -> None:
        """Offer one chunk, in order (draws: ``size`` slot keys, then one key per sample)."""
        if not self.tensors:
            size, dev = self.size, x.device
            self.tensors = {
                "x": torch.zeros((size, *x.shape[1:]), dtype=x.dtype, device=dev),
                "y": torch.zeros(size, dtype=y.dtype, device=dev),
                "task": torch.zeros(size, dtype=torch.long, device=dev),
            }
        b, k = len(y), self.size
        slot_keys = torch.rand(k, generator=generator, dtype=torch.float64)
        sample_keys = torch.rand(b, generator=generator, dtype=torch.float64)
        if b == 0:
            return
        labels = y.cpu()
        pos = torch.arange(b)
        # classes seen up to and including each sample: the seen ones + first occurrences of new ones
        order = torch.argsort(labels, stable=True)  # by class, then by position
        sorted_labels = labels[order]
        group_start = torch.searchsorted(sorted_labels, sorted_labels, side="left")
        rank = torch.empty(b, dtype=torch.long)
        rank[order] = torch.arange(b) - group_start  # earlier samples of the same class in the chunk
        first_new = (rank == 0) & ~self.seen[labels]
        n_classes = int(self.seen.sum()) + torch.cumsum(first_new.long(), 0)
        quota = k // n_classes
        stored = self.counts[labels] + rank < quota
        counts = self.counts + torch.bincount(labels[stored], minlength=self.n_classes)
        self.seen[labels] = True
        evictions = self.filled + int(stored.sum()) - k
        after = water_fill(counts, evictions)
        # members: the filled slots (index s < filled) and the chunk's stored samples (index filled + i)
        src = pos[stored]
        member_class = torch.cat([self.tensors["y"][: self.filled].cpu(), labels[src]])
        member_key = torch.cat([slot_keys[: self.filled], sample_keys[src]])
        by_key = torch.argsort(member_key, stable=True)
        by_class = by_key[torch.argsort(member_class[by_key], stable=True)]  # class, then key
        cls_sorted = member_class[by_class]
        within = torch.arange(len(by_class)) - torch.searchsorted(cls_sorted, cls_sorted, side="left")
        evicted = torch.zeros(len(by_class), dtype=torch.bool)
        evicted[by_class] = within < (counts - after)[cls_sorted]
        old_out = evicted[: self.filled].nonzero().squeeze(1)  # slots freed by eviction
        keep_new = src[~evicted[self.filled :]]  # stored samples of the chunk that stay
        free = torch.arange(self.filled, k)
        slots = torch.cat([free, old_out])[: len(keep_new)]
        self.counts = after
        self.filled = min(k, self.filled + int(stored.sum()))
        if len(slots):
            dev = x.device
            slots, keep_new = slots.to(dev, non_blocking=True), keep_new.to(dev, non_blocking=True)
            self.tensors["x"][slots] = x[keep_new]
            self.tensors["y"][slots] = y[keep_new]
            self.tensors["task"][slots] = task
