""""checkpoint": layer-boundary checkpointing, what HF gradient checkpointing does, found from graph structure.

The repeated blocks of the forward graph (decoder layers: the longest run of identical op/shape sequences)
are found by ``cost_model.blocks``; each block keeps only the values that enter it (the hidden state between
layers, shared rotary tables, weights) and recomputes the rest of itself in backward. Everything outside the
blocks (embedding, final norm, lm_head, loss) is saved. No HF class or module name is read.
"""
from __future__ import annotations

from typing import Any

from memgraph.cost_model.graph_costs import GraphCosts
from memgraph.cost_model.solvers import register
from memgraph.graph import TrainingGraph
from memgraph.plan import Plan


def checkpoint_saved(costs: GraphCosts) -> tuple[set[int], dict[str, Any]]:
    """The saved set of layer-boundary checkpointing, and what was found."""
    blocks = costs.blocks()
    if blocks is None:
        return set(costs.save_least), {"blocks": 0, "note": "no repeated blocks: recompute all that may be"}
    return blocks.checkpoint_saved(costs), {"blocks": len(blocks.bounds) - 1, "block_ops": blocks.period,
                                            "repeats": blocks.count}


@register("checkpoint", uses_budget=True)
def checkpoint(graph: TrainingGraph, costs: GraphCosts | None = None, budget: int | None = None, **_: Any) -> Plan:
    """Layer-boundary checkpointing (save each repeated block's inputs, recompute the block)."""
    costs = costs or GraphCosts(graph)
    saved, found = checkpoint_saved(costs)
    return costs.plan("checkpoint", saved, budget, **found)
