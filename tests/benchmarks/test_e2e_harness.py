"""benchmarks/e2e.py's bookkeeping on the CPU (the recipes themselves need a GPU): a recipe that ran out of memory
while others shared the card is run again alone, and a failure's recorded reason keeps the error's head."""
import argparse
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_e2e  # noqa: E402
import e2e  # noqa: E402

OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1002.00 MiB. GPU 0 has a total capacity of "
       "79.18 GiB of which 641.81 MiB is free. " + "Process 1 has 15.56 GiB memory in use. " * 20)


def _args(tmp_path, parallel: int) -> argparse.Namespace:
    return argparse.Namespace(models=["llama3-8b"], seqs=[2048], recipes="bnb/eager-gc,bnb/inductor", budgets=[],
                              steps=1, layers=None, recipe_timeout=10, parallel=parallel, profile=None,
                              sync_report=None)


@pytest.fixture
def recipes(monkeypatch, tmp_path):
    """run_in_process stand-in: Inductor runs out of memory whenever another recipe is running beside it."""
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(e2e, "write_results", lambda *args, **kwargs: None)
    calls = []

    def run_in_process(options, recipe):
        calls.append(recipe)
        if recipe == "bnb/inductor" and len(calls) <= 2:
            return {"recipe": recipe, "seq": options.seq, "error": f"exit code 1: {bench_e2e.failure_reason(OOM)}"}
        return {"recipe": recipe, "seq": options.seq, "peak_gib": 1.0, "tok_s": 10.0, "compile_s": 0.0,
                "first_loss": 1.0}

    monkeypatch.setattr(bench_e2e, "run_in_process", run_in_process)
    return calls


def test_out_of_memory_beside_others_is_run_again_alone(recipes, tmp_path):
    rows = e2e.run(_args(tmp_path, parallel=2))["llama3-8b"]
    assert sorted(recipes) == ["bnb/eager-gc", "bnb/inductor", "bnb/inductor"]
    inductor = next(row for row in rows if row["recipe"] == "bnb/inductor")
    assert inductor["peak_gib"] == 1.0 and "Tried to allocate 1002.00 MiB" in inductor["shared_gpu_error"]


def test_one_recipe_at_a_time_keeps_its_error(recipes, tmp_path):
    rows = e2e.run(_args(tmp_path, parallel=1))["llama3-8b"]
    assert sorted(recipes) == ["bnb/eager-gc", "bnb/inductor"]
    assert e2e.out_of_memory(next(row for row in rows if row["recipe"] == "bnb/inductor"))


def test_a_failures_reason_keeps_the_errors_head():
    output = "compiling...\nTraceback (most recent call last):\n  File x\n" + OOM + "\n"
    reason = bench_e2e.failure_reason(output)
    assert reason.startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1002.00 MiB")
    assert len(reason) <= 404 and reason.endswith(" ...")
    assert bench_e2e.failure_reason("all fine\n") == ""


def test_memgraph_recipes_are_valid_options_and_named_apart():
    """Every default memgraph recipe parses into Options the backend accepts (bench_e2e hands it all but its
    own keys), once alone and once replayed from CUDA graphs, and the table names each differently."""
    from memgraph.options import resolve_options

    recipes = e2e.memgraph_recipes([6.5, 8])
    assert len(recipes) == 6 and len({e2e.label(r) for r in recipes}) == 6
    for recipe in recipes:
        weights, compiler, options = bench_e2e.parse_recipe(recipe)
        assert (weights, compiler) == ("bnb", "memgraph")
        options.pop("host_embedding")  # bench_e2e's own: memgraph.offload_embeddings_ before compiling
        resolved = resolve_options(options)
        assert resolved.cudagraphs == recipe.endswith("cudagraphs=true")
        assert resolved.optimizer == ("adamw" if resolved.memory_budget else "none")


def test_step_breakdown_plans_name_the_e2e_recipe():
    """A breakdown plan ``solver@budget&options`` plans with those options and finds the e2e row of the same
    recipe string."""
    import step_breakdown

    solver, budget, extra = step_breakdown.parse_plan("ilp@6.5GiB&optimizer=adamw&cudagraphs=true")
    assert (solver, budget) == ("ilp", "6.5GiB")
    assert step_breakdown.extra_options(extra) == {"optimizer": "adamw", "cudagraphs": True}
    recipe = f"{e2e.MEMGRAPH}&solver=ilp&memory_budget=6.5GiB&{extra}"
    assert recipe in e2e.memgraph_recipes([6.5])
    assert step_breakdown.parse_plan("offload-layers") == ("offload-layers", None, "")


def test_step_breakdown_pairs_a_plan_with_rows_whose_plan_saw_its_host_link(tmp_path):
    """A budgeted plan weighs offload by the host link: a measured row whose plan saw another link (or did not
    record one) measured another plan and is not set beside the prediction; offload-layers ignores the link."""
    import json

    import step_breakdown

    def row(solver, link, step_ms):
        budget = "&memory_budget=8GiB" if solver == "ilp" else ""
        return {"recipe": f"bnb/memgraph?{step_breakdown.E2E_OPTIONS}&host_embedding=true&solver={solver}{budget}",
                "seq": 2048, "tok_s": 1.0, "step_ms": step_ms, "peak_gib": 5.0, "measured": "2026-12-07T13:00",
                **({"host_link_gb_s": link} if link else {})}

    for link, expected in [(56.0, 300.0), (1127.7, None), (None, None)]:
        (tmp_path / "e2e_llama3-8b.json").write_text(json.dumps({"rows": [row("ilp", link, 300.0)]}))
        found = step_breakdown.measured("llama3-8b", 2048, "ilp", "8GiB", True, tmp_path, "", 55e9)
        assert found.get("measured_step_ms") == expected, link
    (tmp_path / "e2e_llama3-8b.json").write_text(json.dumps({"rows": [row("offload-layers", 1127.7, 240.0)]}))
    assert step_breakdown.measured("llama3-8b", 2048, "offload-layers", None, True, tmp_path, "",
                                   55e9)["measured_step_ms"] == 240.0


def _covered(spans):
    return bench_e2e._covered_us([(s, e) for s, e, *_ in spans])


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 20), st.sampled_from(["DtoH", "HtoD"])), max_size=8),
       st.lists(st.tuples(st.integers(0, 60), st.integers(1, 15)), max_size=8))
def test_exposed_spans_are_the_copy_time_no_kernel_ran_beside(copies, kernels):
    """Per direction, the exposed spans cover exactly what the copies add to the kernels' busy time, and each
    lies inside the copies (touching ones merged) and outside every kernel."""
    copies = [(s, s + d, direction) for s, d, direction in copies]
    kernels = [(s, s + d) for s, d in kernels]
    exposed = bench_e2e.exposed_spans(copies, kernels)
    for direction in ("DtoH", "HtoD"):
        mine = [(s, e) for s, e, d in copies if d == direction]
        found = [(s, e) for s, e, d in exposed if d == direction]
        assert _covered(found) == pytest.approx(_covered(mine + kernels) - _covered(kernels))
        for s, e in found:
            assert s < e
            assert any(cs <= s and e <= ce for cs, ce in bench_e2e._merged(mine))
            assert all(e <= ks or s >= ke for ks, ke in kernels)
