"""Save a ``TrainingGraph``'s structure (ops, arguments, input shapes; no weights, no values) to a small
gzipped JSON file, and load it anywhere: plan an 8B model's graph captured on a GPU on a laptop's CPU, share
it with someone comparing solvers, or pin a solver regression in a test.

Loading rebuilds the joint graph on fake meta tensors and re-derives every value's shape (checked against
the saved ones), so the cost model and the solvers see the graph they would have seen where it was captured.
Only ``torch.ops`` operators and ``operator.getitem`` are saved: a file names no other Python callable, so
loading one runs no code but aten/custom-op shape functions.
"""
from __future__ import annotations

import gzip
import json
import operator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.errors import MemgraphError
from memgraph.graph import TrainingGraph

FORMAT = "memgraph-training-graph/1"
_ENUM_TYPES = (torch.memory_format, torch.layout)


def save_graph(graph: TrainingGraph, path: str | Path) -> Path:
    """Write ``graph``'s structure to ``path`` (gzipped JSON; about 0.2 MB for an 8B Llama step)."""
    nodes = [_node_record(node) for node in graph.joint.graph.nodes]
    document = {"format": FORMAT, "torch": torch.__version__, "nodes": nodes,
                "example_inputs": [_value_record(v) for v in graph.example_inputs],
                "num_fwd_outputs": graph.num_fwd_outputs,
                "static_input_indices": list(graph.static_input_indices),
                # the joint as planned: already canonical and rewritten (a second CSE would merge each NF4 weight's
                # backward dequantize into its forward one, which is the planner's choice to make)
                "canonical": True}
    path = Path(path)
    with gzip.open(path, "wt", encoding="utf-8") as file:
        json.dump(document, file, separators=(",", ":"))
    return path


def load_graph(path: str | Path) -> TrainingGraph:
    """The ``TrainingGraph`` saved at ``path``, on fake meta tensors."""

    with gzip.open(Path(path), "rt", encoding="utf-8") as file:
        document = json.load(file)
    if document.get("format") != FORMAT:
        raise MemgraphError(f"{path} is not a saved training graph (format {document.get('format')!r}, "
                            f"expected {FORMAT!r})")
    _load_custom_ops(document["nodes"])
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for record in document["nodes"]:
        if record["op"] == "placeholder":
            node = graph.placeholder(record["name"])
        elif record["op"] == "output":
            node = graph.output(_decode(record["args"], env)[0])
        else:
            node = graph.create_node("call_function", _resolve(record["target"]), _decode(record["args"], env),
                                     _decode(record["kwargs"], env), name=record["name"])
        if node.name != record["name"]:
            raise MemgraphError(f"{path}: node {record['name']!r} was renamed {node.name!r} on loading")
        node.meta.update(record.get("meta", {}))
        env[record["name"]] = node
    joint = fx.GraphModule(torch.nn.Module(), graph)
    mode = _compat.new_fake_mode()
    example_inputs = [_fake(value, mode) for value in document["example_inputs"]]
    flat = [x for part in example_inputs for x in (part if isinstance(part, list) else [part])]
    _compat.fake_tensor_prop(joint, flat)
    _check_shapes(document["nodes"], env, path)
    # files saved before the flag hold a joint the current rewrites have not seen: canonicalize and rewrite it
    return TrainingGraph(joint, example_inputs, document["num_fwd_outputs"],
                         tuple(document["static_input_indices"]), canonical=bool(document.get("canonical")))


# --- encoding -----------------------------------------------------------------------------------------------------
def _node_record(node: fx.Node) -> dict[str, Any]:
    if node.op not in ("placeholder", "output", "call_function"):
        raise MemgraphError(f"cannot save node {node.name} ({node.op}): only call_function graphs are supported")
    record: dict[str, Any] = {"name": node.name, "op": node.op, "args": _encode(node.args),
                              "kwargs": _encode(node.kwargs), "value": _value_record(node.meta.get("val"))}
    if node.op == "call_function":
        record["target"] = _target_name(node)
    meta = {k: v for k, v in node.meta.items() if isinstance(v, (bool, int, str)) and k != "stack_trace"}
    if meta:
        record["meta"] = meta
    return record


