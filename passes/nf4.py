"""Rewrite bitsandbytes 4-bit (NF4) linears in Dynamo's graph to ``torch.ops.memgraph.nf4_linear``.

A QLoRA model (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``) reaches the backend as:

- training (the input needs grad): bitsandbytes' ``MatMul4Bit`` autograd.Function, which Dynamo captures as
  ``torch.ops.higher_order.autograd_function_apply(fwd_body, bwd_body, *operands, ...)``, where ``fwd_body``
  is one ``bitsandbytes::gemm_4bit`` and ``bwd_body`` is ``dequantize_4bit`` (+ ``dequantize_blockwise`` of
  the double-quantized absmax) followed by ``matmul(grad, W)``, optionally ``grad.sum(0)`` for a bias;
- no grad needed (e.g. the first layer's frozen input): a bare ``bitsandbytes::gemm_4bit`` call.

Both become ``nf4_linear(x, packed, absmax, nested_absmax, nested_code, nested_offset, N, K, blocksize,
nested_blocksize)`` (+ bias). The storage tensors are the same graph inputs bitsandbytes used (no copy), so
the result is bit-identical in the forward and in dx; the only intended difference is that our backward
reads the weight through our Triton kernel and never keeps a dequantized copy alive.

Only what can be shown equivalent is rewritten: quant_type "nf4", a forward body holding nothing but the one
gemm (plus views and grad-mode switches), a backward body whose dequantize reads the same storage with the
same shape/blocksize and whose gradient for the input is ``grad @ W`` in a dtype we reproduce exactly.
Anything else (fp4, bitsandbytes' CPU inference layout ``gemv_4bit``, unfamiliar bodies) is left unchanged
and logged. The pass never raises on an unknown pattern.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model.policies import is_graph_input_or_view_of_one  # what never_save accepts
from memgraph.kernels.nf4 import FLOAT_DTYPES, NESTED_BLOCKSIZE  # importing it registers torch.ops.memgraph.nf4_*
from memgraph.passes._matching import VALUE_META

log = logging.getLogger("memgraph.passes.nf4")

__all__ = ["rewrite_bnb_linears"]

_GRAD_MODE_FUNCTIONS = (_compat.SET_GRAD_ENABLED,)
_VIEW_METHODS = ("view", "reshape", "contiguous")  # pure re-shapings of the packed storage
_CAST_METHODS = ("to",)
_BNB_NAMESPACE = "bitsandbytes"


class _Skip(Exception):
    """A pattern we cannot prove equivalent: leave the node alone and say why."""


def _bnb_op(name: str, overload: str = "default"):
    packet = getattr(getattr(torch.ops, _BNB_NAMESPACE), name, None) if _bnb_loaded() else None
    return getattr(packet, overload, None) if packet is not None else None


def _bnb_loaded() -> bool:
    try:
        torch.ops.bitsandbytes.gemm_4bit  # noqa: B018 - resolving it is the check
    except (AttributeError, RuntimeError):
        return False
    return True


def _is_bnb(target: Any) -> bool:
    return _compat.is_op_overload(target) and target.namespace == _BNB_NAMESPACE


def _example(node: Any) -> Optional[torch.Tensor]:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _through_views(node: Any) -> Any:
    """Follow ``.view/.reshape/.contiguous`` back to the tensor they re-shape."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _VIEW_METHODS:
        node = node.args[0]
    return node


def _through_casts(node: Any) -> Any:
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CAST_METHODS + _VIEW_METHODS:
        node = node.args[0]
    return node


def _gemm_arguments(gemm: fx.Node) -> dict[str, Any]:
    """bitsandbytes::gemm_4bit's arguments by name (its schema: A, B, shapeB, absmax, blocksize, quant_type,
    bias, absmax_8bit, absmax_code, absmax_offset)."""
    names = [argument.name for argument in gemm.target._schema.arguments]
    bound = dict(zip(names, gemm.args))
    bound.update(gemm.kwargs)
    for argument in gemm.target._schema.arguments:
        bound.setdefault(argument.name, argument.default_value if argument.has_default_value() else None)
    return bound


