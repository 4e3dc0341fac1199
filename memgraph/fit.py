"""``memgraph fit``: the longest sequence that trains within a memory size, for any HF model, without a GPU.

    memgraph fit --model llama3-8b --memory RTX4090-24GB --weights nf4 --lora 16
    memgraph.fit("llama3-8b", "24GiB", weights="nf4").table()

How: the model is built on the meta device (``sources.training_model``) and its training step captured once with
the batch and sequence dimensions dynamic, with the rewrites the GPU would run (fused attention, NF4, chunked
cross-entropy). The cost model's peak of the leanest plans (layer checkpointing; recompute all that may be) is a
sympy expression in both; for each batch size the longest sequence whose peak, plus the optimizer's state,
stays within the memory is read off it exactly (``MemoryEstimate.max_size``). That answer is then checked by one
concrete plan: the ``ilp`` solver plans the step at exactly that batch and length under the memory, which also
gives the breakdown and the predicted tokens/s of the best plan there. Unless ``offload="off"``, the leanest plans
include layer checkpointing with each layer's input hidden state in host memory (``offload-layers``), bounded
by ``offload_budget`` (default: half of this machine's available host memory); where that plan gives the answer,
it is the one checked.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Iterable, Sequence

import torch

from memgraph.errors import InfeasibleBudgetError, MemgraphError
from memgraph.options import OPTIMIZER_STATES
from memgraph.progress import progress_bar
from memgraph.units import GIB, gib, parse_bytes

__all__ = ["fit", "FitResult", "FitRow", "GPU_PRESETS", "resolve_memory"]

# Memory the CUDA allocator can hand out on common GPUs (the card's total as torch reports it, less ~1 GiB for the
# CUDA context, cuBLAS workspaces and allocator slack that max_memory_allocated does not count).
_CONTEXT_BYTES = 2**30
GPU_PRESETS: dict[str, int] = {name: mib * 2**20 - _CONTEXT_BYTES for name, mib in {
    "H200-141GB": 143771, "H100-80GB": 81559, "A100-80GB": 81920, "A100-40GB": 40960, "L40S-48GB": 46068,
    "A6000-48GB": 49140, "RTX4090-24GB": 24564, "RTX3090-24GB": 24576, "L4-24GB": 23034, "A10G-24GB": 23028,
    "RTX4080-16GB": 16376, "T4-16GB": 15360,
}.items()}
# State tensors per trainable parameter, by optimizer (those of the backend's ``optimizer`` option).
OPTIMIZERS = {name: count for name, count in OPTIMIZER_STATES.items() if name != "none"}
CAPTURE_BATCH, CAPTURE_SEQ = 2, 256  # the dynamic capture's sizes (distinct, so each symbol is known by its hint)


def resolve_memory(memory: Any) -> tuple[int, str]:
    """(bytes, label) of a memory size, a GPU preset name, or None (this machine's GPU)."""
    if memory is None:
        if not torch.cuda.is_available():
            raise MemgraphError(f"no GPU here: pass a memory size (e.g. '24GiB') or a GPU preset, one of "
                                f"{list(GPU_PRESETS)}")
        total = torch.cuda.get_device_properties(0).total_memory
        return total - _CONTEXT_BYTES, f"{torch.cuda.get_device_name(0)} (this machine)"
    if isinstance(memory, str):
        preset = {name.lower(): name for name in GPU_PRESETS}.get(memory.strip().lower())
        if preset is not None:
            return GPU_PRESETS[preset], preset
    try:
        size = parse_bytes(memory, name="memory")
    except MemgraphError as error:
        raise MemgraphError(f"{error}; or a GPU preset, one of {list(GPU_PRESETS)}") from None
    if size is None:
        raise MemgraphError(f"memory must be a size or a GPU preset, one of {list(GPU_PRESETS)}")
    return size, gib(size)


@dataclasses.dataclass
class FitRow:
    """The answer for one batch size: ``max_seq`` tokens per sequence (0: not even one token fits)."""

    batch: int
    max_seq: int
    limited_by: str  # "memory" or "max_position_embeddings"
    peak_bytes: int | None = None  # predicted step peak + optimizer state at max_seq, of the best plan there
    breakdown: dict[str, int] = dataclasses.field(default_factory=dict)
    tok_s: float | None = None
    plan: str | None = None
    checked: bool = False  # a concrete ilp plan at (batch, max_seq) fits the memory


@dataclasses.dataclass
class FitResult:
    model: str
    memory_bytes: int
    memory_label: str
    setup: dict[str, Any]
    rows: list[FitRow]
    seconds: float
    curves: dict[str, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)  # plan -> (seq, peak)

    def table(self) -> str:
        lines = [f"{self.model} ({self.setup['weights']}, "
                 f"{'LoRA r=' + str(self.setup['lora']) if self.setup['lora'] else 'full fine-tuning'}, "
                 f"kv_bits={self.setup['kv_bits']}) within {self.memory_label} ({gib(self.memory_bytes)}):", "",
                 "| batch | max seq | tokens | predicted peak | weights | saved | temporaries | cross-entropy | "
                 "optimizer | predicted tok/s | plan |", "|" + "---|" * 11]
        for row in self.rows:
            b = row.breakdown
            cells = [row.batch, f"{row.max_seq:,}" + (" (max positions)" if row.limited_by != "memory" else ""),
                     f"{row.batch * row.max_seq:,}", gib(row.peak_bytes), gib(b.get("weights")), gib(b.get("saved")),
                     gib(b.get("temporaries")), gib(b.get("cross_entropy")), gib(b.get("optimizer_state")),
                     f"{row.tok_s:,.0f}" if row.tok_s else "-", row.plan or "-"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        if self.setup.get("embedding_in_host_memory_bytes"):
            lines += ["", f"The frozen input embedding ({gib(self.setup['embedding_in_host_memory_bytes'])}) is "
                          "planned in host memory: apply memgraph.offload_embeddings_(model) before torch.compile "
                          "(offload='off' plans it on the GPU)."]
        proven = _longest_proven_mask()
        if any(row.max_seq > proven for row in self.rows) and self.setup.get("rewrites") is not False:
            lines += ["", f"Note: the attention rewrite proves a mask equal to its fused pattern by evaluating it: "
                          "HF's masks (built from broadcast index vectors) block by block of query rows at any "
                          f"length, any other mask whole, up to length {proven:,} with this machine's free host "
                          "memory. Beyond that such a mask falls back to SDPA with its mask (more memory than "
                          "predicted here) or, compiled with dynamic shapes, stops with an error."]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kwargs)

    def plot(self, path: str) -> str:
        """Predicted peak vs sequence length (batch 1) for each plan, the memory line and the answers."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(7.5, 4.5))
        for name, points in self.curves.items():
            if points:
                axes.plot([p[0] for p in points], [p[1] / GIB for p in points], label=name)
        axes.axhline(self.memory_bytes / GIB, color="black", linestyle="--", label=f"memory: {self.memory_label}")
        for row in self.rows:
            if row.batch == 1 and row.max_seq and row.peak_bytes:
                axes.plot([row.max_seq], [row.peak_bytes / GIB], "k*", markersize=12, label=f"fit: {row.max_seq:,}")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("sequence length (batch 1)")
        axes.set_ylabel("predicted peak + optimizer state (GiB)")
        axes.set_title(f"{self.model}: what fits in {self.memory_label}")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path


def _longest_proven_mask() -> int:
    from memgraph.passes.attention import mask_elements_limit

    return math.isqrt(mask_elements_limit())


def fit(model: str, memory: Any = None, *, batches: Sequence[int] = (1, 2, 4, 8), weights: str = "nf4",
        lora: int | None = 16, optimizer: str = "adamw", max_seq: int | None = None, progress: bool = True,
        host_embedding: bool | None = None, **options: Any) -> FitResult:
    """The longest sequence per batch size that trains ``model`` (a model source, see ``memgraph.sources``)
    within ``memory`` (bytes, a size string, a GPU preset name, or None for this machine's GPU). ``options``:
    backend options (kv_bits, rewrites, drop_logits, ...). ``max_seq`` caps the search (default: the model's
    max_position_embeddings). ``host_embedding``: plan a frozen input embedding in host memory (what
    ``memgraph.offload_embeddings_`` does to the real model); None: whenever offload is not "off"."""
    from memgraph.capture import capture
    from memgraph.cost_model import graph_costs, solvers
    from memgraph.options import resolve_options
    from memgraph.sources import example_batch, training_model

    started = time.perf_counter()
    if optimizer not in OPTIMIZERS:
        raise MemgraphError(f"optimizer={optimizer!r} is not supported; choose one of {list(OPTIMIZERS)}")
    batches = _batches(batches)
    budget, label = resolve_memory(memory)
    resolved = resolve_options({k: v for k, v in options.items() if k != "memory_budget"})
    bar = progress_bar(3 + len(batches), progress)
    bar.set_description("building the model on the meta device")
    net = training_model(model, weights=weights, lora=lora)
    host_table = _embedding_to_host(net, resolved.offload != "off" if host_embedding is None else host_embedding)
    limit = max_seq or int(getattr(net.config, "max_position_embeddings", 0) or 2**20)
    state_bytes = OPTIMIZERS[optimizer] * sum(p.numel() * p.element_size() for p in net.parameters()
                                              if p.requires_grad)
    bar.update(1)
    bar.set_description("capturing the training step (dynamic batch and length)")
    inputs = example_batch(net, CAPTURE_BATCH, CAPTURE_SEQ)
    (captured,) = _one_graph(capture(net, options=resolved, solvers=("checkpoint",), backward=False,
                                     dynamic_dims={"input_ids": [0, 1], "labels": [0, 1]}, **inputs))
    graph, costs = captured.graph, captured.costs
    batch_symbol, seq_symbol = _symbols(costs.hints)
    bar.update(1)
    bar.set_description("symbolic peaks of the leanest plans")
    leanest = {"checkpoint": costs.indices(captured.plan.saved), "recompute-all": set(costs.save_least)}
    estimates = {name: costs.simulate(saved, symbolic=True) for name, saved in leanest.items()}
    host = _offload_layers(costs, leanest["checkpoint"], estimates, resolved)
    rows = []
    bar.update(1)
    for batch in batches:
        bar.set_description(f"batch {batch}: longest sequence, then an ilp plan there")
        longest, best = 0, None
        for name, estimate in estimates.items():
            at = {str(batch_symbol): batch}
            found = estimate.max_size(str(seq_symbol), budget - state_bytes, at=at)
            found = limit if found == math.inf else int(found)
            if name == "offload-layers":  # the layer inputs must also fit in host memory
                found = min(found, _longest_within(host.bytes, host.budget, str(seq_symbol), at, limit))
            if found > longest:
                longest, best = found, name
        row = FitRow(batch, min(longest, limit), "memory" if longest < limit else "max_position_embeddings")
        if row.max_seq:
            _check(row, graph, resolved, budget, state_bytes, {str(batch_symbol): batch, str(seq_symbol): row.max_seq},
                   solvers, graph_costs, host if best == "offload-layers" else None)
        rows.append(row)
        bar.update(1)
    bar.close()
    curves = _curves(estimates, graph, costs, seq_symbol, batch_symbol, state_bytes,
                     max(rows[0].max_seq if rows else 1024, 1024))
    setup = {**resolved.to_dict(), "weights": weights, "lora": lora, "optimizer": optimizer,
             "optimizer_state_bytes": state_bytes, "embedding_in_host_memory_bytes": host_table}
    return FitResult(model, budget, label, setup, rows, time.perf_counter() - started, curves)


def _embedding_to_host(net, wanted: bool) -> int:
    """Keep a frozen input embedding in host memory (``memgraph.offload_embeddings_``: the user applies it to the
    real model); the bytes moved there, 0 when it stays."""
    from memgraph.embeddings import offload_embeddings_

    if not wanted:
        return 0
    host = offload_embeddings_(net)
    return host.weight.numel() * host.weight.element_size() if host is not None else 0


@dataclasses.dataclass
class _HostOffload:
    """Offload in ``fit``: the host bytes of the layer inputs (an expression in the sizes) and what may hold them."""

    bytes: Any = 0
    budget: int = 0


def _offload_layers(costs, checkpoint_saved: set[int], estimates: dict, options) -> _HostOffload | None:
    """Add Unsloth's recipe (layer checkpointing with each layer's input in host memory) to the leanest plans,
    unless ``options.offload`` is "off" (fit plans for a GPU, so "auto" offloads)."""
    from memgraph.cost_model.solvers.offload import layer_inputs
    from memgraph.cost_model.transfers import default_offload_budget

    if options.offload == "off":
        return None
    offloaded = {i for i in layer_inputs(costs) if i in checkpoint_saved and i in costs.offloadable}
    if not offloaded:
        return None
    estimates["offload-layers"] = costs.simulate(checkpoint_saved, offloaded=offloaded, symbolic=True)
    budget = options.offload_budget if options.offload_budget is not None else default_offload_budget()
    return _HostOffload(sum((costs.output_bytes_expr(i) for i in offloaded), 0), budget)


def _longest_within(expression: Any, budget: int, symbol: str, at: dict[str, int], limit: int) -> int:
    """The largest ``symbol`` <= limit at which ``expression`` (bytes, growing with it) stays within ``budget``."""
    import sympy

    from memgraph.cost_model.sizing import largest_fitting

    expression = sympy.sympify(expression)
    names = {str(s): s for s in expression.free_symbols}
    values = {names[k]: v for k, v in at.items() if k in names}
    found = largest_fitting(expression, names.get(symbol, sympy.Symbol(symbol)), budget, values, lower=0)
    return limit if found == math.inf else min(int(found), limit)


def _check(row: FitRow, graph, options, budget: int, state_bytes: int, sizes: dict[str, int], solvers,
           graph_costs, host: _HostOffload | None = None) -> None:
    """Plan the step at exactly (batch, max_seq) under the memory: the breakdown and tokens/s there. ``ilp``
    (keep or recompute), or where the answer came from offloading the layer inputs, that plan itself (solving
    the offload search at every batch size would take minutes on an 8B graph)."""
    costs = graph_costs(graph, sizes=sizes, offload_budget=host.budget if host is not None else None,
                        codegen=options.codegen, cudagraphs=options.cudagraphs)
    try:
        if host is not None:
            plan = solvers.get("offload-layers").function(graph, costs, budget - state_bytes)
        else:
            plan = solvers.get("ilp").function(graph, costs, budget - state_bytes)
    except InfeasibleBudgetError:
        return  # the symbolic answer's plan is leaner than any the solver reaches: report it unchecked
    estimate = costs.estimate(plan)
    breakdown = dict(estimate.breakdown)
    scratch = [costs.values[i].scratch for i, node in enumerate(costs.nodes)
               if node.op == "call_function" and "linear_cross_entropy" in str(node.target)]
    from memgraph.cost_model.symbolic import evaluate

    breakdown["cross_entropy"] = sum(evaluate(s, costs.hints) for s in scratch)  # within temporaries
    breakdown["optimizer_state"] = state_bytes
    step_seconds = float(sum(costs.seconds)) + plan.recompute_seconds + (plan.transfer_seconds or 0.0)
    row.peak_bytes = int(estimate.peak_bytes_hint) + state_bytes
    described = f"{plan.solver} ({len(plan.recomputed)} recomputed"
    if plan.offloaded:
        breakdown["host"] = plan.host_bytes
        described += f", {len(plan.offloaded)} offloaded: {gib(plan.host_bytes)} host"
    row.breakdown, row.plan, row.checked = breakdown, described + ")", True
    row.tok_s = row.batch * row.max_seq / step_seconds if step_seconds > 0 else None


def _curves(estimates, graph, costs, seq_symbol, batch_symbol, state_bytes: int, longest: int):
    """Predicted peak at batch 1 along sequence lengths, for the leanest plans and the fastest (save-everything)."""
    estimates = {**estimates, "save-everything": costs.simulate(costs.save_all, symbolic=True)}
    lengths = sorted({2**k for k in range(6, 30) if 2**k <= 4 * longest} | {longest})
    return {name: [(n, estimate.peak_at(**{str(seq_symbol): n, str(batch_symbol): 1}) + state_bytes)
                   for n in lengths] for name, estimate in estimates.items()}


def _one_graph(captured: list) -> list:
    if len(captured) != 1:
        raise MemgraphError(f"the training step compiled into {len(captured)} graphs (graph breaks): fit needs one "
                            "graph to read the whole step's peak from; plan the pieces with memgraph.plan instead")
    return captured


def _symbols(hints: dict) -> tuple[Any, Any]:
    by_hint = {value: symbol for symbol, value in hints.items()}
    if CAPTURE_BATCH not in by_hint or CAPTURE_SEQ not in by_hint:
        raise MemgraphError(f"the captured step is not symbolic in both batch and sequence length (sizes "
                            f"{ {str(k): v for k, v in hints.items()} }): the model specialised one of them")
    return by_hint[CAPTURE_BATCH], by_hint[CAPTURE_SEQ]


def _batches(batches: Iterable[int]) -> list[int]:
    values = [int(b) for b in batches]
    if not values or any(b < 1 for b in values):
        raise MemgraphError(f"batches must be positive integers; got {list(batches)}")
    return values