def _target_name(node: fx.Node) -> str:
    target = node.target
    if _compat.is_op_overload(target):
        return f"{target.namespace}::{target._schema.name.split('::')[-1]}.{target._overloadname}"
    if target is operator.getitem:
        return "operator.getitem"
    raise MemgraphError(f"cannot save node {node.name}: its target {target!r} is not a torch.ops operator")


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": _dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, _ENUM_TYPES):
        return {"enum": str(value).removeprefix("torch.")}
    if isinstance(value, torch.SymInt):
        raise MemgraphError("cannot save a graph with symbolic sizes (capture it with dynamic=False)")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise MemgraphError(f"cannot save argument {value!r} of type {type(value).__name__}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "bfloat16": getattr(torch, name) reads it back


def _value_record(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"shape": [int(s) for s in value.shape], "stride": [int(s) for s in value.stride()],
                "dtype": _dtype_name(value.dtype), "requires_grad": bool(value.requires_grad)}
    if isinstance(value, (list, tuple)):
        return [_value_record(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return {"scalar": value}
    return {"scalar": None}


# --- decoding -----------------------------------------------------------------------------------------------------
def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "node":
        return env[payload]
    if kind == "tuple":
        return tuple(_decode(v, env) for v in payload)
    if kind == "dict":
        return {k: _decode(v, env) for k, v in payload.items()}
    if kind == "dtype":
        return getattr(torch, payload)
    if kind == "device":
        return torch.device("meta")  # the loaded graph lives on fake meta tensors
    if kind == "enum":
        return getattr(torch, payload)
    raise MemgraphError(f"unknown argument encoding {kind!r}")


def _resolve(name: str):
    if name == "operator.getitem":
        return operator.getitem
    namespace, rest = name.split("::", 1)
    op_name, overload = rest.rsplit(".", 1)
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op_name), overload)
    except (AttributeError, RuntimeError) as error:
        raise MemgraphError(f"operator {name} is not registered here (import the library that defines it): "
                            f"{error}") from error


_OP_LIBRARIES = {"memgraph": ("memgraph.kernels.attention", "memgraph.kernels.nf4", "memgraph.kernels.cross_entropy"),
                 "bitsandbytes": ("bitsandbytes",)}


def _load_custom_ops(records: list[dict[str, Any]]) -> None:
    """Import the libraries that define the graph's non-aten operators (memgraph's, bitsandbytes')."""
    import importlib

    namespaces = {r["target"].split("::", 1)[0] for r in records if "::" in r.get("target", "")}
    for namespace in sorted(namespaces & set(_OP_LIBRARIES)):
        for module in _OP_LIBRARIES[namespace]:
            try:
                importlib.import_module(module)
            except ImportError:
                pass  # _resolve names the missing operator


def _fake(record: Any, mode) -> Any:
    if isinstance(record, list):
        return [_fake(r, mode) for r in record]
    if "shape" not in record:
        return record["scalar"]
    with mode:
        tensor = torch.empty_strided(record["shape"], record["stride"], dtype=getattr(torch, record["dtype"]),
                                     device="meta")
    return tensor.requires_grad_(record["requires_grad"]) if tensor.is_floating_point() else tensor


def _check_shapes(records: list[dict[str, Any]], env: dict[str, fx.Node], path) -> None:
    for record in records:
        saved = record["value"]
        if not isinstance(saved, dict) or "shape" not in saved:
            continue
        value = env[record["name"]].meta.get("val")
        if not isinstance(value, torch.Tensor) or list(value.shape) != saved["shape"] \
                or _dtype_name(value.dtype) != saved["dtype"]:
            raise MemgraphError(f"{path}: node {record['name']} re-derives as {value!r}, saved as {saved}")
