"""Recompute solvers on a tiny Llama (+LoRA): every plan a solver calls feasible fits its budget when the
partitioned graphs really run (dispatch-mode tracker), gradients do not change, the ILP is never slower than
greedy or torch's budget, and the error for an impossible budget says what dominates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memgraph import models
from memgraph.cost_model import solvers
from memgraph.capture import capture
from memgraph.cost_model.policies import never_recompute
from memgraph.cost_model.tracker import MemoryTracker, run_step
from memgraph.errors import InfeasibleBudgetError
from memgraph.passes.partition import partition

from tests.helpers import NO_REWRITES

BUDGETED = ("ilp", "greedy", "torch-budget", "checkpoint")
LAYERS = 3


@pytest.fixture(scope="module")
def step():
    """One captured training step of a 3-layer tiny Llama with LoRA (seq 128: activations dominate)."""
    torch._dynamo.reset()
    model = models.build("llama", lora=True, num_hidden_layers=LAYERS, use_cache=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    (captured,) = capture(model, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    reference = run_step(captured.fw, captured.bw, captured.primals, captured.graph.num_fwd_outputs,
                         tracker=MemoryTracker())
    return captured, reference


def _run(captured, plan):
    fw, bw = partition(captured.graph, plan)
    return run_step(fw, bw, captured.primals, captured.graph.num_fwd_outputs, tracker=MemoryTracker())


# torch's knapsack re-partitions the graph for every fraction it tries: a coarse grid keeps the tests fast
FAST = {"torch-budget": {"grid": (0.6, 0.2), "steps": 1}}


def _plan(name, captured, budget):
    return solvers.get(name).function(captured.graph, captured.costs, budget, **FAST.get(name, {}))


def _same_grads(measured, reference):
    for got, want in zip(measured.grads, reference.grads):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def peaks(step):
    captured, _ = step
    none = captured.costs.estimate(_plan("none", captured, None)).peak_bytes_hint
    return _plan("checkpoint", captured, None).peak_bytes, none


def test_registry_has_the_builtin_solvers():
    names = solvers.available()
    for name in ("none", "mincut", "ilp", "greedy", "checkpoint", "torch-budget"):
        assert name in names
    assert all(solvers.get(n).uses_budget for n in BUDGETED)
    assert not solvers.get("none").uses_budget


@pytest.mark.parametrize("name", ["ilp", "greedy", "torch-budget"])
def test_no_budget_gives_the_fastest_plan(step, peaks, name):
    captured, _ = step
    plan = _plan(name, captured, None)
    assert plan.budget_bytes is None and plan.peak_bytes > 0
    if name != "torch-budget":  # torch's budget 1.0 is its min-cut, which recomputes cheap pointwise ops
        assert plan.recompute_seconds == 0.0 and plan.peak_bytes == peaks[1]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0.0, max_value=1.0))
def test_feasible_plans_fit_when_run_and_keep_gradients(step, peaks, fraction):
    captured, reference = step
    low, high = min(peaks), max(peaks)
    budget = int(low + (high - low) * fraction)
    seconds = {}
    for name in BUDGETED:
        try:
            plan = _plan(name, captured, budget)
        except InfeasibleBudgetError as error:
            assert "smallest predicted-feasible peak" in str(error)
            continue
        assert plan.peak_bytes <= budget, (name, plan.summary())
        measured = _run(captured, plan)
        assert measured.peak_bytes <= budget, (name, budget, plan.peak_bytes, measured.peak_bytes)
        _same_grads(measured, reference)
        seconds[name] = plan.recompute_seconds
    assert "ilp" in seconds, "the ILP must meet every budget between the checkpointing and no-recompute peaks"
    for other in ("greedy", "torch-budget"):
        if other in seconds:
            assert seconds["ilp"] <= seconds[other] * (1 + 1e-9), seconds


@pytest.mark.parametrize("name", ["checkpoint", "ilp", "greedy"])
def test_predicted_peak_is_the_cost_models_estimate_of_the_partitioned_graphs(step, peaks, name):
    """Solvers score plans on the schedule the partition pass really builds (recomputation order included)."""
    from memgraph.cost_model import estimate_partitioned

    captured, _ = step
    plan = _plan(name, captured, None if name == "checkpoint" else (peaks[0] + peaks[1]) // 2)
    fw, bw = partition(captured.graph, plan)
    assert plan.peak_bytes == estimate_partitioned(captured.graph, fw, bw).peak_bytes_hint


def test_ilp_reports_gap_and_solve_details(step, peaks):
    captured, _ = step
    budget = (peaks[0] + peaks[1]) // 2
    plan = _plan("ilp", captured, budget)
    assert plan.optimality_gap is None or 0.0 <= plan.optimality_gap < 0.05
    assert plan.details["status"] in ("optimal", "time limit")
    assert plan.budget_bytes == budget and plan.peak_bytes <= budget


@pytest.mark.parametrize("fraction", [0.6, 0.8])
def test_tied_ilp_is_never_slower_than_torch_budget_at_its_peak(step, monkeypatch, fraction):
    """The 8B path (repeated layers share one policy, no torch incumbents) on the tiny model: at the peak torch's
    knapsack reaches, the ILP's plan recomputes no more than torch's. (Regression: the interval model left a
    value a decision only if the reference plan recomputed one of its users, so the tied MILP could not reach
    torch's deeper per-layer recomputation and answered up to 25% slower.)"""
    from memgraph.cost_model.solvers import ilp as ilp_module
    from memgraph.cost_model.solvers.torch_budget import torch_saved

    captured, _ = step
    monkeypatch.setattr(ilp_module, "TIE_BLOCKS_ABOVE", 0)
    costs = captured.costs
    torch_plan = torch_saved(costs, fraction)
    budget = costs.peak(torch_plan)
    assert budget < costs.peak(costs.save_all)
    plan = _plan("ilp", captured, budget)
    assert plan.details["tied_blocks"] and plan.peak_bytes <= budget
    assert not plan.details["source"].startswith("torch-budget")
    assert plan.recompute_seconds <= costs.recompute_seconds(torch_plan) * (1 + 1e-9), plan.details


def test_checkpoint_finds_the_layers_from_structure(step):
    captured, _ = step
    costs = captured.costs
    blocks = costs.blocks()
    assert blocks is not None and blocks.count == LAYERS
    plan = _plan("checkpoint", captured, None)
    assert plan.details["repeats"] == LAYERS
    # Inside the layers only the attention output (a pinned multi-output op is never rerun) and the layer
    # inputs are kept: far fewer values than the save-everything plan.
    assert len(plan.saved) < len(_plan("none", captured, None).saved)
    assert plan.recomputed


def test_impossible_budget_names_the_smallest_feasible_peak(step):
    captured, _ = step
    weights = captured.costs.estimate(_plan("none", captured, None)).breakdown["weights"]
    for name in BUDGETED:
        with pytest.raises(InfeasibleBudgetError, match="smallest predicted-feasible peak") as info:
            _plan(name, captured, weights // 2)
        assert "weights" in str(info.value)


def test_torch_compile_with_a_budget_matches_eager_gradients(peaks):
    budget = (peaks[0] + peaks[1]) // 2
    torch.manual_seed(0)
    model = models.build("llama", lora=True, num_hidden_layers=LAYERS, use_cache=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name in ("ilp", "greedy"):
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="memgraph",
                                 options={"codegen": "eager", "solver": name, "memory_budget": budget,
                                          "rewrites": False})
        compiled(input_ids=ids, labels=ids).loss.backward()
        for parameter_name, parameter in model.named_parameters():
            if parameter.requires_grad:
                torch.testing.assert_close(parameter.grad, eager[parameter_name], rtol=1e-5, atol=1e-6)


def test_random_ops_are_saved_never_recomputed():
    """GPT-2 with dropout 0.1: under the tightest budget every solver keeps dropout's outputs."""
    torch._dynamo.reset()
    model = models.build("gpt2", lora=False, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    captured = capture(model, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    checked = 0
    for record in captured:
        costs = record.costs
        random = [i for i in costs.forward if costs.pinned.get(i, "").startswith("random")]
        if not random:
            continue
        checked += 1
        least = costs.peak(costs.save_least)
        for name in ("ilp", "greedy", "checkpoint"):
            plan = solvers.get(name).function(record.graph, record.costs, max(least, costs.least_peak[0]) + 1)
            recomputed = [record.graph.node(n) for n in plan.recomputed]
            assert not [n.name for n in recomputed if never_recompute(n)], name
    assert checked, "the captured GPT-2 graphs contain no dropout"


def test_never_recompute_reasons():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    dropout = graph.call_function(torch.ops.aten.native_dropout.default, (x, 0.1, True))
    no_dropout = graph.call_function(torch.ops.aten.native_dropout.default, (x, 0.0, True))
    sdpa = graph.call_function(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, (x, x, x, 0.0))
    copy = graph.call_function(torch.ops.aten.copy_.default, (x, x))
    mm = graph.call_function(torch.ops.aten.mm.default, (x, x))
    assert never_recompute(x) == "input"
    assert never_recompute(dropout).startswith("random")
    assert never_recompute(no_dropout) is None
    assert never_recompute(sdpa) is None  # dropout_p=0: deterministic
    default = graph.call_function(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, (x, x, x))
    assert never_recompute(default) is None  # dropout_p left at its default 0, as HF calls it in training
    flash = graph.call_function(torch.ops.aten._scaled_dot_product_flash_attention.default, (x, x, x, 0.1))
    assert never_recompute(flash).startswith("random")
    assert never_recompute(copy) is not None
    assert never_recompute(mm) is None


@pytest.fixture(scope="module")
def large_step():
    """A 3-layer Llama on the meta device at GiB-sized activations (seq 8192, hidden 1024): the sizes an 8B graph
    puts into the MILP, without allocating them."""
    torch._dynamo.reset()
    with torch.device("meta"):
        model = models.build("llama", dtype=torch.bfloat16, lora=True, num_hidden_layers=LAYERS, use_cache=False,
                             hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=2,
                             head_dim=128)
    ids = torch.zeros((1, 8192), dtype=torch.long, device="meta")
    (captured,) = capture(model, options=NO_REWRITES, solvers=("none",), input_ids=ids, labels=ids)
    return captured


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_tied_ilp_at_gib_sizes_is_never_slower_than_torch_budget(large_step, monkeypatch, fraction):
    """As above at GiB-sized values. (Regression: with bytes and seconds as the MILP's units, HiGHS' absolute
    tolerances made it answer "optimal" with plans 5% slower than torch's on the 8B graph.)"""
    from memgraph.cost_model.solvers import ilp as ilp_module
    from memgraph.cost_model.solvers.torch_budget import torch_saved

    monkeypatch.setattr(ilp_module, "TIE_BLOCKS_ABOVE", 0)
    costs = large_step.costs
    torch_plan = torch_saved(costs, fraction)
    budget = costs.peak(torch_plan)
    assert 2**30 < budget < costs.peak(costs.save_all)
    plan = solvers.get("ilp").function(large_step.graph, large_step.costs, budget)
    assert plan.details["tied_blocks"] and plan.peak_bytes <= budget
    assert not plan.details["source"].startswith("torch-budget")
    assert plan.recompute_seconds <= costs.recompute_seconds(torch_plan) * (1 + 1e-9), plan.details


def test_milp_units_keep_coefficients_near_one(large_step):
    """HiGHS' tolerances are absolute: the MILP's memory coefficients are MiB and its costs milliseconds."""
    from memgraph.cost_model.solvers.ilp import formulate, intervals

    costs = large_step.costs
    formulation = formulate(costs, intervals(costs, costs.save_all), tie_blocks=True)
    coefficients = np.abs(np.asarray(formulation.rows.vals))
    assert coefficients.max() < 1e5  # a GiB value is 1024 MiB
    objective = np.abs(formulation.c[formulation.c != 0])
    assert objective.max() > 1e-3  # the costliest recomputation is at least a microsecond
    with pytest.raises(ValueError, match="needed-users"):
        intervals(costs, costs.save_all, fill="everything")


DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("recipe", ["lora", "qlora"])
def test_ilp_is_never_slower_than_torch_budget_on_the_8b_graph(recipe):
    """The Llama-3-8B step (seq 2048, LoRA r=16; QLoRA with memgraph's NF4 ops) as captured on the H200 for
    benchmarks/results/planner_sweep.json: at the peak torch's knapsack reaches (activation_memory_budget=0.6),
    the ILP recomputes no more than torch. (Regression: with the MILP in bytes and seconds HiGHS answered
    "optimal" 5% slower, 9.10 ms against torch's 8.75 ms, and the sweep measured ilp 0.4% slower there.)"""
    from memgraph.cost_model import graph_costs
    from memgraph.cost_model.solvers.torch_budget import torch_saved
    from memgraph.graph_io import load_graph

    graph = load_graph(DATA / f"llama3_8b_{recipe}_seq2048.json.gz")
    costs = graph_costs(graph)
    torch_plan = torch_saved(costs, 0.6)
    budget = costs.peak(torch_plan)
    assert budget < costs.peak(costs.save_all)
    plan = solvers.get("ilp").function(graph, costs, budget)
    assert plan.details["tied_blocks"] and plan.peak_bytes <= budget
    assert plan.recompute_seconds <= costs.recompute_seconds(torch_plan) * (1 + 1e-9), plan.details
