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
from torch.utils import _python_dispatch, _pytree  # noqa: E402

__all__ = [
    "TORCH_VERSION", "CustomPartitionerFn", "make_boxed_func", "aot_module", "inductor_compile",
    "default_partition", "min_cut_partition", "extract_fwd_bwd_modules", "classify_nodes", "is_sym_node",
    "is_primal", "is_tangent", "fwd_bwd_outputs", "inductor_decompositions", "fake_mode_of",
    "boxed_graph_module", "redispatch_after_inplace_or_view", "current_cuda_device", "current_raw_stream",
]

default_partition = _partitioners.default_partition
tree_leaves = _pytree.tree_leaves
TorchDispatchMode = _python_dispatch.TorchDispatchMode
SET_GRAD_ENABLED = torch._C._set_grad_enabled  # what Dynamo records for ``with torch.no_grad()`` in a graph
SDPA_FUNCTION = torch._C._nn.scaled_dot_product_attention  # what Dynamo records for F.scaled_dot_product_attention
LINEAR_FUNCTION = torch._C._nn.linear  # what Dynamo records for F.linear (nn.Linear)


def is_op_overload(target: Any) -> bool:
    """An ``OpOverload`` (``torch.ops.aten.mm.default``): an operator with a schema, tags and a namespace."""
    return isinstance(target, torch._ops.OpOverload)


def is_op_overload_packet(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverloadPacket)


def is_higher_order_op(target: Any) -> bool:
    return isinstance(target, torch._ops.HigherOrderOperator)


def is_fake_tensor(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def reset_dynamo() -> None:
    """Forget every compiled frame (the next call of a compiled model compiles again)."""
    import torch._dynamo

    torch._dynamo.reset()


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    import torch._dynamo

    torch._dynamo.mark_dynamic(tensor, dim)


def inductor_needs_realized_inputs(target: Any) -> bool:
    """Inductor's lowering of ``target`` reads materialized buffers (it cannot fuse its inputs into itself)."""
    from torch._inductor.lowering import needs_realized_inputs

    return target in needs_realized_inputs


def inductor_has_lowering(target: Any) -> bool:
    """Inductor lowers ``target`` (directly or through a decomposition) rather than calling a fallback kernel."""
    from torch._inductor.lowering import lowerings

    return target in lowerings or target.overloadpacket in lowerings or target in inductor_decompositions()
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
                     cache_key: str | None, config_patches: dict[str, Any] | None = None) -> Callable:
    """Inductor's whole pipeline (decompositions, joint-graph passes, codegen) with our partitioner.

    cache_key: memgraph's part of the FX-graph and AOTAutograd cache keys (it also is ``partitioner.uuid()``,
    which torch releases differ in hashing; the compile-wide cache key tag enters every release's key). None
    turns both caches off for this compile."""
    import torch.compiler.config as compiler_config
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    patches = {"custom_partitioner_fn": partitioner, **(config_patches or {})}
    if cache_key is None:
        patches["fx_graph_cache"] = False
    tag = f"{compiler_config.cache_key_tag}|memgraph:{cache_key}"
    with functorch_config.patch(enable_autograd_cache=cache_key is not None), \
            compiler_config.patch(cache_key_tag=tag):
        return compile_fx(gm, example_inputs, config_patches=patches)


# Ops Inductor must leave out of CUDA graphs (host copies, host-memory inputs): it runs them between the graphed
# partitions. The tag is absent from releases without graph partitioning.
CUDAGRAPH_UNSAFE_TAGS: tuple = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


def cudagraph_config_patches() -> dict[str, Any]:
    """Inductor settings that replay each compiled graph from CUDA graphs (cudagraph trees), split around ops
    that cannot be captured where the release can split (``graph_partition``); otherwise such a graph runs
    without CUDA graphs (Inductor logs why)."""
    from torch._inductor import config as inductor_config

    patches: dict[str, Any] = {"triton.cudagraphs": True}
    if hasattr(inductor_config, "graph_partition"):
        patches["graph_partition"] = True
    return patches


def inductor_output_code(fn: Callable[[], Any]) -> list[str]:
    """Run ``fn`` and return the Python code Inductor wrote for the graphs it compiled meanwhile (tests read the
    order of the emitted calls)."""
    from torch._inductor.utils import run_and_get_code

    return run_and_get_code(fn)[1]


def inductor_cache_dir() -> str:
    """Where Inductor keeps its caches (``TORCHINDUCTOR_CACHE_DIR`` or its per-user default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def inductor_decompositions() -> dict:
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def fake_mode_of(values: Sequence[Any]):
    """The FakeTensorMode the example values belong to, or None."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(list(values))


