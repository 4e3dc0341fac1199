"""Per-graph report: ``{stem}.graph{id}.json`` (options, rewrites, plan, predicted memory) and
``{stem}.graph{id}.png`` (the predicted memory timeline)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("memgraph")


def report_dict(record) -> dict[str, Any]:
    """The JSON content for one ``GraphRecord``."""
    options = record.options.to_dict() if hasattr(record.options, "to_dict") else dict(record.options or {})
    estimate = record.estimate
    return {
        "graph_id": record.graph_id,
        "options": options,
        "rewrites": list(record.rewrites),
        "rewrite_notes": list(getattr(record, "notes", ())),
        "cache": getattr(record, "cache", None),
        "fallback": record.fallback,
        "plan": record.plan.to_dict() if record.plan is not None else None,
        "estimate": estimate.summary() if estimate is not None and hasattr(estimate, "summary") else None,
    }


def write_report(record, stem: str) -> tuple[Path, Path | None]:
    """Write the JSON (and, when an estimate exists, the PNG timeline) for one compiled graph."""
    base = Path(stem)
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path = base.parent / f"{base.name}.graph{record.graph_id}.json"
    json_path.write_text(json.dumps(report_dict(record), indent=2, default=str) + "\n")
    png_path = None
    if record.estimate is not None and hasattr(record.estimate, "plot"):
        png_path = base.parent / f"{base.name}.graph{record.graph_id}.png"
        plan = record.plan
        title = f"graph {record.graph_id}: solver {plan.solver if plan else '?'}"
        try:
            record.estimate.plot(str(png_path), title=title)
        except Exception as error:  # noqa: BLE001 - a missing plotting backend must not fail the compile
            log.warning("memgraph: could not draw %s (%s: %s)", png_path, type(error).__name__, error)
            png_path = None
    log.info("memgraph: report written to %s", json_path)
    return json_path, png_path
