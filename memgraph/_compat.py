"""Every private torch API memgraph touches, in one place, for torch 2.11 (GPU image) and 2.13+ (CPU).

Callers import from here only; when a torch release moves something, this is the one file to change.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if TORCH_VERSION < (2, 11):
    raise ImportError(f"memgraph needs torch >= 2.11; found {torch.__version__}")

from torch._functorch import partitioners as _partitioners  # noqa: E402
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402
from torch._inductor.custom_graph_pass import CustomPartitionerFn  # noqa: E402

__all__ = [
    "TORCH_VERSION", "CustomPartitionerFn", "make_boxed_func", "aot_module", "inductor_compile",
    "default_partition", "min_cut_partition", "extract_fwd_bwd_modules", "classify_nodes", "is_sym_node",
    "is_primal", "is_tangent", "fwd_bwd_outputs", "inductor_decompositions", "fake_mode_of",
]

default_partition = _partitioners.default_partition
min_cut_partition = _partitioners.min_cut_rematerialization_partition
is_sym_node = _partitioners.is_sym_node
is_primal = _partitioners._is_primal
is_tangent = _partitioners._is_tangent


def _accepted(function: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keep the keyword arguments ``function`` accepts (their sets differ between torch versions)."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters}


def extract_fwd_bwd_modules(joint: fx.GraphModule, saved_values: list[fx.Node], saved_sym_nodes: list[fx.Node],
                            *, num_fwd_outputs: int, static_lifetime_input_nodes=None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward graph returning (outputs, saved...), backward graph taking (saved..., tangents); values needed by
    backward that are not saved are recomputed there from saved ones."""
    function = _partitioners._extract_fwd_bwd_modules
    kwargs = _accepted(function, {"num_fwd_outputs": num_fwd_outputs,
                                  "static_lifetime_input_nodes": static_lifetime_input_nodes})
    return function(joint, saved_values, saved_sym_nodes, **kwargs)


def classify_nodes(joint: fx.GraphModule, static_lifetime_input_indices: list[int], num_fwd_outputs: int):
    """torch's NodeInfo: ``required_fw_nodes``, ``required_bw_nodes``, ``unclaimed_nodes``, ``inputs``."""
    return _partitioners.classify_nodes(joint, static_lifetime_input_indices, num_fwd_outputs)


def fwd_bwd_outputs(joint: fx.GraphModule, num_fwd_outputs: int) -> tuple[list, list]:
    outputs = _partitioners._extract_fwd_bwd_outputs(joint, num_fwd_outputs=num_fwd_outputs)
    return outputs[0], outputs[1]


def aot_module(gm: fx.GraphModule, example_inputs: Sequence[Any], *, fw_compiler: Callable,
               bw_compiler: Callable, partition_fn: Callable, inference_compiler: Callable | None = None,
               decompositions: dict | None = None) -> Callable:
    """AOTAutograd over a Dynamo graph with our partitioner and compilers."""
    from torch._dynamo.backends.common import aot_autograd

    kwargs: dict[str, Any] = dict(fw_compiler=fw_compiler, bw_compiler=bw_compiler, partition_fn=partition_fn,
                                  inference_compiler=inference_compiler or fw_compiler,
                                  keep_inference_input_mutations=True)
    if decompositions is not None:
        kwargs["decompositions"] = decompositions
    return aot_autograd(**kwargs)(gm, example_inputs)


def inductor_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], *, partitioner: CustomPartitionerFn,
                     config_patches: dict[str, Any] | None = None) -> Callable:
    """Inductor's whole pipeline (decompositions, joint-graph passes, codegen) with our partitioner."""
    from torch._inductor.compile_fx import compile_fx

    patches = {"custom_partitioner_fn": partitioner, **(config_patches or {})}
    return compile_fx(gm, example_inputs, config_patches=patches)


def inductor_decompositions() -> dict:
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def fake_mode_of(values: Sequence[Any]):
    """The FakeTensorMode the example values belong to, or None."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(list(values))
