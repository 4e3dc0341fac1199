"""Assemble a whole training step (inputs → forward → tangents → backward → grad accumulation) for the sweep.

``simulate_step`` is shared by the partitioned graphs (``estimate_partitioned``) and by the joint graph under
a candidate saved set (``GraphCosts.simulate``), so both predict the same thing the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import sympy
import torch.fx as fx

from memgraph.cost_model.memory import (BACKWARD, FORWARD, GRADS, INPUTS, OUTPUTS, SAVED, WEIGHTS,
                                        MemoryEstimate, Program, StepSemantics, grad_needs_clone, run_phase)
from memgraph.cost_model.inductor import inductor_kernels, with_kernel
from memgraph.cost_model.symbolic import as_size
from memgraph.cost_model.values import NodeValue, node_value


@dataclasses.dataclass
class StepGraphs:
    """A step in the shape ``simulate_step`` reads: node values in execution order and what connects them.

    primals: the forward's inputs (parameters, buffers, user inputs), in order.
    forward: forward nodes to run, in order (no placeholders, no output node).
    user_outputs / saved: names the forward returns to the user / hands to backward.
    tangents: backward's incoming gradients (allocated when backward starts).
    backward: backward nodes to run, in order (no placeholders).
    grads: per primal, the name of its gradient in backward's outputs (None where there is none).
    """

    primals: list[NodeValue]
    forward: list[NodeValue]
    user_outputs: list[str]
    saved: list[NodeValue]
    tangents: list[NodeValue]
    backward: list[NodeValue]
    grads: list[str | None]
    static_indices: frozenset[int]
    grad_clones: dict[str, Any] = dataclasses.field(default_factory=dict)  # grad name -> bytes of its clone


def simulate_step(step: StepGraphs, hints: Mapping[sympy.Symbol, int], semantics: StepSemantics,
                  *, symbolic_peak: bool = True) -> MemoryEstimate:
    program = Program(semantics.granularity, hints)
    primal_storages: dict[str, list[int | None]] = {}
    resident: set[int] = set()
    for index, primal in enumerate(step.primals):
        category = WEIGHTS if index in step.static_indices else INPUTS
        storages: list[int | None] = []
        for output in primal.outputs:
            storages.append(None if output is None else program.new_storage(output.nbytes or 0, category, primal.name))
        primal_storages[primal.name] = storages
        resident.update(s for s in storages if s is not None)
    program.step("inputs", FORWARD, sorted(resident), [])

    saved_names = [v.name for v in step.saved]
    forward_nodes = step.forward
    if semantics.fuses:
        forward_nodes = inductor_kernels(step.forward, step.user_outputs + saved_names)
    forward = run_phase(program, FORWARD, forward_nodes, step.user_outputs + saved_names, given=primal_storages,
                        resident=resident,
                        output_categories={**{n: SAVED for n in saved_names}, **{n: OUTPUTS for n in step.user_outputs}})
    user_storages = {s for n in step.user_outputs for s in forward.storages_of.get(n, ()) if s is not None}
    saved_storages = {s for n in saved_names for s in forward.storages_of.get(n, ()) if s is not None}
    if semantics.outputs_alive:
        resident |= user_storages
    else:
        program.free_after_last_step(sorted(user_storages - saved_storages - resident))

    # Backward receives the saved values (on the forward's storages) and fresh tangents; primals it uses
    # only through saved values.
    given = {n: forward.storages_of.get(n, []) for n in saved_names}
    placeholders = [dataclasses.replace(v, inputs=()) for v in step.saved + step.tangents]
    grad_names = [g for g in step.grads if g is not None]
    # The seed gradient (ones for the loss) is made by ``torch.autograd.backward`` in Python, which holds it
    # until backward returns; autograd's materialized zeros are handed over and freed when consumed.
    seed = [step.tangents[0].name] if step.tangents else []
    backward_nodes = placeholders + step.backward
    if semantics.fuses:
        # Saved activations not shared with the caller are donated: Inductor may write into them once dead.
        shared = resident | user_storages
        donated = [n for n in saved_names if not shared & set(given[n])]
        backward_nodes = inductor_kernels(backward_nodes, grad_names, given=[v.name for v in placeholders],
                                          donated=donated)
    backward = run_phase(program, BACKWARD, backward_nodes, grad_names, given=given,
                         resident=resident, output_categories={n: GRADS for n in grad_names},
                         placeholders=[v.name for v in placeholders],
                         frees_inputs=semantics.backward_frees_inputs, held=seed)
    if semantics.accumulate_grads:
        grad_storages = {n: [s for s in backward.storages_of.get(n, ()) if s is not None] for n in grad_names}
        _accumulate_grads(program, step, grad_storages, resident)
    return MemoryEstimate(program, symbolic_peak=symbolic_peak)


def _accumulate_grads(program: Program, step: StepGraphs, storages_of: dict[str, list[int]],
                      resident: set[int]) -> None:
    """AccumulateGrad clones a gradient whose layout differs from its parameter's, then drops the original."""
    shared = {}
    for storages in storages_of.values():
        for s in storages:
            shared[s] = shared.get(s, 0) + 1
    for name, nbytes in step.grad_clones.items():
        originals = [s for s in storages_of.get(name, []) if shared.get(s) == 1 and s not in resident]
        clone = program.new_storage(nbytes, GRADS, f"accumulate_grad({name})")
        program.step(f"accumulate_grad({name})", BACKWARD, [clone], originals)


