"""Compiles that hit torch's caches: memgraph's key, and the plans stored beside the compiled code.

Torch's AOTAutograd and FX-graph caches key compiled code on the Dynamo graph (after memgraph's rewrites: the
fused ops and their arguments, ``kv_bits`` among them), the example inputs' metadata and the compiler config.
memgraph adds its own key to that config: the hash of its options (budget, solver, codegen, ...), of its own
source code and of the cost model's device. A changed option, budget or memgraph version therefore misses the
cache; the same step in a second process hits it and loads the compiled forward and backward without tracing
the joint graph, planning or running Inductor.

A hit skips the partitioner, so no plan would be made: the plan of every compiled graph is stored under
``<torch's cache dir>/memgraph/plans/`` keyed by memgraph's key and the graph, and read back on a hit (the
record then says ``cache="hit"``; its predicted timeline, which needs the joint graph, is absent).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx

from memgraph import _compat
from memgraph.plan import Plan

log = logging.getLogger("memgraph")

# Options that change neither the plan nor the compiled code.
_UNKEYED_OPTIONS = ("report", "cache")
_PACKAGES = ("memgraph", "memgraph.passes", "memgraph.kernels", "memgraph.cost_model")


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """A hash of memgraph's source files: a new memgraph never reuses an old one's plans or code."""
    import importlib

    digest = hashlib.sha256()
    for package in _PACKAGES:
        for directory in importlib.import_module(package).__path__:
            for path in sorted(Path(directory).rglob("*.py")):
                digest.update(str(path.relative_to(directory)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def options_key(options) -> str:
    """memgraph's part of the cache key: options, memgraph's code, the cost model's device."""
    from memgraph.cost_model import DeviceSpec

    settings = {k: v for k, v in options.to_dict().items() if k not in _UNKEYED_OPTIONS}
    document = {"memgraph": code_version(), "options": settings, "device": repr(DeviceSpec())}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:32]


def graph_key(options_hash: str, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """The key of one Dynamo graph's plan: memgraph's key, the graph's code and its inputs' metadata."""
    digest = hashlib.sha256(options_hash.encode())
    digest.update(gm.code.encode())
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            digest.update(repr((tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type,
                                value.requires_grad)).encode())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:32]


def plan_path(key: str) -> Path:
    return Path(_compat.inductor_cache_dir()) / "memgraph" / "plans" / f"{key}.json"


def store_plan(key: str, plan: Plan) -> None:
    path = plan_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(plan.to_json())
        temporary.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as error:  # a read-only cache dir costs the next process its plan report, nothing else
        log.info("memgraph: could not store the plan in the compile cache (%s)", error)


def load_plan(key: str) -> Plan | None:
    try:
        return Plan.from_dict(json.loads(plan_path(key).read_text()))
    except (OSError, ValueError, TypeError):
        return None
