"""``memgraph fit``: the longest sequence that trains within a memory size, read off the symbolic peak of a meta
capture, and true when the step really runs there (and false one token further)."""
from __future__ import annotations

import pytest
import torch

import memgraph
from memgraph import cost_model
from memgraph.capture import capture
from memgraph.cli import main
from memgraph.cost_model.tracker import MemoryTracker, run_step
from memgraph.errors import MemgraphError
from memgraph.fit import GPU_PRESETS, resolve_memory
from memgraph.sources import example_batch, training_model

MEMORY = 1_400_000  # a tiny model's step at a few hundred tokens
EAGER = "eager"  # the oracle runs the captured graphs eagerly (the tracker): fit plans for that codegen


@pytest.fixture(scope="module")
def answer():
    result = memgraph.fit("llama", MEMORY, batches=(4,), weights="bf16", lora=None, optimizer="sgd",
                          progress=False, offload="off", codegen=EAGER)  # trained below on the CPU: no offload
    (row,) = result.rows
    return result, row


def test_fit_answers_from_the_symbolic_peak_and_checks_it(answer):
    result, row = answer
    assert row.limited_by == "memory" and 0 < row.max_seq < 128 and row.checked
    assert row.peak_bytes <= MEMORY and row.tok_s > 0 and row.breakdown["weights"] > 0
    assert "| 4 |" in result.table() and result.seconds > 0
    assert result.setup["optimizer"] == "sgd"  # fit's own, not the backend Options' field of that name


@pytest.mark.parametrize("step_up", [0, 1])
def test_the_answer_trains_and_one_token_more_does_not(answer, step_up):
    """The real step (CPU, real tensors, the dispatch-mode tracker) at the answer fits; one token longer, no plan
    of the ilp solver fits, or the one it finds does not when run."""
    _, row = answer
    seq = row.max_seq + step_up
    model = training_model("llama", weights="bf16", lora=None, device="cpu", dtype=torch.bfloat16)
    inputs = example_batch(model, row.batch, seq, device="cpu")
    try:
        (captured,) = capture(model, options={"solver": "ilp", "memory_budget": MEMORY, "codegen": EAGER}, **inputs)
    except Exception as error:  # noqa: BLE001 - Dynamo wraps the solver's InfeasibleBudgetError
        assert step_up == 1 and "cannot be met" in str(error), error
        return
    measured = run_step(captured.fw, captured.bw, captured.primals, captured.graph.num_fwd_outputs,
                        tracker=MemoryTracker())
    predicted = cost_model.estimate_partitioned(captured.graph, captured.fw, captured.bw).peak_bytes_hint
    assert abs(measured.peak_bytes - predicted) <= 0.02 * predicted  # the tracker's accuracy bound
    assert (measured.peak_bytes <= MEMORY) == (step_up == 0)


def test_offloading_layer_inputs_fits_longer_within_the_host_budget(answer):
    """With offload the leanest plans include the layer inputs in host memory: a longer answer, checked by that
    plan at the answer; a host budget that holds nothing gives the keep/recompute answer back."""
    _, without = answer
    result = memgraph.fit("llama", MEMORY, batches=(4,), weights="bf16", lora=None, optimizer="sgd",
                          progress=False, offload="on", offload_budget="1GiB", codegen=EAGER)
    (row,) = result.rows
    assert row.max_seq > without.max_seq and row.checked and row.peak_bytes <= MEMORY
    assert "offloaded" in row.plan and 0 < row.breakdown["host"] <= 2**30
    assert "offload-layers" in result.curves
    starved = memgraph.fit("llama", MEMORY, batches=(4,), weights="bf16", lora=None, optimizer="sgd",
                           progress=False, offload="on", offload_budget=1, codegen=EAGER)
    assert starved.rows[0].max_seq == without.max_seq


def test_memory_sizes_and_presets():
    assert resolve_memory("24GiB") == (24 * 2**30, "24.000 GiB")
    assert resolve_memory("rtx4090-24gb")[1] == "RTX4090-24GB"
    assert resolve_memory("H100-80GB")[0] == GPU_PRESETS["H100-80GB"] < 80 * 2**30
    with pytest.raises(MemgraphError, match="GPU preset, one of"):
        resolve_memory("twenty gigs")
    if not torch.cuda.is_available():
        with pytest.raises(MemgraphError, match="no GPU here"):
            resolve_memory(None)
    with pytest.raises(MemgraphError, match="optimizer"):
        memgraph.fit("llama", "1GiB", optimizer="lion")


def test_cli_fit_prints_a_table_and_draws(tmp_path, capsys):
    png = tmp_path / "fit.png"
    assert main(["fit", "--model", "llama", "--memory", "1400000", "--weights", "bf16", "--full", "--batches", "2,4",
                 "--optimizer", "sgd", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| 2 |" in out and "| 4 |" in out and png.stat().st_size > 10_000
    assert main(["fit", "--model", "no-such-model", "--memory", "1GiB"]) == 2
    assert "a local directory holding config.json" in capsys.readouterr().err


def test_cli_plan_takes_any_source(tmp_path, capsys):
    directory = tmp_path / "model"
    from memgraph.sources import model_config

    model_config("llama").save_pretrained(directory)
    assert main(["plan", "--model", str(directory), "--weights", "nf4", "--lora", "8", "--seq", "32"]) == 0
    assert "Plan(" in capsys.readouterr().out
