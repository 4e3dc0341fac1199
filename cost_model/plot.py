"""Timeline plot of a MemoryEstimate: bytes live per step, stacked by category, the forward/backward boundary,
the peak and offload's transfers marked; a measured trace (bytes per step from a real run) is drawn over it."""
from __future__ import annotations

from typing import Sequence

from memgraph.cost_model.memory import CATEGORIES

_COLORS = {"weights": "#4c72b0", "inputs": "#8172b2", "saved": "#dd8452", "outputs": "#937860",
           "grads": "#55a868", "temporaries": "#c44e52"}


def plot_estimate(estimate, path: str, *, measured: Sequence[int] | None = None, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    top = max(int(estimate.peak_bytes_hint), int(max(measured)) if measured is not None and len(measured) else 0)
    unit, scale = ("GiB", 2.0**30) if top >= 2**30 else ("MiB", 2.0**20)
    steps = np.arange(len(estimate.names))
    figure, axes = plt.subplots(figsize=(12, 5), dpi=110)
    if len(steps):
        stacked = [estimate.live[:, i] / scale for i in range(len(CATEGORIES))]
        axes.stackplot(steps, *stacked, labels=CATEGORIES, colors=[_COLORS[c] for c in CATEGORIES],
                       alpha=0.85, step="post")
        axes.plot(steps, estimate.during / scale, color="black", linewidth=0.7, drawstyle="steps-post",
                  label="predicted, while a node runs")
        peak = estimate.peak_index
        peak_value = estimate.during[peak] / scale
        axes.scatter([peak], [peak_value], color="black", zorder=5, s=18)
        right = peak > 0.7 * len(steps)
        axes.annotate(f"predicted peak {peak_value:.3f} {unit}\n{estimate.peak_node} ({estimate.peak_phase})",
                      (peak, peak_value), textcoords="offset points", xytext=(-10 if right else 10, 6),
                      ha="right" if right else "left", va="bottom", fontsize=8)
    _mark_transfers(axes, estimate.names)
    if measured is not None and len(measured):
        values = np.asarray(measured, dtype=float) / scale
        axes.plot(np.arange(len(values)), values, color="magenta", linewidth=1.0, drawstyle="steps-post",
                  label=f"measured (peak {values.max():.3f} {unit})")
    axes.set_ylim(0, top / scale * 1.15 if top else 1)
    boundary = estimate.backward_start
    if boundary is not None:
        axes.axvline(boundary - 0.5, color="gray", linestyle="--", linewidth=1)
        axes.text(boundary, axes.get_ylim()[1] * 0.97, " backward \u2192", color="gray", fontsize=8, va="top")
    axes.set_xlabel("step (node, in execution order)")
    axes.set_ylabel(f"{unit} live")
    axes.set_title(title or "memgraph predicted memory timeline")
    axes.legend(loc="upper left", fontsize=8, ncol=2)
    axes.margins(x=0)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return str(path)


# offload's ops (``cost_model/transfers.py`` names them): device memory freed at a forward wait, taken at a reload
_TRANSFER_MARKS = (("wait_offload_", "#1f77b4", "to host (wait)"), ("reload_", "#17becf", "reload starts"))


def _mark_transfers(axes, names: Sequence[str]) -> None:
    for prefix, color, label in _TRANSFER_MARKS:
        positions = [k for k, name in enumerate(names) if name.startswith(prefix)]
        for n, k in enumerate(positions):
            axes.axvline(k, color=color, linewidth=0.6, alpha=0.7, label=f"{label} ({len(positions)})" if n == 0
                         else None)


def align_measured(estimate, samples: Sequence[tuple[str, str, int]]) -> list[int]:
    """Measured bytes per estimate step from (node name, phase, bytes) samples of a real run; a step without
    a sample repeats the previous value."""
    by_step = {(name, phase): value for name, phase, value in samples}
    aligned, previous = [], 0
    for name, phase in zip(estimate.names, estimate.phases):
        previous = by_step.get((name, phase), previous)
        aligned.append(previous)
    return aligned
