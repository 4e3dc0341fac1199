"""What each FX node's output occupies: fresh storages (and their sizes) or aliases of an input's storage.

Aliasing is read from the op's schema (``Tensor(a) self -> Tensor(a)``: views, ``detach``, in-place ops;
``Tensor(a)[]``: ``split``/``unbind``), following the graph's edges, so it survives graph rewrites such as
CSE that leave stale fake values behind. ``_unsafe_view`` and any op whose fake output shares its input's
fake storage alias too (the op's fake implementation decides: this covers custom ops). Sizes of fresh
outputs are their fake storages' bytes. A node we cannot read (no fake value, higher-order op, Python
callable, module call) falls back to its fake output size and is reported in ``unknown_ops``.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.cost_model.symbolic import Size, as_size

aten = torch.ops.aten

# Ops that return a tensor on their input's storage although their schema does not say so.
_UNANNOTATED_ALIASES = {aten._unsafe_view.default, aten.lift_fresh.default}


@dataclasses.dataclass(frozen=True)
class Output:
    """One tensor a node produces: fresh (``nbytes`` of a new storage) or on ``alias`` = (input node, output
    index)'s storage."""

    nbytes: Size | None = None
    alias: tuple[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class NodeValue:
    """A node's outputs (one per element of its value: a tensor, or None for non-tensors) and its inputs."""

    name: str
    outputs: tuple[Output | None, ...]
    inputs: tuple[str, ...]
    unknown: str | None = None  # why the size or aliasing is a guess (reported in unknown_ops)
    kernel: Any = None  # inductor.KernelInfo when memory is modelled for Inductor's generated code
    scratch: Size = 0  # bytes the op allocates and frees inside its call (a kernel's workspace)
    fused: int | None = None  # Inductor kernel: adjacent values with one id run as one multi-output kernel


# op -> function(**arguments bound to the op's schema, tensors as fake values) -> scratch bytes (int or SymInt)
_SCRATCH: dict[Any, Callable[..., Any]] = {}


def register_scratch(op, formula: Callable[..., Any]) -> None:
    """Declare the workspace an op allocates and frees within one call (e.g. a chunked kernel's buffer): the
    cost model counts it while the op runs. ``formula`` gets the op's arguments by schema name."""
    _SCRATCH[op] = formula


# op -> function(node) -> {output index: input node} for outputs the compiled graph writes into that input
_IN_PLACE: dict[Any, Callable[[fx.Node], Mapping[int, fx.Node]]] = {}


def register_in_place_outputs(op, written_into: Callable[[fx.Node], Mapping[int, fx.Node]]) -> None:
    """Declare a functional op whose outputs the partition pass has written into an input's storage (an input
    nothing else reads): ``written_into(node)`` maps output indices to those inputs. The cost model counts no
    new storage for them; the input's storage lives as long as they do."""
    _IN_PLACE[op] = written_into


# ops whose outputs live in host memory (offload's copies): not device memory, counted as 0 bytes
_HOST_OUTPUTS: set[Any] = set()


def register_host_output(op) -> None:
    """Declare an op whose outputs are host tensors (e.g. ``memgraph.offload``): the device's memory model
    does not count them."""
    _HOST_OUTPUTS.add(op)


# op -> schema names of arguments that live in host memory (a table the op reads from the host): a graph input
# used only there is not device memory
_HOST_ARGUMENTS: dict[Any, tuple[str, ...]] = {}


def register_host_argument(op, *names: str) -> None:
    """Declare arguments of ``op`` that are host tensors (e.g. ``memgraph.host_embedding``'s table): a graph input
    read only through them is counted as 0 device bytes."""
    _HOST_ARGUMENTS[op] = names


def host_arguments(node: fx.Node) -> set[fx.Node]:
    """The argument nodes ``node`` reads from host memory (registered with ``register_host_argument``)."""
    names = _HOST_ARGUMENTS.get(node.target)
    if not names:
        return set()
    return {v for k, v in _bound_arguments(node).items() if k in names and isinstance(v, fx.Node)}


def _lives_on_host(node: fx.Node) -> bool:
    """A graph input that only host-reading ops read (as their host arguments)."""
    if node.op != "placeholder" or not node.users:
        return False
    for user in node.users:
        names = _HOST_ARGUMENTS.get(user.target)
        if names is None or any(v is node for k, v in _bound_arguments(user).items() if k not in names):
            return False
    return True


def _scratch_of(node: fx.Node) -> Size:
    formula = _SCRATCH.get(node.target)
    if formula is None:
        return 0
    bound = _bound_arguments(node)
    values = {name: (arg.meta.get("val") if isinstance(arg, fx.Node) else arg) for name, arg in bound.items()}
    return as_size(formula(**values))


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    for leaf in _compat.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def input_names(node: fx.Node) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.name for n in node.all_input_nodes))


