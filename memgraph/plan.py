"""``Plan``: what a solver decided for one training graph — the data type between planning and partition."""
from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class Plan:
    """Which forward values backward gets by keeping them (``saved``) and which by recomputing (``recomputed``);
    ``offloaded`` (a subset of ``saved``) wait in host memory between forward and backward.

    Node names refer to the joint forward+backward graph the plan was made for. Predicted figures come from
    the cost model and are None where it was not run: ``host_bytes`` (host memory of the offloaded values),
    ``transfer_seconds`` (time the copies are predicted to add, i.e. not hidden behind compute) and, in
    ``details["transfers"]``, where each copy and wait goes.
    """

    solver: str
    saved: list[str]
    recomputed: list[str]
    peak_bytes: int | None = None
    recompute_seconds: float | None = None
    budget_bytes: int | None = None
    solve_seconds: float | None = None
    optimality_gap: float | None = None
    offloaded: list[str] = dataclasses.field(default_factory=list)
    host_bytes: int | None = None
    transfer_seconds: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """The plan ``to_dict`` wrote (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), default=str, **kwargs)

    def summary(self) -> str:
        from memgraph.units import gib

        parts = [f"solver={self.solver}", f"saved={len(self.saved)}", f"recomputed={len(self.recomputed)}",
                 f"predicted peak={gib(self.peak_bytes)}"]
        if self.recompute_seconds is not None:
            parts.append(f"recompute={self.recompute_seconds * 1e3:.3f} ms")
        if self.offloaded:
            parts.append(f"offloaded={len(self.offloaded)} ({gib(self.host_bytes)} host, "
                         f"+{(self.transfer_seconds or 0) * 1e3:.3f} ms exposed)")
        if self.budget_bytes is not None:
            parts.append(f"budget={gib(self.budget_bytes)}")
        return "Plan(" + ", ".join(parts) + ")"

    @classmethod
    def merge(cls, plans: list["Plan"]) -> "Plan":
        """One plan for a step made of several compiled graphs (graph breaks): names are prefixed by graph index."""
        if len(plans) == 1:
            return plans[0]
        if not plans:
            raise ValueError("no plan to merge: nothing was compiled for training (was the model run with grads?)")
        peaks = [p.peak_bytes for p in plans]
        costs = [p.recompute_seconds for p in plans]
        return cls(
            solver=plans[0].solver,
            saved=[f"g{i}.{n}" for i, p in enumerate(plans) for n in p.saved],
            recomputed=[f"g{i}.{n}" for i, p in enumerate(plans) for n in p.recomputed],
            offloaded=[f"g{i}.{n}" for i, p in enumerate(plans) for n in p.offloaded],
            host_bytes=sum(p.host_bytes or 0 for p in plans),
            transfer_seconds=sum(p.transfer_seconds or 0.0 for p in plans),
            peak_bytes=None if None in peaks else max(peaks),
            recompute_seconds=None if None in costs else sum(costs),
            budget_bytes=plans[0].budget_bytes,
            notes=[f"merged from {len(plans)} graphs (graph breaks)"] + [n for p in plans for n in p.notes],
            details={"parts": [p.to_dict() for p in plans]},
        )
