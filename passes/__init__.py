"""FX graph rewrites that run on Dynamo's graph before AOTAutograd.

A rewrite is a function ``(gm: fx.GraphModule, example_inputs: list, options: memgraph.Options) ->
fx.GraphModule``. It pattern-matches on torch/aten ops (never on HF module class names), replaces what it can
prove equivalent, leaves the rest untouched and logs why. A rewrite that raises is logged and skipped: the
step then runs the unrewritten graph (a fallback, never a crash).

Rewrites are listed in ``REWRITES`` by name; each is imported lazily so a missing optional dependency
(triton, bitsandbytes) only disables that rewrite.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable, Collection

import torch.fx as fx

log = logging.getLogger("memgraph.passes")

# GraphModule attribute where a rewrite leaves what it decided for the user to read (the plan's notes, the report).
REWRITE_NOTES = "_memgraph_rewrite_notes"
# GraphModule attribute where a rewrite leaves checks the compiled graph must run before every call (objects with
# ``check(args)``, e.g. the attention rewrite's dynamic-shape mask guard); the pipeline runs them.
RUNTIME_CHECKS = "_memgraph_runtime_checks"

# name -> "module:function", run in this order (each is a local rewrite: the order changes no result).
REWRITES: dict[str, str] = {
    "attention": "memgraph.passes.attention:rewrite_attention",
    "nf4": "memgraph.passes.nf4:rewrite_bnb_linears",
    "cross_entropy": "memgraph.passes.cross_entropy:rewrite_cross_entropy",
    "lora": "memgraph.passes.lora:rewrite_lora",
}


def _load(spec: str) -> Callable | None:
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:  # the rewrite's module or one of its optional dependencies is missing
        log.info("memgraph: rewrite %s unavailable: %s", spec, error)
        return None
    except Exception as error:  # noqa: BLE001 - a broken rewrite module must not break training
        log.warning("memgraph: rewrite %s failed to load (%s: %s); skipped", spec, type(error).__name__, error)
        return None
    return getattr(module, function_name)


def apply_rewrites(gm: fx.GraphModule, example_inputs: list, options,
                   only: Collection[str] | None = None) -> tuple[fx.GraphModule, list[str]]:
    """Run the available rewrites that ``options.rewrites`` selects (or those named in ``only``) in order; return
    the graph and the names of the rewrites that changed it."""
    if only is None:
        only = options.rewrite_selection()
    unknown = set(only or ()) - set(REWRITES)
    if unknown:
        raise ValueError(f"unknown rewrites {sorted(unknown)}; choose from {list(REWRITES)}")
    applied: list[str] = []
    for name, spec in REWRITES.items():
        if only is not None and name not in only:
            continue
        rewrite = _load(spec)
        if rewrite is None:
            continue
        before = len(gm.graph.nodes), str(gm.graph)
        try:
            gm = rewrite(gm, example_inputs, options)
        except Exception as error:  # noqa: BLE001 - a failing rewrite must not break training
            log.warning("memgraph: rewrite %r failed and was skipped (%s: %s)", name, type(error).__name__, error)
            continue
        if (len(gm.graph.nodes), str(gm.graph)) != before:
            applied.append(name)
    return gm, applied