def real_tensors():
    """A context in which factory functions make real tensors even inside a fake-tensor trace (the partitioner
    runs under AOTAutograd's FakeTensorMode: a measurement there would time fake copies)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def new_fake_mode():
    """A fresh FakeTensorMode that accepts real tensors among its inputs (for graphs without one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


# --- cost model: symbolic sizes and fake values (added by the cost model) ---

def symint_expr(value: Any):
    """The sympy expression behind a SymInt (``s0*64``), or None for anything else."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return None


def shape_env_of(values: Sequence[Any]):
    """The ShapeEnv the (fake) values' symbolic sizes belong to, or None when all sizes are static."""
    mode = fake_mode_of(values)
    return getattr(mode, "shape_env", None) if mode is not None else None


def size_hints(shape_env, symbols) -> dict:
    """The concrete value Dynamo traced with for each size symbol (its "hint").

    Unbacked symbols (data-dependent sizes) have none; they get torch's own fallback value.
    """
    from torch._inductor import config as inductor_config

    hints = {}
    # torch 2.13 renamed var_to_val (backed symbols' values) to backed_var_to_val.
    var_to_val = {}
    if shape_env is not None:
        var_to_val = getattr(shape_env, "backed_var_to_val", None) or getattr(shape_env, "var_to_val", {})
    for symbol in symbols:
        value = var_to_val.get(symbol)
        hints[symbol] = int(value) if value is not None else int(inductor_config.unbacked_symint_fallback)
    return hints


def storage_key(tensor: torch.Tensor) -> int | None:
    """An id of the (fake or real) storage a tensor views; equal ids mean aliasing. None if it has none."""
    try:
        return tensor.untyped_storage()._cdata
    except (NotImplementedError, RuntimeError, AttributeError):  # sparse, some subclasses, functional wrappers
        return None


def fake_tensor_prop(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Fill ``node.meta["val"]`` of a plain GraphModule by running it on fake tensors."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = fake_mode_of(example_inputs) or new_fake_mode()
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*[
        mode.from_tensor(x) if isinstance(x, torch.Tensor) and fake_mode_of([x]) is None else x
        for x in example_inputs])


def concrete_int(value: Any) -> int:
    """An int for an int or a SymInt (its traced value), without adding a guard."""
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        if hint is not None:
            return int(hint)
        from torch.fx.experimental import symbolic_shapes

        # the helper's name changed across versions (hint_int; optimization_hint in 2.13)
        for name in ("hint_int", "optimization_hint"):
            function = getattr(symbolic_shapes, name, None)
            if function is not None:
                return int(function(value))
        return int(value.node.shape_env.size_hint(value.node.expr))
    return int(value)


def aot_function(fn: Callable, *, fw_compiler: Callable, bw_compiler: Callable, partition_fn: Callable,
                 decompositions: dict | None = None) -> Callable:
    """AOTAutograd over a plain function of tensors (no Dynamo): for tests and offline planning."""
    from torch._functorch.aot_autograd import aot_function as _aot_function

    kwargs: dict[str, Any] = dict(fw_compiler=fw_compiler, bw_compiler=bw_compiler, partition_fn=partition_fn)
    if decompositions is not None:
        kwargs["decompositions"] = decompositions
    return _aot_function(fn, **_accepted(_aot_function, kwargs))


def must_be_in(node: fx.Node) -> str | None:
    """"forward" / "backward" when torch's partitioner pins the node to that graph (mutations, tags), else None."""
    in_forward = getattr(_partitioners, "_must_be_in_forward", None)
    in_backward = getattr(_partitioners, "_must_be_in_backward", None)
    if in_backward is not None and in_backward(node):
        return "backward"
    if in_forward is not None and in_forward(node):
        return "forward"
    return None


def survives_dead_code_elimination(node: fx.Node) -> bool:
    """Whether ``Graph.eliminate_dead_code`` keeps ``node`` although nothing uses it, judged as it judges now:
    random ops count as impure unless running under a Dynamo compile with Inductor's ``fallback_random`` off."""
    impure_random = True
    import torch._guards

    if torch._guards.TracingContext.try_get():
        from torch._inductor import config as inductor_config

        impure_random = bool(inductor_config.fallback_random)
    try:
        return bool(node.is_impure(impure_random))
    except TypeError:  # an older Node.is_impure without the argument
        return bool(node.is_impure())


def is_backward_seed(node: fx.Node) -> bool:
    """A placeholder carrying the backward's RNG seed/offset (functionalized RNG): an input of backward."""
    check = getattr(_partitioners, "_is_bwd_seed_offset", None)
    return bool(check(node)) if check is not None else False


# --- recompute solvers (added by the planner) ---

def activation_memory_budget(fraction: float):
    """A context in which torch's min-cut partitioner runs its knapsack under ``activation_memory_budget``
    = ``fraction`` (0 = recompute all it may, 1 = its default cut)."""
    from torch._functorch import config as functorch_config

    return functorch_config.patch(activation_memory_budget=fraction)


# --- pipeline: joint-graph canonicalization and copies ---

def canonicalize_joint(joint: fx.GraphModule) -> fx.GraphModule:
    """Dead-code elimination and common-subexpression elimination, as torch's min-cut partitioner does first,
    so every solver sees (and every plan names nodes of) the same graph torch's own would."""
    from torch._functorch import config as functorch_config
    from torch._functorch.compile_utils import fx_graph_cse

    joint.graph.eliminate_dead_code()
    if functorch_config.cse:
        joint.graph = fx_graph_cse(joint.graph)
    joint.recompile()
    return joint


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph (same node names, meta shallow-copied, same submodules),
    for running a torch partitioner that rewrites its input graph in place."""
    graph = fx.Graph(owning_module=gm)
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def reorder_backward_like_autograd(bw: fx.GraphModule) -> fx.GraphModule:
    """Move each recomputed forward op to just before its first backward use (torch's partitioners do the
    same), instead of recomputing everything at the start of backward and holding it all."""
    return _partitioners.reordering_to_mimic_autograd_engine(bw)


def boxed_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose generated code takes one list of inputs and clears it (torch's boxed calling
    convention), so each input, like every intermediate, is freed right after its last use: the memory
    behaviour of Inductor's code and of ``GraphRunner``, at the speed of generated Python."""
    boxed = copy_graph_module(gm)
    boxed.graph.set_codegen(_boxed_codegen())
    boxed.recompile()
    return boxed


def _boxed_codegen() -> fx.graph.CodeGen:
    if hasattr(fx.graph, "_BoxedCodeGen"):
        return fx.graph._BoxedCodeGen()

    class BoxedCodeGen(fx.graph.CodeGen):  # torch releases without _BoxedCodeGen: the same header by hand
        def gen_fn_def(self, free_vars, maybe_return_annotation, **kwargs):
            names = [v.split(":")[0].split("=")[0].strip() for v in free_vars if v != "self"]
            lines = [f"def forward(self, args_list){maybe_return_annotation}:", "    args_iter = iter(args_list)"]
            lines += [f"    {name} = next(args_iter)" for name in names] + ["    args_list.clear()"]
            return "\n".join(lines)

    return BoxedCodeGen()


# Dispatcher internals for ops that skip the C++ -> Python round trip when nothing is watching (kernels/nf4.py).
_KEY = torch._C.DispatchKey
_DEFAULT_TLS_INCLUDE = torch._C.DispatchKeySet(_KEY.BackendSelect).add(_KEY.ADInplaceOrView)
PLAIN_TENSOR_KEYSETS = tuple(
    torch._C.DispatchKeySet(backend).add(_KEY.ADInplaceOrView).add(autograd).add(autocast)
    for backend, autograd, autocast in ((_KEY.CUDA, _KEY.AutogradCUDA, _KEY.AutocastCUDA),
                                        (_KEY.CPU, _KEY.AutogradCPU, _KEY.AutocastCPU)))
dispatch_keys = torch._C._dispatch_keys  # a tensor's DispatchKeySet
below_autograd = torch._C._AutoDispatchBelowAutograd  # context: run an op's kernel below the Autograd key


def redispatch_after_inplace_or_view(op: Any, keyset: Any, *args: Any) -> Any:
    """Call ``op``'s kernels below the ADInplaceOrView key (an in-place op's version-counter kernel, which
    torch.library.custom_op registers for mutating ops and a low-level registration writes itself)."""
    return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)


