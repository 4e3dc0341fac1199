"""A laptop's plan equals the GPU's: the Llama-3-8B step captured on the meta device (no weights, no GPU) with the
rewrites the GPU runs gives the predicted peaks of the step captured on an H100 (tests/data, seq 2048), plan by
plan; and the chunked cross-entropy brings the smallest feasible peak of the QLoRA step under 7.5 GiB (7.0 GiB
with drop_logits)."""
from __future__ import annotations

from pathlib import Path

import pytest

import memgraph
from memgraph.capture import capture
from memgraph.compare import auto_budgets
from memgraph.cost_model import graph_costs, solvers
from memgraph.sources import example_batch, training_model

DATA = Path(__file__).resolve().parents[1] / "data"
GIB = 2**30
REWRITES = ["attention", "nf4", "cross_entropy"]


@pytest.mark.parametrize("recipe, weights", [("qlora", "nf4")])  # LoRA (bf16) agrees as exactly; ~70 s more
def test_meta_plans_equal_the_gpu_captured_ones(recipe, weights):
    gpu = memgraph.load_graph(DATA / f"llama3_8b_{recipe}_all_seq2048.json.gz")
    gpu_costs = graph_costs(gpu, codegen="inductor")  # capture plans for the options' codegen
    model = training_model("llama3-8b", weights=weights, lora=16)
    (meta,) = capture(model, options={"rewrites": REWRITES}, solvers=("checkpoint",), backward=False,
                      **example_batch(model, 1, 2048))
    budgets = auto_budgets([gpu], 3, [gpu_costs])
    cases = [("none", None), ("checkpoint", None)] + ([("ilp", budgets[1])] if recipe == "qlora" else [])
    for solver, budget in cases:
        # the ilp's rounds are time-bounded: time enough that a busy CI machine finds the same plan on both
        limit = {"time_limit": 30.0} if solver == "ilp" else {}
        want = solvers.get(solver).function(gpu, gpu_costs, budget, **limit).peak_bytes
        got = solvers.get(solver).function(meta.graph, meta.costs, budget, **limit).peak_bytes
        assert abs(got - want) <= 0.01 * want, (solver, budget, got, want)


def test_chunked_cross_entropy_lowers_the_smallest_feasible_peak():
    """H100 capture with logits kept; meta capture with drop_logits (the meta path equals the GPU's, above). The
    same step without the rewrite (tests/data/llama3_8b_qlora_seq2048, SDPA) cannot go below 9.9 GiB."""
    for name, limit in (("llama3_8b_qlora_all_seq2048", 7.5), ("llama3_8b_qlora_ce_drop_meta_seq2048", 7.0)):
        costs = graph_costs(memgraph.load_graph(DATA / f"{name}.json.gz"))
        peak, estimate = costs.least_peak
        assert peak <= limit * GIB, (name, peak / GIB, estimate.breakdown)
    without = graph_costs(memgraph.load_graph(DATA / "llama3_8b_qlora_seq2048.json.gz")).least_peak[0]
    assert without > 9.9 * GIB
