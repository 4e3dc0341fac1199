"""The repeated blocks of a training graph (a transformer's decoder layers), found from structure alone.

No HF class or module name is read: the longest run of identical consecutive blocks of compute-heavy ops
(matmuls, attention, custom kernels: each layer has its own, so common-subexpression elimination cannot merge
them across layers, unlike the rotary or mask ops the first layer then computes for all). Used by layer
checkpointing, by the ILP (one policy per layer position) and by the infeasible-budget bound.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from memgraph.cost_model.graph_costs import GraphCosts

__all__ = ["Blocks", "find_blocks"]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """``count`` consecutive repeats of one block of ``period`` forward ops; ``bounds`` are positions in the
    forward op sequence ``ops`` (joint indices) where blocks start (last bound = end of the repeated run)."""

    ops: tuple[int, ...]
    period: int
    count: int
    bounds: tuple[int, ...]

    def block_of(self) -> dict[int, int]:
        """Joint index -> block number, for the ops inside the repeated run."""
        owner = {}
        for b, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            for position in range(lo, hi):
                owner[self.ops[position]] = b
        return owner

    def checkpoint_saved(self, costs: "GraphCosts") -> set[int]:
        """Layer-boundary checkpointing: recompute everything inside a block from the values that enter it
        (its input hidden state, shared inputs such as rotary tables, weights); save everything else."""
        block = self.block_of()
        saved: set[int] = set()
        seen: set[int] = set()
        stack = []
        for i in costs.frontier:
            inside = i in block and (i in costs.views or (costs.recomputable(i) and i not in costs.unsaveable))
            if inside:
                stack.append(i)
            else:
                saved.add(i)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            for j in costs.inputs[i]:
                if j not in costs.forward_set:
                    continue
                if block.get(j) == block[i] and (costs.recomputable(j) or j in costs.unsaveable):
                    stack.append(j)
                else:
                    saved.add(j)
        return costs.make_valid(saved)


    def layer_inputs(self, costs: "GraphCosts") -> set[int]:
        """Forward values that enter exactly one block from outside it: each layer's input hidden state (shared
        inputs such as rotary tables or masks enter every block, weights are primals)."""
        block = self.block_of()
        entered: dict[int, set[int]] = {}
        for i, b in block.items():
            for j in costs.inputs[i]:
                if j in costs.forward_set and j not in costs.primals and block.get(j) != b:
                    entered.setdefault(j, set()).add(b)
        return {j for j, blocks in entered.items() if len(blocks) == 1}


def find_blocks(costs: "GraphCosts", *, min_period: int = 2) -> Blocks | None:
    """The decoder layers of a transformer (see the module docstring); None if nothing repeats. Each boundary
    between blocks is placed, between the last heavy op of one block and the first of the next, where the
    fewest bytes cross it (the residual stream); the first block starts as far before its first heavy op as
    the others do."""
    ops = [i for i in costs.forward if i not in costs.primals and costs.nodes[i].op == "call_function"]
    heavy = [k for k, i in enumerate(ops) if costs.kinds[i] in ("matmul", "custom")]
    codes: dict[str, int] = {}
    seq = np.array([codes.setdefault(_signature(costs, ops[k]), len(codes)) for k in heavy], dtype=np.int64)
    found = _repeats(seq, min_period)
    if found is None:
        return None
    period, start, count = found
    crossing = _crossing_bytes(costs, ops)

    def cut(h: int) -> tuple[int, int]:
        """(bytes, position): the cheapest cut before heavy op number ``h`` and after heavy op ``h - 1``."""
        lo = heavy[h - 1] + 1 if h > 0 else 0
        hi = heavy[h] if h < len(heavy) else len(ops)
        position = lo + int(np.argmin(crossing[lo:hi + 1]))
        return int(crossing[position]), position

    heads = [start + k * period for k in range(count + 1)]
    positions = [cut(h)[1] for h in heads]
    # The first block's gap runs back into the prologue (embedding, rotary tables, where nothing crosses):
    # cut it as far before its first heavy op as the other blocks are cut before theirs.
    interior = list(zip(heads[1:-1], positions[1:-1])) or list(zip(heads[1:], positions[1:]))
    offsets = [heavy[h] - p for h, p in interior if h < len(heavy)]
    if offsets:
        offset = max(set(offsets), key=offsets.count)
        lo = heavy[heads[0] - 1] + 1 if heads[0] > 0 else 0
        positions[0] = max(lo, heavy[heads[0]] - offset)
    bounds = sorted(set(positions))
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    common = max(set(sizes), key=sizes.count) if sizes else 0
    return Blocks(tuple(ops), common, len(bounds) - 1, tuple(bounds)) if len(bounds) >= 3 else None


def _signature(costs: "GraphCosts", i: int) -> str:
    node = costs.nodes[i]
    value = node.meta.get("val")
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
    dtype = getattr(value, "dtype", None)
    return f"{node.target}|{shape}|{dtype}"


def _repeats(seq: np.ndarray, min_period: int) -> tuple[int, int, int] | None:
    """(period, start, count) of the longest run of ``count >= 2`` identical consecutive blocks, or None."""
    best = None  # (coverage, period, start, count)
    for period in range(min_period, len(seq) // 2 + 1):
        equal = seq[:-period] == seq[period:]
        if equal.sum() < period:
            continue
        # runs of matches of length >= period: a run of length L starting at a gives L // period + 1 blocks
        padded = np.concatenate(([False], equal, [False]))
        edges = np.flatnonzero(padded[1:] != padded[:-1])
        for start, stop in zip(edges[::2], edges[1::2]):
            count = (stop - start) // period + 1
            if count >= 2 and (best is None or count * period > best[0]):
                best = (count * period, period, int(start), int(count))
    return None if best is None else best[1:]


def _crossing_bytes(costs: "GraphCosts", ops: list[int]) -> np.ndarray:
    """crossing[p]: bytes of values made before forward op position p and used at or after it."""
    position = {i: p for p, i in enumerate(ops)}
    crossing = np.zeros(len(ops) + 1, dtype=np.int64)
    for p, i in enumerate(ops):
        last = max((position[u] for u in costs.users[i] if u in position), default=p)
        if last > p:
            crossing[p + 1:last + 1] += max(int(costs.output_bytes(i)), 1)
    return crossing