def plain_dispatch_context() -> bool:
    """No dispatch mode, functorch transform, tracer or profiler is active on this thread: the TLS include set is
    the default one (if a torch release changes the default, this answers False and callers take the slow path),
    and the profiler is off (the dispatcher's RecordFunction is what names custom ops in profiler traces)."""
    return torch._C._dispatch_tls_local_include_set() == _DEFAULT_TLS_INCLUDE and not torch.autograd._profiler_enabled()


def plain_tensors(first: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Every tensor argument (None aside) is an ordinary dense CPU/CUDA tensor, all of one device type (no
    subclass, wrapper, meta or inference tensor)."""
    keys = dispatch_keys(first)
    if keys not in PLAIN_TENSOR_KEYSETS:
        return False
    return all(tensor is None or dispatch_keys(tensor) == keys for tensor in others)


def dynamo_control_exceptions() -> tuple[type[BaseException], ...]:
    """Exceptions Dynamo raises through a backend to steer its own analysis (restart the trace, e.g. to turn a
    float into a tensor under dynamic shapes; skip the frame): a backend must let them through."""
    from torch._dynamo import exc

    return tuple(getattr(exc, name) for name in ("RestartAnalysis", "SkipFrame") if hasattr(exc, name))


def current_cuda_device() -> int:
    """The current CUDA device's index, without ``torch.cuda.current_device``'s Python wrapper (per launch)."""
    return torch._C._cuda_getDevice()


def current_raw_stream(device: int) -> int:
    """The current CUDA stream of ``device`` as the raw handle a Triton launcher takes (what Inductor's
    generated launchers pass, through ``torch._C._cuda_getCurrentRawStream``)."""
    return torch._C._cuda_getCurrentRawStream(device)
