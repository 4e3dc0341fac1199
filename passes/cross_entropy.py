"""Rewrite the lm_head + cross-entropy of a causal LM in Dynamo's FX graph into
``torch.ops.memgraph.linear_cross_entropy``: the full logits, their float32 copy, their softmax and their
gradient never exist.

What HF's causal-LM loss emits (transformers 5.x, ``ForCausalLMLoss``), matched on torch ops, never on module
names, from the loss backwards:

    z = linear(hidden, W, b)                 # the lm_head (torch._C._nn.linear)
    z = z * s  |  z / s                      # optional logit scale (Cohere's logit_scale, Granite's scaling)
    z = tanh(z / c) * c                      # optional final soft-capping (Gemma 2)
    logits = z                               # returned to the user as ``outputs.logits`` (or not at all)
    y = logits.float().view(-1, V)           # HF's float32 upcast and flattening
    loss = cross_entropy(y, labels, ignore_index=k, reduction="mean" | "sum")
                                             # "sum" then "/ num_items_in_batch" under gradient accumulation

The label shift (pad + slice) and a ``/ num_items_in_batch`` stay in the graph: the op takes the shifted labels
and sums or averages as the call did. Every intermediate node of the chain must feed only the next one; the
logits may in addition be a graph output: then the op returns them in the model's dtype (no gradient flows
through them), or an empty tensor with ``options.drop_logits``. Anything else — a loss other than a plain
cross-entropy (label smoothing, class weights, z-loss), logits used elsewhere in the graph, a non-constant scale
— is left unchanged and logged; results stay exact. The chunk size comes from bytes: ``chunk_tokens_for`` (a
share of ``options.memory_budget``, never fewer rows than keep the matmuls compute-bound).
"""
from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.kernels import cross_entropy as kernel  # registers torch.ops.memgraph.linear_cross_entropy
from memgraph.passes._matching import Unsupported as _Unsupported, call_arguments, copy_trace_meta, each_match, \
    example_value, fake_run, only_user, through_scale, through_softcap
from memgraph.passes import REWRITE_NOTES

log = logging.getLogger("memgraph.passes.cross_entropy")

__all__ = ["rewrite_cross_entropy"]

CROSS_ENTROPY_TARGETS = (torch.nn.functional.cross_entropy,)
CROSS_ENTROPY_PARAMETERS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction",
                            "label_smoothing")
CROSS_ENTROPY_DEFAULTS = {"weight": None, "size_average": None, "ignore_index": -100, "reduce": None,
                          "reduction": "mean", "label_smoothing": 0.0}
LINEAR_TARGETS = (_compat.LINEAR_FUNCTION, torch.nn.functional.linear)
VIEW_METHODS = ("view", "reshape")


@dataclasses.dataclass
class _Match:
    loss: fx.Node  # the cross_entropy call
    logits: fx.Node  # the last node before the float upcast (what HF returns)
    chain: list[fx.Node]  # loss back to the linear, users first
    hidden: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    labels: fx.Node
    logit_scale: float
    softcap: Optional[float]
    ignore_index: int
    reduction: str
    logits_outputs: list[fx.Node]  # users of ``logits`` outside the chain: the graph's output node


def rewrite_cross_entropy(gm: fx.GraphModule, example_inputs: list, options: Any) -> fx.GraphModule:
    """Replace every provably equivalent lm_head + cross-entropy by ``memgraph.linear_cross_entropy``."""
    rewritten = 0
    is_loss = lambda node: node.op == "call_function" and node.target in CROSS_ENTROPY_TARGETS  # noqa: E731
    for match in each_match(gm, is_loss, _match, "cross-entropy", log):
        note = _install(gm, match, options)
        gm.__dict__.setdefault(REWRITE_NOTES, []).append(note)
        log.info("memgraph: %s", note)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return gm


# ------------------------------------------------------------------------------------------------------------
# Matching
# ------------------------------------------------------------------------------------------------------------


def _is_method(node: fx.Node, names: tuple[str, ...]) -> bool:
    return node.op == "call_method" and node.target in names


def _is_float_upcast(node: fx.Node) -> bool:
    if _is_method(node, ("float",)) and len(node.args) == 1 and not node.kwargs:
        return True
    if _is_method(node, ("to", "type")):
        dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
        others = [a for a in node.args[2:]] + [v for k, v in node.kwargs.items() if k != "dtype"]
        return dtype is torch.float32 and not others
    return False






