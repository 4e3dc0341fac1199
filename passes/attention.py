"""Rewrite attention in Dynamo's FX graph into ``torch.ops.memgraph.attention``: ``scaled_dot_product_attention``
calls, and the eager form HF writes where SDPA cannot serve (Gemma 2's soft-capped scores; models without SDPA).

What HF's sdpa path emits (transformers 5.x, seen by compiling tiny llama/mistral/qwen2/gemma models):

* no attention mask: ``scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=s,
  is_causal=True, enable_gqa=True)``; K/V have the KV heads (native GQA).
* with a mask (a padding mask from ``attention_mask``, or a sliding window): the mask is built in the graph
  (``arange`` indices compared, ``&``-ed, ``expand``-ed), ``is_causal=False``, and K/V are expanded by
  ``repeat_kv``: ``x[:, :, None, :, :].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)``.

What HF's eager path emits (``eager_attention_forward``): ``matmul(q, repeat_kv(k).transpose(2, 3)) * scaling``,
for Gemma 2 ``tanh(x / c) * c``, ``+ mask`` (an additive float mask built in the graph), ``softmax(dim=-1,
dtype=float32)``, ``.to(q.dtype)``, ``dropout(p=0)``, ``matmul(P, repeat_kv(v))``. Matched from the last matmul
back: every node between the two matmuls must feed only the next one (a returned ``attn_weights`` keeps the eager
form), the scale and cap must be constants, the dropout the identity; the mask and K/V are then handled as SDPA's.

What is rewritten, and how it is proven equivalent:

* ``attn_mask is None``: causal = ``is_causal``.
* a mask computed from constants only (no graph input, no module state, nothing random: HF's causal and
  sliding-window masks when no ``attention_mask`` is passed) is evaluated once, here, and compared element by
  element with the causal, causal sliding-window, full and bidirectional-window patterns; a match gives
  ``causal``/``window``.
* a mask computed from one [B, S] graph input and constants (HF's causal-and-padding mask from ``attention_mask``,
  or its packed-sequence mask from ``position_ids``) is evaluated on probe values of that input (all valid, left
  and right padding, random holes and values other than 0/1; packed rows of random lengths starting at random
  positions) and compared element by element with the segment form the kernel takes: padding (key j visible
  where ``attention_mask[b, j] != 0``) or packing (same sequence, a new one wherever the position does not follow
  the previous one by 1). A match installs the segments (computed in the graph from that input: [B, S] integers,
  no S x S mask); anything else is left alone. This is a check on probes, not a symbolic proof: the subgraph
  reads nothing else (no other input, nothing random or mutated), and the probes are built to tell apart the
  variants a model plausibly writes (``== 1`` vs ``!= 0``, masking query rows too, position- vs index-causal).
* dynamic shapes: HF builds its mask in the graph from the symbolic length. A mask that reads nothing but the
  graph's size inputs is a function of them alone: its pattern is read at a probe length (long enough to show a
  window) and installed, and the compiled graph re-checks it at run time once per distinct size (``MaskGuard``),
  raising rather than computing anything else if a length ever gives another pattern.
* a ``repeat_kv`` expansion (checked on the example values' shapes) feeding K and V is bypassed: the op reads the
  un-expanded K/V, GQA is native, and the expanded copies disappear from the graph.

Left unchanged (and logged at INFO on ``memgraph.passes.attention``): dropout_p other than a constant 0, a scale
or flag that is not a constant, head dims the kernels lack, dtypes other than fp16/bf16/fp32, query and key
lengths that differ, broadcast batch dims, masks that cannot be proven, and anything unexpected (never raises).
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import math
import operator
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.kernels import attention as attention_kernel
from memgraph.passes._matching import ADD_TARGETS, Unsupported as _Unsupported, call_arguments, copy_trace_meta, \
    example_value, only_user, record_example_values, through_scale, through_softcap
from memgraph.passes import RUNTIME_CHECKS

log = logging.getLogger("memgraph.passes.attention")

SDPA_TARGETS = (
    _compat.SDPA_FUNCTION,
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
)
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
# Proving a mask evaluates it: one element per (query, key) pair (and per batch/head it is not broadcast over).
MAX_MASK_ELEMENTS = 1 << 28  # masks this small are always evaluated (length 16,384)
MASK_HOST_SHARE = 0.5  # larger ones while their evaluation fits this share of the host memory available
BYTES_PER_MASK_ELEMENT = 16  # a float mask and the boolean temporaries of building and checking it


def mask_elements_limit() -> int:
    """How many elements a mask may have for the pass to evaluate it (the proof that it is the fused pattern):
    at least ``MAX_MASK_ELEMENTS``, more where the host has memory for it (one evaluation per length, while
    compiling or at a dynamic graph's first call at that length)."""
    from memgraph.cost_model.transfers import available_host_bytes

    return max(MAX_MASK_ELEMENTS, int(available_host_bytes() * MASK_HOST_SHARE / BYTES_PER_MASK_ELEMENT))
# An additive float mask "masks" a pair when adding it makes the probability exactly 0: -inf or a huge negative
# (HF fills with torch.finfo(dtype).min). Anything between is a bias, not a mask.
MASKED_FLOAT_THRESHOLD_FRACTION = 0.5  # of torch.finfo(mask dtype).min
RANDOM_OPS = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "bernoulli",
              "dropout", "normal", "uniform", "multinomial", "native_dropout", "exponential", "poisson"}
# Ops whose result may share memory with their input: a mutation through one of them mutates the input.
VIEW_METHODS = {"view", "reshape", "expand", "transpose", "permute", "unsqueeze", "squeeze", "narrow", "select",
                "contiguous", "flatten", "unflatten", "as_strided", "view_as", "expand_as", "t", "__getitem__",
                "detach", "to", "type_as", "float", "bool"}
IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


@dataclasses.dataclass
class _Match:
    query: fx.Node
    key: fx.Node
    value: fx.Node
    causal: bool
    window: Optional[int]
    scale: Optional[float]
    dead_candidates: list  # nodes that may become unused once the SDPA call is replaced
    segments: Optional[tuple] = None  # (segments function, the [B, S] graph input it reads) for masked batches
    softcap: Optional[float] = None  # Gemma 2's tanh cap on the scaled scores (eager attention only)
    # A float mask's fully masked row (a left-padded row before its first token) is a softmax over scores that all
    # round to the mask's large negative: uniform weights, the mean of V over every key. The kernel gives such a
    # row 0 (a boolean mask's answer in SDPA), so the rewrite puts the mean there.
    mean_where_empty: bool = False


