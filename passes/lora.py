"""Rewrite PEFT's LoRA arithmetic in Dynamo's graph to ``torch.ops.memgraph.lora_linear``: the adapter's float32
output, of the base layer's output size, never exists (see ``memgraph.kernels.lora``).

What PEFT emits for a LoRA linear (peft 0.1x-0.2x, dropout 0, one adapter), matched on torch ops from the
adapter's second linear, never on module names:

    xc    = x.to(torch.float32)                  # or x.float(); absent when x is already float32
    xa    = linear(xc, A)                        # A [R, K]
    d     = linear(xa, B)                        # B [N, R]
    d     = d * scaling                          # a constant (also when 1.0); absent or ``scaling * d`` accepted
    out   = (base + d).to(base.dtype)            # LoraLayer: the sum in float32, then the cast
      or    base + d.to(base.dtype)              # the bitsandbytes layers: the cast, then the sum
      or    base + d                             # a float32 base

``base`` is whatever the base layer produced (``nn.Linear``, bitsandbytes, ``memgraph.nf4_linear``). The
intermediates must feed only the next step; A and B must be float32 of rank <= ``MAX_RANK``. Anything else — LoRA
dropout, DoRA's magnitude scaling, 16-bit adapters (they round between the two matmuls), a non-constant scale —
is left unchanged and logged: eager's arithmetic then runs as it was.

``accumulate_input_grads`` then works on the joint graph (``TrainingGraph`` runs it): AOTAutograd's sum of x's two
gradients (the base layer's and the adapter's) moves into the backward op, so the adapter's part never exists alone.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.kernels import lora as kernel  # registers torch.ops.memgraph.lora_linear
from memgraph.passes import REWRITE_NOTES
from memgraph.passes._matching import ADD_TARGETS, MUL_TARGETS, VALUE_META, Unsupported, copy_trace_meta, \
    each_match, example_value, fake_run

log = logging.getLogger("memgraph.passes.lora")

__all__ = ["rewrite_lora", "split_forward", "accumulate_input_grads", "sum_input_grads_in_place", "written_into"]

LINEAR_TARGETS = (_compat.LINEAR_FUNCTION, torch.nn.functional.linear)
# An adapter's rank must be this much smaller than the layer's sides for the rewrite to pay (it always computes
# exactly what eager does; a "LoRA" as wide as its layer saves nothing).
MAX_RANK_SHARE = 0.5


@dataclasses.dataclass
class _Match:
    x: fx.Node
    lora_a: fx.Node
    lora_b: fx.Node
    scale: float
    base: fx.Node
    round_delta: bool
    out: fx.Node  # the node whose value the op's output replaces
    chain: list[fx.Node]  # out back to the first linear, users first


def rewrite_lora(gm: fx.GraphModule, example_inputs: list, options: Any) -> fx.GraphModule:
    """Replace every provably equivalent LoRA adapter sum by ``memgraph.lora_linear``."""
    rewritten = [_install(gm, match) for match in each_match(gm, _is_linear, _match, "LoRA-like linear", log)]
    if rewritten:
        gm.graph.lint()
        gm.recompile()
        note = (f"lora: {len(rewritten)} LoRA adapter sums -> memgraph.lora_linear (no float32 tensor of the "
                f"layer's output size; first: {rewritten[0]})")
        gm.__dict__.setdefault(REWRITE_NOTES, []).append(note)
        log.info("memgraph: %s", note)
    return gm


# ------------------------------------------------------------------------------------------------------------
# Matching
# ------------------------------------------------------------------------------------------------------------
def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def _linear_operands(node: fx.Node) -> tuple[Any, Any]:
    """(input, weight) of a bias-free linear call; Unsupported otherwise."""
    args = list(node.args) + [node.kwargs.get(k) for k in ("input", "weight", "bias")[len(node.args):]
                              if k in node.kwargs]
    if len(args) < 2 or (len(args) > 2 and args[2] is not None) or set(node.kwargs) - {"input", "weight", "bias"}:
        raise Unsupported("a linear with a bias or unexpected arguments")
    return args[0], args[1]


def _single_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise Unsupported(f"{node.name} has {len(node.users)} users")
    return next(iter(node.users))


def _cast_dtype(node: Any) -> Optional[torch.dtype]:
    """The dtype a ``.to(dtype)`` / ``.to(dtype=...)`` / ``.float()`` call casts to, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_method":
        return None
    if node.target == "float" and len(node.args) == 1 and not node.kwargs:
        return torch.float32
    if node.target == "to":
        dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
        others = list(node.args[2:]) + [v for k, v in node.kwargs.items() if k != "dtype"]
        if isinstance(dtype, torch.dtype) and not others:
            return dtype
    return None


