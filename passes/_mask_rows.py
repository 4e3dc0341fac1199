"""A mask's subgraph evaluated a block of query rows at a time.

The attention rewrite proves a mask equal to a causal / sliding-window pattern by evaluating it. Whole, a
[..., S, S] mask at S = 96k holds 9e9 elements and its evaluation tens of GB. HF builds its masks from index
vectors broadcast against each other (``kv_idx <= q_idx``, packed-sequence ids gathered at both), so rows
r0:r1 of the mask need only rows r0:r1 of the values that span the query dimension. ``RowBlocks`` evaluates
the subgraph once per block with exactly those values sliced, and refuses (``Unsupported``) any step for which
the slice would not be exact: an op outside ``ROW_LOCAL`` reading a sliced value, an output whose shape is not
the full one with the block's rows, or a large intermediate that no sliced value produces.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from memgraph.passes._matching import Unsupported

QUERY_DIM = -2  # masks are [..., query, key]
# Ops whose every output element is computed from the inputs' elements at the same (broadcast) position, or that
# only add, expand or convert dims without moving the query one: rows r0:r1 of their output need rows r0:r1 of
# their inputs. The output-shape check in ``RowBlocks`` catches a call that moves the query dim anyway.
ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "floordiv", "floor_divide", "mod", "remainder", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert", "inv", "not_",
    "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor",
    "bitwise_not", "where", "masked_fill", "minimum", "maximum", "clamp", "clamp_min", "clamp_max",
    "__and__", "__or__", "__xor__", "__invert__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "__add__", "__sub__", "__mul__", "__rsub__", "__radd__", "__rmul__", "__neg__",
}
CONVERSIONS = {"to", "type", "type_as", "bool", "float", "int", "long", "half", "bfloat16", "double", "contiguous",
               "clone", "detach"}
BROADCAST_VIEWS = {"unsqueeze", "expand", "getitem"}  # getitem: see _check_getitem
# tril/triu keep (i, j) by j - i against a diagonal: on rows start:stop, the same with the diagonal moved by start.
DIAGONAL_SHIFTED = {"tril", "triu"}
ROW_LOCAL = ELEMENTWISE | CONVERSIONS | BROADCAST_VIEWS | DIAGONAL_SHIFTED
# x.new_ones(size) and the like read only x's dtype and device: the same whether x is a block or whole.
READS_NO_VALUES = {"new_ones", "new_zeros", "new_full", "new_empty", "new_tensor"}
VIEW_INDEX_ITEMS = (None, Ellipsis)  # plus slice(None): indexing that only adds dims


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # a graph input (a padding mask, position ids): its shape, no values
        return value.to("meta")
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: (torch.device("meta") if k == "device" and v is not None else _to_meta(v))
                for k, v in value.items()}
    return value


def _call(node: fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_method":
        self, *rest = args
        return getattr(self, node.target)(*rest, **kwargs)
    return node.target(*args, **kwargs)


def _is_view_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(item in VIEW_INDEX_ITEMS or item == slice(None) for item in items)


class RowBlocks:
    """``build`` (a graph from integer sizes, and maybe one [B, S] input, to a [..., S, S] mask) at ``sizes``
    (its placeholders' values), one block of query rows at a time: ``rows(start, stop)`` equals ``build(*sizes)[..., start:stop, :]`` (or a [..., 1, S] value that is the
    same for every row). ``max_full_elements`` bounds any intermediate computed whole."""

    def __init__(self, build: fx.GraphModule, sizes: list[int], seq_len: int, max_full_elements: int):
        self.build, self.sizes, self.seq_len = build, list(sizes), seq_len
        self.max_full_elements = max_full_elements
        self.full_shapes = self._shapes_on_meta()
        output = next(node for node in build.graph.nodes if node.op == "output")
        final = self.full_shapes.get(output.args[0])
        if final is None or len(final) < 2 or final[QUERY_DIM] not in (1, seq_len) or final[-1] != seq_len:
            raise Unsupported(f"the mask's shape {final} is not [..., {seq_len}, {seq_len}]")
        self.dims = {size for shape in self.full_shapes.values() for size in shape}

    def _shapes_on_meta(self) -> dict[fx.Node, tuple[int, ...]]:
        """Every node's full shape, from one evaluation on the meta device (no memory)."""
        values: dict[fx.Node, Any] = {}
        placeholders = iter(self.sizes)
        for node in self.build.graph.nodes:
            if node.op == "placeholder":
                values[node] = next(placeholders)
            elif node.op in ("call_function", "call_method"):
                args, kwargs = fx.map_arg((node.args, node.kwargs), values.__getitem__)
                try:
                    values[node] = _call(node, _to_meta(args), _to_meta(kwargs))
                except Exception as error:  # data-dependent ops have no meta evaluation
                    raise Unsupported(f"the mask's {node.name} has no shape without values ({error})") from None
        return {node: tuple(value.shape) for node, value in values.items() if isinstance(value, torch.Tensor)}

    def block_rows(self, max_block_elements: int) -> int:
        """Rows per block: as many as fit max_block_elements, at least 2, and not equal to any size the mask's
        values have (so the shape check tells the block's rows from every other dim)."""
        rows = max(2, min(self.seq_len - 1, max_block_elements // max(self.seq_len, 1)))
        for candidate in [*range(rows, 1, -1), *range(rows + 1, self.seq_len)]:
            if candidate not in self.dims:
                return candidate
        raise Unsupported("no block size is distinct from the mask's dims")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        values: dict[fx.Node, Any] = {}
        sliced: set[fx.Node] = set()
        placeholders = iter(self.sizes)
        for node in self.build.graph.nodes:
            if node.op == "placeholder":
                values[node] = next(placeholders)
            elif node.op == "output":
                result = values[node.args[0]]
                if node.args[0] not in sliced and result.shape[QUERY_DIM] != 1:
                    raise Unsupported("the mask's rows were never sliced")
                return result
            else:
                values[node] = self._step(node, values, sliced, start, stop)
        raise Unsupported("the mask's graph has no output")

    def _step(self, node: fx.Node, values: dict, sliced: set, start: int, stop: int) -> Any:
        name = _name(node)
        args, kwargs = fx.map_arg((node.args, node.kwargs), values.__getitem__)
        full = self.full_shapes.get(node)
        reads_sliced = name not in READS_NO_VALUES and any(arg in sliced for arg in node.all_input_nodes)
        if reads_sliced:
            if name not in ROW_LOCAL:
                raise Unsupported(f"{name} ({node.name}) reads a block of query rows and is not row-local")
            if name == "getitem" and node.args[0] in sliced and not _is_view_index(node.args[1]):
                raise Unsupported(f"{node.name} indexes a block of query rows")
            if name == "expand":
                args = _expand_keeping_rows(args)
            if name in DIAGONAL_SHIFTED:
                args, kwargs = _diagonal_moved(args, kwargs, start)
            value = _call(node, args, kwargs)
            expected = full[:QUERY_DIM] + (stop - start,) + full[QUERY_DIM + 1:] if full and len(full) >= 2 else None
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected:
                raise Unsupported(f"{name} ({node.name}) does not keep the query rows where the mask has them")
            sliced.add(node)
            return value
        is_view = name == "expand" or (name == "getitem" and _is_view_index(node.args[1]))
        if full is not None and math.prod(full) > self.max_full_elements and not is_view:
            raise Unsupported(f"{node.name} ({full}) is too large to evaluate whole and reads no block of rows")
        value = _call(node, args, kwargs)
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[QUERY_DIM] == self.seq_len:
            sliced.add(node)  # a value spanning the query rows: from here on, only the block's
            return value.narrow(value.dim() + QUERY_DIM, start, stop - start)
        return value


def _expand_keeping_rows(args: tuple) -> tuple:
    """x.expand(*sizes) of a block: the query dim keeps the block's length (-1) instead of the full one."""
    self, *sizes = args
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size))
    sizes = list(sizes[0] if packed else sizes)
    if len(sizes) >= 2:
        sizes[QUERY_DIM] = -1
    return (self, tuple(sizes)) if packed else (self, *sizes)


def _diagonal_moved(args: tuple, kwargs: dict, start: int) -> tuple[tuple, dict]:
    """tril/triu(x, diagonal) of a block whose first row is row ``start`` of the whole."""
    self, *rest = args
    if rest:
        return (self, rest[0] + start, *rest[1:]), kwargs
    return (self,), {**kwargs, "diagonal": kwargs.get("diagonal", 0) + start}
