"""Shared helpers of the benchmark scripts: run metadata and the results-file format of DESIGN.md.

Results file: ``{"meta": {hardware, versions, date, command}, "rows": [flat dicts, snake_case keys with units]}``.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - a missing or broken optional package is recorded as absent
        return None


def _installed(distribution: str) -> str | None:
    """An installed distribution's version, without importing it (Unsloth patches transformers on import)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def meta(**extra: Any) -> dict[str, Any]:
    import torch

    hardware: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hardware.update(gpu=props.name, gpu_memory_bytes=props.total_memory, gpu_count=torch.cuda.device_count(),
                        cuda=torch.version.cuda)
    return {
        "hardware": hardware,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "peft": _version("peft"),
            "bitsandbytes": _version("bitsandbytes"),
            "memgraph": _version("memgraph"),
            **{name: _installed(name) for name in ("liger-kernel", "unsloth") if _installed(name)},
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        **extra,
    }


def results_dir() -> Path:
    """Where results go: $OUT if set, else benchmarks/results; without a GPU a temporary folder instead, so a
    CPU smoke run never replaces the committed GPU results."""
    import tempfile

    import torch

    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return RESULTS_DIR if torch.cuda.is_available() else Path(tempfile.gettempdir()) / "memgraph-bench-cpu"


def write_results(name: str, rows: Iterable[dict[str, Any]], out_dir: str | os.PathLike | None = None,
                  **extra_meta: Any) -> Path:
    """Write ``NAME.json`` into ``out_dir`` (default: ``results_dir()``)."""
    out = Path(out_dir or results_dir())
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"meta": meta(**extra_meta), "rows": list(rows)}, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def print_table(rows: list[dict[str, Any]]) -> None:
    """A markdown table of the rows (the last thing a GPU run prints)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |")


@contextlib.contextmanager
def _timing_lock(mode_name: str):
    import fcntl

    with open(os.environ.get("BENCH_TIMING_LOCK", "/tmp/memgraph-gpu-timing.lock"), "w") as handle:
        fcntl.flock(handle, getattr(fcntl, mode_name))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def exclusive_gpu_timing():
    """Hold a machine-wide lock while timing, so benchmark processes sharing one GPU (compiling and planning
    concurrently to save device time) never time their steps at the same moment."""
    return _timing_lock("LOCK_EX")


def untimed_gpu_work():
    """Shared side of the timing lock: untimed GPU work (model build, capture) of several processes may overlap,
    but never another process's timed steps."""
    return _timing_lock("LOCK_SH")