def rewrite_attention(gm: fx.GraphModule, example_inputs: list, options: Any) -> fx.GraphModule:
    """Replace every provably equivalent SDPA call by ``memgraph.attention`` with ``options.kv_bits``."""
    kv_bits = options.kv_bits  # validated by Options
    rewritten = 0
    segment_nodes: dict = {}  # one segments computation per (function, input), shared by every layer
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph:  # erased with an attention rewritten before it
            continue
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            matcher = _match
        elif _is_eager_candidate(node):
            matcher = _match_eager
        else:
            continue
        try:
            match = matcher(gm, node)
        except _NotEagerAttention:
            continue
        except _Unsupported as reason:
            log.info("memgraph: attention %s left unchanged: %s", node.name, reason)
            continue
        except Exception as error:  # noqa: BLE001 - an unexpected graph must never break compilation
            log.info("memgraph: attention %s left unchanged: could not analyse it (%s: %s)", node.name,
                     type(error).__name__, error)
            continue
        _install(gm, node, match, kv_bits, segment_nodes)
        rewritten += 1
    gm.__dict__.pop(MASK_PROOFS, None)
    if rewritten:
        gm.graph.lint()
        gm.recompile()
        log.info("memgraph: %d attention call(s) now run memgraph.attention (kv_bits=%d)", rewritten, kv_bits)
    return gm


# ------------------------------------------------------------------------------------------------------------
# Matching
# ------------------------------------------------------------------------------------------------------------
def _same_size(a, b) -> bool:
    """Static equality of two sizes (ints or SymInts); unknown counts as different."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001
        return False


def _match(gm: fx.GraphModule, node: fx.Node) -> _Match:
    """An SDPA call: its constant flags, then what every attention shares (``_match_attention``)."""
    arguments = call_arguments(node, SDPA_PARAMETERS, SDPA_DEFAULTS)
    dropout_p, is_causal, scale, enable_gqa = (arguments[name] for name in ("dropout_p", "is_causal", "scale",
                                                                           "enable_gqa"))
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise _Unsupported(f"dropout_p={dropout_p!r} (only a constant 0 is equivalent)")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        raise _Unsupported(f"is_causal={is_causal!r} / enable_gqa={enable_gqa!r} are not constants")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise _Unsupported(f"scale={scale!r} is not a constant")
    return _match_attention(gm, [node], arguments["query"], arguments["key"], arguments["value"],
                            arguments["attn_mask"], is_causal, None if scale is None else float(scale), enable_gqa)


def _match_attention(gm: fx.GraphModule, dead: list, query, key, value, mask, is_causal: bool,
                     scale: Optional[float], enable_gqa: bool, softcap: Optional[float] = None) -> _Match:
    """Shapes, dtypes and heads checked, the repeat_kv copies bypassed, the mask proven; ``dead``: the nodes that
    computed the attention (the call first), dropped once it is replaced."""
    q, k, v = (example_value(x) for x in (query, key, value))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise _Unsupported("query/key/value have no example values to check shapes on")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise _Unsupported(f"needs 4-d [B, H, S, D] inputs; got {q.dim()}-d/{k.dim()}-d/{v.dim()}-d")
    head_dim = q.shape[-1]
    if not isinstance(head_dim, int) or head_dim not in attention_kernel.SUPPORTED_HEAD_DIMS:
        raise _Unsupported(f"head_dim={head_dim} (supported: {attention_kernel.SUPPORTED_HEAD_DIMS})")
    if not (_same_size(k.shape[-1], head_dim) and _same_size(v.shape[-1], head_dim)):
        raise _Unsupported(f"key/value head dims {k.shape[-1]}/{v.shape[-1]} differ from the query's {head_dim}")
    if q.dtype not in attention_kernel.SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise _Unsupported(f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (need one of fp16, bf16, fp32)")
    if q.device.type not in ("cuda", "cpu", "meta"):  # meta: planning without a GPU (fake impls only)
        raise _Unsupported(f"device {q.device}")
    if not all(_same_size(x.shape[0], q.shape[0]) for x in (k, v)):
        raise _Unsupported("batch sizes differ (broadcast batch)")
    if not all(_same_size(x.shape[2], q.shape[2]) for x in (k, v)):
        raise _Unsupported(f"query length {q.shape[2]} and key length {k.shape[2]} are not provably equal")
    if not (_same_size(k.shape[1], v.shape[1])):
        raise _Unsupported("key and value head counts differ")
    heads, kv_heads = q.shape[1], k.shape[1]
    if not (isinstance(heads, int) and isinstance(kv_heads, int)):
        raise _Unsupported("symbolic head counts")
    if enable_gqa and heads % kv_heads != 0:
        raise _Unsupported(f"Hkv={kv_heads} does not divide Hq={heads}")
    if not enable_gqa and kv_heads not in (1, heads):  # SDPA broadcasts a single KV head; anything else errors
        raise _Unsupported(f"Hq={heads}, Hkv={kv_heads} without enable_gqa")

    dead = list(dead)
    expanded_key, expanded_value = _repeat_kv_source(key), _repeat_kv_source(value)
    # Reading the un-expanded K/V at the SDPA call is only the same if nothing mutates them (or the copies).
    bypass = (expanded_key is not None and expanded_value is not None and expanded_key[1] == expanded_value[1]
              and not any(_may_be_mutated(n) for n in (expanded_key[0], expanded_value[0], key, value)))
    if bypass:
        key, _, key_chain = expanded_key
        value, _, value_chain = expanded_value
        dead += key_chain + value_chain

    segments = None
    if mask is None:
        causal, window = is_causal, None
    elif is_causal:
        raise _Unsupported("both attn_mask and is_causal=True")
    else:
        causal, window, mask_nodes, segments = _prove_mask(gm, mask, q)
        dead += mask_nodes
    mean_where_empty = segments is not None and example_value(mask).is_floating_point()
    return _Match(query, key, value, causal, window, scale, dead, segments, softcap, mean_where_empty)


# --- eager attention, as HF's ``eager_attention_forward`` writes it ---
# matmul(dropout_0(cast(softmax(softcap(matmul(q, k.transpose(2, 3)) * s) + mask, -1))), v); every step but the
# two matmuls and the softmax optional. Gemma 2 takes this path (SDPA has no soft-cap), as do models without SDPA.
MATMUL_TARGETS = (torch.matmul, operator.matmul)
SOFTMAX_TARGETS = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)
DROPOUT_TARGETS = (torch.nn.functional.dropout,)
FLOAT_CASTS = ("float", "half", "bfloat16")
SOFTMAX_DTYPES = (None, torch.float32)  # the kernel's softmax runs in float32


class _NotEagerAttention(Exception):
    """A matmul that is not the last one of an eager attention (skipped without a log line)."""


def _is_matmul(node: Any) -> bool:
    return isinstance(node, fx.Node) and (node.op == "call_function" and node.target in MATMUL_TARGETS
                                          or node.op == "call_method" and node.target == "matmul")


def _is_eager_candidate(node: fx.Node) -> bool:
    return _is_matmul(node) and len(node.args) == 2 and not node.kwargs


def _link(chain: list[fx.Node], node: fx.Node) -> None:
    """Append node to the chain a rewrite replaces, after checking it feeds nothing but the chain's last node."""
    only_user(node, chain[-1])
    chain.append(node)


