"""benchmarks/bench_lora_kernels.py on the CPU (interpreter, tiny shapes; timings need a GPU): every role of every
kernel is run and checked against the module's own result, and the sweep keeps a variant only when it is faster
and applies the best tiles it found."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_lora_kernels as bench  # noqa: E402

from memgraph.kernels import lora  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", {"q/o_proj": ((24, 40), 2), "down_proj": ((40, 24), 1)})
    for name in ("ROWS_TIMES_SMALL", "SMALL_TIMES_COLS", "COLS_REDUCED", "PROGRAMS_PER_MULTIPROCESSOR",
                 "MIN_STEPS_PER_SPLIT"):
        monkeypatch.setattr(lora, name, getattr(lora, name))  # restored after the sweep has set them


def test_every_role_runs_and_variants_are_checked_against_the_module(tiny, monkeypatch):
    """Each role runs on every shape; a variant's results are compared with the module's own: another product
    (one float32 dot) agrees within float32 rounding, a wrong kernel is refused."""
    b = bench._Bench([8], "cpu")
    for kernel, roles in bench.KERNELS.items():
        rows, _ = b.measure(kernel, "module")
        assert sorted(r["role"] for r in rows) == sorted(roles * len(bench.SHAPES))
    monkeypatch.setattr(lora, "SMALL_TIMES_COLS", {**lora.SMALL_TIMES_COLS, "PRODUCT_DOTS": 0})
    rows, _ = b.measure("small_times_cols", "one float32 dot")
    assert all(r["rel_err"] < 4e-3 for r in rows)
    wrong = lora._small_times_cols
    monkeypatch.setattr(lora, "_small_times_cols", lambda p, w, base, out, alpha, rd: wrong(p, w, base, out,
                                                                                          2 * alpha, rd))
    with pytest.raises(AssertionError, match="differs from the module's result"):
        b.measure("small_times_cols", "twice the product")


def test_the_sweep_keeps_only_faster_variants(tiny, monkeypatch):
    """Step times stand-in: smaller output tiles are faster; the search ends on the smallest it tried."""
    b = bench._Bench([8], "cpu")

    def measure(kernel, config):
        tiles = getattr(lora, bench.TILES[kernel])
        return [], float(tiles["BLOCK_M"] * tiles["BLOCK_N"])

    monkeypatch.setattr(b, "measure", measure)
    monkeypatch.setitem(bench.SEARCH, "small_times_cols", {"BLOCK_M": [16, 32], "BLOCK_N": [16, 64]})
    monkeypatch.setattr(lora, "SMALL_TIMES_COLS", dict(BLOCK_M=32, BLOCK_N=32, PRODUCT_DOTS=6))
    _, summary = bench._search(b, "small_times_cols", rounds=1, deadline=float("inf"))
    assert summary["best_step_ms"] == 16 * 16 and lora.SMALL_TIMES_COLS["BLOCK_M"] == 16
    assert lora.SMALL_TIMES_COLS["BLOCK_N"] == 16