def _linear_arguments(gemm_args: dict[str, Any]) -> tuple[dict[str, Any], Optional[Any]]:
    """Map gemm_4bit's arguments (nodes of whichever graph holds it) to nf4_linear's; returns (args, bias)."""
    if gemm_args["quant_type"] != "nf4":
        raise _Skip(f"quant_type={gemm_args['quant_type']!r} (only nf4 is rewritten)")
    shape = gemm_args["shapeB"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(s, int) for s in shape)):
        raise _Skip(f"weight shape {shape!r} is not a static 2-D shape")
    nested = gemm_args["absmax_8bit"] is not None
    return {
        "x": gemm_args["A"],
        "packed": gemm_args["B"],
        # nested: bitsandbytes passes the float32 second-level absmax as `absmax` and the codes as absmax_8bit
        "absmax": gemm_args["absmax_8bit"] if nested else gemm_args["absmax"],
        "nested_absmax": gemm_args["absmax"] if nested else None,
        "nested_code": gemm_args["absmax_code"] if nested else None,
        "nested_offset": gemm_args["absmax_offset"] if nested else None,
        "out_features": shape[0],
        "in_features": shape[1],
        "blocksize": gemm_args["blocksize"],
        "nested_blocksize": NESTED_BLOCKSIZE,  # gemm_4bit only accepts bitsandbytes' 256
    }, gemm_args["bias"]


def _check_inputs(linear: dict[str, Any]) -> None:
    """Reject inputs nf4_linear would refuse before touching the graph."""
    x, packed = _example(linear["x"]), _example(linear["packed"])
    if x is not None and x.dtype not in FLOAT_DTYPES:
        raise _Skip(f"activation dtype {x.dtype}")
    if packed is not None and not packed.is_contiguous():
        raise _Skip("non-contiguous packed storage")