def _through_dropout(node: fx.Node, chain: list[fx.Node]) -> fx.Node:
    """Dropout with a constant p = 0 (or constant training=False) is the identity."""
    if not (node.op == "call_function" and node.target in DROPOUT_TARGETS):
        return node
    arguments = call_arguments(node, ("input", "p", "training", "inplace"),
                               {"p": 0.5, "training": True, "inplace": False})
    p, training = arguments["p"], arguments["training"]
    if arguments["inplace"] is not False or not (p == 0 and isinstance(p, (int, float)) or training is False):
        raise _Unsupported(f"attention dropout p={p!r}, training={training!r} (only the identity is equivalent)")
    _link(chain, node)
    return arguments["input"]


def _through_dtype_casts(node: fx.Node, chain: list[fx.Node]) -> fx.Node:
    """``.to(dtype)``, ``.type_as(x)``, ``.float()``...: the kernel rounds P to V's dtype for P @ V itself."""
    while isinstance(node, fx.Node) and node.op == "call_method":
        if node.target in FLOAT_CASTS and len(node.args) == 1 and not node.kwargs:
            pass
        elif node.target == "to":
            dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
            others = list(node.args[2:]) + [v for k, v in node.kwargs.items() if k != "dtype"]
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point) or others:
                raise _Unsupported(f"{node.name}: .to({node.args[1:]}, {node.kwargs}) is not a dtype cast")
        elif node.target == "type_as" and len(node.args) == 2:
            pass
        else:
            break
        _link(chain, node)
        node = node.args[0]
    return node


def _is_softmax(node: Any) -> bool:
    return isinstance(node, fx.Node) and (node.op == "call_function" and node.target in SOFTMAX_TARGETS
                                          or node.op == "call_method" and node.target == "softmax")


def _softmax_input(node: Any) -> fx.Node:
    """The input of a softmax over the last dim in float32 (or the input's dtype); _NotEagerAttention if node is
    no softmax."""
    if not _is_softmax(node):
        raise _NotEagerAttention
    if node.op == "call_method":
        arguments = call_arguments(node, ("input", "dim", "dtype"), {"dtype": None})
    else:
        arguments = call_arguments(node, ("input", "dim", "_stacklevel", "dtype"),
                                   {"dim": None, "_stacklevel": 3, "dtype": None})
    scores = example_value(arguments["input"])
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4 or arguments["dim"] not in (-1, 3):
        raise _Unsupported(f"softmax over dim {arguments['dim']!r} of a non-4-d score tensor")
    if arguments["dtype"] not in SOFTMAX_DTYPES or scores.dtype == torch.float64:
        raise _Unsupported(f"softmax of {scores.dtype} in dtype {arguments['dtype']} (the kernel's is float32)")
    return arguments["input"]


def _transposed_key(node: Any) -> fx.Node:
    """k from ``k.transpose(2, 3)`` (or -2/-1 in either order) of a 4-d k."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target == "transpose"
            and len(node.args) == 3 and not node.kwargs):
        raise _Unsupported("the scores are not q @ k.transpose(2, 3)")
    if {a % 4 if isinstance(a, int) else a for a in node.args[1:]} != {2, 3}:
        raise _Unsupported(f"the key is transposed over dims {node.args[1:]}, not the last two")
    return node.args[0]


def _scores_side(node: fx.Node, chain: list[fx.Node]) -> tuple[fx.Node, fx.Node, float, Optional[float]]:
    """(query, key, scale, softcap) of ``softcap(q @ k.transpose(2, 3) * scale)``, the nodes appended to chain."""
    node, softcap = through_softcap(node, chain)
    node, scale = through_scale(node, chain)
    if not (_is_eager_candidate(node) and isinstance(node.args[0], fx.Node)):
        raise _Unsupported(f"the softmax's scores do not come from q @ k^T (from {node.op} {node.target})")
    chain.append(node)
    transposed = node.args[1]
    key = _transposed_key(transposed)
    only_user(transposed, node)
    chain.append(transposed)
    return node.args[0], key, scale, softcap


def _match_eager(gm: fx.GraphModule, node: fx.Node) -> _Match:
    """The last matmul of an eager attention, matched back to q, k, v, the scale, soft-cap and mask."""
    probabilities, value = node.args
    if not _reaches_softmax(probabilities):
        raise _NotEagerAttention
    chain = [node]
    softmax = _through_dtype_casts(_through_dropout(probabilities, chain), chain)
    logits = _softmax_input(softmax)
    _link(chain, softmax)
    scores, mask = logits, None
    if logits.op == "call_function" and logits.target in ADD_TARGETS and len(logits.args) == 2 and not logits.kwargs:
        _link(chain, logits)
        scores, mask = _split_mask_add(logits)
    else:
        only_user(logits, softmax)
    query, key, scale, softcap = _scores_side(scores, chain)
    q, out = example_value(query), example_value(node)
    if not (isinstance(q, torch.Tensor) and isinstance(out, torch.Tensor) and out.dtype == q.dtype
            and out.shape == q.shape):
        raise _Unsupported("P @ V's output is not the query's shape and dtype")
    return _match_attention(gm, chain, query, key, value, mask, False, scale, False, softcap)


def _reaches_softmax(node: Any) -> bool:
    """Whether a softmax is behind node through dropouts and method calls (a quick look: is this attention?)."""
    for _ in range(8):
        if _is_softmax(node):
            return True
        if not isinstance(node, fx.Node) or not node.args:
            return False
        if not (node.op == "call_method" or node.op == "call_function" and node.target in DROPOUT_TARGETS):
            return False
        node = node.args[0]
    return False


def _split_mask_add(add: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(scores, mask) of ``scores + mask``: the scores are the operand that is a scaled or capped q @ k^T."""
    for scores, mask in (add.args, add.args[::-1]):
        if isinstance(scores, fx.Node) and isinstance(mask, fx.Node) and _looks_like_scores(scores):
            only_user(scores, add)
            return scores, mask
    raise _Unsupported("softmax(a + b) where neither is q @ k^T (scaled or soft-capped)")


def _looks_like_scores(node: fx.Node) -> bool:
    """Whether node is q @ k^T, possibly scaled and soft-capped (checked for real by ``_scores_side``)."""
    try:
        node, _ = through_softcap(node, [])
        node, _ = through_scale(node, [])
    except _Unsupported:
        return False
    return _is_eager_candidate(node)


def _full_slice(index: Any) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


