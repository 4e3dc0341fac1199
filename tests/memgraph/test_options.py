"""Options: validation with clear messages, and precedence options > memgraph.config > environment > defaults."""
import pytest
from hypothesis import given, strategies as st

import memgraph
from memgraph.errors import MemgraphError
from memgraph.options import Options, parse_bytes, resolve_options


@pytest.fixture(autouse=True)
def _clean_config(monkeypatch):
    memgraph.config.reset()
    for key in [k for k in __import__("os").environ if k.startswith("MEMGRAPH_")]:
        monkeypatch.delenv(key)
    yield
    memgraph.config.reset()


def test_defaults():
    options = resolve_options()
    assert options == Options()
    assert (options.solver, options.kv_bits, options.codegen, options.memory_budget) == ("mincut", 16, "inductor", None)


@pytest.mark.parametrize("bad, message", [
    ({"solvr": "none"}, r"unknown option\(s\) \['solvr'\]; valid options are \['memory_budget'"),
    ({"solver": "fastest"}, r"solver='fastest' is not a registered solver; choose one of \[.*'mincut'"),
    ({"kv_bits": 3}, r"kv_bits=3 is not supported; choose one of \[16, 8, 4\]"),
    ({"kv_bits": True}, r"kv_bits=True is not supported"),
    ({"codegen": "cuda"}, r"codegen='cuda' is not supported; choose one of \['inductor', 'eager'\]"),
    ({"memory_budget": "8 parsecs"}, r"not a size; use bytes or a number with a unit"),
    ({"memory_budget": -5}, r"must be positive"),
    ({"rewrites": "yes"}, r"unknown rewrites \['yes'\]; choose from \['attention', 'nf4', 'cross_entropy', 'lora'\]"),
    ({"rewrites": 3}, r"rewrites must be True, False or rewrite names"),
])
def test_bad_options_name_the_valid_choices(bad, message):
    with pytest.raises(ValueError, match=message):
        resolve_options(bad)


@pytest.mark.parametrize("given, selection", [
    (True, None), (False, ()), ("nf4", ("nf4",)), (["attention"], ("attention",)),
    ("attention, nf4", ("attention", "nf4")),
])
def test_rewrites_select_passes_by_name(given, selection):
    assert resolve_options({"rewrites": given}).rewrite_selection() == selection


def test_rewrites_from_environment_by_name(monkeypatch):
    monkeypatch.setenv("MEMGRAPH_REWRITES", "nf4")
    assert resolve_options().rewrites == ("nf4",)
    monkeypatch.setenv("MEMGRAPH_REWRITES", "off")
    assert resolve_options().rewrites is False


def test_budget_with_a_solver_that_ignores_budgets_is_rejected():
    with pytest.raises(ValueError, match="does not plan under a memory_budget"):
        resolve_options({"solver": "mincut", "memory_budget": "1GiB"})


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * 2**30), ("512 MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1e9", 10**9), ("4096", 4096),
    ("none", None), (None, None), (123, 123),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@given(st.integers(min_value=1, max_value=2**50), st.sampled_from(["B", "KiB", "MiB", "GiB", "KB", "MB", "GB"]))
def test_parse_bytes_round_trips_units(count, unit):
    scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit]
    assert parse_bytes(f"{count}{unit}") == count * scale


def test_precedence_options_over_config_over_environment(monkeypatch):
    monkeypatch.setenv("MEMGRAPH_SOLVER", "none")
    monkeypatch.setenv("MEMGRAPH_KV_BITS", "8")
    monkeypatch.setenv("MEMGRAPH_CODEGEN", "eager")
    assert resolve_options().solver == "none" and resolve_options().kv_bits == 8
    memgraph.config.kv_bits = 4
    assert resolve_options().kv_bits == 4  # config beats environment
    assert resolve_options().codegen == "eager"  # environment still beats defaults
    assert resolve_options({"kv_bits": 16}).kv_bits == 16  # options beat config
    with memgraph.config.patch(codegen="inductor"):
        assert resolve_options().codegen == "inductor"
    assert resolve_options().codegen == "eager"


def test_config_validates_on_assignment():
    with pytest.raises(ValueError, match="choose one of"):
        memgraph.config.codegen = "tvm"
    with pytest.raises(ValueError, match="has no setting 'budget'"):
        memgraph.config.budget = 1
    assert memgraph.config.codegen == "inductor"  # unassigned: the default


def test_environment_is_validated(monkeypatch):
    monkeypatch.setenv("MEMGRAPH_KV_BITS", "five")
    with pytest.raises(ValueError, match="MEMGRAPH_KV_BITS='five'"):
        resolve_options()
    monkeypatch.delenv("MEMGRAPH_KV_BITS")
    monkeypatch.setenv("MEMGRAPH_SOLVERR", "none")
    with pytest.raises(ValueError, match="unknown environment variable MEMGRAPH_SOLVERR.*MEMGRAPH_FAST_LAUNCH"):
        resolve_options()