class _Rewriter:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.rewritten = 0
        self.dead_bodies: list[str] = []

    # ----------------------------------------------------------------------------- emitting the new nodes
    def _emit(self, anchor: fx.Node, linear: dict[str, Any], bias: Any) -> fx.Node:
        graph = self.graph
        with graph.inserting_before(anchor):
            packed = linear["packed"]
            packed_value = _example(packed)
            if packed_value is not None and packed_value.dtype != torch.uint8:
                # bitsandbytes' quant_storage (e.g. bf16 for FSDP) holds the same bytes; our op reads uint8.
                packed = graph.call_method("view", (packed, torch.uint8))
            args = (linear["x"], packed, linear["absmax"], linear["nested_absmax"], linear["nested_code"],
                    linear["nested_offset"], linear["out_features"], linear["in_features"], linear["blocksize"],
                    linear["nested_blocksize"])
            out = graph.call_function(torch.ops.memgraph.nf4_linear.default, args)
            if bias is not None:
                out = graph.call_function(operator.add, (out, bias))
        self._propagate_meta(packed if packed is not linear["packed"] else None, args, out, bias)
        return out

    def _propagate_meta(self, byte_view: Optional[fx.Node], args: tuple, out: fx.Node, bias: Any) -> None:
        """Fill ``example_value`` of the new nodes (later passes read it); best effort."""
        try:
            if byte_view is not None:
                byte_view.meta["example_value"] = _example(byte_view.args[0]).view(torch.uint8)
            values = [_example(a) if isinstance(a, fx.Node) else a for a in args]
            tensors = [v for v in values if isinstance(v, torch.Tensor)]
            if any(isinstance(a, fx.Node) and v is None for a, v in zip(args, values)):
                return
            # The example values' own mode (at backend time the tracing context may hold a newer one).
            modes = {id(t.fake_mode): t.fake_mode for t in tensors if hasattr(t, "fake_mode")}
            if len(modes) != 1:
                return
            (fake_mode,) = modes.values()
            with fake_mode:
                result = torch.ops.memgraph.nf4_linear.default(*values)
                linear_node = out if bias is None else out.args[0]
                linear_node.meta["example_value"] = result
                if bias is not None and _example(bias) is not None:
                    out.meta["example_value"] = result + _example(bias)
        except Exception as error:  # noqa: BLE001 - metadata is a convenience, never a reason to fail
            log.debug("memgraph nf4 pass: no example_value for %s (%s)", out, error)

    # ---------------------------------------------------------------------------------- bare gemm_4bit
    def rewrite_gemm(self, node: fx.Node) -> None:
        linear, bias = _linear_arguments(_gemm_arguments(node))
        _check_inputs(linear)
        out = self._emit(node, linear, bias)
        node.replace_all_uses_with(out)
        self.graph.erase_node(node)
        self.rewritten += 1

    # ------------------------------------------------------------------------- autograd_function_apply
    def rewrite_autograd_apply(self, node: fx.Node) -> None:
        fwd_attr, bwd_attr, *operands = node.args
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (fwd_attr, bwd_attr)):
            raise _Skip("bodies are not graph attributes")
        fwd, bwd = getattr(self.gm, fwd_attr.target), getattr(self.gm, bwd_attr.target)
        if not any(_is_bnb(n.target) for n in fwd.graph.nodes if n.op == "call_function"):
            raise _Skip("not a bitsandbytes function")  # someone else's autograd.Function: not ours to judge
        fwd_inputs = self._body_inputs(fwd, operands)
        gemm = self._single_gemm(fwd)
        gemm_args = _gemm_arguments(gemm)
        linear_in_body, bias_in_body = _linear_arguments(gemm_args)

        def outer(body_node: Any) -> Any:  # fwd-body node -> the outer-graph node it stands for
            if body_node is None or not isinstance(body_node, fx.Node):
                return body_node
            source = _through_views(body_node) if body_node is linear_in_body["packed"] else body_node
            if source not in fwd_inputs:
                raise _Skip(f"{body_node} is computed inside the function, not passed in")
            return operands[fwd_inputs[source]]

        linear = {key: outer(value) for key, value in linear_in_body.items()}
        bias = outer(bias_in_body)
        self._check_backward(fwd, bwd, gemm, gemm_args, fwd_inputs, linear)
        _check_inputs(linear)

        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
            raise _Skip("its result is used other than as output 0")
        out = self._emit(node, linear, bias)
        for user in users:
            user.replace_all_uses_with(out)
            self.graph.erase_node(user)
        self.graph.erase_node(node)
        for attr in (fwd_attr, bwd_attr):
            if not attr.users:
                self.dead_bodies.append(attr.target)
                self.graph.erase_node(attr)
        self.rewritten += 1

    @staticmethod
    def _body_inputs(body: fx.GraphModule, operands: list) -> dict[fx.Node, int]:
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        extra = len(placeholders) - len(operands)
        if extra not in (0, 1):  # torch versions that pass a ctx placeholder first have one extra
            raise _Skip(f"forward body takes {len(placeholders)} inputs for {len(operands)} operands")
        return {p: i for i, p in enumerate(placeholders[extra:])}

    @staticmethod
    def _single_gemm(fwd: fx.GraphModule) -> fx.Node:
        gemm_op = _bnb_op("gemm_4bit")
        gemms, others = [], []
        for n in fwd.graph.nodes:
            if n.op in ("placeholder", "output", "get_attr"):
                continue
            if n.op == "call_function" and n.target is gemm_op:
                gemms.append(n)
            elif n.op == "call_function" and n.target in _GRAD_MODE_FUNCTIONS:
                continue
            elif n.op == "call_method" and n.target in _VIEW_METHODS:
                continue
            else:
                others.append(n)
        if len(gemms) != 1 or others:
            raise _Skip(f"forward body has {len(gemms)} gemm_4bit and other ops {[str(o.target) for o in others]}")
        output = next(n for n in fwd.graph.nodes if n.op == "output")
        first = output.args[0]
        while isinstance(first, (tuple, list)) and first:
            first = first[0]
        if first is not gemms[0]:
            raise _Skip("the function's first output is not the gemm")
        return gemms[0]

    def _check_backward(self, fwd: fx.GraphModule, bwd: fx.GraphModule, gemm: fx.Node, gemm_args: dict,
                        fwd_inputs: dict[fx.Node, int], linear: dict[str, Any]) -> None:
        """bwd must be ``grad @ dequantize(W)`` for A (and may sum grad for the bias), reading W's storage."""
        dequantize_op = _bnb_op("dequantize_4bit")
        dequantize_blockwise_op = _bnb_op("dequantize_blockwise")
        output = next(n for n in fwd.graph.nodes if n.op == "output")
        if not (isinstance(output.args[0], (tuple, list)) and len(output.args[0]) == 2):
            raise _Skip("forward body does not return (outputs, saved tensors)")
        outputs, saved = output.args[0]
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        placeholders = [n for n in bwd.graph.nodes if n.op == "placeholder"]
        extra = len(placeholders) - len(outputs) - len(saved)
        if extra not in (0, 1):
            raise _Skip("backward body inputs do not match the saved tensors")
        grads_in = placeholders[extra:extra + len(outputs)]
        saved_of = dict(zip(placeholders[extra + len(outputs):], saved))

        def fwd_source(bwd_node: Any) -> Any:  # a bwd node -> the fwd-body node it was saved from
            bwd_node = _through_casts(bwd_node)
            if bwd_node not in saved_of:
                raise _Skip(f"backward reads {bwd_node}, which is not a saved forward tensor")
            return _through_views(saved_of[bwd_node])

        dequantizes = [n for n in bwd.graph.nodes if n.op == "call_function" and n.target is dequantize_op]
        if len(dequantizes) != 1:
            raise _Skip(f"backward body has {len(dequantizes)} dequantize_4bit calls")
        dequant = dequantizes[0]
        packed, absmax, blocksize, quant_type, shape, weight_dtype = dequant.args[:6]
        if fwd_source(packed) is not _through_views(gemm_args["B"]):
            raise _Skip("backward dequantizes a different packed tensor")
        if (blocksize, quant_type, list(shape)) != (gemm_args["blocksize"], "nf4", list(gemm_args["shapeB"])):
            raise _Skip("backward dequantizes with a different blocksize/quant_type/shape")
        absmax = _through_casts(absmax)
        if gemm_args["absmax_8bit"] is None:
            if fwd_source(absmax) is not gemm_args["absmax"]:
                raise _Skip("backward uses a different absmax")
        else:
            # absmax = dequantize_blockwise(codes, absmax2, code, 256, float32) + offset
            if not (absmax.op == "call_function" and absmax.target in (operator.iadd, operator.add, torch.add)):
                raise _Skip("backward does not rebuild the double-quantized absmax as bitsandbytes does")
            blockwise, offset = absmax.args[:2]
            blockwise = _through_casts(blockwise)
            if not (blockwise.op == "call_function" and blockwise.target is dequantize_blockwise_op):
                raise _Skip("backward does not dequantize the absmax codes with dequantize_blockwise")
            codes, absmax2, code = blockwise.args[:3]
            expected = (gemm_args["absmax_8bit"], gemm_args["absmax"], gemm_args["absmax_code"],
                        gemm_args["absmax_offset"])
            if tuple(fwd_source(n) for n in (codes, absmax2, code, offset)) != expected or \
                    tuple(blockwise.args[3:5]) != (NESTED_BLOCKSIZE, torch.float32):
                raise _Skip("backward rebuilds absmax from different tensors or block size")

        x_value = _example(linear["x"])
        if weight_dtype != torch.float32 and (x_value is None or weight_dtype != x_value.dtype):
            raise _Skip(f"backward rounds W to {weight_dtype} before the matmul; nf4_linear rounds it once to "
                        f"the activation dtype {None if x_value is None else x_value.dtype}")

        bwd_output = next(n for n in bwd.graph.nodes if n.op == "output").args[0]
        bwd_output = bwd_output if isinstance(bwd_output, (tuple, list)) else (bwd_output,)
        if len(bwd_output) != len(fwd_inputs):
            raise _Skip("backward returns a gradient count different from the operand count")
        position = {name: fwd_inputs.get(gemm_args[key]) for name, key in (("x", "A"), ("bias", "bias"))}
        for index, grad in enumerate(bwd_output):
            if grad is None:
                continue
            if index == position["x"]:
                if not (grad.op == "call_function" and grad.target in (torch.matmul, torch.ops.aten.matmul.default)
                        and grad.args[0] in grads_in and _through_casts(grad.args[1]) is dequant):
                    raise _Skip("the input gradient is not grad_output @ dequantize(W)")
            elif index == position["bias"]:
                continue  # a bias gradient: recomputed by autograd from our `+ bias`
            else:
                raise _Skip(f"backward returns a gradient for operand {index}")

    def finish(self) -> None:
        for name in self.dead_bodies:
            if hasattr(self.gm, name):
                delattr(self.gm, name)
        self.graph.lint()
        self.gm.recompile()