def _elements(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _storage_bytes(tensor: torch.Tensor) -> Size:
    try:
        return as_size(tensor.untyped_storage().nbytes())
    except (NotImplementedError, RuntimeError, AttributeError):
        numel: Any = 1
        for dim in tensor.shape:
            numel = numel * dim
        return as_size(numel * tensor.element_size())


def _schema_aliases(node: fx.Node) -> list[fx.Node | None] | None:
    """Per return of an OpOverload: the argument node it aliases (None = fresh); None if not an OpOverload."""
    target = node.target
    if not _compat.is_op_overload(target):
        return None
    schema = target._schema
    bound = _bound_arguments(node)
    aliasing_args = [(a.alias_info.before_set, bound.get(a.name)) for a in schema.arguments if a.alias_info]
    result: list[fx.Node | None] = []
    for ret in schema.returns:
        source = None
        if ret.alias_info is not None:
            matches = [arg for sets, arg in aliasing_args if sets & ret.alias_info.before_set]
            candidates = matches or [arg for _, arg in aliasing_args]  # Tensor(a)[]: the set is on the elements
            source = next((c for c in candidates if isinstance(c, fx.Node)), None)
        elif target in _UNANNOTATED_ALIASES and isinstance(node.args[0], fx.Node):
            source = node.args[0]
        result.append(source)
    return result


def _bound_arguments(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (defaults included)."""
    bound: dict[str, Any] = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args):
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
    return bound


def _fake_alias(tensor: torch.Tensor, node: fx.Node) -> tuple[str, int] | None:
    """The input output whose fake storage ``tensor`` shares (the op's fake implementation returned a view)."""
    key = _compat.storage_key(tensor)
    if key is None:
        return None
    for source in node.all_input_nodes:
        for index, element in enumerate(_elements(source.meta.get("val"))):
            if isinstance(element, torch.Tensor) and _compat.storage_key(element) == key:
                return source.name, index
    return None


def node_value(node: fx.Node) -> NodeValue:
    """What ``node`` allocates and aliases, from its schema, its fake value and its inputs."""
    inputs = input_names(node)
    if node.op == "output":
        return NodeValue(node.name, (), inputs)
    value = node.meta.get("val")
    if value is None and "val" not in node.meta:
        return _without_fake_value(node, inputs)
    elements = _elements(value)
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        if isinstance(value, torch.Tensor):
            return NodeValue(node.name, (Output(alias=(node.args[0].name, int(node.args[1]))),), inputs)
        return NodeValue(node.name, tuple(None for _ in elements), inputs)
    if node.target in _HOST_OUTPUTS or _lives_on_host(node):
        return NodeValue(node.name, tuple(Output(nbytes=0) if isinstance(e, torch.Tensor) else None
                                          for e in elements), inputs)
    unknown = _unknown_reason(node)
    schema_sources = _schema_aliases(node) if node.op == "call_function" else None
    in_place = _IN_PLACE[node.target](node) if node.target in _IN_PLACE else {}
    outputs: list[Output | None] = []
    for index, element in enumerate(elements):
        if isinstance(element, (list, tuple)):
            # A list inside a tuple: its tensors are counted as fresh and its aliasing is not followed.
            nbytes = sum((_storage_bytes(t) for t in tensors_in(element)), 0)
            outputs.append(Output(nbytes=nbytes) if nbytes else None)
            unknown = unknown or "nested list output (aliasing not followed)"
            continue
        if not isinstance(element, torch.Tensor):
            outputs.append(None)
            continue
        source = (in_place[index].name, 0) if index in in_place else None
        if source is None and schema_sources is not None:
            source_node = schema_sources[min(index, len(schema_sources) - 1)] if schema_sources else None
            if source_node is not None:
                source = (source_node.name, 0)
        if source is None and node.op != "placeholder":
            source = _fake_alias(element, node)
        outputs.append(Output(alias=source) if source is not None else Output(nbytes=_storage_bytes(element)))
    return NodeValue(node.name, tuple(outputs), inputs, unknown, scratch=_scratch_of(node))


def _unknown_reason(node: fx.Node) -> str | None:
    if node.op in ("call_module", "call_method"):
        return f"{node.op} (memory inside it is not modelled)"
    if node.op != "call_function" or _compat.is_op_overload(node.target):
        return None
    if _compat.is_higher_order_op(node.target):
        return "higher-order op (memory inside its subgraph is not modelled)"
    if not any(True for _ in tensors_in(node.meta.get("val"))):
        return None  # size arithmetic on SymInts and other Python scalars
    return "not an aten/custom op (size from its fake output)"


def _without_fake_value(node: fx.Node, inputs: tuple[str, ...]) -> NodeValue:
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        numel: Any = 1
        for dim in meta.shape:
            numel = numel * dim
        nbytes = as_size(numel * meta.dtype.itemsize)
        return NodeValue(node.name, (Output(nbytes=nbytes),), inputs, "no fake value (size from tensor_meta)")
    reason = None if node.op == "placeholder" else "no fake value (counted as 0 bytes)"
    return NodeValue(node.name, (), inputs, reason)


def ensure_fake_values(gm: fx.GraphModule, example_inputs) -> None:
    """Give a plain GraphModule the fake values the cost model reads (no-op if it has them)."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    if all("val" in n.meta for n in nodes):
        return
    _compat.fake_tensor_prop(gm, list(example_inputs))