def _is_unsqueeze_2(node: fx.Node) -> bool:
    """x[:, :, None] (any number of trailing full slices / Ellipsis) or x.unsqueeze(2) on a 4-d x."""
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        index = node.args[1]
        if not isinstance(index, tuple):
            return False
        items = list(index)
        if Ellipsis in items:
            if items.count(Ellipsis) != 1 or items[-1] is not Ellipsis:
                return False
            items = items[:-1]
        return (len(items) >= 3 and _full_slice(items[0]) and _full_slice(items[1]) and items[2] is None
                and all(_full_slice(item) for item in items[3:]))
    if node.op == "call_method" and node.target == "unsqueeze":
        return list(node.args[1:]) == [2] or node.kwargs.get("dim") == 2
    if node.op == "call_function" and node.target is torch.unsqueeze:
        return list(node.args[1:]) == [2] or node.kwargs.get("dim") == 2
    return False


def _repeat_kv_source(node: Any):
    """If node = repeat_kv(x, n_rep) (x[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv*n_rep, S, D)),
    return (x, n_rep, [reshape, expand, unsqueeze]); shapes are checked on the example values."""
    if not isinstance(node, fx.Node):
        return None
    is_reshape = (node.op == "call_method" and node.target in ("reshape", "view")) or (
        node.op == "call_function" and node.target in (torch.reshape, torch.Tensor.reshape, torch.Tensor.view))
    if not is_reshape or not node.args:
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.op == "call_method" and expand.target == "expand" and expand.args):
        return None
    unsqueezed = expand.args[0]
    if not (isinstance(unsqueezed, fx.Node) and _is_unsqueeze_2(unsqueezed)):
        return None
    source = unsqueezed.args[0]
    shapes = [example_value(x) for x in (source, unsqueezed, expand, node)]
    if not all(isinstance(t, torch.Tensor) for t in shapes):
        return None
    x, x5, expanded, merged = (tuple(t.shape) for t in shapes)
    if len(x) != 4 or len(x5) != 5 or len(expanded) != 5 or len(merged) != 4:
        return None
    batch, kv_heads, seq_len, head_dim = x
    n_rep = expanded[2]
    if not isinstance(n_rep, int) or not isinstance(kv_heads, int):
        return None
    if x5 != (batch, kv_heads, 1, seq_len, head_dim):
        return None
    if expanded != (batch, kv_heads, n_rep, seq_len, head_dim):
        return None
    if merged != (batch, kv_heads * n_rep, seq_len, head_dim):
        return None
    return source, n_rep, [node, expand, unsqueezed]


# ------------------------------------------------------------------------------------------------------------
# Proving a mask
# ------------------------------------------------------------------------------------------------------------
def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _is_mutation(node: fx.Node) -> bool:
    """In-place ops as Dynamo records them: x.add_(...), torch.relu_(x), x[i] = v, out=..., mutable aten ops."""
    if node.op not in ("call_function", "call_method"):
        return False
    if node.op == "call_function" and node.target in IN_PLACE_OPERATORS:
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return False  # operator.and_ / or_ end in "_" but are not in place
    name = _target_name(node)
    if name.endswith("_") and not name.endswith("__") or name == "__setitem__":
        return True
    if "out" in node.kwargs:
        return True
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable)


