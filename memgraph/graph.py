"""``TrainingGraph``: the AOTAutograd joint forward+backward graph and what is known about it.

This is the one data type that passes between the cost model, the solvers and the partition pass.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import torch.fx as fx

from memgraph import _compat

log = logging.getLogger("memgraph")


@dataclasses.dataclass
class TrainingGraph:
    """A joint graph ``(primals..., tangents...) -> (forward outputs..., gradients...)``.

    joint: the AOTAutograd joint GraphModule (aten ops; ``node.meta["val"]`` holds fake values).
    example_inputs: the joint inputs as AOTAutograd passes them: ``[primals, tangents]`` (lists of fake values).
    num_fwd_outputs: how many of the outputs are the forward's.
    static_input_indices: primal indices of parameters and buffers (alive for the whole step).
    """

    joint: fx.GraphModule
    example_inputs: Sequence[Any]
    num_fwd_outputs: int
    static_input_indices: tuple[int, ...] = ()

    @classmethod
    def from_partition_args(cls, joint: fx.GraphModule, joint_inputs: Sequence[Any], *, num_fwd_outputs: int,
                            static_lifetime_input_indices: Sequence[int] | None = None, **_: Any) -> "TrainingGraph":
        """The graph AOTAutograd hands a ``partition_fn``: the one place its arguments become a TrainingGraph
        (joint inputs arrive as ``[primals, tangents]``; they are flattened to one list)."""
        return cls(joint, _compat.tree_leaves(list(joint_inputs)), num_fwd_outputs,
                   tuple(static_lifetime_input_indices or ()))

    canonical: dataclasses.InitVar[bool] = False  # the joint is a copy of one already canonicalized

    def __post_init__(self, canonical: bool) -> None:
        # Every solver, and torch's partitioners run on copies, must see one graph: dead code removed and
        # common subexpressions merged, as torch's min-cut does before it partitions.
        if not canonical:
            self.joint = _compat.canonicalize_joint(self.joint)
            _fuse_joint(self.joint)

    def private_copy(self) -> "TrainingGraph":
        """The graph on a copy of its joint module (nodes and their metadata copied, fake values shared)."""
        return TrainingGraph(_compat.copy_graph_module(self.joint), self.example_inputs, self.num_fwd_outputs,
                             self.static_input_indices, canonical=True)

    @functools.cached_property
    def nodes_by_name(self) -> dict[str, fx.Node]:
        return {node.name: node for node in self.joint.graph.nodes}

    @functools.cached_property
    def placeholders(self) -> list[fx.Node]:
        return list(self.joint.graph.find_nodes(op="placeholder"))

    @functools.cached_property
    def primals(self) -> list[fx.Node]:
        return [n for n in self.placeholders if _compat.is_primal(n)]

    @functools.cached_property
    def trainable_bytes(self) -> int:
        """Bytes of the trainable parameters: the primals the joint graph computes a gradient for, of those that
        are parameters or buffers (``static_input_indices``; an activation another graph hands this one after a
        graph break gets a gradient too). A graph without that list counts every primal with a gradient."""
        output = next(iter(self.joint.graph.find_nodes(op="output")))
        gradients = list(output.args[0])[self.num_fwd_outputs:]
        static = set(self.static_input_indices)
        values = [p.meta.get("val") for k, (p, g) in enumerate(zip(self.primals, gradients))
                  if g is not None and (not static or k in static)]
        return sum(_compat.concrete_int(v.numel()) * v.element_size() for v in values if v is not None)

    @functools.cached_property
    def tangents(self) -> list[fx.Node]:
        return [n for n in self.placeholders if _compat.is_tangent(n)]

    @functools.cached_property
    def _node_info(self):
        return _compat.classify_nodes(self.joint, list(self.static_input_indices), self.num_fwd_outputs)

    @functools.cached_property
    def forward_nodes(self) -> list[fx.Node]:
        """Nodes the forward outputs need (primals included), in graph order."""
        required = set(self._node_info.required_fw_nodes)  # torch's is a sorted list: O(n) per lookup
        return [n for n in self.joint.graph.nodes if n in required]

    @functools.cached_property
    def backward_nodes(self) -> list[fx.Node]:
        """Nodes that run in backward by default: those depending on tangents and those only gradients need."""
        forward = set(self.forward_nodes)
        return [n for n in self.joint.graph.nodes if n not in forward and n.op not in ("placeholder", "output")]

    @functools.cached_property
    def static_inputs(self) -> list[fx.Node]:
        return [p for i, p in enumerate(self.primals) if i in set(self.static_input_indices)]

    def is_forward(self, node: fx.Node) -> bool:
        return node in self._forward_set

    @functools.cached_property
    def _forward_set(self) -> set[fx.Node]:
        return set(self.forward_nodes)

    def value(self, node: fx.Node) -> Any:
        """The (fake) value a node produces, from the tracing metadata."""
        return node.meta.get("val")

    def node(self, name: str) -> fx.Node:
        try:
            return self.nodes_by_name[name]
        except KeyError:
            raise KeyError(f"no node named {name!r} in the joint graph") from None


def _fuse_joint(joint: fx.GraphModule) -> None:
    """Joint-graph rewrites every plan sees: LoRA's forward in two halves, its input-gradient sums, and each NF4
    weight's dequantization as a value of its own. One that fails is logged and skipped: it leaves the graph valid
    (it edits only once it has checked everything it needs)."""
    from memgraph.passes.lora import accumulate_input_grads, split_forward  # no-ops without LoRA ops
    from memgraph.passes.nf4 import expose_dequantized_weights  # a no-op without NF4 ops

    for rewrite, what in ((split_forward, "split of LoRA forwards"),
                          (accumulate_input_grads, "fusion of LoRA gradient sums"),
                          (expose_dequantized_weights, "exposure of NF4 dequantized weights")):
        try:
            rewrite(joint)
        except Exception as error:  # noqa: BLE001 - a rewrite must never break compilation
            log.warning("memgraph: joint-graph %s skipped (%s: %s)", what, type(error).__name__, error)