def _match(loss: fx.Node) -> _Match:
    arguments = call_arguments(loss, CROSS_ENTROPY_PARAMETERS, CROSS_ENTROPY_DEFAULTS)
    if arguments["weight"] is not None or arguments["size_average"] is not None or arguments["reduce"] is not None:
        raise _Unsupported("class weights or the legacy size_average/reduce arguments")
    if arguments["label_smoothing"] != 0.0:
        raise _Unsupported(f"label_smoothing={arguments['label_smoothing']!r}")
    reduction, ignore_index = arguments["reduction"], arguments["ignore_index"]
    if reduction not in kernel.REDUCTIONS:
        raise _Unsupported(f"reduction={reduction!r} (rewritten: {list(kernel.REDUCTIONS)})")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise _Unsupported(f"ignore_index={ignore_index!r} is not a constant")
    flat, labels = arguments["input"], arguments["target"]
    if not (isinstance(flat, fx.Node) and isinstance(labels, fx.Node)):
        raise _Unsupported("input/target are not graph values")

    # view(-1, V) <- float() <- [softcap] <- [scale] <- linear
    chain = [loss]
    node = flat
    if _is_method(node, VIEW_METHODS):
        only_user(node, chain[-1])
        chain.append(node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and _is_float_upcast(node)):
        raise _Unsupported("the loss's input is not the float32 upcast of the logits (HF's logits.float())")
    only_user(node, chain[-1])
    chain.append(node)
    logits = node.args[0]
    if not isinstance(logits, fx.Node):
        raise _Unsupported("the upcast's input is not a graph value")
    logits_outputs = [u for u in logits.users if u is not node]
    if any(u.op != "output" for u in logits_outputs):
        raise _Unsupported(f"the logits are also used by {sorted(u.name for u in logits_outputs)}")
    node, softcap = through_softcap(logits, chain)
    node, logit_scale = through_scale(node, chain)
    if not (node.op == "call_function" and node.target in LINEAR_TARGETS):
        raise _Unsupported(f"the logits do not come from a linear layer (from {node.op} {node.target})")
    chain.append(node)
    padded = list(node.args) + [None] * (3 - len(node.args))
    hidden, weight, bias = padded[0], padded[1], node.kwargs.get("bias", padded[2])
    if not isinstance(hidden, fx.Node) or not isinstance(weight, fx.Node):
        raise _Unsupported("the lm_head's input and weight are not graph values")
    if bias is not None and not isinstance(bias, fx.Node):
        raise _Unsupported("the lm_head's bias is not a graph value")
    _check_values(hidden, weight, bias, labels, flat)
    return _Match(loss, logits, chain, hidden, weight, bias, labels, logit_scale, softcap, ignore_index, reduction,
                  logits_outputs)






def _check_values(hidden: fx.Node, weight: fx.Node, bias: Optional[fx.Node], labels: fx.Node, flat: fx.Node) -> None:
    h, w, y, t = (example_value(n) for n in (hidden, weight, flat, labels))
    b = example_value(bias) if bias is not None else None
    if not all(isinstance(x, torch.Tensor) for x in (h, w, y, t)) or (bias is not None and b is None):
        raise _Unsupported("missing example values to check shapes on")
    if w.dim() != 2 or h.shape[-1] != w.shape[1] or y.dim() != 2 or y.shape[-1] != w.shape[0]:
        raise _Unsupported(f"shapes hidden {tuple(h.shape)}, weight {tuple(w.shape)}, logits {tuple(y.shape)}")
    if h.dtype not in kernel.SUPPORTED_DTYPES or w.dtype != h.dtype or (b is not None and b.dtype != h.dtype):
        raise _Unsupported(f"dtypes hidden {h.dtype}, weight {w.dtype}")
    if t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
        raise _Unsupported(f"labels {t.dtype} {tuple(t.shape)}")
    if h.device.type not in ("cuda", "cpu", "meta") or t.device != h.device:  # meta: planning only
        raise _Unsupported(f"devices hidden {h.device}, labels {t.device}")


# ------------------------------------------------------------------------------------------------------------
# Installing
# ------------------------------------------------------------------------------------------------------------
def _install(gm: fx.GraphModule, match: _Match, options: Any) -> str:
    graph = gm.graph
    hidden, weight = example_value(match.hidden), example_value(match.weight)
    bias = example_value(match.bias) if match.bias is not None else None
    drop = bool(getattr(options, "drop_logits", False))
    return_logits = bool(match.logits_outputs) and not drop
    chunk = kernel.chunk_tokens_for(weight.shape[0], hidden.dtype, getattr(options, "memory_budget", None))
    arguments = (match.hidden, match.weight, match.bias, match.labels, match.logit_scale, match.softcap,
                 match.ignore_index, match.reduction, return_logits, chunk, bool(hidden.requires_grad),
                 bool(weight.requires_grad), bool(bias is not None and bias.requires_grad))
    op = torch.ops.memgraph.linear_cross_entropy.default
    with graph.inserting_before(match.loss):
        fused = graph.call_function(op, arguments)
        loss = graph.call_function(operator.getitem, (fused, 0))
        logits = graph.call_function(operator.getitem, (fused, 1))
    copy_trace_meta(match.loss, fused, loss, logits)
    values = fake_run(op, arguments)
    if values is not None:
        fused.meta["example_value"] = values
        loss.meta["example_value"], logits.meta["example_value"] = values[0], values[1]
    match.loss.replace_all_uses_with(loss)
    for output in match.logits_outputs:
        output.replace_input_with(match.logits, logits)
    for node in match.chain:  # users first: each becomes unused once the one after it is gone
        if not node.users:
            graph.erase_node(node)
    if not logits.users:
        graph.erase_node(logits)
    vocab, features = weight.shape
    kept = "dropped (drop_logits: outputs.logits is empty)" if match.logits_outputs and drop else \
        "returned in the model's dtype, without gradient" if return_logits else "not returned by the graph"
    shaping = "".join([f", logit scale {match.logit_scale:g}" if match.logit_scale != 1.0 else "",
                       f", soft-cap {match.softcap:g}" if match.softcap is not None else ""])
    return (f"cross_entropy: lm_head {match.chain[-1].name} ({vocab} x {features}){shaping} + {match.reduction} "
            f"cross-entropy -> memgraph.linear_cross_entropy in chunks of {chunk} tokens; logits {kept}")