def _may_be_mutated(node: fx.Node) -> bool:
    """Whether the graph mutates node's value in place, directly or through a view of it (conservative)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            if _is_mutation(user):
                return True
            if user.op in ("call_method", "call_function") and (
                    _target_name(user) in VIEW_METHODS or user.target is operator.getitem):
                stack.append(user)
    return False


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen: dict[fx.Node, None] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen[current] = None
        stack.extend(current.all_input_nodes)
    return list(seen)


def _prove_mask(gm: fx.GraphModule, mask: Any, q) -> tuple[bool, Optional[int], list[fx.Node], Optional[tuple]]:
    """``_prove_mask_once``, once per mask and length: every layer of a model passes the same mask, and its proof
    (an evaluation of S x S elements) is the slow part of the rewrite at long lengths."""
    if not isinstance(mask, fx.Node):
        return _prove_mask_once(gm, mask, q)
    proofs = gm.__dict__.setdefault(MASK_PROOFS, {})
    key = (mask, str(q.shape[2]))
    if key not in proofs:
        try:
            proofs[key] = _prove_mask_once(gm, mask, q)
        except _Unsupported as reason:
            proofs[key] = reason
    if isinstance(proofs[key], _Unsupported):
        raise proofs[key]
    return proofs[key]


MASK_PROOFS = "_memgraph_mask_proofs"  # per graph, while the rewrite runs: (mask node, length) -> proof or reason


def _prove_mask_once(gm: fx.GraphModule, mask: Any,
                     q) -> tuple[bool, Optional[int], list[fx.Node], Optional[tuple]]:
    """(causal, window, nodes of the mask's subgraph, segments) if the mask is a causal/window/full pattern
    computed from constants, or from the symbolic sizes of a dynamic-shape graph (then checked again at run time,
    per length: see ``MaskGuard``), or that pattern restricted by the segments of one [B, S] graph input (padding
    or packing; ``segments`` is then (function, input node), else None)."""
    if not isinstance(mask, fx.Node):
        raise _Unsupported(f"attn_mask={mask!r} is not a graph value")
    nodes = _ancestors(mask)
    symbols, inputs = [], []
    for node in nodes:
        if node.op == "placeholder" and isinstance(example_value(node), (int, torch.SymInt)):
            symbols.append(node)  # a size of a dynamic-shape graph (HF builds the mask from the length then)
            continue
        if node.op == "placeholder":
            inputs.append(node)
            continue
        if node.op != "call_function" and node.op != "call_method":
            raise _Unsupported(f"the mask depends on {node.op} {node.target!r}")
        name = _target_name(node)
        if name.split(".")[-1] in RANDOM_OPS:
            raise _Unsupported(f"the mask uses the random op {name}")
        if _may_be_mutated(node):
            raise _Unsupported(f"a value the mask is built from ({node.name}) is modified in place")
    mask_example = example_value(mask)
    if not isinstance(mask_example, torch.Tensor):
        raise _Unsupported("the mask has no example value")
    if len(inputs) > 1:
        raise _Unsupported(f"the mask depends on graph inputs {[n.target for n in inputs]}")

    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in sorted(nodes, key=order.__getitem__):
        if node in inputs:
            copies[node] = graph.placeholder(node.name)
            continue
        copies[node] = graph.node_copy(node, lambda n: copies[n])
        # A graph traced on the meta device (planning without a GPU) builds its mask on meta: evaluate it on the
        # CPU instead (the mask reads no tensor input, so the device changes nothing but where it is computed).
        copies[node].args, copies[node].kwargs = _meta_to_cpu(copies[node].args), _meta_to_cpu(copies[node].kwargs)
    graph.output(copies[mask])
    build = fx.GraphModule(torch.nn.Module(), graph)  # the mask from the sizes (placeholders in graph order)
    symbols.sort(key=order.__getitem__)
    if inputs and symbols:
        guard = _input_mask_guard(gm, build, symbols, inputs[0], nodes, q)
        gm.__dict__.setdefault(RUNTIME_CHECKS, []).append(guard)
        return guard.causal, guard.window, nodes, (guard.form, inputs[0])
    if not symbols:
        seq_len = q.shape[2]
        if not isinstance(seq_len, int):
            raise _Unsupported("the mask's shape is symbolic or unknown")
        limit = mask_elements_limit()
        too_large = mask_example.numel() > limit or seq_len * seq_len > limit
        if too_large and not inputs:
            causal, window = _mask_pattern_by_rows(build, [], seq_len)
            return causal, window, nodes, None
        if inputs:
            batch, dtype, device = _source_layout(inputs[0], seq_len)
            causal, window, segments = _segments_of_mask(_MaskOfInput(build), batch, seq_len, dtype, device,
                                                          inputs[0].target)
            return causal, window, nodes, (segments, inputs[0])
        causal, window = _mask_pattern(_evaluate(build, []), seq_len)
        return causal, window, nodes, None
    guard = _mask_guard(gm, build, symbols, nodes, q)
    gm.__dict__.setdefault(RUNTIME_CHECKS, []).append(guard)
    return guard.causal, guard.window, nodes, None


# --- masks from one [B, S] input: padding and packing ---
PROBES_PER_FORM = 6  # random probe values of the input per candidate form (plus the all-valid one)
PROBE_SEED = 0  # probes are deterministic: a compile proves (or rejects) the same way every time


def _source_layout(source: fx.Node, seq_len) -> tuple:
    """(batch, dtype, device) of the [B, S] integer input a mask is built from; raises _Unsupported otherwise."""
    example = example_value(source)
    if not isinstance(example, torch.Tensor) or example.dim() != 2 or not _same_size(example.shape[1], seq_len):
        raise _Unsupported(f"the mask depends on graph input {source.target!r}, which is not [B, S]")
    if example.dtype.is_floating_point or example.dtype.is_complex:
        raise _Unsupported(f"the mask depends on graph input {source.target!r} ({example.dtype}, not integers)")
    device = torch.device("cpu") if example.device.type == "meta" else example.device
    return example.shape[0], example.dtype, device


FORMS = ("padding_segments", "packed_segments")  # kernel functions, tried in this order


@dataclasses.dataclass(frozen=True)
class _MaskOfInput:
    """A mask subgraph as a function of its one [B, S] input: ``order`` gives each placeholder of ``build`` as
    None (the input) or an index into ``sizes`` (a dynamic graph's sizes)."""
    build: fx.GraphModule
    order: tuple = (None,)
    sizes: tuple = ()

    def arguments(self, value: torch.Tensor) -> list:
        return [value if index is None else self.sizes[index] for index in self.order]

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        return self.build(*self.arguments(value))


def _segments_of_mask(evaluate, batch: int, seq_len: int, dtype, device, name, forms=FORMS):
    """(causal, window, segments function) if the mask ``evaluate(x)`` equals the (causal, window) pattern
    restricted by ``padding_segments(x)`` or ``packed_segments(x)`` on every probe value x ([batch, seq_len]);
    raises _Unsupported otherwise."""
    reasons = []
    for form_name in forms:
        form = getattr(attention_kernel, form_name)
        probes = _padding_probes if form_name == "padding_segments" else _packed_probes
        generator = torch.Generator().manual_seed(PROBE_SEED)
        values = [x.to(device=device, dtype=dtype) for x in probes(batch, seq_len, generator)]
        try:
            whole = batch * seq_len * seq_len <= mask_elements_limit()
            if whole:  # all valid: the pattern
                causal, window = _mask_pattern(_evaluate_with(evaluate, values[0]), seq_len)
            else:
                causal, window = _mask_pattern_by_rows(evaluate.build, evaluate.arguments(values[0]), seq_len)
            positions = torch.arange(seq_len, device=device)
            for value in values:
                q_segments, k_segments = form(value)
                for start, stop, allowed in _mask_rows_of(evaluate, value, seq_len, whole):
                    expected = attention_kernel.visible_mask(positions[start:stop], positions, causal, window) & (
                        q_segments[:, start:stop, None] == k_segments[:, None, :])
                    if allowed.shape[0] != expected.shape[0] or not torch.equal(allowed, expected):
                        raise _Unsupported(f"differs from the {form_name} form on a probe")
            return causal, window, form
        except _Unsupported as reason:
            reasons.append(str(reason))
    raise _Unsupported(f"the mask built from graph input {name!r} is neither a padding nor a packed-sequence mask "
                       f"of a causal/window pattern ({'; '.join(reasons)})")


def _input_mask_guard(gm: fx.GraphModule, build: fx.GraphModule, symbols: list[fx.Node], source: fx.Node,
                      nodes: list[fx.Node], q) -> "InputMaskGuard":
    """A dynamic-shape graph's padding/packed mask: its form proven on probes at a probe length (long enough to
    show a window), and the run-time check of the same form at every new size."""
    from memgraph import _compat

    batch, dtype, device = _source_layout(source, q.shape[2])
    lengths = [node for node in symbols if _same_size(example_value(node), q.shape[2])]
    if not lengths:
        raise _Unsupported("the mask depends on symbolic sizes other than the query length")
    hints = [_compat.concrete_int(example_value(node)) for node in symbols]
    constants = [abs(value) for node in nodes for value in _int_constants((node.args, node.kwargs))]
    length_index = symbols.index(lengths[0])
    batch_index = next((i for i, node in enumerate(symbols) if _same_size(example_value(node), batch)), None)
    if batch_index is None and not isinstance(batch, int):
        raise _Unsupported("the mask's batch size is symbolic and not one of the graph's size inputs")
    order = [node for node in build.graph.nodes if node.op == "placeholder"]
    names = [node.name for node in symbols]
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    guard = InputMaskGuard(build, tuple(placeholders.index(node) for node in symbols), length_index, batch_index,
                           batch if isinstance(batch, int) else None, tuple(names.index(n.name) if n.name in names
                                                                           else None for n in order),
                           dtype, device, source.target)
    probe = list(hints)
    probe[length_index] = max(hints[length_index], min(2 * max(constants, default=0) + 2, MAX_PROBE_LENGTH))
    guard.causal, guard.window, guard.form = guard.prove(probe)
    if not guard.holds(hints):
        raise _Unsupported("the mask's form at the traced length differs from the one at a longer length")
    return guard


def _padding_probes(batch: int, seq_len: int, generator: torch.Generator) -> list[torch.Tensor]:
    """attention_mask values: all valid first, then left/right padding, random holes with values 0, 1 and 2."""
    probes = [torch.ones(batch, seq_len, dtype=torch.long)]
    for index in range(PROBES_PER_FORM):
        value = torch.ones(batch, seq_len, dtype=torch.long)
        for row in range(batch):
            pad = int(torch.randint(0, seq_len + 1, (1,), generator=generator))
            kind = (index + row) % 3
            if kind == 0:
                value[row, :pad] = 0
            elif kind == 1:
                value[row, seq_len - pad:] = 0
            else:
                value[row] = torch.randint(0, 3, (seq_len,), generator=generator)
        probes.append(value)
    return probes


def _packed_probes(batch: int, seq_len: int, generator: torch.Generator) -> list[torch.Tensor]:
    """position_ids values: one sequence first, then rows of sequences of random lengths and start positions."""
    probes = [torch.arange(seq_len).expand(batch, seq_len).clone()]
    for _ in range(PROBES_PER_FORM):
        rows = []
        for _ in range(batch):
            positions: list[int] = []
            while len(positions) < seq_len:
                length = int(torch.randint(1, max(seq_len // 2, 1) + 1, (1,), generator=generator))
                start = int(torch.randint(0, 4, (1,), generator=generator))
                positions += range(start, start + length)
            rows.append(positions[:seq_len])
        probes.append(torch.tensor(rows))
    return probes


def _mask_rows_of(evaluate: _MaskOfInput, value: torch.Tensor, seq_len: int, whole: bool):
    """(start, stop, [B, stop - start, S] allowed pairs) of the mask at input ``value``: one block holding every
    row where the mask may be evaluated whole, else blocks of query rows (``_mask_rows``)."""
    if whole:
        yield 0, seq_len, _allowed_per_row(_evaluate_with(evaluate, value), seq_len)
        return
    from memgraph.passes._mask_rows import RowBlocks

    blocks = RowBlocks(evaluate.build, evaluate.arguments(value), seq_len, max_full_elements=MASK_BLOCK_ELEMENTS)
    rows = blocks.block_rows(MASK_BLOCK_ELEMENTS // max(value.shape[0], 1))
    for start in range(0, seq_len, rows):
        stop = min(start + rows, seq_len)
        yield start, stop, _allowed_per_row(blocks.rows(start, stop), seq_len, stop - start)


def _evaluate_with(evaluate, value: torch.Tensor) -> torch.Tensor:
    limit = mask_elements_limit()
    if value.shape[0] * value.shape[1] ** 2 > limit:
        raise _Unsupported(f"the mask at batch x length {tuple(value.shape)} has too many elements to check")
    mask = evaluate(value)
    if not isinstance(mask, torch.Tensor) or _compat.is_fake_tensor(mask):
        raise _Unsupported("the mask could not be evaluated")
    return mask


def _allowed_per_row(mask: torch.Tensor, seq_len: int, rows: Optional[int] = None) -> torch.Tensor:
    """[B, rows, seq_len] bool from a [B, (H or 1), rows (or 1), S] mask (``rows``: a block of query rows; default
    all of them), identical over heads."""
    rows = seq_len if rows is None else rows
    if mask.dim() != 4 or mask.shape[-1] != seq_len or mask.shape[-2] not in (1, rows):
        raise _Unsupported(f"mask shape {tuple(mask.shape)} is not [B, H, {rows}, {seq_len}]")
    allowed = _lets_through(mask.expand(*mask.shape[:-2], rows, seq_len))
    if not bool((allowed == allowed[:, :1]).all()):
        raise _Unsupported("the mask differs across heads")
    return allowed[:, 0]


def _meta_to_cpu(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "meta":
        return torch.device("cpu")
    if isinstance(value, (tuple, list)):
        return type(value)(_meta_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta_to_cpu(v) for k, v in value.items()}
    return value


def _evaluate(build: fx.GraphModule, sizes: list[int]) -> torch.Tensor:
    limit = mask_elements_limit()
    if any(size * size > limit for size in sizes):
        raise _Unsupported(f"the mask at sizes {sizes} has too many elements to check")
    value = build(*sizes)
    if not isinstance(value, torch.Tensor) or _compat.is_fake_tensor(value):
        raise _Unsupported("the mask could not be evaluated")
    if value.numel() > limit:
        raise _Unsupported(f"the mask has too many elements to check ({value.numel()})")
    return value


def _mask_guard(gm: fx.GraphModule, build: fx.GraphModule, symbols: list[fx.Node], nodes: list[fx.Node],
                q) -> "MaskGuard":
    """The pattern of a mask built from symbolic sizes, read at a probe length long enough to show a window
    (twice the largest integer constant the mask uses), and the run-time check of it."""
    from memgraph import _compat

    lengths = [node for node in symbols if _same_size(example_value(node), q.shape[2])]
    if not lengths:
        raise _Unsupported("the mask depends on symbolic sizes other than the query length")
    length = lengths[0]
    hints = [_compat.concrete_int(example_value(node)) for node in symbols]
    constants = [abs(value) for node in nodes for value in _int_constants((node.args, node.kwargs))]
    probe_length = max(hints[symbols.index(length)], min(2 * max(constants, default=0) + 2, MAX_PROBE_LENGTH))
    probe = [probe_length if node is length else hint for node, hint in zip(symbols, hints)]
    causal, window = _mask_pattern_anywhere(build, probe, probe_length)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    guard = MaskGuard(build, tuple(placeholders.index(node) for node in symbols), symbols.index(length), causal,
                      window)
    if not guard.holds(hints):  # the traced sizes themselves
        raise _Unsupported("the mask's pattern at the traced length differs from the one at a longer length")
    return guard


def _int_constants(value: Any):
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _int_constants(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _int_constants(item)


MAX_PROBE_LENGTH = 1 << 14  # longest length a dynamic mask is evaluated at while compiling


class _SizeGuard(abc.ABC):
    """A check the compiled graph runs on its size arguments before every run, once per distinct size tuple
    (cached): ``_verify(sizes)`` says whether the fused attention still computes what the mask asks for there;
    where it does not, ``check`` raises instead of computing a different attention."""

    def __init__(self, positions: tuple[int, ...], length_index: int):
        self.positions, self.length_index = positions, length_index
        self.causal: bool = True
        self.window: Optional[int] = None
        self.checked: dict[tuple[int, ...], bool] = {}

    @abc.abstractmethod
    def _verify(self, sizes: tuple[int, ...]) -> bool:
        """Whether the mask at these sizes is what the fused op computes."""

    @abc.abstractmethod
    def _what(self) -> str:
        """What was fused, for the error message."""

    def holds(self, sizes: list[int] | tuple[int, ...]) -> bool:
        sizes = tuple(int(size) for size in sizes)
        if sizes not in self.checked:
            try:
                self.checked[sizes] = self._verify(sizes)
            except _Unsupported:
                self.checked[sizes] = False
        return self.checked[sizes]

    def check(self, args: Sequence[Any]) -> None:
        sizes = tuple(args[position] for position in self.positions)
        if not self.holds(sizes):
            from memgraph.errors import MemgraphError

            raise MemgraphError(
                f"the attention mask at sizes {sizes} is not {self._what()} memgraph fused for this dynamic-shape "
                "graph; compile with dynamic=False or with rewrites that exclude 'attention'")


class MaskGuard(_SizeGuard):
    """The run-time half of the proof for a mask built from the graph's symbolic sizes.

    The mask's subgraph reads nothing but those sizes (no tensor input, nothing random or mutated), so it is a
    function of them alone: it is evaluated and compared with the fused pattern once per distinct size tuple.
    """

    def __init__(self, build: fx.GraphModule, positions: tuple[int, ...], length_index: int, causal: bool,
                 window: Optional[int]):
        super().__init__(positions, length_index)
        self.build, self.causal, self.window = build, causal, window

    def _verify(self, sizes: tuple[int, ...]) -> bool:
        length = sizes[self.length_index]
        try:
            return _mask_is(self.build, list(sizes), length, self.causal, self.window)
        except _Unsupported as reason:
            limit = mask_elements_limit()
            if length * length <= limit:
                raise
            from memgraph.errors import MemgraphError

            raise MemgraphError(
                f"the attention mask at length {length} has {length * length:,} elements, more than memgraph "
                f"can evaluate whole here to prove it is the pattern it fused ({limit:,}: lengths up to "
                f"{math.isqrt(limit):,}, from the host memory available), and it cannot be checked block by block "
                f"of query rows ({reason}); train shorter sequences or compile with rewrites that exclude "
                "'attention'") from None

    def _what(self) -> str:
        return f"the {_pattern_name(self.causal, self.window)} pattern"


class InputMaskGuard(_SizeGuard):
    """The run-time half of the check of a dynamic-shape graph's padding or packed-sequence mask.

    The mask reads one [B, S] input and the graph's sizes; the kernel computes the segments from that input, so
    what needs checking per size is only that the mask is still that form of the same pattern: the probes run
    again at each new size."""

    def __init__(self, build: fx.GraphModule, positions: tuple[int, ...], length_index: int,
                 batch_index: Optional[int], static_batch: Optional[int], build_order: tuple, dtype, device,
                 name: str):
        super().__init__(positions, length_index)
        self.build, self.batch_index, self.static_batch = build, batch_index, static_batch
        self.build_order, self.dtype, self.device, self.name = build_order, dtype, device, name
        self.form = None

    def _evaluator(self, sizes: list[int]) -> _MaskOfInput:
        return _MaskOfInput(self.build, self.build_order, tuple(sizes))

    def prove(self, sizes: list[int]) -> tuple:
        batch = self.static_batch if self.batch_index is None else sizes[self.batch_index]
        return _segments_of_mask(self._evaluator(sizes), batch, sizes[self.length_index], self.dtype, self.device,
                                 self.name, forms=(self.form.__name__,) if self.form else FORMS)

    def _verify(self, sizes: tuple[int, ...]) -> bool:
        return self.prove(list(sizes))[:2] == (self.causal, self.window)

    def _what(self) -> str:
        return (f"the {self.form.__name__} form of the {_pattern_name(self.causal, self.window)} pattern (read "
                f"from {self.name!r}; or it is too large to check)")


def _pattern_name(causal: bool, window: Optional[int]) -> str:
    return ("causal" if causal else "full") + (f" window {window}" if window else "")


def _lets_through(mask: torch.Tensor) -> torch.Tensor:
    """Bool: which pairs a boolean or additive float mask lets through; a float bias raises _Unsupported."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        threshold = torch.finfo(mask.dtype).min * MASKED_FLOAT_THRESHOLD_FRACTION
        if not bool(((mask == 0) | (mask <= threshold)).all()):
            raise _Unsupported("the float mask holds values other than 0 and a large negative (a bias)")
        return mask == 0
    raise _Unsupported(f"mask dtype {mask.dtype}")


def _allowed(mask: torch.Tensor, seq_len: int, rows: Optional[int] = None) -> torch.Tensor:
    """[rows, seq_len] bool: which (query, key) pairs the mask (or a block of its query rows: ``rows`` of them)
    lets through, identical over batch/heads."""
    rows = seq_len if rows is None else rows
    if mask.dim() < 2 or mask.shape[-1] != seq_len or mask.shape[-2] not in (1, rows):
        raise _Unsupported(f"mask shape {tuple(mask.shape)} is not [..., {rows}, {seq_len}]")
    allowed = _lets_through(mask.expand(*mask.shape[:-2], rows, seq_len).reshape(-1, rows, seq_len))
    pattern = allowed[0]
    if allowed.shape[0] > 1 and not bool((allowed == pattern).all()):  # one batch/head: nothing to compare
        raise _Unsupported("the mask differs across batch/heads")
    return pattern


def _pattern_is(pattern: torch.Tensor, causal: bool, window: Optional[int]) -> bool:
    """Whether an ``_allowed`` pattern is exactly the (causal, window) one."""
    positions = torch.arange(pattern.shape[-1], device=pattern.device)
    return torch.equal(pattern, attention_kernel.visible_mask(positions, positions, causal, window))


def _candidates(first_row: torch.Tensor, last_row: torch.Tensor) -> list[tuple[bool, Optional[int]]]:
    """The patterns a mask may be, in the order they are tried, from its first and last rows."""
    candidates = [(False, None), (True, None),
                  (True, int(last_row.sum())),  # last row of a causal window sees `window` keys
                  (False, int(first_row.sum()))]  # first row of a two-sided window sees `window` keys
    return [(causal, window) for causal, window in candidates if window is None or window >= 1]


def _named_pattern(causal: bool, window: Optional[int], seq_len: int) -> tuple[bool, Optional[int]]:
    return causal, None if window is not None and window >= seq_len else window  # a window that masks nothing


def _mask_pattern(mask: torch.Tensor, seq_len: int) -> tuple[bool, Optional[int]]:
    """Which attention pattern a constant mask encodes; raises _Unsupported for anything else."""
    pattern = _allowed(mask, seq_len)
    if seq_len > 0:
        for causal, window in _candidates(pattern[0], pattern[-1]):
            if _pattern_is(pattern, causal, window):
                return _named_pattern(causal, window, seq_len)
    raise _Unsupported("the mask is not a causal, sliding-window or full pattern")


MASK_BLOCK_ELEMENTS = 1 << 26  # elements of one block of query rows when a mask is checked block by block


class _NotThePattern(_Unsupported):
    """The mask was evaluated and is none of the patterns asked about."""


def _mask_pattern_by_rows(build: fx.GraphModule, sizes: list[int], seq_len: int,
                          candidates: Optional[list] = None) -> tuple[bool, Optional[int]]:
    """``_mask_pattern`` of ``build(*sizes)`` without ever holding the whole mask: its subgraph evaluated one
    block of query rows at a time (``_mask_rows``), every block compared with each candidate pattern's rows
    (``candidates``: (causal, window) pairs, the first that holds is returned; default: read from the mask)."""
    from memgraph.passes._mask_rows import RowBlocks

    blocks = RowBlocks(build, sizes, seq_len, max_full_elements=MASK_BLOCK_ELEMENTS)
    rows = blocks.block_rows(MASK_BLOCK_ELEMENTS)
    starts = range(0, seq_len, rows)
    log.info("checking the attention mask at length %d in %d blocks of %d query rows", seq_len, len(starts), rows)

    def pattern_rows(start: int) -> torch.Tensor:
        stop = min(start + rows, seq_len)
        return _allowed(blocks.rows(start, stop), seq_len, stop - start)

    surviving = candidates or _candidates(pattern_rows(0)[0], pattern_rows(starts[-1])[-1])
    positions = None
    for start in starts:
        pattern = pattern_rows(start)
        if positions is None:
            positions = torch.arange(seq_len, device=pattern.device)
        queries = positions[start:start + pattern.shape[0]]
        surviving = [(causal, window) for causal, window in surviving
                     if torch.equal(pattern, attention_kernel.visible_mask(queries, positions, causal, window))]
        if not surviving:
            raise _NotThePattern("the mask is not a causal, sliding-window or full pattern")
    return surviving[0] if candidates else _named_pattern(*surviving[0], seq_len)


def _mask_pattern_anywhere(build: fx.GraphModule, sizes: list[int], seq_len: int) -> tuple[bool, Optional[int]]:
    """The pattern of the mask ``build(*sizes)``: evaluated whole where it is small enough, else block by block."""
    if seq_len * seq_len <= mask_elements_limit():
        return _mask_pattern(_evaluate(build, sizes), seq_len)
    return _mask_pattern_by_rows(build, sizes, seq_len)


def _mask_is(build: fx.GraphModule, sizes: list[int], seq_len: int, causal: bool, window: Optional[int]) -> bool:
    """Whether the mask ``build(*sizes)`` is exactly the (causal, window) pattern (whole or block by block);
    raises _Unsupported where it cannot be evaluated."""
    if seq_len * seq_len <= mask_elements_limit():
        return _pattern_is(_allowed(_evaluate(build, sizes), seq_len), causal, window)
    try:
        _mask_pattern_by_rows(build, sizes, seq_len, candidates=[(causal, window)])
    except _NotThePattern:
        return False
    return True


# ------------------------------------------------------------------------------------------------------------
# Installing
# ------------------------------------------------------------------------------------------------------------
def _segment_inputs(gm: fx.GraphModule, match: _Match, segment_nodes: dict) -> tuple:
    """(q_segments, k_segments) nodes for a masked batch (computed once per input, right after it), or Nones."""
    if match.segments is None:
        return None, None
    form, source = match.segments
    if (form, source) not in segment_nodes:
        graph = gm.graph
        with graph.inserting_after(source):
            both = graph.call_function(form, (source,))
        with graph.inserting_after(both):
            pair = tuple(graph.call_function(operator.getitem, (both, i)) for i in range(2))
        value = example_value(source)
        fake_mode = _compat.fake_mode_of([example_value(match.query)])
        if fake_mode is not None and isinstance(value, torch.Tensor):
            with fake_mode:  # the graph's mode (the input's example value may belong to another one)
                values = form(torch.zeros(value.shape, dtype=value.dtype, device=value.device))
            both.meta["example_value"] = values
            for node, segment_value in zip(pair, values):
                node.meta["example_value"] = segment_value
        segment_nodes[(form, source)] = pair
    return segment_nodes[(form, source)]


def _install(gm: fx.GraphModule, node: fx.Node, match: _Match, kv_bits: int, segment_nodes: dict) -> None:
    graph = gm.graph
    op = torch.ops.memgraph.attention.default
    q_segments, k_segments = _segment_inputs(gm, match, segment_nodes)
    with graph.inserting_before(node):
        fused = graph.call_function(op, (match.query, match.key, match.value),
                                    {"causal": match.causal, "scale": match.scale, "kv_bits": kv_bits,
                                     "window": match.window, "softcap": match.softcap, "q_segments": q_segments,
                                     "k_segments": k_segments})
        out = graph.call_function(operator.getitem, (fused, 0))
    copy_trace_meta(node, fused, out)
    fused_value = _fake_run(op, match, kv_bits, q_segments, k_segments)
    if fused_value is not None:
        fused.meta["example_value"] = fused_value
        out.meta["example_value"] = fused_value[0]
    elif "example_value" in node.meta:
        out.meta["example_value"] = node.meta["example_value"]
    if match.mean_where_empty:
        out = _mean_of_values_where_empty(graph, fused, out, match)
        copy_trace_meta(node, out)
    node.replace_all_uses_with(out)
    # Drop what only fed the SDPA call (it, the repeat_kv copies, the mask subgraph), users first.
    order = {n: index for index, n in enumerate(graph.nodes)}
    for candidate in sorted(set(match.dead_candidates), key=order.__getitem__, reverse=True):
        if not candidate.users and candidate.op in ("call_function", "call_method"):
            graph.erase_node(candidate)


def _mean_of_values_where_empty(graph: fx.Graph, fused: fx.Node, out: fx.Node, match: _Match) -> fx.Node:
    """``where(row sees no key, mean of V over all keys, out)``: the kernel marks such a row with LSE = +inf."""
    query, value = example_value(match.query), example_value(match.value)
    group = query.shape[1] // value.shape[1]
    with graph.inserting_before(out.next):  # in order, right after the attention's output
        lse = graph.call_function(operator.getitem, (fused, 1))
        empty_rows = graph.call_method("unsqueeze", (graph.call_function(torch.isinf, (lse,)), -1))
        mean = graph.call_function(torch.mean, (match.value, 2), {"keepdim": True, "dtype": torch.float32})
        mean_v = graph.call_method("to", (mean, query.dtype))
        if group > 1:  # query head h reads KV head h // group, as repeat_kv lays them out
            mean_v = graph.call_method("repeat_interleave", (mean_v, group), {"dim": 1})
        result = graph.call_function(torch.where, (empty_rows, mean_v, out))
    added, node = [], lse
    while node is not result.next:
        added.append(node)
        node = node.next
    record_example_values(added)
    return result


def _fake_run(op, match: _Match, kv_bits: int, q_segments=None, k_segments=None):
    """The op's outputs on the example (fake) values, for later passes that read node.meta['example_value']."""
    values = [example_value(n) for n in (match.query, match.key, match.value)]
    segments = [None if n is None else example_value(n) for n in (q_segments, k_segments)]
    try:
        fake_mode = _compat.fake_mode_of(values)
        if fake_mode is None:
            return None
        with fake_mode:
            return op(*values, causal=match.causal, scale=match.scale, kv_bits=kv_bits, window=match.window,
                      softcap=match.softcap, q_segments=segments[0], k_segments=segments[1])
    except Exception as error:  # noqa: BLE001 - metadata only
        log.debug("memgraph: no example value for memgraph.attention (%s)", error)
        return None