def grad_clone_bytes(grads: Sequence[str | None], primal_vals: Sequence[Any], grad_vals: Mapping[str, Any]) -> dict:
    clones = {}
    for name, param in zip(grads, primal_vals):
        if name is None:
            continue
        grad = grad_vals.get(name)
        if grad_needs_clone(grad, param):
            clones[name] = as_size(grad.numel() * grad.element_size())
    return clones


def graph_step(graph, fw: fx.GraphModule, bw: fx.GraphModule, *, kernels: bool = False) -> StepGraphs:
    """Read a partitioned (forward, backward) pair of ``graph`` as a StepGraphs (``kernels``: with each
    node's ``KernelInfo``, for ``codegen="inductor"``)."""
    node_value = _node_value_reader(kernels)
    fw_nodes = list(fw.graph.nodes)
    fw_placeholders = [n for n in fw_nodes if n.op == "placeholder"]
    fw_output = [n for n in fw_nodes if n.op == "output"][0]
    fw_returns = [a for a in _flat(fw_output.args[0])]
    user_outputs = [a.name for a in fw_returns[:graph.num_fwd_outputs] if isinstance(a, fx.Node)]
    saved_names = {a.name for a in fw_returns[graph.num_fwd_outputs:] if isinstance(a, fx.Node)}

    bw_nodes = list(bw.graph.nodes)
    bw_placeholders = [n for n in bw_nodes if n.op == "placeholder"]
    bw_output = [n for n in bw_nodes if n.op == "output"][0]
    grads = [a.name if isinstance(a, fx.Node) else None for a in _flat(bw_output.args[0])]
    primal_vals = [n.meta.get("val") for n in fw_placeholders]
    grad_vals = {n.name: n.meta.get("val") for n in bw_nodes if n.op == "call_function"}
    grad_vals.update({n.name: n.meta.get("val") for n in bw_placeholders})
    return StepGraphs(
        primals=[node_value(n) for n in fw_placeholders],
        forward=[node_value(n) for n in fw_nodes if n.op not in ("placeholder", "output")],
        user_outputs=user_outputs,
        saved=[node_value(n) for n in bw_placeholders if n.name in saved_names],
        tangents=[node_value(n) for n in bw_placeholders if n.name not in saved_names],
        backward=[node_value(n) for n in bw_nodes if n.op not in ("placeholder", "output")],
        grads=grads[:len(fw_placeholders)],
        static_indices=frozenset(graph.static_input_indices),
        grad_clones=grad_clone_bytes(grads, primal_vals, grad_vals),
    )


def _node_value_reader(kernels: bool):
    if kernels:
        return lambda node: with_kernel(node_value(node), node)
    return node_value


def _flat(outputs: Any) -> list[Any]:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def estimate_single_graph(gm: fx.GraphModule, hints: Mapping[sympy.Symbol, int], semantics: StepSemantics,
                          static_indices: Sequence[int] = ()) -> MemoryEstimate:
    """One graph run once (e.g. a forward-only or inference graph): inputs resident, outputs kept at the end."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = [n for n in nodes if n.op == "output"][0]
    outputs = [a.name for a in _flat(output.args[0]) if isinstance(a, fx.Node)]
    program = Program(semantics.granularity, hints)
    given: dict[str, list[int | None]] = {}
    resident: set[int] = set()
    static = set(static_indices)
    for index, node in enumerate(placeholders):
        category = WEIGHTS if index in static else INPUTS
        value = node_value(node)
        given[node.name] = [None if o is None else program.new_storage(o.nbytes or 0, category, node.name)
                            for o in value.outputs]
        resident.update(s for s in given[node.name] if s is not None)
    program.step("inputs", FORWARD, sorted(resident), [])
    read = _node_value_reader(semantics.fuses)
    values = [read(n) for n in nodes if n.op not in ("placeholder", "output")]
    if semantics.fuses:
        values = inductor_kernels(values, outputs)
    run_phase(program, FORWARD, values, outputs, given=given, resident=resident,
              output_categories={n: OUTPUTS for n in outputs})
    return MemoryEstimate(program)