def rewrite_bnb_linears(gm: fx.GraphModule, example_inputs: list, options: Any = None) -> fx.GraphModule:
    """Replace bitsandbytes NF4 linears in ``gm`` with ``torch.ops.memgraph.nf4_linear``; returns ``gm``."""
    if not _bnb_loaded():
        return gm  # bitsandbytes never imported: no bitsandbytes ops can be in the graph
    rewriter = _Rewriter(gm)
    apply_op = torch.ops.higher_order.autograd_function_apply
    gemm_op = _bnb_op("gemm_4bit")
    skipped: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        try:
            if node.target is apply_op:
                rewriter.rewrite_autograd_apply(node)
            elif node.target is gemm_op:
                rewriter.rewrite_gemm(node)
            elif _is_bnb(node.target):
                raise _Skip(f"{node.target} has no memgraph equivalent")
        except _Skip as reason:
            if str(reason) != "not a bitsandbytes function":
                skipped[str(reason)] = skipped.get(str(reason), 0) + 1
        except Exception as error:  # noqa: BLE001 - an unexpected shape of graph: leave it, say so
            skipped[f"{type(error).__name__}: {error}"] = skipped.get(f"{type(error).__name__}: {error}", 0) + 1
    for reason, count in skipped.items():
        log.info("memgraph nf4 pass: left %d bitsandbytes node(s) unchanged: %s", count, reason)
    if rewriter.rewritten:
        rewriter.finish()
        log.info("memgraph nf4 pass: %d bitsandbytes 4-bit linear(s) -> memgraph.nf4_linear", rewriter.rewritten)
    return gm


