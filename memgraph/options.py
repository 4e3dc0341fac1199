"""Typed, validated options of the memgraph backend.

Options reach the backend three ways, in this order of precedence:
``torch.compile(..., options={...})`` > ``memgraph.config`` (module-level defaults) >
``MEMGRAPH_*`` environment variables > the built-in defaults below. Every source is validated the same
way; unknown keys and bad values raise ``ValueError`` naming the valid choices.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from memgraph.errors import MemgraphError
from memgraph.kernels.kv_quant import KV_BITS
from memgraph.units import parse_bytes

__all__ = ["Options", "parse_bytes", "resolve_options", "ENV_PREFIX", "CODEGENS", "KV_BITS", "OFFLOAD_MODES",
           "OPTIMIZER_STATES"]

ENV_PREFIX = "MEMGRAPH_"
# MEMGRAPH_* variables that are process-wide switches, not Options fields (read where they act).
ENV_SWITCHES = {
    "MEMGRAPH_FAST_LAUNCH": "0: launch memgraph's Triton kernels through Triton's own path (kernels/_launch.py)",
}
CODEGENS = ("inductor", "eager")  # the first is the default
OFFLOAD_MODES = ("auto", "on", "off")  # the first is the default
# State tensors an optimizer keeps per trainable parameter (in the parameter's dtype); "none": not counted.
OPTIMIZER_STATES = {"none": 0, "adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}

@dataclasses.dataclass(frozen=True)
class Options:
    """What the backend does. See README's options table.

    memory_budget: predicted peak bytes the step must fit in; None = the fastest plan.
    solver: name of a registered recompute solver (``memgraph.cost_model.solvers.available()``).
    kv_bits: bits of the K/V that attention keeps for backward (16 = exact); an attention the plan recomputes
    keeps none, and runs at 16 bits where the plan still fits (``passes.recomputed_attention``).
    codegen: "inductor" compiles the planned graphs; "eager" runs them as FX (for debugging).
    report: path stem for a JSON (+ PNG) report of each compiled graph's plan, or None.
    rewrites: which graph rewrites run before planning: True (all of ``memgraph.passes.REWRITES``), False
    (none), or some of their names ("nf4", ["attention"], "attention,nf4").
    drop_logits: with the cross-entropy rewrite, ``outputs.logits`` is an empty tensor (what training needs;
    HF ``Trainer`` never reads logits in training, TRL's token-accuracy metric does); False keeps them, in the
    model's dtype, without gradient.
    cache: reuse compiled code and plans from torch's compile caches (keyed by these options and memgraph's
    version, see ``compile_cache.py``); False compiles and plans every time.
    offload: whether budget-aware solvers may keep saved values in host memory between forward and backward:
    "auto" (for graphs on a CUDA device), "on" (also on a CPU, where the copies are plain host copies: for
    tests), "off".
    offload_budget: host bytes offloaded values may occupy (a size); None: half the host memory available
    when the graph is planned.
    cudagraphs: replay the compiled graphs from CUDA graphs (Inductor's cudagraph trees; needs
    codegen="inductor"): a step costs the host a few launches instead of one Python call per op. Offloaded
    values are captured too (host buffers a captured graph copies into stay allocated for the life of the
    process); the host-memory embedding runs between captured parts.
    optimizer: the optimizer whose state (per trainable parameter of the graph) ``memory_budget`` also holds:
    one of ``OPTIMIZER_STATES``; "none" (default): the budget is the compiled step's alone. Each graph leaves
    out its own parameters' state: after a graph break, lower the budget by the other graphs' state.
    """

    memory_budget: int | None = None
    solver: str = "mincut"
    kv_bits: int = 16
    codegen: str = CODEGENS[0]
    report: str | None = None
    rewrites: bool | tuple[str, ...] = True
    drop_logits: bool = False
    cache: bool = True
    offload: str = OFFLOAD_MODES[0]
    offload_budget: int | None = None
    cudagraphs: bool = False
    optimizer: str = "none"

    def __post_init__(self) -> None:
        from memgraph.cost_model import solvers as registry

        object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))
        object.__setattr__(self, "offload_budget", parse_bytes(self.offload_budget, name="offload_budget"))
        if self.offload not in OFFLOAD_MODES:
            raise MemgraphError(f"offload={self.offload!r} is not supported; choose one of {list(OFFLOAD_MODES)}")
        solvers = registry.available()
        if self.solver not in solvers:
            raise MemgraphError(f"solver={self.solver!r} is not a registered solver; choose one of {list(solvers)}")
        if isinstance(self.kv_bits, bool) or self.kv_bits not in KV_BITS:
            raise MemgraphError(f"kv_bits={self.kv_bits!r} is not supported; choose one of {list(KV_BITS)}")
        if self.codegen not in CODEGENS:
            raise MemgraphError(f"codegen={self.codegen!r} is not supported; choose one of {list(CODEGENS)}")
        if self.report is not None and not isinstance(self.report, (str, os.PathLike)):
            raise MemgraphError(f"report must be a path or None; got {self.report!r}")
        object.__setattr__(self, "rewrites", _rewrite_names(self.rewrites))
        for name in ("drop_logits", "cache", "cudagraphs"):
            if not isinstance(getattr(self, name), bool):
                raise MemgraphError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise MemgraphError(f"optimizer={self.optimizer!r} is not supported; choose one of "
                                f"{list(OPTIMIZER_STATES)}")
        if self.cudagraphs and self.codegen != "inductor":
            raise MemgraphError(f"cudagraphs=True needs codegen='inductor' (CUDA graphs capture Inductor's code); "
                                f"got codegen={self.codegen!r}")
        if self.memory_budget is not None:
            if not registry.uses_budget(self.solver):
                budgeted = [n for n in solvers if registry.uses_budget(n)]
                raise MemgraphError(
                    f"solver={self.solver!r} does not plan under a memory_budget; "
                    + (f"use one of {budgeted}" if budgeted else "no budget-aware solver is installed yet")
                    + " or leave memory_budget=None"
                )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str = "options") -> "Options":
        unknown = sorted(set(mapping) - set(cls.field_names()))
        if unknown:
            raise MemgraphError(f"unknown {source} key(s) {unknown}; valid keys are {list(cls.field_names())}")
        return cls(**mapping)

    def rewrite_selection(self) -> tuple[str, ...] | None:
        """The rewrites to run for ``passes.apply_rewrites``: None means all of them."""
        if self.rewrites is True:
            return None
        return () if self.rewrites is False else self.rewrites

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rewrite_names(value: Any) -> bool | tuple[str, ...]:
    from memgraph.passes import REWRITES

    if isinstance(value, bool):
        return value
    names = value.split(",") if isinstance(value, str) else value
    try:
        names = tuple(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
    except TypeError:
        raise MemgraphError(f"rewrites must be True, False or rewrite names from {list(REWRITES)}; "
                            f"got {value!r}") from None
    unknown = [n for n in names if n not in REWRITES]
    if unknown:
        raise MemgraphError(f"unknown rewrites {unknown}; choose from {list(REWRITES)} (or True/False)")
    return names


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce_env(name: str, text: str) -> Any:
    field_type = {f.name: f.type for f in dataclasses.fields(Options)}[name]
    if name == "kv_bits":
        try:
            return int(text)
        except ValueError:
            raise MemgraphError(f"{ENV_PREFIX}KV_BITS={text!r} is not supported; choose one of {list(KV_BITS)}") from None
    if name in ("rewrites", "drop_logits", "cache", "cudagraphs"):
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        if name != "rewrites":
            raise MemgraphError(f"{ENV_PREFIX}{name.upper()}={text!r}: use 1/0, true/false, yes/no, on/off")
        try:
            return _rewrite_names(text)
        except MemgraphError as error:
            raise MemgraphError(f"{ENV_PREFIX}REWRITES={text!r}: {error}; or use 1/0, true/false, yes/no, "
                                "on/off") from None
    if "None" in str(field_type) and text.strip().lower() in ("", "none"):
        return None
    return text


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``MEMGRAPH_*`` variables that name Options fields (others starting with the prefix are errors)."""
    environ = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    names = Options.field_names()
    for key, text in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if key in ENV_SWITCHES:
            continue
        if name not in names:
            valid = [ENV_PREFIX + n.upper() for n in names] + sorted(ENV_SWITCHES)
            raise MemgraphError(f"unknown environment variable {key}; valid ones are {valid}")
        found[name] = _coerce_env(name, text)
    return found


def resolve_options(options: Mapping[str, Any] | Options | None = None, **overrides: Any) -> Options:
    """Merge options > memgraph.config > environment > defaults, validating every layer's keys."""
    from memgraph import config

    if isinstance(options, Options):
        explicit = options.to_dict()
    else:
        explicit = dict(options or {})
        unknown = sorted(set(explicit) - set(Options.field_names()))
        if unknown:
            raise MemgraphError(f"unknown option(s) {unknown}; valid options are {list(Options.field_names())}")
    explicit.update(overrides)
    merged: dict[str, Any] = {}
    merged.update(env_settings())
    merged.update(config.settings())
    merged.update(explicit)
    return Options.from_mapping(merged)