def test_process_switches_are_not_options(monkeypatch):
    """MEMGRAPH_FAST_LAUNCH switches the kernels' launch path (kernels/_launch.py), not an Options field: a compile
    with it set must not fail (a device run's A/B of the launch path did)."""
    monkeypatch.setenv("MEMGRAPH_FAST_LAUNCH", "0")
    assert resolve_options() == resolve_options({})


def test_environment_reaches_a_compile_without_options(monkeypatch):
    """HF Trainer passes no options: MEMGRAPH_* variables must still take effect."""
    import torch

    monkeypatch.setenv("MEMGRAPH_SOLVER", "none")
    monkeypatch.setenv("MEMGRAPH_CODEGEN", "eager")
    linear = torch.nn.Linear(4, 4)
    torch.compile(linear, backend="memgraph")(torch.randn(2, 4)).sum().backward()
    record = memgraph.compiled_graphs()[-1]
    assert record.options.solver == "none" and record.plan.solver == "none"


def test_optimizer_state_comes_out_of_the_memory_budget():
    """``optimizer``: the budget also holds that optimizer's state for the graph's trainable parameters (here
    LoRA's), so the graph plans within the rest; a budget the state alone fills is a clear error."""
    import torch

    from memgraph import models
    from memgraph.capture import capture
    from memgraph.pipeline import graph_budget

    model = models.build("llama", lora=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    (record,) = capture(model, input_ids=ids, labels=ids, solvers=())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert record.graph.trainable_bytes == trainable
    budget = 1 << 30
    assert graph_budget(record.graph, resolve_options({"memory_budget": budget, "solver": "greedy"})) == (budget, None)
    for optimizer, states in (("adamw", 2), ("sgd-momentum", 1), ("sgd", 0)):
        options = resolve_options({"memory_budget": budget, "solver": "greedy", "optimizer": optimizer})
        planned, note = graph_budget(record.graph, options)
        assert planned == budget - states * trainable
        assert (note is None) == (states == 0)
    with pytest.raises(MemgraphError, match="adamw state"):
        graph_budget(record.graph, resolve_options({"memory_budget": trainable, "solver": "greedy",
                                                    "optimizer": "adamw"}))
    with pytest.raises(MemgraphError, match="choose one of"):
        resolve_options({"optimizer": "lion"})


def test_memgraph_plan_plans_within_the_budget_less_the_optimizer_state():
    """``memgraph.plan`` plans as the backend does: with ``optimizer``, within the budget less that state."""
    import torch

    from memgraph import models

    model = models.build("llama", lora=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    state = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fastest = memgraph.plan(model, example_kwargs={"input_ids": ids, "labels": ids}, solver="none").peak_bytes
    budget = fastest + state  # the fastest plan's graph and AdamW's state, exactly
    alone = memgraph.plan(model, example_kwargs={"input_ids": ids, "labels": ids}, solver="greedy",
                          memory_budget=budget)
    with_state = memgraph.plan(model, example_kwargs={"input_ids": ids, "labels": ids}, solver="greedy",
                               memory_budget=budget, optimizer="adamw")
    assert alone.budget_bytes == budget and with_state.budget_bytes == fastest
    assert with_state.peak_bytes <= fastest and any("adamw state" in n for n in with_state.notes)
    with pytest.raises(Exception, match="cannot be met"):  # Dynamo wraps the planner's InfeasibleBudgetError
        memgraph.plan(model, example_kwargs={"input_ids": ids, "labels": ids}, solver="greedy",
                      memory_budget=fastest, optimizer="adamw")


def test_trainable_bytes_leave_out_activations_from_another_graph():
    """After a graph break, the second graph's input activation gets a gradient too; only the parameters count."""
    import torch

    from memgraph.capture import capture

    first, second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def two_graphs(x):
        hidden = first(x).relu()
        torch._dynamo.graph_break()
        return second(hidden).sum()

    x = torch.randn(128, 64)
    records = capture(two_graphs, x, solvers=())
    assert len(records) == 2
    per_linear = sum(p.numel() * p.element_size() for p in first.parameters())
    assert [r.graph.trainable_bytes for r in records] == [per_linear, per_linear]


def test_memgraph_plan_and_compare_take_the_backend_options():
    """``cudagraphs`` (a compile setting) does not stop planning without compiling; ``compare`` with
    ``optimizer`` plans each cell within the budget less that state, as the compiled step would."""
    import torch

    from memgraph import models

    model = models.build("llama", lora=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "labels": ids}
    assert memgraph.plan(model, example_kwargs=kwargs, solver="greedy", cudagraphs=True).peak_bytes > 0
    state = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    fastest = memgraph.plan(model, example_kwargs=kwargs, solver="none").peak_bytes
    (row,) = memgraph.compare(model, example_kwargs=kwargs, budgets=[fastest + state], solvers=["greedy"],
                              options={"optimizer": "adamw"}, measure=False, progress=False, print_table=False)
    assert row["feasible"] and row["predicted_peak_bytes"] <= fastest
    (row,) = memgraph.compare(model, example_kwargs=kwargs, budgets=[state], solvers=["greedy"],
                              options={"optimizer": "adamw"}, measure=False, progress=False, print_table=False)
    assert not row["feasible"] and "adamw state" in row["error"]