# ------------------------------------------------------------------------------------------------------------
# In the joint graph: the dequantized weight as a value of its own
# ------------------------------------------------------------------------------------------------------------
def expose_dequantized_weights(joint: fx.GraphModule) -> int:
    """Replace the ``nf4_linear`` (forward) and ``nf4_linear_grad_input`` (backward) calls of each NF4 weight by
    ``nf4_dequantize`` nodes that plain matmuls read: one before the weight's first forward matmul, read by every
    forward matmul of it, and one before each backward matmul. The same kernels, bits and memory as the ops (the
    bf16 weight lives from its dequantize to its matmul), but the dequantized weight is now a value of the graph:
    ``passes.shared_dequantize`` lets a backward that recomputes a forward matmul reuse its weight for dx instead
    of dequantizing again. Returns how many weights were exposed; a weight with an activation its matmul cannot
    read as rows keeps its ops (logged)."""
    uses: dict[tuple, list[fx.Node]] = {}
    for node in joint.graph.nodes:
        if node.target in (_NF4_LINEAR, _NF4_LINEAR_GRAD_INPUT) and len(node.args) == 10 and not node.kwargs:
            uses.setdefault(tuple(node.args[1:]), []).append(node)
    exposed = 0
    for storage, nodes in uses.items():
        try:
            plan = _exposure(storage, nodes)
        except _Skip as reason:
            log.info("memgraph: NF4 weight of %s keeps its matmul ops: %s", nodes[0].name, reason)
            continue
        _expose(joint.graph, storage, plan)
        exposed += 1
    if exposed:
        joint.graph.lint()
        joint.recompile()
    return exposed


_NF4_LINEAR = torch.ops.memgraph.nf4_linear.default
_NF4_LINEAR_GRAD_INPUT = torch.ops.memgraph.nf4_linear_grad_input.default
_NF4_DEQUANTIZE = torch.ops.memgraph.nf4_dequantize.default


def _exposure(storage: tuple, nodes: list[fx.Node]) -> list[tuple[fx.Node, torch.Tensor]]:
    """(op node, its activation's fake value) for each use of one weight, checked before anything is edited."""
    out_features, in_features = storage[5], storage[6]
    if not all(isinstance(size, int) for size in (out_features, in_features, storage[7], storage[8])):
        raise _Skip("symbolic weight shape or blocksize")
    if not all(is_graph_input_or_view_of_one(a) for a in storage[:5] if isinstance(a, fx.Node)):
        # a weight made in the step (a constant, a gathered shard) would be an ordinary value, which plans may keep
        raise _Skip("its storage is not a graph input")
    plan = []
    for node in nodes:
        value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(value, torch.Tensor) or not isinstance(node.meta.get("val"), torch.Tensor):
            raise _Skip(f"{node.name} has no fake values")
        features = in_features if node.target is _NF4_LINEAR else out_features
        if value.dim() > 2:
            try:
                with _fake_mode(value):
                    value.view(-1, features)
            except Exception as error:  # noqa: BLE001 - the view's own refusal (strides), said in the log
                raise _Skip(f"{node.args[0].name} cannot be read as rows ({error})") from None
        elif value.dim() < 2:
            raise _Skip(f"{node.args[0].name} is {value.dim()}-D")
        plan.append((node, value))
    if len({value.dtype for node, value in plan if node.target is _NF4_LINEAR}) > 1:
        raise _Skip("forward activations of different dtypes")
    return plan