def _constant(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _match(second: fx.Node) -> Optional[_Match]:
    """The LoRA chain whose second linear (``xa @ B.T``) is ``second``; None when ``second`` is no LoRA B."""
    first, lora_b = _linear_operands(second)
    if not (isinstance(first, fx.Node) and _is_linear(first)):
        return None  # an ordinary linear
    xc, lora_a = _linear_operands(first)
    a, b, xa = example_value(lora_a), example_value(lora_b), example_value(first)
    if not all(isinstance(t, torch.Tensor) for t in (a, b, xa)) or a.dim() != 2 or b.dim() != 2:
        return None
    rank = a.shape[0]
    if b.shape[1] != rank or rank > MAX_RANK_SHARE * min(a.shape[1], b.shape[0]):
        return None  # not a low-rank pair
    if not (isinstance(lora_a, fx.Node) and isinstance(lora_b, fx.Node)):
        raise Unsupported("adapter weights that are not graph values")
    if a.dtype not in kernel.ADAPTER_DTYPES or b.dtype != a.dtype:
        raise Unsupported(f"adapters in {a.dtype}/{b.dtype}; fused only in {kernel.ADAPTER_DTYPES}")
    if rank > kernel.MAX_RANK:
        raise Unsupported(f"rank {rank} > {kernel.MAX_RANK}")
    if _single_user(first) is not second:
        raise Unsupported(f"{first.name} feeds more than the adapter's second linear")
    chain = [second, first]
    x = xc.args[0] if _cast_dtype(xc) == a.dtype else xc
    if not isinstance(x, fx.Node) or not isinstance(example_value(x), torch.Tensor):
        raise Unsupported("the adapter's input is not a tensor value")
    if isinstance(x, fx.Node) and x.op == "call_function" and "dropout" in str(x.target):
        raise Unsupported("LoRA dropout")

    node, scale = second, 1.0
    user = _single_user(node)
    if user.op == "call_function" and user.target in MUL_TARGETS and len(user.args) == 2 and not user.kwargs:
        other = user.args[1] if user.args[0] is node else user.args[0]
        scale = _constant(other)
        if scale is None:
            raise Unsupported(f"the scaling {other!r} is not a constant number")
        node = user
        chain.insert(0, node)
        user = _single_user(node)

    round_delta = False
    cast = _cast_dtype(user)
    if cast is not None and user.args[0] is node:  # the bitsandbytes layers: cast the delta, then add
        round_delta = True
        node = user
        chain.insert(0, node)
        user = _single_user(node)
    if not (user.op == "call_function" and user.target in ADD_TARGETS and len(user.args) == 2 and not user.kwargs):
        raise Unsupported(f"the adapter's output goes to {user.name} ({user.target}), not a sum with the base")
    base = user.args[1] if user.args[0] is node else user.args[0]
    if base is node or not isinstance(base, fx.Node):
        raise Unsupported("the adapter is added to no base output")
    out = user
    chain.insert(0, user)
    _check_values(x, base, a, b, example_value(node), example_value(out))
    base_dtype = example_value(base).dtype
    if round_delta and cast != base_dtype:
        raise Unsupported(f"the delta is cast to {cast}, the base is {base_dtype}")
    if example_value(out).dtype != base_dtype:  # LoraLayer: the float32 sum, then cast back
        after = _single_user(out)
        if _cast_dtype(after) != base_dtype or after.args[0] is not out:
            raise Unsupported(f"the {example_value(out).dtype} sum is not cast back to {base_dtype}")
        out = after
        chain.insert(0, after)
    return _Match(x, lora_a, lora_b, scale, base, round_delta, out, chain)


def _check_values(x: fx.Node, base: fx.Node, a: torch.Tensor, b: torch.Tensor, delta: Any, total: Any) -> None:
    xv, bv = example_value(x), example_value(base)
    if not all(isinstance(t, torch.Tensor) for t in (xv, bv, delta, total)):
        raise Unsupported("missing example values to check shapes on")
    if xv.dtype not in kernel.ACTIVATION_DTYPES or bv.dtype not in kernel.ACTIVATION_DTYPES:
        raise Unsupported(f"dtypes x {xv.dtype}, base {bv.dtype}")
    if xv.shape[-1] != a.shape[1] or tuple(bv.shape) != tuple(delta.shape) or tuple(total.shape) != tuple(bv.shape) \
            or tuple(bv.shape[:-1]) != tuple(xv.shape[:-1]) or bv.shape[-1] != b.shape[0]:
        raise Unsupported(f"shapes x {tuple(xv.shape)}, base {tuple(bv.shape)}, delta {tuple(delta.shape)}")
    devices = {t.device for t in (xv, bv, a, b)}
    if len(devices) != 1 or next(iter(devices)).type not in ("cuda", "cpu", "meta"):
        raise Unsupported(f"devices {sorted(str(d) for d in devices)}")


# ------------------------------------------------------------------------------------------------------------
# Installing
# ------------------------------------------------------------------------------------------------------------
def _install(gm: fx.GraphModule, match: _Match) -> str:
    graph = gm.graph
    op = torch.ops.memgraph.lora_linear.default
    arguments = (match.base, match.x, match.lora_a, match.lora_b, match.scale, match.round_delta)
    with graph.inserting_before(match.out):
        fused = graph.call_function(op, arguments)
        out = graph.call_function(operator.getitem, (fused, 0))
    copy_trace_meta(match.out, fused, out)
    values = fake_run(op, arguments)
    if values is not None:
        fused.meta["example_value"], out.meta["example_value"] = values, values[0]
    match.out.replace_all_uses_with(out)
    for node in match.chain:  # users first: each becomes unused once the one after it is gone
        if not node.users:
            graph.erase_node(node)
    a, b = example_value(match.lora_a), example_value(match.lora_b)
    return f"{match.out.name} (rank {a.shape[0]}, {a.shape[1]} -> {b.shape[0]}, scale {match.scale:g})"



# ------------------------------------------------------------------------------------------------------------
# In the joint graph: the forward in two halves
# ------------------------------------------------------------------------------------------------------------
# node meta that describes one op's own arguments or outputs: not carried over to the ops replacing it


def split_forward(joint: fx.GraphModule) -> int:
    """Replace each ``lora_linear`` (out, xa) by ``lora_project`` (xa, from x alone) and ``lora_apply`` (out, from
    base and xa): the same kernels and values, but xa no longer depends on the base layer. A backward that needs
    xa and not out (a layer's last projection, whose output only the next layer reads) then recomputes x @ A.T
    instead of the base layer's matmul under it; planners may also keep xa ([tokens, R]) alone. Returns how
    many were split; an op whose tuple is read whole, or called with keyword arguments, is left as it is. Every
    op is checked before the graph is edited."""
    op = torch.ops.memgraph.lora_linear.default
    splits = [(node, _halves_eager_inputs(node.meta.get("eager_input_vals"), node.meta.get("val")))
              for node in joint.graph.nodes
              if node.target is op and not node.kwargs and len(node.args) == 6 and
              all(u.target is operator.getitem and u.args[1] in (0, 1) for u in node.users)]
    for node, eager in splits:
        _split_one(joint.graph, node, eager)
    if splits:
        joint.graph.lint()
        joint.recompile()
    return len(splits)


def _split_one(graph: fx.Graph, node: fx.Node, eager: Optional[dict]) -> None:
    """Install lora_project and, where out is read, lora_apply in place of ``node`` and its getitems."""
    base, x, lora_a, lora_b, scale, round_delta = node.args
    value = node.meta.get("val")
    items = {0: [], 1: []}
    for user in node.users:
        items[user.args[1]].append(user)
    with graph.inserting_before(node):
        xa = graph.call_function(torch.ops.memgraph.lora_project.default, (x, lora_a))
        out = graph.call_function(torch.ops.memgraph.lora_apply.default, (base, xa, lora_b, scale, round_delta)) \
            if items[0] else None
    for half, index in ((out, 0), (xa, 1)):
        if half is None:
            continue
        half.meta.update({k: copy.copy(v) for k, v in node.meta.items() if k not in VALUE_META})
        if isinstance(value, (tuple, list)):
            half.meta["val"] = value[index]
        if eager is not None:
            half.meta["eager_input_vals"] = eager[index]
        for item in items[index]:
            item.replace_all_uses_with(half)
            graph.erase_node(item)
    graph.erase_node(node)


def _halves_eager_inputs(eager: Any, value: Any) -> Optional[dict]:
    """The eager input values (Inductor matches a custom op's input strides to them) of lora_apply (0, for out)
    and lora_project (1, for xa), from lora_linear's: None where lora_linear has none in the form expected (then
    neither half gets any, and Inductor picks the strides)."""
    if eager is None or not isinstance(value, (tuple, list)) or len(value) != 2:
        return None
    args, kwargs = eager
    if kwargs or len(args) != 6:
        return None
    base, x, lora_a, lora_b, scale, round_delta = args
    return {0: ((base, value[1], lora_b, scale, round_delta), {}), 1: ((x, lora_a), {})}


# ------------------------------------------------------------------------------------------------------------
# In the joint graph: x's two gradients summed by the backward op itself
# ------------------------------------------------------------------------------------------------------------
def accumulate_input_grads(joint: fx.GraphModule) -> int:
    """AOTAutograd sums x's gradient from the base layer and from the adapter: ``add(g_base,
    lora_linear_backward(...)[0])``. Give the op ``g_base`` to add into its own output instead, so the adapter's
    [tokens, K] gradient never exists by itself: one tensor of x's size less where the MLP's backward peaks (same
    sum, rounded the same way). Returns how many sums were fused; the graph is left valid either way."""
    backward_op = torch.ops.memgraph.lora_linear_backward.default
    order = {node: i for i, node in enumerate(joint.graph.nodes)}
    fused = 0
    for node in list(joint.graph.nodes):
        if node.target is not backward_op or len(node.args) > 9 or node.kwargs:
            continue
        found = _input_grad_sum(node, order)
        if found is None:
            continue
        grad_x, total, other = found
        with joint.graph.inserting_before(total):
            replacement = joint.graph.call_function(backward_op, node.args, {"accumulate": other})
        replacement.meta.update(node.meta)
        outputs = list(node.users)
        node.replace_all_uses_with(replacement)
        anchor = replacement
        for output in outputs:  # the getitems move with the op (their users all come after the sum)
            anchor.append(output)
            anchor = output
        total.replace_all_uses_with(grad_x)
        joint.graph.erase_node(total)
        joint.graph.erase_node(node)
        fused += 1
    if fused:
        joint.graph.lint()
        joint.recompile()
    return fused


def _input_grad_sum(node: fx.Node, order: dict) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(the op's dx getitem, the sum it feeds, the other gradient) when the op may absorb that sum: placed at the
    sum, after the other gradient, with no user of the op's other outputs in between."""
    grad_x = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    if len(grad_x) != 1 or len(grad_x[0].users) != 1:
        return None
    grad_x = grad_x[0]
    total = next(iter(grad_x.users))
    if total.target is not torch.ops.aten.add.Tensor or len(total.args) != 2 or total.kwargs:
        return None
    other = total.args[1] if total.args[0] is grad_x else total.args[0]
    values = [example_value(n) for n in (grad_x, other, total)]
    if not isinstance(other, fx.Node) or not all(isinstance(v, torch.Tensor) for v in values) or \
            len({(str(tuple(v.shape)), v.dtype) for v in values}) != 1:  # str: symbolic sizes are not hashable
        return None
    outputs = [u for u in node.users if u is not grad_x]
    if any(order[user] < order[total] for output in outputs for user in output.users):
        return None  # dA or dB is read before the sum: the op cannot move there
    return grad_x, total, other


# ------------------------------------------------------------------------------------------------------------
# In the partitioned backward graph: that sum written into the base layer's gradient
# ------------------------------------------------------------------------------------------------------------
def written_into(node: fx.Node) -> dict[int, fx.Node]:
    """{0: the base layer's gradient} when ``lora_linear_backward``'s dx (the sum) may be written into it: an op's
    fresh output that nothing else reads. The summed gradient and the base layer's then share one tensor of x's
    size where the MLP's backward peaks (Llama-3-8B at 100k tokens: 2.7 GiB)."""
    other = node.kwargs.get("accumulate")
    if len(node.args) != 9 or not isinstance(other, fx.Node) or not _read_only_through(other):
        return {}
    if any(user.target is not operator.getitem for user in node.users):
        return {}  # the tuple itself is read: the op stays functional
    return {0: other}


def _read_only_through(node: fx.Node) -> bool:
    """Whether ``node``'s storage is read by nothing but ``node``'s one user: a fresh output of an op, or a chain of
    views of one (``mm`` then ``view`` for nn.Linear's input gradient), each read by the next alone."""
    from memgraph.cost_model.policies import is_multi_output
    from memgraph.cost_model.values import node_value

    while True:
        if node.op != "call_function" or len(node.users) != 1:
            return False
        outputs = node_value(node).outputs
        if len(outputs) != 1 or outputs[0] is None:
            return False
        if outputs[0].alias is None:
            return True
        source_name, index = outputs[0].alias
        source = next((n for n in node.all_input_nodes if n.name == source_name), None)
        if source is None:
            return False
        if is_multi_output(source):  # a tuple's item: no other reader of that item
            item = node_value(source).outputs[index]
            return node.target is operator.getitem and item is not None and item.alias is None and \
                sum(u.target is operator.getitem and u.args[1] == index for u in source.users) == 1
        node = source


def sum_input_grads_in_place(gm: fx.GraphModule) -> int:
    """Replace each ``lora_linear_backward(..., accumulate=g)`` whose dx may be written into ``g``
    (``written_into``) by ``lora_linear_backward_into``, which sums into ``g`` in place; dx's readers read ``g``.
    Run on a backward graph in its final order (the cost model counts dx on g's storage the same way). Returns how
    many sums now happen in place."""
    backward_op = torch.ops.memgraph.lora_linear_backward.default
    changed = 0
    for node in list(gm.graph.nodes):
        if node.target is not backward_op or not written_into(node):
            continue
        items = {user.args[1]: user for user in node.users}
        # The node itself becomes the in-place op (its name stays: the cost model names the step alike).
        grad, x, xa, lora_a, lora_b, scale, _, a_grad, b_grad = node.args
        other = node.kwargs["accumulate"]
        node.target = torch.ops.memgraph.lora_linear_backward_into.default
        node.args, node.kwargs = (grad, x, xa, lora_a, lora_b, scale, a_grad, b_grad, other), {}
        value = node.meta.get("val")
        if isinstance(value, (tuple, list)) and len(value) == 3:
            node.meta["val"] = (value[1], value[2])
        if 0 in items:
            items[0].replace_all_uses_with(other)
            gm.graph.erase_node(items[0])
        for index in (1, 2):
            if index in items:
                items[index].args = (node, index - 1)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _register_in_place_outputs() -> None:
    from memgraph.cost_model.values import register_in_place_outputs

    register_in_place_outputs(torch.ops.memgraph.lora_linear_backward.default, written_into)


_register_in_place_outputs()