def _fake_mode(value: torch.Tensor):
    mode = _compat.fake_mode_of([value])
    if mode is None:
        raise _Skip("no fake mode")
    return mode


def _expose(graph: fx.Graph, storage: tuple, plan: list[tuple[fx.Node, torch.Tensor]]) -> None:
    """Install the dequantize nodes and a matmul in place of each op."""
    forward_weight = None
    for node, value in plan:
        forward = node.target is _NF4_LINEAR
        with graph.inserting_before(node), _fake_mode(value):
            if forward and forward_weight is not None:
                weight = forward_weight
            else:
                weight = _dequantize_node(graph, storage, value.dtype, node)
                forward_weight = weight if forward else forward_weight
            # permute, not t: Inductor decomposes t (and refuses a graph that still holds it)
            operand = _node(graph, torch.ops.aten.permute.default, (weight, [1, 0]), node) if forward else weight
            features, outputs = (storage[6], storage[5]) if forward else (storage[5], storage[6])
            rows = _as_rows(graph, node.args[0], value, features, node)
            product = _node(graph, torch.ops.aten.mm.default, (rows, operand), node)
            result = _as_shape_of(graph, product, node.args[0], value, outputs, node)
        node.replace_all_uses_with(result)
        graph.erase_node(node)


def _dequantize_node(graph: fx.Graph, storage: tuple, dtype: torch.dtype, source: fx.Node) -> fx.Node:
    packed, absmax, nested_absmax, nested_code, nested_offset, out_features, in_features, blocksize, nested = storage
    arguments = (packed, absmax, nested_absmax, nested_code, nested_offset, [out_features, in_features], blocksize,
                 nested, dtype)
    weight = _node(graph, _NF4_DEQUANTIZE, arguments, source)
    if "eager_input_vals" in source.meta:  # Inductor matches a custom op's input strides to them
        weight.meta["eager_input_vals"] = (tuple(a.meta["val"] if isinstance(a, fx.Node) else a
                                                 for a in arguments), {})
    return weight


def _copy_meta(source: fx.Node, target: fx.Node) -> None:
    """Where the node came from (stack, module, backward tag), not what it holds."""
    target.meta.update({k: v for k, v in source.meta.items() if k not in VALUE_META})


def _node(graph: fx.Graph, op, args: tuple, source: fx.Node) -> fx.Node:
    """``op(*args)`` as a node of ``graph``, with its fake value (run in the ambient fake mode) and ``source``'s
    provenance."""
    node = graph.call_function(op, args)
    _copy_meta(source, node)
    node.meta["val"] = op(*fx.node.map_arg(args, lambda a: a.meta["val"]))  # also the sym_size nodes in a list
    return node


def _as_rows(graph: fx.Graph, activation: fx.Node, value: torch.Tensor, features: int, source: fx.Node) -> fx.Node:
    """``activation`` viewed as [tokens, features] (as F.linear folds it); ``features`` is the weight's static side."""
    if value.dim() == 2:
        return activation
    return _node(graph, torch.ops.aten.view.default, (activation, [-1, features]), source)


def _as_shape_of(graph: fx.Graph, product: fx.Node, activation: fx.Node, value: torch.Tensor, outputs: int,
                 source: fx.Node) -> fx.Node:
    """The [tokens, outputs] product viewed with the activation's leading dimensions: symbolic ones read from the
    activation (the first as -1)."""
    if value.dim() == 2:
        return product
    sizes: list = []
    for dim, size in enumerate(value.shape[:-1]):
        if isinstance(size, int):
            sizes.append(size)
        elif -1 not in sizes:
            sizes.append(-1)
        else:
            sizes.append(_node(graph, torch.ops.aten.sym_size.int, (activation, dim), source))
    sizes.append(outputs)
    return _node(graph, torch.ops.aten.view.default, (product, sizes), source)
